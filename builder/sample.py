"""A deterministic, rendered stand-in for AffectNet whose truth is known (the bundled sample).

Each image is a drawn face: the 68-point 3-D mean face (``builder.face3d.MEAN_FACE_68``) plus a small
random identity deformation, plus a mixture of per-emotion expression shapes (FACS/EMFACS action units)
weighted by the image's true soft label, rotated by a known head pose and projected orthographically.
The annotator's label is drawn from the true mixture with a little noise, so about two rows in three
agree with the dominant emotion (AffectNet's inter-annotator agreement is of that order). Valence and
arousal follow the mixture through a circumplex prototype per emotion. Nothing measured on this
sample says anything about AffectNet itself; it exists to prove the pipeline end to end.

Two layouts are written: ``"affectnet"`` (raw AffectNet: CSV file lists + full images with a face
box and 68 landmarks) and ``"affectnet-plus"`` (the official AffectNet+ release: 224 px face crops +
one JSON per image, in the release's format, ``builder.release``: independent per-emotion confidences
(``release_soft_label``), subsets by ``builder.softlabel.subsets``, pose in radians, the six race
classes, flat landmark lists). Both add ``ground_truth.jsonl``, one line per image, sorted by
``image_id``, and ``sample_manifest.json``: the config, the sha256 of every file written and a signature over both
(``is_bundled_sample``), which is how a build knows that its source is this synthetic sample (its
card then carries Apache-2.0 rather than AffectNet's terms) and not a real dataset that happens to
hold a file of the same name. The signature guards against accidents, not forgery: its key is public.

Head pose convention (degrees, camera frame x right, y down, z away from the camera; the face looks
along -z toward the camera): ``R = Rz(roll) @ Ry(yaw) @ Rx(pitch)`` with the standard right-handed
rotation matrices, applied to the face's 3-D points, then an orthographic (weak-perspective)
projection. In the image this means: yaw > 0 turns the face toward the image's left (the subject's
right; the nose tip moves left), pitch > 0 tilts the face down (the subject looks down; the nose tip
moves down), roll > 0 rotates the face clockwise as seen in the image.

Example:
    >>> from builder.sample import SampleConfig, write_sample
    >>> summary = write_sample("sample/", SampleConfig(n=200, seed=0))  # doctest: +SKIP
    >>> summary["splits"]  # doctest: +SKIP
    {'train': 140, 'validation': 20, 'unlabeled': 40}
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import hmac
import io
import json
import math
import multiprocessing
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageChops, ImageDraw, ImageFilter, ImageFont

from builder import release
from builder.face3d import MEAN_FACE_68
from builder.softlabel import subsets
from builder.sources import AFFECTNET_COLUMNS, AFFECTNET_VA_SENTINEL
from core.schema import EMOTIONS, HUMAN_LABELS, RELEASE_RACE_CLASSES

__all__ = [
    "EMOTION_PRIOR",
    "LANDMARK_29",
    "SampleConfig",
    "VALENCE_AROUSAL_PROTOTYPES",
    "contact_sheet",
    "expression_displacements",
    "is_bundled_sample",
    "release_soft_label",
    "render_face",
    "render_non_face",
    "rotation_matrix",
    "write_sample",
]

K = len(EMOTIONS)
NONE, UNCERTAIN, NON_FACE = HUMAN_LABELS.index("none"), HUMAN_LABELS.index("uncertain"), HUMAN_LABELS.index("non_face")
LAYOUTS = ("affectnet", "affectnet-plus")
MANIFEST = "sample_manifest.json"
GROUND_TRUTH = "ground_truth.jsonl"
# The folders each layout writes (everything in them is the sample's, and listed in the manifest).
LAYOUT_FOLDERS = {
    "affectnet": ("Manually_Annotated_file_lists", "Manually_Annotated_Images", "Automatically_Annotated_file_lists",
                  "Automatically_Annotated_Images"),
    "affectnet-plus": ("human_annotated", "no_human_annotated"),
}  # fmt: skip
MANIFEST_GENERATOR = "affectnet-plus sample"
# Public and fixed: the signature tells a manifest written by write_sample from one edited by hand or
# by another tool, not a forger from the project (docs/method.md §7).
_MANIFEST_KEY = b"affectnet-plus/builder.sample/manifest/v1"
CSV_COLUMNS = AFFECTNET_COLUMNS  # written exactly as raw AffectNet, read back by builder.sources
VA_SENTINEL = int(AFFECTNET_VA_SENTINEL)  # AffectNet's valence/arousal for uncertain and non-face rows

# Mildly imbalanced like AffectNet (happy and neutral most frequent), but every emotion >= 8 % so a
# sample of a few hundred rows still has positives of each class for the one-vs-rest experts.
EMOTION_PRIOR = np.array([0.17, 0.21, 0.11, 0.11, 0.09, 0.09, 0.12, 0.10])

# Circumplex (valence, arousal) prototype per emotion, in EMOTIONS order.
VALENCE_AROUSAL_PROTOTYPES = np.array(
    [(0.0, 0.0), (0.8, 0.35), (-0.65, -0.35), (0.25, 0.8), (-0.6, 0.75), (-0.65, 0.35), (-0.55, 0.7), (-0.45, 0.2)]
)

# Share of none / uncertain / non_face among the non-emotion rows (AffectNet has mostly non-faces,
# but a small sample needs a few of each).
_NON_EMOTION_SHARES = {NONE: 0.35, UNCERTAIN: 0.2, NON_FACE: 0.45}

# The release layout's per-emotion confidence floors (the release's are near 0.06, happy's 0.116).
RELEASE_FLOORS = np.array([0.06, 0.116, 0.06, 0.06, 0.06, 0.06, 0.06, 0.06])

# A fixed 29-point subset of the 68 for the release layout's "landmark-29": brow ends and middles,
# eye corners and lids, nose, mouth corners and midlines, chin and jaw ends.
LANDMARK_29 = (
    17,
    19,
    21,
    22,
    24,
    26,
    36,
    37,
    39,
    40,
    42,
    43,
    45,
    46,
    27,
    29,
    30,
    31,
    33,
    35,
    48,
    51,
    54,
    57,
    62,
    66,
    0,
    8,
    16,
)

# iBUG-68 left/right mirror: point i of a face mirrored about x = 0 is point _MIRROR[i].
_MIRROR = np.array(
    [*range(16, -1, -1)]  # jaw
    + [*range(26, 16, -1)]  # brows
    + [27, 28, 29, 30, 35, 34, 33, 32, 31]  # nose
    + [45, 44, 43, 42, 47, 46, 39, 38, 37, 36, 41, 40]  # eyes
    + [54, 53, 52, 51, 50, 49, 48, 59, 58, 57, 56, 55]  # outer lips
    + [64, 63, 62, 61, 60, 67, 66, 65]  # inner lips
)


@dataclass
class SampleConfig:
    """What to render: size, seed, layout, label noise and photometric ranges.

    Args:
        n: total number of images.
        seed: everything is a function of ``(seed, image index)``; same seed => byte-identical files.
        layout: ``"affectnet"`` (raw AffectNet CSV layout) or ``"affectnet-plus"`` (release layout).
        min_image_size, max_image_size: side range of the full (uncropped) images, px.
        validation_fraction, unlabeled_fraction: split shares; train gets the rest.
        non_emotion_fraction: share of the labelled rows coded 8 none / 9 uncertain / 10 non_face
            (``"affectnet"`` layout only; the release has none).
        annotator_noise: probability that the annotator picks uniformly among the 8 emotions instead
            of sampling from the true mixture (tunes the label agreement to ~68 %).
        automatic_label_noise: std of the Gaussian added to the true soft label before the argmax
            that gives the unlabeled split its automatic label.
        dominant_mass: range of the true soft label's mass on the dominant emotion.
        intensity: range of the per-image factor on the expression displacement.
        valence_arousal_noise: std of the Gaussian around the mixture's valence/arousal.
        landmark_noise: std of the annotation noise on written landmarks, as a fraction of face size.
        face_fraction: range of the landmarks' extent as a fraction of the image's shorter side.
        max_yaw, max_pitch, max_roll: head pose is uniform in +-these, degrees.
        jpeg_quality: JPEG quality range.
        noise_sigma: range of the std of Gaussian pixel noise (0-255 scale).
        blur_radius: range of the Gaussian blur radius, as a fraction of 100 px of image side.
        supersample: drawing scale before the box downsample (anti-aliasing).
        crop_size, crop_margin: the release layout's square face crops (side, margin per side).
    """

    n: int = 1000
    seed: int = 0
    layout: str = field(default="affectnet", metadata={"choices": ("affectnet", "affectnet-plus")})
    min_image_size: int = 320
    max_image_size: int = 640
    validation_fraction: float = 0.1
    unlabeled_fraction: float = 0.2
    non_emotion_fraction: float = 0.04
    annotator_noise: float = 0.04
    automatic_label_noise: float = 0.3
    dominant_mass: tuple[float, float] = (0.45, 0.95)
    intensity: tuple[float, float] = (0.8, 1.2)
    valence_arousal_noise: float = 0.08
    landmark_noise: float = 0.01
    face_fraction: tuple[float, float] = (0.35, 0.75)
    max_yaw: float = 30.0
    max_pitch: float = 20.0
    max_roll: float = 20.0
    jpeg_quality: tuple[int, int] = (70, 95)
    noise_sigma: tuple[float, float] = (1.0, 6.0)
    blur_radius: tuple[float, float] = (0.0, 0.15)
    supersample: int = 2
    crop_size: int = 224
    crop_margin: float = 0.15

    def __post_init__(self):
        if not isinstance(self.n, int) or self.n < 1:
            raise ValueError(f"n must be a positive integer, got {self.n!r}")
        if not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {self.seed!r}")
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {self.layout!r}")
        if not 64 <= self.min_image_size <= self.max_image_size <= 4096:
            raise ValueError(
                "need 64 <= min_image_size <= max_image_size <= 4096, got "
                f"{self.min_image_size} and {self.max_image_size}"
            )
        for name in ("validation_fraction", "unlabeled_fraction", "non_emotion_fraction", "annotator_noise"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if self.validation_fraction + self.unlabeled_fraction >= 1.0:
            raise ValueError("validation_fraction + unlabeled_fraction must leave rows for train (< 1)")
        for name, lo, hi in (
            ("dominant_mass", 0.4, 1.0),  # >= 0.4 keeps the dominant emotion the argmax
            ("intensity", 0.0, 3.0),
            ("face_fraction", 0.1, 0.9),
            ("jpeg_quality", 1, 100),
            ("noise_sigma", 0.0, 50.0),
            ("blur_radius", 0.0, 2.0),
        ):
            pair = getattr(self, name)
            if len(pair) != 2 or not lo <= pair[0] <= pair[1] <= hi:
                raise ValueError(f"{name} must be a (low, high) pair within [{lo}, {hi}], got {pair!r}")
        for name in ("automatic_label_noise", "valence_arousal_noise", "landmark_noise"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        for name, hi in (("max_yaw", 60), ("max_pitch", 45), ("max_roll", 45)):
            if not 0.0 <= getattr(self, name) <= hi:
                raise ValueError(f"{name} must be in [0, {hi}] degrees, got {getattr(self, name)}")
        if self.supersample not in (1, 2, 3, 4):
            raise ValueError(f"supersample must be 1..4, got {self.supersample}")
        if not 32 <= self.crop_size <= 1024:
            raise ValueError(f"crop_size must be in [32, 1024], got {self.crop_size}")
        if not 0.0 <= self.crop_margin <= 1.0:
            raise ValueError(f"crop_margin must be in [0, 1], got {self.crop_margin}")


# --------------------------------------------------------------------------------------------------
# Geometry: expression shapes, identity, pose


def _field(spec: dict[int, tuple], symmetric: bool = True) -> np.ndarray:
    """A (68, 3) displacement from ``{point: (dx, dy[, dz])}``; symmetric specs name the image-left
    point (or a midline one) and the mirror point gets (-dx, dy, dz)."""
    d = np.zeros((68, 3))
    for i, delta in spec.items():
        dx, dy, dz = (*delta, 0.0)[:3]
        d[i] = (dx, dy, dz)
        if symmetric and _MIRROR[i] != i:
            d[_MIRROR[i]] = (-dx, dy, dz)
    return d


def expression_displacements() -> np.ndarray:
    """The (8, 68, 3) expression shapes in EMOTIONS order, in mean-face units (y down: up is -y).

    Each follows its EMFACS prototype; magnitudes are large enough to read at 64 px (the outer eye
    corners are 0.76 apart, so 0.08 is about 10 % of the inter-ocular distance). Contempt is
    unilateral on the image-right mouth corner; ``render_face`` mirrors it for half the faces.

    Example:
        >>> expression_displacements().shape
        (8, 68, 3)
    """
    happy = _field(  # AU6 cheek raiser (lower lids up) + AU12 lip corners up/out + AU25/26 teeth showing
        {
            48: (-0.06, -0.09, 0.04), 60: (-0.055, -0.08, 0.04), 49: (-0.03, -0.05, 0.02), 50: (-0.01, -0.025),
            51: (0, -0.02), 61: (-0.015, -0.03), 62: (0, -0.028), 59: (-0.035, -0.03, 0.02), 58: (-0.012, 0.03),
            57: (0, 0.045), 67: (-0.02, 0.035), 66: (0, 0.055), 6: (0, 0.01), 7: (0, 0.015), 8: (0, 0.02),
            40: (0, -0.022), 41: (0, -0.02), 37: (0, 0.008), 38: (0, 0.008), 36: (0, -0.008),
        }
    )  # fmt: skip
    sad = _field(  # AU1 inner brows up + AU4 slightly together, AU15 lip corners down, AU17 chin raise
        {
            21: (0.012, -0.075), 20: (0.006, -0.05), 19: (0, -0.018), 18: (0, 0.012), 17: (0, 0.035),
            37: (0, 0.006), 38: (0, 0.012), 39: (0, -0.006),
            48: (0.012, 0.065), 60: (0.01, 0.055), 49: (0, 0.025), 59: (0.005, 0.035), 61: (0, 0.012),
            67: (0, 0.004), 58: (0, -0.008), 57: (0, -0.02), 66: (0, -0.01), 8: (0, -0.02), 7: (0, -0.012),
        }
    )  # fmt: skip
    surprise = _field(  # AU1+2 all brows up (arched), AU5 upper lids up, AU26 jaw drop (tall O mouth)
        {
            17: (0, -0.075), 18: (0, -0.09), 19: (0, -0.1), 20: (0, -0.1), 21: (0, -0.095),
            37: (0, -0.035), 38: (0, -0.035), 40: (0, 0.008), 41: (0, 0.008),
            4: (0, 0.03), 5: (0.01, 0.08, 0.02), 6: (0.015, 0.125, 0.03), 7: (0.01, 0.17, 0.04), 8: (0, 0.19, 0.05),
            57: (0, 0.19, 0.03), 58: (0.012, 0.175, 0.03), 59: (0.03, 0.12, 0.02), 66: (0, 0.19, 0.03),
            67: (0.02, 0.155, 0.02), 51: (0, -0.015), 50: (0.004, -0.012), 49: (0.015, 0.0), 62: (0, -0.018),
            61: (0.01, -0.014), 48: (0.045, 0.055), 60: (0.04, 0.055),
        }
    )  # fmt: skip
    fear = _field(  # AU1+2+4 brows up, flat and drawn together, AU5 lids up, AU20 lips stretched, AU25 apart
        {
            21: (0.028, -0.075), 20: (0.02, -0.068), 19: (0.01, -0.055), 18: (0, -0.04), 17: (0, -0.022),
            37: (0, -0.035), 38: (0, -0.035), 40: (0, -0.006), 41: (0, -0.006),
            48: (-0.06, 0.02, 0.02), 60: (-0.055, 0.02, 0.02), 49: (-0.03, 0.0), 59: (-0.035, 0.025),
            50: (-0.01, 0.0), 58: (-0.012, 0.035), 57: (0, 0.045), 66: (0, 0.055), 67: (-0.025, 0.045),
            62: (0, -0.008), 61: (-0.015, -0.005), 8: (0, 0.05), 7: (0, 0.04), 6: (0, 0.025),
        }
    )  # fmt: skip
    disgust = _field(  # AU9 nose wrinkle (nostrils up), AU10 upper lip raise, AU4 brows slightly lowered
        {
            31: (-0.012, -0.035), 32: (-0.004, -0.04), 33: (0, -0.035), 30: (0, -0.015), 29: (0, -0.008),
            50: (0, -0.06), 51: (0, -0.055), 49: (-0.005, -0.045), 61: (0, -0.055), 62: (0, -0.055),
            48: (0.005, 0.012), 60: (0.003, 0.005), 57: (0, 0.012), 66: (0, 0.006),
            17: (0, 0.02), 18: (0, 0.03), 19: (0, 0.035), 20: (0.008, 0.04), 21: (0.015, 0.045),
            40: (0, -0.02), 41: (0, -0.02), 37: (0, 0.012), 38: (0, 0.012),
        }
    )  # fmt: skip
    anger = _field(  # AU4 brows down and together, AU5/7 glare with tightened lower lids, AU23/24 lips pressed
        {
            21: (0.045, 0.09), 20: (0.032, 0.068), 19: (0.02, 0.042), 18: (0.01, 0.02), 17: (0, 0.0),
            37: (0, -0.006), 38: (0, -0.002), 40: (0, -0.024), 41: (0, -0.02),
            50: (0, 0.02), 51: (0, 0.02), 49: (0.01, 0.012), 58: (0, -0.02), 57: (0, -0.025), 59: (0.01, -0.012),
            66: (0, -0.012), 67: (0.005, -0.008), 61: (0, 0.004), 48: (0.025, 0.005), 60: (0.02, 0.0),
            31: (-0.015, -0.005), 8: (0, -0.015), 7: (0, -0.01),
        }
    )  # fmt: skip
    contempt = _field(  # AU12/14 on the image-right mouth corner only: up, out and back (dimpled)
        {
            54: (0.05, -0.08, 0.05), 64: (0.045, -0.07, 0.05), 53: (0.02, -0.035), 55: (0.028, -0.042),
            63: (0.015, -0.026), 65: (0.018, -0.03), 52: (0.005, -0.012), 56: (0.006, -0.014),
            46: (0, -0.01), 47: (0, -0.008),
        },
        symmetric=False,
    )  # fmt: skip
    return np.stack([np.zeros((68, 3)), happy, sad, surprise, fear, disgust, anger, contempt])


_DISPLACEMENTS = expression_displacements()
_DISPLACEMENTS.flags.writeable = False


def _mirrored(d: np.ndarray) -> np.ndarray:
    return d[_MIRROR] * (-1.0, 1.0, 1.0)


def rotation_matrix(yaw: float, pitch: float, roll: float) -> np.ndarray:
    """``Rz(roll) @ Ry(yaw) @ Rx(pitch)`` for angles in degrees (see the module's pose convention).

    Example:
        >>> nose = rotation_matrix(25, 0, 0) @ (0.0, 0.0, -0.6)
        >>> bool(nose[0] < 0)  # yaw > 0 moves the nose tip toward the image's left
        True
    """
    y, p, r = np.radians([yaw, pitch, roll])
    rx = np.array([[1, 0, 0], [0, math.cos(p), -math.sin(p)], [0, math.sin(p), math.cos(p)]])
    ry = np.array([[math.cos(y), 0, math.sin(y)], [0, 1, 0], [-math.sin(y), 0, math.cos(y)]])
    rz = np.array([[math.cos(r), -math.sin(r), 0], [math.sin(r), math.cos(r), 0], [0, 0, 1]])
    return rz @ ry @ rx


def _identity_shape(rng: np.random.Generator) -> tuple[np.ndarray, float]:
    """The mean face with a random identity (face width, eye distance and size, nose length, mouth,
    chin, brow height), so faces differ; returns the shape and the face-width factor."""
    shape = MEAN_FACE_68.copy()
    width = rng.uniform(0.92, 1.08)
    shape[:, 0] *= width
    shape[:, 1] *= rng.uniform(0.95, 1.05)
    eyes = np.r_[36:48]
    spread, eye_scale = rng.uniform(-0.02, 0.02), rng.uniform(0.9, 1.15)
    for side, sign in ((np.r_[36:42], -1), (np.r_[42:48], 1)):
        centre = shape[side].mean(axis=0)
        shape[side] = centre + (shape[side] - centre) * eye_scale
        shape[side, 0] += sign * spread
    shape[eyes, 1] += rng.uniform(-0.015, 0.015)
    shape[np.r_[31:36], 1] += rng.uniform(-0.03, 0.03)  # nose length
    shape[np.r_[28:31], 1] += rng.uniform(-0.015, 0.015)
    shape[np.r_[31:36], 0] *= rng.uniform(0.9, 1.15)  # nose width
    mouth = np.r_[48:68]
    shape[mouth, 0] *= rng.uniform(0.9, 1.1)
    shape[mouth, 1] += rng.uniform(-0.02, 0.02)
    shape[np.r_[49:54], 1] -= rng.uniform(-0.005, 0.012)  # upper lip thickness
    shape[np.r_[55:60], 1] += rng.uniform(-0.005, 0.015)  # lower lip thickness
    chin = rng.uniform(-0.03, 0.05)
    shape[np.r_[4:13], 1] += chin * np.array([0.2, 0.45, 0.7, 0.9, 1.0, 0.9, 0.7, 0.45, 0.2])
    shape[np.r_[3:14], 0] *= rng.uniform(0.92, 1.05)  # jaw width
    shape[np.r_[17:27], 1] += rng.uniform(-0.025, 0.02)  # brow height
    return shape, width


# --------------------------------------------------------------------------------------------------
# Drawing helpers


def _spline(points: np.ndarray, closed: bool = False, k: int = 6) -> np.ndarray:
    """Catmull-Rom curve through ``points`` (n, 2), ``k`` samples per segment: smooth outlines."""
    p = np.asarray(points, dtype=np.float64)
    if closed:
        ext = np.vstack([p[-1:], p, p[:2]])
    else:
        ext = np.vstack([2 * p[0] - p[1], p, 2 * p[-1] - p[-2]])
    p0, p1, p2, p3 = ext[:-3], ext[1:-2], ext[2:-1], ext[3:]
    t = np.linspace(0.0, 1.0, k, endpoint=False)[:, None, None]
    curve = 0.5 * (2 * p1 + (p2 - p0) * t + (2 * p0 - 5 * p1 + 4 * p2 - p3) * t**2 + (3 * p1 - p0 - 3 * p2 + p3) * t**3)
    curve = curve.transpose(1, 0, 2).reshape(-1, 2)
    return curve if closed else np.vstack([curve, p[-1:]])


def _hull(points: np.ndarray) -> np.ndarray:
    """Convex hull (monotone chain), counter-clockwise: the head's silhouette under any pose, where
    the jaw line and the forehead arc would cross and leave holes."""
    pts = sorted(map(tuple, np.asarray(points, dtype=np.float64)))

    def half(seq):
        out: list = []
        for p in seq:
            while (
                len(out) >= 2
                and (out[-1][0] - out[-2][0]) * (p[1] - out[-2][1]) - (out[-1][1] - out[-2][1]) * (p[0] - out[-2][0])
                <= 0
            ):
                out.pop()
            out.append(p)
        return out

    lower, upper = half(pts), half(reversed(pts))
    return np.array(lower[:-1] + upper[:-1])


def _xy(points: np.ndarray) -> list[tuple[float, float]]:
    return [(float(x), float(y)) for x, y in points]


def _byte(value: float) -> int:
    return min(255, max(0, int(value)))


def _rgba(colour, alpha: float) -> tuple[int, int, int, int]:
    return (_byte(colour[0]), _byte(colour[1]), _byte(colour[2]), _byte(alpha))


def _shade(colour, factor: float) -> tuple[int, int, int]:
    return (_byte(colour[0] * factor), _byte(colour[1] * factor), _byte(colour[2] * factor))


def _stroke(points: np.ndarray, thick_start: float, thick_end: float) -> np.ndarray:
    """A tapered ribbon polygon around a polyline (for brows)."""
    tangent = np.gradient(points, axis=0)
    tangent /= np.linalg.norm(tangent, axis=1, keepdims=True) + 1e-9
    normal = np.stack([-tangent[:, 1], tangent[:, 0]], axis=1)
    t = np.linspace(0.0, 1.0, len(points))[:, None]
    half = (thick_start + (thick_end - thick_start) * np.sqrt(t)) / 2
    # Round the ends a little so brows do not look cut with scissors.
    half = half * np.minimum(1.0, 0.35 + 3.0 * np.minimum(t, 1 - t) ** 0.7)
    return np.vstack([points + normal * half, (points - normal * half)[::-1]])


def _clipped(canvas: Image.Image, clip: np.ndarray, paint) -> None:
    """Runs ``paint(draw, offset)`` on a patch of ``canvas`` and keeps only what falls inside the
    polygon ``clip`` (irises inside the eye, teeth inside the mouth), without full-canvas masks."""
    x0, y0 = np.floor(clip.min(axis=0)).astype(int) - 2
    x1, y1 = np.ceil(clip.max(axis=0)).astype(int) + 2
    x0, y0 = max(x0, 0), max(y0, 0)
    x1, y1 = min(x1, canvas.width), min(y1, canvas.height)
    if x1 - x0 < 2 or y1 - y0 < 2:
        return
    patch = canvas.crop((x0, y0, x1, y1))
    layer = patch.copy()
    paint(ImageDraw.Draw(layer, "RGBA"), np.array([x0, y0], dtype=np.float64))
    mask = Image.new("L", patch.size, 0)
    ImageDraw.Draw(mask).polygon(_xy(clip - (x0, y0)), fill=255)
    canvas.paste(Image.composite(layer, patch, mask), (x0, y0))


def _background(rng: np.random.Generator, size: tuple[int, int]) -> Image.Image:
    """A plain, gradient or blotchy background, drawn small and upsampled (cheap at any size)."""
    kind = rng.integers(3)
    base = rng.uniform(30, 230, 3)
    if kind == 0:  # near-plain studio backdrop
        grid = base + rng.normal(0, 6, (2, 2, 3))
    elif kind == 1:  # two-colour gradient
        other = rng.uniform(30, 230, 3)
        t = np.linspace(0, 1, 4)[:, None, None]
        grid = np.broadcast_to(base * (1 - t) + other * t, (4, 4, 3))
        if rng.random() < 0.5:
            grid = grid.transpose(1, 0, 2)
    else:  # blotchy "indoor scene": low-frequency colour noise
        cells = int(rng.integers(3, 9))
        grid = base + rng.normal(0, 40, (cells, cells, 3))
    small = Image.fromarray(np.clip(grid, 0, 255).astype(np.uint8), "RGB")
    return small.resize(size, Image.Resampling.BILINEAR)


def _canvas(rng: np.random.Generator, size: tuple[int, int], supersample: int) -> Image.Image:
    """The background at ``supersample`` x ``size``: made at the final size and enlarged by pixel
    repetition, which the final box downsample undoes exactly (the background is smooth anyway)."""
    background = _background(rng, size)
    if supersample == 1:
        return background
    return background.resize((size[0] * supersample, size[1] * supersample), Image.Resampling.NEAREST)


_SKIN = np.array(
    [(255, 224, 196), (241, 194, 167), (224, 172, 138), (198, 140, 105), (165, 114, 80), (120, 80, 55), (88, 58, 40)]
)
_HAIR = np.array([(22, 18, 16), (55, 38, 25), (95, 65, 40), (185, 150, 95), (135, 60, 30), (150, 150, 150)])
_IRIS = np.array([(85, 52, 30), (48, 30, 20), (70, 110, 160), (80, 120, 70), (120, 100, 50)])


def _palette(rng: np.random.Generator) -> dict:
    skin = _SKIN[rng.integers(len(_SKIN))] * rng.uniform(0.93, 1.05) + rng.normal(0, 5, 3)
    hair = _HAIR[rng.integers(len(_HAIR))] * rng.uniform(0.8, 1.15)
    lip = skin * (0.8, 0.52, 0.52) + (35, 5, 12) + rng.normal(0, 6, 3)
    return {
        "skin": tuple(np.clip(skin, 0, 255).astype(int)),
        "hair": tuple(np.clip(hair, 0, 255).astype(int)),
        # Brows darker than both hair and skin so they read on every skin tone.
        "brow": tuple(np.clip(np.minimum(hair * 0.6, skin * 0.4), 0, 255).astype(int)),
        "iris": tuple(np.clip(_IRIS[rng.integers(len(_IRIS))] * rng.uniform(0.85, 1.15), 0, 255).astype(int)),
        "lip": tuple(np.clip(lip, 0, 255).astype(int)),
        "sclera": tuple(np.clip(rng.uniform(222, 245) + rng.normal(0, 3, 3), 0, 255).astype(int)),
        "teeth": tuple(np.clip(rng.uniform(215, 245) * np.array([1.0, 0.98, 0.9]), 0, 255).astype(int)),
        "cloth": tuple(rng.integers(20, 230, 3)),
    }


# --------------------------------------------------------------------------------------------------
# The face renderer


def _head_parts(shape: np.ndarray, width: float, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """3-D outlines around the 68 points: forehead, hair, fringe, ears, neck, shoulders."""
    top_l, top_r = shape[0], shape[16]
    half_w = (top_r[0] - top_l[0]) / 2
    cx, y_ref, z_side = (top_r[0] + top_l[0]) / 2, (top_l[1] + top_r[1]) / 2, (top_l[2] + top_r[2]) / 2
    forehead_h = rng.uniform(0.6, 0.72)
    t = np.linspace(0, math.pi, 17)[1:-1]  # from point 16 over the top to point 0
    c, s = np.cos(t), np.sin(t)
    squarish = np.sign(c) * np.abs(c) ** 0.8
    forehead = np.stack(
        [cx + half_w * 1.01 * squarish, y_ref - forehead_h * s**0.9, z_side + (-0.33 - z_side) * s**0.6], axis=1
    )
    # Hair behind the head: a bigger cap whose sides fall to a random length.
    hair_len = rng.uniform(-0.15, 0.75)
    volume = rng.uniform(1.08, 1.22)
    ta = np.linspace(-0.25, math.pi + 0.25, 23)
    cap = np.stack(
        [cx + half_w * volume * np.cos(ta), y_ref - (forehead_h + rng.uniform(0.06, 0.16)) * np.sin(ta), 0.3 + 0 * ta],
        axis=1,
    )
    sides = half_w * volume
    hair = np.vstack(
        [
            [(cx + sides * 0.75, hair_len, 0.35), (cx + sides, hair_len, 0.35)],
            cap[cap[:, 1] < hair_len],
            [(cx - sides, hair_len, 0.35), (cx - sides * 0.75, hair_len, 0.35)],
        ]
    )
    # Fringe: the forehead above a hairline (lower for bangs, absent for a shaved head).
    style = rng.random()
    hairline = 0.0 if style < 0.1 else (rng.uniform(0.13, 0.22) if style < 0.25 else rng.uniform(0.3, 0.48))
    fringe = np.zeros((0, 3))
    if hairline > 0:
        tb = t[::-1]
        cb, sb = np.cos(tb), np.sin(tb)
        line = np.stack(
            [
                cx + half_w * 0.95 * np.sign(cb) * np.abs(cb) ** 0.8,
                y_ref - 0.08 - (hairline - 0.08) * sb**0.35 - 0.06 * np.abs(cb),
                z_side + (-0.36 - z_side) * sb**0.6,
            ],
            axis=1,
        )
        fringe = np.vstack([[top_r], forehead * (1.02, 1.0, 1.0) + (0, -0.01, 0), [top_l], line])
    phi = np.linspace(0, 2 * math.pi, 14, endpoint=False)
    ears = []
    for sign in (-1, 1):
        ex = cx + sign * (half_w + 0.02 + 0.05 * (1 + np.cos(phi)))
        ears.append(np.stack([ex, -0.14 + 0.17 * np.sin(phi), 0.42 + 0.08 * np.cos(phi)], axis=1))
    nw = 0.33 * width
    neck = np.array([(-nw, 0.1, 0.35), (nw, 0.1, 0.35), (nw * 1.05, 1.6, 0.35), (-nw * 1.05, 1.6, 0.35)])
    neck[:, 0] += cx
    shoulders = np.array(
        [(-0.33, 0.82), (-0.9, 0.98), (-1.55, 1.25), (-1.8, 3.2), (1.8, 3.2), (1.55, 1.25), (0.9, 0.98), (0.33, 0.82),
         (0.0, 1.1)]
    )  # fmt: skip
    shoulders = np.hstack([shoulders * (width, 1.0) + (cx, 0), np.full((len(shoulders), 1), 0.5)])
    # Cheek surface in front of the jaw line: it becomes the silhouette on the far side of a turned head.
    cheeks = shape[np.r_[1:6, 11:16]] * (0.9, 1.0, 1.0) + (0, 0, -0.2)
    return {
        "forehead": forehead,
        "cheeks": cheeks,
        "hair": hair,
        "fringe": fringe,
        "ear_l": ears[0],
        "ear_r": ears[1],
        "neck": neck,
        "shoulders": shoulders,
    }


def _wrinkles(shape: np.ndarray, w: np.ndarray, strength: float, contempt_side: int) -> list[tuple[np.ndarray, float]]:
    """Expression lines drawn from the true weights (3-D polylines with an opacity 0..1): nasolabial
    folds (happy, disgust), nose wrinkles (disgust), glabella lines (anger), forehead lines (surprise,
    fear) and a dimple at contempt's raised corner (``contempt_side``: -1 image left, +1 right), so
    the emotion reads from texture as well as from landmark geometry."""
    out = []
    for wing, corner, sign in ((31, 48, -1), (35, 54, 1)):
        one_sided = w[7] if sign == contempt_side else 0.0
        nasolabial = min(1.0, (w[1] + 0.6 * w[5] + 0.5 * one_sided) * strength)
        a = shape[wing] + (sign * 0.045, -0.025, 0.02)
        b = shape[corner] + (sign * 0.055, -0.03, 0.02)
        c = shape[corner] + (sign * 0.045, 0.06, 0.02)
        out.append((np.stack([a, (a + b) / 2 + (sign * 0.015, 0, 0), b, c]), 0.75 * nasolabial))
        dimple = shape[corner] + np.array(
            [(sign * 0.015, -0.035, 0.0), (sign * 0.035, 0.0, 0.0), (sign * 0.015, 0.035, 0.0)]
        )
        out.append((dimple, min(1.0, one_sided * strength)))
    brow_mid = (shape[21] + shape[22]) / 2
    glabella = min(1.0, (w[6] + 0.4 * w[5] + 0.3 * w[4]) * strength)
    for dx in (-0.03, 0.03):
        top, bottom = brow_mid + (dx, -0.03, 0), brow_mid + (dx * 0.8, 0.09, 0)
        out.append((np.stack([top, bottom]), 0.8 * glabella))
    nose = min(1.0, w[5] * strength)
    for dy in (0.0, 0.035):
        mid = shape[28] + (0, dy, -0.02)
        out.append((np.stack([mid + (-0.07, 0.01, 0.02), mid + (0, -0.01, 0), mid + (0.07, 0.01, 0.02)]), 0.8 * nose))
    forehead = min(1.0, (w[3] + 0.6 * w[4] + 0.3 * w[2]) * strength)
    brow_top = min(shape[17:27, 1])
    for k, half in enumerate((0.3, 0.26, 0.2)):
        y = brow_top - 0.06 - 0.055 * k
        xs = np.linspace(-half, half, 7) + brow_mid[0]
        pts = np.stack([xs, y + 0.02 * (xs - brow_mid[0]) ** 2 / half**2 - 0.01, np.full(7, -0.42)], axis=1)
        out.append((pts, 0.6 * forehead))
    return out


def render_face(
    rng: np.random.Generator,
    soft_label: np.ndarray,
    pose_deg: tuple[float, float, float],
    image_size: int | tuple[int, int],
    intensity: float | None = None,
    face_fraction: tuple[float, float] = (0.35, 0.75),
    supersample: int = 2,
    photometric: bool = True,
    noise_sigma: tuple[float, float] = (1.0, 6.0),
    blur_radius: tuple[float, float] = (0.0, 0.15),
) -> tuple[Image.Image, np.ndarray, tuple[int, int, int, int]]:
    """Renders one face; returns (RGB image, noise-free 68x2 landmarks in image px, face box x,y,w,h).

    The shape is ``identity + intensity * sum_k soft_label[k] * D_k`` (``expression_displacements``),
    rotated by ``pose_deg = (yaw, pitch, roll)`` (module docstring: convention) and projected
    orthographically. Identity, colours, placement, contempt side and photometric noise all come from
    ``rng``, so the same generator state gives the same image.

    Args:
        rng: the image's generator, e.g. ``np.random.default_rng([seed, index])``.
        soft_label: 8 non-negative weights (EMOTIONS order) mixing the expression shapes.
        pose_deg: head pose (yaw, pitch, roll) in degrees.
        image_size: side, or (width, height), of the returned image.
        intensity: factor on the expression displacement; None draws it from U(0.8, 1.2).
        face_fraction: range of the landmarks' extent as a fraction of the image's shorter side.
        supersample: drawing scale before the box downsample (anti-aliasing).
        photometric: brightness/contrast/colour jitter, blur and pixel noise (off: a clean render).
        noise_sigma, blur_radius: ranges of the photometric noise and blur (blur per 100 px of side).

    Example:
        >>> rng = np.random.default_rng(0)
        >>> image, landmarks, box = render_face(rng, np.eye(8)[1], (10.0, 0.0, 0.0), 256)
        >>> image.size, landmarks.shape
        ((256, 256), (68, 2))
    """
    w = np.asarray(soft_label, dtype=np.float64)
    if w.shape != (K,) or (w < 0).any() or not np.isfinite(w).all():
        raise ValueError(f"soft_label must be {K} finite non-negative weights, got {soft_label!r}")
    width_px, height_px = (image_size, image_size) if np.isscalar(image_size) else image_size
    width_px, height_px = int(width_px), int(height_px)
    if intensity is None:
        intensity = rng.uniform(0.8, 1.2)

    # Shape: identity + expression mixture.
    identity, face_width = _identity_shape(rng)
    displacements = _DISPLACEMENTS.copy()
    contempt_side = 1
    if rng.random() < 0.5:  # contempt is unilateral; either side occurs
        displacements[7] = _mirrored(displacements[7])
        contempt_side = -1
    shape = identity + intensity * np.tensordot(w, displacements, axes=1)
    parts = _head_parts(shape, face_width, rng)
    lines = _wrinkles(shape, w, intensity, contempt_side)
    pal = _palette(rng)

    # Pose and orthographic projection. The body turns only a little with the head.
    yaw, pitch, roll = (float(a) for a in pose_deg)
    rot = rotation_matrix(yaw, pitch, roll)
    body_rot = rotation_matrix(0.3 * yaw, 0.0, 0.3 * roll)
    # Size and place the face by its identity (expression-free) landmarks, as a photographer frames a
    # person: opening the mouth does not shrink or move the head. Then make sure the expressed
    # landmarks stay inside the image.
    size = np.array([width_px, height_px], dtype=np.float64)
    border = 0.02 * size.min()
    neutral = (identity @ rot.T)[:, :2]
    expressed = (shape @ rot.T)[:, :2]
    fraction = rng.uniform(*face_fraction)
    scale = fraction * size.min() / np.ptp(neutral, axis=0).max()  # px per face unit
    scale = min(scale, float(((size - 2 * border) / np.ptp(expressed, axis=0)).min()))
    centre = (neutral.min(axis=0) + neutral.max(axis=0)) / 2
    slack = np.maximum(size / 2 - np.ptp(neutral, axis=0) * scale / 2 - border, 0)
    offset = size / 2 + rng.uniform(-1, 1, 2) * slack * 0.8 - centre * scale
    low, high = expressed.min(axis=0) * scale + offset, expressed.max(axis=0) * scale + offset
    offset += np.maximum(border - low, 0) - np.maximum(high - (size - border), 0)

    def project(points: np.ndarray, r: np.ndarray = rot) -> np.ndarray:
        return ((points @ r.T)[:, :2] * scale + offset) * supersample

    lm = project(shape)
    landmarks = lm / supersample
    ss = scale * supersample  # canvas px per face unit

    canvas = _canvas(rng, (width_px, height_px), supersample)
    draw = ImageDraw.Draw(canvas, "RGBA")
    skin = pal["skin"]
    # Painter's order, back to front.
    draw.polygon(_xy(_spline(project(parts["hair"]), closed=True, k=3)), fill=pal["hair"])
    draw.polygon(_xy(project(parts["neck"], body_rot)), fill=_shade(skin, 0.82))
    draw.polygon(_xy(project(parts["shoulders"], body_rot)), fill=pal["cloth"])  # clothes cover the neck's base
    for name in ("ear_l", "ear_r"):
        ear = project(parts[name])
        draw.polygon(_xy(ear), fill=_shade(skin, 0.93))
        draw.line(_xy(np.vstack([ear, ear[:1]])), fill=_rgba(_shade(skin, 0.6), 120), width=max(1, int(0.008 * ss)))
    face = np.vstack([lm[0:17], project(parts["forehead"]), project(parts["cheeks"])])
    face_curve = _spline(_hull(face), closed=True, k=4)
    draw.polygon(_xy(face_curve), fill=skin)
    if len(parts["fringe"]):
        draw.polygon(_xy(_spline(project(parts["fringe"]), closed=True, k=3)), fill=pal["hair"])

    line_w = max(1, int(round(0.011 * ss)))
    wrinkle_colour = _shade(skin, 0.55)
    for points, alpha in lines:
        if alpha > 0.05:
            pts = project(points)
            curve = _spline(pts, k=5) if len(pts) > 2 else pts
            draw.line(_xy(curve), fill=_rgba(wrinkle_colour, 200 * alpha), width=line_w, joint="curve")
    # Cheeks: a soft flush (concentric faint ellipses = a cheap radial gradient), rosier in a smile.
    for eye_low in (41, 46):
        c = lm[eye_low] + (lm[48 if eye_low == 41 else 54] - lm[eye_low]) * 0.45
        for r in (0.11 * ss, 0.08 * ss, 0.05 * ss):
            draw.ellipse((c[0] - r, c[1] - r * 0.7, c[0] + r, c[1] + r * 0.7), fill=_rgba((230, 90, 90), 6 + 12 * w[1]))

    # Eyes: sclera, iris + pupil clipped to the eye, lids, crease.
    gaze = rng.normal(0, 0.08, 2)
    for idx in (np.r_[36:42], np.r_[42:48]):
        eye = lm[idx]
        outline = _spline(eye, closed=True, k=5)
        eye_w = np.linalg.norm(eye[3] - eye[0])
        draw.polygon(_xy(outline), fill=pal["sclera"])
        centre_eye = eye[[1, 2, 4, 5]].mean(axis=0) + gaze * eye_w * (1.0, 0.5)
        r_iris = 0.22 * eye_w

        def paint(d, origin, c=centre_eye, r=r_iris, top=eye[[0, 1, 2, 3]]):
            c = c - origin
            d.ellipse((c[0] - r, c[1] - r, c[0] + r, c[1] + r), fill=pal["iris"])
            d.ellipse((c[0] - r * 0.45, c[1] - r * 0.45, c[0] + r * 0.45, c[1] + r * 0.45), fill=(12, 10, 10))
            h = r * 0.22
            d.ellipse(
                (c[0] + r * 0.2, c[1] - r * 0.5, c[0] + r * 0.2 + h * 2, c[1] - r * 0.5 + h * 2),
                fill=(255, 255, 255, 200),
            )
            # The upper lid casts a shadow on the eyeball.
            d.line(_xy(_spline(top - origin + (0, r * 0.12), k=5)), fill=(0, 0, 0, 70), width=max(1, int(r * 0.35)))

        _clipped(canvas, outline, paint)
        upper = _spline(eye[[0, 1, 2, 3]], k=5)
        lower = _spline(eye[[3, 4, 5, 0]], k=5)
        draw.line(_xy(upper), fill=_rgba(_shade(pal["hair"], 0.4), 235), width=max(2, int(0.02 * ss)), joint="curve")
        draw.line(_xy(lower), fill=_rgba(_shade(skin, 0.55), 150), width=max(1, int(0.008 * ss)), joint="curve")
        crease = upper + (0, -0.03 * ss)
        draw.line(_xy(crease[2:-2]), fill=_rgba(_shade(skin, 0.6), 90), width=max(1, int(0.008 * ss)), joint="curve")

    # Brows: thick tapered strokes, inner end thickest.
    brow_t = rng.uniform(0.035, 0.06) * ss
    for idx in ([17, 18, 19, 20, 21], [26, 25, 24, 23, 22]):
        centre_line = _spline(lm[idx], k=5)
        draw.polygon(_xy(_stroke(centre_line, brow_t * 0.45, brow_t)), fill=pal["brow"])

    # Nose: side lines (the shadow side darker), its profile when the head turns, wings, nostrils.
    light_side = -1.0 if rng.random() < 0.5 else 1.0
    nose_w = max(1, int(0.014 * ss))
    for sign, wing, inner in ((-1, 31, 32), (1, 35, 34)):
        side = np.stack(
            [shape[27] + (sign * 0.05, 0.03, 0.05), shape[28] + (sign * 0.06, 0.0, 0.04),
             shape[29] + (sign * 0.065, 0.0, 0.03), shape[wing] + (-sign * 0.01, -0.075, -0.01)]
        )  # fmt: skip
        alpha = 110 if sign == -light_side else 40
        draw.line(_xy(_spline(project(side), k=5)), fill=_rgba(_shade(skin, 0.55), alpha), width=nose_w, joint="curve")
        wing_3d = np.stack(
            [shape[wing] + (-sign * 0.005, -0.065, 0.0), shape[wing] + (sign * 0.03, -0.035, 0.02),
             shape[wing] + (sign * 0.015, 0.005, 0.01), shape[inner] + (0, 0.0, -0.01)]
        )  # fmt: skip
        draw.line(_xy(_spline(project(wing_3d), k=5)), fill=_rgba(_shade(skin, 0.45), 170), width=nose_w, joint="curve")
        c = (lm[wing] + 2 * lm[inner]) / 3 + (0, -0.008 * ss)
        rx, ry = 0.03 * ss, 0.015 * ss
        draw.ellipse((c[0] - rx, c[1] - ry, c[0] + rx, c[1] + ry), fill=_rgba((40, 20, 20), 200))
    turn = min(1.0, abs(yaw) / 30.0)
    if turn > 0.1:  # the nose's profile reads once the head is turned
        profile = np.stack([shape[27], shape[28], shape[29], shape[30], shape[33] + (0, -0.01, -0.01)])
        draw.line(
            _xy(_spline(project(profile), k=5)), fill=_rgba(_shade(skin, 0.5), 130 * turn), width=nose_w, joint="curve"
        )
    draw.line(_xy(_spline(lm[[32, 33, 34]], k=4)), fill=_rgba(_shade(skin, 0.5), 120), width=nose_w)

    # Mouth: lips, then the opening (dark), teeth clipped to it, or a closed-lip line.
    outer = _spline(lm[48:60], closed=True, k=5)
    inner = _spline(lm[60:68], closed=True, k=5)
    draw.polygon(_xy(outer), fill=pal["lip"])
    upper_lip = np.vstack([_spline(lm[48:55], k=5), _spline(lm[[64, 63, 62, 61, 60]], k=5)])
    draw.polygon(_xy(upper_lip), fill=_shade(pal["lip"], 0.85))
    opening = np.linalg.norm(lm[66] - lm[62]) / ss
    if opening > 0.02:
        draw.polygon(_xy(inner), fill=(45, 18, 22))
        mouth_w = np.linalg.norm(lm[64] - lm[60])

        def teeth(d, origin, open_px=opening * ss):
            top = _spline(lm[[60, 61, 62, 63, 64]], k=5) - origin
            h = min(0.5 * open_px, 0.06 * ss, 0.25 * mouth_w)
            d.polygon(_xy(np.vstack([top + (0, -2), (top + (0, h))[::-1]])), fill=pal["teeth"])
            if open_px > 0.1 * ss:  # lower teeth show only in a wide-open mouth
                bottom = _spline(lm[[64, 65, 66, 67, 60]], k=5) - origin
                d.polygon(
                    _xy(np.vstack([bottom + (0, 2), (bottom + (0, -0.3 * h))[::-1]])), fill=_shade(pal["teeth"], 0.9)
                )

        _clipped(canvas, inner, teeth)
        draw.line(_xy(inner), fill=_rgba(_shade(pal["lip"], 0.6), 160), width=max(1, int(0.006 * ss)))
    else:
        draw.line(
            _xy(_spline(lm[[60, 61, 62, 63, 64]], k=5)),
            fill=_rgba(_shade(pal["lip"], 0.4), 230),
            width=max(1, int(0.01 * ss)),
            joint="curve",
        )
    draw.line(
        _xy(np.vstack([outer, outer[:1]])), fill=_rgba(_shade(pal["lip"], 0.75), 90), width=max(1, int(0.005 * ss))
    )

    # Supersampling: the mean of each supersample x supersample block is the anti-aliased pixel (a box
    # filter; LANCZOS costs ten times more here and adds ringing at the strokes' hard edges).
    image = canvas.reduce(supersample) if supersample > 1 else canvas
    image = _finish(image, rng, face_curve / supersample, photometric, noise_sigma, blur_radius)
    box = _face_box(landmarks, rng, (width_px, height_px))
    return image, landmarks, box


def _finish(
    image: Image.Image,
    rng: np.random.Generator,
    face_outline: np.ndarray | None,
    photometric: bool,
    noise_sigma: tuple[float, float],
    blur_radius: tuple[float, float],
) -> Image.Image:
    """Shading and camera-like variation in one float pass: the face darkens toward its outline (it
    is round), a directional light gradient crosses the picture; then blur, brightness/contrast/
    colour-cast jitter and sensor noise (luma only: a third of the random numbers, same look)."""
    width_px, height_px = image.size
    if photometric:
        radius = rng.uniform(*blur_radius) * min(image.size) / 100
        if radius > 0.3:  # a box blur is half the cost of PIL's Gaussian and looks the same here
            image = image.filter(ImageFilter.BoxBlur(radius))
    shade = np.ones((height_px, width_px), dtype=np.float32)
    if face_outline is not None:
        mask = Image.new("L", image.size, 0)
        ImageDraw.Draw(mask).polygon(_xy(face_outline), fill=255)
        # The blur is smooth, so it is computed at quarter size and enlarged; the sharp mask keeps
        # the darkening inside the face.
        small = mask.reduce(4)
        face_px = float(np.ptp(face_outline, axis=0).max()) / 4
        soft = small.filter(ImageFilter.BoxBlur(max(1.0, 0.05 * face_px))).resize(image.size, Image.Resampling.BILINEAR)
        edge = ImageChops.multiply(mask, ImageChops.invert(soft))
        shade -= np.asarray(edge, dtype=np.float32) * np.float32(0.56 / 255.0)
    angle = rng.uniform(0, 2 * math.pi)
    side = float(max(image.size))
    gx = ((np.arange(width_px, dtype=np.float32) - width_px / 2) * math.cos(angle) / side)[None, :]
    gy = ((np.arange(height_px, dtype=np.float32) - height_px / 2) * math.sin(angle) / side)[:, None]
    shade *= 1.0 + np.float32(rng.uniform(0.1, 0.35)) * (gx + gy)
    # The rest runs in PIL's uint8 C loops (several times faster than float numpy at these sizes):
    # multiply by the shade map scaled to <= 1, then one lookup table for the shade's scale,
    # contrast, brightness and colour cast, then add zero-centred noise.
    top = float(shade.max())
    shade_l = Image.fromarray(np.clip(shade * (255.0 / top) + 0.5, 0, 255).astype(np.uint8), "L")
    image = ImageChops.multiply(image, Image.merge("RGB", (shade_l, shade_l, shade_l)))
    contrast, brightness, gain = 1.0, 0.0, np.ones(3)
    if photometric:
        contrast, brightness = rng.uniform(0.75, 1.2), rng.uniform(-25, 25)
        gain = rng.uniform(0.94, 1.06, 3)
    v = np.arange(256, dtype=np.float64) * top
    lut = np.concatenate([((v - 128.0) * contrast + 128.0 + brightness) * g for g in gain])
    image = image.point(np.clip(lut + 0.5, 0, 255).astype(np.uint8).tolist())
    if photometric:
        sigma = rng.uniform(*noise_sigma)
        noise = rng.standard_normal((height_px, width_px), dtype=np.float32) * np.float32(sigma) + np.float32(128.5)
        noise_l = Image.fromarray(np.clip(noise, 0, 255).astype(np.uint8), "L")
        image = ImageChops.add(image, Image.merge("RGB", (noise_l, noise_l, noise_l)), 1.0, -128)
    return image


def _face_box(landmarks: np.ndarray, rng: np.random.Generator, size: tuple[int, int]) -> tuple[int, int, int, int]:
    """A detector-like box: the landmarks' box grown up over the forehead, edges jittered, clipped."""
    x0, y0 = landmarks.min(axis=0)
    x1, y1 = landmarks.max(axis=0)
    w, h = x1 - x0, y1 - y0
    jitter = rng.normal(0, 0.025, 4) * max(w, h)
    x0, x1 = x0 - 0.05 * w + jitter[0], x1 + 0.05 * w + jitter[1]
    y0, y1 = y0 - 0.15 * h + jitter[2], y1 + 0.03 * h + jitter[3]
    x0, y0 = max(0, int(round(x0))), max(0, int(round(y0)))
    x1, y1 = min(size[0], int(round(x1))), min(size[1], int(round(y1)))
    return x0, y0, max(1, x1 - x0), max(1, y1 - y0)


def render_non_face(rng: np.random.Generator, image_size: int | tuple[int, int]) -> Image.Image:
    """An image with no face (AffectNet's ``non_face`` code): a background with random shapes.

    Example:
        >>> render_non_face(np.random.default_rng(0), 128).size
        (128, 128)
    """
    width_px, height_px = (image_size, image_size) if np.isscalar(image_size) else image_size
    image = _background(rng, (int(width_px), int(height_px)))
    draw = ImageDraw.Draw(image, "RGBA")
    side = min(image.size)
    for _ in range(int(rng.integers(3, 9))):
        colour = _rgba(rng.integers(0, 256, 3), rng.uniform(120, 255))
        cx, cy = rng.uniform(0, image.width), rng.uniform(0, image.height)
        r = rng.uniform(0.05, 0.3) * side
        kind = rng.integers(3)
        if kind == 0:
            draw.ellipse((cx - r, cy - r * rng.uniform(0.4, 1), cx + r, cy + r), fill=colour)
        elif kind == 1:
            draw.rectangle((cx - r, cy - r * rng.uniform(0.3, 1), cx + r, cy + r), fill=colour)
        else:
            pts = rng.uniform(-r, r, (int(rng.integers(3, 7)), 2)) + (cx, cy)
            draw.polygon(_xy(pts), fill=colour)
    return _finish(image, rng, None, True, (1.0, 6.0), (0.0, 0.3))


# --------------------------------------------------------------------------------------------------
# Truth and labels


def _soft_label(rng: np.random.Generator, dominant: int, mass: tuple[float, float]) -> np.ndarray:
    """A point of the 8-simplex with argmax ``dominant``: mass on it, a secondary emotion, a remainder."""
    w = np.zeros(K)
    w[dominant] = rng.uniform(*mass)
    rest = 1.0 - w[dominant]
    others = [k for k in range(K) if k != dominant]
    secondary = others[rng.integers(len(others))]
    # Cap the secondary below the dominant; the remainder (<= 60 % of rest <= 0.33) cannot overtake it.
    w[secondary] = min(rest * rng.uniform(0.4, 0.85), 0.9 * w[dominant])
    remainder = rest - w[secondary]
    tail = [k for k in others if k != secondary]
    w[tail] = remainder * rng.dirichlet(np.full(len(tail), 0.7))
    return w / w.sum()


def _name(seed: int, index: int) -> tuple[int, str]:
    """(subdirectory, file stem): AffectNet-like 56-hex names, a function of seed and index only."""
    digest = hashlib.sha224(f"affectnet-plus-sample:{seed}:{index}".encode()).hexdigest()
    return 1 + int(digest[:8], 16) % 32, digest


def _plan(config: SampleConfig) -> tuple[list[str], list[int | None]]:
    """Per-index split and forced non-emotion code (None = an emotion row), with exact counts."""
    n = config.n
    n_val = int(round(n * config.validation_fraction))
    n_unl = int(round(n * config.unlabeled_fraction))
    order = np.random.default_rng([config.seed, 0x5EED]).permutation(n)
    splits = ["train"] * n
    for i in order[:n_val]:
        splits[i] = "validation"
    for i in order[n_val : n_val + n_unl]:
        splits[i] = "unlabeled"
    codes: list[int | None] = [None] * n
    if config.layout == "affectnet" and config.non_emotion_fraction > 0:
        labelled = order[n_val + n_unl :].tolist() + order[:n_val].tolist()
        total = int(round(len(labelled) * config.non_emotion_fraction))
        counts = {c: int(math.floor(total * s)) for c, s in _NON_EMOTION_SHARES.items()}
        for c in sorted(_NON_EMOTION_SHARES, key=lambda c: -_NON_EMOTION_SHARES[c])[: total - sum(counts.values())]:
            counts[c] += 1
        pick = np.random.default_rng([config.seed, 0xC0DE]).permutation(labelled)[:total]
        it = iter(pick.tolist())
        for code in (NONE, UNCERTAIN, NON_FACE):
            for _ in range(counts[code]):
                codes[next(it)] = code
    return splits, codes


def _example(config: SampleConfig, index: int, split: str, code: int | None) -> dict:
    """Everything about image ``index``: its pixels, its written annotations and its truth."""
    rng = np.random.default_rng([config.seed, index])
    size = int(rng.integers(config.min_image_size, config.max_image_size + 1))
    height = size
    if rng.random() < 0.3:  # some images are a little non-square
        height = int(np.clip(round(size * rng.uniform(0.88, 1.12)), config.min_image_size, config.max_image_size))
    dims = (size, height)
    quality = int(rng.integers(config.jpeg_quality[0], config.jpeg_quality[1] + 1))
    ex = {"index": index, "split": split, "quality": quality, "size": dims}
    if code == NON_FACE:
        image = render_non_face(rng, dims)
        # A detector's false positive: a box somewhere, with mean-face landmarks fitted into it.
        side = rng.uniform(0.35, 0.7) * min(dims)
        x, y = rng.uniform(0, dims[0] - side), rng.uniform(0, dims[1] - side)
        box = (int(x), int(y), int(side), int(side))
        mean = MEAN_FACE_68[:, :2]
        pts = (mean - mean.min(axis=0)) / np.ptp(mean, axis=0) * (side * 0.9, side * 0.8) + (
            x + 0.05 * side,
            y + 0.15 * side,
        )
        ex.update(image=image, box=box, noisy_landmarks=pts, landmarks=None, soft_label=None, dominant=None)
        ex.update(pose=None, human_label=NON_FACE, valence=None, arousal=None, written_va=(VA_SENTINEL, VA_SENTINEL))
        return ex

    dominant = int(rng.choice(K, p=EMOTION_PRIOR))
    w = _soft_label(rng, dominant, config.dominant_mass)
    pose = (
        float(rng.uniform(-config.max_yaw, config.max_yaw)),
        float(rng.uniform(-config.max_pitch, config.max_pitch)),
        float(rng.uniform(-config.max_roll, config.max_roll)),
    )
    va = np.clip(w @ VALENCE_AROUSAL_PROTOTYPES + rng.normal(0, config.valence_arousal_noise, 2), -1, 1)
    # The annotator mostly perceives the mixture (sampling from it), occasionally picks at random.
    if rng.random() < config.annotator_noise:
        annotator = int(rng.integers(K))
    else:
        annotator = int(rng.choice(K, p=w))
    automatic = int(np.argmax(w + rng.normal(0, config.automatic_label_noise, K)))
    auto_va = np.clip(va + rng.normal(0, 0.1, 2), -1, 1)
    image, landmarks, box = render_face(
        rng,
        w,
        pose,
        dims,
        intensity=rng.uniform(*config.intensity),
        face_fraction=config.face_fraction,
        supersample=config.supersample,
        noise_sigma=config.noise_sigma,
        blur_radius=config.blur_radius,
    )
    face_size = max(box[2], box[3])
    noisy = landmarks + rng.normal(0, config.landmark_noise * face_size, landmarks.shape)
    if split == "unlabeled":
        label, written_va = automatic, tuple(auto_va)
    elif code is not None:
        label = code
        written_va = (VA_SENTINEL, VA_SENTINEL) if code == UNCERTAIN else tuple(va)
    else:
        label, written_va = annotator, tuple(va)
    ex.update(image=image, box=box, noisy_landmarks=noisy, landmarks=landmarks, soft_label=w, dominant=dominant)
    ex.update(pose=pose, human_label=label, valence=float(va[0]), arousal=float(va[1]), written_va=written_va)
    # Placeholder demographics for the release layout's meta-data.
    female = float(np.clip(rng.beta(0.6, 0.6), 0.01, 0.99))
    ethnicity = rng.dirichlet(np.full(5, 0.3))
    ex.update(age=float(np.clip(rng.normal(34, 12), 16, 80)), female=female, ethnicity=ethnicity)
    ex["pose_estimate"] = tuple(float(a) for a in np.asarray(pose) + rng.normal(0, 2.0, 3))
    return ex


# --------------------------------------------------------------------------------------------------
# Writing


def _jpeg(image: Image.Image, quality: int) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def _crop(image: Image.Image, box, size: int, margin: float) -> tuple[Image.Image, np.ndarray, float]:
    """The release-style square crop (same rule as ``builder.images.crop_face``): image, origin, scale."""
    x, y, w, h = box
    side = max(w, h) * (1 + 2 * margin)
    left, top = x + w / 2 - side / 2, y + h / 2 - side / 2
    ibox = (round(left), round(top), round(left + side), round(top + side))
    crop = image.crop(ibox).resize((size, size), Image.Resampling.LANCZOS)
    return crop, np.array(ibox[:2], dtype=np.float64), size / (ibox[2] - ibox[0])


def _r(value: float, digits: int = 4) -> float:
    return round(float(value), digits)


def _flat(points: np.ndarray, digits: int) -> list[float]:
    """Points as the release writes them: x0, y0, x1, y1, ..."""
    return [_r(v, digits) for v in np.asarray(points).reshape(-1)]


def release_soft_label(mixture) -> np.ndarray:
    """The release layout's soft label of a true mixture: 8 independent confidences, rounded to 4 decimals.

    Each emotion's confidence rises from its floor (``RELEASE_FLOORS``) to 1 with its share of the
    mixture relative to the dominant emotion's: the dominant one is near 1, the others near their
    floors, and they sum to about 2, like the release's (whose recipe is not public).

    Example:
        >>> soft = release_soft_label([0.6, 0.3, 0.1, 0, 0, 0, 0, 0])
        >>> soft.round(2).tolist(), bool(1 < soft.sum() < 3)
        ([1.0, 0.56, 0.22, 0.06, 0.06, 0.06, 0.06, 0.06], True)
    """
    w = np.asarray(mixture, dtype=np.float64)
    return np.round(RELEASE_FLOORS + (1 - RELEASE_FLOORS) * w / w.max(), 4)


def _points(points: np.ndarray, digits: int) -> list[list[float]]:
    return [[_r(x, digits), _r(y, digits)] for x, y in points]


def _rendered(config: SampleConfig, index: int, split: str, code: int | None) -> dict:
    """``_example`` with its pixels replaced by what is written: ``"jpeg"``, the encoded image (the
    full image, or in the release layout its face crop, whose frame is ``"crop_origin"`` and
    ``"crop_scale"``). A function of its arguments only, so any process may compute it."""
    ex = _example(config, index, split, code)
    image = ex.pop("image")
    if config.layout == "affectnet-plus":
        image, ex["crop_origin"], ex["crop_scale"] = _crop(image, ex["box"], config.crop_size, config.crop_margin)
    ex["jpeg"] = _jpeg(image, ex["quality"])
    return ex


def _rendered_task(task: tuple[SampleConfig, int, str, int | None]) -> dict:
    return _rendered(*task)


def _rendered_examples(config: SampleConfig, splits: list[str], codes: list[int | None], num_proc: int):
    """Yields ``_rendered`` for every index in index order, computed by ``num_proc`` processes (one:
    here, without a pool). Workers are spawned, not forked, so a caller's threads or loaded
    libraries cannot leave them in a broken state."""
    if num_proc == 1:
        for index in range(config.n):
            yield _rendered(config, index, splits[index], codes[index])
        return
    tasks = ((config, index, splits[index], codes[index]) for index in range(config.n))
    processes = min(num_proc, config.n)
    # Chunks small enough to keep every worker busy to the end, large enough to amortise the transfers.
    chunksize = max(1, min(8, config.n // (4 * processes)))
    with multiprocessing.get_context("spawn").Pool(processes) as pool:
        yield from pool.imap(_rendered_task, tasks, chunksize=chunksize)


def _clear(out: Path, layout: str, overwrite: bool) -> None:
    existing = [out / t for t in [*LAYOUT_FOLDERS[layout], GROUND_TRUTH, MANIFEST] if (out / t).exists()]
    if existing and not overwrite:
        raise FileExistsError(f"{out} already holds a sample ({existing[0].name}); pass overwrite=True to replace it")
    for path in existing:
        shutil.rmtree(path) if path.is_dir() else path.unlink()


def write_sample(
    out: str | Path, config: SampleConfig, progress: bool = False, overwrite: bool = False, num_proc: int = 1
) -> dict:
    """Writes the sample under `out` and returns a summary dict (counts per split, label agreement rate...).

    Args:
        out: output folder (created). Existing sample files there raise ``FileExistsError``
            unless ``overwrite``; only this layout's folders, ``ground_truth.jsonl`` and
            ``sample_manifest.json`` are replaced.
        config: what to render.
        progress: show a tqdm progress bar.
        overwrite: replace an existing sample in `out` (see `out`).
        num_proc: processes rendering the images (each image is a function of the seed and its
            index, so the files are byte-identical for any value; the main process writes them, in
            index order). 1 renders here, without a pool; more spawn a pool of
            ``min(num_proc, config.n)`` workers (spawned, not forked: a script that passes more
            than 1 calls this under ``if __name__ == "__main__":``). Not part of the config nor of
            the manifest.

    Raises:
        ValueError: ``num_proc`` is not an integer >= 1.
        FileExistsError: `out` holds a sample and not ``overwrite``.

    Returns:
        ``{"layout", "n", "seed", "splits": {split: count}, "human_labels": {name: count},
        "label_agreement": share of labelled emotion rows whose annotator label is the true
        dominant emotion, "automatic_label_agreement": the same for the unlabeled split,
        "non_emotion_rows", "subsets": {name: count} (release layout)}``.

    Example:
        >>> summary = write_sample("sample/", SampleConfig(n=100, seed=1))  # doctest: +SKIP
        >>> 0.55 < summary["label_agreement"] < 0.8  # doctest: +SKIP
        True
    """
    from tqdm.auto import tqdm

    if isinstance(num_proc, bool) or not isinstance(num_proc, int) or num_proc < 1:
        raise ValueError(f"num_proc must be an integer >= 1, got {num_proc!r}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    _clear(out, config.layout, overwrite)
    splits, codes = _plan(config)
    csv_rows: dict[str, list[list]] = {"train": [], "validation": [], "unlabeled": []}
    truth: list[dict] = []
    counts = {"splits": dict.fromkeys(("train", "validation", "unlabeled"), 0), "labels": [0] * len(HUMAN_LABELS)}
    agree = {"labelled": [0, 0], "unlabeled": [0, 0]}
    subset_counts = [0, 0, 0]
    examples = _rendered_examples(config, splits, codes, num_proc)
    for ex in tqdm(examples, total=config.n, disable=not progress, desc="rendering sample", unit="img"):
        index, split = ex["index"], ex["split"]
        subdir, stem = _name(config.seed, index)
        counts["splits"][split] += 1
        counts["labels"][ex["human_label"]] += 1
        if ex["dominant"] is not None and ex["human_label"] < K:
            key = "unlabeled" if split == "unlabeled" else "labelled"
            agree[key][0] += ex["human_label"] == ex["dominant"]
            agree[key][1] += 1
        if config.layout == "affectnet":
            images = "Automatically_Annotated_Images" if split == "unlabeled" else "Manually_Annotated_Images"
            relative = f"{subdir}/{stem}.jpg"
            path = out / images / relative
            landmarks = ex["landmarks"]
            va = ex["written_va"]
            csv_rows[split].append(
                [
                    relative,
                    *ex["box"],
                    ";".join(f"{v:.2f}" for v in ex["noisy_landmarks"].reshape(-1)),
                    ex["human_label"],
                    *(str(v) if v == VA_SENTINEL else f"{v:.4f}" for v in va),
                ]
            )
        else:
            part = release.PARTS[split]
            path = out / part / "images" / f"{stem}.jpg"
            origin, scale = ex["crop_origin"], ex["crop_scale"]
            landmarks = (ex["landmarks"] - origin) * scale
            noisy = (ex["noisy_landmarks"] - origin) * scale
            soft = release_soft_label(ex["soft_label"])
            subset = int(subsets(soft[None], np.array([ex["human_label"]]))[0])
            subset_counts[subset] += 1
            va = ex["written_va"]
            # The release's six race classes; their own stream, so the other layout's draws stay as they are.
            race_rng = np.random.default_rng([config.seed, index, 0x7ACE])
            race = race_rng.dirichlet(np.full(len(RELEASE_RACE_CLASSES), 0.3))
            annotation = {
                "human-label": ex["human_label"],
                "soft-label": [float(v) for v in soft],
                "subset": subset,
                "meta-data": {
                    "age": _r(ex["age"], 1),
                    "gender": {"female": _r(ex["female"]), "male": _r(1 - _r(ex["female"]))},
                    # the release's JSON calls ethnicity "race"
                    "race": dict(zip(RELEASE_RACE_CLASSES, _normalised(race))),
                    "pose": {k: _r(math.radians(a), 4) for k, a in zip(release.POSE_KEYS, ex["pose_estimate"])},
                    "valence": _r(va[0]),
                    "arousal": _r(va[1]),
                    "landmark-68": _flat(noisy, 2),
                    "landmark-29": _flat(noisy[list(LANDMARK_29)], 2),
                },
            }
            (path.parent.parent / "annotations").mkdir(parents=True, exist_ok=True)
            (path.parent.parent / "annotations" / f"{stem}.json").write_text(json.dumps(annotation), encoding="utf-8")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(ex["jpeg"])
        truth.append(
            {
                "image_id": path.relative_to(out).with_suffix("").as_posix(),
                "split": split,
                "human_label": ex["human_label"],
                "soft_label": None if ex["soft_label"] is None else [float(v) for v in ex["soft_label"]],
                "dominant": ex["dominant"],
                "head_pose": None if ex["pose"] is None else dict(zip(("yaw", "pitch", "roll"), ex["pose"])),
                "landmarks": None if landmarks is None else _points(landmarks, 3),
                "valence": None if ex["valence"] is None else _r(ex["valence"]),
                "arousal": None if ex["arousal"] is None else _r(ex["arousal"]),
            }
        )

    if config.layout == "affectnet":
        for split, csv_path in (
            ("train", "Manually_Annotated_file_lists/training.csv"),
            ("validation", "Manually_Annotated_file_lists/validation.csv"),
            ("unlabeled", "Automatically_Annotated_file_lists/automatically_annotated.csv"),
        ):
            (out / csv_path).parent.mkdir(parents=True, exist_ok=True)
            with open(out / csv_path, "w", newline="", encoding="utf-8") as f:
                writer = csv.writer(f, lineterminator="\n")
                writer.writerow(CSV_COLUMNS)
                writer.writerows(sorted(csv_rows[split], key=lambda row: row[0]))
    truth.sort(key=lambda row: row["image_id"])
    with open(out / GROUND_TRUTH, "w", encoding="utf-8", newline="\n") as f:
        for row in truth:
            f.write(json.dumps(row) + "\n")
    _write_manifest(out, config)

    summary = {
        "layout": config.layout,
        "n": config.n,
        "seed": config.seed,
        "splits": counts["splits"],
        "human_labels": {name: c for name, c in zip(HUMAN_LABELS, counts["labels"]) if c},
        "label_agreement": agree["labelled"][0] / max(1, agree["labelled"][1]),
        "automatic_label_agreement": agree["unlabeled"][0] / max(1, agree["unlabeled"][1]),
        "non_emotion_rows": sum(c is not None for c in codes),
    }
    if config.layout == "affectnet-plus":
        summary["subsets"] = dict(zip(("easy", "challenging", "difficult"), subset_counts))
    return summary


def _sample_files(root: Path, layout: str) -> dict[str, str]:
    """``{relative path: sha256}`` of every file of the sample ``layout`` under ``root`` (the layout's
    folders and ``ground_truth.jsonl``; not the manifest, nor anything else in ``root``)."""
    paths = [root / GROUND_TRUTH] if (root / GROUND_TRUTH).is_file() else []
    for top in LAYOUT_FOLDERS[layout]:
        if (root / top).is_dir():
            paths += [p for p in (root / top).rglob("*") if p.is_file() or p.is_symlink()]
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() if not p.is_symlink() else "link"
        for p in sorted(paths)
    }


def _signature(content: dict) -> str:
    canonical = json.dumps(content, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()
    return hmac.new(_MANIFEST_KEY, canonical, hashlib.sha256).hexdigest()


def _write_manifest(out: Path, config: SampleConfig) -> None:
    content = {
        "generator": MANIFEST_GENERATOR,
        "layout": config.layout,
        "config": dataclasses.asdict(config),
        "files": _sample_files(out, config.layout),
    }
    manifest = {**content, "signature": _signature(content)}
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n", encoding="utf-8")


def is_bundled_sample(root: str | Path, layout: str | None = None) -> bool:
    """Whether ``root`` holds the synthetic sample exactly as ``write_sample`` wrote it.

    True only when ``root/sample_manifest.json`` is a manifest of ``write_sample`` whose signature
    matches its content, and every file it lists (images, file lists or annotations,
    ``ground_truth.jsonl``) is on disk with the same sha256, with no other file in the layout's
    folders. A real source that holds a ``ground_truth.jsonl``, or a manifest copied or edited by
    hand, is not the sample. With ``layout``, the manifest's layout must be that one too (a build
    reads the folder in that format). For a CSV source ``root`` may be the CSV file: its folder is used.

    Example:
        >>> is_bundled_sample("demo/raw")  # doctest: +SKIP
        True
    """
    root = Path(root)
    if root.is_file():
        root = root.parent
    try:
        manifest = json.loads((root / MANIFEST).read_text(encoding="utf-8"))
        content = {k: manifest[k] for k in ("generator", "layout", "config", "files")}
        signature = manifest["signature"]
        if set(manifest) != {*content, "signature"} or not isinstance(signature, str):
            return False
        if content["generator"] != MANIFEST_GENERATOR or content["layout"] not in LAYOUTS:
            return False
        if not hmac.compare_digest(signature, _signature(content)):
            return False
        if layout is not None and layout != content["layout"]:
            return False
        return _sample_files(root, content["layout"]) == content["files"]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def _normalised(p: np.ndarray) -> list[float]:
    """Probabilities rounded to 4 decimals that still sum to 1 (the rounding error goes to the largest)."""
    q = [_r(v) for v in p]
    q[int(np.argmax(q))] = _r(q[int(np.argmax(q))] + 1.0 - sum(q))
    return q


def contact_sheet(out_png: str | Path, config: SampleConfig | None = None, n: int = 48, columns: int = 8) -> Path:
    """Renders the first ``n`` faces of the sample as 224 px crops in a grid, each captioned with its
    true dominant emotion and the annotator's label, and saves it as a PNG; returns the path.

    Example:
        >>> contact_sheet("/tmp/sample_grid.png", SampleConfig(seed=0))  # doctest: +SKIP
        PosixPath('/tmp/sample_grid.png')
    """
    config = config or SampleConfig()
    cell, caption = 224, 18
    rows = math.ceil(n / columns)
    sheet = Image.new("RGB", (columns * cell, rows * (cell + caption)), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default()
    for index in range(n):
        ex = _example(config, index, "train", None)
        face, _, _ = _crop(ex["image"], ex["box"], cell, config.crop_margin)
        x, y = (index % columns) * cell, (index // columns) * (cell + caption)
        sheet.paste(face, (x, y))
        dominant, label = ex["dominant"], ex["human_label"]
        text = f"{EMOTIONS[dominant]} {ex['soft_label'][dominant]:.2f} (ann: {HUMAN_LABELS[label]})"
        draw.text((x + 4, y + cell + 3), text, fill=(0, 0, 0), font=font)
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out_png)
    return out_png
