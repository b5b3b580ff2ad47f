"""What ``build --recompute`` changes in a source that has its own soft labels and subsets (the release).

``--recompute subsets`` keeps the source's soft labels and recomputes every row's subset from them
with the build's rule (``builder.softlabel.subsets``, ``SubsetConfig``: the release's rule by
default, so an unaltered release gives back its own subsets); the source's subset is kept as
``release_subset``. ``--recompute soft-labels`` (with experts) keeps the source's soft labels and
subsets as ``release_soft_label`` and ``release_subset`` and lets the build's fuse stage compute
``soft_label`` and ``subset`` (``docs/method.md`` §5, §6). Either way a researcher can compare the
two side by side (``affectnet-plus report``).

``RecomputedSource`` is the source as the crop stage reads it: the reader's records with their
annotations renamed (and, for subsets, recomputed), record by record, so nothing else changes.

Example:
    >>> from builder.recompute import RecomputedSource
    >>> view = RecomputedSource(reader, "subsets", SubsetConfig())  # doctest: +SKIP
    >>> "release_subset" in view.columns  # doctest: +SKIP
    True
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import numpy as np

from builder.softlabel import SubsetConfig, subsets
from builder.sources import Record, Rejection

RECOMPUTE = ("subsets", "soft-labels")
# The source's columns each mode keeps under a release_ name.
KEPT = {
    "subsets": {"subset": "release_subset"},
    "soft-labels": {"soft_label": "release_soft_label", "subset": "release_subset"},
}


class RecomputedSource:
    """A reader whose records carry the source's soft labels and subsets under their ``release_`` names."""

    def __init__(self, reader, mode: str, subset_config: SubsetConfig):
        if mode not in RECOMPUTE:
            raise ValueError(f"recompute must be one of {RECOMPUTE}, got {mode!r}")
        missing = {"soft_label", "subset", "human_label"} - set(reader.columns)
        if missing:
            raise ValueError(f"--recompute needs a source with soft labels and subsets; it lacks {sorted(missing)}")
        self.reader, self.mode, self.subset_config = reader, mode, subset_config
        self.renamed = KEPT[mode]
        columns = [self.renamed.get(c, c) for c in reader.columns]
        if mode == "subsets":
            columns.insert(columns.index("release_subset"), "subset")
        self.columns = tuple(columns)

    def __getattr__(self, name):  # splits, count, root, ethnicity_classes, ...: the reader's
        return getattr(self.reader, name)

    def fingerprint(self) -> dict:
        """What this view adds to the crop stage's fingerprint."""
        result = {"recompute": self.mode}
        if self.mode == "subsets":
            result["subsets"] = dataclasses.asdict(self.subset_config)
        return result

    def records(self, split: str) -> Iterator[Record | Rejection]:
        for item in self.reader.records(split):
            if isinstance(item, Record):
                annotations = {self.renamed.get(k, k): v for k, v in item.annotations.items()}
                if self.mode == "subsets":
                    soft = np.asarray([annotations["soft_label"]], dtype=np.float64)
                    human = np.asarray([annotations["human_label"]])
                    annotations["subset"] = int(subsets(soft, human, self.subset_config)[0])
                item = dataclasses.replace(item, annotations=annotations)
            yield item
