"""Build stage 5, fuse: soft labels and complexity subsets (``docs/method.md`` §5, §6).

Per crop shard: the AU component of its landmarks (the fit stage's ``AUModel``; train rows
cross-fitted), fused with its expert scores by ``builder.softlabel.fuse`` under the λ used
(fitted or given), checked by ``validate``, and the subsets against its human labels. A row without
landmarks, or with degenerate ones (``builder.au.degenerate_landmarks``: all points equal, points on
a line, ...), has null ``au_scores`` and a soft label from the experts alone; a degenerate row is
noted (``{"reasons": {"au_scores": "degenerate_landmarks"}}``) so that ``metadata_notes.jsonl`` and the
card say so. Outputs in ``OUT/.build/fuse/``: ``<shard>.parquet`` with ``image_id``, ``soft_label``,
``subset``, ``expert_probs`` and ``au_scores``, and ``notes/<shard stem>.jsonl``, written before it.

Fingerprint: the crop, metadata, score and fit stages' digests, the ``SubsetConfig`` and, when λ
are not fitted, the ``FusionConfig`` (fitted ones are the fit stage's, in its digest).
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from builder.au import AUModel
from builder.softlabel import FusionConfig, SubsetConfig, fuse, subsets, validate
from builder.stage import Stage, jsonl, write_atomic, write_parquet_atomic
from builder.stage_fit import read_landmarks
from core.schema import select_features

NAME = "fuse"
DEGENERATE = "degenerate_landmarks"
COLUMNS = ("soft_label", "subset", "expert_probs", "au_scores")


def fingerprint(crop: str, metadata: str | None, score: str, fit: str, fusion: FusionConfig,
                subset_config: SubsetConfig) -> dict:  # fmt: skip
    result = {"crop": crop, "metadata": metadata, "score": score, "fit": fit, "subsets": asdict(subset_config)}
    if not fusion.fit:
        result["fusion"] = asdict(fusion)
    return result


def _prob8(rows: np.ndarray) -> pa.Array:
    """(N, 8) float rows as a list<float32>[8] column, null where a row is NaN."""
    values = [None if np.isnan(r).any() else r.astype(np.float32).tolist() for r in rows]
    return pa.array(values, type=pa.list_(pa.float32(), 8))


def notes_path(stage_dir: Path, shard: str) -> Path:
    return stage_dir / "notes" / f"{Path(shard).stem}.jsonl"


def run(stage: Stage, shards: list[str], dirs: list[Path], score_dir: Path, au_model: AUModel,
        fusion: FusionConfig, subset_config: SubsetConfig, progress: bool) -> dict:  # fmt: skip
    """Runs (or resumes, or skips) the fuse stage; ``fusion`` holds the λ to use.

    Returns ``{"degenerate_landmarks": {split: rows}}``.
    """
    if not stage.start():
        return stage.result()
    features = select_features(["image_id", *COLUMNS])
    for name in tqdm(shards, desc="fuse", unit="shard", disable=not progress):
        if (stage.dir / name).is_file():  # written by an interrupted run of this stage
            continue
        split = name.split("-")[0]
        ids, points, human, degenerate = read_landmarks(name, dirs)
        scores = pq.read_table(score_dir / name)
        if scores["image_id"].to_pylist() != ids:
            raise RuntimeError(f"the expert scores of {name} do not list its rows")
        expert = np.asarray(scores["expert_probs"].to_pylist(), dtype=np.float64).reshape(len(ids), 8)
        au = au_model.scores(points, ids, split) if points is not None else np.full((len(ids), 8), np.nan)
        soft = fuse(expert, au, fusion)
        validate(soft)
        table = pa.table({
            "image_id": pa.array(ids, type=pa.string()),
            "soft_label": _prob8(soft),
            "subset": pa.array(subsets(soft, human, subset_config), type=pa.int64()),
            "expert_probs": _prob8(expert),
            "au_scores": _prob8(au),
        })  # fmt: skip
        notes = [{"split": split, "image_id": ids[i], "reasons": {"au_scores": DEGENERATE}}
                 for i in np.flatnonzero(degenerate)]  # fmt: skip
        write_atomic(notes_path(stage.dir, name), jsonl(notes), stage.work)
        write_parquet_atomic(stage.dir / name, features, stage.work, table=table)
        stage.wrote()
    counts: dict[str, int] = {}
    for name in shards:
        lines = notes_path(stage.dir, name).read_text().splitlines()
        counts[name.split("-")[0]] = counts.get(name.split("-")[0], 0) + len(lines)
    return stage.finish({DEGENERATE: counts})
