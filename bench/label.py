"""Labelling throughput of `scripts/label.py`'s path against `transformers.pipeline("image-classification")`.

    python bench/label.py                    # 8 x 2 tiny experts, the 600-image bundled sample, CPU

Both score every row of the same built folder with the same cross-fitted assignment (a train row by
its own fold's 8 experts, the other rows by all 16), in this process, alternating; images/s are rows
per second, medians over the repeats. The pipeline gets decoded PIL images and the same batch size.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from affectnet_plus import EMOTIONS  # noqa: E402
from bench.train import sample_folder  # noqa: E402
from models.data import folds, load_splits  # noqa: E402
from models.labeling import LabelConfig, label  # noqa: E402


def experts_for(data: Path, out: Path) -> Path:
    from models.expert import train_experts
    from models.training import TrainConfig

    manifest = out / "label-experts" / "manifest.json"
    if not manifest.is_file():
        train = TrainConfig(output_dir=str(out), max_steps=1, per_device_batch_size=8, num_workers=0, warmup_ratio=0)
        train_experts(str(data), out / "label-experts", train, num_folds=2)
    return manifest


def random_experts(out: Path, preset: str) -> Path:
    """An 8 x 2 manifest of untrained experts of ``preset``: throughput does not depend on the weights."""
    from models.expert import make_expert, make_processor

    manifest = out / f"label-experts-{preset}" / "manifest.json"
    if not manifest.is_file():
        entries = []
        for emotion in EMOTIONS:
            for fold in range(2):
                folder = manifest.parent / f"{emotion}-f{fold}"
                model = make_expert(emotion, preset)
                model.save_pretrained(folder)
                make_processor(model.config.image_size).save_pretrained(folder)
                entries.append({"emotion": emotion, "fold": fold, "path": folder.name})
        manifest.write_text(json.dumps({"num_folds": 2, "experts": entries}, indent=2))
    return manifest


def expert_forwards(data: Path) -> int:
    """Expert forward passes per labelling run: 8 per train row (its fold's), 16 per other row."""
    splits = load_splits(data, columns=("image_id",))
    return sum(len(s) * (8 if name == "train" else 16) for name, s in splits.items())


def run_project(data: Path, manifest: Path, out: Path, args, precision: str = "auto") -> float:
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    counts = label(LabelConfig(str(data), str(manifest), str(out), args.batch_size, args.num_workers,
                               precision=precision))  # fmt: skip
    return sum(counts.values()) / (time.perf_counter() - start)


def run_pipeline(data: Path, manifest: Path, args, dtype=None) -> float:
    from datasets import Image
    from transformers import pipeline

    start = time.perf_counter()
    splits = load_splits(data, columns=("image_id", "image", "human_label"))
    rows = 0
    experts = {(e, f): pipeline("image-classification", model=str(manifest.parent / f"{e}-f{f}"), device=-1,
                                dtype=dtype)
               for e in EMOTIONS for f in range(2)}  # fmt: skip
    for name, split in splits.items():
        split = split.cast_column("image", Image(decode=True))
        images = split["image"]
        fold_of_row = folds(split["image_id"], 2) if name == "train" else None
        for fold in range(2):
            chosen = [i for i in range(len(images)) if fold_of_row is None or fold_of_row[i] == fold]
            batch = [images[i] for i in chosen]
            for emotion in EMOTIONS:
                experts[(emotion, fold)](batch, batch_size=args.batch_size, top_k=2)
        rows += len(images)
    return rows / (time.perf_counter() - start)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sample-size", type=int, default=600)
    parser.add_argument("--out", type=Path, default=HERE / "out")
    parser.add_argument("--data", type=Path, default=None, help="a built folder instead of the sample")
    parser.add_argument("--preset", choices=("tiny", "base"), default=None,
                        help="untrained experts of this preset instead of the 1-step tiny ones")  # fmt: skip
    parser.add_argument("--skip-pipeline", action="store_true",
                        help="only the project path, reported per expert (the GPU check: pipeline is CPU-bound)")  # fmt: skip
    args = parser.parse_args(argv)
    data = args.data or sample_folder(args.out, args.sample_size)
    manifest = random_experts(args.out, args.preset) if args.preset else experts_for(data, args.out)
    if args.skip_pipeline:
        forwards = expert_forwards(data)
        runs = [run_project(data, manifest, args.out / "label-scores", args) for _ in range(args.repeats)]
        rows_s = statistics.median(runs)
        rows = sum(len(s) for s in load_splits(data, columns=("image_id",)).values())
        results = {"rows": rows, "experts": f"8 x 2 {args.preset or 'tiny'}", "batch_size": args.batch_size,
                   "rows_s": round(rows_s, 1), "expert_images_s": round(rows_s * forwards / rows, 1),
                   "all_rows_s": [round(v, 1) for v in runs]}  # fmt: skip
        print(json.dumps(results, indent=2))
        (args.out / "label-only.json").write_text(json.dumps(results, indent=2))
        return 0
    import torch

    from models.labeling import resolve_precision

    # label() in float32 and in its default precision (bfloat16 where the CPU computes it), the pipeline
    # as users call it (float32) and with its weights in bfloat16: every pair in one run, alternating.
    runs = {
        "project_fp32": lambda: run_project(data, manifest, args.out / "label-scores", args, "fp32"),
        "project_auto": lambda: run_project(data, manifest, args.out / "label-scores", args, "auto"),
        "pipeline_fp32": lambda: run_pipeline(data, manifest, args),
        "pipeline_bf16": lambda: run_pipeline(data, manifest, args, torch.bfloat16),
    }
    timings = {name: [] for name in runs}
    for _ in range(args.repeats):
        for name, run in runs.items():
            timings[name].append(run())
    median = {name: round(statistics.median(v), 1) for name, v in timings.items()}
    results = {
        "rows": args.sample_size,
        "experts": "8 x 2 tiny",
        "batch_size": args.batch_size,
        "repeats": args.repeats,
        "auto_precision": resolve_precision("cpu"),
        "rows_per_s": median,
        "all": {name: [round(x, 1) for x in v] for name, v in timings.items()},
        "ratio_fp32_vs_pipeline": round(median["project_fp32"] / median["pipeline_fp32"], 2),
        "ratio_auto_vs_pipeline": round(median["project_auto"] / median["pipeline_fp32"], 2),
        "ratio_auto_vs_pipeline_bf16": round(median["project_auto"] / median["pipeline_bf16"], 2),
    }
    print(json.dumps(results, indent=2))
    (args.out / "label.json").write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
