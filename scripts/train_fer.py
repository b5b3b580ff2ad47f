"""Train a FER baseline of AffectNet+ (Hard-FER or Soft-FER, 8 or 7 classes) with Accelerate.

    accelerate launch scripts/train_fer.py --data affectnet_plus --target soft --num-classes 8 --preset base \\
        --init-from google/vit-base-patch16-224-in21k --output-dir baselines/soft-8

`--target hard` learns the human label (cross-entropy), `--target soft` the soft label (soft
cross-entropy); `--num-classes 7` drops contempt. The validation metrics (top-1/top-2, macro-F1,
kappa, KL/JS to the soft labels, ECE, per subset and demographic group) go to all_results.json and
the model card. `python scripts/train_fer.py --summarise RUN_DIR... --output-dir OUT` writes the
table of several runs (OUT/results.json, OUT/results.md). Same launch options as train_expert.py.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file by `accelerate launch scripts/train_fer.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.fer import NUM_CLASSES, TARGETS, FERConfig, train_fer, write_results  # noqa: E402
from scripts.train_expert import add_model_arguments, add_output_arguments, add_training_arguments, model_options  # noqa: E402


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="train_fer.py",
        description="Train a ViT facial-expression classifier on the hard (human) or soft labels of a built "
        "AffectNet+ folder and evaluate it on the validation split. Writes a transformers checkpoint, "
        "all_results.json and a model card to --output-dir.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_model_arguments(parser)
    parser.add_argument("--target", choices=TARGETS, default="hard", help="hard: human_label; soft: soft_label")
    parser.add_argument("--num-classes", type=int, choices=NUM_CLASSES, default=8, help="7 drops contempt")
    add_output_arguments(parser)
    parser.add_argument("--summarise", nargs="+", type=Path, metavar="RUN_DIR", default=None,
                        help="do not train: write the results table of these finished runs to --output-dir")  # fmt: skip
    add_training_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--summarise" in argv and "--data" not in argv:
        argv = ["--data", "", *argv]  # the table needs no data; --data stays required for training
    args = make_parser().parse_args(argv)
    try:
        if args.summarise:
            write_results(args.summarise, args.output_dir)
            print((args.output_dir / "results.md").read_text())
            return 0
        results = train_fer(FERConfig(target=args.target, num_classes=args.num_classes, **model_options(args)))
    except (ValueError, FileNotFoundError) as err:
        print(f"train_fer: error: {err}", file=sys.stderr)
        return 2
    print({k: round(v, 4) for k, v in results.items() if k.startswith("validation_") and isinstance(v, float)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
