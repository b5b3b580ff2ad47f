import io

import numpy as np
import pytest
from PIL import Image

from builder.images import Rejected, crop_face
from tests.conftest import face_image


def _decode(jpeg: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB"), dtype=np.float64)


def _dot_image(width, height, dot, radius=6) -> Image.Image:
    """Black picture with one white dot: where the dot lands in the crop tells where pixels went."""
    pixels = np.zeros((height, width, 3), np.uint8)
    y, x = np.mgrid[0:height, 0:width]
    pixels[(x - dot[0]) ** 2 + (y - dot[1]) ** 2 <= radius**2] = 255
    return Image.fromarray(pixels)


def _bright_centre(pixels: np.ndarray) -> np.ndarray:
    gray = pixels.mean(-1)
    ys, xs = np.nonzero(gray > 128)
    return np.array([xs.mean(), ys.mean()])


@pytest.mark.parametrize("size", [(400, 300), (1600, 1200)])  # the large one decodes in draft mode
def test_landmarks_follow_the_pixels(tmp_path, size):
    dot = (size[0] * 0.55, size[1] * 0.45)
    path = tmp_path / "dot.jpg"
    _dot_image(*size, dot, radius=max(4, size[0] // 80)).save(path, quality=95)
    box = (size[0] * 0.3, size[1] * 0.2, size[0] * 0.4, size[1] * 0.5)
    landmarks = np.tile(np.array(dot), (68, 1))
    jpeg, crop_landmarks = crop_face(path, box, landmarks, face_size=224, crop_margin=0.15)
    pixels = _decode(jpeg)
    assert pixels.shape == (224, 224, 3)
    assert crop_landmarks.shape == (68, 2) and crop_landmarks.dtype == np.float32
    np.testing.assert_allclose(_bright_centre(pixels), crop_landmarks[0], atol=1.5)


def test_draft_decoding_matches_full_decoding(tmp_path):
    path = tmp_path / "big.jpg"
    face_image(1600, 1200, seed=3).save(path, quality=92)
    box = (500, 300, 500, 560)
    fast, _ = crop_face(path, box, None)
    # Reference: full-resolution decode, same crop, same resize.
    full = Image.open(path).convert("RGB")
    side = 560 * 1.3
    left, top = 750 - side / 2, 580 - side / 2
    reference = full.crop((round(left), round(top), round(left + side), round(top + side))).resize((224, 224))
    assert np.abs(_decode(fast) - np.asarray(reference, np.float64)).mean() < 4.0


def test_whole_image_face_size_jpeg_is_kept_byte_for_byte(tmp_path):
    path = tmp_path / "face.jpg"
    face_image(224, 224).save(path, quality=80)
    jpeg, landmarks = crop_face(path, None, np.ones((68, 2)))
    assert jpeg == path.read_bytes()
    assert landmarks.shape == (68, 2)


def test_whole_image_other_size_is_centre_cropped(tmp_path):
    path = tmp_path / "wide.png"
    _dot_image(300, 200, dot=(150, 100)).save(path)
    jpeg, landmarks = crop_face(path, None, np.array([[150.0, 100.0]] * 68))
    np.testing.assert_allclose(landmarks[0], [112, 112], atol=1)
    np.testing.assert_allclose(_bright_centre(_decode(jpeg)), [112, 112], atol=2)


@pytest.mark.parametrize("mode", ["L", "CMYK", "P", "RGBA", "I;16"])
def test_other_colour_modes_are_converted(tmp_path, mode):
    path = tmp_path / f"img-{mode.replace(';', '')}.png"
    image = face_image(200, 200).convert("L" if mode == "I;16" else mode)
    if mode == "I;16":
        image = image.convert("I;16")
    image.save(path.with_suffix(".tiff") if mode == "CMYK" else path)
    jpeg, _ = crop_face(path.with_suffix(".tiff") if mode == "CMYK" else path, (20, 20, 150, 150), None)
    assert Image.open(io.BytesIO(jpeg)).mode == "RGB"


def test_png_named_jpg_is_read(tmp_path):
    path = tmp_path / "actually_png.jpg"
    face_image(200, 200).save(path, format="PNG")
    jpeg, _ = crop_face(path, (20, 20, 150, 150), None)
    assert _decode(jpeg).shape == (224, 224, 3)


def test_exif_rotation_is_applied_before_cropping(tmp_path):
    # Displayed: 300 wide x 400 high, dot at (220, 100). Stored rotated, with orientation 6 (rotate 90 CW to view).
    displayed = _dot_image(300, 400, dot=(220, 100))
    stored = displayed.transpose(Image.Transpose.ROTATE_90)  # undone by orientation 6
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "rotated.jpg"
    stored.save(path, quality=95, exif=exif)
    jpeg, landmarks = crop_face(path, (150, 40, 140, 140), np.array([[220.0, 100.0]] * 68), crop_margin=0)
    np.testing.assert_allclose(_bright_centre(_decode(jpeg)), landmarks[0], atol=2)


def _expect(reason, path, box=(10, 10, 50, 50), **kwargs):
    with pytest.raises(Rejected) as info:
        crop_face(path, box, None, **kwargs)
    assert info.value.reason == reason
    return info.value


def test_bad_files_are_rejected_with_reasons(tmp_path):
    _expect("missing_file", tmp_path / "nope.jpg")
    (tmp_path / "empty.jpg").write_bytes(b"")
    _expect("empty_file", tmp_path / "empty.jpg")
    (tmp_path / "text.jpg").write_text("this is not an image")
    _expect("not_an_image", tmp_path / "text.jpg")
    good = tmp_path / "good.jpg"
    face_image(400, 400).save(good, quality=90)
    data = good.read_bytes()
    (tmp_path / "truncated.jpg").write_bytes(data[: len(data) // 2])
    _expect("truncated_image", tmp_path / "truncated.jpg")
    _expect("decompression_bomb", good, max_image_pixels=400 * 400 - 1)
    _expect("face_box_outside_image", good, box=(500, 10, 50, 50))
    _expect("face_box_outside_image", good, box=(10, 10, 0, 50))


def test_real_decompression_bomb_header_is_rejected_without_decoding(tmp_path):
    # A valid PNG header announcing 30000 x 30000 pixels (900 M): must be refused from the header alone.
    import struct
    import zlib

    def chunk(kind, payload):
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    header = struct.pack(">IIBBBBB", 30000, 30000, 8, 2, 0, 0, 0)
    (tmp_path / "bomb.png").write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b""))
    _expect("decompression_bomb", tmp_path / "bomb.png")
