"""Train the valence/arousal regressor (a ViT with a 2-output head) with Accelerate.

    accelerate launch scripts/train_va.py --data affectnet_plus --preset base \\
        --init-from google/vit-base-patch16-224-in21k --output-dir va

It learns from the train rows that carry valence and arousal and is evaluated on the validation
split (CCC, RMSE). `affectnet-plus build SRC --va-model va` then estimates valence and arousal for
sources without them. Same launch options as `scripts/train_expert.py` (GPUs, nodes, bf16).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file by `accelerate launch scripts/train_va.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.valence_arousal import RegressorConfig, train_regressor  # noqa: E402
from scripts.train_expert import add_model_arguments, add_output_arguments, add_training_arguments, model_options  # noqa: E402


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="train_va.py",
        description="Train a ViT that predicts valence and arousal from a face crop, on the train rows of a "
        "built AffectNet+ folder that have both. Writes a transformers checkpoint, all_results.json (CCC, RMSE "
        "on the validation split) and a model card to --output-dir.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_model_arguments(parser)
    add_output_arguments(parser)
    add_training_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    try:
        results = train_regressor(RegressorConfig(**model_options(args)))
    except (ValueError, FileNotFoundError) as err:
        print(f"train_va: error: {err}", file=sys.stderr)
        return 2
    print({k: round(v, 4) for k, v in results.items() if k.startswith("validation_") and isinstance(v, float)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
