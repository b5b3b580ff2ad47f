"""Build stage 3, score: the cross-fitted expert probabilities of every crop (``docs/method.md`` §3).

A train row in fold j is scored by the fold-j expert of each emotion (the one that never saw it), every
other row by the mean over the K experts of each emotion (``models.labeling.score_batch``). Outputs in
``OUT/.build/score/``: per crop shard, ``<shard>.parquet`` with ``image_id`` and ``expert_probs``
(float32, the raw one-vs-rest probabilities). The crops are read straight from the crop shards, so
they are never copied into a ``datasets`` cache. The experts run on the GPU when there is one, in the
precision ``models.features.resolve_precision`` picks for the device.

Fingerprint (``fingerprint``): the crop stage's digest, the manifest's sha256 and fold count, the
sha256 of every expert's ``model.safetensors``, ``config.json`` and ``preprocessor_config.json``, and
the device type and precision.

Cross-fitting holds only for the rows the experts were trained on (``docs/method.md`` §3), so the build
refuses a manifest whose fold plan (K, the fold rule, the digest of the train ids) is not that of its
own train rows (``check_fold_plan``): first what the manifest alone tells, before anything runs, then
the train ids, once the crop stage has written them and before any model runs on them.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from tqdm.auto import tqdm

from builder.stage import Stage, file_sha256, read_columns, write_parquet_atomic
from core.schema import fold_plan, fold_plan_mismatch, folds, select_features

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


# What the manifest alone tells: the train ids need the build's rows (models.labeling.check_manifest_plan).
MANIFEST_PLAN_KEYS = ("num_folds", "rule")
RETRAIN = (
    "To train experts on this data: build it without --experts (affectnet-plus build SOURCE --out STAGE), then "
    "affectnet-plus train-experts --data STAGE --output-dir EXPERTS, and pass EXPERTS/manifest.json."
)


def check_fold_plan(manifest: Path, train_ids: list[str] | None = None) -> None:
    """Raises ``ValueError`` unless the manifest's experts were trained under this build's fold plan.

    Without ``train_ids`` only what the manifest alone tells is checked: that it records a plan, with its
    own K and the fold rule of ``core.schema``. With them (the image_ids of the build's written train rows),
    also that the experts were trained on exactly those rows (``models.labeling.check_manifest_plan``).
    """
    data = json.loads(manifest.read_text())
    recorded = data.get("fold_plan")
    if not isinstance(recorded, dict):
        raise ValueError(
            f"{manifest} records no fold plan (the K, fold rule and train rows its experts were trained under; "
            "train-experts writes it), so this build cannot make sure that no train row is scored by an expert "
            f"that trained on it (docs/method.md §3). {RETRAIN}"
        )
    if train_ids is None:
        expected = fold_plan([], int(data["num_folds"]))
        differing = fold_plan_mismatch(recorded, {k: expected[k] for k in MANIFEST_PLAN_KEYS})
        if differing:
            details = "; ".join(f"{k} is {recorded.get(k)!r} in its fold plan, {expected[k]!r} for this build"
                                for k in differing)  # fmt: skip
            raise ValueError(
                f"the experts of {manifest} were trained under another fold plan than this build uses ({details}): "
                f"a train row could be scored by an expert that trained on it (docs/method.md §3). {RETRAIN}"
            )
        return
    from models.labeling import check_manifest_plan

    try:
        check_manifest_plan(data, train_ids)
    except ValueError as err:
        raise ValueError(f"{manifest}, on this build's {len(train_ids)} train rows: {err}. {RETRAIN}") from None


def train_ids(dirs: list[Path], shards: list[str]) -> list[str]:
    """The image_ids of the written train rows: of the train shards, each read from the first of ``dirs``
    (the crop stage's folder, then the score stage's: the export consumes crop shards) that has it."""
    return [i for name in shards if name.startswith("train-")
            for i in read_columns(name, dirs, ["image_id"])["image_id"].to_pylist()]  # fmt: skip


def fingerprint(crop_digest: str, manifest: Path) -> dict:
    from models.features import resolve_precision

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
        scores = score_loader(ensemble, transform, loader, row_folds, device(), on_batch=bar.update, image_ids=ids)
        probs = pa.array([row.tolist() for row in scores.astype(np.float32)], type=pa.list_(pa.float32(), 8))
        write_parquet_atomic(
            stage.dir / name, features, stage.work, table=pa.table({"image_id": ids, "expert_probs": probs})
        )
        stage.wrote()
    bar.close()
    return stage.finish()
