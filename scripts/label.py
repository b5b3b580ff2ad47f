"""Score every row of a built AffectNet+ folder with the cross-fitted expert ensemble.

    accelerate launch scripts/label.py --data affectnet_plus --experts experts/manifest.json --out scores/

Each process scores its own shards (bf16 on GPUs); re-running after a crash scores only the missing
shards. A train row is scored by the experts that never saw its fold; validation and unlabeled rows by
the mean over the folds. A manifest whose fold plan is not that of DATA's train rows is refused. Experts
sharing a frozen backbone run it once per image (and not at all for images in their feature cache).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file by `accelerate launch scripts/label.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.labeling import LabelConfig, label  # noqa: E402
from scripts.options import add_arguments, add_config_argument, from_args, parse_args  # noqa: E402


def make_parser() -> argparse.ArgumentParser:
    """Options from ``LabelConfig`` (defaults and help from the dataclass), plus ``--config``."""
    parser = argparse.ArgumentParser(
        prog="label.py",
        description="Write OUT/<split>-NNNNN.parquet shards of (image_id, expert_probs): the cross-fitted "
        "P(emotion present) of the 8 x K experts of a manifest, for every row of DATA.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_config_argument(parser)
    add_arguments(parser, LabelConfig)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = make_parser()
    args = parse_args(parser, argv)
    try:
        config = from_args(LabelConfig, args)
        counts = label(config)
    except (ValueError, FileNotFoundError, FloatingPointError) as err:
        print(f"label: error: {err}", file=sys.stderr)
        return 2
    print(", ".join(f"{split}: {n} rows" for split, n in counts.items()) + f" scored into {config.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
