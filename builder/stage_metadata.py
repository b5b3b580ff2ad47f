"""Build stage 2, metadata: runs the offline face models over the crops for the columns the source lacks.

Outputs in ``OUT/.build/metadata/``: per crop shard, ``<shard>.parquet`` with ``image_id`` and the
annotators' columns (landmarks, head pose, age, gender, ethnicity, and valence/arousal with a
regressor), and ``notes/<shard stem>.jsonl`` (why a value is null, how many faces an image showed),
written before it. Shards are annotated by ``num_proc`` processes, in slices of
``METADATA_TASK_ROWS`` rows so that even one big shard keeps every process busy; the models load
once per process. A row its annotators labelled non-face gets no face metadata.

Fingerprint: the crop stage's digest, each annotator's ``provenance()`` (model and version; GEAR's and the
valence/arousal regressor's include their weights' sha256), and the columns written.
"""

from __future__ import annotations

import io
import multiprocessing
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image as PILImage
from tqdm.auto import tqdm

from builder.stage import Stage, jsonl, write_atomic, write_parquet_atomic
from core.schema import HUMAN_LABELS, AffectNetPlusConfig, select_features

NAME = "metadata"
NON_FACE = HUMAN_LABELS.index("non_face")
USUAL_INFO = {("faces", 1), ("landmarks_box", "detector")}
METADATA_TASK_ROWS = 128  # rows per metadata task: small enough to spread one shard over the processes


def metadata_annotators(columns, config: AffectNetPlusConfig, va_model: str | None = None) -> list:
    """The annotators that fill what a source lacks: landmarks, head pose, age and gender, ethnicity,
    and valence/arousal when a regressor checkpoint (``scripts/train.py va``) is given.

    An annotator runs when any of its columns is missing from ``columns``: AffectNet sources keep their
    own landmarks and valence/arousal; the release keeps everything.
    """
    from builder.annotators import face_annotators
    from builder.gear import GearEthnicityAnnotator, is_fetched
    from builder.model_store import FETCH_COMMAND, MissingModel
    from builder.va_annotator import ValenceArousalAnnotator

    candidates = face_annotators(config.crop_margin)
    if va_model and not {"valence", "arousal"} <= set(columns):
        candidates.append(ValenceArousalAnnotator(va_model))
    needed = [a for a in candidates if not set(a.outputs) <= set(columns)]
    if any(isinstance(a, GearEthnicityAnnotator) for a in needed) and not is_fetched():
        raise MissingModel(
            f"the ethnicity model (GEAR) is not fetched: run `{FETCH_COMMAND}` (needs npm), or build with --no-metadata"
        )
    return needed


def fingerprint(crop_digest: str, annotators: list) -> dict:
    return {
        "crop": crop_digest,
        "annotators": {a.name: a.provenance() for a in annotators},
        "columns": [c for a in annotators for c in a.outputs],
    }


def _annotate_rows(task) -> tuple[dict, list[dict]]:
    """Worker: runs the annotators over rows ``start:stop`` of a crop shard; returns the new columns and notes."""
    from builder.annotators import run_annotators

    shard, split, start, stop, annotators, batch_size = task
    wanted = [c for c in ("image_id", "image", "human_label", "landmarks") if c in pq.read_schema(shard).names]
    table = pq.read_table(shard, columns=wanted).slice(start, stop - start)
    outputs = [c for a in annotators for c in a.outputs]
    # A row its annotators called non-face gets no face metadata: a model would invent some.
    human = table["human_label"].to_pylist() if "human_label" in table.column_names else [None] * table.num_rows
    faces = [i for i, h in enumerate(human) if h != NON_FACE]
    cells = table["image"].to_pylist()
    images = [PILImage.open(io.BytesIO(cells[i]["bytes"])).convert("RGB") for i in faces]
    given = [c for c in ("landmarks",) if c in table.column_names]
    rows = [{c: v for c in given if (v := table[c][i].as_py()) is not None} for i in faces]
    results = [{**dict.fromkeys(outputs), "_reasons": dict.fromkeys(outputs, "labelled_non_face")}] * table.num_rows
    for i, result in zip(faces, run_annotators(annotators, images, rows, batch_size)):
        results[i] = result
    columns = {c: [r.get(c) for r in results] for c in outputs}
    notes = []
    for image_id, result in zip(table["image_id"].to_pylist(), results):
        # Notes are for the exceptions: drop what every well-behaved row says (one face, found by the detector).
        info = {k: v for k, v in result.get("_info", {}).items() if (k, v) not in USUAL_INFO}
        note = {k: v for k, v in (("reasons", result.get("_reasons")), ("info", info)) if v}
        if note:
            notes.append({"split": split, "image_id": image_id, **note})
    return columns, notes


def _one_thread() -> None:
    """Metadata workers run torch (GEAR) one thread each: the OpenMP pool a forked child inherits from a
    parent that already ran torch deadlocks on first use (the reason DataLoader workers do the same)."""
    import torch

    torch.set_num_threads(1)


def arrow_column(features, name: str, values: list) -> pa.Array:
    """One column in the Arrow type ``datasets`` writes for ``features[name]``."""
    from datasets import Features

    single = Features({name: features[name]})
    encoded = [single.encode_example({name: v})[name] for v in values]
    encoded = [e.tolist() if isinstance(e, np.ndarray) else e for e in encoded]  # Array2D landmarks
    return pa.array(encoded, type=single.arrow_schema.field(name).type)


def notes_path(stage_dir: Path, shard: str) -> Path:
    return stage_dir / "notes" / f"{Path(shard).stem}.jsonl"


def run(stage: Stage, crop_dir: Path, shards: list[str], annotators: list, features, num_proc: int,
        progress: bool, batch_size: int = 32) -> dict:  # fmt: skip
    """Runs (or resumes, or skips) the metadata stage over the crop shards ``shards``.

    ``features`` types the annotators' columns. Every value an annotator could not estimate is null,
    with its reason in the notes.
    """
    if not stage.start():
        return stage.result()
    outputs = [c for a in annotators for c in a.outputs]
    out_features = select_features(["image_id", *outputs], tuple(features["ethnicity"]) if "ethnicity" in features
                                   else ())  # fmt: skip
    todo = [(crop_dir / name, name.split("-")[0]) for name in shards if not (stage.dir / name).is_file()]
    sizes = {shard: pq.ParquetFile(shard).metadata.num_rows for shard, _ in todo}
    tasks = [(shard, split, start, min(start + METADATA_TASK_ROWS, sizes[shard]), annotators, batch_size)
             for shard, split in todo for start in range(0, max(sizes[shard], 1), METADATA_TASK_ROWS)]  # fmt: skip
    bar = tqdm(total=sum(sizes.values()), desc="metadata", unit="img", disable=not progress)
    pool = None
    if num_proc > 1 and len(tasks) > 1:
        method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
        pool = multiprocessing.get_context(method).Pool(min(num_proc, len(tasks)), _one_thread)
    try:
        results = pool.imap(_annotate_rows, tasks) if pool else map(_annotate_rows, tasks)
        pending: dict[Path, list] = {}
        for (shard, _, _, stop, *_), (columns, notes) in zip(tasks, results):
            parts = pending.setdefault(shard, [])
            parts.append((columns, notes))
            bar.update(sum(len(v) for v in columns.values()) // max(len(columns), 1))
            if stop < sizes[shard]:
                continue  # tasks come back in order: the shard is complete at its last slice
            ids = pq.read_table(shard, columns=["image_id"])["image_id"]
            table = pa.table({"image_id": ids, **{name: arrow_column(features, name, [v for c, _ in parts for v in c[name]])
                                                  for name in outputs}})  # fmt: skip
            write_atomic(notes_path(stage.dir, shard.name), jsonl([n for _, ns in parts for n in ns]), stage.work)
            write_parquet_atomic(stage.dir / shard.name, out_features, stage.work, table=table)
            stage.wrote()
            del pending[shard]
    finally:
        if pool is not None:
            pool.close()
            pool.join()
        bar.close()
    return stage.finish({"columns": outputs})
