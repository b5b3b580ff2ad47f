"""The FER baselines of the AffectNet+ paper: a ViT emotion classifier trained on hard or soft labels.

A soft label is 8 independent per-emotion confidences in [0, 1] that do not sum to 1 (``docs/method.md``).
Three targets (``--target``):

- ``hard`` (Hard-FER) learns the annotator's ``human_label`` (cross-entropy);
- ``soft`` (Soft-FER) learns the soft label made a distribution over the model's classes by
  ``core.schema.as_distribution`` (``soft_cross_entropy``);
- ``soft-multilabel`` (Soft-FER, multi-label) learns the raw confidences, one sigmoid per emotion
  (``multilabel_bce``); its predicted class is the argmax of the sigmoids.

Each has 8 classes, or 7 without contempt (code 7; its confidence is dropped before normalising). Each is
a task of the project's one trainer (``FERTask`` for ``models.training.train``, the experts' Accelerate
loop), trained on the train rows whose human label is one of the classes and evaluated the same way on
the validation split by ``models.metrics.fer_metrics``: top-1/top-2 accuracy, macro-F1, Cohen's kappa,
ECE, KL/JS divergence to the normalised soft labels, and top-1 accuracy per subset and demographic
group, all from the model's predicted distribution (``predicted_distribution``). The checkpoint is a
regular ``ViTForImageClassification`` folder labelled with the emotion names.

Example:
    >>> from models.fer import FERConfig, class_names
    >>> class_names(7)[-1]
    'anger'
    >>> from models.training import TrainConfig
    >>> from models.fer import train_fer
    >>> train_fer(FERConfig("affectnet_plus", TrainConfig(output_dir="soft-8"), target="soft"))  # doctest: +SKIP
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from huggingface_hub import EvalResult, ModelCard, ModelCardData

from core.schema import EMOTIONS, SUBSETS, as_distribution
from models import training
from models.cards import _table, dataset_license
from models.losses import multilabel_bce, soft_cross_entropy
from models.metrics import age_bucket, fer_metrics
from models.training import Evaluation, ModelConfig, Task, TrainingSet
from models.vit import make_vit

TARGETS = ("hard", "soft", "soft-multilabel")
# How tables and cards name the baseline of each target.
TITLES = {"hard": "Hard-FER", "soft": "Soft-FER", "soft-multilabel": "Soft-FER (multi-label)"}
# What each target learns, for the card's training table.
LOSS_TEXT = {
    "hard": "cross-entropy on human_label",
    "soft": "soft cross-entropy on soft_label, normalised to sum to 1 over the classes",
    "soft-multilabel": "binary cross-entropy per class on the raw soft_label confidences (multi-label)",
}
NUM_CLASSES = (8, 7)
# The metrics of the paper's table, in its order: (key in fer_metrics, column title).
TABLE_METRICS = (
    ("top1_accuracy", "top-1"), ("top2_accuracy", "top-2"), ("macro_f1", "macro-F1"), ("cohen_kappa", "kappa"),
    ("kl_divergence", "KL"), ("js_divergence", "JS"), ("ece", "ECE"),
)  # fmt: skip


def class_names(num_classes: int) -> tuple[str, ...]:
    """The classes of an 8- or 7-class model; 7 drops contempt, the last code, so codes stay AffectNet's."""
    if num_classes not in NUM_CLASSES:
        raise ValueError(f"num_classes must be 8 or 7 (without contempt), got {num_classes}")
    return EMOTIONS[:num_classes]


@dataclass
class FERConfig(ModelConfig):
    """One FER baseline: ``ModelConfig`` plus the target and the classes.

    Args:
        target: ``hard`` learns the human label (cross-entropy); ``soft`` the soft label normalised to sum
            to 1 over the classes (soft cross-entropy); ``soft-multilabel`` the soft label's independent
            confidences as they are (binary cross-entropy per class; predicts the most confident class).
        num_classes: 8, or 7 without contempt (contempt's confidence dropped before any normalisation).
    """

    target: str = field(default="hard", metadata={"choices": TARGETS})
    num_classes: int = field(default=8, metadata={"choices": NUM_CLASSES})

    def __post_init__(self):
        super().__post_init__()
        if self.target not in TARGETS:
            raise ValueError(f"target must be one of {', '.join(TARGETS)}, got {self.target!r}")
        class_names(self.num_classes)


def make_classifier(num_classes: int = 8, preset: str = "tiny", init_from: str | None = None, image_size=None,
                    multilabel: bool = False):  # fmt: skip
    """A ViT emotion classifier (id2label = the emotion names), from a preset or a pretrained ViT.

    ``multilabel`` marks its outputs as independent confidences (``multi_label_classification``), so that
    ``pipeline("image-classification")`` gives one sigmoid per emotion instead of a softmax.

    Example:
        >>> make_classifier(7).config.id2label[6]
        'anger'
        >>> make_classifier(8, multilabel=True).config.problem_type
        'multi_label_classification'
    """
    names = class_names(num_classes)
    problem_type = "multi_label_classification" if multilabel else "single_label_classification"
    return make_vit(dict(enumerate(names)), problem_type, preset, init_from, image_size)


def soft_confidences(split, num_classes: int) -> np.ndarray:
    """(N, num_classes) float32: the soft labels' raw confidences of the classes (contempt dropped for 7);
    NaN rows where a row has none."""
    values = np.array(
        [s if s is not None else [np.nan] * len(EMOTIONS) for s in split["soft_label"]], dtype=np.float64
    ).reshape(len(split), len(EMOTIONS))
    return values[:, :num_classes].astype(np.float32)


def soft_targets(split, num_classes: int) -> np.ndarray:
    """(N, num_classes) float32: the soft labels made distributions over the classes, by
    ``core.schema.as_distribution`` after dropping the classes the model lacks; NaN rows where missing.

    Example:
        >>> from datasets import Dataset
        >>> soft_targets(Dataset.from_dict({"soft_label": [[0.6, 0.2, 0, 0, 0, 0, 0, 0.4]]}), 7).tolist()
        [[0.75, 0.25, 0.0, 0.0, 0.0, 0.0, 0.0]]
    """
    return as_distribution(soft_confidences(split, num_classes)).astype(np.float32)


def predicted_distribution(logits, target: str) -> np.ndarray:
    """(N, C) float64 class distribution of a baseline's logits, on which every variant is evaluated alike:
    the softmax for ``hard`` and ``soft``; for ``soft-multilabel``, whose outputs are independent
    confidences, the sigmoids normalised by ``core.schema.as_distribution`` (same argmax as the sigmoids).

    Example:
        >>> predicted_distribution(torch.zeros(1, 2), "soft-multilabel").tolist()
        [[0.5, 0.5]]
    """
    logits = torch.as_tensor(logits).detach().double().cpu()
    if target == "soft-multilabel":
        return as_distribution(logits.sigmoid().numpy())
    return logits.softmax(-1).numpy()


def demographic_groups(split) -> dict[str, list]:
    """The breakdown groups of each row from the columns that exist: ``subset`` name, ``gender`` and
    ``ethnicity`` (the most probable class) and ``age`` (bucket); None where a row has no value."""

    def argmax(struct):
        if not struct or any(v is None for v in struct.values()):
            return None
        return max(struct, key=struct.get)

    groups = {}
    columns = split.column_names
    if "subset" in columns:
        groups["subset"] = [SUBSETS[s] if s is not None and 0 <= s < len(SUBSETS) else None for s in split["subset"]]
    for name in ("gender", "ethnicity"):
        if name in columns:
            groups[name] = [argmax(v) for v in split[name]]
    if "age" in columns:
        groups["age"] = [age_bucket(a) for a in split["age"]]
    return groups


class ValidationMetrics:
    """The ``metrics`` of the validation ``Evaluation``, whose targets are row indices: it looks up the
    human labels, soft labels and groups of the gathered rows, so the loop's own evaluation (gathered
    across processes, padding dropped, any order) computes the full breakdown. Every target is scored on
    its ``predicted_distribution``."""

    def __init__(self, labels: np.ndarray, soft: np.ndarray | None, groups: dict[str, list], target: str = "hard"):
        self.labels, self.soft, self.target = labels, soft, target
        self.groups = {name: np.asarray(values, dtype=object) for name, values in groups.items()}
        self.last: dict[str, np.ndarray] = {}  # the last evaluation's probabilities, for the report's plots

    def __call__(self, logits: torch.Tensor, rows: torch.Tensor) -> dict:
        rows = rows.cpu().numpy()
        probs = predicted_distribution(logits, self.target)
        self.last = {"probs": probs.astype(np.float32), "labels": self.labels[rows]}
        if self.target == "soft-multilabel":  # what the model outputs, before normalising
            self.last["confidences"] = logits.double().sigmoid().cpu().numpy().astype(np.float32)
        with np.errstate(divide="ignore"):  # a probability of exactly 0 is log 0 = -inf, which softmax maps back
            scores = np.log(probs)
        return fer_metrics(
            scores,
            self.labels[rows],
            None if self.soft is None else self.soft[rows],
            {name: values[rows] for name, values in self.groups.items()},
        )


class FERTask(Task):
    """A FER baseline for ``models.training.train``: the train rows whose human label is one of the classes
    (soft targets: that also have a soft label), shuffled each epoch; cross-entropy, soft cross-entropy on
    the normalised soft label, or binary cross-entropy on its confidences; the ``fer_metrics`` breakdown
    on the validation split; the baseline's card. Its extra file is ``validation_predictions.npz`` (the
    last evaluation's predicted distributions and labels, for ``affectnet-plus report --baselines``; for
    ``soft-multilabel`` also the raw sigmoid ``confidences``)."""

    def __init__(self, config: FERConfig):
        super().__init__(config)
        self.name = f"fer-{config.target}-{config.num_classes}"
        self.validation: ValidationMetrics | None = None

    def make_model(self):
        c = self.config
        return make_classifier(c.num_classes, c.preset, c.init_from, c.image_size, c.target == "soft-multilabel")

    def training_set(self, splits) -> TrainingSet:
        from models.data import ShuffledRows

        c, split = self.config, splits["train"]
        if c.target != "hard" and "soft_label" not in split.column_names:
            raise ValueError(
                f"{c.data} has no soft_label column, which --target {c.target} learns: build it with experts "
                "(affectnet-plus build SRC --experts manifest.json) or use --target hard"
            )
        labels = np.asarray(split["human_label"], dtype=np.int64)
        usable = labels < c.num_classes  # drops none/uncertain/non-face (8-10), and contempt for 7 classes
        if c.target == "hard":
            targets = labels
        else:
            confidences = soft_confidences(split, c.num_classes)
            usable &= np.isfinite(confidences).all(1)
            outside = usable & ((confidences < 0) | (confidences > 1)).any(1)
            if outside.any():  # a damaged soft label is the build's to reject, never the trainer's to repair
                raise ValueError(f"{int(outside.sum())} train rows of {c.data} have soft_label values outside [0, 1]")
            targets = soft_targets(split, c.num_classes) if c.target == "soft" else confidences
            targets = np.nan_to_num(targets)  # rows never drawn, but the dataset holds a target for each
        rows = np.flatnonzero(usable)
        if len(rows) == 0:
            raise ValueError(f"no train row of {c.data} has a human label among {', '.join(class_names(c.num_classes))}")
        info = dict(target=c.target, num_classes=c.num_classes, classes=list(class_names(c.num_classes)),
                    train_rows=int(len(rows)))  # fmt: skip
        return TrainingSet(split, targets, ShuffledRows(rows, c.train.seed), info)

    def evaluations(self, splits) -> dict[str, Evaluation]:
        if "validation" not in splits:
            return {}
        split = splits["validation"]
        labels = np.asarray(split["human_label"], dtype=np.int64)
        rows = np.flatnonzero(labels < self.config.num_classes)
        if not len(rows):
            return {}
        soft = soft_targets(split, self.config.num_classes) if "soft_label" in split.column_names else None
        self.validation = ValidationMetrics(labels, soft, demographic_groups(split), self.config.target)
        # Row indices as targets: the metrics find each row's labels and groups whatever the order.
        return {"validation": Evaluation(split, np.arange(len(split), dtype=np.int64), rows, self.validation)}

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        # Computed here, never by transformers: it would pick BCE for any float targets.
        if self.config.target == "soft":
            return soft_cross_entropy(logits, targets)
        if self.config.target == "soft-multilabel":
            return multilabel_bce(logits, targets)
        return F.cross_entropy(logits.float(), targets.long())

    def card(self, results: dict) -> ModelCard:
        return fer_card(self.config, results)

    def write_extras(self, out: Path) -> None:
        # Predictions on the validation split, so that `affectnet-plus report --baselines` can draw confusion
        # matrices and reliability diagrams without running the models again.
        if self.validation is not None and self.validation.last:
            np.savez_compressed(out / "validation_predictions.npz", **self.validation.last)


def train_fer(config: FERConfig) -> dict:
    """Trains one FER baseline and writes its checkpoint folder (see ``models.training.train``); returns its
    results, whose ``validation_*`` keys are the metrics of ``fer_metrics``.

    Bad input raises ``ValueError`` before the first step: no train split, a soft target without a
    ``soft_label`` column or with confidences outside [0, 1], no usable row.
    """
    return training.train(FERTask(config))


CARD = """---
{{ card_data }}
---

# AffectNet+ {{ title }} ({{ num_classes }} classes)

A ViT facial-expression classifier over {{ classes }}, trained by affectnet-plus on the train rows of
`{{ dataset }}` {{ how }}. It is one of the FER baselines of AffectNet+ (Fard et al., arXiv:2410.22506;
this is an independent reimplementation, see the project's `docs/method.md`).

```python
from transformers import pipeline

classifier = pipeline("image-classification", model="PATH_OR_HUB_ID")
classifier("face.jpg")   # [{'label': 'happy', 'score': ...}, ...]
```

{{ outputs }}

Input: a face crop, resized to {{ image_size }}x{{ image_size }}, normalised with mean {{ mean }} and std {{ std }}.

## Results (validation split)

{{ results_table }}

Accuracies, macro-F1 and Cohen's kappa are against the human label. A soft label holds independent
per-emotion confidences that do not sum to 1; KL(soft || predicted) and the Jensen-Shannon divergence
(nats) are against the soft labels normalised to sum to 1 over these classes. ECE is that of the predicted
class (15 bins). {{ predicted }} Per-group rows give top-1 accuracy by data-complexity subset and
demographic group where the data has them; `*_top1_gap` is the largest difference between two groups.

## Training

{{ training_table }}

## License

{{ license_text }}
"""


def fer_card(config: FERConfig, results: dict) -> ModelCard:
    """The model card of a FER baseline: the validation metrics (also as ``EvalResult``s) and the setup."""
    dataset = Path(config.data).name
    evals = [
        EvalResult(
            task_type="image-classification", dataset_type=dataset, dataset_name=f"{dataset} (validation)",
            dataset_split="validation", metric_type=key, metric_name=title,
            metric_value=round(float(results[f"validation_{key}"]), 4),
        )
        for key, title in TABLE_METRICS
        if results.get(f"validation_{key}") is not None and results[f"validation_{key}"] == results[f"validation_{key}"]
    ]  # fmt: skip
    license_fields, license_text = dataset_license(config.data)
    data = ModelCardData(
        model_name=f"affectnet-plus-fer-{config.target}-{config.num_classes}",
        base_model=config.init_from if config.init_from and not Path(config.init_from).exists() else None,
        datasets=[dataset],
        tags=["image-classification", "vision-transformer", "facial-expression-recognition", "affectnet-plus"],
        pipeline_tag="image-classification",
        library_name="transformers",
        eval_results=evals or None,
        **license_fields,
    )
    rows = [(k.removeprefix("validation_"), round(v, 4) if isinstance(v, float) else v)
            for k, v in results.items() if k.startswith("validation_")]  # fmt: skip
    train = config.train
    training = [
        ("architecture", f"ViT preset `{config.preset}`" + (f" from `{config.init_from}`" if config.init_from
                                                            else ", random init")),  # fmt: skip
        ("target", f"`{config.target}`"),
        ("loss", LOSS_TEXT[config.target]),
        ("train rows", results.get("train_rows")),
        ("epochs / steps", f"{results.get('epoch')} / {results.get('step')}"),
        ("batch size per device x accumulation x processes",
         f"{train.per_device_batch_size} x {train.gradient_accumulation_steps} x {results.get('num_processes')}"),
        ("optimizer", f"AdamW, lr {train.learning_rate:g}, weight decay {train.weight_decay:g}, cosine, "
                      f"warmup {train.warmup_ratio:g}"),
        ("seed", train.seed),
    ]  # fmt: skip
    k = config.num_classes
    how = {
        "hard": "against their human labels (cross-entropy)",
        "soft": f"against their soft labels, each row's {k} confidences scaled to sum to 1 over these classes "
        "(soft cross-entropy on that distribution)",
        "soft-multilabel": f"against the {k} raw confidences of their soft labels, each emotion learned independently "
        "(multi-label: binary cross-entropy per class)",
    }[config.target]
    if config.target == "soft-multilabel":
        outputs = ("Each score is the sigmoid of one output: how much that emotion is present, independently of the "
                   "others, so the scores do not sum to 1. The predicted emotion is the highest score.")  # fmt: skip
        predicted = ("The predicted distribution is the sigmoid outputs normalised to sum to 1 (its top class is the "
                     "highest sigmoid); every metric is computed on it.")  # fmt: skip
    else:
        outputs = "The scores are a softmax over these classes: they sum to 1."
        predicted = "The predicted distribution is the softmax of the outputs."
    return ModelCard.from_template(
        data, template_str=CARD, title=TITLES[config.target], outputs=outputs, predicted=predicted,
        num_classes=k, classes=", ".join(class_names(k)), dataset=dataset, how=how,
        image_size=results.get("image_size"), mean=results.get("image_mean"), std=results.get("image_std"),
        results_table=_table(rows, ("metric", "value")), training_table=_table(training, ("setting", "value")),
        license_text=license_text,
    )  # fmt: skip


def _cell(value) -> str:
    return "–" if value is None or value != value else f"{value:.4f}"


def write_results(run_dirs, out) -> dict:
    """Collects the ``all_results.json`` of FER runs into ``out/results.json`` and ``out/results.md``.

    ``results.md`` is the baselines table: one row per run (Hard-FER, Soft-FER, Soft-FER (multi-label) x
    8/7 classes), columns top-1, top-2, macro-F1, kappa, KL, JS, ECE and top-1 per subset (validation
    split; ``–`` where the data lacks what the metric needs), and what each target learned. Returns
    ``{run folder name: validation metrics + target, classes}``.

    Example:
        >>> write_results(["baselines/hard-8", "baselines/soft-8", "baselines/soft-multilabel-8"], "baselines")  # doctest: +SKIP
    """
    out = Path(out)
    summary = {}
    for run_dir in map(Path, run_dirs):
        path = run_dir / "all_results.json"
        if not path.is_file():
            raise FileNotFoundError(f"{run_dir} has no all_results.json (did the run finish?)")
        results = json.loads(path.read_text())
        entry = {"target": results.get("target"), "num_classes": results.get("num_classes"), "path": str(run_dir)}
        entry.update({k.removeprefix("validation_"): v for k, v in results.items() if k.startswith("validation_")})
        summary[run_dir.name] = entry
    # The fairness columns: the largest top-1 gap between groups, for the demographics the data has.
    gaps = [g for g in ("gender", "ethnicity", "age") if any(f"{g}_top1_gap" in e for e in summary.values())]
    header = ["model", "classes", *(title for _, title in TABLE_METRICS), *(f"top-1 {s}" for s in SUBSETS),
              *(f"{g} gap" for g in gaps)]  # fmt: skip
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for entry in summary.values():
        title = TITLES.get(entry["target"], str(entry["target"]))
        cells = [title, str(entry["num_classes"])]
        cells += [_cell(entry.get(key)) for key, _ in TABLE_METRICS]
        cells += [_cell(entry.get(f"subset_{s}_top1_accuracy")) for s in SUBSETS]
        cells += [_cell(entry.get(f"{g}_top1_gap")) for g in gaps]
        lines.append("| " + " | ".join(cells) + " |")
    targets = [t for t in TARGETS if any(e["target"] == t for e in summary.values())]
    learned = " ".join(f"{TITLES[t]}: {LOSS_TEXT[t]}." for t in targets)
    note = (
        f"Validation split. {learned} Soft labels are independent per-emotion confidences that do not sum to 1. "
        "Every model is scored on a predicted distribution over its classes: the softmax, or for the multi-label "
        "model its sigmoids normalised to sum to 1 (same top class). Accuracies, macro-F1 and Cohen's kappa "
        "against the human label; KL(soft || predicted) and JS divergence (nats) against the soft labels "
        "normalised over the model's classes; ECE of the predicted class (15 bins). A gap is the largest "
        "difference in top-1 accuracy between two groups (gender and ethnicity: the most probable class; age: "
        "<20, 20-39, 40-59, 60+); per-group figures are in results.json."
    )
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "results.md").write_text("# FER baselines\n\n" + "\n".join(lines) + f"\n\n{note}\n")
    return summary
