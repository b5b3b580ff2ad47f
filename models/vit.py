"""The ViT every model of the project is: presets, construction from safetensors only, its processor.

Experts, FER classifiers and the valence/arousal regressor are all ``transformers``
``ViTForImageClassification`` models; they differ only in their head (``id2label``, ``problem_type``).

Example:
    >>> from models.vit import make_vit
    >>> make_vit({0: "valence", 1: "arousal"}, "regression").config.num_labels
    2
"""

from __future__ import annotations

from pathlib import Path

from transformers import ViTConfig, ViTForImageClassification

from core.hub import PICKLE_SUFFIXES  # one list of the weight formats that unpickle
from models.transforms import HALF

# tiny: random init, small images: the tests and the CPU demo. base: ViT-B/16 at 224 px.
PRESETS = {
    "tiny": dict(image_size=64, patch_size=8, hidden_size=96, num_hidden_layers=3, num_attention_heads=3,
                 intermediate_size=192),
    "base": dict(image_size=224, patch_size=16, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                 intermediate_size=3072),
}  # fmt: skip


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
    pretrained ViT (safetensors only; its head is replaced).

    Args:
        id2label: the outputs' names.
        problem_type: ``single_label_classification``, ``multi_label_classification`` (``pipeline`` then
            applies a sigmoid to each output) or ``regression``.
        preset: ``tiny`` or ``base`` (architecture when ``init_from`` is not given).
        init_from: a local folder or Hub id of a ViT checkpoint.
        image_size: input side in pixels; must be a multiple of the patch size (and the checkpoint's).

    Example:
        >>> make_vit({0: "not_happy", 1: "happy"}).config.image_size
        64
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


def make_processor(image_size: int, mean=HALF, std=HALF):
    """The image processor saved next to a checkpoint, so ``pipeline("image-classification")`` works."""
    try:  # the PIL processor needs no torchvision; the class name saved is ViTImageProcessor either way
        from transformers import ViTImageProcessorPil as Processor
    except ImportError:
        from transformers import ViTImageProcessor as Processor
    return Processor(size={"height": image_size, "width": image_size}, image_mean=list(mean), image_std=list(std))


def processor_stats(init_from: str | None) -> tuple[tuple, tuple]:
    """(mean, std) of ``init_from``'s saved image processor; ViT's usual 0.5/0.5 without one."""
    if init_from:
        try:
            from transformers import AutoImageProcessor

            processor = AutoImageProcessor.from_pretrained(init_from)
            return tuple(processor.image_mean), tuple(processor.image_std)
        except (OSError, ValueError):
            pass  # no processor saved with the checkpoint
    return HALF, HALF
