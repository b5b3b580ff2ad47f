"""Cross-fitted expert probabilities for every row of a built dataset (``docs/method.md`` §3).

A train row in fold j is scored by the fold-j expert of each emotion, the one that never saw it;
validation and unlabeled rows by the mean over the K experts of each emotion. Rows are cut into
shards of ``shard_rows``; process i of n scores shards i, i + n, ...; each shard is written
atomically as ``OUT/<split>-NNNNN.parquet`` (``image_id``, ``expert_probs``), so a re-run after a
crash scores only the shards that are missing.

Example:
    >>> from models.labeling import LabelConfig, label  # doctest: +SKIP
    >>> label(LabelConfig(data="affectnet_plus", experts="experts/manifest.json", out="scores"))  # doctest: +SKIP
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from transformers import AutoImageProcessor, ViTForImageClassification

from core.schema import EMOTIONS, folds
from models.data import FaceDataset, load_splits
from models.expert import expert_labels
from models.training import make_loader
from models.transforms import BatchTransform
from models.vit import check_safetensors

SCORES_SCHEMA = pa.schema([("image_id", pa.string()), ("expert_probs", pa.list_(pa.float32(), len(EMOTIONS)))])


@dataclass
class LabelConfig:
    """Where the data, the experts and the scores are, and how to batch.

    Args:
        data: a built AffectNet+ folder.
        experts: the ``manifest.json`` written by ``affectnet-plus train-experts``.
        out: folder of the score shards.
        batch_size: images per forward pass and process.
        num_workers: DataLoader workers decoding images.
        shard_rows: rows per output shard (the unit of resuming and of work between processes).
        precision: ``auto`` runs the experts in bfloat16 on GPUs and on CPUs that compute it in
            hardware (AVX512-BF16 / AMX: ~1.7x faster; probabilities move by ~1e-3), float32
            elsewhere; ``fp32`` and ``bf16`` force one.
    """

    data: str
    experts: str
    out: str
    batch_size: int = 256
    num_workers: int = 4
    shard_rows: int = 8192
    precision: str = field(default="auto", metadata={"choices": ("auto", "fp32", "bf16")})

    def __post_init__(self):
        if self.batch_size < 1 or self.shard_rows < 1 or self.num_workers < 0:
            raise ValueError("batch_size and shard_rows must be >= 1, num_workers >= 0")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise ValueError(f"precision must be auto, fp32 or bf16, got {self.precision!r}")


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bfloat16 in hardware (Linux flags avx512_bf16 / amx_bf16); emulated
    bfloat16 would be slower than float32."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(device: torch.device | str, precision: str = "auto") -> str:
    """``bf16`` or ``fp32``: what ``precision`` means on ``device`` (see ``LabelConfig.precision``)."""
    device = torch.device(device)
    if precision == "auto":
        return "bf16" if device.type == "cuda" or (device.type == "cpu" and cpu_has_bf16()) else "fp32"
    return precision


def autocast_for(device: torch.device | str, precision: str = "auto"):
    """The autocast context the experts run under on ``device``."""
    device = torch.device(device)
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=resolve_precision(device, precision) == "bf16")


@dataclass
class Ensemble:
    """The 8 x K experts of a manifest: ``models[emotion][fold]``, plus their shared input format."""

    models: list[list[torch.nn.Module]]
    paths: list[list[Path]]
    num_folds: int
    image_size: int
    mean: tuple
    std: tuple


def load_ensemble(manifest_path, device: torch.device | str = "cpu") -> Ensemble:
    """Loads and checks every expert of a manifest; errors name what is missing or inconsistent."""
    manifest_path = Path(manifest_path)
    if not manifest_path.is_file():
        raise FileNotFoundError(f"no expert manifest at {manifest_path}")
    manifest = json.loads(manifest_path.read_text())
    num_folds = int(manifest["num_folds"])
    entries = {(e["emotion"], int(e["fold"])): manifest_path.parent / e["path"] for e in manifest["experts"]}
    missing = [f"{e} fold {f}" for e in EMOTIONS for f in range(num_folds) if (e, f) not in entries]
    if missing:
        raise ValueError(f"{manifest_path} lacks experts for: {', '.join(missing)}")
    models, paths, formats = [], [], set()
    for emotion in EMOTIONS:
        row_models, row_paths = [], []
        for fold in range(num_folds):
            path = entries[(emotion, fold)]
            check_safetensors(str(path))
            model = ViTForImageClassification.from_pretrained(path, use_safetensors=True)
            if {int(k): v for k, v in model.config.id2label.items()} != expert_labels(emotion):
                raise ValueError(
                    f"expert {path} has labels {model.config.id2label}, expected {expert_labels(emotion)} "
                    f"for the {emotion} fold {fold} entry"
                )
            processor = AutoImageProcessor.from_pretrained(path)
            formats.add((model.config.image_size, tuple(processor.image_mean), tuple(processor.image_std)))
            row_models.append(model.eval().to(device))
            row_paths.append(path)
        models.append(row_models)
        paths.append(row_paths)
    if len(formats) != 1:
        raise ValueError(f"the experts of {manifest_path} expect different inputs: {sorted(formats)}")
    image_size, mean, std = formats.pop()
    return Ensemble(models, paths, num_folds, image_size, mean, std)


@torch.inference_mode()
def score_batch(ensemble: Ensemble, pixels: torch.Tensor, row_folds: torch.Tensor | None) -> torch.Tensor:
    """(B, 3, H, W) normalised pixels -> (B, 8) P(emotion present).

    ``row_folds`` (B,) gives each train row's fold (its own fold's expert scores it); ``None`` averages
    every fold's expert (validation, unlabeled rows).
    """
    scores = torch.empty(len(pixels), len(EMOTIONS), device=pixels.device)
    for k, experts in enumerate(ensemble.models):
        if row_folds is None:
            probs = torch.stack([m(pixel_values=pixels).logits.float().softmax(-1)[:, 1] for m in experts]).mean(0)
            _check_finite(probs, ensemble.paths[k])
            scores[:, k] = probs
            continue
        for fold, expert in enumerate(experts):
            rows = (row_folds == fold).nonzero().squeeze(1)
            if len(rows):
                probs = expert(pixel_values=pixels[rows]).logits.float().softmax(-1)[:, 1]
                _check_finite(probs, [ensemble.paths[k][fold]])
                scores[rows, k] = probs
    return scores


@torch.inference_mode()
def score_loader(ensemble: Ensemble, transform, loader, row_folds: np.ndarray | None, device, precision: str = "auto",
                 on_batch=None) -> np.ndarray:  # fmt: skip
    """(N, 8) expert probabilities of every batch ``(uint8 images, row indices)`` that ``loader`` yields.

    ``row_folds[i]`` is the fold of train row ``i`` (its own fold's experts score it); ``None`` averages
    every fold's expert. ``on_batch(n)`` is called after each batch of ``n`` rows (progress bars).
    """
    autocast = autocast_for(device, precision)
    parts = []
    for images, rows in loader:
        pixels = transform(images.to(device, non_blocking=True))
        batch_folds = None if row_folds is None else torch.as_tensor(row_folds[rows.numpy()], device=pixels.device)
        with autocast:
            parts.append(score_batch(ensemble, pixels, batch_folds).cpu().numpy())
        if on_batch is not None:
            on_batch(len(images))
    return np.concatenate(parts) if parts else np.zeros((0, len(EMOTIONS)), np.float32)


def _check_finite(probs: torch.Tensor, paths) -> None:
    if not torch.isfinite(probs).all():
        raise FloatingPointError(f"expert {', '.join(map(str, paths))} returned NaN or inf scores")


def _write_shard(path: Path, image_ids: list[str], scores: np.ndarray) -> None:
    table = pa.table(
        {"image_id": image_ids, "expert_probs": [row.tolist() for row in scores.astype(np.float32)]},
        schema=SCORES_SCHEMA,
    )
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    pq.write_table(table, tmp)
    os.replace(tmp, path)


def label(config: LabelConfig, accelerator=None) -> dict:
    """Scores every row of ``config.data`` with the ensemble; returns ``{split: rows scored}``.

    Runs in one process, or in each process of an ``accelerate launch``; shards already written are
    skipped, so a re-run finishes what a crash left.
    """
    from accelerate import Accelerator

    accelerator = accelerator or Accelerator()
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    ensemble = load_ensemble(config.experts, accelerator.device)
    transform = BatchTransform(ensemble.image_size, ensemble.mean, ensemble.std).eval().to(accelerator.device)
    with accelerator.main_process_first():
        splits = load_splits(config.data)
    counts = {}
    for split_name, split in splits.items():
        ids = list(split["image_id"])  # one read of the column, not one per row
        row_folds = folds(ids, ensemble.num_folds) if split_name == "train" else None
        dataset = FaceDataset(split, np.arange(len(split)), ensemble.image_size)
        num_shards = math.ceil(len(split) / config.shard_rows)
        for shard in range(accelerator.process_index, num_shards, accelerator.num_processes):
            path = out / f"{split_name}-{shard:05d}.parquet"
            if path.is_file():
                continue
            rows = list(range(shard * config.shard_rows, min(len(split), (shard + 1) * config.shard_rows)))
            loader = make_loader(
                torch.utils.data.Subset(dataset, rows), config.batch_size, num_workers=config.num_workers
            )
            scores = score_loader(ensemble, transform, loader, row_folds, accelerator.device, config.precision)
            _write_shard(path, [ids[i] for i in rows], scores)
        counts[split_name] = len(split)
    accelerator.wait_for_everyone()
    return counts


def read_scores(out, split: str) -> dict[str, np.ndarray]:
    """``{image_id: expert_probs}`` of one split from the shards in ``out``."""
    table = pa.concat_tables([pq.read_table(p) for p in sorted(Path(out).glob(f"{split}-*.parquet"))])
    scores = np.asarray(table["expert_probs"].to_pylist(), dtype=np.float32)
    return dict(zip(table["image_id"].to_pylist(), scores))
