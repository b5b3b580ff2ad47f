"""A valence/arousal regressor: a ViT with a 2-output head, for sources that lack valence and arousal.

It is a task of the project's one trainer (``RegressorTask`` for ``models.training.train``, the experts'
Accelerate loop): trained on the train rows that have both values (AffectNet's, in [-1, 1]) with mean
squared error, and evaluated on the validation split by CCC and RMSE. The checkpoint is a regular
``transformers`` folder (``ViTForImageClassification``, ``problem_type="regression"``, labels
``valence`` / ``arousal``); the build's ``builder.va_annotator.ValenceArousalAnnotator`` runs it on the
crops of sources without valence/arousal.

Example:
    >>> from models.training import TrainConfig
    >>> from models.valence_arousal import RegressorConfig, train_regressor
    >>> train_regressor(RegressorConfig("affectnet_plus", TrainConfig(output_dir="va")))  # doctest: +SKIP
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from huggingface_hub import ModelCard, ModelCardData

from models import training
from models.cards import _table, dataset_license
from models.metrics import valence_arousal_metrics
from models.training import Evaluation, ModelConfig, Task, TrainingSet
from models.vit import make_vit

VA_LABELS = {0: "valence", 1: "arousal"}


@dataclass
class RegressorConfig(ModelConfig):
    """The valence/arousal regressor: ``ModelConfig`` as it is (data, architecture, optimisation)."""


def make_regressor(preset: str = "tiny", init_from: str | None = None, image_size: int | None = None):
    """A ViT with a 2-output regression head (valence, arousal), from a preset or a pretrained ViT."""
    return make_vit(VA_LABELS, "regression", preset, init_from, image_size)


def _targets(split) -> tuple[np.ndarray, np.ndarray]:
    """(N, 2) float targets (NaN where missing) and the rows that have both values."""
    values = np.array([split["valence"], split["arousal"]], dtype=np.float64).T  # None -> nan
    return values.astype(np.float32), np.flatnonzero(np.isfinite(values).all(1))


def _metrics(outputs: torch.Tensor, targets: torch.Tensor) -> dict:
    return valence_arousal_metrics(outputs.clamp(-1, 1), targets)


class RegressorTask(Task):
    """The regressor for ``models.training.train``: the train rows with valence and arousal, shuffled each
    epoch; mean squared error; CCC and RMSE on the validation rows that have both; the regressor card.
    The augmentation is the experts' (flips keep valence and arousal)."""

    name = "valence-arousal"
    columns = ("image_id", "image", "valence", "arousal")

    def make_model(self):
        c = self.config
        return make_regressor(c.preset, c.init_from, c.image_size)

    def training_set(self, splits) -> TrainingSet:
        from models.data import ShuffledRows

        targets, rows = _targets(splits["train"])
        if len(rows) == 0:
            raise ValueError(f"no train row of {self.config.data} has both valence and arousal: nothing to learn")
        sampler = ShuffledRows(rows, self.config.train.seed)
        return TrainingSet(splits["train"], targets, sampler, {"train_rows": int(len(rows))})

    def evaluations(self, splits) -> dict[str, Evaluation]:
        if "validation" not in splits:
            return {}
        targets, rows = _targets(splits["validation"])
        return {"validation": Evaluation(splits["validation"], targets, rows, _metrics)} if len(rows) else {}

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.mse_loss(outputs.float(), targets.float())

    def card(self, results: dict) -> ModelCard:
        return regressor_card(self.config, results)


def train_regressor(config: RegressorConfig) -> dict:
    """Trains the regressor and writes its checkpoint folder (see ``models.training.train``).

    Raises ``ValueError`` before any step when the data has no train row with valence and arousal.
    """
    return training.train(RegressorTask(config))


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
