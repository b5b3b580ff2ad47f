"""Training data: folds, the experts' one-vs-rest sampling, shuffled rows, and a dataset of decoded faces.

Rows come from a built AffectNet+ folder (``affectnet-plus build``). A row's fold is a stable hash
of its ``image_id``, the same in every process and every run, so cross-fitting (``docs/method.md`` §3) never
lets a fold-j expert see fold j.

Example:
    >>> from models.data import fold_of
    >>> fold_of("Manually_Annotated_Images/1/abc", 5) == fold_of("Manually_Annotated_Images/1/abc", 5)
    True
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from datasets import Dataset, DatasetDict, Image, load_dataset

# fold_of, folds: the fold rule, re-exported
from core.schema import DATA_DIR, EMOTIONS, SPLITS, WORK_DIR, config_files, fold_of, folds  # noqa: F401
from models.transforms import decode_image


def load_splits(data: str | Path, columns=("image_id", "image", "human_label")) -> DatasetDict:
    """The splits of a built AffectNet+ folder, images left as JPEG bytes (decoded in loader workers)."""
    path = Path(data)
    data_dir = path / DATA_DIR
    found = sorted(p.name for p in data_dir.iterdir() if p.is_dir()) if data_dir.is_dir() else []
    names = [s for s in SPLITS if s in found] + [s for s in found if s not in SPLITS]
    files = {name: [str(p) for p in config_files(path, "default", name)] for name in names}
    files = {name: paths for name, paths in files.items() if paths}
    # A build in progress (its work folder is there) has no card yet, or an outdated one: read the
    # default config's files directly, as the card would select them.
    in_progress = (path / WORK_DIR).is_dir() and files
    if (path / "README.md").is_file() and data_dir.is_dir() and not in_progress:
        splits = load_dataset(str(path))
    elif files:
        splits = load_dataset("parquet", data_files=files)
    else:
        raise FileNotFoundError(f"{data} is not a built AffectNet+ folder (run `affectnet-plus build` first)")
    for name, split in splits.items():
        missing = set(columns) - set(split.column_names)
        if missing:
            raise ValueError(f"{data} ({name}) lacks the columns {sorted(missing)}")
    return splits.cast_column("image", Image(decode=False)) if "image" in columns else splits


class FaceDataset(torch.utils.data.Dataset):
    """Row index -> (uint8 face tensor (3, size, size), target); the sampler decides which rows are used.

    Only the ``image`` column is read per item, from the memory-mapped Arrow table, so workers stay light.
    """

    def __init__(self, dataset: Dataset, targets: np.ndarray, image_size: int):
        if len(targets) != len(dataset):
            raise ValueError(f"{len(targets)} targets for {len(dataset)} rows")
        self.images = dataset.select_columns(["image"])
        self.targets = torch.as_tensor(targets)
        self.image_size = image_size

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        return decode_image(self.images[int(index)]["image"], self.image_size), self.targets[int(index)]


class OneVsRestSampler(torch.utils.data.Sampler):
    """Balanced one-vs-rest epochs for the expert of emotion ``emotion`` (``docs/method.md`` §2).

    Each epoch yields every positive row (``label == emotion``) among ``rows`` and as many negatives,
    drawn without replacement and evenly from the other seven emotions (a class with too few rows
    gives all it has, the others make up the difference), shuffled together. The draw depends only on
    ``(seed, epoch)``, so every process of a distributed run sees the same order and a resumed run
    repeats it. Rows labelled 8-10 (none, uncertain, non-face) are never drawn.
    """

    def __init__(self, labels: np.ndarray, rows: np.ndarray, emotion: int, seed: int = 0):
        labels = np.asarray(labels)
        rows = np.asarray(rows, dtype=np.int64)
        self.positives = rows[labels[rows] == emotion]
        self.negatives = {other: rows[labels[rows] == other] for other in range(len(EMOTIONS)) if other != emotion}
        self.seed, self.epoch = seed, 0
        if len(self.positives) == 0:
            raise ValueError(f"no training rows with human_label {emotion} ({EMOTIONS[emotion]}): nothing to learn")
        if not any(len(n) for n in self.negatives.values()):
            raise ValueError(f"no training rows of any other emotion than {EMOTIONS[emotion]}: no negatives")
        self.num_negatives = min(len(self.positives), sum(len(n) for n in self.negatives.values()))

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _quotas(self, rng: np.random.Generator) -> dict[int, int]:
        """Water-filling: every class gets the same count unless it runs out; the last few go at random."""
        quotas = dict.fromkeys(self.negatives, 0)
        remaining = self.num_negatives
        open_classes = [c for c, r in self.negatives.items() if len(r)]
        while remaining:
            share = remaining // len(open_classes)
            if share == 0:
                for c in rng.permutation(open_classes)[:remaining].tolist():
                    quotas[c] += 1
                break
            for c in open_classes:
                quotas[c] += min(share, len(self.negatives[c]) - quotas[c])
            remaining = self.num_negatives - sum(quotas.values())
            open_classes = [c for c in open_classes if quotas[c] < len(self.negatives[c])]
        return quotas

    def indices(self) -> np.ndarray:
        rng = np.random.default_rng([self.seed, self.epoch])
        chosen = [self.positives]
        for other, quota in self._quotas(rng).items():
            if quota:
                chosen.append(rng.choice(self.negatives[other], size=quota, replace=False))
        return rng.permutation(np.concatenate(chosen))

    def __iter__(self):
        return iter(self.indices().tolist())

    def __len__(self) -> int:
        return len(self.positives) + self.num_negatives


class ShuffledRows(torch.utils.data.Sampler):
    """``rows`` in a fresh order each epoch, from (seed, epoch): the same in every process and on resume."""

    def __init__(self, rows: np.ndarray, seed: int):
        self.rows, self.seed, self.epoch = np.asarray(rows), seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        return iter(np.random.default_rng([self.seed, self.epoch]).permutation(self.rows).tolist())

    def __len__(self) -> int:
        return len(self.rows)
