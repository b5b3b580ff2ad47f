"""Build stage 6, export: the Hub-ready folder, each file written once and each image stored once.

Per crop shard ``<split>-iiiii-of-nnnnn.parquet``, the export joins the crop shard's columns, the
metadata stage's and the fuse stage's (the later stage's column wins: a release's own soft labels are
replaced by the build's), in schema order, and cuts the rows by subset into partitions: ``easy``,
``challenging``, ``difficult`` and ``unassigned`` (no subset: human labels 8-10, or a build without
soft labels). Each non-empty partition becomes ``data/<split>/iiiii-of-nnnnn-<partition>.parquet``
(every column) and ``labels/<split>/iiiii-of-nnnnn-<partition>.parquet`` (every column but the
image), rows in their crop-shard order: sorted by name, the files keep the source's shard order. Once all of a crop shard's files are in place the crop shard
is deleted, so the crops are never kept twice. Configs select files rather than copy rows
(``core.schema.config_pattern``): ``default`` reads every file of ``data/<split>/``, ``easy`` its
``*-easy`` files, ``labels`` the files of ``labels/<split>/``.

Last, the top-level files: ``rejects.jsonl``, ``metadata_notes.jsonl`` (when there are notes),
``au_model.json`` and ``fusion.json`` (with experts), ``build_config.json``, ``README.md`` (the card)
and, last of all, ``build_report.json``, whose counts are taken from the files written (read =
written + rejected is checked). A resumed export keeps the files it already wrote and skips the crop
shards it already consumed; an export whose fingerprint changed first deletes everything it had
written in OUT.

Fingerprint: the crop, metadata and fuse stages' digests (``au_model.json`` and ``fusion.json`` follow
from the fuse stage's), the columns, the source settings (the card shows them), ``shard_rows`` and
the resolved config (without its paths, which depend on the working directory).
"""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from builder.card import render_card
from builder.stage import Stage, read_columns, write_atomic, write_json_atomic, write_parquet_atomic
from core.schema import (
    AU_MODEL_FILE,
    BUILD_CONFIG_FILE,
    CONFIGS,
    DATA_DIR,
    FUSION_FILE,
    LABELS_CONFIG,
    LABELS_DIR,
    SUBSETS,
    UNASSIGNED,
    config_files,
    labels_features,
)

NAME = "export"
# The folders of OUT that hold the export's Parquet files, and its other files in OUT (all deleted
# when the export starts afresh).
OUT_DIRS = (DATA_DIR, LABELS_DIR)
OUT_FILES = ("README.md", "build_report.json", "rejects.jsonl", "metadata_notes.jsonl", AU_MODEL_FILE, FUSION_FILE,
             BUILD_CONFIG_FILE)  # fmt: skip


def fingerprint(crop: str, metadata: str | None, fuse: str | None, features, settings: dict, shard_rows: int,
                build_config: dict) -> dict:  # fmt: skip
    return {"crop": crop, "metadata": metadata, "fuse": fuse, "features": repr(features), "settings": settings,
            "shard_rows": shard_rows, "build_config": build_config}  # fmt: skip


def partition_file(shard: str, partition: str) -> tuple[str, str]:
    """``(split, file name)`` of one partition of the crop shard ``shard``: it keeps the shard's index and count.

    Example:
        >>> partition_file("train-00002-of-00005.parquet", "easy")
        ('train', '00002-of-00005-easy.parquet')
    """
    split, index, of, count = shard.removesuffix(".parquet").rsplit("-", 3)
    return split, f"{index}-{of}-{count}-{partition}.parquet"


def partitions(table: pa.Table) -> list[tuple[str, pa.Table]]:
    """The non-empty partitions of a shard's rows by subset, rows in their order; without a ``subset``
    column every row is ``unassigned``."""
    if "subset" not in table.column_names:
        return [(UNASSIGNED, table)] if table.num_rows else []
    subset = table["subset"]
    parts = [(name, pc.fill_null(pc.equal(subset, code), False)) for code, name in enumerate(SUBSETS)]
    assigned = pc.fill_null(pc.is_in(subset, value_set=pa.array(range(len(SUBSETS)), subset.type)), False)
    parts.append((UNASSIGNED, pc.invert(assigned)))
    return [(name, rows) for name, mask in parts if (rows := table.filter(mask)).num_rows]


def _export_shards(stage: Stage, out: Path, shards: list[str], dirs: list[Path], crop_dir: Path, features,
                   progress: bool) -> None:  # fmt: skip
    """Writes each crop shard's partition files once, from the stage shards in ``dirs``; then drops the crop shard."""
    label_features = labels_features(features)
    for name in tqdm(shards, desc="export", unit="shard", disable=not progress):
        crop_shard = crop_dir / name
        if not crop_shard.is_file():
            continue  # consumed by this very export (same fingerprint): all its files are in place
        table = read_columns(name, dirs, list(features))
        missing = set(features) - set(table.column_names)
        if missing:
            raise RuntimeError(f"no stage wrote the columns {sorted(missing)} of {name}")
        for partition, rows in partitions(table):
            split, file = partition_file(name, partition)
            for folder, part_features in ((DATA_DIR, features), (LABELS_DIR, label_features)):
                target = out / folder / split / file
                if not target.is_file():
                    write_parquet_atomic(target, part_features, stage.work, table=rows.select(list(part_features)))
                    stage.wrote()
        # Only now: a kill before this line leaves the crop shard, and the re-run writes what is missing.
        crop_shard.unlink()


def count_notes(notes: bytes) -> dict:
    """Per column, how many values are null and why; and how many images had several faces."""
    nulls: dict[str, Counter] = {}
    several = 0
    for line in notes.decode().splitlines():
        note = json.loads(line)
        for column, reason in note.get("reasons", {}).items():
            nulls.setdefault(column, Counter())[reason] += 1
        several += note.get("info", {}).get("faces_detected", 0) > 1
    return {"null": {c: dict(sorted(r.items())) for c, r in sorted(nulls.items())}, "several_faces": several}


def _report(out: Path, crop_dir: Path, read: dict[str, int], shards: list[str]) -> dict:
    """Counts from the files actually written; raises if any source row is unaccounted for."""
    rejected_by_split: dict[str, Counter] = {}
    for name in shards:
        for line in (crop_dir / "rejects" / f"{Path(name).stem}.jsonl").read_text().splitlines():
            row = json.loads(line)
            rejected_by_split.setdefault(row["split"], Counter())[row["reason"]] += 1
    configs = {}  # in CONFIGS order: default, labels, then the subsets in their order
    for config in CONFIGS:
        counts = {
            split: sum(pq.ParquetFile(p).metadata.num_rows for p in files)
            for split in read
            if (files := config_files(out, config, split))
        }
        if counts:
            configs[config] = counts
    if configs.get(LABELS_CONFIG, {}) != configs.get("default", {}):
        raise RuntimeError(
            f"the labels files hold {configs.get(LABELS_CONFIG)} rows, the data files {configs.get('default')}"
        )
    per_split = {}
    for split, num_read in read.items():
        rejected = rejected_by_split.get(split, Counter())
        written = configs.get("default", {}).get(split, 0)
        if num_read != written + sum(rejected.values()):
            raise RuntimeError(
                f"{split}: read {num_read} rows but wrote {written} and rejected {sum(rejected.values())}"
            )
        per_split[split] = {"read": num_read, "written": written, "rejected": dict(sorted(rejected.items()))}
    total_rejected = sum((Counter(s["rejected"]) for s in per_split.values()), Counter())
    without_landmarks = {}
    for split in read:
        split_files = config_files(out, "default", split)
        if split_files and "au_scores" in pq.read_schema(split_files[0]).names:
            without_landmarks[split] = sum(
                pq.read_table(p, columns=["au_scores"])["au_scores"].null_count for p in split_files
            )
    report = {
        "read": sum(s["read"] for s in per_split.values()),
        "written": sum(s["written"] for s in per_split.values()),
        "rejected": dict(sorted(total_rejected.items())),
        "splits": per_split,
        "configs": configs,
    }
    if without_landmarks:  # rows whose soft label comes from the experts alone
        report["soft_labels_without_landmarks"] = without_landmarks
    return report


def run(stage: Stage, out: Path, shards: list[str], read: dict[str, int], crop_dir: Path, dirs: list[Path],
        notes_dirs: list[Path], features, reader, config, report_fields: dict, files: dict,
        progress: bool) -> dict:  # fmt: skip
    """Runs (or resumes, or skips) the export stage; returns the build report.

    ``dirs`` are the stage folders whose shards are joined (later stages first), ``notes_dirs`` those
    whose ``notes/<shard stem>.jsonl`` make ``metadata_notes.jsonl`` (in stage order), ``files`` the
    top-level JSON files to write (``{name: value}``) and ``report_fields`` what the report says
    besides its counts (the fingerprint, the fusion parameters, ...).
    """
    if not stage.start():
        return json.loads((out / "build_report.json").read_text())
    if stage.fresh:  # what an export of other inputs left in OUT
        for folder in OUT_DIRS:
            shutil.rmtree(out / folder, ignore_errors=True)
        for name in OUT_FILES:
            (out / name).unlink(missing_ok=True)
    _export_shards(stage, out, shards, dirs, crop_dir, features, progress)

    report = {**_report(out, crop_dir, read, shards), **report_fields}
    rejects = b"".join((crop_dir / "rejects" / f"{Path(n).stem}.jsonl").read_bytes() for n in shards)
    write_atomic(out / "rejects.jsonl", rejects, stage.work)
    notes = b"".join(
        path.read_bytes()
        for name in shards
        for folder in notes_dirs
        if (path := folder / "notes" / f"{Path(name).stem}.jsonl").is_file()
    )
    if notes:
        write_atomic(out / "metadata_notes.jsonl", notes, stage.work)
        report["metadata_notes"] = count_notes(notes)
    for name, value in files.items():
        write_json_atomic(out / name, value, stage.work, indent=None if name == AU_MODEL_FILE else 2)
    write_atomic(out / "README.md", str(render_card(out, reader, config, report, features)), stage.work)
    write_json_atomic(out / "build_report.json", report, stage.work)
    stage.finish()
    return report
