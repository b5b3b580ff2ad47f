"""Build stage 1, crop: reads the source and crops every face, one shard per chunk of source rows.

Outputs in ``OUT/.build/crop/``: the rows of each split are cut into chunks of ``shard_rows`` source
rows, and chunk i becomes ``<split>-iiiii-of-nnnnn.parquet`` with every column the source has (the
image a JPEG face crop); the export keeps its index and count in the names of its final files
(``data/<split>/iiiii-of-nnnnn-<partition>.parquet``). The rejections and notes of a chunk,
``rejects/<shard stem>.jsonl`` and ``notes/<shard stem>.jsonl``, and the sha256 of the image file of
each of its rows, ``hashes/<shard stem>.jsonl``, are written before its shard, so a shard on disk means
the whole chunk is done. Images are decoded, cropped and hashed by ``num_proc`` worker processes.
Result: the source rows read per split and the shard names.

Duplicates: a row whose ``image_id`` an earlier row has is a ``duplicate_image_id`` rejection, and one
whose image file has the bytes of an earlier row's is a ``duplicate_image`` rejection (its detail: the
kept row's image_id). Earlier means in source order, splits in the reader's order, whatever
``num_proc``: the decision is taken here, chunk by chunk, and a resumed stage reads the hashes of the
shards it skips.

Fingerprint (``fingerprint``): the source (its folder name and a hash of its resolved path), format,
face size, crop margin, JPEG quality, pixel limit, pose unit, face detection on/off (and the
detector's provenance when on), the duplicate rule, and ``shard_rows``.
"""

from __future__ import annotations

import hashlib
import json
import math
import multiprocessing
from collections import deque
from collections.abc import Iterable, Iterator
from pathlib import Path

from tqdm.auto import tqdm

from builder.images import Rejected
from builder.sources import Record, Rejection, deduplicated, duplicate_image, make_example
from builder.stage import Stage, jsonl, write_atomic, write_parquet_atomic
from core.schema import AffectNetPlusConfig

NAME = "crop"
DEDUPLICATION = "first row of each image_id and of each image file sha256, in source order"


def shard_name(split: str, index: int, count: int) -> str:
    """``<split>-iiiii-of-nnnnn.parquet``: the name of crop shard ``index`` of ``count``."""
    return f"{split}-{index:05d}-of-{count:05d}.parquet"


def fingerprint(source, config: AffectNetPlusConfig, shard_rows: int) -> dict:
    """Everything that determines the crop shards' bytes (no absolute path: it is published in the report)."""
    resolved = str(Path(source).resolve())
    result = {
        "source": Path(resolved).name,
        "source_path_sha256": hashlib.sha256(resolved.encode()).hexdigest()[:16],
        "source_format": config.source_format,
        "face_size": config.face_size,
        "crop_margin": config.crop_margin,
        "jpeg_quality": config.jpeg_quality,
        "max_image_pixels": config.max_image_pixels,
        "pose_unit": config.pose_unit,
        "detect_faces": config.detect_faces,
        "deduplication": DEDUPLICATION,
        "shard_rows": shard_rows,
    }
    if config.detect_faces:
        from builder.annotators import FaceDetector

        result["face_detector"] = FaceDetector().provenance()
    return result


# Worker-process state: set once per process by the pool initializer (records travel alone).
_WORKER: dict = {}


def _init_worker(config: AffectNetPlusConfig, columns: tuple[str, ...]) -> None:
    _WORKER["config"], _WORKER["columns"] = config, columns


def _process(record: Record) -> dict | Rejection:
    try:
        return make_example(record, _WORKER["config"], _WORKER["columns"])
    except Rejected as err:
        return Rejection(record.origin, record.row, err.reason, err.detail, record.image_id)


def _chunks(items: Iterable, size: int) -> Iterator[list]:
    chunk = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _hashes_path(stage: Stage, name: str) -> Path:
    return stage.dir / "hashes" / f"{Path(name).stem}.jsonl"


def _crop_split(stage: Stage, reader, split: str, features, shard_rows: int, num_proc: int, pool, seen: set,
                first: dict, progress: bool) -> tuple[int, list[str]]:  # fmt: skip
    """Writes the crop shards of one split; returns the source rows read and the shard names.

    ``seen`` holds the image_ids and ``first`` the image sha256s (-> image_id) of the rows before this
    split's, and gets this split's.
    """
    num_rows = reader.count(split)  # shard names carry the shard count: know it before the first one
    if num_rows == 0:
        return 0, []
    num_shards = math.ceil(num_rows / shard_rows)
    columns = tuple(features)
    bar = tqdm(total=num_rows, desc=f"crop {split}", unit="img", disable=not progress)
    names: list[str] = []

    def finish(index: int, chunk: list, results: Iterator) -> None:
        rows = {name: [] for name in columns}
        rejections, notes, hashes = [], [], []
        for item in chunk:
            result = next(results) if isinstance(item, Record) else item
            if not isinstance(result, Rejection):
                result = duplicate_image(item, result, first) or result
            if isinstance(result, Rejection):
                rejections.append({"split": split, **result.to_json()})
            else:
                for name in columns:
                    rows[name].append(result[name])
                if result.get("_info"):
                    notes.append({"split": split, "image_id": result["image_id"], "info": result["_info"]})
                hashes.append({"image_id": result["image_id"], "sha256": result["_sha256"]})
            bar.update()
        name = shard_name(split, index, num_shards)
        write_atomic(stage.dir / "notes" / f"{Path(name).stem}.jsonl", jsonl(notes), stage.work)
        write_atomic(stage.dir / "rejects" / f"{Path(name).stem}.jsonl", jsonl(rejections), stage.work)
        write_atomic(_hashes_path(stage, name), jsonl(hashes), stage.work)
        write_parquet_atomic(stage.dir / name, features, stage.work, rows=rows)
        stage.wrote()

    pending = deque()  # keep one chunk decoding in the pool while the previous one is written
    items = deduplicated(reader.records(split), seen)
    for index, chunk in enumerate(_chunks(items, shard_rows)):
        name = shard_name(split, index, num_shards)
        names.append(name)
        if (stage.dir / name).is_file() and _hashes_path(stage, name).is_file():
            # Done in an earlier run: its rows' hashes count as seen, after those of the chunks before it.
            while pending:
                finish(*pending.popleft())
            for line in _hashes_path(stage, name).read_text().splitlines():
                row = json.loads(line)
                first.setdefault(row["sha256"], row["image_id"])
            bar.update(len(chunk))
            continue
        records = [item for item in chunk if isinstance(item, Record)]
        if pool is None:
            results = (_process(record) for record in records)
        else:
            results = pool.imap(_process, records, chunksize=max(1, min(32, len(records) // (4 * num_proc))))
        pending.append((index, chunk, results))
        if len(pending) > (0 if pool is None else 1):
            finish(*pending.popleft())
    while pending:
        finish(*pending.popleft())
    bar.close()
    return num_rows, names


def run(stage: Stage, reader, config: AffectNetPlusConfig, features, shard_rows: int, num_proc: int,
        progress: bool) -> dict:  # fmt: skip
    """Runs (or resumes, or skips) the crop stage; returns ``{"read": {split: rows}, "shards": [...]}``."""
    if not stage.start():
        return stage.result()
    pool = None
    if num_proc > 1:
        # fork where there is one: workers start in milliseconds with the modules already imported
        # (spawn re-imports datasets/pyarrow in each, ~1 s). They only decode images, so the locks a
        # forked child may inherit from the parent's threads are never taken.
        method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
        pool = multiprocessing.get_context(method).Pool(
            num_proc, initializer=_init_worker, initargs=(config, tuple(features))
        )
    else:
        _init_worker(config, tuple(features))
    read, shards = {}, []
    try:
        seen: set[str] = set()  # image_ids so far
        first: dict[str, str] = {}  # image file sha256 -> the image_id of the first row with it
        for split in reader.splits():
            read[split], names = _crop_split(stage, reader, split, features, shard_rows, num_proc, pool, seen,
                                             first, progress)  # fmt: skip
            shards += names
    finally:
        if pool is not None:
            pool.close()
            pool.join()
    return stage.finish({"read": read, "shards": shards})
