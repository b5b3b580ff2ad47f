"""Train one one-vs-rest ViT expert of AffectNet+ with Accelerate.

    accelerate launch scripts/train_expert.py --data demo/affectnet_plus --emotion happy --fold 0 \\
        --num-folds 5 --preset base --init-from google/vit-base-patch16-224-in21k --output-dir experts/happy-f0

One GPU, several (DDP, from `accelerate config` or `--multi_gpu --num_processes N`), several nodes
(`--num_machines/--machine_rank/--main_process_ip`), bf16 with `--mixed_precision bf16`; plain
`python scripts/train_expert.py ...` runs one process (CPU or one GPU). On the bundled sample,
`--preset tiny` trains on a laptop CPU in seconds.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file by `accelerate launch scripts/train_expert.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from affectnet_plus import EMOTIONS  # noqa: E402
from models.expert import PRESETS, ExpertConfig, train_expert  # noqa: E402
from models.training import TrainConfig  # noqa: E402


def add_training_arguments(parser: argparse.ArgumentParser) -> None:
    """The optimisation options shared by every training command (fields of ``TrainConfig``)."""
    group = parser.add_argument_group("training")
    group.add_argument("--num-train-epochs", type=int, default=3, help="epochs (re-drawn balanced sets)")
    group.add_argument("--max-steps", type=int, default=None, help="optimizer steps per process; wins over epochs")
    group.add_argument("--per-device-batch-size", type=int, default=64, help="images per process and micro-batch")
    group.add_argument("--eval-batch-size", type=int, default=256, help="images per process in evaluation")
    group.add_argument("--learning-rate", type=float, default=1e-4, help="peak AdamW learning rate")
    group.add_argument("--weight-decay", type=float, default=0.05, help="AdamW weight decay (not on biases/norms)")
    group.add_argument("--warmup-ratio", type=float, default=0.1, help="share of steps in linear warmup")
    group.add_argument("--gradient-accumulation-steps", type=int, default=1, help="micro-batches per step")
    group.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping norm (0: off)")
    group.add_argument("--checkpointing-steps", type=int, default=None, help="save the training state every N steps")
    group.add_argument("--resume-from-checkpoint", default=None,
                       help="a checkpoints/step_N folder, or 'latest' (in --output-dir)")  # fmt: skip
    group.add_argument("--report-to", default="none", help="tracker: none, tensorboard, wandb, all, ...")
    group.add_argument("--num-workers", type=int, default=4, help="DataLoader workers decoding images")
    group.add_argument("--seed", type=int, default=42, help="seed of init, augmentation and sampling")


def train_config(args: argparse.Namespace, output_dir) -> TrainConfig:
    return TrainConfig(
        output_dir=str(output_dir),
        num_train_epochs=args.num_train_epochs,
        max_steps=args.max_steps,
        per_device_batch_size=args.per_device_batch_size,
        eval_batch_size=args.eval_batch_size,
        learning_rate=args.learning_rate,
        weight_decay=args.weight_decay,
        warmup_ratio=args.warmup_ratio,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        max_grad_norm=args.max_grad_norm,
        checkpointing_steps=args.checkpointing_steps,
        resume_from_checkpoint=args.resume_from_checkpoint,
        report_to=args.report_to,
        num_workers=args.num_workers,
        seed=args.seed,
    )


def add_output_arguments(parser: argparse.ArgumentParser) -> None:
    """Where one trained checkpoint goes: ``--output-dir`` and ``--push-to-hub``."""
    parser.add_argument("--output-dir", required=True, type=Path, help="checkpoint folder")
    parser.add_argument("--push-to-hub", default=None, metavar="REPO", help="push the checkpoint to this Hub repo")


def model_options(args: argparse.Namespace) -> dict:
    """The ``models.expert.ModelConfig`` fields that the shared arguments set."""
    return dict(data=args.data, preset=args.preset, init_from=args.init_from, image_size=args.image_size,
                push_to_hub=args.push_to_hub, train=train_config(args, args.output_dir))  # fmt: skip


def add_expert_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--num-folds", type=int, default=5, help="cross-fitting folds K (fold = sha1(image_id) mod K)")


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The data and ViT options shared by every training script (experts, valence/arousal regressor)."""
    parser.add_argument("--data", required=True, help="a built AffectNet+ folder (affectnet-plus build)")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny",
                        help="tiny: small random ViT for CPUs and tests; base: ViT-B/16 at 224 px")  # fmt: skip
    parser.add_argument("--init-from", default=None,
                        help="pretrained ViT to start from: a local folder or a Hub id (safetensors only)")  # fmt: skip
    parser.add_argument("--image-size", type=int, default=None, help="input size (default: the preset's)")


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="train_expert.py",
        description="Train the one-vs-rest ViT expert of one emotion on the train rows outside one fold. "
        "Writes a transformers checkpoint (model.safetensors, config.json, preprocessor_config.json), "
        "training_config.json, all_results.json and a model card to --output-dir.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--emotion", required=True, choices=EMOTIONS, help="the expert's emotion")
    parser.add_argument("--fold", type=int, default=0, help="the fold this expert never sees")
    add_expert_arguments(parser)
    add_output_arguments(parser)
    add_training_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    try:
        config = ExpertConfig(emotion=args.emotion, fold=args.fold, num_folds=args.num_folds, **model_options(args))
        train_expert(config)
    except (ValueError, FileNotFoundError) as err:
        print(f"train_expert: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
