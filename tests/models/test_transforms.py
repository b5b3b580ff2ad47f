import io
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from models.transforms import (
    HALF,
    IMAGENET_MEAN,
    IMAGENET_STD,
    AugmentConfig,
    BatchTransform,
    color_jitter,
    decode_image,
)
from tests.conftest import face_image

NO_JITTER = {"brightness": 0.0, "contrast": 0.0, "saturation": 0.0}


def _encode(image: Image.Image, fmt: str = "JPEG", **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def _pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.float64).transpose(2, 0, 1)


def _reference(data: bytes, size: int) -> np.ndarray:
    """Full-resolution decode and the same resize, the way one would write it without draft mode."""
    return _pixels(Image.open(io.BytesIO(data)).convert("RGB").resize((size, size), Image.Resampling.BILINEAR))


def _normalise(images: torch.Tensor, mean=HALF, std=HALF) -> torch.Tensor:
    mean, std = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    return (images.double() / 255 - mean) / std


def _dot_batch(size: int, dots: list[tuple[float, float]], radius: float = 2.5) -> torch.Tensor:
    """Black images, each with one white disc centred on pixel ``(x, y)``."""
    y, x = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    images = torch.zeros(len(dots), 3, size, size, dtype=torch.uint8)
    for i, (dx, dy) in enumerate(dots):
        images[i, :, (x - dx) ** 2 + (y - dy) ** 2 <= radius**2] = 255
    return images


def _bright_centre(normalised: torch.Tensor) -> torch.Tensor:
    """Brightness-weighted centroid (x, y) in pixel indices of each image of a HALF-normalised batch."""
    weight = (normalised * 0.5 + 0.5).clamp(0, 1).mean(1)  # (N, H, W)
    size = weight.shape[-1]
    index = torch.arange(size, dtype=weight.dtype)
    total = weight.sum((1, 2))
    return torch.stack([(weight.sum(1) * index).sum(1) / total, (weight.sum(2) * index).sum(1) / total], 1)


def _identity_params(n: int, **overrides) -> dict[str, torch.Tensor]:
    params = {
        "crop_size": torch.ones(n, 2),
        "crop_center": torch.zeros(n, 2),
        "flip": torch.zeros(n, dtype=torch.bool),
        "angle": torch.zeros(n),
        "brightness": torch.ones(n),
        "contrast": torch.ones(n),
        "saturation": torch.ones(n),
    }
    params.update(overrides)
    return params


# decode_image


def test_decode_jpeg_bytes():
    data = _encode(face_image(300, 280), quality=95)
    decoded = decode_image(data, 224)
    assert decoded.shape == (3, 224, 224) and decoded.dtype == torch.uint8 and decoded.is_contiguous()
    assert np.abs(decoded.numpy() - _reference(data, 224)).mean() < 1.0


def test_decode_keeps_an_image_already_at_size_exactly():
    data = _encode(face_image(64, 64), "PNG")
    np.testing.assert_array_equal(decode_image(data, 64).numpy(), _pixels(Image.open(io.BytesIO(data))))


def test_decode_dict_by_bytes_or_by_path(tmp_path):
    data = _encode(face_image(120, 100))
    path = tmp_path / "face.jpg"
    path.write_bytes(data)
    from_bytes = decode_image({"bytes": data, "path": "ignored.jpg"}, 96)
    from_path = decode_image({"bytes": None, "path": str(path)}, 96)
    assert torch.equal(from_bytes, decode_image(data, 96))
    assert torch.equal(from_path, from_bytes)


def test_decode_pil_image():
    image = face_image(100, 100)
    assert torch.equal(decode_image(image, 100), torch.from_numpy(_pixels(image).astype(np.uint8)))


@pytest.mark.parametrize("mode", ["L", "P", "RGBA", "LA", "1"])
def test_decode_converts_png_modes_to_rgb(mode):
    image = face_image(80, 60, mode=mode)
    decoded = decode_image(_encode(image, "PNG"), 64)
    assert decoded.shape == (3, 64, 64) and decoded.dtype == torch.uint8
    if mode in ("L", "LA", "1"):  # gray stays gray
        assert torch.equal(decoded[0], decoded[1]) and torch.equal(decoded[1], decoded[2])


def test_decode_grayscale_png_matches_its_pixels():
    image = face_image(32, 32, mode="L")
    decoded = decode_image(_encode(image, "PNG"), 32)
    for channel in decoded:
        np.testing.assert_array_equal(channel.numpy(), np.asarray(image))


def test_decode_sixteen_bit_png_is_rescaled_not_clipped():
    values = np.linspace(0, 65535, 32 * 32).reshape(32, 32).astype(np.uint16)
    decoded = decode_image(_encode(Image.fromarray(values), "PNG"), 32)
    np.testing.assert_array_equal(decoded[0].numpy(), (values >> 8).astype(np.uint8))


def test_decode_cmyk_jpeg():
    rgb = face_image(120, 120)
    decoded = decode_image(_encode(rgb.convert("CMYK"), quality=95), 120)
    assert decoded.shape == (3, 120, 120) and decoded.dtype == torch.uint8
    assert np.abs(decoded.numpy() - _pixels(rgb)).mean() < 6.0


def test_decode_applies_exif_orientation():
    image = face_image(120, 60)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: display rotated 90 degrees clockwise
    data = _encode(image, quality=95, exif=exif)
    upright = ImageOps.exif_transpose(Image.open(io.BytesIO(data)))
    assert upright.size == (60, 120)
    assert torch.equal(decode_image(data, 48), decode_image(upright, 48))


def test_large_jpeg_is_drafted_and_close_to_a_full_decode(monkeypatch):
    from PIL import JpegImagePlugin

    drafts = []
    original = JpegImagePlugin.JpegImageFile.draft

    def spy(self, mode, size):
        result = original(self, mode, size)
        drafts.append((size, self.size))
        return result

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", spy)
    data = _encode(face_image(1600, 1200, seed=3), quality=92)
    decoded = decode_image(data, 224)
    assert drafts == [((224, 224), (400, 300))]  # libjpeg decoded at 1/4 scale
    assert decoded.shape == (3, 224, 224)
    assert np.abs(decoded.numpy() - _reference(data, 224)).mean() < 2.0


def test_small_jpeg_is_not_drafted():
    data = _encode(face_image(400, 300))  # less than twice 224: draft would not help
    np.testing.assert_array_equal(decode_image(data, 224).numpy(), _reference(data, 224))


def test_decode_rejects_bad_input():
    with pytest.raises(TypeError):
        decode_image("face.jpg", 224)
    with pytest.raises(ValueError, match="bytes"):
        decode_image({"bytes": None, "path": None}, 224)
    with pytest.raises(ValueError):
        decode_image(_encode(face_image(8, 8)), 0)
    with pytest.raises(OSError):  # PIL's UnidentifiedImageError
        decode_image(b"not an image", 224)


# AugmentConfig


@pytest.mark.parametrize(
    "kwargs",
    [
        {"scale": (0.0, 1.0)},
        {"scale": (0.9, 0.8)},
        {"scale": (0.5, 1.2)},
        {"scale": (0.5,)},
        {"ratio": (0.0, 1.0)},
        {"ratio": (2.0, 1.0)},
        {"hflip": 1.5},
        {"rotation": -1.0},
        {"brightness": 1.5},
        {"contrast": -0.1},
        {"saturation": 2.0},
    ],
)
def test_augment_config_rejects_bad_values(kwargs):
    with pytest.raises(ValueError):
        AugmentConfig(**kwargs)


def test_augment_config_normalises_lists_to_tuples():
    config = AugmentConfig(scale=[0.5, 1], ratio=[1, 1])
    assert config.scale == (0.5, 1.0) and config.ratio == (1.0, 1.0)


# BatchTransform: eval


def test_eval_normalises_exactly():
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    for transform in (
        BatchTransform(32, IMAGENET_MEAN, IMAGENET_STD),
        BatchTransform(32, IMAGENET_MEAN, IMAGENET_STD, augment=AugmentConfig()).eval(),
    ):
        out = transform(images)
        assert out.dtype == torch.float32 and out.shape == (2, 3, 32, 32)
        torch.testing.assert_close(out.double(), _normalise(images, IMAGENET_MEAN, IMAGENET_STD), rtol=0, atol=1e-6)


def test_eval_resizes_with_antialiasing():
    images = torch.randint(0, 256, (2, 3, 64, 48), dtype=torch.uint8)
    out = BatchTransform(32)(images)
    expected = F.interpolate(images.float() / 255, size=(32, 32), mode="bilinear", antialias=True)
    torch.testing.assert_close(out, (expected - 0.5) / 0.5)


def test_eval_does_not_touch_the_rng():
    state = torch.get_rng_state()
    BatchTransform(16, augment=AugmentConfig()).eval()(torch.zeros(2, 3, 16, 16, dtype=torch.uint8))
    assert torch.equal(state, torch.get_rng_state())


def test_rejects_non_uint8_batches():
    with pytest.raises(ValueError, match="uint8"):
        BatchTransform(16)(torch.rand(2, 3, 16, 16))
    with pytest.raises(ValueError):
        BatchTransform(16)(torch.zeros(3, 16, 16, dtype=torch.uint8))


# BatchTransform: training


@pytest.mark.parametrize("shape", [(4, 3, 32, 32), (3, 3, 48, 48), (2, 3, 40, 56), (2, 3, 20, 20)])
def test_training_output_shape_and_dtype(shape):
    out = BatchTransform(32, augment=AugmentConfig())(torch.randint(0, 256, shape, dtype=torch.uint8))
    assert out.shape == (shape[0], 3, 32, 32) and out.dtype == torch.float32
    assert out.min() >= -1.0 and out.max() <= 1.0


def test_identity_augmentation_and_zero_jitter_give_the_eval_output():
    images = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    augment = AugmentConfig(scale=(1.0, 1.0), rotation=0.0, hflip=0.0, **NO_JITTER)
    out = BatchTransform(32, augment=augment)(images)
    torch.testing.assert_close(out.double(), _normalise(images), rtol=0, atol=1e-4)


def test_certain_flip_is_a_horizontal_flip():
    images = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    augment = AugmentConfig(scale=(1.0, 1.0), rotation=0.0, hflip=1.0, **NO_JITTER)
    out = BatchTransform(32, augment=augment)(images)
    torch.testing.assert_close(out.double(), _normalise(images).flip(-1), rtol=0, atol=1e-4)


def test_rotation_moves_a_dot_counter_clockwise():
    size = 64
    images = _dot_batch(size, [(48, 32), (48, 32), (40, 20)])
    angles = torch.tensor([90.0, -90.0, 30.0])
    transform = BatchTransform(size, augment=AugmentConfig())
    out = transform(images, params=_identity_params(3, angle=angles))
    centre = (size - 1) / 2
    expected = []
    for (x, y), angle in zip([(48, 32), (48, 32), (40, 20)], angles.tolist()):
        c, s = math.cos(math.radians(angle)), math.sin(math.radians(angle))
        dx, dy = x - centre, y - centre
        # counter-clockwise as displayed, with y pointing down
        expected.append((centre + dx * c + dy * s, centre - dx * s + dy * c))
    torch.testing.assert_close(_bright_centre(out), torch.tensor(expected), rtol=0, atol=1.0)
    # +90 degrees takes the dot right of the centre to above it.
    assert _bright_centre(out)[0, 1] < 20


def test_sampled_rotation_matches_its_parameters():
    size = 64
    images = _dot_batch(size, [(50, 30)] * 4)
    transform = BatchTransform(size, augment=AugmentConfig(scale=(1.0, 1.0), rotation=45.0, hflip=0.0, **NO_JITTER))
    params = transform.sample_params(4, size, size, generator=torch.Generator().manual_seed(7))
    out = transform(images, generator=torch.Generator().manual_seed(7))
    assert torch.equal(out, transform(images, params=params))
    centre = (size - 1) / 2
    radians = torch.deg2rad(params["angle"])
    dx, dy = 50 - centre, 30 - centre
    expected = torch.stack(
        [centre + dx * radians.cos() + dy * radians.sin(), centre - dx * radians.sin() + dy * radians.cos()], 1
    )
    torch.testing.assert_close(_bright_centre(out), expected, rtol=0, atol=1.0)


def test_crop_zooms_into_the_chosen_region():
    size = 64
    images = _dot_batch(size, [(48, 40)], radius=3)
    # The bottom-right quadrant, magnified 2x: pixel edge coordinates x in [32, 64] map to [0, 64].
    params = _identity_params(1, crop_size=torch.tensor([[0.5, 0.5]]), crop_center=torch.tensor([[0.5, 0.5]]))
    out = BatchTransform(size, augment=AugmentConfig())(images, params=params)
    expected = torch.tensor([[(48.5 - 32) * 2 - 0.5, (40.5 - 32) * 2 - 0.5]])
    torch.testing.assert_close(_bright_centre(out), expected, rtol=0, atol=1.0)


def test_flip_and_rotation_compose_as_flip_then_rotate():
    size = 64
    images = _dot_batch(size, [(48, 32)])
    params = _identity_params(1, flip=torch.tensor([True]), angle=torch.tensor([90.0]))
    out = BatchTransform(size, augment=AugmentConfig())(images, params=params)
    # flip: (48, 32) -> (15, 32), left of centre; +90 counter-clockwise: left goes down
    torch.testing.assert_close(_bright_centre(out), torch.tensor([[31.5 + 0.5, 31.5 + 16.5]]), rtol=0, atol=1.0)


def test_same_seed_same_output_and_different_seed_different_output():
    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    transform = BatchTransform(32, augment=AugmentConfig())
    first = transform(images, generator=torch.Generator().manual_seed(1))
    again = transform(images, generator=torch.Generator().manual_seed(1))
    other = transform(images, generator=torch.Generator().manual_seed(2))
    assert torch.equal(first, again)
    assert not torch.allclose(first, other)


def test_global_rng_makes_it_resumable():
    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    transform = BatchTransform(32, augment=AugmentConfig())
    torch.manual_seed(123)
    transform(images)
    state = torch.get_rng_state()  # what accelerate's save_state records
    expected = transform(images)
    torch.manual_seed(0)
    transform(images)  # the state moves on ...
    torch.set_rng_state(state)  # ... and load_state puts it back
    assert torch.equal(transform(images), expected)


def test_sampled_parameters_stay_in_range():
    config = AugmentConfig(scale=(0.3, 0.9), ratio=(0.6, 1.5), hflip=0.3, rotation=12.0)
    params = BatchTransform(32, augment=config).sample_params(4000, generator=torch.Generator().manual_seed(0))
    width, height = params["crop_size"].unbind(1)
    area, ratio = width * height, width / height
    eps = 1e-5
    assert ((area >= 0.3 - eps) & (area <= 0.9 + eps)).all()
    assert ((ratio >= 0.6 - eps) & (ratio <= 1.5 + eps)).all()
    # the crop lies inside the image
    assert ((params["crop_center"].abs() + params["crop_size"]) <= 1 + eps).all()
    assert params["angle"].abs().max() <= 12.0
    assert abs(params["flip"].float().mean().item() - 0.3) < 0.03
    for name in ("brightness", "contrast", "saturation"):
        assert ((params[name] >= 0.8) & (params[name] <= 1.2)).all()
    # both ends of the ratio range are reached, not just the square
    assert ratio.min() < 0.65 and ratio.max() > 1.4


def test_crop_of_a_wide_image_keeps_pixel_aspect_ratios():
    transform = BatchTransform(32, augment=AugmentConfig(scale=(0.5, 0.5), ratio=(1.0, 1.0)))
    params = transform.sample_params(100, height=40, width=80)
    width, height = params["crop_size"].unbind(1)
    # square in pixels: width fraction * 80 == height fraction * 40, half the image's area
    torch.testing.assert_close(width * 80, height * 40)
    torch.testing.assert_close(width * height, torch.full((100,), 0.5))


def test_runs_in_float32_under_autocast():
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    transform = BatchTransform(32, augment=AugmentConfig())
    expected = transform(images, generator=torch.Generator().manual_seed(3))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = transform(images, generator=torch.Generator().manual_seed(3))
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, expected)


def test_sample_params_needs_an_augment_config():
    with pytest.raises(ValueError):
        BatchTransform(32).sample_params(2)


# color_jitter


def test_color_jitter_factors():
    images = torch.rand(2, 3, 8, 8)
    ones = torch.ones(2)
    assert torch.equal(color_jitter(images, ones, ones, ones), images)
    torch.testing.assert_close(color_jitter(images, ones * 0.5, ones, ones), images * 0.5)
    assert color_jitter(images, ones * 3, ones, ones).max() <= 1.0  # clamped
    flat = color_jitter(images, ones, ones * 0, ones)  # no contrast: the image's mean gray everywhere
    assert torch.allclose(flat, flat[:, :, :1, :1].expand_as(flat))
    gray = color_jitter(images, ones, ones, ones * 0)  # no saturation: gray pixels
    assert torch.allclose(gray[:, 0], gray[:, 1]) and torch.allclose(gray[:, 1], gray[:, 2])
    luma = (images * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1)
    torch.testing.assert_close(gray[:, 0], luma)


def test_color_jitter_is_per_sample():
    images = torch.full((2, 3, 4, 4), 0.5)
    out = color_jitter(images, torch.tensor([0.5, 1.5]), torch.ones(2), torch.ones(2))
    torch.testing.assert_close(out[:, 0, 0, 0], torch.tensor([0.25, 0.75]))
