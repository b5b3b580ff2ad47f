"""Safe image decoding and face cropping for the build.

Every way an image file can be bad becomes a ``Rejected`` with a stable reason code, so the build
records it and moves on. Large JPEGs are decoded in draft mode (libjpeg's DCT scaling), which is where
most of the build's speed comes from: a 1200 px photo whose face is cropped to 224 px is decoded at
1/2-1/4 scale without ever materialising the full-resolution pixels.

Example:
    >>> from builder.images import crop_face
    >>> jpeg, landmarks = crop_face("photo.jpg", face_box=(40, 60, 200, 200), landmarks=None)  # doctest: +SKIP
"""

from __future__ import annotations

import io
import math
import os
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# Orientations (EXIF tag 0x0112) that swap width and height when applied.
_TRANSPOSING_ORIENTATIONS = {5, 6, 7, 8}


class Rejected(Exception):
    """A row that cannot become an AffectNet+ example; ``reason`` is a stable snake_case code.

    ``detail`` names the file as it was given (``predict`` and ``annotate`` show it to the user as
    is); a build publishes it only through ``builder.sources.make_example``, which rewrites it relative
    to the source root.
    """

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


def read_image_file(path) -> bytes:
    """The bytes of an image file, or the ``Rejected`` that ``_open`` would raise for a missing,
    unreadable or empty one."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise Rejected("missing_file", str(path)) from None
    except OSError as err:
        raise Rejected("unreadable_file", f"{path}: {err}") from None
    if not data:
        raise Rejected("empty_file", str(path))
    return data


def _open(path, max_pixels: int, data: bytes | None = None) -> Image.Image:
    """Opens an image lazily (header only), turning each failure mode into a ``Rejected``; with
    ``data`` (the file's bytes, already read) the file is not read again."""
    if data is None:
        try:
            size = os.path.getsize(path)
        except FileNotFoundError:
            raise Rejected("missing_file", str(path)) from None
        except OSError as err:
            raise Rejected("unreadable_file", f"{path}: {err}") from None
        if size == 0:
            raise Rejected("empty_file", str(path))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(path if data is None else io.BytesIO(data))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise Rejected("decompression_bomb", str(err)) from None
    except UnidentifiedImageError:
        raise Rejected("not_an_image", str(path)) from None
    except OSError as err:
        raise Rejected("unreadable_file", f"{path}: {err}") from None
    width, height = image.size
    if width * height > max_pixels:
        image.close()
        raise Rejected("decompression_bomb", f"{width}x{height} pixels > {max_pixels}")
    return image


def _orientation(image: Image.Image) -> int:
    try:
        return int(image.getexif().get(0x0112, 1))
    except Exception:  # a malformed EXIF block is not worth a rejection: show the pixels as stored
        return 1


def _load(image: Image.Image, path) -> None:
    try:
        image.load()
    except OSError as err:  # PIL reports truncated and broken data streams as OSError
        raise Rejected("truncated_image", f"{path}: {err}") from None
    except (SyntaxError, ValueError, EOFError) as err:
        raise Rejected("corrupt_image", f"{path}: {err}") from None


def _encode_jpeg(image: Image.Image, quality: int) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def crop_face(
    path,
    face_box: tuple[float, float, float, float] | None,
    landmarks: np.ndarray | None,
    face_size: int = 224,
    crop_margin: float = 0.15,
    jpeg_quality: int = 95,
    max_image_pixels: int = 90_000_000,
    data: bytes | None = None,
) -> tuple[bytes, np.ndarray | None]:
    """Decodes ``path`` and returns the square face crop as JPEG bytes plus landmarks in crop pixels.

    Args:
        path: image file. Grayscale, CMYK, palette, PNG-named-.jpg and EXIF-rotated files are
            converted; missing, empty, non-image, truncated and oversized files raise ``Rejected``.
        face_box: ``(x, y, width, height)`` in the displayed (EXIF-rotated) image's pixels. The crop
            is the square of side ``max(w, h) * (1 + 2 * crop_margin)`` centred on the box; parts
            outside the image are black. ``None`` means the whole image is the face: it is centre-
            cropped to a square, and a file that already is a ``face_size`` square RGB JPEG is kept
            byte for byte (no re-encoding).
        landmarks: ``(68, 2)`` points in the displayed image's pixels, or ``None``.
        data: the file's bytes when the caller has read them (``read_image_file``): decoded from
            memory, ``path`` then only names the file in rejections.
    """
    image = _open(path, max_image_pixels, data)
    with image:
        orientation = _orientation(image)
        width, height = image.size
        if orientation in _TRANSPOSING_ORIENTATIONS:
            width, height = height, width
        if face_box is None:
            side = min(width, height)
            left, top = (width - side) / 2, (height - side) / 2
            if (
                image.format == "JPEG"
                and image.mode == "RGB"
                and orientation == 1
                and (width, height) == (face_size, face_size)
            ):
                _load(image, path)  # still verify that the stored bytes decode
                if data is None:
                    with open(path, "rb") as f:
                        data = f.read()
                return data, None if landmarks is None else np.asarray(landmarks, np.float32)
        else:
            x, y, w, h = face_box
            if not (w > 0 and h > 0) or x >= width or y >= height or x + w <= 0 or y + h <= 0:
                raise Rejected("face_box_outside_image", f"box {face_box} in a {width}x{height} image")
            side = max(w, h) * (1 + 2 * crop_margin)
            left, top = x + w / 2 - side / 2, y + h / 2 - side / 2

        # Draft mode: let libjpeg decode at the smallest 1/2^k scale that still gives >= face_size
        # pixels across the crop. The draft size is asked for in the stored (unrotated) frame.
        scale = min(1.0, face_size / side)
        if image.format == "JPEG" and scale < 1.0:
            stored_w, stored_h = image.size
            image.draft("RGB", (math.ceil(stored_w * scale), math.ceil(stored_h * scale)))
        _load(image, path)
        decoded = ImageOps.exif_transpose(image) if orientation != 1 else image
        sx, sy = decoded.size[0] / width, decoded.size[1] / height
        if decoded.mode != "RGB":
            decoded = decoded.convert("RGB")
        box = (round(left * sx), round(top * sy), round((left + side) * sx), round((top + side) * sy))
        face = decoded.crop(box).resize((face_size, face_size), Image.Resampling.BILINEAR, reducing_gap=None)
        crop_landmarks = None
        if landmarks is not None:
            # Map through the same integer box the pixels went through, so points and pixels agree.
            pts = np.asarray(landmarks, np.float64) * (sx, sy) - (box[0], box[1])
            crop_landmarks = (pts * (face_size / (box[2] - box[0]), face_size / (box[3] - box[1]))).astype(np.float32)
        return _encode_jpeg(face, jpeg_quality), crop_landmarks
