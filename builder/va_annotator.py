"""The valence/arousal annotator: a build fills ``valence`` and ``arousal`` with a trained regressor.

It sits above ``models/`` (it runs a ``models.valence_arousal`` checkpoint) and beside the other
annotators of ``builder.annotators``, whose per-process model cache it shares.

Example:
    >>> from builder.va_annotator import ValenceArousalAnnotator
    >>> ValenceArousalAnnotator("va").annotate([crop], [{}])  # doctest: +SKIP
    [{'valence': 0.41, 'arousal': 0.12}]
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from PIL import Image

from builder.annotators import _LOADERS, Annotator, _model
from models.expert import check_safetensors
from models.transforms import decode_image


def _load_regressor(model_dir: str):
    """A valence/arousal regressor checkpoint (``scripts/train.py valence-arousal``): model, processor statistics."""
    from transformers import AutoImageProcessor, ViTForImageClassification

    check_safetensors(model_dir)
    model = ViTForImageClassification.from_pretrained(model_dir, use_safetensors=True).eval()
    labels = {int(k): v for k, v in model.config.id2label.items()}
    if labels != {0: "valence", 1: "arousal"}:
        raise ValueError(f"{model_dir} is not a valence/arousal regressor (its labels are {labels})")
    processor = AutoImageProcessor.from_pretrained(model_dir)
    return model, model.config.image_size, tuple(processor.image_mean), tuple(processor.image_std)


class ValenceArousalAnnotator(Annotator):
    """Valence and arousal in [-1, 1] from a regressor trained by ``scripts/train.py valence-arousal``.

    Example:
        >>> ValenceArousalAnnotator("va").annotate([crop], [{}])  # doctest: +SKIP
        [{'valence': 0.41, 'arousal': 0.12}]
    """

    name = "valence_arousal"
    outputs = ("valence", "arousal")
    requires = ()

    def __init__(self, model_dir, batch_size: int = 64):
        self.model_dir = str(model_dir)
        self.batch_size = batch_size
        key = f"va:{self.model_dir}"
        if key not in _LOADERS:
            _LOADERS[key] = lambda: _load_regressor(self.model_dir)
        _model(key)  # load (and check) now: a wrong folder is an error before the build starts

    def provenance(self) -> dict:
        weights = Path(self.model_dir) / "model.safetensors"
        digest = hashlib.sha256(weights.read_bytes()).hexdigest()[:16]
        try:
            from huggingface_hub import ModelCard

            license_id = ModelCard.load(Path(self.model_dir) / "README.md").data.license
        except (OSError, ValueError):
            license_id = None
        # The card and the report are published: the checkpoint is named by its folder and identified by
        # its weights' digest, never by where it lies on the build machine.
        name = Path(self.model_dir).name
        return {
            "model": f"ViT valence/arousal regressor `{name}` (scripts/train.py valence-arousal)",
            "version": f"model.safetensors sha256 {digest}",
            "license": license_id or "that of its training data",
            "source": f"checkpoint folder `{name}` trained with scripts/train.py valence-arousal",
        }

    def annotate(self, images: list[Image.Image], rows: list[dict]) -> list[dict]:
        import torch

        model, size, mean, std = _model(f"va:{self.model_dir}")
        pixels = torch.stack([decode_image(image.convert("RGB"), size) for image in images]).float() / 255
        pixels = (pixels - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]
        with torch.inference_mode():
            values = torch.cat([model(pixel_values=pixels[i : i + self.batch_size]).logits
                                for i in range(0, len(pixels), self.batch_size)]).clamp(-1, 1)  # fmt: skip
        return [{"valence": float(v), "arousal": float(a)} for v, a in values.tolist()]
