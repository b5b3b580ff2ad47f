"""Train any model of AffectNet+ with Accelerate: an expert, a FER baseline or the valence/arousal regressor.

    accelerate launch scripts/train.py expert --data affectnet_plus --emotion happy --fold 0 --num-folds 5 \\
        --preset base --init-from google/vit-base-patch16-224-in21k --output-dir experts/happy-f0
    accelerate launch scripts/train.py fer --data affectnet_plus --target soft --num-classes 8 --preset base \\
        --init-from google/vit-base-patch16-224-in21k --output-dir baselines/soft-8
    accelerate launch scripts/train.py valence-arousal --data affectnet_plus --preset base \\
        --init-from google/vit-base-patch16-224-in21k --output-dir va
    python scripts/train.py expert --data affectnet_plus --emotion happy --fold 0 --num-folds 5 \
        --init-from facebook/dinov2-small --freeze-backbone --output-dir experts/happy-f0
    accelerate launch scripts/train.py expert --config experts/happy-f0/training_config.json --output-dir again
    accelerate launch scripts/train.py fer --data affectnet_plus --target soft-multilabel --num-classes 8 \
        --preset base --init-from google/vit-base-patch16-224-in21k --output-dir baselines/soft-multilabel-8
    python scripts/train.py fer --summarise baselines/hard-8 baselines/soft-8 baselines/soft-multilabel-8 \
        --output-dir baselines

Every option comes from the configs' dataclasses (``models.expert.ExpertConfig``, ``models.fer.FERConfig``,
``models.valence_arousal.RegressorConfig``: data and ViT, ``TrainConfig``, ``AugmentConfig``), defaults and
help included; ``--config FILE`` (a run's saved ``training_config.json``, or YAML) sets them, and options on
the command line override it. One GPU, several (DDP, from `accelerate config` or `--multi_gpu
--num_processes N`), several nodes (`--num_machines/--machine_rank/--main_process_ip`), bf16 with
`--mixed_precision bf16`; plain `python scripts/train.py ...` runs one process (CPU or one GPU).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file by `accelerate launch scripts/train.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.expert import ExpertConfig, train_expert  # noqa: E402
from models.fer import FERConfig, train_fer, write_results  # noqa: E402
from models.valence_arousal import RegressorConfig, train_regressor  # noqa: E402
from scripts.options import add_arguments, add_config_argument, from_args, parse_args  # noqa: E402

# command: (config class, trainer, what it trains)
COMMANDS = {
    "expert": (ExpertConfig, train_expert,
               "the one-vs-rest ViT/DINOv2 expert of one emotion, on the train rows outside one fold (fine-tuned, "
               "or a head on its frozen backbone's cached features with --freeze-backbone)"),
    "fer": (FERConfig, train_fer,
            "a FER baseline: a ViT classifier of the human labels (hard), of the soft labels normalised to sum "
            "to 1 (soft) or of their independent per-emotion confidences (soft-multilabel), evaluated on the "
            "validation split (top-1/top-2, macro-F1, kappa, KL/JS, ECE, per subset and demographic group)"),
    "valence-arousal": (RegressorConfig, train_regressor,
                        "a ViT that predicts valence and arousal (CCC, RMSE on the validation split), for "
                        "`affectnet-plus build --va-model`"),
}  # fmt: skip
SUMMARISE_HELP = "do not train: write the results table of these finished FER runs to --output-dir"


def make_parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The ``train.py`` parser and its per-command parsers (each parses its own options, ``--config``)."""
    parser = argparse.ArgumentParser(
        prog="train.py",
        description="Train a model of AffectNet+ on a built folder. Writes a transformers checkpoint "
        "(model.safetensors, config.json, preprocessor_config.json), training_config.json, a model card and, "
        "last, all_results.json to --output-dir.",
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands = {}
    for name, (config_class, _, description) in COMMANDS.items():
        command = subparsers.add_parser(
            name, help=description, description=f"Train {description}.",
            formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        )  # fmt: skip
        add_config_argument(command)
        add_arguments(command, config_class)
        if name == "fer":
            command.add_argument("--summarise", nargs="+", type=Path, metavar="RUN_DIR", default=None,
                                 help=SUMMARISE_HELP)  # fmt: skip
        commands[name] = command
    return parser, commands


def _summarise(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="train.py fer --summarise")
    parser.add_argument("--summarise", nargs="+", type=Path, metavar="RUN_DIR", required=True, help=SUMMARISE_HELP)
    parser.add_argument("--output-dir", type=Path, required=True, help="folder of results.json and results.md")
    args = parser.parse_args(argv)
    write_results(args.summarise, args.output_dir)
    print((args.output_dir / "results.md").read_text())
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser, commands = make_parser()
    if not argv or argv[0] not in commands:
        parser.parse_args(argv)  # help, or the usage error
    name, rest = argv[0], argv[1:]
    config_class, trainer, _ = COMMANDS[name]
    try:
        if name == "fer" and "--summarise" in rest:
            return _summarise(rest)
        args = parse_args(commands[name], rest)
        results = trainer(from_args(config_class, args))
    except (ValueError, FileNotFoundError) as err:
        print(f"train.py {name}: error: {err}", file=sys.stderr)
        return 2
    print({k: round(v, 4) for k, v in results.items() if k.startswith(("validation_", "heldout_"))
           and isinstance(v, float)})  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
