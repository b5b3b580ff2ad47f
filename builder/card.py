"""The dataset card (``README.md``) of a built folder: YAML ``configs`` + ``dataset_info`` made with the
``datasets``/``huggingface_hub`` helpers, and a body rendered from the project's ``dataset_card.md``.

Example:
    >>> from builder.card import render_card
    >>> card = render_card(out, reader, config, report)  # doctest: +SKIP
    >>> card.data.configs[0]["config_name"]  # doctest: +SKIP
    'default'
"""

from __future__ import annotations

import string
import sys
from collections import Counter
from importlib import metadata
from pathlib import Path

import pyarrow.parquet as pq
from datasets import DatasetInfo, SplitDict, SplitInfo
from datasets.info import DatasetInfosDict
from datasets.utils.metadata import MetadataConfigs
from huggingface_hub import DatasetCard, DatasetCardData

from builder.softlabel import SubsetConfig
from core.schema import (
    COLUMN_DESCRIPTIONS,
    DATA_DIR,
    HUMAN_LABELS,
    LABELS_CONFIG,
    LABELS_DIR,
    SUBSETS,
    UNASSIGNED,
    config_files,
    config_pattern,
    labels_features,
    select_features,
)

TEMPLATE_NAME = "dataset_card.md"
AFFECTNET_LICENSE_URL = "http://mohammadmahoor.com/affectnet/"

AFFECTNET_TERMS = f"""\
AffectNet and AffectNet+ are distributed by the University of Denver under a license agreement
({AFFECTNET_LICENSE_URL}) that allows **non-commercial academic research only** and forbids
redistribution. Every image and label here is derived from that data, so the agreement applies to
this folder as a whole:

- use it only if you (or your institution) hold a signed AffectNet / AffectNet+ agreement, and only
  for non-commercial research;
- do not publish it openly: on the Hub, keep the repository **private or gated** so that only people
  who hold the license get access;
- the `labels` config carries no images, but its annotations are derived from licensed data too.
"""


def template_path() -> Path:
    """The card template: beside the source checkout, or in ``<prefix>/share/affectnet-plus``."""
    for candidate in (
        Path(__file__).resolve().parents[1] / TEMPLATE_NAME,
        Path(sys.prefix) / "share" / "affectnet-plus" / TEMPLATE_NAME,
    ):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"cannot find the card template {TEMPLATE_NAME}; reinstall affectnet-plus")


def _table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def _shards(out: Path, config: str, split: str) -> list[Path]:
    """The files of one split of one config: configs select files of one layout, never copies of rows."""
    return config_files(out, config, split)


def _size_category(n: int) -> str:
    for limit, name in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M")):
        if n < limit:
            return name
    return "1M<n<10M"


def _version() -> str:
    try:
        return metadata.version("affectnet-plus")
    except metadata.PackageNotFoundError:
        return "source checkout"


def card_data(out: Path, features, report: dict, license_fields: dict) -> DatasetCardData:
    """YAML metadata: one ``configs`` entry and one ``dataset_info`` entry per written config."""
    configs, infos = {}, {}
    for config, split_counts in report["configs"].items():
        config_features = labels_features(features) if config == LABELS_CONFIG else features
        splits = SplitDict()
        for split in split_counts:
            files = _shards(out, config, split)
            metas = [pq.ParquetFile(p).metadata for p in files]
            num_bytes = sum(m.row_group(i).total_byte_size for m in metas for i in range(m.num_row_groups))
            splits.add(SplitInfo(name=split, num_bytes=num_bytes, num_examples=sum(m.num_rows for m in metas)))
        configs[config] = {
            "data_files": [{"split": s, "path": config_pattern(config, s)} for s in split_counts],
            **({"default": True} if config == "default" else {}),
        }
        infos[config] = DatasetInfo(
            features=config_features,
            splits=splits,
            config_name=config,
            download_size=sum(p.stat().st_size for s in split_counts for p in _shards(out, config, s)),
            dataset_size=sum(info.num_bytes for info in splits.values()),
        )
    data = DatasetCardData(
        pretty_name="AffectNet+",
        task_categories=["image-classification"],
        tags=["facial-expression-recognition", "affective-computing", "soft-labels", "affectnet"],
        size_categories=[_size_category(report["written"])],
        **license_fields,
    )
    MetadataConfigs(configs).to_dataset_card_data(data)
    DatasetInfosDict(infos).to_dataset_card_data(data)
    return data


def _megabytes(num_bytes: int) -> str:
    return f"{num_bytes / 1e6:.1f} MB" if num_bytes >= 100_000 else f"{num_bytes / 1e3:.1f} kB"


def _configs_table(out: Path, configs: dict, splits: list[str]) -> str:
    """Rows per config and split, each config's files and their size; then how the files are shared."""
    rows = []
    for config, counts in configs.items():
        size = sum(p.stat().st_size for s in counts for p in _shards(out, config, s))
        pattern = config_pattern(config, "{split}")
        rows.append([config, f"`{pattern}`", *(counts.get(s, "—") for s in splits), _megabytes(size)])
    written = {p.name.split("-")[0] for s in splits for p in _shards(out, "default", s)}
    partitions = [name for name in (*SUBSETS, UNASSIGNED) if name in written]
    layout = (
        f"Every image is stored once. `{DATA_DIR}/{{split}}/` holds one Parquet file per partition of each shard of "
        f"rows ({', '.join(f'`{name}`' for name in partitions)}; `{UNASSIGNED}`: rows without a subset), with every "
        "column; `default` reads all of them and each subset config only its own partition's, so the configs share "
        f"their files instead of copying rows. `{LABELS_DIR}/{{split}}/` holds the same files without the image "
        "column, rows in the same order as `default`."
    )
    return _table(["config", "files", *splits, "size"], rows) + "\n\n" + layout


def _label_table(out: Path, splits: list[str]) -> str:
    counts = {}
    for split in splits:
        counter = Counter()
        for shard in _shards(out, LABELS_CONFIG, split):
            counter.update(pq.read_table(shard, columns=["human_label"])["human_label"].to_pylist())
        counts[split] = counter
    rows = [
        [f"{code} {name}", *(counts[s].get(code, 0) for s in splits)]
        for code, name in enumerate(HUMAN_LABELS)
        if any(counts[s].get(code, 0) for s in splits)
    ]
    if any(counts[s].get(None, 0) for s in splits):
        rows.append(["(none)", *(counts[s].get(None, 0) for s in splits)])
    return _table(["human_label", *splits], rows)


def _soft_label_section(features, report: dict) -> str:
    experts = report["fingerprint"].get("experts")
    if experts:
        fusion = report["fusion"]
        rule = SubsetConfig(**report["subsets"]).describe()
        fitted = fusion.get("fitted_on")
        how = (
            f" (fitted: the λ under which the annotators' labels, read one-vs-rest, are most likely on "
            f"{fitted['rows']} {fitted.get('split', 'train')} rows, whose expert scores are out-of-fold; no "
            "validation label is used)"
            if fitted
            else ""
        )
        subsets = _table(
            ["subset", *report["splits"]],
            [[name, *(report["configs"].get(name, {}).get(s, 0) for s in report["splits"])] for name in SUBSETS],
        )
        fallback = report.get("soft_labels_without_landmarks", {})
        degenerate = report.get("degenerate_landmarks", {})
        au_model = fusion.get("au_model", {})
        shape, calibration = au_model.get("shape_model"), au_model.get("calibration")
        if shape and shape["components"]:
            shape_text = (f"{shape['components']} modes fitted on {shape['faces']} faces "
                          f"({shape['variance_kept']:.1%} of their variance)")  # fmt: skip
        else:
            shape_text = shape["skipped"] if shape else "off"
        au_text = (
            f"8 one-vs-rest logistic regressions on the 13 AU intensities, 8 EMFACS presences and 136 frontalised "
            f"landmark coordinates, fitted on "
            f"{calibration['rows']} train rows' annotator labels, one model per fold ({calibration['num_folds']}), "
            f"L2 {calibration['l2']}"
            if calibration
            else "EMFACS presences (uncalibrated)"
        )
        return (
            "Soft labels were computed by this build (affectnet-plus `docs/method.md` §3-§6, a reimplementation: "
            "the paper's exact recipe is not public): s_k = λ f_k + (1 - λ) a_k for each emotion k, with no "
            "renormalisation, where f_k is the cross-fitted probability of the one-vs-rest ViT expert of k (a "
            "train row is scored by the experts that never saw its fold) and a_k the AU component's presence "
            "of k: action units measured on the landmarks (frontalised, then denoised by a shape model of the "
            "build's faces), scored by their EMFACS prototypes or, where calibrated, by one-vs-rest models "
            "cross-fitted like the experts. Like the official release's, `soft_label`, `expert_probs` and "
            "`au_scores` are 8 independent confidences in [0, 1] that do not sum to 1; divide by their sum "
            "where a distribution is needed. A row's own human label is not an input of its s; labels enter "
            "only through what is fitted on many train rows (the experts, the AU calibration and λ, when "
            f"fitted). Subsets: {rule}; -1 for human labels 8-10."
            + (" The official release's own soft labels and subsets are kept as `release_soft_label` and "
               "`release_subset`; `affectnet-plus report` shows how the two agree."
               if "release_soft_label" in features else "")
            + "\n\n"
            + _table(
                ["parameter", "value"],
                [
                    ["experts", f"`{experts['manifest']}` (sha256 {experts['manifest_sha256']})"],
                    [f"λ (expert weight){how}", fusion["expert_weight"]],
                    ["landmark shape model (denoising)", shape_text],
                    ["AU component", au_text],
                    ["rows without landmarks (experts only)", sum(fallback.values())],
                    ["of which degenerate landmarks (`metadata_notes.jsonl`)", sum(degenerate.values())],
                    *(
                        [["expert inference precision", report["expert_precision"]]]
                        if "expert_precision" in report
                        else []
                    ),
                ],
            )
            + "\n\n"
            + subsets
        )
    if "soft_label" in features and "release_subset" in features:
        rule = SubsetConfig(**report["subsets"]).describe()
        return ("Soft labels are those of the AffectNet+ release, kept exactly (8 independent confidences in "
                f"[0, 1]). Subsets were recomputed from them by this build ({rule}); the release's own are kept "
                "as `release_subset`.")
    if "soft_label" in features:
        return ("Soft labels and subsets are those of the AffectNet+ release, kept exactly: `soft_label` is 8 "
                "independent per-emotion confidences in [0, 1], which do not sum to 1.")
    return (
        "This build has no soft labels yet. Train the experts on it (`affectnet-plus train-experts`) and build "
        "again with `--experts experts/manifest.json` to add `soft_label`, `subset`, `expert_probs` and `au_scores`."
    )


def _metadata_section(report: dict) -> str:
    """Which model estimated which columns, under which license, and what could not be estimated."""
    annotators = report["fingerprint"].get("metadata")
    if not annotators:
        return ""
    notes = report.get("metadata_notes", {"null": {}, "several_faces": 0})
    rows = [[name, p["model"], p["version"], p["license"]] for name, p in annotators.items()]
    nulls = [[f"`{c}`", f"`{reason}`", n] for c, reasons in notes["null"].items() for reason, n in reasons.items()]
    text = (
        "\n\nMetadata columns the source lacks were estimated by these models, run offline by the build; "
        "they are model estimates, not annotations:\n\n" + _table(["annotator", "model", "version", "license"], rows)
    )
    if "valence_arousal" in annotators:
        text += "\n\n`valence` and `arousal` are estimates of that regressor for every row: the source has none."
    if nulls:
        text += "\n\nValues left null, by reason (`labelled_non_face`: rows the annotators called non-face get no face metadata):\n\n"
        text += _table(["column", "reason", "rows"], nulls)
    if notes["several_faces"]:
        text += f"\n\n{notes['several_faces']} images showed several faces; the largest was used."
    return text + "\n\nPer-row reasons: `metadata_notes.jsonl`."


def render_card(out: Path, reader, config, report: dict, features=None) -> DatasetCard:
    """The card of the folder ``out`` built from ``reader`` with ``config``; ``report`` is the build report."""
    out = Path(out)
    features = features or select_features(reader.columns, reader.ethnicity_classes)
    root = Path(reader.root)
    # The license follows the source format unless the build was given one (config.license). Only a
    # verified manifest of `affectnet-plus sample` makes the source the synthetic sample, never the
    # mere presence of a file (a real source may hold a ground_truth.jsonl of its own).
    from builder.sample import is_bundled_sample

    affectnet_fields = {"license": "other", "license_name": "affectnet-research", "license_link": AFFECTNET_LICENSE_URL}
    is_sample = is_bundled_sample(root, config.source_format)
    if is_sample:
        title = "bundled synthetic sample"
        summary = (
            "**These faces are synthetic.** They were rendered by `affectnet-plus sample` from a 3-D mean face "
            f"with known expression mixtures and head poses, written in the {config.source_format} layout, and "
            "built like real AffectNet. They prove the pipeline; numbers measured on them say nothing about AffectNet."
        )
        license_fields = {"license": "apache-2.0"}
        license_text = "The rendered faces and their labels are synthetic and released under Apache-2.0."
    elif config.source_format in ("affectnet", "affectnet-plus"):
        title = "built from " + ("raw AffectNet" if config.source_format == "affectnet" else "the AffectNet+ release")
        summary = (
            f"Built from a licensed copy of {'AffectNet' if config.source_format == 'affectnet' else 'AffectNet+'}."
        )
        license_fields = dict(affectnet_fields)
        license_text = AFFECTNET_TERMS
    else:
        title = f"built from the {config.source_format} source `{root.name}`"
        summary = f"Built from the {config.source_format} source `{root.name}` in the AffectNet+ schema."
        license_fields = {"license": "unknown"}
        license_text = (
            f"The images come from `{root.name}`; this folder carries that dataset's license, which the build "
            "cannot know. State it here before publishing."
        )
    explicit = getattr(config, "license", None)
    if explicit is not None:
        chosen = str(explicit).strip().lower()
        if chosen == "affectnet-research":
            license_fields, license_text = dict(affectnet_fields), AFFECTNET_TERMS
        elif chosen[:1].isalnum() and chosen.isascii() and all(c.isalnum() or c in ".+_-" for c in chosen):
            default = license_fields.get("license_name") or license_fields["license"]
            license_fields = {"license": chosen}
            license_text = (
                f"Released under `{chosen}`, the license given to the build (it replaces `{default}`, the default "
                "for this source). The build cannot check it: whoever ran the build vouches that the source "
                "data allows it."
            )
        else:
            raise ValueError(
                f"license must be a Hub license id such as cc-by-4.0 or apache-2.0 (or affectnet-research), "
                f"got {explicit!r}"
            )

    splits = list(report["splits"])
    columns_rows = [
        [f"`{name}`", f"`{_feature_repr(feature)}`", COLUMN_DESCRIPTIONS[name]] for name, feature in features.items()
    ]
    rejects = report["rejected"]
    rejects_table = (
        _table(["reason", "rows"], [[f"`{r}`", n] for r, n in rejects.items()]) if rejects else "No row was rejected."
    )
    subset_example = "".join(
        f'{name} = load_dataset("{out.name}", "{name}")\n' for name in SUBSETS if name in report["configs"]
    )
    provenance = _table(
        ["parameter", "value"],
        [
            ["tool", f"affectnet-plus {_version()}"],
            ["source format", f"`{config.source_format}`"],
            ["source", f"`{root.name}`" + (" (synthetic sample)" if is_sample else "")],
            ["face crop", f"{config.face_size} px square, margin {config.crop_margin:g} of the face box per side"],
            ["JPEG quality of re-encoded crops", config.jpeg_quality],
            ["rows per shard", report["fingerprint"]["shard_rows"]],
            *([["release pose unit", config.pose_unit]] if config.source_format == "affectnet-plus" else []),
            *([["ethnicity classes", ", ".join(reader.ethnicity_classes)]] if "ethnicity" in features else []),
            *([["faces found by", "dlib HOG detector (largest face when several)"]] if config.detect_faces else []),
        ],
    )
    provenance += _metadata_section(report)
    body = string.Template(template_path().read_text(encoding="utf-8")).substitute(
        title=title,
        summary=summary,
        load_path=out.name,
        subset_example=subset_example,
        configs_table=_configs_table(out, report["configs"], splits),
        columns_table=_table(["column", "feature", "meaning"], columns_rows),
        emotion_codes=", ".join(f"{i} {n}" for i, n in enumerate(HUMAN_LABELS)),
        label_table=_label_table(out, splits) if "human_label" in features else "",
        read=report["read"],
        written=report["written"],
        rejected_total=sum(rejects.values()),
        rejects_table=rejects_table,
        provenance=provenance,
        soft_labels=_soft_label_section(features, report),
        license=license_text,
    )
    data = card_data(out, features, report, license_fields)
    return DatasetCard(f"---\n{data.to_yaml()}\n---\n\n{body}")


def _feature_repr(feature) -> str:
    return repr(feature).replace("Value('float32')", "float32").replace("|", "\\|")
