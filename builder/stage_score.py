"""Build stage 3, score: the cross-fitted expert probabilities of every crop (``docs/method.md`` §3).

A train row in fold j is scored by the fold-j expert of each emotion (the one that never saw it), every
other row by the mean over the K experts of each emotion (``models.labeling.score_batch``). Outputs in
``OUT/.build/score/``: per crop shard, ``<shard>.parquet`` with ``image_id`` and ``expert_probs``
(float32, the raw one-vs-rest probabilities). The crops are read straight from the crop shards, so
they are never copied into a ``datasets`` cache. The experts run on the GPU when there is one, in the
precision ``models.labeling.resolve_precision`` picks for the device.

Fingerprint (``fingerprint``): the crop stage's digest, the manifest's sha256 and fold count, the
sha256 of every expert's ``model.safetensors``, ``config.json`` and ``preprocessor_config.json``, and
the device type and precision.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from tqdm.auto import tqdm

from builder.stage import Stage, file_sha256, write_parquet_atomic
from core.schema import folds, select_features

NAME = "score"
BATCH_SIZE = 256
EXPERT_FILES = ("model.safetensors", "config.json", "preprocessor_config.json")


def device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def experts_fingerprint(manifest: Path) -> dict:
    """The manifest (named by its folder, never its absolute path) and the digest of every expert file."""
    data = json.loads(manifest.read_text())
    files = {}
    for entry in sorted(data["experts"], key=lambda e: (e["emotion"], int(e["fold"]))):
        folder = manifest.parent / entry["path"]
        for name in EXPERT_FILES:
            if (folder / name).is_file():
                files[f"{entry['emotion']}/{entry['fold']}/{name}"] = file_sha256(folder / name)
    return {
        "manifest": manifest.parent.name + "/" + manifest.name,
        "manifest_sha256": file_sha256(manifest),
        "num_folds": int(data["num_folds"]),
        "files_sha256": files,
    }


def fingerprint(crop_digest: str, manifest: Path) -> dict:
    from models.labeling import resolve_precision

    return {
        "crop": crop_digest,
        "experts": experts_fingerprint(manifest),
        "device": device(),
        "precision": resolve_precision(device()),
    }


class _Crops(torch.utils.data.Dataset):
    """The JPEG cells of one crop shard -> (uint8 tensor (3, size, size), row index)."""

    def __init__(self, cells: list, size: int):
        self.cells, self.size = cells, size

    def __len__(self) -> int:
        return len(self.cells)

    def __getitem__(self, index: int):
        from models.transforms import decode_image

        return decode_image(self.cells[index], self.size), index


def run(stage: Stage, crop_dir: Path, shards: list[str], manifest: Path, num_workers: int, progress: bool) -> dict:
    """Runs (or resumes, or skips) the score stage over the crop shards ``shards``."""
    if not stage.start():
        return stage.result()
    from models.labeling import load_ensemble, score_loader
    from models.training import make_loader
    from models.transforms import BatchTransform

    todo = [name for name in shards if not (stage.dir / name).is_file()]
    features = select_features(["image_id", "expert_probs"])
    bar = tqdm(total=sum(pq.ParquetFile(crop_dir / n).metadata.num_rows for n in todo), desc="score", unit="img",
               disable=not progress)  # fmt: skip
    ensemble = load_ensemble(manifest, device()) if todo else None
    if ensemble is not None:
        transform = BatchTransform(ensemble.image_size, ensemble.mean, ensemble.std).eval().to(device())
    for name in todo:
        table = pq.read_table(crop_dir / name, columns=["image_id", "image"])
        ids = table["image_id"].to_pylist()
        row_folds = folds(ids, ensemble.num_folds) if name.startswith("train-") else None
        loader = make_loader(_Crops(table["image"].to_pylist(), ensemble.image_size), BATCH_SIZE,
                             num_workers=num_workers if len(ids) > BATCH_SIZE else 0)  # fmt: skip
        scores = score_loader(ensemble, transform, loader, row_folds, device(), on_batch=bar.update)
        probs = pa.array([row.tolist() for row in scores.astype(np.float32)], type=pa.list_(pa.float32(), 8))
        write_parquet_atomic(
            stage.dir / name, features, stage.work, table=pa.table({"image_id": ids, "expert_probs": probs})
        )
        stage.wrote()
    bar.close()
    return stage.finish()
