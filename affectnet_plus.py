"""AffectNet+: the dataset's definition — emotion codes, the schema, builder configs and the builder.

The schema (``FEATURES``) is declared once, in ``core.schema``, and re-exported here. It is *not* a Hub loading script (``datasets`` >= 4 refuses
those): ``affectnet-plus build`` uses it to write a no-code Parquet folder named ``affectnet_plus/``
that ``load_dataset("affectnet_plus")`` reads. That folder stores every image once, under
``data/<split>/*-<partition>.parquet`` partitioned by subset, and each of its configs (``CONFIGS``)
selects files by ``config_pattern``. The builder below can also be used directly:

Example:
    >>> from affectnet_plus import AffectNetPlus
    >>> builder = AffectNetPlus(data_dir="sample/", source_format="affectnet")  # doctest: +SKIP
    >>> builder.download_and_prepare()  # doctest: +SKIP
    >>> builder.as_dataset()["train"].features["soft_label"]  # doctest: +SKIP
"""

from __future__ import annotations

import logging

import datasets

from builder.images import Rejected
from builder.sources import Record, Rejection, deduplicated, make_example, open_source
from core.schema import (
    COLUMN_DESCRIPTIONS,
    CONFIGS,
    EMOTIONS,
    ETHNICITY_CLASSES,
    FACE_SIZE,
    FEATURES,
    HUMAN_LABELS,
    NUM_LANDMARKS,
    SOURCE_FORMATS,
    SPLITS,
    SUBSETS,
    AffectNetPlusConfig,
    config_pattern,
    labels_features,
    make_features,
    select_features,
)

__all__ = [
    "COLUMN_DESCRIPTIONS", "CONFIGS", "EMOTIONS", "ETHNICITY_CLASSES", "FACE_SIZE", "FEATURES", "HUMAN_LABELS",
    "NUM_LANDMARKS", "SOURCE_FORMATS", "SPLITS", "SUBSETS", "AffectNetPlus", "AffectNetPlusConfig", "config_pattern",
    "labels_features", "make_features", "select_features",
]  # fmt: skip

logger = logging.getLogger(__name__)


class AffectNetPlus(datasets.GeneratorBasedBuilder):
    """Reads an AffectNet-family source into AffectNet+ rows (``data_dir`` is the source root).

    ``affectnet-plus build`` is the recommended path: it writes the Hub-ready folder with sharded
    Parquet, a dataset card and a rejects report. This builder is the same reading code behind
    the ``datasets`` builder API; rejected rows are logged and listed in ``self.rejections``.
    """

    BUILDER_CONFIG_CLASS = AffectNetPlusConfig
    BUILDER_CONFIGS = [AffectNetPlusConfig(name=fmt.replace("-", "_"), source_format=fmt) for fmt in SOURCE_FORMATS]
    DEFAULT_CONFIG_NAME = "affectnet"

    def _reader(self):
        if not self.config.data_dir:
            raise ValueError("AffectNetPlus needs data_dir=<source root>")
        return open_source(self.config.data_dir, self.config)

    def _info(self):
        reader = self._reader()
        return datasets.DatasetInfo(
            description="AffectNet+ rows read from a local AffectNet-family source.",
            features=select_features(reader.columns, reader.ethnicity_classes),
            homepage="https://arxiv.org/abs/2410.22506",
        )

    def _split_generators(self, dl_manager):
        reader = self._reader()
        return [datasets.SplitGenerator(name=split, gen_kwargs={"split": split}) for split in reader.splits()]

    def _generate_examples(self, split):
        self.rejections = getattr(self, "rejections", [])
        reader = self._reader()
        for item in deduplicated(reader.records(split), set()):
            if isinstance(item, Record):
                try:
                    yield item.image_id, make_example(item, self.config, reader.columns)
                    continue
                except Rejected as err:
                    item = Rejection(item.origin, item.row, err.reason, err.detail, item.image_id)
            logger.warning("rejected %s row %s: %s (%s)", item.origin, item.row, item.reason, item.detail)
            self.rejections.append(item)
