"""Labelling throughput of `scripts/label.py`'s path against `transformers.pipeline("image-classification")`.

    python bench/label.py --num-workers 0    # the experts of `affectnet-plus train-experts` (1 step, tiny),
                                             # the bundled sample, CPU

Every pipeline scores every row of the same built folder with the same cross-fitted assignment (a
train row of fold j by the fold-j expert of each emotion, every other row by all the experts), in
this process, alternating; throughput is rows per second, model loading and image decoding included,
medians over the repeats. Each precision is compared with itself: float32 with float32 and, where
`label()` runs in bfloat16 by default (GPUs, CPUs with hardware bfloat16), bfloat16 with bfloat16.

- project: `label(LabelConfig(..., precision=P))` (bfloat16: autocast over the float32 weights).
- baseline "pipeline": one `pipeline("image-classification", model=EXPERT, dtype=D)` per expert,
  called as its documentation recommends for many inputs: on the list of decoded images with
  `batch_size` and `num_workers` (the same as the project's); each pipeline runs its own image
  processor, so an image is preprocessed once per expert that scores it.
- baseline "processor once + model forward": the experts' (identical) image processor runs once per
  batch of images, and every expert's `AutoModelForImageClassification` (weights in D) is called on
  the same `pixel_values`, followed by a softmax.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from affectnet_plus import EMOTIONS  # noqa: E402
from models.data import folds, load_splits  # noqa: E402
from models.labeling import LabelConfig, label  # noqa: E402

TARGET = 3.0  # the labelling throughput target, as a multiple of the pipeline's at equal precision
SHARED_TARGET = 5.0  # the same with experts sharing one frozen backbone (--shared-backbone)
DTYPES = {"fp32": "float32", "bf16": "bfloat16"}


def sample_folder(out: Path, n: int) -> Path:
    """A built folder of the bundled sample renderer's ``n`` images (cached in ``out``)."""
    from affectnet_plus import AffectNetPlusConfig
    from builder.export import BuildOptions, build
    from builder.sample import SampleConfig, write_sample

    root = out / f"label-sample-{n}"
    built = root / "affectnet_plus"
    if not (built / "build_report.json").is_file():
        shutil.rmtree(root, ignore_errors=True)
        write_sample(root / "raw", SampleConfig(n=n, seed=2), progress=True)
        build(root / "raw", built, AffectNetPlusConfig(), BuildOptions(num_proc=2, progress=False))
    return built


def experts_for(data: Path, out: Path, num_folds: int) -> Path:
    from models.expert import train_experts
    from models.training import TrainConfig

    manifest = out / f"label-experts-k{num_folds}" / "manifest.json"
    if not manifest.is_file():
        train = TrainConfig(output_dir=str(out), max_steps=1, per_device_batch_size=8, num_workers=0, warmup_ratio=0)
        train_experts(str(data), manifest.parent, train, num_folds=num_folds)
    return manifest


def random_experts(data: Path, out: Path, preset: str, num_folds: int) -> Path:
    """A manifest of untrained experts of ``preset``: throughput does not depend on the weights. It records
    the fold plan of ``data``'s train rows, which ``label()`` checks."""
    from core.schema import fold_plan
    from models.expert import make_expert, make_processor

    manifest = out / f"label-experts-{preset}-k{num_folds}" / "manifest.json"
    if not manifest.is_file():
        entries = []
        for emotion in EMOTIONS:
            for fold in range(num_folds):
                folder = manifest.parent / f"{emotion}-f{fold}"
                model = make_expert(emotion, preset)
                model.save_pretrained(folder)
                make_processor(model.config.image_size).save_pretrained(folder)
                entries.append({"emotion": emotion, "fold": fold, "path": folder.name})
        plan = fold_plan(load_splits(data, columns=("image_id",))["train"]["image_id"], num_folds)
        manifest.write_text(json.dumps({"num_folds": num_folds, "fold_plan": plan, "experts": entries}, indent=2))
    return manifest


# The shared-backbone case: a DINOv2 smaller than DINOv2-small (ViT-S/14: hidden 384, 12 layers, 6 heads,
# 224 px), so that the 16 pipelines finish on a 2-core CPU: hidden 192, 6 layers, 3 heads, MLP 768, patch 14,
# at 112 px (64 patches + CLS). Random weights: throughput does not depend on them.
SMALL_DINOV2 = dict(hidden_size=192, num_hidden_layers=6, num_attention_heads=3, mlp_ratio=4, patch_size=14,
                    image_size=112)  # fmt: skip


def frozen_experts(data: Path, out: Path, num_folds: int) -> Path:
    """8 x K experts trained by ``train-experts --freeze-backbone`` on one random ``SMALL_DINOV2`` backbone;
    their feature cache is removed, so that ``label()`` runs the backbone on every row, as the pipelines do."""
    import torch
    from transformers import Dinov2Config, Dinov2Model

    from models.expert import make_processor, train_experts
    from models.training import TrainConfig
    from models.transforms import IMAGENET_MEAN, IMAGENET_STD

    root = out / f"label-frozen-dinov2-k{num_folds}"
    manifest = root / "experts" / "manifest.json"
    if not manifest.is_file():
        torch.manual_seed(0)
        backbone = root / "backbone"
        Dinov2Model(Dinov2Config(**SMALL_DINOV2)).save_pretrained(backbone)
        make_processor(SMALL_DINOV2["image_size"], IMAGENET_MEAN, IMAGENET_STD).save_pretrained(backbone)
        train = TrainConfig(output_dir=str(manifest.parent), num_workers=0, eval_batch_size=64)
        train_experts(str(data), manifest.parent, train, num_folds=num_folds, init_from=str(backbone),
                      freeze_backbone=True)  # fmt: skip
    shutil.rmtree(manifest.parent / "features", ignore_errors=True)
    return manifest


def read_manifest(manifest: Path) -> tuple[list[str], int, dict]:
    """The manifest's emotions (in the project's order), its number of folds and ``{(emotion, fold): folder}``."""
    content = json.loads(manifest.read_text())
    entries = {(e["emotion"], int(e["fold"])): manifest.parent / e["path"] for e in content["experts"]}
    emotions = [e for e in EMOTIONS if any(key[0] == e for key in entries)]
    return emotions, int(content["num_folds"]), entries


def describe_experts(manifest: Path) -> dict:
    """What the experts are, read from the manifest and the saved configs."""
    from transformers import AutoConfig, AutoImageProcessor

    from models.expert import PRESETS
    from models.vit import processor_size

    emotions, num_folds, entries = read_manifest(manifest)
    configs = [AutoConfig.from_pretrained(path) for path in entries.values()]
    config = configs[0]
    image_size = processor_size(AutoImageProcessor.from_pretrained(next(iter(entries.values()))))
    content = json.loads(manifest.read_text())
    if config.model_type == "dinov2":
        shapes = {(c.hidden_size, c.num_hidden_layers) for c in configs}
        preset = (f"DINOv2 {config.hidden_size}-d, {config.num_hidden_layers} layers at {image_size} px"
                  if len(shapes) == 1 else "mixed architectures")  # fmt: skip
    else:
        shapes = {tuple(getattr(c, k) for k in sorted(PRESETS["tiny"])) for c in configs}
        if len(shapes) != 1:
            preset = "mixed architectures"
        else:
            names = [name for name, p in PRESETS.items() if tuple(p[k] for k in sorted(p)) in shapes]
            preset = names[0] if names else f"ViT {config.hidden_size}-d, {config.num_hidden_layers} layers"
    if content.get("training_mode") == "frozen":
        preset += ", one frozen backbone shared by all"
    return {"emotions": len(emotions), "folds": num_folds, "experts": len(entries), "preset": preset,
            "image_size": image_size, "label": f"{len(emotions)} x {num_folds} {preset}"}  # fmt: skip


def expert_forwards(data: Path, manifest: Path) -> tuple[int, int]:
    """(rows, expert forward passes per labelling run): a train row is scored by its fold's expert of
    each emotion, every other row by all the experts."""
    emotions, num_folds, _ = read_manifest(manifest)
    splits = load_splits(data, columns=("image_id",))
    rows = sum(len(s) for s in splits.values())
    forwards = sum(len(s) * len(emotions) * (1 if name == "train" else num_folds) for name, s in splits.items())
    return rows, forwards


def device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def run_project(data: Path, manifest: Path, out: Path, args, precision: str) -> dict:
    from models.features import resolve_precision

    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    counts = label(LabelConfig(str(data), str(manifest), str(out), args.batch_size, args.num_workers,
                               precision=precision))  # fmt: skip
    rows_s = sum(counts.values()) / (time.perf_counter() - start)
    return {"rows_s": rows_s, "precision": DTYPES[resolve_precision(device(), precision)]}


def decoded_splits(data: Path, num_folds: int):
    """``(split name, decoded PIL images, fold of each row or None)`` of every split."""
    from datasets import Image

    for name, split in load_splits(data, columns=("image_id", "image")).items():
        images = split.cast_column("image", Image(decode=True))["image"]
        yield name, images, folds(split["image_id"], num_folds) if name == "train" else None


def run_pipeline(data: Path, manifest: Path, args, precision: str) -> dict:
    import torch
    from transformers import pipeline

    dtype = getattr(torch, DTYPES[precision])
    start = time.perf_counter()
    emotions, num_folds, entries = read_manifest(manifest)
    experts = {key: pipeline("image-classification", model=str(path), device=device(), dtype=dtype)
               for key, path in entries.items()}  # fmt: skip
    rows = 0
    for _, images, fold_of_row in decoded_splits(data, num_folds):
        for fold in range(num_folds):
            batch = [im for i, im in enumerate(images) if fold_of_row is None or fold_of_row[i] == fold]
            for emotion in emotions:
                experts[(emotion, fold)](batch, batch_size=args.batch_size, num_workers=args.num_workers, top_k=2)
        rows += len(images)
    rows_s = rows / (time.perf_counter() - start)
    (model_dtype,) = {str(p.model.dtype).removeprefix("torch.") for p in experts.values()}
    return {"rows_s": rows_s, "precision": model_dtype}


def run_processor_once(data: Path, manifest: Path, args, precision: str) -> dict:
    import torch
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    dtype = getattr(torch, DTYPES[precision])
    start = time.perf_counter()
    emotions, num_folds, entries = read_manifest(manifest)
    processors = [AutoImageProcessor.from_pretrained(path) for path in entries.values()]
    if len({json.dumps(p.to_dict(), sort_keys=True, default=str) for p in processors}) != 1:
        raise ValueError(f"the experts of {manifest} have different image processors: no shared preprocessing")
    processor = processors[0]
    models = {key: AutoModelForImageClassification.from_pretrained(path, dtype=dtype).eval().to(device())
              for key, path in entries.items()}  # fmt: skip
    rows = 0
    with torch.inference_mode():
        for _, images, fold_of_row in decoded_splits(data, num_folds):
            for lo in range(0, len(images), args.batch_size):
                pixels = processor(images=images[lo : lo + args.batch_size], return_tensors="pt")["pixel_values"]
                pixels = pixels.to(device(), dtype)
                for fold in range(num_folds):
                    if fold_of_row is None:
                        chosen = pixels
                    else:
                        index = torch.as_tensor((fold_of_row[lo : lo + args.batch_size] == fold).nonzero()[0])
                        if not len(index):
                            continue
                        chosen = pixels[index.to(pixels.device)]
                    for emotion in emotions:
                        models[(emotion, fold)](pixel_values=chosen).logits.float().softmax(-1).cpu()
            rows += len(images)
    rows_s = rows / (time.perf_counter() - start)
    (model_dtype,) = {str(m.dtype).removeprefix("torch.") for m in models.values()}
    return {"rows_s": rows_s, "precision": model_dtype}


PIPELINES = {
    "project": ("label()", run_project),
    "pipeline": ('pipeline("image-classification"), batched', run_pipeline),
    "processor_once": ("processor once + model forward", run_processor_once),
}


def report(results: dict) -> str:
    """A plain-text summary; every figure and label comes from ``results``."""
    lines = [
        f"{results['experts']['label']} experts, {results['rows']} rows, batch {results['batch_size']}, "
        f"{results['num_workers']} loader workers, {results['torch_threads']} torch threads, {results['device']}",
        f"{results['repeats']} repeats after {results['warmup_rounds']} warm-up round(s); "
        f"label()'s default precision here: {results['default_precision']}",
    ]
    for by_name in results["rows_per_s"].values():
        for name, r in by_name.items():
            lines.append(f"  {PIPELINES[name][0]:<45} {r['precision']:<9} {r['median']:>8.1f} rows/s")
    for precision, ratio in results["ratios"].items():
        verdict = "holds" if ratio["target_holds"] else "does not hold"
        paired = ratio["paired_median"]
        lines.append(f"  {DTYPES[precision]}: label() / pipeline {ratio['vs_pipeline']:.2f}x (paired "
                     f"{paired['pipeline']:.2f}x; target >= {results['target_ratio']:g}x: {verdict}), label() / processor once "
                     f"{ratio['vs_processor_once']:.2f}x (paired {paired['processor_once']:.2f}x)")  # fmt: skip
    load = results["load_average_1min"]
    lines.append(f"  1-min load average {load['start']} at the start, {load['end']} at the end; ratios: of the "
                 "medians; paired: median of each round's ratio")  # fmt: skip
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--num-workers", type=int, default=2, help="loader workers, the same on every side")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds of every pipeline first")
    parser.add_argument("--threads", type=int, default=None, help="torch threads for every side (default: torch's)")
    parser.add_argument("--sample-size", type=int, default=600)
    parser.add_argument("--num-folds", type=int, default=2)
    parser.add_argument("--out", type=Path, default=HERE / "out")
    parser.add_argument("--data", type=Path, default=None, help="a built folder instead of the sample")
    parser.add_argument("--preset", choices=("tiny", "base"), default=None,
                        help="untrained experts of this preset instead of the 1-step tiny ones")  # fmt: skip
    parser.add_argument("--shared-backbone", action="store_true",
                        help="16 experts of train-experts --freeze-backbone on one small random DINOv2 (SMALL_DINOV2; "
                        "no feature cache) instead: label() runs the backbone once per row, the pipelines once per "
                        f"expert (target >= {SHARED_TARGET:g}x)")  # fmt: skip
    parser.add_argument("--precisions", nargs="+", choices=tuple(DTYPES), default=None,
                        help="default: fp32, and bf16 where label() runs in bf16 by default")  # fmt: skip
    parser.add_argument("--skip-pipeline", action="store_true",
                        help="only the project path, reported per expert (the GPU check: pipeline is CPU-bound)")  # fmt: skip
    args = parser.parse_args(argv)
    import torch

    from models.features import resolve_precision

    if args.threads:
        torch.set_num_threads(args.threads)
    data = args.data or sample_folder(args.out, args.sample_size)
    if args.shared_backbone:
        manifest = frozen_experts(data, args.out, args.num_folds)
    elif args.preset:
        manifest = random_experts(data, args.out, args.preset, args.num_folds)
    else:
        manifest = experts_for(data, args.out, args.num_folds)
    target = SHARED_TARGET if args.shared_backbone else TARGET
    experts = describe_experts(manifest)
    rows, forwards = expert_forwards(data, manifest)
    default_precision = resolve_precision(device())
    common = {"experts": experts, "rows": rows, "expert_forwards": forwards, "batch_size": args.batch_size,
              "num_workers": args.num_workers, "torch_threads": torch.get_num_threads(), "repeats": args.repeats,
              "warmup_rounds": args.warmup, "device": device(), "default_precision": DTYPES[default_precision]}  # fmt: skip
    if args.skip_pipeline:
        runs = [run_project(data, manifest, args.out / "label-scores", args, "auto") for _ in range(args.repeats)]
        rows_s = statistics.median(r["rows_s"] for r in runs)
        results = {**common, "precision": runs[0]["precision"], "rows_s": round(rows_s, 1),
                   "expert_images_s": round(rows_s * forwards / rows, 1),
                   "all_rows_s": [round(r["rows_s"], 1) for r in runs]}  # fmt: skip
        print(json.dumps(results, indent=2))
        (args.out / "label-only.json").write_text(json.dumps(results, indent=2))
        return 0

    precisions = args.precisions or sorted({"fp32", default_precision}, key=list(DTYPES).index)
    start_load = round(os.getloadavg()[0], 2)
    timings = {p: {name: [] for name in PIPELINES} for p in precisions}
    for round_ in range(args.warmup + args.repeats):  # alternate so that machine noise hits every pipeline alike
        for p in precisions:
            for name, (_, run) in PIPELINES.items():
                extra = (args.out / "label-scores",) if name == "project" else ()
                result = run(data, manifest, *extra, args, p)
                if round_ >= args.warmup:
                    timings[p][name].append(result)
    rows_per_s, ratios = {}, {}
    for p, by_name in timings.items():
        rows_per_s[p] = {}
        for name, runs in by_name.items():
            (precision,) = {r["precision"] for r in runs}
            rows_per_s[p][name] = {"precision": precision, "median": round(statistics.median(r["rows_s"] for r in runs), 1),
                                   "runs": [round(r["rows_s"], 1) for r in runs]}  # fmt: skip
        project = statistics.median(r["rows_s"] for r in by_name["project"])
        pipe = statistics.median(r["rows_s"] for r in by_name["pipeline"])
        once = statistics.median(r["rows_s"] for r in by_name["processor_once"])
        paired = {other: round(statistics.median(a["rows_s"] / b["rows_s"] for a, b in
                                                 zip(by_name["project"], by_name[other])), 2)
                  for other in ("pipeline", "processor_once")}  # fmt: skip
        ratios[p] = {"vs_pipeline": round(project / pipe, 2), "target_holds": project / pipe >= target,
                     "vs_processor_once": round(project / once, 2), "paired_median": paired}  # fmt: skip
    results = {**common, "target_ratio": target, "rows_per_s": rows_per_s, "ratios": ratios,
               "load_average_1min": {"start": start_load, "end": round(os.getloadavg()[0], 2)}}  # fmt: skip
    print(json.dumps(results, indent=2))
    print(report(results))
    (args.out / "label.json").write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
