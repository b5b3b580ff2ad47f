"""Image transforms for the ViT experts, without torchvision.

The pipeline has two stages. ``decode_image`` runs per example in the DataLoader workers and does
nothing but turn stored JPEG/PNG bytes into a uint8 tensor at the model's size. ``BatchTransform``
runs per batch on the training device: augmentation (one affine ``grid_sample`` for random-resized
crop, flip and rotation, then colour jitter) and normalisation. Its randomness comes from the generator
it is given (the trainer's ``models.training.AugmentRNG``, whose state every training checkpoint holds), so
a resumed run draws the same augmentations as an uninterrupted one.

Example:
    >>> import torch
    >>> transform = BatchTransform(224, augment=AugmentConfig())
    >>> batch = torch.randint(0, 256, (8, 3, 224, 224), dtype=torch.uint8)
    >>> transform(batch).shape
    torch.Size([8, 3, 224, 224])
"""

from __future__ import annotations

import contextlib
import io
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# google/vit-*-patch16-224-in21k and most ViT checkpoints normalise with 0.5/0.5 (pixels to [-1, 1]).
HALF = (0.5, 0.5, 0.5)

# ITU-R 601-2 luma weights, as PIL's convert("L") and torchvision's rgb_to_grayscale use.
_LUMA = (0.299, 0.587, 0.114)
_SIXTEEN_BIT_MODES = {"I", "I;16", "I;16B", "I;16L", "I;16N"}


def _exif_orientation(image: Image.Image) -> int:
    if "exif" not in image.info:  # skip parsing for the common case of no EXIF block
        return 1
    try:
        return int(image.getexif().get(0x0112, 1))
    except Exception:  # a malformed EXIF block: show the pixels as stored rather than fail the batch
        return 1


def _decode(image: Image.Image, size: int) -> torch.Tensor:
    # Draft mode makes libjpeg decode at 1/2, 1/4 or 1/8 scale (never below `size`), which skips most of
    # the IDCT work; it only helps when the image is at least twice the target size.
    if image.format == "JPEG" and min(image.size) >= 2 * size:
        image.draft("RGB", (size, size))
    orientation = _exif_orientation(image)
    if orientation != 1:
        image = ImageOps.exif_transpose(image)
    if image.mode in _SIXTEEN_BIT_MODES:
        # PIL's convert() clips 16-bit values at 255 instead of rescaling them.
        pixels = np.clip(np.asarray(image, dtype=np.int64), 0, 65535) >> 8
        image = Image.fromarray(pixels.astype(np.uint8), "L")
    if image.mode != "RGB":
        image = image.convert("RGB")
    if image.size != (size, size):
        image = image.resize((size, size), Image.Resampling.BILINEAR)
    # np.array copies into a writable buffer (np.asarray of a PIL image is read-only, which torch warns about).
    return torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).contiguous()


def decode_image(data: bytes | dict | Image.Image, size: int) -> torch.Tensor:
    """Decodes an image to a uint8 tensor ``(3, size, size)``, resized (squashed if not square) with bilinear.

    ``data`` is encoded bytes, a ``datasets`` Image dict ``{"bytes": ..., "path": ...}`` (bytes win; the
    path is read when bytes are missing) or a PIL image. Any mode becomes RGB (16-bit grayscale is rescaled,
    alpha is dropped), EXIF orientation is applied, and JPEGs at least twice ``size`` are decoded in draft
    mode (a lazily opened PIL JPEG passed in is drafted in place). Undecodable data raises PIL's errors.

    Example:
        >>> decode_image(open("face.jpg", "rb").read(), 224).shape  # doctest: +SKIP
        torch.Size([3, 224, 224])
    """
    if size < 1:
        raise ValueError(f"size must be positive, got {size}")
    if isinstance(data, Image.Image):
        return _decode(data, size)
    if isinstance(data, dict):
        if data.get("bytes") is not None:
            data = data["bytes"]
        elif data.get("path"):
            with Image.open(data["path"]) as image:
                return _decode(image, size)
        else:
            raise ValueError("an image dict needs 'bytes' or 'path'")
    if isinstance(data, (bytes, bytearray, memoryview)):
        with Image.open(io.BytesIO(data)) as image:
            return _decode(image, size)
    raise TypeError(f"expected bytes, a datasets Image dict or a PIL image, got {type(data).__name__}")


def _check_range(name: str, value: tuple[float, float], low: float, high: float) -> tuple[float, float]:
    value = tuple(float(v) for v in value)
    if len(value) != 2 or not (low <= value[0] <= value[1] <= high):
        raise ValueError(f"{name} must be (min, max) with {low} <= min <= max <= {high}, got {value}")
    return value


@dataclass
class AugmentConfig:
    """Training augmentation strengths for ``BatchTransform``; the defaults suit 224 px face crops.

    Args:
        scale: random-resized-crop area range (min max), as a fraction of the image.
        ratio: random-resized-crop aspect ratio range (min max, width / height), sampled log-uniformly.
        hflip: probability of a horizontal flip.
        rotation: maximum rotation in degrees; uniform in [-rotation, rotation], positive is counter-clockwise.
        brightness: colour jitter: the brightness factor is uniform in [1 - s, 1 + s].
        contrast: colour jitter: the contrast factor is uniform in [1 - s, 1 + s].
        saturation: colour jitter: the saturation factor is uniform in [1 - s, 1 + s].

    Example:
        >>> AugmentConfig(rotation=0.0, hflip=0.0).scale
        (0.7, 1.0)
    """

    scale: tuple[float, float] = (0.7, 1.0)  # random-resized-crop area, as a fraction of the image
    ratio: tuple[float, float] = (3 / 4, 4 / 3)  # crop aspect ratio (width / height), sampled log-uniformly
    hflip: float = 0.5  # probability of a horizontal flip
    rotation: float = 10.0  # max degrees; uniform in [-rotation, rotation], positive is counter-clockwise
    brightness: float = 0.2  # colour jitter: each factor is uniform in [1 - s, 1 + s]
    contrast: float = 0.2
    saturation: float = 0.2

    def __post_init__(self):
        # Tuples are checked and normalised (a list from a JSON/YAML config becomes a tuple).
        self.scale = _check_range("scale", self.scale, 0.0, 1.0)
        if self.scale[0] <= 0:
            raise ValueError(f"scale must be > 0, got {self.scale}")
        self.ratio = _check_range("ratio", self.ratio, 0.0, math.inf)
        if self.ratio[0] <= 0:
            raise ValueError(f"ratio must be > 0, got {self.ratio}")
        if not 0.0 <= self.hflip <= 1.0:
            raise ValueError(f"hflip is a probability in [0, 1], got {self.hflip}")
        if not 0.0 <= self.rotation <= 180.0:
            raise ValueError(f"rotation must be in [0, 180] degrees, got {self.rotation}")
        for name in ("brightness", "contrast", "saturation"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1] (factors in [1 - s, 1 + s]), got {getattr(self, name)}")


def color_jitter(
    images: torch.Tensor, brightness: torch.Tensor, contrast: torch.Tensor, saturation: torch.Tensor
) -> torch.Tensor:
    """Per-sample brightness, contrast and saturation factors (each ``(N,)``) on a float batch in [0, 1].

    Applied in that order, each clamped to [0, 1] as torchvision does: brightness scales the pixels,
    contrast blends with the image's mean gray, saturation blends with each pixel's gray. Factor 1 is
    the identity.

    Example:
        >>> ones = torch.ones(2)
        >>> color_jitter(torch.full((2, 3, 4, 4), 0.5), ones * 0.5, ones, ones).max().item()
        0.25
    """
    luma = images.new_tensor(_LUMA).view(1, 3, 1, 1)
    images = (images * brightness.view(-1, 1, 1, 1)).clamp_(0.0, 1.0)
    mean_gray = (images * luma).sum(1, keepdim=True).mean((2, 3), keepdim=True)
    contrast = contrast.view(-1, 1, 1, 1)
    images = (images * contrast + mean_gray * (1.0 - contrast)).clamp_(0.0, 1.0)
    gray = (images * luma).sum(1, keepdim=True)
    saturation = saturation.view(-1, 1, 1, 1)
    return (images * saturation + gray * (1.0 - saturation)).clamp_(0.0, 1.0)


def _autocast_disabled(device: torch.device):
    try:
        return torch.autocast(device.type, enabled=False)
    except RuntimeError:  # a device type without autocast support: nothing to disable
        return contextlib.nullcontext()


class BatchTransform(torch.nn.Module):
    """uint8 batch ``(N, 3, H, W)`` on any device -> normalised float32 batch ``(N, 3, size, size)``.

    Training (``augment`` given and the module in train mode): one ``affine_grid``/``grid_sample`` per
    batch applies random-resized crop, horizontal flip and rotation together (bilinear, zeros outside
    the image, ``align_corners=False``, so an identity transform reproduces the pixels up to float rounding), then
    ``color_jitter``, then ``(x - mean) / std``. Eval (``augment=None`` or ``.eval()``): resize with
    antialiasing if needed, then normalise. Runs in float32 even under autocast.

    All randomness is one ``torch.rand`` call on the batch's device (the global generator unless
    ``generator`` is given), so RNG state capture makes augmentation reproducible across resumes.
    Inputs are expected square (AffectNet+ crops are); eval squashes a non-square batch to the square.

    Example:
        >>> transform = BatchTransform(224, augment=AugmentConfig())
        >>> x = torch.randint(0, 256, (4, 3, 224, 224), dtype=torch.uint8)
        >>> transform(x).dtype, transform.eval()(x).shape
        (torch.float32, torch.Size([4, 3, 224, 224]))
    """

    # Columns of the single uniform draw per sample (their order is part of reproducibility).
    _DRAWS = ("area", "ratio", "center_x", "center_y", "flip", "angle", "brightness", "contrast", "saturation")

    def __init__(
        self,
        image_size: int,
        mean: tuple[float, float, float] = HALF,
        std: tuple[float, float, float] = HALF,
        augment: AugmentConfig | None = None,
    ):
        super().__init__()
        if image_size < 1:
            raise ValueError(f"image_size must be positive, got {image_size}")
        if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
            raise ValueError(f"mean and std need 3 values with std > 0, got {mean} and {std}")
        self.image_size = image_size
        self.augment = augment
        # Non-persistent: these are constants of the config, not state to checkpoint.
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    def extra_repr(self) -> str:
        return f"image_size={self.image_size}, augment={self.augment}"

    def sample_params(
        self,
        n: int,
        height: int | None = None,
        width: int | None = None,
        device: torch.device | str | None = None,
        generator: torch.Generator | None = None,
    ) -> dict[str, torch.Tensor]:
        """Draws the augmentation of ``n`` images of ``height x width`` (default: square) from one ``torch.rand``.

        Returns ``(N,)`` tensors (``(N, 2)`` for the crop): ``crop_size`` (width, height fractions of the
        image), ``crop_center`` (x, y in [-1, 1] image coordinates), ``flip`` (bool), ``angle`` (degrees,
        counter-clockwise) and ``brightness``/``contrast``/``saturation`` factors. ``forward(params=...)``
        applies them, so augmentations can be inspected or replayed.

        Example:
            >>> BatchTransform(224, augment=AugmentConfig()).sample_params(4)["angle"].shape
            torch.Size([4])
        """
        if self.augment is None:
            raise ValueError("this BatchTransform has no AugmentConfig to sample from")
        cfg = self.augment
        aspect = (width or 1) / (height or 1)  # image width / height, in pixels
        u = torch.rand((n, len(self._DRAWS)), device=device, generator=generator, dtype=torch.float32)
        area = cfg.scale[0] + (cfg.scale[1] - cfg.scale[0]) * u[:, 0]
        # Sample the aspect ratio only among those whose crop fits in the image at this area: close to what
        # torchvision's rejection loop yields, without its data-dependent loop (or host syncs). Crop
        # fractions are sqrt(area * r / aspect) wide and sqrt(area * aspect / r) high.
        log_low = torch.log(torch.clamp(area * aspect, min=cfg.ratio[0]))
        log_high = torch.log(torch.clamp(aspect / area, max=cfg.ratio[1]))
        ratio = torch.exp(log_low + (log_high - log_low) * u[:, 1])
        # The clamp only matters when no ratio in range fits (an extreme aspect): then the crop is cut.
        crop_w = torch.sqrt(area * ratio / aspect).clamp(max=1.0)
        crop_h = torch.sqrt(area * aspect / ratio).clamp(max=1.0)
        center_x = (2 * u[:, 2] - 1) * (1 - crop_w)
        center_y = (2 * u[:, 3] - 1) * (1 - crop_h)

        def factor(strength: float, column: torch.Tensor) -> torch.Tensor:
            return 1.0 + strength * (2 * column - 1)

        return {
            "crop_size": torch.stack([crop_w, crop_h], 1),
            "crop_center": torch.stack([center_x, center_y], 1),
            "flip": u[:, 4] < cfg.hflip,
            "angle": cfg.rotation * (2 * u[:, 5] - 1),
            "brightness": factor(cfg.brightness, u[:, 6]),
            "contrast": factor(cfg.contrast, u[:, 7]),
            "saturation": factor(cfg.saturation, u[:, 8]),
        }

    @staticmethod
    def affine_matrices(params: dict[str, torch.Tensor]) -> torch.Tensor:
        """``(N, 2, 3)`` ``affine_grid`` thetas mapping output to input coordinates for ``sample_params``' output.

        The output is the crop, flipped, then rotated about its centre: ``input = S @ F @ R(-angle) @ out + c``.

        Example:
            >>> t = BatchTransform(8, augment=AugmentConfig())
            >>> BatchTransform.affine_matrices(t.sample_params(2)).shape
            torch.Size([2, 2, 3])
        """
        radians = torch.deg2rad(params["angle"].float())
        cos, sin = torch.cos(radians), torch.sin(radians)
        sx = params["crop_size"][:, 0].float() * torch.where(params["flip"], -1.0, 1.0)
        sy = params["crop_size"][:, 1].float()
        # Image y points down, so the inverse of a counter-clockwise (as seen) rotation is [[c, -s], [s, c]].
        row_x = torch.stack([sx * cos, -sx * sin, params["crop_center"][:, 0].float()], 1)
        row_y = torch.stack([sy * sin, sy * cos, params["crop_center"][:, 1].float()], 1)
        return torch.stack([row_x, row_y], 1)

    def forward(
        self,
        images: torch.Tensor,
        generator: torch.Generator | None = None,
        params: dict[str, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Augments (in training) and normalises a uint8 batch; ``params`` replays a ``sample_params`` draw.

        Example:
            >>> BatchTransform(32)(torch.zeros(1, 3, 32, 32, dtype=torch.uint8)).unique().item()
            -1.0
        """
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"expected a uint8 batch (N, 3, H, W), got {images.dtype} {tuple(images.shape)}")
        size = self.image_size
        n, _, height, width = images.shape
        # grid_sample and the affine grid's matmul would lose pixel precision in bfloat16.
        with _autocast_disabled(images.device):
            x = images.float().div_(255.0)
            if self.augment is not None and self.training:
                if min(height, width) > size:
                    # grid_sample does not antialias: shrink first (keeping the aspect) so the crop never
                    # subsamples by much, as eval's antialiased resize doesn't either.
                    scale = size / min(height, width)
                    shape = (max(size, round(height * scale)), max(size, round(width * scale)))
                    x = F.interpolate(x, size=shape, mode="bilinear", antialias=True, align_corners=False)
                if params is None:
                    params = self.sample_params(n, height, width, device=images.device, generator=generator)
                theta = self.affine_matrices(params).to(x.device)
                grid = F.affine_grid(theta, [n, 3, size, size], align_corners=False)
                x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
                x = color_jitter(
                    x,
                    params["brightness"].to(x.device, torch.float32),
                    params["contrast"].to(x.device, torch.float32),
                    params["saturation"].to(x.device, torch.float32),
                )
            elif (height, width) != (size, size):
                x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
            return (x - self.mean.to(x.device)) / self.std.to(x.device)
