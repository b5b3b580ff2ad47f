"""The one-vs-rest ViT experts whose predictions become the soft labels (``docs/method.md`` §2, §3).

An expert f_k(x) = P(emotion k present | x) is a ``transformers`` ``ViTForImageClassification`` with
two labels, ``not_<emotion>`` and ``<emotion>``. It is trained on balanced one-vs-rest epochs of the
rows outside its fold, so that it can later score its own fold without having seen it. ``ExpertTask`` is
what an expert brings to the shared trainer (``models.training.train``).

Example:
    >>> from models.expert import ExpertConfig, make_expert
    >>> make_expert("happy", preset="tiny").config.id2label
    {0: 'not_happy', 1: 'happy'}
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from core.files import write_json_atomic
from core.schema import EMOTIONS, folds
from models import training
from models.losses import balanced_cross_entropy
from models.metrics import binary_metrics
from models.training import RESULTS_FILE, Evaluation, ModelConfig, Task, TrainConfig, TrainingSet
from models.transforms import AugmentConfig
from models.vit import PRESETS, check_safetensors, make_processor, make_vit  # noqa: F401  (re-exported)


def emotion_index(emotion: str) -> int:
    """The AffectNet code of an emotion name (one of the 8 that soft labels cover)."""
    if emotion not in EMOTIONS:
        raise ValueError(f"unknown emotion {emotion!r}; choose one of {', '.join(EMOTIONS)}")
    return EMOTIONS.index(emotion)


def expert_labels(emotion: str) -> dict[int, str]:
    emotion_index(emotion)
    return {0: f"not_{emotion}", 1: emotion}


def make_expert(emotion: str, preset: str = "tiny", init_from: str | None = None, image_size: int | None = None):
    """A two-label ViT expert for ``emotion`` (``not_<emotion>`` / ``<emotion>``); see ``make_vit``."""
    return make_vit(expert_labels(emotion), "single_label_classification", preset, init_from, image_size)


@dataclass(kw_only=True)
class ExpertConfig(ModelConfig):
    """One expert: ``ModelConfig`` plus its emotion and fold.

    Args:
        emotion: the expert's emotion, one of the 8 of the soft labels.
        fold: the fold this expert never sees: it trains on the train rows of the other folds.
        num_folds: cross-fitting folds K (a row's fold is sha1(image_id) mod K).
    """

    emotion: str = field(metadata={"choices": EMOTIONS})
    fold: int = 0
    num_folds: int = 5

    def __post_init__(self):
        super().__post_init__()
        emotion_index(self.emotion)
        if self.num_folds < 2:
            raise ValueError(f"num_folds must be >= 2 (cross-fitting), got {self.num_folds}")
        if not 0 <= self.fold < self.num_folds:
            raise ValueError(f"fold must be in 0..{self.num_folds - 1}, got {self.fold}")


def _expert_metrics(logits: torch.Tensor, targets: torch.Tensor) -> dict:
    return binary_metrics(logits.softmax(-1)[:, 1], targets)


class ExpertTask(Task):
    """An expert for ``models.training.train``: balanced one-vs-rest epochs of the rows outside its fold
    (``OneVsRestSampler``), class-balanced cross-entropy, AUROC / balanced accuracy / ECE on its held-out
    fold and on the validation split, and the expert card."""

    def __init__(self, config: ExpertConfig):
        super().__init__(config)
        self.emotion = emotion_index(config.emotion)
        self.name = f"expert-{config.emotion}-f{config.fold}"
        self._train_folds: np.ndarray | None = None

    def _folds(self, split) -> np.ndarray:
        """Each train row's fold (computed once: it hashes every image_id)."""
        if self._train_folds is None:
            self._train_folds = folds(split["image_id"], self.config.num_folds)
        return self._train_folds

    def make_model(self):
        c = self.config
        return make_expert(c.emotion, c.preset, c.init_from, c.image_size)

    def training_set(self, splits) -> TrainingSet:
        from models.data import OneVsRestSampler

        split, c = splits["train"], self.config
        labels = np.asarray(split["human_label"])
        sampler = OneVsRestSampler(labels, np.flatnonzero(self._folds(split) != c.fold), self.emotion, c.train.seed)
        rows = {"positives": len(sampler.positives), "negatives_per_epoch": sampler.num_negatives}
        info = dict(emotion=c.emotion, fold=c.fold, num_folds=c.num_folds, train_rows=rows)
        return TrainingSet(split, (labels == self.emotion).astype(np.int64), sampler, info)

    def evaluations(self, splits) -> dict[str, Evaluation]:
        split, c = splits["train"], self.config
        labels, fold = np.asarray(split["human_label"]), self._folds(split)
        targets = (labels == self.emotion).astype(np.int64)
        sets = {}
        heldout = np.flatnonzero((fold == c.fold) & (labels < len(EMOTIONS)))
        if len(heldout):
            sets["heldout"] = Evaluation(split, targets, heldout, _expert_metrics)
        if "validation" in splits:
            val_labels = np.asarray(splits["validation"]["human_label"])
            val_rows = np.flatnonzero(val_labels < len(EMOTIONS))
            if len(val_rows):
                val_targets = (val_labels == self.emotion).astype(np.int64)
                sets["validation"] = Evaluation(splits["validation"], val_targets, val_rows, _expert_metrics)
        return sets

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return balanced_cross_entropy(logits, targets)

    def card(self, results: dict):
        from models.cards import expert_card

        return expert_card(self.config, results)


def train_expert(config: ExpertConfig) -> dict:
    """Trains one expert and writes its checkpoint folder (see ``models.training.train``); returns its results.

    Example:
        >>> train_expert(ExpertConfig(data="affectnet_plus", emotion="happy", train=TrainConfig("happy-f0")))  # doctest: +SKIP
    """
    return training.train(ExpertTask(config))


def train_experts(
    data: str,
    output_dir,
    train: TrainConfig,
    num_folds: int = 5,
    preset: str = "tiny",
    init_from: str | None = None,
    image_size: int | None = None,
    emotions: tuple[str, ...] = EMOTIONS,
    augment: AugmentConfig | None = None,
) -> dict:
    """Trains every (emotion, fold) expert into ``output_dir/<emotion>-f<fold>`` and writes the manifest.

    ``output_dir/manifest.json`` (written atomically, after every expert) lists ``{emotion, fold, path,
    metrics}`` per expert, ``path`` relative to the manifest; ``output_dir/training_config.json`` records
    these arguments. An expert whose folder already holds ``all_results.json`` (written last, when the
    folder is complete) is not trained again, so an interrupted run continues where it stopped.

    Example:
        >>> train_experts("affectnet_plus", "experts", TrainConfig("experts"), num_folds=5)  # doctest: +SKIP
    """
    output_dir = Path(output_dir)
    augment = augment or AugmentConfig()
    settings = dict(data=str(data), num_folds=num_folds, preset=preset, init_from=init_from, image_size=image_size,
                    emotions=list(emotions), train=asdict(replace(train, output_dir=str(output_dir))),
                    augment=asdict(augment))  # fmt: skip
    entries = []
    for emotion in emotions:
        for fold in range(num_folds):
            folder = output_dir / f"{emotion}-f{fold}"
            results_file = folder / RESULTS_FILE
            if not results_file.is_file():
                config = ExpertConfig(
                    data=data, emotion=emotion, fold=fold, num_folds=num_folds, preset=preset, init_from=init_from,
                    image_size=image_size, augment=augment, train=replace(train, output_dir=str(folder)),
                )  # fmt: skip
                train_expert(config)
            results = json.loads(results_file.read_text())
            metrics = {k: v for k, v in results.items() if k.startswith(("validation_", "heldout_"))}
            entries.append({"emotion": emotion, "fold": fold, "path": folder.name, "metrics": metrics})
    manifest = {"data": str(data), "num_folds": num_folds, "preset": preset, "init_from": init_from, "experts": entries}
    output_dir.mkdir(parents=True, exist_ok=True)
    settings["train"]["resume_from_checkpoint"] = None
    write_json_atomic(output_dir / "training_config.json", settings)
    write_json_atomic(output_dir / "manifest.json", manifest)
    return manifest
