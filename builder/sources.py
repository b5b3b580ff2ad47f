"""Source readers: raw AffectNet, the official AffectNet+ release, an image folder, a ``path,label`` CSV.

Each reader streams one record type per split: a ``Record`` (a row that points at an image and
carries the annotations the source has, still in source pixel coordinates) or a ``Rejection`` (a row
that cannot be used, with its reason). Readers only parse text and list files; decoding and cropping
happen in ``make_example`` so that it can run in worker processes.

Rejection details end up in the published ``rejects.jsonl``, so they never hold the build machine's
absolute paths: every detail a reader yields, and every ``Rejected`` that ``make_example`` raises, has
the source root taken out of it (``source_relative``), and names paths relative to the source.

Example:
    >>> from core.schema import AffectNetPlusConfig
    >>> from builder.sources import open_source
    >>> reader = open_source("AffectNet/", AffectNetPlusConfig(source_format="affectnet"))  # doctest: +SKIP
    >>> for item in reader.records("train"): ...  # doctest: +SKIP
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import hashlib
import itertools
import json
import math
import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from builder import release
from builder.annotators import detect_face
from builder.images import Rejected, crop_face, read_image_file
from core.schema import (
    EMOTIONS,
    ETHNICITY_CLASSES,
    HUMAN_LABELS,
    NUM_LANDMARKS,
    RELEASE_ETHNICITY_CLASSES,
    SUBSETS,
    AffectNetPlusConfig,
)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}
AFFECTNET_COLUMNS = (
    "subDirectory_filePath",
    "face_x",
    "face_y",
    "face_width",
    "face_height",
    "facial_landmarks",
    "expression",
    "valence",
    "arousal",
)
# Point columns, in source image pixels in a Record and in crop pixels in a row.
LANDMARK_COLUMNS = ("landmarks", "landmarks_29")
# AffectNet writes -2 for valence/arousal of uncertain and non-face images: a null, not an error.
AFFECTNET_VA_SENTINEL = -2.0


@dataclass
class Record:
    """One usable source row: where its image is and what the source says about it.

    ``annotations`` holds schema columns known from the source (``human_label``, ``valence``, ...);
    ``landmarks`` and ``landmarks_29`` there are in the source image's pixels until ``make_example`` maps them.
    """

    image_id: str
    split: str
    origin: str
    row: int | None
    image_path: Path
    face_box: tuple[float, float, float, float] | None = None
    annotations: dict = field(default_factory=dict)
    # The reader's root: make_example writes the paths of its rejections relative to it.
    source_root: str = ""


@dataclass
class Rejection:
    """A row that did not become an example: where it came from, why, and its image id if known."""

    origin: str
    row: int | None
    reason: str
    detail: str = ""
    image_id: str | None = None

    def to_json(self) -> dict:
        return {
            "source": self.origin,
            "row": self.row,
            "image_id": self.image_id,
            "reason": self.reason,
            "detail": self.detail,
        }


def source_relative(text: str, root) -> str:
    """``text`` with the absolute path of ``root`` (as given and with its links resolved) taken out:
    ``/data/AffectNet/Manually_Annotated_Images/1/a.jpg: ...`` becomes ``Manually_Annotated_Images/1/a.jpg: ...``
    for ``root="/data/AffectNet"``, and ``root`` itself becomes ``.``.

    Example:
        >>> source_relative("/data/src/a/b.jpg: cannot identify image file '/data/src/a/b.jpg'", "/data/src")
        "a/b.jpg: cannot identify image file 'a/b.jpg'"
    """
    if not text or not root:
        return text
    root = os.path.abspath(os.fspath(root))
    if root == os.sep:
        return text
    for prefix in sorted({root, os.path.realpath(root)}, key=len, reverse=True):
        text = text.replace(prefix + os.sep, "")
        text = re.sub(re.escape(prefix) + r"(?![\w.-])", ".", text)  # the root itself, not a sibling's name
    return text


class _Reader:
    """What every reader shares: ``records`` yields ``_records`` with paths relative to ``self.root``."""

    root: Path

    def _records(self, split: str) -> Iterator[Record | Rejection]:
        raise NotImplementedError

    def records(self, split: str) -> Iterator[Record | Rejection]:
        """The rows of ``split``: ``Record``s and ``Rejection``s, in source order."""
        root = str(self.root)
        for item in self._records(split):
            if isinstance(item, Rejection):
                item = dataclasses.replace(item, detail=source_relative(item.detail, root))
            else:
                item.source_root = root
            yield item


@functools.lru_cache(maxsize=65536)
def _real_dir(path: str) -> str:
    # AffectNet has ~1M rows in ~1k folders: resolve each folder's symlinks once, not once per row.
    return os.path.realpath(path)


def resolve_inside(root: Path, relative: str) -> Path:
    """``root / relative``, or ``Rejected("path_escapes_root")`` if it resolves outside ``root``.

    Symbolic links count: a link (of the file or of any folder on the way) that points outside
    ``root`` is an escape too.
    """
    if not relative or "\x00" in relative:
        raise Rejected("malformed_row", f"bad image path {relative!r}")
    relative = relative.replace("\\", "/")
    if os.path.isabs(relative):
        # the path itself is not repeated: it names a place on some machine, not in the source
        raise Rejected(
            "path_escapes_root", f"an absolute path, not one inside the source (file {os.path.basename(relative)!r})"
        )
    real_root = _real_dir(str(root))
    folder, name = os.path.split(os.path.join(real_root, relative))
    resolved = os.path.join(_real_dir(folder), name)
    if os.path.islink(resolved):
        resolved = os.path.realpath(resolved)
    if os.path.commonpath([real_root, resolved]) != real_root or resolved == real_root:
        raise Rejected("path_escapes_root", relative)
    return Path(resolved)


def _image_id(root: Path, path: Path) -> str:
    """Source-relative path without extension, with forward slashes: the stable key of a row."""
    return path.relative_to(root.resolve()).with_suffix("").as_posix()


def _finite(text: str, what: str) -> float:
    try:
        value = float(text)
    except (TypeError, ValueError):
        raise Rejected("malformed_row", f"{what} is not a number: {text!r}") from None
    if not math.isfinite(value):
        raise Rejected("malformed_row", f"{what} is not finite: {text!r}")
    return value


def _label(value, what: str = "label") -> int:
    try:
        code = int(str(value).strip())
    except ValueError:
        raise Rejected("malformed_row", f"{what} is not an integer: {value!r}") from None
    if not 0 <= code < len(HUMAN_LABELS):
        raise Rejected("label_out_of_range", f"{what} {code} not in 0..{len(HUMAN_LABELS) - 1}")
    return code


def _valence_arousal(value: float | None, what: str) -> float | None:
    if value is None or value == AFFECTNET_VA_SENTINEL:
        return None
    if not -1.0 <= value <= 1.0:
        raise Rejected("valence_arousal_out_of_range", f"{what} {value} not in [-1, 1]")
    return value


def _landmarks(values, what: str = "landmarks") -> np.ndarray:
    """68 (x, y) points from a flat list of 136 numbers or a list of 68 pairs."""
    try:
        points = np.asarray(values, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError):
        raise Rejected("malformed_row", f"{what} are not numbers") from None
    if points.size != 2 * NUM_LANDMARKS:
        raise Rejected("malformed_row", f"{what}: expected {2 * NUM_LANDMARKS} numbers, got {points.size}")
    if not np.isfinite(points).all():
        raise Rejected("malformed_row", f"{what} contain NaN or inf")
    return points.reshape(NUM_LANDMARKS, 2)


class AffectNetReader(_Reader):
    """Raw AffectNet: ``Manually_Annotated_file_lists/{training,validation}.csv`` (+ images in
    ``Manually_Annotated_Images/``) and the automatically annotated part, which becomes ``unlabeled``."""

    columns = ("image_id", "image", "human_label", "valence", "arousal", "landmarks")
    ethnicity_classes = ETHNICITY_CLASSES
    PARTS = {
        "train": ("Manually_Annotated_file_lists/training.csv", "Manually_Annotated_Images"),
        "validation": ("Manually_Annotated_file_lists/validation.csv", "Manually_Annotated_Images"),
        "unlabeled": (
            "Automatically_Annotated_file_lists/automatically_annotated.csv",
            "Automatically_Annotated_Images",
        ),
    }

    def __init__(self, root, config: AffectNetPlusConfig):
        self.root = Path(root).resolve()
        self.config = config
        if not any((self.root / csv_path).is_file() for csv_path, _ in self.PARTS.values()):
            raise FileNotFoundError(
                f"{root} is not a raw AffectNet folder: none of {', '.join(p for p, _ in self.PARTS.values())} exists"
            )

    def splits(self) -> list[str]:
        return [split for split, (csv_path, _) in self.PARTS.items() if (self.root / csv_path).is_file()]

    def _rows(self, split: str) -> Iterator[tuple[int, list[str]]]:
        with open(self.root / self.PARTS[split][0], newline="", encoding="utf-8", errors="replace") as f:
            for line_number, row in enumerate(csv.reader(f), start=1):
                if line_number == 1 and row and row[0].strip() == AFFECTNET_COLUMNS[0]:
                    continue  # header (AffectNet's validation.csv ships without one)
                yield line_number, row

    def count(self, split: str) -> int:
        """Rows ``records(split)`` will yield, without parsing them."""
        return sum(1 for _ in self._rows(split))

    def _records(self, split: str) -> Iterator[Record | Rejection]:
        csv_path, images_dir = self.PARTS[split]
        images_root = self.root / images_dir
        for line_number, row in self._rows(split):
            if not row or not any(cell.strip() for cell in row):
                yield Rejection(csv_path, line_number, "malformed_row", "empty line")
                continue
            try:
                yield self._record(row, csv_path, line_number, split, images_root)
            except Rejected as err:
                yield Rejection(csv_path, line_number, err.reason, err.detail)

    def _record(self, row: list[str], origin: str, line_number: int, split: str, images_root: Path) -> Record:
        if len(row) != len(AFFECTNET_COLUMNS):
            raise Rejected("malformed_row", f"expected {len(AFFECTNET_COLUMNS)} fields, got {len(row)}")
        values = dict(zip(AFFECTNET_COLUMNS, row))
        path = resolve_inside(images_root, values["subDirectory_filePath"].strip())
        box = tuple(_finite(values[k], k) for k in ("face_x", "face_y", "face_width", "face_height"))
        if box[2] <= 0 or box[3] <= 0:
            raise Rejected("malformed_row", f"face box {box} has no area")
        try:
            landmarks = np.array([v for v in values["facial_landmarks"].split(";") if v.strip()], dtype=np.float64)
        except ValueError:
            raise Rejected("malformed_row", "landmarks are not numbers") from None
        landmarks = _landmarks(landmarks)
        annotations = {
            "human_label": _label(values["expression"], "expression"),
            "valence": _valence_arousal(_finite(values["valence"], "valence"), "valence"),
            "arousal": _valence_arousal(_finite(values["arousal"], "arousal"), "arousal"),
            "landmarks": landmarks,
        }
        return Record(_image_id(self.root, path), split, origin, line_number, path, box, annotations)


class AffectNetPlusReader(_Reader):
    """The official AffectNet+ release: ``human_annotated/{train_set,validation_set}`` and
    ``no_human_annotated``, each with ``images/`` and one JSON per image in ``annotations/``
    (``builder.release`` describes the format).

    Every value is kept as the release gives it: ``soft-label`` (8 independent confidences, never
    renormalised), ``subset``, the 68 and 29 landmarks. ``pose`` is read in ``config.pose_unit``
    (the release's is radians) and stored in degrees; ``race`` becomes ``ethnicity`` under snake_case
    class names (``middle_eastern``, ``latino_hispanic``). A JSON ``null`` for a meta-data value (or
    for ``subset``) means the release has none: the column is null for that row. Anything else that
    is not as the format says (a missing key, a soft label of 459, a NaN, 134 landmark numbers) makes
    the row a ``malformed_annotation`` whose detail names the key and the value; nothing is repaired.
    """

    columns = (
        "image_id", "image", "human_label", "soft_label", "subset", "valence", "arousal", "landmarks",
        "landmarks_29", "head_pose", "age", "gender", "ethnicity",
    )  # fmt: skip
    PARTS = release.PARTS
    # How many annotations are read to learn the race classes, and how many race blocks are enough.
    CLASS_SCAN_FILES, CLASS_SCAN_BLOCKS = 256, 8

    def __init__(self, root, config: AffectNetPlusConfig):
        self.root = Path(root).resolve()
        self.config = config
        if not self.splits():
            raise FileNotFoundError(
                f"{root} is not an AffectNet+ release: none of "
                f"{', '.join(p + '/annotations' for p in self.PARTS.values())} exists"
            )
        self.ethnicity_classes = self._ethnicity_classes()

    def splits(self) -> list[str]:
        return [split for split, part in self.PARTS.items() if (self.root / part / "annotations").is_dir()]

    def _annotation_files(self, split: str) -> list[Path]:
        # The release numbers its files: 0, 1, 2, ..., 10 in that order, not as strings sort.
        return sorted((self.root / self.PARTS[split] / "annotations").glob("*.json"), key=lambda p: _file_order(p.stem))

    def _ethnicity_classes(self) -> tuple[str, ...]:
        """The race classes: the release's six (in its order), unless the first race blocks found hold
        another set (a build with another ethnicity model, written in the release layout)."""
        seen: dict[tuple[str, ...], int] = {}
        paths = (p for split in self.splits() for p in self._annotation_files(split))
        for path in itertools.islice(paths, self.CLASS_SCAN_FILES):
            try:
                race = json.loads(path.read_text(encoding="utf-8"))["meta-data"]["race"]
            except (OSError, ValueError, KeyError, TypeError):
                continue
            if not isinstance(race, dict):
                continue
            names = tuple(_class_name(name) for name in race)
            if set(names) == set(RELEASE_ETHNICITY_CLASSES):
                return RELEASE_ETHNICITY_CLASSES
            if names and len(set(names)) == len(names):
                seen[names] = seen.get(names, 0) + 1
                if sum(seen.values()) >= self.CLASS_SCAN_BLOCKS:
                    break
        return max(seen, key=seen.get) if seen else RELEASE_ETHNICITY_CLASSES

    def _images(self, split: str) -> dict[str, Path]:
        folder = self.root / self.PARTS[split] / "images"
        if not folder.is_dir():
            return {}
        return {p.stem: p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES}

    def count(self, split: str) -> int:
        """Rows ``records(split)`` will yield: one per annotation, one per image without one."""
        annotations = {p.stem for p in self._annotation_files(split)}
        return len(annotations) + len(set(self._images(split)) - annotations)

    def _records(self, split: str) -> Iterator[Record | Rejection]:
        images = self._images(split)
        for annotation_path in self._annotation_files(split):
            origin = annotation_path.relative_to(self.root).as_posix()
            image_path = images.pop(annotation_path.stem, None)
            if image_path is None:
                yield Rejection(origin, None, "missing_file", f"no image named {annotation_path.stem}.* in images/")
                continue
            try:
                yield self._record(annotation_path, image_path, origin, split)
            except Rejected as err:
                yield Rejection(origin, None, err.reason, err.detail, _image_id(self.root, image_path))
        for stem, image_path in sorted(images.items(), key=lambda item: _file_order(item[0])):
            origin = image_path.relative_to(self.root).as_posix()  # images without an annotation are rows too
            yield Rejection(
                origin, None, "missing_annotation", f"no annotations/{stem}.json", _image_id(self.root, image_path)
            )

    def _record(self, annotation_path: Path, image_path: Path, origin: str, split: str) -> Record:
        try:
            text = annotation_path.read_text(encoding="utf-8")
        except OSError as err:
            raise Rejected("malformed_annotation", f"{type(err).__name__}: {err}") from None
        except UnicodeDecodeError as err:
            raise Rejected("malformed_annotation", f"not UTF-8 text: {err}") from None
        try:
            data = json.loads(text)
        except ValueError as err:
            raise Rejected("malformed_annotation", f"malformed JSON: {err}") from None
        annotations = read_release_annotation(data, self.ethnicity_classes, self.config.pose_unit)
        return Record(_image_id(self.root, image_path), split, origin, None, image_path, None, annotations)


def _file_order(stem: str) -> tuple:
    return (0, int(stem), stem) if stem.isdigit() else (1, 0, stem)


def _bad(detail: str) -> Rejected:
    return Rejected("malformed_annotation", detail)


_MISSING = object()


def _key(obj: dict, key: str, path: str):
    """``obj[key]``, where ``obj`` is the object at ``path``; a missing key is a rejection naming its path."""
    value = obj.get(key, _MISSING)
    if value is _MISSING:
        raise _bad(f"missing key {path}{'.' if path else ''}{key}")
    return value


def _object(value, path: str) -> dict:
    if not isinstance(value, dict):
        raise _bad(f"{path} = {_shown(value)} is not an object")
    return value


def _shown(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _number(value, path: str, low: float | None = None, high: float | None = None) -> float:
    """A finite JSON number (``low <= value <= high`` when given)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _bad(f"{path} = {_shown(value)} is not a number")
    value = float(value)
    if not math.isfinite(value):
        raise _bad(f"{path} = {value} is not finite")
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = f"in [{low:g}, {high:g}]" if low is not None and high is not None else f">= {low:g}"
        raise _bad(f"{path} = {value!r} not {bounds}")
    return value


def _numbers(value, path: str, count: int, low: float | None = None, high: float | None = None) -> np.ndarray:
    """``count`` finite numbers: a flat list (the release's form), or a list of (x, y) pairs."""
    if not isinstance(value, list):
        raise _bad(f"{path} = {_shown(value)} is not a list")
    if value and all(isinstance(v, list) and len(v) == 2 for v in value):
        value = [v for pair in value for v in pair]
    if len(value) != count:
        raise _bad(f"{path}: expected {count} numbers, got {len(value)}")
    return np.array([_number(v, f"{path}[{i}]", low, high) for i, v in enumerate(value)])


def _probabilities(value, path: str, names: tuple[str, ...]) -> dict[str, float]:
    """An object of probabilities in [0, 1] whose keys are exactly ``names``."""
    value = _object(value, path)
    missing = [name for name in names if name not in value]
    if missing:
        raise _bad(f"missing key {path}.{missing[0]}")
    extra = sorted(set(value) - set(names))
    if extra:
        raise _bad(f"{path}: unexpected key {extra[0]!r} (expected {', '.join(names)})")
    return {name: _number(value[name], f"{path}.{name}", 0.0, 1.0) for name in names}


def _race(value, path: str, classes: tuple[str, ...]) -> dict[str, float]:
    value = _object(value, path)
    names = {_class_name(name): name for name in value}
    if len(names) != len(value) or set(names) != set(classes):
        raise _bad(f"{path}: classes {sorted(value)} are not the expected {list(classes)}")
    return {name: _number(value[names[name]], f"{path}.{names[name]}", 0.0, 1.0) for name in classes}


def _pose(value, path: str, unit: str) -> dict[str, float]:
    value = _object(value, path)
    bound, shown = (math.pi, "pi") if unit == "radians" else (180.0, "180")
    angles = [_number(_key(value, k, path), f"{path}.{k}") for k in release.POSE_KEYS]
    for key, angle in zip(release.POSE_KEYS, angles):
        if abs(angle) > bound:  # most likely a pose_unit that is not the source's
            other = "degrees" if unit == "radians" else "radians"
            raise _bad(f"{path}.{key} = {angle!r} not in [-{shown}, {shown}] {unit} (is the pose in {other}? "
                       "see pose_unit)")  # fmt: skip
    if unit == "radians":
        angles = [math.degrees(a) for a in angles]
    return dict(zip(release.POSE_KEYS, angles))


def _release_va(value, path: str) -> float | None:
    if value is None:
        return None
    value = _number(value, path)
    if value == release.VA_SENTINEL:
        return None
    return _number(value, path, -1.0, 1.0)


def read_release_annotation(data, ethnicity_classes: tuple[str, ...], pose_unit: str = "radians") -> dict:
    """One release annotation (parsed JSON) -> schema columns, or ``Rejected("malformed_annotation")``.

    Landmarks stay in the annotation's pixels (``make_example`` maps them to the crop's); ``null``
    meta-data values (and a ``null`` subset: -1) mean "not available".

    Example:
        >>> data = {"human-label": 1, "soft-label": [0.1, 0.9, 0.2, 0.1, 0.1, 0.1, 0.1, 0.3], "subset": 0,
        ...         "meta-data": {k: None for k in release.META_KEYS}}
        >>> read_release_annotation(data, RELEASE_ETHNICITY_CLASSES)["soft_label"][1]
        0.9
        >>> data["soft-label"][3] = 459
        >>> read_release_annotation(data, RELEASE_ETHNICITY_CLASSES)
        Traceback (most recent call last):
        builder.images.Rejected: malformed_annotation: soft-label[3] = 459.0 not in [0, 1]
    """
    data = _object(data, "the annotation")
    label, soft, subset, meta = (_key(data, key, "") for key in release.KEYS)
    if isinstance(label, float) and label.is_integer():
        label = int(label)
    if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < len(HUMAN_LABELS):
        raise _bad(f"human-label = {_shown(label)} not in 0..{len(HUMAN_LABELS) - 1}")
    soft_label = _numbers(soft, "soft-label", len(EMOTIONS), 0.0, 1.0)
    if subset is not None:
        if isinstance(subset, float) and subset.is_integer():
            subset = int(subset)
        if isinstance(subset, bool) or not isinstance(subset, int) or not 0 <= subset < len(SUBSETS):
            raise _bad(f"subset = {_shown(subset)} not in 0..{len(SUBSETS) - 1}")
    meta = _object(meta, "meta-data")
    values = {key: _key(meta, key, "meta-data") for key in release.META_KEYS}

    def given(key, parse, *args):
        return None if values[key] is None else parse(values[key], f"meta-data.{key}", *args)

    landmarks = {key: given(key, _numbers, count) for key, count in release.LANDMARK_KEYS.items()}
    return {
        "human_label": label,
        "soft_label": soft_label.tolist(),
        "subset": -1 if subset is None else subset,
        "valence": _release_va(values["valence"], "meta-data.valence"),
        "arousal": _release_va(values["arousal"], "meta-data.arousal"),
        "landmarks": None if landmarks["landmark-68"] is None else landmarks["landmark-68"].reshape(-1, 2),
        "landmarks_29": None if landmarks["landmark-29"] is None else landmarks["landmark-29"].reshape(-1, 2),
        "head_pose": given("pose", _pose, pose_unit),
        "age": given("age", _number, 0.0),
        "gender": given("gender", _probabilities, release.GENDER_KEYS),
        "ethnicity": given("race", _race, tuple(ethnicity_classes)),
    }


def _class_name(name: str) -> str:
    return str(name).strip().lower().replace(" ", "_").replace("-", "_")


def _label_from_name(name: str) -> int:
    """An emotion folder/CSV label: an AffectNet code (``1``) or a name (``happy``, ``Happy``)."""
    text = str(name).strip().lower().replace(" ", "_").replace("-", "_")
    if text in HUMAN_LABELS:
        return HUMAN_LABELS.index(text)
    aliases = {"happiness": 1, "sadness": 2, "surprised": 3, "fearful": 4, "disgusted": 5, "angry": 6}
    if text in aliases:
        return aliases[text]
    return _label(text)


class ImageFolderReader(_Reader):
    """Another FER dataset as ``ROOT/<split>/<emotion name or code>/*.jpg`` (splits: train,
    validation (or val), unlabeled). Each image is taken whole as the face."""

    columns = ("image_id", "image", "human_label")
    ethnicity_classes = ETHNICITY_CLASSES
    SPLIT_DIRS = {"train": ("train",), "validation": ("validation", "val"), "unlabeled": ("unlabeled",)}

    def __init__(self, root, config: AffectNetPlusConfig):
        self.root = Path(root).resolve()
        self.config = config
        if not self.splits():
            raise FileNotFoundError(f"{root} has none of the split folders train/, validation/, unlabeled/")

    def _split_dir(self, split: str) -> Path | None:
        return next((self.root / d for d in self.SPLIT_DIRS[split] if (self.root / d).is_dir()), None)

    def splits(self) -> list[str]:
        return [split for split in self.SPLIT_DIRS if self._split_dir(split) is not None]

    def count(self, split: str) -> int:
        return sum(1 for _ in self.records(split))  # listing only: cheap

    def _records(self, split: str) -> Iterator[Record | Rejection]:
        split_dir = self._split_dir(split)
        for label_dir in sorted(p for p in split_dir.iterdir() if p.is_dir()):
            try:
                label = _label_from_name(label_dir.name)
            except Rejected as err:
                for path in _image_files(label_dir):
                    yield Rejection(
                        path.relative_to(self.root).as_posix(), None, err.reason, f"folder {label_dir.name!r}"
                    )
                continue
            for path in _image_files(label_dir):
                origin = path.relative_to(self.root).as_posix()
                resolved = path.resolve()
                if not resolved.is_relative_to(self.root):  # a symlink pointing out of the source
                    yield Rejection(origin, None, "path_escapes_root", f"{origin} links outside the source")
                    continue
                image_id = _image_id(self.root, path.parent.resolve() / path.name)
                yield Record(image_id, split, origin, None, resolved, None, {"human_label": label})


def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and not p.is_dir())


class CsvReader(_Reader):
    """Another FER dataset as a CSV with columns ``path,label`` and optionally ``split`` (default
    ``train``); paths are relative to the CSV's folder, labels are names or AffectNet codes."""

    columns = ("image_id", "image", "human_label")
    ethnicity_classes = ETHNICITY_CLASSES

    def __init__(self, source, config: AffectNetPlusConfig):
        self.csv_path = Path(source).resolve()
        if not self.csv_path.is_file():
            raise FileNotFoundError(f"{source} is not a CSV file")
        self.root = self.csv_path.parent
        self.config = config
        with open(self.csv_path, newline="", encoding="utf-8") as f:
            header = next(csv.reader(f), [])
        if not {"path", "label"} <= set(header):
            raise ValueError(f"{source} must have a header with columns path,label[,split]; got {header}")

    def _rows(self) -> Iterator[tuple[int, dict]]:
        with open(self.csv_path, newline="", encoding="utf-8", errors="replace") as f:
            yield from enumerate(csv.DictReader(f), start=2)

    def splits(self) -> list[str]:
        found = {(row.get("split") or "train").strip() for _, row in self._rows()}
        return [split for split in ("train", "validation", "unlabeled") if split in found] + sorted(
            found - {"train", "validation", "unlabeled"}
        )

    def count(self, split: str) -> int:
        return sum(1 for _ in self.records(split))  # text only: cheap

    def _records(self, split: str) -> Iterator[Record | Rejection]:
        for line_number, row in self._rows():
            if (row.get("split") or "train").strip() != split:
                continue
            origin = self.csv_path.name
            try:
                if None in row or None in row.values():
                    raise Rejected("malformed_row", "wrong number of fields")
                path = resolve_inside(self.root, row["path"].strip())
                label = _label_from_name(row["label"])
            except Rejected as err:
                yield Rejection(origin, line_number, err.reason, err.detail)
                continue
            yield Record(_image_id(self.root, path), split, origin, line_number, path, None, {"human_label": label})


def deduplicated(items: Iterable[Record | Rejection], seen: set[str]) -> Iterator[Record | Rejection]:
    """Second and later rows with an already used ``image_id`` become ``duplicate_image_id`` rejections.

    Rows with other ids but the same image bytes are caught once their files are read: ``duplicate_image``.
    """
    for item in items:
        if isinstance(item, Record):
            if item.image_id in seen:
                item = Rejection(item.origin, item.row, "duplicate_image_id", item.image_id, item.image_id)
            else:
                seen.add(item.image_id)
        yield item


def duplicate_image(record: Record, example: dict, first: dict[str, str]) -> Rejection | None:
    """A ``duplicate_image`` rejection of ``record`` (detail: the kept row's image_id) when an earlier row's
    image file had the same bytes; otherwise None, and ``record`` becomes the first of its bytes.

    ``example`` is ``make_example``'s row of ``record`` (its ``_sha256``); ``first`` maps each sha256 to the
    image_id of the first row that had it. Called in source order, across splits, the first row wins: a
    fold is a hash of ``image_id`` (``docs/method.md`` §3), so one image under two ids could sit in two
    folds, and an expert would score an image it trained on.
    """
    digest = example["_sha256"]
    kept = first.setdefault(digest, record.image_id)
    if kept == record.image_id:
        return None
    return Rejection(record.origin, record.row, "duplicate_image", kept, record.image_id)


READERS = {
    "affectnet": AffectNetReader,
    "affectnet-plus": AffectNetPlusReader,
    "imagefolder": ImageFolderReader,
    "csv": CsvReader,
}


def open_source(source, config: AffectNetPlusConfig):
    """The reader for ``config.source_format`` over ``source`` (a folder, or a CSV file)."""
    if not os.path.exists(source):
        raise FileNotFoundError(f"source {source} does not exist")
    return READERS[config.source_format](source, config)


def make_example(record: Record, config: AffectNetPlusConfig, columns) -> dict:
    """Decodes and crops a record's image and returns its row (only ``columns``, plus ``_sha256``, the
    image file's sha256, and ``_info`` when there is a note), or raises ``Rejected`` (whose detail names
    the image relative to ``record.source_root``).

    Every landmark column (``landmarks``, ``landmarks_29``) is mapped from the source image's pixels
    to the crop's, through the same crop as the pixels.
    """
    # One array through crop_face, so that both point sets go through exactly the same mapping.
    point_sets = {name: np.asarray(record.annotations[name], np.float64).reshape(-1, 2)
                  for name in LANDMARK_COLUMNS if record.annotations.get(name) is not None}  # fmt: skip
    landmarks = np.concatenate(list(point_sets.values())) if point_sets else None
    face_box, faces = record.face_box, None
    try:
        data = read_image_file(record.image_path)  # read once: hashed here, decoded from memory below
        if face_box is None and config.detect_faces:
            face_box, faces = detect_face(record.image_path, config.max_image_pixels)
        jpeg, crop_landmarks = crop_face(
            record.image_path,
            face_box,
            landmarks,
            face_size=config.face_size,
            crop_margin=config.crop_margin,
            jpeg_quality=config.jpeg_quality,
            max_image_pixels=config.max_image_pixels,
            data=data,
        )
    except Rejected as err:  # decoding errors name the file: relative to the source, never absolute
        root = record.source_root or os.path.dirname(os.path.abspath(record.image_path))
        raise Rejected(err.reason, source_relative(err.detail, root)) from None
    example = {name: record.annotations.get(name) for name in columns}
    example["image_id"] = record.image_id
    example["image"] = {"bytes": jpeg, "path": None}
    # The source file's bytes, not the crop's: the same file is the same photo whatever the crop settings
    # or face box, and would leak across folds under any of them (``duplicate_image``).
    example["_sha256"] = hashlib.sha256(data).hexdigest()
    start = 0
    for name, points in point_sets.items():
        if name in columns:
            example[name] = crop_landmarks[start : start + len(points)]
        start += len(points)
    if faces and faces > 1:  # the largest face was used; the build notes how many there were
        example["_info"] = {"faces_detected": faces}
    return example
