"""Build a Hub-ready, no-code AffectNet+ dataset folder from a source.

Layout of the output folder (``load_dataset(OUT)`` reads it; after a push, ``load_dataset("ORG/NAME")``)::

    OUT/README.md                                   dataset card: YAML configs + dataset_info, counts, provenance
    OUT/data/<config>/<split>-NNNNN-of-NNNNN.parquet
    OUT/build_report.json                           {"read": n, "written": n, "rejected": {reason: n}, ...}
    OUT/rejects.jsonl                               one line per rejected row: source, row, reason, detail

Crash safety: the rows of each split are cut into fixed chunks of ``shard_rows`` source rows; chunk i
becomes shard i. Every file is written to ``OUT/.build/`` and renamed into place, and the rejections of
a chunk are saved before its shard, so a build killed at any point and re-run with the same arguments
skips the finished shards and ends byte-identical to an uninterrupted one.

Example:
    >>> from core.schema import AffectNetPlusConfig
    >>> from builder.export import BuildOptions, build
    >>> report = build("AffectNet/", "affectnet_plus/", AffectNetPlusConfig(source_format="affectnet"))  # doctest: +SKIP
    >>> report["written"] + sum(report["rejected"].values()) == report["read"]  # doctest: +SKIP
    True
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import multiprocessing
import os
import shutil
from collections import Counter, deque
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from datasets.arrow_writer import ParquetWriter
from PIL import Image as PILImage
from tqdm.auto import tqdm

from builder.au import AUCalibration, AUModel, ShapeModel, au_features, shape_moments
from builder.card import render_card
from builder.images import Rejected
from builder.softlabel import (
    SHAPE_ROWS_PER_COMPONENT,
    FusionConfig,
    fit_fusion,
    fuse,
    subsets,
    validate,
)
from builder.sources import Record, Rejection, deduplicated, make_example, open_source
from core.schema import (
    HUMAN_LABELS,
    LABELS_CONFIG,
    SUBSETS,
    WORK_DIR,
    AffectNetPlusConfig,
    folds,
    labels_features,
    select_features,
)

AU_MODEL_FILE = "au_model.json"  # the fitted AU component (builder.au.AUModel), for predict --au-model
SOFT_LABEL_COLUMNS = ("soft_label", "subset", "expert_probs", "au_scores")


@dataclass
class BuildOptions:
    """How the build runs (none of these changes the output's bytes, except ``shard_rows``).

    Args:
        shard_rows: source rows per Parquet shard (bounds shard size: ~25 kB per 224 px face).
        num_proc: worker processes that decode and crop images.
        overwrite: replace an existing output folder that holds a different build.
        progress: show progress bars.
    """

    shard_rows: int = 1000
    num_proc: int = 1
    overwrite: bool = False
    progress: bool = True

    def __post_init__(self):
        if self.shard_rows < 1:
            raise ValueError(f"shard_rows must be >= 1, got {self.shard_rows}")
        if self.num_proc < 1:
            raise ValueError(f"num_proc must be >= 1, got {self.num_proc}")


def shard_name(split: str, index: int, count: int) -> str:
    return f"{split}-{index:05d}-of-{count:05d}.parquet"


def _fingerprint(source, config: AffectNetPlusConfig, options: BuildOptions) -> dict:
    """Everything that determines the output's bytes; a resume must match it exactly."""
    resolved = str(Path(source).resolve())
    return {
        # The name and a hash, not the path: the report is published with the data.
        "source": Path(resolved).name,
        "source_path_sha256": hashlib.sha256(resolved.encode()).hexdigest()[:16],
        "source_format": config.source_format,
        "face_size": config.face_size,
        "crop_margin": config.crop_margin,
        "jpeg_quality": config.jpeg_quality,
        "max_image_pixels": config.max_image_pixels,
        "pose_unit": config.pose_unit,
        "shard_rows": options.shard_rows,
    }


def _write_atomic(path: Path, data: bytes | str, work: Path) -> None:
    tmp = work / f"tmp-{os.getpid()}-{path.name}"
    tmp.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
    os.replace(tmp, path)


def _write_parquet_atomic(path: Path, features, rows: dict | None, work: Path, table=None) -> None:
    """Writes ``rows`` (a column dict) or an Arrow ``table`` as Parquet with the HF schema metadata."""
    tmp = work / f"tmp-{os.getpid()}-{path.name}"
    writer = ParquetWriter(path=str(tmp), features=features)
    if table is not None:
        writer.write_table(table)
    else:
        writer.write_batch(rows)
    writer.finalize()
    writer.close()
    path.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, path)


def _prepare_output(out: Path, fingerprint: dict, overwrite: bool) -> Path:
    """Creates or resumes ``out``; refuses to mix two different builds in one folder."""
    work = out / WORK_DIR
    state = work / "fingerprint.json"
    report = out / "build_report.json"
    if overwrite and out.exists():
        shutil.rmtree(out)
    if state.is_file():
        if json.loads(state.read_text()) != fingerprint:
            raise FileExistsError(
                f"{out} holds an unfinished build with other arguments; re-run those, or pass --overwrite"
            )
    elif report.is_file():
        if json.loads(report.read_text()).get("fingerprint") != fingerprint:
            raise FileExistsError(f"{out} holds a different build; choose another --out or pass --overwrite")
        # A finished build with the same arguments: build again from scratch (the code may have changed;
        # derived files left in place would be taken for finished work).
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(out / "data", ignore_errors=True)
        for name in ("README.md", "rejects.jsonl", "build_report.json", AU_MODEL_FILE):
            (out / name).unlink(missing_ok=True)
    elif out.exists() and any(p.name != WORK_DIR for p in out.iterdir()):
        raise FileExistsError(f"{out} exists and is not an AffectNet+ build; choose another --out or pass --overwrite")
    else:
        shutil.rmtree(work, ignore_errors=True)  # killed before the fingerprint was written: start afresh
    (work / "rejects").mkdir(parents=True, exist_ok=True)
    (work / "notes").mkdir(exist_ok=True)
    for stale in work.glob("tmp-*"):
        stale.unlink()
    _write_atomic(state, json.dumps(fingerprint, indent=2), work)
    return work


# Worker-process state: set once per process by the pool initializer (records travel alone).
_WORKER: dict = {}


def _init_worker(config: AffectNetPlusConfig, columns: tuple[str, ...]) -> None:
    _WORKER["config"], _WORKER["columns"] = config, columns


def _process(record: Record) -> dict | Rejection:
    try:
        return make_example(record, _WORKER["config"], _WORKER["columns"])
    except Rejected as err:
        return Rejection(record.origin, record.row, err.reason, err.detail, record.image_id)


def _jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows)


def _chunks(items: Iterable, size: int) -> Iterator[list]:
    chunk = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _build_split(reader, split: str, out: Path, work: Path, features, options: BuildOptions, pool, seen: set) -> int:
    """Writes the default shards of one split; returns the number of source rows read."""
    num_rows = reader.count(split)  # shard names carry the shard count: know it before the first one
    if num_rows == 0:
        return 0
    num_shards = math.ceil(num_rows / options.shard_rows)
    shard_dir = out / "data" / "default"
    shard_dir.mkdir(parents=True, exist_ok=True)
    columns = tuple(features)
    bar = tqdm(total=num_rows, desc=f"build {split}", unit="img", disable=not options.progress)

    def finish(index: int, chunk: list, results: Iterator) -> None:
        rows = {name: [] for name in columns}
        rejections, notes = [], []
        for item in chunk:
            result = next(results) if isinstance(item, Record) else item
            if isinstance(result, Rejection):
                rejections.append({"split": split, **result.to_json()})
            else:
                for name in columns:
                    rows[name].append(result[name])
                if result.get("_info"):
                    notes.append({"split": split, "image_id": result["image_id"], "info": result["_info"]})
            bar.update()
        _write_atomic(work / "notes" / f"{split}-{index:05d}-crop.jsonl", _jsonl(notes), work)
        _write_atomic(work / "rejects" / f"{split}-{index:05d}.jsonl", _jsonl(rejections), work)
        _write_parquet_atomic(shard_dir / shard_name(split, index, num_shards), features, rows, work)

    pending = deque()  # keep one chunk decoding in the pool while the previous one is written
    items = deduplicated(reader.records(split), seen)
    for index, chunk in enumerate(_chunks(items, options.shard_rows)):
        shard = shard_dir / shard_name(split, index, num_shards)
        if shard.is_file() and (work / "rejects" / f"{split}-{index:05d}.jsonl").is_file():
            bar.update(len(chunk))
            continue
        records = [item for item in chunk if isinstance(item, Record)]
        if pool is None:
            results = (_process(record) for record in records)
        else:
            results = pool.imap(_process, records, chunksize=max(1, min(32, len(records) // (4 * options.num_proc))))
        pending.append((index, chunk, results))
        if len(pending) > (0 if pool is None else 1):
            finish(*pending.popleft())
    while pending:
        finish(*pending.popleft())
    bar.close()
    return num_rows


def _default_shards(out: Path, split: str) -> list[Path]:
    return sorted((out / "data" / "default").glob(f"{split}-*.parquet"))


def _derive_labels(out: Path, work: Path, split: str, features) -> None:
    """The ``labels`` config: every column but ``image``, one shard per default shard."""
    label_features = labels_features(features)
    for shard in _default_shards(out, split):
        target = out / "data" / LABELS_CONFIG / shard.name
        if not target.is_file():
            table = pq.read_table(shard, columns=list(label_features))
            _write_parquet_atomic(target, label_features, None, work, table=table)


def _derive_subset(out: Path, work: Path, split: str, features, subset: int, shard_rows: int) -> None:
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
            _write_parquet_atomic(targets[index], features, None, work, table=pending.slice(0, shard_rows))
            pending, index = pending.slice(shard_rows), index + 1
    if pending is not None and pending.num_rows:
        _write_parquet_atomic(targets[index], features, None, work, table=pending)


NON_FACE = HUMAN_LABELS.index("non_face")
USUAL_INFO = {("faces", 1), ("landmarks_box", "detector")}
METADATA_TASK_ROWS = 128  # rows per metadata task: small enough to spread one shard over the processes


def metadata_annotators(columns, config: AffectNetPlusConfig, va_model: str | None = None) -> list:
    """The annotators that fill what a source lacks: landmarks, head pose, age and gender, ethnicity,
    and valence/arousal when a regressor checkpoint (``scripts/train_va.py``) is given.

    AffectNet sources keep their own landmarks and valence/arousal; the release keeps everything.
    """
    from builder.annotators import face_annotators
    from builder.gear import GearEthnicityAnnotator, is_fetched
    from builder.va_annotator import ValenceArousalAnnotator

    candidates = face_annotators(config.crop_margin)
    if va_model and not {"valence", "arousal"} <= set(columns):
        candidates.append(ValenceArousalAnnotator(va_model))
    needed = [a for a in candidates if not set(a.outputs) <= set(columns)]
    if any(isinstance(a, GearEthnicityAnnotator) for a in needed) and not is_fetched():
        raise FileNotFoundError(
            "the ethnicity model (GEAR) is not fetched: run `affectnet-plus fetch-models` once (needs npm), "
            "or build with --no-metadata"
        )
    return needed


def _annotate_rows(task) -> tuple[dict, list[dict]]:
    """Worker: runs the annotators over rows ``start:stop`` of a shard; returns the new columns and notes."""
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


def add_metadata(out: Path, work: Path, splits: list[str], annotators: list, features, options: BuildOptions,
                 batch_size: int = 32) -> None:  # fmt: skip
    """Runs the metadata annotators over every written crop and rewrites each shard with their columns.

    Shards are annotated in parallel (``options.num_proc`` processes; the models load once in each).
    Every value an annotator could not estimate is null, with its reason in ``metadata_notes.jsonl``.
    Resumable: a shard that already has the columns is skipped.
    """
    outputs = [c for a in annotators for c in a.outputs]
    shards = [(shard, split) for split in splits for shard in _default_shards(out, split)
              if not set(outputs) <= set(pq.read_schema(shard).names)]  # fmt: skip
    if not shards:
        return
    # Tasks are slices of shards, so that every process has work even when a build has one big shard.
    sizes = {shard: pq.ParquetFile(shard).metadata.num_rows for shard, _ in shards}
    tasks = [(shard, split, start, min(start + METADATA_TASK_ROWS, sizes[shard]), annotators, batch_size)
             for shard, split in shards for start in range(0, max(sizes[shard], 1), METADATA_TASK_ROWS)]  # fmt: skip
    bar = tqdm(total=sum(sizes.values()), desc="metadata", unit="img", disable=not options.progress)
    pool = None
    if options.num_proc > 1 and len(tasks) > 1:
        method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
        pool = multiprocessing.get_context(method).Pool(min(options.num_proc, len(tasks)), _one_thread)
    try:
        results = pool.imap(_annotate_rows, tasks) if pool else map(_annotate_rows, tasks)
        pending: dict[str, list] = {}
        for (shard, _, _, stop, *_), (columns, notes) in zip(tasks, results):
            parts = pending.setdefault(shard, [])
            parts.append((columns, notes))
            bar.update(sum(len(v) for v in columns.values()) // max(len(columns), 1))
            if stop < sizes[shard]:
                continue  # tasks come back in order: the shard is complete at its last slice
            table = pq.read_table(shard)
            for name in outputs:
                values = [v for columns, _ in parts for v in columns[name]]
                if name in table.column_names:
                    table = table.drop_columns([name])
                table = table.append_column(name, _arrow_column(features, name, values))
            _write_atomic(work / "notes" / f"{shard.stem}-metadata.jsonl", _jsonl([n for _, ns in parts for n in ns]), work)
            _write_parquet_atomic(shard, features, None, work, table=table.select(list(features)))
            del pending[shard]
    finally:
        if pool is not None:
            pool.close()
            pool.join()
        bar.close()


def _arrow_column(features, name: str, values: list) -> pa.Array:
    """One column in the Arrow type ``datasets`` writes for ``features[name]``."""
    from datasets import Features

    single = Features({name: features[name]})
    encoded = [single.encode_example({name: v})[name] for v in values]
    encoded = [e.tolist() if isinstance(e, np.ndarray) else e for e in encoded]  # Array2D landmarks
    return pa.array(encoded, type=single.arrow_schema.field(name).type)


def _landmark_table(shard: Path) -> tuple[list[str], np.ndarray | None, np.ndarray]:
    """image ids, (N, 68, 2) landmarks with NaN where missing (None without the column), human labels."""
    names = pq.read_schema(shard).names
    table = pq.read_table(shard, columns=[c for c in ("image_id", "landmarks", "human_label") if c in names])
    ids = table["image_id"].to_pylist()
    points = None
    if "landmarks" in table.column_names and ids:
        points = np.stack([np.full((68, 2), np.nan) if p is None else np.asarray(p, dtype=np.float64)
                           for p in table["landmarks"].to_pylist()])  # fmt: skip
    human = np.asarray(table["human_label"].to_pylist(), dtype=np.float64)
    return ids, points, np.where(np.isnan(human), -1, human).astype(np.int64)


def _shard_inputs(shard: Path, split: str, scores: dict, au_model: AUModel):
    """image ids, expert scores, AU scores (NaN rows where landmarks are missing) and human labels."""
    ids, points, human = _landmark_table(shard)
    missing = [i for i in ids if i not in scores]
    if missing:
        raise RuntimeError(f"no expert scores for {len(missing)} rows of {shard.name} (e.g. {missing[0]})")
    expert = np.stack([scores[i] for i in ids]).astype(np.float64) if ids else np.zeros((0, 8))
    au = au_model.scores(points, ids, split) if points is not None else np.full((len(ids), 8), np.nan)
    return ids, expert, au, human


def _fit_au(out: Path, work: Path, splits: list[str], fusion: FusionConfig, num_folds: int) -> AUModel:
    """Fits the shape model on every face of the build (no labels) and, with ``fusion.calibrate_au``,
    the AU calibration on the train rows. Kept in ``OUT/au_model.json``: a resumed build reuses it, and
    ``predict --au-model`` scores new photos with it."""
    saved = out / AU_MODEL_FILE
    if saved.is_file():
        return AUModel.from_json(json.loads(saved.read_text()))
    info, shape, calibration = {}, None, None
    faces = []
    for split in splits:
        for shard in _default_shards(out, split):
            _, points, human = _landmark_table(shard)
            if points is not None:
                faces.append(shape_moments(points[human != HUMAN_LABELS.index("non_face")]))
    count = sum(f[0] for f in faces)
    wanted = fusion.shape_components
    if wanted and count >= SHAPE_ROWS_PER_COMPONENT * wanted:
        shape = ShapeModel.from_moments(count, sum(f[1] for f in faces), sum(f[2] for f in faces), wanted)
        info["shape_model"] = {"components": wanted, "faces": count, "variance_kept": shape.variance_kept}
    elif wanted:
        info["shape_model"] = {"components": 0, "faces": count, "skipped": (
            f"{count} faces, fewer than {SHAPE_ROWS_PER_COMPONENT} per mode: landmarks used as they are")}
    if fusion.calibrate_au:
        features, labels, ids = [], [], []
        for shard in _default_shards(out, "train") if "train" in splits else []:
            shard_ids, points, human = _landmark_table(shard)
            if points is not None:
                features.append(au_features(points, shape_model=shape))
                labels.append(human)
                ids += shard_ids
        if not features:  # AUCalibration.fit names what is missing when there are rows but no usable labels
            raise ValueError("--calibrate-au needs train rows with landmarks; there are none")
        calibration = AUCalibration.fit(np.concatenate(features), np.concatenate(labels), folds(ids, num_folds),
                                        num_folds, fusion.au_l2)  # fmt: skip
        info["calibration"] = {"rows": calibration.rows, "num_folds": num_folds, "l2": fusion.au_l2}
    model = AUModel(shape, calibration, num_folds, info)
    _write_atomic(saved, json.dumps(model.to_json()), work)
    return model


def _fit_fusion(out: Path, work: Path, splits: list[str], scores_dir: Path, fusion: FusionConfig,
                au_model: AUModel) -> dict:  # fmt: skip
    """Fits λ and T on the labelled rows (not the unlabeled split: its labels are automatic) once,
    and keeps the result in ``.build/fusion.json`` so that a resumed build fuses with the same."""
    from models.labeling import read_scores

    saved = work / "fusion.json"
    if saved.is_file():
        return json.loads(saved.read_text())
    expert, au, human = [], [], []
    for split in splits:
        if split == "unlabeled":
            continue
        scores = read_scores(scores_dir, split)
        for shard in _default_shards(out, split):
            _, e, a, h = _shard_inputs(shard, split, scores, au_model)
            expert.append(e), au.append(a), human.append(h)
    if not expert:
        raise ValueError("--fit-fusion needs labelled rows (train or validation); this build has none")
    fitted, info = fit_fusion(np.concatenate(expert), np.concatenate(au), np.concatenate(human), fusion)
    result = {**asdict(fitted), "fitted_on": info}
    _write_atomic(saved, json.dumps(result, indent=2), work)
    return result


def add_soft_labels(out: Path, work: Path, splits: list[str], experts: str, fusion: FusionConfig, features,
                    options: BuildOptions) -> dict:  # fmt: skip
    """Scores every written row with the experts, fuses with the AU component and rewrites each shard.

    Returns the fusion parameters used (fitted ones with ``fusion.fit``). Resumable: the expert
    scores are kept in ``.build/scores`` (finished when ``DONE`` exists), fitted parameters in
    ``.build/fusion.json``, and a shard that already carries ``soft_label`` is not rewritten.
    """
    from models.labeling import LabelConfig, label, read_scores

    scores_dir = work / "scores"
    if not (scores_dir / "DONE").is_file():
        label(LabelConfig(str(out), experts, str(scores_dir), num_workers=min(4, options.num_proc)))
        (scores_dir / "DONE").write_text("")
    num_folds = int(json.loads(Path(experts).read_text())["num_folds"])
    au_model = _fit_au(out, work, splits, fusion, num_folds)
    used = _fit_fusion(out, work, splits, scores_dir, fusion, au_model) if fusion.fit else asdict(fusion)
    fusion = FusionConfig(**{k: v for k, v in used.items() if k != "fitted_on"})
    for split in splits:
        scores = read_scores(scores_dir, split)
        for shard in _default_shards(out, split):
            if "soft_label" in pq.read_schema(shard).names:
                continue
            _, expert, au, human = _shard_inputs(shard, split, scores, au_model)
            soft = fuse(expert, au, fusion)
            validate(soft)
            table = pq.read_table(shard)
            new = {
                "soft_label": soft,
                "subset": subsets(soft, human, fusion),
                "expert_probs": expert,
                "au_scores": au,
            }
            for name, values in new.items():
                if name in table.column_names:  # a release's own soft labels are replaced
                    table = table.drop_columns([name])
                if name == "subset":
                    array = pa.array(values, type=pa.int64())
                else:
                    rows = [None if np.isnan(r).any() else r.astype(np.float32).tolist() for r in values]
                    array = pa.array(rows, type=pa.list_(pa.float32(), 8))
                table = table.append_column(name, array)
            table = table.select(list(features))
            _write_parquet_atomic(shard, features, None, work, table=table)
    return {**used, "au_model": au_model.info}


def build(
    source,
    out,
    config: AffectNetPlusConfig,
    options: BuildOptions | None = None,
    experts: str | None = None,
    fusion: FusionConfig | None = None,
    recompute: bool = False,
    metadata: bool = False,
    va_model: str | None = None,
) -> dict:
    """Reads ``source`` and writes the AffectNet+ folder ``out``; returns the build report.

    Args:
        source: the source root (a folder; a CSV file for ``source_format="csv"``).
        out: output folder; created, resumed after a crash, or refused if it holds another build.
        config: how the source is read (format, crop size and margin, JPEG quality, ...).
        options: sharding, worker processes, progress bars.
        experts: an expert ``manifest.json``; with it the build adds ``soft_label``, ``subset``,
            ``expert_probs`` and ``au_scores`` (DESIGN §5), replacing a release's own soft labels.
        fusion: the fusion and subset parameters (``FusionConfig()`` by default).
        recompute: with ``experts``, replace soft labels and subsets that the source already has (the
            official release's); without it such a build is refused, so release labels are never lost
            by accident.
        metadata: fill the metadata columns the source lacks with the offline face models
            (``metadata_annotators``: landmarks, head pose, age and gender, ethnicity); with
            ``config.detect_faces`` the faces of uncropped images are found first.
        va_model: with ``metadata``, a valence/arousal regressor (``scripts/train_va.py``) that
            estimates valence and arousal when the source has none.

    Every source row ends as a written row or as a line of ``rejects.jsonl``; the report's
    ``read == written + sum(rejected)`` is checked before the build is declared finished.
    """
    options = options or BuildOptions()
    fusion = fusion or FusionConfig()
    out = Path(out)
    reader = open_source(source, config)
    if experts and "soft_label" in reader.columns and not recompute:
        raise ValueError(
            f"{source} already has soft labels and subsets ({config.source_format}); they are kept unless you "
            "pass --recompute to replace them with the experts' (or drop --experts)"
        )
    base_columns = [c for c in reader.columns if not (experts and c in SOFT_LABEL_COLUMNS)]
    if va_model and not metadata:
        raise ValueError("a valence/arousal model is one of the metadata annotators: it needs --metadata")
    annotators = metadata_annotators(base_columns, config, va_model) if metadata else []
    crop_features = select_features(base_columns, reader.ethnicity_classes)
    annotated = [*base_columns, *(c for a in annotators for c in a.outputs if c not in base_columns)]
    features = select_features(annotated, reader.ethnicity_classes)
    final_features = (
        select_features([*annotated, *SOFT_LABEL_COLUMNS], reader.ethnicity_classes) if experts else features
    )
    fingerprint = _fingerprint(source, config, options)
    if annotators:
        fingerprint["metadata"] = {a.name: a.provenance() for a in annotators}
    if experts:
        manifest = Path(experts)
        if not manifest.is_file():
            raise FileNotFoundError(f"no expert manifest at {experts}")
        fingerprint["experts"] = {"manifest": manifest.parent.name + "/" + manifest.name,
                                  "manifest_sha256": hashlib.sha256(manifest.read_bytes()).hexdigest()[:16],
                                  "fusion": asdict(fusion)}  # fmt: skip
    work = _prepare_output(out, fingerprint, options.overwrite)
    splits = reader.splits()

    pool = None
    if options.num_proc > 1:
        # fork where there is one: workers start in milliseconds with the modules already imported
        # (spawn re-imports datasets/pyarrow in each, ~1 s). They only decode images, so the locks a
        # forked child may inherit from the parent's threads are never taken.
        method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
        pool = multiprocessing.get_context(method).Pool(
            options.num_proc, initializer=_init_worker, initargs=(config, tuple(crop_features))
        )
    else:
        _init_worker(config, tuple(crop_features))
    try:
        seen: set[str] = set()
        read = {split: _build_split(reader, split, out, work, crop_features, options, pool, seen) for split in splits}
    finally:
        if pool is not None:
            pool.close()
            pool.join()

    written_splits = [s for s in splits if _default_shards(out, s)]
    if annotators:
        add_metadata(out, work, written_splits, annotators, features, options)
    if experts:
        fusion_used = add_soft_labels(out, work, written_splits, experts, fusion, final_features, options)
        features = final_features
    for split in written_splits:
        _derive_labels(out, work, split, features)
        if "subset" in features:
            for subset in range(len(SUBSETS)):
                _derive_subset(out, work, split, features, subset, options.shard_rows)

    report = _report(out, work, read, fingerprint)
    if experts:
        import torch

        from models.labeling import resolve_precision

        report["fusion"] = fusion_used
        # label() runs on the default device, in the precision that device computes fast
        report["expert_precision"] = resolve_precision("cuda" if torch.cuda.is_available() else "cpu")
    rejects = b"".join(p.read_bytes() for split in splits for p in sorted((work / "rejects").glob(f"{split}-*.jsonl")))
    _write_atomic(out / "rejects.jsonl", rejects, work)
    notes = b"".join(p.read_bytes() for split in splits for p in sorted((work / "notes").glob(f"{split}-*.jsonl")))
    if notes:
        _write_atomic(out / "metadata_notes.jsonl", notes, work)
        report["metadata_notes"] = _count_notes(notes)
    _write_atomic(out / "README.md", str(render_card(out, reader, config, report, features)), work)
    _write_atomic(out / "build_report.json", json.dumps(report, indent=2, sort_keys=True) + "\n", work)
    shutil.rmtree(work)
    return report


def _count_notes(notes: bytes) -> dict:
    """Per column, how many values are null and why; and how many images had several faces."""
    nulls: dict[str, Counter] = {}
    several = 0
    for line in notes.decode().splitlines():
        note = json.loads(line)
        for column, reason in note.get("reasons", {}).items():
            nulls.setdefault(column, Counter())[reason] += 1
        several += note.get("info", {}).get("faces_detected", 0) > 1
    return {"null": {c: dict(sorted(r.items())) for c, r in sorted(nulls.items())}, "several_faces": several}


def _report(out: Path, work: Path, read: dict[str, int], fingerprint: dict) -> dict:
    """Counts from the files actually written; raises if any source row is unaccounted for."""
    rejected_by_split: dict[str, Counter] = {}
    for path in sorted((work / "rejects").glob("*.jsonl")):
        for line in path.read_text().splitlines():
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
        shards = _default_shards(out, split)
        if shards and "au_scores" in pq.read_schema(shards[0]).names:
            without_landmarks[split] = sum(
                pq.read_table(p, columns=["au_scores"])["au_scores"].null_count for p in shards
            )
    report = {
        "read": sum(s["read"] for s in per_split.values()),
        "written": sum(s["written"] for s in per_split.values()),
        "rejected": dict(sorted(total_rejected.items())),
        "splits": per_split,
        "configs": configs,
        "fingerprint": fingerprint,
    }
    if without_landmarks:  # rows whose soft label comes from the experts alone
        report["soft_labels_without_landmarks"] = without_landmarks
    return report
