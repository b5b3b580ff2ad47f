"""Score every row of a built AffectNet+ folder with the cross-fitted expert ensemble.

    accelerate launch scripts/label.py --data affectnet_plus --experts experts/manifest.json --out scores/

Each process scores its own shards (bf16 on GPUs); re-running after a crash scores only the missing
shards. A train row is scored by the experts that never saw its fold; validation and unlabeled rows by
the mean over the folds.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file by `accelerate launch scripts/label.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.labeling import LabelConfig, label  # noqa: E402


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="label.py",
        description="Write OUT/<split>-NNNNN.parquet shards of (image_id, expert_probs): the cross-fitted "
        "P(emotion present) of the 8 x K experts of a manifest, for every row of DATA.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--data", required=True, help="a built AffectNet+ folder")
    parser.add_argument("--experts", required=True, help="experts/manifest.json from affectnet-plus train-experts")
    parser.add_argument("--out", required=True, help="folder of the score shards")
    parser.add_argument("--batch-size", type=int, default=256, help="images per forward pass and process")
    parser.add_argument("--num-workers", type=int, default=4, help="DataLoader workers decoding images")
    parser.add_argument("--shard-rows", type=int, default=8192, help="rows per output shard")
    parser.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                        help="auto: bfloat16 on GPUs and on CPUs with hardware bfloat16, float32 elsewhere")  # fmt: skip
    return parser


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    try:
        counts = label(
            LabelConfig(args.data, args.experts, args.out, args.batch_size, args.num_workers, args.shard_rows,
                        args.precision)
        )
    except (ValueError, FileNotFoundError, FloatingPointError) as err:
        print(f"label: error: {err}", file=sys.stderr)
        return 2
    print(", ".join(f"{split}: {n} rows" for split, n in counts.items()) + f" scored into {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
