"""The official AffectNet+ release format, and ``export_release``, which writes any build in it.

The release is three part folders, each with ``images/<i>.jpg`` (224 px face crops, JPEG) and
``annotations/<i>.json``, numbered from 0 (``PARTS``)::

    human_annotated/train_set/{images,annotations}/      the train split
    human_annotated/validation_set/{images,annotations}/ the validation split
    no_human_annotated/{images,annotations}/             the unlabeled split

One annotation::

    {"human-label": 1,                      AffectNet code 0-10
     "soft-label": [0.07, 0.93, ...],       8 independent per-emotion confidences in [0, 1] (no sum to 1)
     "subset": 0,                           0 easy, 1 challenging, 2 difficult
     "meta-data": {"age": 31.2, "gender": {"female": .., "male": ..},
                   "race": {"asian": .., "indian": .., "black": .., "white": .., "middle eastern": ..,
                            "latino hispanic": ..},
                   "pose": {"yaw": .., "pitch": .., "roll": ..},     radians
                   "valence": .., "arousal": ..,                     -2 where there is none
                   "landmark-68": [x0, y0, x1, y1, ...],             136 numbers, crop pixels
                   "landmark-29": [...]}}                            58 numbers, crop pixels

``builder.sources.AffectNetPlusReader`` reads it; ``export_release`` writes a built folder in it,
with ``image_ids.csv`` beside the parts (the release itself has no way back to the build's rows).
A ``null`` where a value belongs means "not available" to the reader: an export writes it for the
metadata a build does not have (and for ``subset`` where the build has none, human labels 8-10).

Example:
    >>> from builder.release import export_release
    >>> export_release("affectnet_plus/", "affectnet_plus_release/")  # doctest: +SKIP
    {'rows': {'train': 140, 'validation': 20, 'unlabeled': 40}, 'id_map': 'image_ids.csv'}
"""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
from pathlib import Path

import pyarrow.parquet as pq

from core.schema import (
    EMOTIONS,
    NUM_LANDMARKS,
    NUM_LANDMARKS_29,
    RELEASE_ETHNICITY_CLASSES,
    RELEASE_RACE_CLASSES,
    SPLITS,
    WORK_DIR,
    config_files,
)

__all__ = ["ID_MAP", "PARTS", "RACE_SPELLING", "export_release", "release_annotation"]

# split -> the release's part folder
PARTS = {
    "train": "human_annotated/train_set",
    "validation": "human_annotated/validation_set",
    "unlabeled": "no_human_annotated",
}
IMAGES, ANNOTATIONS = "images", "annotations"
KEYS = ("human-label", "soft-label", "subset", "meta-data")
META_KEYS = ("age", "gender", "race", "pose", "valence", "arousal", "landmark-68", "landmark-29")
GENDER_KEYS = ("female", "male")
POSE_KEYS = ("yaw", "pitch", "roll")
# How many numbers each landmark key holds (x, y interleaved).
LANDMARK_KEYS = {"landmark-68": 2 * NUM_LANDMARKS, "landmark-29": 2 * NUM_LANDMARKS_29}
# AffectNet's valence/arousal for "none", which the release keeps.
VA_SENTINEL = -2.0
# ethnicity column name -> the release's spelling of that race class
RACE_SPELLING = dict(zip(RELEASE_ETHNICITY_CLASSES, RELEASE_RACE_CLASSES))
ID_MAP = "image_ids.csv"  # release_image_id,image_id: the exported row -> the build's row
ID_MAP_COLUMNS = ("release_image_id", "image_id")
REQUIRED_COLUMNS = ("image_id", "image", "human_label", "soft_label", "subset")
# The columns an annotation is made of (besides the required ones); a build may lack any of them.
META_COLUMNS = ("age", "gender", "ethnicity", "head_pose", "valence", "arousal", "landmarks", "landmarks_29")
# Inside a partial export: the export that left it may delete it.
PARTIAL_MARKER = ".export-release-partial"
JPEG_MAGIC = b"\xff\xd8\xff"


def _flat(points, count: int, key: str, image_id: str) -> list[float] | None:
    if points is None:
        return None
    flat = [float(v) for point in points for v in point]
    if len(flat) != count:
        raise ValueError(f"{image_id}: {key} has {len(flat)} numbers, expected {count}")
    return flat


def _struct(value: dict | None, names=None) -> dict | None:
    """A struct column's value as floats under ``names`` (its own keys by default); null if any part is."""
    if value is None or any(v is None for v in value.values()):
        return None
    return {(names or {}).get(k, k): float(v) for k, v in value.items()}


def _va(value) -> float:
    return VA_SENTINEL if value is None else float(value)


def release_annotation(row: dict) -> dict:
    """A built row (a ``dict`` of its columns, as Arrow gives them) as the release's annotation JSON.

    ``head_pose`` goes back to radians, null valence/arousal to -2, the six release ethnicity
    classes to the release's spelling (others keep their names); what the row lacks is ``None``.

    Example:
        >>> row = {"image_id": "a", "human_label": 1, "soft_label": [0.5] * 8, "subset": 0,
        ...        "head_pose": {"yaw": 90.0, "pitch": 0.0, "roll": 0.0}, "valence": None}
        >>> ann = release_annotation(row)
        >>> ann["meta-data"]["pose"]["yaw"] == math.pi / 2, ann["meta-data"]["valence"], ann["meta-data"]["age"]
        (True, -2.0, None)
    """
    image_id = row.get("image_id")
    label, soft, subset = row.get("human_label"), row.get("soft_label"), row.get("subset")
    if label is None or soft is None:
        raise ValueError(f"{image_id}: no {'human_label' if label is None else 'soft_label'}; the release needs one")
    if len(soft) != len(EMOTIONS) or any(v is None for v in soft):
        raise ValueError(f"{image_id}: soft_label {soft} is not {len(EMOTIONS)} numbers")
    pose = _struct(row.get("head_pose"))
    return {
        "human-label": int(label),
        "soft-label": [float(v) for v in soft],
        "subset": None if subset is None or subset < 0 else int(subset),
        "meta-data": {
            "age": None if row.get("age") is None else float(row["age"]),
            "gender": _struct(row.get("gender")),
            "race": _struct(row.get("ethnicity"), RACE_SPELLING),
            "pose": None if pose is None else {k: math.radians(pose[k]) for k in POSE_KEYS},
            "valence": _va(row.get("valence")),
            "arousal": _va(row.get("arousal")),
            "landmark-68": _flat(row.get("landmarks"), LANDMARK_KEYS["landmark-68"], "landmarks", image_id),
            "landmark-29": _flat(row.get("landmarks_29"), LANDMARK_KEYS["landmark-29"], "landmarks_29", image_id),
        },
    }


def _splits(dataset_dir: Path) -> dict[str, list[Path]]:
    """The built folder's Parquet files per split, checked: finished, and nothing the release cannot hold."""
    if (dataset_dir / WORK_DIR).exists():
        raise ValueError(f"{dataset_dir} is an unfinished build ({WORK_DIR}/ is there): finish the build first")
    files = {split: config_files(dataset_dir, "default", split) for split in SPLITS}
    files = {split: paths for split, paths in files.items() if paths}
    if not files:
        raise FileNotFoundError(f"{dataset_dir} is not a built AffectNet+ folder: it has no train, validation or "
                                "unlabeled data")  # fmt: skip
    known = {p for paths in files.values() for p in paths}
    others = sorted(p.relative_to(dataset_dir).as_posix() for p in config_files(dataset_dir, "default", "*"))
    others = [p for p in others if dataset_dir / p not in known]
    if others:
        raise ValueError(f"{dataset_dir} has splits the release layout has no part for ({', '.join(others[:3])}); "
                         f"its parts hold {', '.join(PARTS)}")  # fmt: skip
    return files


def _columns(dataset_dir: Path, files: dict[str, list[Path]]) -> list[str]:
    names = set(pq.read_schema(next(iter(files.values()))[0]).names)
    missing = [c for c in REQUIRED_COLUMNS if c not in names]
    if missing:
        raise ValueError(
            f"{dataset_dir} has no {', '.join(missing)} column: the release layout needs soft labels and subsets. "
            "Build with soft labels first (build --experts, or build from the release itself)"
        )
    return [*REQUIRED_COLUMNS, *(c for c in META_COLUMNS if c in names)]


def _partial_dir(out: Path) -> Path:
    """A fresh folder beside ``out`` to write into (one a killed export left is deleted first)."""
    partial = out.parent / f".{out.name}.partial"
    if partial.exists():
        if not (partial / PARTIAL_MARKER).is_file():
            raise FileExistsError(f"{partial} is in the way of the export and was not written by one")
        shutil.rmtree(partial)
    partial.mkdir(parents=True)
    (partial / PARTIAL_MARKER).write_text("")
    return partial


def _write_part(paths: list[Path], columns: list[str], root: Path, part: str, id_map, bar) -> int:
    """Writes the rows of ``paths`` as ``root/part/{images,annotations}/<i>``; returns how many."""
    images, annotations = root / part / IMAGES, root / part / ANNOTATIONS
    images.mkdir(parents=True)
    annotations.mkdir()
    index = 0
    for path in paths:
        for batch in pq.ParquetFile(path).iter_batches(batch_size=256, columns=columns):
            for row in batch.to_pylist():
                data = (row["image"] or {}).get("bytes")
                if not data or not data.startswith(JPEG_MAGIC):
                    raise ValueError(f"{row['image_id']}: the stored image is not a JPEG")
                annotation = json.dumps(release_annotation(row), allow_nan=False)
                (images / f"{index}.jpg").write_bytes(data)
                (annotations / f"{index}.json").write_text(annotation + "\n", encoding="utf-8")
                id_map.writerow((f"{part}/{IMAGES}/{index}", row["image_id"]))
                index += 1
                bar.update()
    return index


def export_release(dataset_dir, out, progress: bool = True) -> dict:
    """Writes the built folder ``dataset_dir`` in the official release's layout, in the new folder ``out``.

    train goes to ``human_annotated/train_set``, validation to ``human_annotated/validation_set`` and
    unlabeled to ``no_human_annotated``; each split's rows are numbered 0..N-1 in the built folder's
    order (its files, sorted, then their rows). ``images/<i>.jpg`` is the stored JPEG, byte for byte;
    ``annotations/<i>.json`` is ``release_annotation`` of the row. ``image_ids.csv`` maps each
    exported row (``release_image_id``: the image id a build of ``out`` gives it) to the build's
    ``image_id``. The tree is written beside ``out`` and renamed into place when complete.

    Args:
        dataset_dir: a finished build (``builder.export.build``) with ``soft_label`` and ``subset``.
        out: the release folder to create; it must not exist or be empty.
        progress: show a progress bar.

    Returns:
        ``{"rows": {split: rows written}, "id_map": "image_ids.csv"}``.

    Example:
        >>> report = export_release("affectnet_plus/", "release/", progress=False)  # doctest: +SKIP
        >>> report["rows"]  # doctest: +SKIP
        {'train': 140, 'validation': 20, 'unlabeled': 40}
    """
    from tqdm.auto import tqdm

    dataset_dir, out = Path(dataset_dir), Path(out)
    files = _splits(dataset_dir)
    columns = _columns(dataset_dir, files)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} exists and is not empty: the release is written into a new folder")
    if out.resolve().is_relative_to(dataset_dir.resolve()):
        raise ValueError(f"{out} is inside the built folder {dataset_dir}: write the release elsewhere")
    total = sum(pq.ParquetFile(p).metadata.num_rows for paths in files.values() for p in paths)
    partial = _partial_dir(out)
    rows: dict[str, int] = {}
    try:
        # Nothing is in place until the whole tree is: it is renamed to OUT last.
        with (
            tqdm(total=total, desc="export release", unit="img", disable=not progress) as bar,
            open(partial / ID_MAP, "w", newline="", encoding="utf-8") as ids,
        ):
            id_map = csv.writer(ids, lineterminator="\n")
            id_map.writerow(ID_MAP_COLUMNS)
            for split, paths in files.items():
                rows[split] = _write_part(paths, columns, partial, PARTS[split], id_map, bar)
        (partial / PARTIAL_MARKER).unlink()
        if out.exists():
            out.rmdir()  # empty (checked above): the complete tree takes its place
        os.replace(partial, out)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return {"rows": rows, "id_map": ID_MAP}
