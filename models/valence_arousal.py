"""A valence/arousal regressor: a ViT with a 2-output head, for sources that lack valence and arousal.

It is trained with the experts' Accelerate loop (``models.training.fit``) on the train rows that have
both values (AffectNet's, in [-1, 1]), with mean squared error, and evaluated on the validation split
by CCC and RMSE. The checkpoint is a regular ``transformers`` folder (``ViTForImageClassification``,
``problem_type="regression"``, labels ``valence`` / ``arousal``); the build's
``builder.va_annotator.ValenceArousalAnnotator`` runs it on the crops of sources without valence/arousal.

Example:
    >>> from models.training import TrainConfig
    >>> from models.valence_arousal import RegressorConfig, train_regressor
    >>> train_regressor(RegressorConfig("affectnet_plus", TrainConfig(output_dir="va")))  # doctest: +SKIP
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from accelerate.utils import set_seed
from huggingface_hub import ModelCard, ModelCardData

from models.cards import _table, dataset_license
from models.expert import ModelConfig, _flat, _processor_stats, make_vit, save_checkpoint
from models.metrics import valence_arousal_metrics
from models.training import fit, make_accelerator, make_loader, make_train_loader
from models.transforms import BatchTransform

VA_LABELS = {0: "valence", 1: "arousal"}


@dataclass
class RegressorConfig(ModelConfig):
    """The valence/arousal regressor: data, architecture (as the experts') and optimisation settings."""


def make_regressor(preset: str = "tiny", init_from: str | None = None, image_size: int | None = None):
    """A ViT with a 2-output regression head (valence, arousal), from a preset or a pretrained ViT."""
    return make_vit(VA_LABELS, "regression", preset, init_from, image_size)


def _targets(split) -> tuple[np.ndarray, np.ndarray]:
    """(N, 2) float targets (NaN where missing) and the rows that have both values."""
    values = np.array([split["valence"], split["arousal"]], dtype=np.float64).T  # None -> nan
    return values.astype(np.float32), np.flatnonzero(np.isfinite(values).all(1))


def _mse(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.mse_loss(outputs.float(), targets.float())


def _metrics(outputs: torch.Tensor, targets: torch.Tensor) -> dict:
    return valence_arousal_metrics(outputs.clamp(-1, 1), targets)


def train_regressor(config: RegressorConfig) -> dict:
    """Trains the regressor and writes its checkpoint folder (as an expert's, with a model card).

    Raises ``ValueError`` before any step when the data has no train row with valence and arousal.
    """
    from models.data import FaceDataset, ShuffledRows, load_splits

    train = config.train
    accelerator = make_accelerator(train)
    set_seed(train.seed)
    model = make_regressor(config.preset, config.init_from, config.image_size)
    image_size = model.config.image_size
    mean, std = _processor_stats(config.init_from)
    with accelerator.main_process_first():
        splits = load_splits(config.data, columns=("image_id", "image", "valence", "arousal"))
    if "train" not in splits:
        raise ValueError(f"{config.data} has no train split (splits: {', '.join(splits)})")
    targets, rows = _targets(splits["train"])
    if len(rows) == 0:
        raise ValueError(f"no train row of {config.data} has both valence and arousal: nothing to learn")
    train_data = FaceDataset(splits["train"], targets, image_size)
    eval_loaders = {}
    if "validation" in splits:
        val_targets, val_rows = _targets(splits["validation"])
        if len(val_rows):
            val_data = FaceDataset(splits["validation"], val_targets, image_size)
            eval_loaders["validation"] = make_loader(
                torch.utils.data.Subset(val_data, val_rows.tolist()), train.eval_batch_size,
                num_workers=train.num_workers,
            )  # fmt: skip
    train_loader = make_train_loader(train_data, ShuffledRows(rows, train.seed), train, accelerator)
    # Flips keep valence and arousal; the other augmentations are the experts'.
    transform = BatchTransform(image_size, mean, std, augment=config.augment)
    if train.report_to != "none":
        accelerator.init_trackers("valence-arousal", config=_flat(asdict(config)))
    model, results = fit(accelerator, model, transform, train_loader, eval_loaders, _mse, _metrics, train)
    results.update(image_size=image_size, image_mean=list(mean), image_std=list(std), train_rows=int(len(rows)))
    save_checkpoint(accelerator, model, config, results, regressor_card(config, results))
    return results


CARD = """---
{{ card_data }}
---

# AffectNet+ valence/arousal regressor

A ViT with two outputs, valence and arousal in [-1, 1] (clip the raw outputs), trained by affectnet-plus
on the train rows of `{{ dataset }}` that carry both values. affectnet-plus uses it to estimate
valence and arousal for sources without them; the dataset cards of such builds say so.

```python
import torch
from transformers import AutoImageProcessor, AutoModelForImageClassification

model = AutoModelForImageClassification.from_pretrained("PATH_OR_HUB_ID")
processor = AutoImageProcessor.from_pretrained("PATH_OR_HUB_ID")
valence, arousal = model(**processor(face, return_tensors="pt")).logits[0].clamp(-1, 1)
```

## Results (validation split)

{{ results_table }}

## License

{{ license_text }}
"""


def regressor_card(config: RegressorConfig, results: dict) -> ModelCard:
    """The model card of the regressor: CCC and RMSE, architecture, data and license."""
    license_fields, license_text = dataset_license(config.data)
    data = ModelCardData(
        model_name="affectnet-plus-valence-arousal",
        base_model=config.init_from if config.init_from and not Path(config.init_from).exists() else None,
        datasets=[Path(config.data).name],
        tags=["vision-transformer", "valence-arousal", "affectnet-plus", "regression"],
        library_name="transformers",
        **license_fields,
    )
    rows = [(k, round(v, 4) if isinstance(v, float) else v) for k, v in results.items() if k.startswith("validation_")]
    rows.append(("architecture", f"ViT preset `{config.preset}`" + (f" from `{config.init_from}`" if config.init_from
                                                                    else ", random init")))  # fmt: skip
    rows.append(("train rows", results.get("train_rows")))
    return ModelCard.from_template(
        data, template_str=CARD, dataset=Path(config.data).name, results_table=_table(rows, ("metric", "value")),
        license_text=license_text,
    )  # fmt: skip
