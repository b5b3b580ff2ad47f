"""The FER baselines of the AffectNet+ paper: a ViT emotion classifier trained on hard or soft labels.

Hard-FER learns the annotator's ``human_label`` (cross-entropy); Soft-FER learns the ``soft_label``
distribution (``soft_cross_entropy``). Both have 8 classes, or 7 without contempt (code 7; the soft
labels are renormalised over the other 7). Each is a task of the project's one trainer (``FERTask`` for
``models.training.train``, the experts' Accelerate loop), trained on the train rows whose human label is
one of the classes and evaluated on the validation split by ``models.metrics.fer_metrics``: top-1/top-2 accuracy, macro-F1, Cohen's
kappa, ECE, KL/JS divergence to the soft labels, and top-1 accuracy per subset and demographic group.
The checkpoint is a regular ``ViTForImageClassification`` folder labelled with the emotion names.

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

from core.schema import EMOTIONS, SUBSETS
from models import training
from models.cards import _table, dataset_license
from models.losses import soft_cross_entropy
from models.metrics import age_bucket, fer_metrics
from models.training import Evaluation, ModelConfig, Task, TrainingSet
from models.vit import make_vit

TARGETS = ("hard", "soft")
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
        target: ``hard`` learns the human label (cross-entropy), ``soft`` the soft label (soft cross-entropy).
        num_classes: 8, or 7 without contempt (the soft labels renormalised over the other 7).
    """

    target: str = field(default="hard", metadata={"choices": TARGETS})
    num_classes: int = field(default=8, metadata={"choices": NUM_CLASSES})

    def __post_init__(self):
        super().__post_init__()
        if self.target not in TARGETS:
            raise ValueError(f"target must be one of {', '.join(TARGETS)}, got {self.target!r}")
        class_names(self.num_classes)


def make_classifier(num_classes: int = 8, preset: str = "tiny", init_from: str | None = None, image_size=None):
    """A ViT emotion classifier (id2label = the emotion names), from a preset or a pretrained ViT.

    Example:
        >>> make_classifier(7).config.id2label[6]
        'anger'
    """
    names = class_names(num_classes)
    return make_vit(dict(enumerate(names)), "single_label_classification", preset, init_from, image_size)


def soft_targets(split, num_classes: int) -> np.ndarray:
    """(N, num_classes) soft labels renormalised over the classes; NaN rows where missing or with no mass."""
    values = np.array(
        [s if s is not None else [np.nan] * len(EMOTIONS) for s in split["soft_label"]], dtype=np.float64
    ).reshape(len(split), len(EMOTIONS))[:, :num_classes]
    mass = values.sum(1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        values = np.where(mass > 0, values / mass, np.nan)
    return values.astype(np.float32)


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
    across processes, padding dropped, any order) computes the full breakdown."""

    def __init__(self, labels: np.ndarray, soft: np.ndarray | None, groups: dict[str, list]):
        self.labels, self.soft = labels, soft
        self.groups = {name: np.asarray(values, dtype=object) for name, values in groups.items()}
        self.last: dict[str, np.ndarray] = {}  # the last evaluation's probabilities, for the report's plots

    def __call__(self, logits: torch.Tensor, rows: torch.Tensor) -> dict:
        rows = rows.cpu().numpy()
        self.last = {"probs": logits.float().softmax(-1).cpu().numpy(), "labels": self.labels[rows]}
        return fer_metrics(
            logits,
            self.labels[rows],
            None if self.soft is None else self.soft[rows],
            {name: values[rows] for name, values in self.groups.items()},
        )


class FERTask(Task):
    """A FER baseline for ``models.training.train``: the train rows whose human label is one of the classes
    (soft: that also have a soft label), shuffled each epoch; cross-entropy or soft cross-entropy; the
    ``fer_metrics`` breakdown on the validation split; the Hard-/Soft-FER card. Its extra file is
    ``validation_predictions.npz`` (the last evaluation's probabilities and labels, for
    ``affectnet-plus report --baselines``)."""

    def __init__(self, config: FERConfig):
        super().__init__(config)
        self.name = f"fer-{config.target}-{config.num_classes}"
        self.validation: ValidationMetrics | None = None

    def make_model(self):
        c = self.config
        return make_classifier(c.num_classes, c.preset, c.init_from, c.image_size)

    def training_set(self, splits) -> TrainingSet:
        from models.data import ShuffledRows

        c, split = self.config, splits["train"]
        if c.target == "soft" and "soft_label" not in split.column_names:
            raise ValueError(
                f"{c.data} has no soft_label column, which --target soft learns: build it with experts "
                "(affectnet-plus build SRC --experts manifest.json) or use --target hard"
            )
        labels = np.asarray(split["human_label"], dtype=np.int64)
        usable = labels < c.num_classes  # drops none/uncertain/non-face (8-10), and contempt for 7 classes
        if c.target == "soft":
            targets = soft_targets(split, c.num_classes)
            usable &= np.isfinite(targets).all(1)
            targets = np.nan_to_num(targets)  # rows never drawn, but the dataset holds a target for each
        else:
            targets = labels
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
        self.validation = ValidationMetrics(labels, soft, demographic_groups(split))
        # Row indices as targets: the metrics find each row's labels and groups whatever the order.
        return {"validation": Evaluation(split, np.arange(len(split), dtype=np.int64), rows, self.validation)}

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if self.config.target == "soft":
            return soft_cross_entropy(logits, targets)
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

    Bad input raises ``ValueError`` before the first step: no train split, ``soft`` without a
    ``soft_label`` column, no usable row.
    """
    return training.train(FERTask(config))


CARD = """---
{{ card_data }}
---

# AffectNet+ {{ title }} ({{ num_classes }} classes)

A ViT facial-expression classifier over {{ classes }}, trained by affectnet-plus on the train rows of
`{{ dataset }}` {{ how }}. It is one of the Hard-FER / Soft-FER baselines of AffectNet+ (Fard et al.,
arXiv:2410.22506; this is an independent reimplementation).

```python
from transformers import pipeline

classifier = pipeline("image-classification", model="PATH_OR_HUB_ID")
classifier("face.jpg")   # [{'label': 'happy', 'score': ...}, ...]
```

Input: a face crop, resized to {{ image_size }}x{{ image_size }}, normalised with mean {{ mean }} and std {{ std }}.

## Results (validation split)

{{ results_table }}

Accuracies, macro-F1 and Cohen's kappa are against the human label; KL(soft || predicted) and the
Jensen-Shannon divergence (nats) against the soft labels; ECE is that of the predicted class (15 bins).
Per-group rows give top-1 accuracy by data-complexity subset and demographic group where the data has
them; `*_top1_gap` is the largest difference between two groups.

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
        ("loss", "soft cross-entropy on soft_label" if config.target == "soft" else "cross-entropy on human_label"),
        ("train rows", results.get("train_rows")),
        ("epochs / steps", f"{results.get('epoch')} / {results.get('step')}"),
        ("batch size per device x accumulation x processes",
         f"{train.per_device_batch_size} x {train.gradient_accumulation_steps} x {results.get('num_processes')}"),
        ("optimizer", f"AdamW, lr {train.learning_rate:g}, weight decay {train.weight_decay:g}, cosine, "
                      f"warmup {train.warmup_ratio:g}"),
        ("seed", train.seed),
    ]  # fmt: skip
    how = (
        "against their soft labels (renormalised over these classes)"
        if config.target == "soft"
        else "against their human labels"
    )
    return ModelCard.from_template(
        data, template_str=CARD, title="Soft-FER" if config.target == "soft" else "Hard-FER",
        num_classes=config.num_classes, classes=", ".join(class_names(config.num_classes)), dataset=dataset, how=how,
        image_size=results.get("image_size"), mean=results.get("image_mean"), std=results.get("image_std"),
        results_table=_table(rows, ("metric", "value")), training_table=_table(training, ("setting", "value")),
        license_text=license_text,
    )  # fmt: skip


def _cell(value) -> str:
    return "–" if value is None or value != value else f"{value:.4f}"


def write_results(run_dirs, out) -> dict:
    """Collects the ``all_results.json`` of FER runs into ``out/results.json`` and ``out/results.md``.

    ``results.md`` is the baselines table: one row per run (Hard/Soft-FER x 8/7 classes), columns
    top-1, top-2, macro-F1, kappa, KL, JS, ECE and top-1 per subset (validation split; ``–`` where the
    data lacks what the metric needs). Returns ``{run folder name: validation metrics + target, classes}``.

    Example:
        >>> write_results(["baselines/hard-8", "baselines/soft-8"], "baselines")  # doctest: +SKIP
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
        title = {"hard": "Hard-FER", "soft": "Soft-FER"}.get(entry["target"], str(entry["target"]))
        cells = [title, str(entry["num_classes"])]
        cells += [_cell(entry.get(key)) for key, _ in TABLE_METRICS]
        cells += [_cell(entry.get(f"subset_{s}_top1_accuracy")) for s in SUBSETS]
        cells += [_cell(entry.get(f"{g}_top1_gap")) for g in gaps]
        lines.append("| " + " | ".join(cells) + " |")
    note = (
        "Validation split. Accuracies, macro-F1 and Cohen's kappa against the human label; KL(soft || predicted) "
        "and JS divergence (nats) against the soft labels; ECE of the predicted class (15 bins). A gap is the "
        "largest difference in top-1 accuracy between two groups (gender and ethnicity: the most probable "
        "class; age: <20, 20-39, 40-59, 60+); per-group figures are in results.json."
    )
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "results.md").write_text("# FER baselines\n\n" + "\n".join(lines) + f"\n\n{note}\n")
    return summary
