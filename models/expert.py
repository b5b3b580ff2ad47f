"""The one-vs-rest ViT experts whose predictions become the soft labels (DESIGN §5, steps 1-2).

An expert f_k(x) = P(emotion k present | x) is a ``transformers`` ``ViTForImageClassification`` with
two labels, ``not_<emotion>`` and ``<emotion>``. It is trained on balanced one-vs-rest epochs of the
rows outside its fold, so that it can later score its own fold without having seen it.

Example:
    >>> from models.expert import ExpertConfig, make_expert
    >>> make_expert("happy", preset="tiny").config.id2label
    {0: 'not_happy', 1: 'happy'}
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from accelerate.utils import set_seed
from transformers import ViTConfig, ViTForImageClassification

from core.hub import PICKLE_SUFFIXES  # one list of the weight formats that unpickle
from core.schema import EMOTIONS, folds
from models.losses import balanced_cross_entropy
from models.metrics import binary_metrics
from models.training import TrainConfig, fit, make_accelerator, make_loader, make_train_loader
from models.transforms import HALF, AugmentConfig, BatchTransform

# tiny: random init, small images: the tests and the CPU demo. base: ViT-B/16 at 224 px.
PRESETS = {
    "tiny": dict(image_size=64, patch_size=8, hidden_size=96, num_hidden_layers=3, num_attention_heads=3,
                 intermediate_size=192),
    "base": dict(image_size=224, patch_size=16, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                 intermediate_size=3072),
}  # fmt: skip


def emotion_index(emotion: str) -> int:
    """The AffectNet code of an emotion name (one of the 8 that soft labels cover)."""
    if emotion not in EMOTIONS:
        raise ValueError(f"unknown emotion {emotion!r}; choose one of {', '.join(EMOTIONS)}")
    return EMOTIONS.index(emotion)


def expert_labels(emotion: str) -> dict[int, str]:
    emotion_index(emotion)
    return {0: f"not_{emotion}", 1: emotion}


def check_safetensors(init_from: str) -> None:
    """A local ``--init-from`` folder must hold safetensors weights: pickles are never loaded."""
    path = Path(init_from)
    if not path.exists():
        return  # a Hub id: from_pretrained(use_safetensors=True) refuses pickle-only repositories
    if not path.is_dir():
        raise ValueError(f"--init-from {init_from} must be a model folder or a Hub id, not a file")
    if any(path.glob("*.safetensors")):
        return
    pickles = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise ValueError(
            f"--init-from {init_from} holds only pickle weights ({', '.join(pickles)}); only safetensors are "
            "loaded. Convert once where you trust the file: model.save_pretrained(dir) writes model.safetensors"
        )
    raise ValueError(f"--init-from {init_from} holds no model weights (no *.safetensors)")


def make_vit(id2label: dict[int, str], problem_type: str = "single_label_classification", preset: str = "tiny",
             init_from: str | None = None, image_size: int | None = None):  # fmt: skip
    """A ``ViTForImageClassification`` with the head ``id2label``: from a preset (random init) or from a
    pretrained ViT (safetensors only; its head is replaced). Every model the project trains is one.

    Args:
        id2label: the outputs' names; ``problem_type``: ``single_label_classification`` or ``regression``.
        preset: ``tiny`` or ``base`` (architecture when ``init_from`` is not given).
        init_from: a local folder or Hub id of a ViT checkpoint.
        image_size: input side in pixels; must be a multiple of the patch size (and the checkpoint's).

    Example:
        >>> make_vit({0: "valence", 1: "arousal"}, "regression").config.num_labels
        2
    """
    labels = dict(id2label=id2label, label2id={v: k for k, v in id2label.items()}, num_labels=len(id2label))
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    if init_from:
        check_safetensors(init_from)
        config = ViTConfig.from_pretrained(init_from)
    else:
        config = ViTConfig(**PRESETS[preset])
    image_size = image_size or config.image_size
    if image_size % config.patch_size:
        raise ValueError(f"image size {image_size} is not a multiple of the patch size {config.patch_size}")
    if init_from and image_size != config.image_size:
        raise ValueError(f"{init_from} was trained at {config.image_size} px; --image-size {image_size} differs")
    config.image_size = image_size
    config.update({**labels, "problem_type": problem_type})
    if init_from:
        return ViTForImageClassification.from_pretrained(
            init_from, config=config, ignore_mismatched_sizes=True, use_safetensors=True
        )
    return ViTForImageClassification(config)


def make_expert(emotion: str, preset: str = "tiny", init_from: str | None = None, image_size: int | None = None):
    """A two-label ViT expert for ``emotion`` (``not_<emotion>`` / ``<emotion>``); see ``make_vit``."""
    return make_vit(expert_labels(emotion), "single_label_classification", preset, init_from, image_size)


def make_processor(image_size: int, mean=HALF, std=HALF):
    """The image processor saved next to a checkpoint, so ``pipeline("image-classification")`` works."""
    try:  # the PIL processor needs no torchvision; the class name saved is ViTImageProcessor either way
        from transformers import ViTImageProcessorPil as Processor
    except ImportError:
        from transformers import ViTImageProcessor as Processor
    return Processor(size={"height": image_size, "width": image_size}, image_mean=list(mean), image_std=list(std))


@dataclass
class ModelConfig:
    """What every model the project trains takes: data, optimisation, and the ViT to build (``make_vit``).

    Args:
        data: a built AffectNet+ folder (``affectnet-plus build``) with ``train`` (and ``validation``).
        train: the optimisation settings.
        preset, init_from, image_size: see ``make_vit``.
        push_to_hub: a Hub repository to push the finished checkpoint to (main process only).
        augment: the on-device augmentation of training batches.
    """

    data: str
    train: TrainConfig
    preset: str = "tiny"
    init_from: str | None = None
    image_size: int | None = None
    push_to_hub: str | None = None
    augment: AugmentConfig = field(default_factory=AugmentConfig)

    def __post_init__(self):
        if self.preset not in PRESETS:
            raise ValueError(f"unknown preset {self.preset!r}; choose one of {', '.join(PRESETS)}")


@dataclass(kw_only=True)
class ExpertConfig(ModelConfig):
    """One expert: ``ModelConfig`` plus its emotion and fold.

    Args:
        emotion: the expert's emotion, one of ``EMOTIONS``.
        fold, num_folds: the expert trains on train rows whose fold is not ``fold``.
    """

    emotion: str
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


def _processor_stats(init_from: str | None) -> tuple[tuple, tuple]:
    if init_from:
        try:
            from transformers import AutoImageProcessor

            processor = AutoImageProcessor.from_pretrained(init_from)
            return tuple(processor.image_mean), tuple(processor.image_std)
        except (OSError, ValueError):
            pass  # no processor saved with the checkpoint: ViT's usual 0.5/0.5
    return HALF, HALF


def train_expert(config: ExpertConfig) -> dict:
    """Trains one expert and writes its checkpoint folder; returns its results.

    The folder (``config.train.output_dir``) holds ``model.safetensors``, ``config.json``,
    ``preprocessor_config.json``, ``training_config.json``, ``all_results.json`` and ``README.md``
    (the model card). Every bad input raises a ``ValueError`` before the first training step.
    """
    from models.cards import expert_card
    from models.data import FaceDataset, OneVsRestSampler, load_splits

    train = config.train
    accelerator = make_accelerator(train)
    set_seed(train.seed)
    emotion = emotion_index(config.emotion)
    model = make_expert(config.emotion, config.preset, config.init_from, config.image_size)
    image_size = model.config.image_size
    mean, std = _processor_stats(config.init_from)

    with accelerator.main_process_first():  # one process builds the datasets cache, the others reuse it
        splits = load_splits(config.data)
    if "train" not in splits:
        raise ValueError(f"{config.data} has no train split (splits: {', '.join(splits)})")
    train_split, validation_split = splits["train"], splits.get("validation")
    labels = np.asarray(train_split["human_label"])
    fold = folds(train_split["image_id"], config.num_folds)
    rows = np.flatnonzero(fold != config.fold)
    sampler = OneVsRestSampler(labels, rows, emotion, seed=train.seed)
    targets = (labels == emotion).astype(np.int64)
    train_data = FaceDataset(train_split, targets, image_size)
    heldout = np.flatnonzero((fold == config.fold) & (labels < len(EMOTIONS)))
    eval_loaders = {}
    if len(heldout):
        eval_loaders["heldout"] = make_loader(
            torch.utils.data.Subset(train_data, heldout.tolist()), train.eval_batch_size, num_workers=train.num_workers
        )
    if validation_split is not None:
        val_labels = np.asarray(validation_split["human_label"])
        val_data = FaceDataset(validation_split, (val_labels == emotion).astype(np.int64), image_size)
        val_rows = np.flatnonzero(val_labels < len(EMOTIONS)).tolist()
        if val_rows:
            eval_loaders["validation"] = make_loader(
                torch.utils.data.Subset(val_data, val_rows), train.eval_batch_size, num_workers=train.num_workers
            )
    train_loader = make_train_loader(train_data, sampler, train, accelerator)
    transform = BatchTransform(image_size, mean, std, augment=config.augment)

    if train.report_to != "none":
        accelerator.init_trackers(f"expert-{config.emotion}-f{config.fold}", config=_flat(asdict(config)))
    model, results = fit(
        accelerator, model, transform, train_loader, eval_loaders, balanced_cross_entropy, _expert_metrics, train
    )
    results.update(emotion=config.emotion, fold=config.fold, num_folds=config.num_folds, image_size=image_size)
    results.update(image_mean=list(mean), image_std=list(std))
    results["train_rows"] = {"positives": len(sampler.positives), "negatives_per_epoch": sampler.num_negatives}

    save_checkpoint(accelerator, model, config, results, expert_card(config, results))
    return results


def save_checkpoint(accelerator, model, config, results: dict, card) -> None:
    """Writes a trained checkpoint folder (main process) and ends the run: the model, its image
    processor, ``training_config.json``, ``all_results.json`` and the model card; pushes it if asked."""
    out = Path(config.train.output_dir)
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(out, is_main_process=True, save_function=accelerator.save)
        make_processor(results["image_size"], results["image_mean"], results["image_std"]).save_pretrained(out)
        (out / "training_config.json").write_text(json.dumps(asdict(config), indent=2) + "\n")
        (out / "all_results.json").write_text(json.dumps(results, indent=2) + "\n")
        card.save(out / "README.md")
        if config.push_to_hub:
            from core.hub import push_model

            push_model(out, config.push_to_hub)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    accelerator.free_memory()


def _flat(config: dict, prefix: str = "") -> dict:
    """Trackers take flat scalars: nested dataclasses become dotted keys, None becomes a string."""
    flat = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return flat


def train_experts(
    data: str,
    output_dir,
    train: TrainConfig,
    num_folds: int = 5,
    preset: str = "tiny",
    init_from: str | None = None,
    image_size: int | None = None,
    emotions: tuple[str, ...] = EMOTIONS,
) -> dict:
    """Trains every (emotion, fold) expert into ``output_dir/<emotion>-f<fold>`` and writes the manifest.

    ``output_dir/manifest.json`` lists ``{emotion, fold, path, metrics}`` per expert, ``path`` relative
    to the manifest. An expert whose folder already holds ``all_results.json`` is not trained again,
    so an interrupted run continues where it stopped.
    """
    from dataclasses import replace

    output_dir = Path(output_dir)
    entries = []
    for emotion in emotions:
        for fold in range(num_folds):
            folder = output_dir / f"{emotion}-f{fold}"
            results_file = folder / "all_results.json"
            if not results_file.is_file():
                config = ExpertConfig(
                    data=data,
                    emotion=emotion,
                    fold=fold,
                    num_folds=num_folds,
                    preset=preset,
                    init_from=init_from,
                    image_size=image_size,
                    train=replace(train, output_dir=str(folder)),
                )
                train_expert(config)
            results = json.loads(results_file.read_text())
            metrics = {k: v for k, v in results.items() if k.startswith(("validation_", "heldout_"))}
            entries.append({"emotion": emotion, "fold": fold, "path": folder.name, "metrics": metrics})
    manifest = {"data": str(data), "num_folds": num_folds, "preset": preset, "init_from": init_from, "experts": entries}
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest
