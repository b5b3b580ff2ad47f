"""Build a Hub-ready, no-code AffectNet+ dataset folder from a source, in resumable stages.

Layout of the output folder (``load_dataset(OUT)`` reads it; after a push, ``load_dataset("ORG/NAME")``)::

    OUT/README.md                                   dataset card: YAML configs + dataset_info, counts, provenance
    OUT/data/<split>/NNNNN-of-NNNNN-<partition>.parquet   every column, each image once; partition: easy,
                                                    challenging, difficult or unassigned (configs select files)
    OUT/labels/<split>/NNNNN-of-NNNNN-<partition>.parquet every column but the image, same rows, same order
    OUT/build_report.json                           {"read": n, "written": n, "rejected": {reason: n}, ...}
    OUT/rejects.jsonl                               one line per rejected row: source, row, reason, detail
    OUT/metadata_notes.jsonl                        rows whose metadata or AU scores are null (and why)
    OUT/au_model.json, OUT/fusion.json              with experts: the fitted AU model, the λ used
                                                    (``predict --dataset OUT`` reads both)
    OUT/build_config.json                           the resolved options, without paths to SOURCE or OUT:
                                                    ``affectnet-plus build SOURCE --config OUT/build_config.json
                                                    --out OUT`` repeats the build

``build`` drives six stages, each a module of its own (``builder.stage`` describes what they share):

    crop (``stage_crop``) -> metadata (``stage_metadata``, with ``metadata``) -> score (``stage_score``) ->
    fit (``stage_fit``) -> fuse (``stage_fuse``; these three with ``experts``) -> export (``stage_export``)

Each stage has a fingerprint of everything that changes its output (its upstream stages' digests
included), writes its outputs under ``OUT/.build/<stage>/`` keyed by shard name, each output once and
atomically, and writes its completion marker last. A stage whose marker matches its fingerprint is
skipped; one whose fingerprint changed is redone from scratch; an interrupted one resumes. So a build
killed at any point (SIGKILL included) and re-run with the same arguments ends byte-identical to an
uninterrupted one, and a re-run with some argument changed redoes only the stages that depend on it.
Each final file is written once, by the export stage, which joins the crop, metadata and fuse
shards of the same name and cuts the rows by subset.

What survives a successful build: only the files above. The export stage deletes each crop shard as
soon as its final shard is in place (so the crops are never kept twice on disk), and the build deletes
``OUT/.build/`` (stage caches included) last; a folder with ``.build/`` is an unfinished build
(``core.hub`` refuses to push one). Re-running a finished build with the same arguments rebuilds it
from scratch, to the same bytes; with other arguments it is refused unless ``overwrite``.

Example:
    >>> from core.schema import AffectNetPlusConfig
    >>> from builder.export import BuildOptions, build
    >>> report = build("AffectNet/", "affectnet_plus/", AffectNetPlusConfig(source_format="affectnet"))  # doctest: +SKIP
    >>> report["written"] + sum(report["rejected"].values()) == report["read"]  # doctest: +SKIP
    True
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import datasets

from builder import stage_crop, stage_export, stage_fit, stage_fuse, stage_metadata
from builder.recompute import RECOMPUTE, RecomputedSource
from builder.softlabel import FusionConfig, SubsetConfig
from builder.sources import open_source
from builder.stage import Stage, write_json_atomic
from builder.stage_crop import shard_name  # noqa: F401  (re-exported)
from builder.stage_fit import AUModelConfig
from builder.stage_metadata import metadata_annotators
from core.schema import AU_MODEL_FILE, BUILD_CONFIG_FILE, FUSION_FILE, WORK_DIR, AffectNetPlusConfig, select_features

__all__ = ["AUModelConfig", "BuildInputs", "BuildOptions", "FusionConfig", "SubsetConfig", "TooManyRejections",
           "build", "check_rejections",
           "metadata_annotators", "resolved_config"]  # fmt: skip

SOFT_LABEL_COLUMNS = stage_fuse.COLUMNS
STATE_FILE = "fingerprint.json"  # OUT/.build/fingerprint.json: this folder is a build in progress
# The fields of datasets.BuilderConfig, which AffectNetPlusConfig inherits but a build does not use.
BUILDER_CONFIG_FIELDS = frozenset(f.name for f in fields(datasets.BuilderConfig))


@dataclass
class BuildOptions:
    """How the build runs (none of these changes the output's bytes, except ``shard_rows``).

    Args:
        shard_rows: source rows per Parquet shard (bounds shard size: ~25 kB per 224 px face).
        num_proc: worker processes that decode and crop images and run the metadata models (and, up to
            4, that decode the crops the experts score).
        overwrite: delete OUT first when it holds another build (a folder a build wrote: one with
            build_report.json or .build/fingerprint.json); any other folder is refused.
        progress: show progress bars.
        max_rejected_fraction: a build whose split rejects more than this share of its rows, or that
            writes no row at all, fails (``TooManyRejections``) after writing the folder and rejects.jsonl,
            so that a wrong --format or a broken copy is never taken for a dataset.
    """

    shard_rows: int = 1000
    num_proc: int = 1
    overwrite: bool = False
    progress: bool = True
    max_rejected_fraction: float = 0.05

    def __post_init__(self):
        if self.shard_rows < 1:
            raise ValueError(f"shard_rows must be >= 1, got {self.shard_rows}")
        if self.num_proc < 1:
            raise ValueError(f"num_proc must be >= 1, got {self.num_proc}")
        if not 0 <= self.max_rejected_fraction <= 1:
            raise ValueError(f"max_rejected_fraction must be in [0, 1], got {self.max_rejected_fraction}")


class TooManyRejections(RuntimeError):
    """A finished build that wrote no row, or rejected more than ``max_rejected_fraction`` of a split;
    ``report`` is its build report (the folder and its rejects.jsonl are kept for inspection)."""

    def __init__(self, message: str, report: dict):
        super().__init__(message)
        self.report = report


def check_rejections(report: dict, max_rejected_fraction: float) -> None:
    """Raises ``TooManyRejections`` unless the build wrote rows and every split kept enough of them.

    Example:
        >>> try:
        ...     check_rejections({"written": 9, "splits": {"train": {"read": 10, "written": 9}}}, 0.05)
        ... except TooManyRejections as err:
        ...     print(err)
        train: 1 of 10 rows rejected (10.0% > 5.0%, --max-rejected-fraction); see rejects.jsonl
    """
    if report["written"] == 0:
        raise TooManyRejections(f"no row was written ({report['read']} read); see rejects.jsonl", report)
    bad = [f"{split}: {c['read'] - c['written']} of {c['read']} rows rejected "
           f"({(c['read'] - c['written']) / c['read']:.1%} > {max_rejected_fraction:.1%}, --max-rejected-fraction)"
           for split, c in report["splits"].items()
           if c["read"] and (c["read"] - c["written"]) / c["read"] > max_rejected_fraction]  # fmt: skip
    if bad:
        raise TooManyRejections("; ".join(bad) + "; see rejects.jsonl", report)


@dataclass
class BuildInputs:
    """What the build adds to the source's columns (``build``'s keyword arguments, as the CLI sets them).

    Args:
        experts: an expert manifest.json (affectnet-plus train-experts): score every row with the experts
            and add soft_label, subset, expert_probs and au_scores.
        recompute: on a source with its own soft labels and subsets (the AffectNet+ release):
            `subsets` recomputes the subsets from its soft labels with the build's rule; `soft-labels`
            (with experts) replaces both with the build's. The source's are kept as release_subset and
            release_soft_label. With experts and without it such a build is refused.
        metadata: fill the metadata columns the source lacks with offline face models: landmarks, head
            pose, age, gender, ethnicity (needs `pip install .[faces]` and `affectnet-plus fetch-models`).
        face_detection: with metadata, on image folders and CSV lists: find the face and crop around the
            largest one (no face: the row is rejected); off, each image is taken as a face crop.
        va_model: with metadata, a valence/arousal regressor checkpoint (scripts/train.py valence-arousal)
            that estimates valence and arousal for sources without them.
    """

    experts: str | None = None
    recompute: str | None = field(default=None, metadata={"choices": RECOMPUTE})
    metadata: bool = True
    face_detection: bool = True
    va_model: str | None = None

    def detect_faces(self, source_format: str) -> bool:
        """``AffectNetPlusConfig.detect_faces`` for a source: image folders and CSV lists give no face box."""
        return self.metadata and self.face_detection and source_format in ("imagefolder", "csv")


def source_settings(config: AffectNetPlusConfig) -> dict:
    """The fields of ``config`` a build uses (not ``datasets.BuilderConfig``'s name, version, ...)."""
    return {f.name: getattr(config, f.name) for f in fields(config) if f.name not in BUILDER_CONFIG_FIELDS}


def _local_path(path) -> str | None:
    """A path as ``build --config`` should read it: relative to the working directory, never absolute."""
    return None if path is None else Path(os.path.relpath(Path(path).resolve(), Path.cwd())).as_posix()


def resolved_config(config: AffectNetPlusConfig, options: BuildOptions, inputs: BuildInputs, fusion: FusionConfig,
                    subsets: SubsetConfig, au_model: AUModelConfig) -> dict:  # fmt: skip
    """What ``build_config.json`` holds: every option that changes the output, grouped by concern, keyed
    by the ``build`` command's option names (``scripts.options.parse_args`` reads it). Paths are relative
    to the working directory; SOURCE and --out are not in it."""
    source = {k: v for k, v in source_settings(config).items() if k != "detect_faces"}
    return {
        "source": source,
        "options": {"shard_rows": options.shard_rows},
        "inputs": {
            **asdict(inputs),
            "experts": _local_path(inputs.experts),
            "va_model": _local_path(inputs.va_model),
            "face_detection": config.detect_faces,
        },
        "fusion": asdict(fusion),
        "subsets": asdict(subsets),
        "au_model": asdict(au_model),
    }


def _written_by_a_build(out: Path) -> bool:
    """Whether ``out`` is a folder a build wrote: a finished one, an unfinished one, or one killed at the start."""
    entries = list(out.iterdir())
    return (
        (out / "build_report.json").is_file()
        or (out / WORK_DIR / STATE_FILE).is_file()
        or all(p.name == WORK_DIR for p in entries)
    )


def _prepare_output(out: Path, fingerprint: dict, overwrite: bool) -> Path:
    """Creates or resumes ``out``; refuses to replace a finished build of other arguments (unless
    ``overwrite``) or anything a build did not write (always)."""
    work = out / WORK_DIR
    state = work / STATE_FILE
    report = out / "build_report.json"
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} is a file, not a folder; choose another --out")
    if out.is_dir() and not _written_by_a_build(out):
        raise FileExistsError(
            f"{out} exists and is not an AffectNet+ build (no build_report.json, no {WORK_DIR}/{STATE_FILE}); "
            "choose another --out" + (" (--overwrite deletes only a folder that a build wrote)" if overwrite else "")
        )
    if overwrite and out.is_dir():
        shutil.rmtree(out)
    if state.is_file():
        pass  # an unfinished build: resumed, each stage redone only if its own inputs changed
    elif report.is_file():
        if json.loads(report.read_text()).get("fingerprint") != fingerprint:
            raise FileExistsError(f"{out} holds a different build; choose another --out or pass --overwrite")
        # A finished build with the same arguments: build again from scratch (the code may have changed;
        # derived files left in place would be taken for finished work).
        for folder in stage_export.OUT_DIRS:
            shutil.rmtree(out / folder, ignore_errors=True)
        for name in stage_export.OUT_FILES:
            (out / name).unlink(missing_ok=True)
        shutil.rmtree(work, ignore_errors=True)
    else:
        shutil.rmtree(work, ignore_errors=True)  # killed before the fingerprint was written: start afresh
    work.mkdir(parents=True, exist_ok=True)
    for stale in work.glob(".tmp-*"):
        stale.unlink()
    write_json_atomic(state, fingerprint, work)
    return work


def build(
    source,
    out,
    config: AffectNetPlusConfig,
    options: BuildOptions | None = None,
    experts: str | None = None,
    fusion: FusionConfig | None = None,
    recompute: str | None = None,
    metadata: bool = False,
    va_model: str | None = None,
    subsets: SubsetConfig | None = None,
    au_model: AUModelConfig | None = None,
) -> dict:
    """Reads ``source`` and writes the AffectNet+ folder ``out``; returns the build report.

    Args:
        source: the source root (a folder; a CSV file for ``source_format="csv"``).
        out: output folder; created, or resumed (an unfinished build: the stages whose inputs changed are
            redone), or refused when it holds a finished build of other arguments (unless
            ``options.overwrite``) or anything a build did not write.
        config: how the source is read (format, crop size and margin, JPEG quality, ...).
        options: sharding, worker processes, overwrite, progress bars.
        experts: an expert ``manifest.json``; with it the build adds ``soft_label``, ``subset``,
            ``expert_probs`` and ``au_scores`` (``docs/method.md`` §3-§6). Refused (``ValueError``) unless
            its experts were trained on this build's train rows (``stage_score.check_fold_plan``).
        fusion: λ, or fitting it (``FusionConfig()`` by default).
        recompute: for a source with its own soft labels and subsets (the official release):
            ``"subsets"`` recomputes the subsets from its soft labels with ``subsets``' rule;
            ``"soft-labels"`` (with ``experts``) replaces soft labels and subsets with the build's. The
            source's are kept as ``release_subset`` / ``release_soft_label`` (``builder.recompute``).
            With ``experts`` and without it the build is refused, so release labels are never lost
            by accident.
        metadata: fill the metadata columns the source lacks with the offline face models
            (``metadata_annotators``: landmarks, head pose, age and gender, ethnicity).
        va_model: with ``metadata``, a valence/arousal regressor that estimates valence and arousal
            when the source has none.
        subsets: the subset thresholds (``SubsetConfig()`` by default).
        au_model: the AU component's shape model and calibration (``AUModelConfig()`` by default).

    Every source row ends as a written row or as a line of ``rejects.jsonl``; the report's
    ``read == written + sum(rejected)`` is checked before the build is declared finished.
    """
    options = options or BuildOptions()
    fusion = fusion or FusionConfig()
    subset_config = subsets or SubsetConfig()
    au_config = au_model or AUModelConfig()
    out = Path(out)
    reader = open_source(source, config)
    if experts and "soft_label" in reader.columns and recompute != "soft-labels":
        raise ValueError(
            f"{source} already has soft labels and subsets ({config.source_format}); they are kept unless you "
            "pass --recompute soft-labels to replace them with the experts' (or drop --experts)"
        )
    if recompute == "soft-labels" and not experts:
        raise ValueError("--recompute soft-labels computes soft labels with experts: pass --experts too")
    if recompute is not None:
        reader = RecomputedSource(reader, recompute, subset_config)
    if va_model and not metadata:
        raise ValueError("a valence/arousal model is one of the metadata annotators: it needs --metadata")
    manifest = Path(experts) if experts else None
    if manifest is not None and not manifest.is_file():
        raise FileNotFoundError(f"no expert manifest at {experts}")
    base_columns = [c for c in reader.columns if not (experts and c in SOFT_LABEL_COLUMNS)]
    annotators = metadata_annotators(base_columns, config, va_model) if metadata else []
    annotated = [*base_columns, *(c for a in annotators for c in a.outputs if c not in base_columns)]
    features = select_features([*annotated, *(SOFT_LABEL_COLUMNS if experts else ())], reader.ethnicity_classes)
    crop_features = select_features(reader.columns, reader.ethnicity_classes)

    # Every stage's fingerprint, from the arguments alone: computed before anything runs.
    work = out / WORK_DIR
    crop_fingerprint = stage_crop.fingerprint(source, config, options.shard_rows)
    if recompute is not None:
        crop_fingerprint.update(reader.fingerprint())
    crop = Stage(work, stage_crop.NAME, crop_fingerprint)
    meta = Stage(work, stage_metadata.NAME, stage_metadata.fingerprint(crop.digest, annotators)) if annotators else None
    meta_digest = meta.digest if meta else None
    score = fit = fuse = None
    if manifest is not None:
        from builder import stage_score  # torch: only a build with experts pays for importing it

        stage_score.check_fold_plan(manifest)  # what the manifest alone tells: before anything is written
        score = Stage(work, stage_score.NAME, stage_score.fingerprint(crop.digest, manifest))
        num_folds = score.fingerprint["experts"]["num_folds"]
        fit = Stage(work, stage_fit.NAME, stage_fit.fingerprint(crop.digest, meta_digest, score.digest, num_folds,
                                                                au_config, fusion))  # fmt: skip
        fuse = Stage(work, stage_fuse.NAME, stage_fuse.fingerprint(crop.digest, meta_digest, score.digest, fit.digest,
                                                                   fusion, subset_config))  # fmt: skip
    inputs = BuildInputs(experts=experts, recompute=recompute, metadata=metadata, va_model=va_model)
    build_config = resolved_config(config, options, inputs, fusion, subset_config, au_config)
    settings = source_settings(config)
    export_files = {BUILD_CONFIG_FILE: build_config}
    stages = [s for s in (crop, meta, score, fit, fuse) if s is not None]
    fingerprint = {**crop.fingerprint, **{k: v for k, v in settings.items() if k not in crop.fingerprint}}
    if meta is not None:
        fingerprint["metadata"] = meta.fingerprint["annotators"]
    if score is not None:
        fingerprint["experts"] = {**score.fingerprint["experts"], "fusion": asdict(fusion),
                                  "subsets": asdict(subset_config), "au_model": asdict(au_config)}  # fmt: skip
    # build_config.json's paths depend on the working directory, not on the data: left out.
    config_digest = {**build_config, "inputs": {**build_config["inputs"], "experts": bool(experts),
                                                "va_model": bool(va_model)}}  # fmt: skip
    export = Stage(work, stage_export.NAME, stage_export.fingerprint(
        crop.digest, meta_digest, fuse.digest if fuse else None, features, settings, options.shard_rows,
        config_digest))  # fmt: skip
    fingerprint["stages"] = {s.name: s.digest for s in (*stages, export)}
    _prepare_output(out, fingerprint, options.overwrite)

    # An export of other inputs may have consumed crop shards: crop again (the later caches stay valid).
    cropped = crop.result()
    if cropped is not None and not export.started() and not all((crop.dir / n).is_file() for n in cropped["shards"]):
        crop.reset()
    cropped = stage_crop.run(crop, reader, config, crop_features, options.shard_rows, options.num_proc,
                             options.progress)  # fmt: skip
    shards, read = cropped["shards"], cropped["read"]
    if manifest is not None:  # the train rows are known now: refuse experts trained on others before any model runs
        stage_score.check_fold_plan(manifest, stage_score.train_ids([crop.dir, score.dir], shards))
    dirs = [crop.dir]  # where each stage finds its inputs' columns: later stages first
    if meta is not None:
        stage_metadata.run(meta, crop.dir, shards, annotators, features, options.num_proc, options.progress)
        dirs.insert(0, meta.dir)
    report_fields = {"fingerprint": fingerprint}
    if recompute == "subsets":  # the card states the rule the subsets were recomputed with
        report_fields["subsets"] = asdict(subset_config)
    if manifest is not None:
        workers = 0 if options.num_proc == 1 else min(4, options.num_proc)  # DataLoader processes decoding crops
        stage_score.run(score, crop.dir, shards, manifest, workers, options.progress)
        fitted = stage_fit.run(fit, shards, dirs, score.dir, au_config, fusion, num_folds)
        used = fitted.get("fusion") or {"expert_weight": fusion.expert_weight}
        fused = stage_fuse.run(fuse, shards, dirs, score.dir, stage_fit.load_au_model(fit),
                               FusionConfig(used["expert_weight"]), subset_config, options.progress)  # fmt: skip
        report_fields.update(
            fusion={**used, "au_model": fitted["au_model"]},
            subsets=asdict(subset_config),
            expert_precision=score.fingerprint["precision"],
            degenerate_landmarks=fused[stage_fuse.DEGENERATE],
        )
        export_files[AU_MODEL_FILE] = json.loads((fit.dir / AU_MODEL_FILE).read_text())
        export_files[FUSION_FILE] = {**used, "experts": {k: score.fingerprint["experts"][k]
                                                         for k in ("manifest", "manifest_sha256")}}  # fmt: skip
        dirs.insert(0, fuse.dir)
    notes_dirs = [s.dir for s in (crop, meta, fuse) if s is not None]
    report = stage_export.run(export, out, shards, read, crop.dir, dirs, notes_dirs, features, reader, config,
                              report_fields, export_files, options.progress)  # fmt: skip
    shutil.rmtree(work)
    check_rejections(report, options.max_rejected_fraction)
    return report
