"""Build stage 6, export: the Hub-ready folder, each file written once.

Per crop shard, the final ``data/default/<shard>`` joins the crop shard's columns, the metadata
stage's and the fuse stage's (the later stage's column wins: a release's own soft labels are replaced
by the build's), in schema order; once it is in place the crop shard is deleted, so the crops are never
kept twice. Then, from the default shards, ``data/labels/`` (every column but the image, one shard per
default shard) and, when there is a ``subset`` column, ``data/easy|challenging|difficult/`` (the
default rows filtered by subset, re-cut into shards of ``shard_rows`` rows). Last, the top-level
files: ``rejects.jsonl``, ``metadata_notes.jsonl`` (when there are notes), ``au_model.json`` and
``fusion.json`` (with experts), ``build_config.json``, ``README.md`` (the card) and, last of all,
``build_report.json``, whose counts are taken from the files written (read = written + rejected is
checked). A resumed export keeps the shards it already wrote; an export whose fingerprint changed
first deletes everything it had written in OUT.

Fingerprint: the crop, metadata and fuse stages' digests (``au_model.json`` and ``fusion.json`` follow
from the fuse stage's), the columns, the source settings (the card shows them), ``shard_rows`` and
the resolved config (without its paths, which depend on the working directory).
"""

from __future__ import annotations

import json
import math
import shutil
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from builder.card import render_card
from builder.stage import Stage, read_columns, write_atomic, write_json_atomic, write_parquet_atomic
from builder.stage_crop import shard_name
from core.schema import AU_MODEL_FILE, BUILD_CONFIG_FILE, FUSION_FILE, LABELS_CONFIG, SUBSETS, labels_features

NAME = "export"
# What the export writes in OUT besides data/ (deleted when the export starts afresh).
OUT_FILES = ("README.md", "build_report.json", "rejects.jsonl", "metadata_notes.jsonl", AU_MODEL_FILE, FUSION_FILE,
             BUILD_CONFIG_FILE)  # fmt: skip


def fingerprint(crop: str, metadata: str | None, fuse: str | None, features, settings: dict, shard_rows: int,
                build_config: dict) -> dict:  # fmt: skip
    return {"crop": crop, "metadata": metadata, "fuse": fuse, "features": repr(features), "settings": settings,
            "shard_rows": shard_rows, "build_config": build_config}  # fmt: skip


def _default_shards(out: Path, split: str) -> list[Path]:
    return sorted((out / "data" / "default").glob(f"{split}-*.parquet"))


def _join(stage: Stage, out: Path, shards: list[str], dirs: list[Path], crop_dir: Path, features,
          progress: bool) -> None:  # fmt: skip
    """Writes each final default shard once, from the stage shards in ``dirs``; then drops the crop shard."""
    target_dir = out / "data" / "default"
    for name in tqdm(shards, desc="export", unit="shard", disable=not progress):
        target = target_dir / name
        if not target.is_file():
            table = read_columns(name, dirs, list(features))
            missing = set(features) - set(table.column_names)
            if missing:
                raise RuntimeError(f"no stage wrote the columns {sorted(missing)} of {name}")
            write_parquet_atomic(target, features, stage.work, table=table)
            stage.wrote()
        (crop_dir / name).unlink(missing_ok=True)


def _derive_labels(stage: Stage, out: Path, split: str, features) -> None:
    """The ``labels`` config: every column but ``image``, one shard per default shard."""
    label_features = labels_features(features)
    for shard in _default_shards(out, split):
        target = out / "data" / LABELS_CONFIG / shard.name
        if not target.is_file():
            table = pq.read_table(shard, columns=list(label_features))
            write_parquet_atomic(target, label_features, stage.work, table=table)
            stage.wrote()


def _derive_subset(stage: Stage, out: Path, split: str, features, subset: int, shard_rows: int) -> None:
    """The ``easy``/``challenging``/``difficult`` configs: default rows filtered by ``subset``."""
    shards = _default_shards(out, split)
    count = sum(pc.sum(pc.equal(pq.read_table(s, columns=["subset"])["subset"], subset)).as_py() or 0 for s in shards)
    if count == 0:
        return
    num_shards = math.ceil(count / shard_rows)
    config_dir = out / "data" / SUBSETS[subset]
    targets = [config_dir / shard_name(split, i, num_shards) for i in range(num_shards)]
    if all(t.is_file() for t in targets):
        return
    pending, index = None, 0  # at most one default shard plus < shard_rows filtered rows in memory
    for shard in shards:
        table = pq.read_table(shard)
        rows = table.filter(pc.equal(table["subset"], subset))
        pending = rows if pending is None else pa.concat_tables([pending, rows])
        while pending.num_rows >= shard_rows:
            if not targets[index].is_file():
                write_parquet_atomic(targets[index], features, stage.work, table=pending.slice(0, shard_rows))
                stage.wrote()
            pending, index = pending.slice(shard_rows), index + 1
    if pending is not None and pending.num_rows and not targets[index].is_file():
        write_parquet_atomic(targets[index], features, stage.work, table=pending)
        stage.wrote()


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
    configs = {}
    config_dirs = sorted((out / "data").iterdir()) if (out / "data").is_dir() else []
    # default first, then labels, then the subsets in their order
    order = ["default", LABELS_CONFIG, *SUBSETS]
    for config_dir in sorted(config_dirs, key=lambda d: order.index(d.name) if d.name in order else len(order)):
        configs[config_dir.name] = {
            split: sum(pq.ParquetFile(p).metadata.num_rows for p in sorted(config_dir.glob(f"{split}-*.parquet")))
            for split in read
            if any(config_dir.glob(f"{split}-*.parquet"))
        }
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
        split_shards = _default_shards(out, split)
        if split_shards and "au_scores" in pq.read_schema(split_shards[0]).names:
            without_landmarks[split] = sum(
                pq.read_table(p, columns=["au_scores"])["au_scores"].null_count for p in split_shards
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
        shutil.rmtree(out / "data", ignore_errors=True)
        for name in OUT_FILES:
            (out / name).unlink(missing_ok=True)
    _join(stage, out, shards, dirs, crop_dir, features, progress)
    splits = list(read)
    for split in splits:
        _derive_labels(stage, out, split, features)
        if "subset" in features:
            for subset in range(len(SUBSETS)):
                _derive_subset(stage, out, split, features, subset, stage.fingerprint["shard_rows"])

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
