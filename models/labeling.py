"""Cross-fitted expert probabilities for every row of a built dataset (``docs/method.md`` §3).

A train row in fold j is scored by the fold-j expert of each emotion, the one that never saw it;
validation and unlabeled rows by the mean over the K experts of each emotion. Rows are cut into
shards of ``shard_rows``; process i of n scores shards i, i + n, ...; each shard is written
atomically as ``OUT/<split>-NNNNN.parquet`` (``image_id``, ``expert_probs``), so a re-run after a
crash scores only the shards that are missing.

The contract is checked first: the manifest's fold plan must be that of the data's train rows
(``check_manifest_plan``). Experts that share a frozen backbone (the frozen experts of one init) run it
once per image and all their heads in one matmul; rows whose features are already in the manifest's
feature cache (``models.features``) skip the backbone. Experts with backbones of their own each run
theirs. Either way a row gets the scores its experts' own forward passes give.

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
import torch.nn.functional as F

from core.schema import EMOTIONS, fold_plan, fold_plan_mismatch, folds
from models.data import FaceDataset, load_splits
from models.expert import expert_labels, quiet_libraries
from models.features import PRECISIONS, autocast_for, resolve_precision
from models.training import RESULTS_FILE, make_loader
from models.transforms import BatchTransform
from models.vit import FAMILIES, check_safetensors, processor_size

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
            hardware (AVX512-BF16 / AMX: ~1.7x faster; probabilities move by ~1e-3 with the tiny preset,
            up to ~3e-2 through a 12-layer ViT-S/14), float32 elsewhere; ``fp32`` and ``bf16`` force one.
            Rows of a frozen backbone's feature cache computed at the same precision skip the backbone.
    """

    data: str
    experts: str
    out: str
    batch_size: int = 256
    num_workers: int = 4
    shard_rows: int = 8192
    precision: str = field(default="auto", metadata={"choices": PRECISIONS})

    def __post_init__(self):
        if self.batch_size < 1 or self.shard_rows < 1 or self.num_workers < 0:
            raise ValueError("batch_size and shard_rows must be >= 1, num_workers >= 0")
        resolve_precision("cpu", self.precision)  # a ValueError names the choices


@dataclass
class ExpertGroup:
    """Experts that run one backbone: a fine-tuned expert alone, or all the frozen experts of one init.

    ``members[i]`` is ``(emotion index, fold)``; ``weight`` ``(2M, D)`` and ``bias`` ``(2M,)`` stack their
    classifiers, so every head of the group is one matmul on the backbone's features. ``digest`` names the
    shared backbone's features (``models.features.backbone_digest``) when the group reads a feature cache.
    """

    backbone: torch.nn.Module
    family: str
    members: list[tuple[int, int]]
    weight: torch.Tensor
    bias: torch.Tensor
    paths: list[Path]
    digest: str | None = None
    cache: object = None  # a read-only models.features.FeatureCache of ``digest``, when the manifest has one


@dataclass
class Ensemble:
    """The 8 x K experts of a manifest, as ``groups`` of experts sharing a backbone, plus their shared input
    format. ``paths[emotion][fold]`` is each expert's folder; ``manifest`` the manifest's content."""

    groups: list[ExpertGroup]
    paths: list[list[Path]]
    num_folds: int
    image_size: int
    mean: tuple
    std: tuple
    manifest: dict = field(default_factory=dict)


def check_manifest_plan(manifest, train_ids) -> None:
    """Raises ``ValueError`` unless the experts of ``manifest`` (its content, or the path of
    ``manifest.json``) were trained under the fold plan of ``train_ids``, the train rows about to be scored.

    Cross-fitting scores a train row of fold j with the fold-j experts, which never saw it; that holds only
    for the train rows the experts were trained on, cut into the same K folds by the same rule. The
    manifest's ``fold_plan`` (``core.schema.fold_plan``) must match on ``num_folds``, ``rule`` and
    ``train_ids_sha256``; the error names the keys that differ.

    Example:
        >>> check_manifest_plan("experts/manifest.json", splits["train"]["image_id"])  # doctest: +SKIP
    """
    if not isinstance(manifest, dict):
        manifest = json.loads(Path(manifest).read_text())
    expected = fold_plan(list(train_ids), int(manifest["num_folds"]))
    recorded = manifest.get("fold_plan")
    differ = fold_plan_mismatch(recorded, expected)
    if not differ:
        return
    if not recorded:
        raise ValueError(
            "the expert manifest records no fold plan (num_folds, rule, train_ids_sha256), so nothing shows that "
            "its experts never saw the train rows they would score; train them again with `affectnet-plus "
            "train-experts` on this data"
        )
    detail = "; ".join(f"{key}: {recorded.get(key)!r} in the manifest, {expected[key]!r} for this data" for key in differ)
    raise ValueError(
        f"the experts were trained under another fold plan than the train rows scored here ({', '.join(differ)} "
        f"differ: {detail}): a train row could be scored by an expert that saw it. Score the data the experts "
        "were trained on (its train split), or train experts on this data"
    )


def _expert_results(path: Path) -> dict:
    try:
        return json.loads((path / RESULTS_FILE).read_text())
    except (OSError, ValueError):
        return {}


def load_ensemble(manifest_path, device: torch.device | str = "cpu") -> Ensemble:
    """Loads and checks every expert of a manifest; errors name what is missing or inconsistent.

    Frozen experts of one backbone (same ``backbone.digest`` in their ``all_results.json``) are checked to
    hold identical backbone weights and share one copy of it; each other expert keeps its own.
    """
    manifest_path = Path(manifest_path)
    if not manifest_path.is_file():
        raise FileNotFoundError(f"no expert manifest at {manifest_path}")
    manifest = json.loads(manifest_path.read_text())
    num_folds = int(manifest["num_folds"])
    entries = {(e["emotion"], int(e["fold"])): manifest_path.parent / e["path"] for e in manifest["experts"]}
    missing = [f"{e} fold {f}" for e in EMOTIONS for f in range(num_folds) if (e, f) not in entries]
    if missing:
        raise ValueError(f"{manifest_path} lacks experts for: {', '.join(missing)}")
    feature_root = manifest_path.parent / manifest["features"] if manifest.get("features") else None
    with quiet_libraries():  # no loading bar per expert
        groups, paths, formats = _load_groups(manifest_path, entries, num_folds, feature_root, device)
    if len(formats) != 1:
        raise ValueError(f"the experts of {manifest_path} expect different inputs: {sorted(formats)}")
    for group in groups:
        group.weight = torch.cat(group.weight).float().to(device)
        group.bias = torch.cat(group.bias).float().to(device)
    image_size, mean, std = formats.pop()
    return Ensemble(groups, paths, num_folds, image_size, mean, std, manifest)


def _load_groups(manifest_path, entries, num_folds, feature_root, device):
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    from models.features import FeatureCache, backbone_of

    groups: dict[object, ExpertGroup] = {}
    paths, formats = [], set()
    for k, emotion in enumerate(EMOTIONS):
        row_paths = []
        for fold in range(num_folds):
            path = entries[(emotion, fold)]
            check_safetensors(str(path))
            model = AutoModelForImageClassification.from_pretrained(path, use_safetensors=True)
            if model.config.model_type not in FAMILIES:
                raise ValueError(f"expert {path} is a {model.config.model_type!r} model, not a ViT or DINOv2 classifier")
            if {int(i): v for i, v in model.config.id2label.items()} != expert_labels(emotion):
                raise ValueError(
                    f"expert {path} has labels {model.config.id2label}, expected {expert_labels(emotion)} "
                    f"for the {emotion} fold {fold} entry"
                )
            processor = AutoImageProcessor.from_pretrained(path)
            size = processor_size(processor) or model.config.image_size
            formats.add((size, tuple(processor.image_mean), tuple(processor.image_std)))
            results = _expert_results(path)
            digest = (results.get("backbone") or {}).get("digest")
            shared = results.get("training_mode") == "frozen" and digest
            key = ("frozen", digest) if shared else ("own", str(path))
            backbone = backbone_of(model)
            group = groups.get(key)
            if group is None:
                cache = FeatureCache(feature_root, digest, writable=False) if shared and feature_root else None
                group = groups[key] = ExpertGroup(backbone.eval().to(device), model.config.model_type, [], [], [], [],
                                                  digest if shared else None, cache)  # fmt: skip
            elif not _same_weights(group.backbone, backbone):
                raise ValueError(
                    f"experts {group.paths[0]} and {path} record the same frozen backbone ({digest[:12]}...) but "
                    "hold different backbone weights"
                )
            group.members.append((k, fold))
            group.weight.append(model.classifier.weight.detach())
            group.bias.append(model.classifier.bias.detach())
            group.paths.append(path)
            row_paths.append(path)
        paths.append(row_paths)
    return list(groups.values()), paths, formats


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[n].to(sb[n].device), sb[n]) for n in sa)


def _group_probs(group: ExpertGroup, pixels: torch.Tensor, rows: torch.Tensor, known) -> torch.Tensor:
    """P(emotion present) ``(len(rows), M)`` of every member of ``group`` on ``pixels[rows]``; features known
    beforehand (``known``: ``(features (B, D), found (B,))`` over the whole batch) skip the backbone."""
    from models.features import pool

    features, todo, hit = None, rows, None
    if known is not None:
        cached, found = known
        hit = found[rows]
        if hit.any():
            features = torch.zeros(len(rows), cached.shape[1], device=pixels.device)
            features[hit] = cached[rows[hit]].to(pixels.device)
            todo = rows[~hit]
    if len(todo):
        hidden = group.backbone(pixel_values=pixels[todo]).last_hidden_state
        computed = pool(hidden, group.family).float()
        if features is None:
            features = computed
        else:
            features[~hit] = computed
    logits = F.linear(features, group.weight.to(features.device), group.bias.to(features.device)).float()
    return logits.view(len(rows), len(group.members), 2).softmax(-1)[..., 1]


@torch.inference_mode()
def score_batch(ensemble: Ensemble, pixels: torch.Tensor, row_folds: torch.Tensor | None, known=None) -> torch.Tensor:
    """(B, 3, H, W) normalised pixels -> (B, 8) P(emotion present).

    ``row_folds`` (B,) gives each train row's fold (its own fold's expert scores it); ``None`` averages
    every fold's expert (validation, unlabeled rows). Each group of experts sharing a backbone runs it once,
    on the rows its members score, and all its heads in one matmul. ``known`` maps a group's index to
    ``(features (B, D), found (B,))`` already computed (the feature cache), whose rows skip the backbone.
    """
    batch = len(pixels)
    scores = torch.zeros(batch, len(EMOTIONS), device=pixels.device)
    all_rows = torch.arange(batch, device=pixels.device)
    for g, group in enumerate(ensemble.groups):
        if row_folds is None:
            rows = all_rows
        else:
            folds_here = torch.tensor(sorted({fold for _, fold in group.members}), device=row_folds.device)
            rows = torch.isin(row_folds, folds_here).nonzero().squeeze(1).to(pixels.device)
        if not len(rows):
            continue
        probs = _group_probs(group, pixels, rows, (known or {}).get(g))
        for m, (k, fold) in enumerate(group.members):
            if row_folds is None:
                _check_finite(probs[:, m], [group.paths[m]])
                scores[:, k] += probs[:, m] / ensemble.num_folds
                continue
            mine = (row_folds[rows.to(row_folds.device)] == fold).to(pixels.device)
            if mine.any():
                _check_finite(probs[mine, m], [group.paths[m]])
                scores[rows[mine], k] = probs[mine, m]
    return scores


@torch.inference_mode()
def score_loader(ensemble: Ensemble, transform, loader, row_folds: np.ndarray | None, device, precision: str = "auto",
                 on_batch=None, image_ids=None) -> np.ndarray:  # fmt: skip
    """(N, 8) expert probabilities of every batch ``(uint8 images, row indices)`` that ``loader`` yields.

    ``row_folds[i]`` is the fold of train row ``i`` (its own fold's experts score it); ``None`` averages
    every fold's expert. ``on_batch(n)`` is called after each batch of ``n`` rows (progress bars). With
    ``image_ids`` (``image_ids[i]`` names row ``i``), experts sharing a frozen backbone read the features
    of rows already in the manifest's feature cache instead of running the backbone on them.
    """
    from models.features import pixel_keys

    precision = resolve_precision(device, precision)
    autocast = autocast_for(device, precision)
    cached_groups = [g for g, group in enumerate(ensemble.groups) if group.cache is not None]
    parts = []
    for images, rows in loader:
        known = None
        if image_ids is not None and cached_groups:
            ids, keys = [image_ids[i] for i in rows.tolist()], pixel_keys(images)
            known = {}
            for g in cached_groups:
                features, found = ensemble.groups[g].cache.get(ids, keys, precision)
                if features is not None:
                    known[g] = (features.to(device), found.to(device))
        pixels = transform(images.to(device, non_blocking=True))
        batch_folds = None if row_folds is None else torch.as_tensor(row_folds[rows.numpy()], device=pixels.device)
        with autocast:
            parts.append(score_batch(ensemble, pixels, batch_folds, known).cpu().numpy())
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
    skipped, so a re-run finishes what a crash left. A manifest whose fold plan is not that of the data's
    train rows is refused before anything runs (``check_manifest_plan``).
    """
    from accelerate import Accelerator

    accelerator = accelerator or Accelerator()
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    with accelerator.main_process_first():
        splits = load_splits(config.data)
    if "train" in splits and Path(config.experts).is_file():  # train rows are scored by the experts of their fold
        check_manifest_plan(config.experts, splits["train"]["image_id"])
    ensemble = load_ensemble(config.experts, accelerator.device)
    transform = BatchTransform(ensemble.image_size, ensemble.mean, ensemble.std).eval().to(accelerator.device)
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
            scores = score_loader(ensemble, transform, loader, row_folds, accelerator.device, config.precision,
                                  image_ids=ids)  # fmt: skip
            _write_shard(path, [ids[i] for i in rows], scores)
        counts[split_name] = len(split)
    accelerator.wait_for_everyone()
    return counts


def read_scores(out, split: str) -> dict[str, np.ndarray]:
    """``{image_id: expert_probs}`` of one split from the shards in ``out``."""
    table = pa.concat_tables([pq.read_table(p) for p in sorted(Path(out).glob(f"{split}-*.parquet"))])
    scores = np.asarray(table["expert_probs"].to_pylist(), dtype=np.float32)
    return dict(zip(table["image_id"].to_pylist(), scores))
