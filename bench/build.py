"""Build throughput and memory of `affectnet-plus build` against a naive `datasets` pipeline.

    python bench/build.py                                   # defaults below
    python bench/build.py --sizes 200 --repeats 1           # a quick check

Source: the bundled sample renderer writes SIZES[0] distinct AffectNet-layout JPEGs of 400-1200 px
(OUT/source-N); larger sources reuse them under new names (hard links), so every source has the same
per-image cost. Throughput is measured on the first source in this process, the project and the
baseline alternating at each process count of --num-proc, and reported as medians; peak RSS of the
project is measured in a fresh child process per source size, with the largest process count.

Baseline (what one writes without this project): `Dataset.from_generator` over the CSV rows, then a
`Dataset.map(..., num_proc=N)` that decodes each image at full resolution with PIL, crops, resizes
and re-encodes it, then `Dataset.to_parquet`; N is the project's `num_proc` of the same comparison.
The crop size, margin and JPEG quality are the project's (`AffectNetPlusConfig()`).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from affectnet_plus import AffectNetPlusConfig  # noqa: E402
from builder.export import BuildOptions, build  # noqa: E402
from builder.sources import AFFECTNET_COLUMNS  # noqa: E402

CSV_PATH = "Manually_Annotated_file_lists/training.csv"
IMAGES = "Manually_Annotated_Images"
TARGET = 3.0  # the project's build throughput target, as a multiple of the baseline's at equal processes
MIN_SIDE, MAX_SIDE = 400, 1200  # rendered source image sides, px


def make_source(out_dir: Path, n: int, base: Path | None = None) -> Path:
    """An AffectNet-layout training split of ``n`` images (cached in ``out_dir``)."""
    root = out_dir / f"source-{n}"
    if (root / CSV_PATH).is_file():
        return root
    if base is None:
        from builder.sample import SampleConfig, write_sample

        tmp = out_dir / f"render-{n}"
        shutil.rmtree(tmp, ignore_errors=True)
        config = SampleConfig(n=n, seed=1, min_image_size=MIN_SIDE, max_image_size=MAX_SIDE,
                              validation_fraction=0, unlabeled_fraction=0)  # fmt: skip
        write_sample(tmp, config, progress=True)
        tmp.rename(root)
        return root
    # Reuse the base images under new names: same decode cost per row, no new rendering.
    with open(base / CSV_PATH, newline="") as f:
        rows = [r for r in csv.reader(f)][1:]
    (root / IMAGES).mkdir(parents=True, exist_ok=True)
    (root / CSV_PATH).parent.mkdir(parents=True, exist_ok=True)
    out_rows = []
    for i in range(n):
        row = list(rows[i % len(rows)])
        name = f"{i // 1000}/{i:06d}.jpg"
        target = root / IMAGES / name
        target.parent.mkdir(parents=True, exist_ok=True)
        os.link(base / IMAGES / row[0], target)
        row[0] = name
        out_rows.append(row)
    with open(root / CSV_PATH, "w", newline="") as f:
        csv.writer(f).writerows([AFFECTNET_COLUMNS, *out_rows])
    return root


def count_rows(source: Path) -> int:
    with open(source / CSV_PATH, newline="") as f:
        return sum(1 for _ in csv.reader(f)) - 1


def run_project(source: Path, out: Path, num_proc: int) -> float:
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    report = build(source, out, AffectNetPlusConfig(), BuildOptions(num_proc=num_proc, progress=False))
    elapsed = time.perf_counter() - start
    assert report["rejected"] == {}, report["rejected"]
    return report["written"] / elapsed


def run_baseline(source: Path, out: Path, num_proc: int) -> float:
    """The naive pipeline: full decode in a generator, crop in ``map(num_proc=num_proc)``, to_parquet."""
    import datasets
    from PIL import Image

    datasets.disable_progress_bars()  # the project runs without progress bars too
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    config = AffectNetPlusConfig()
    margin, size, quality = config.crop_margin, config.face_size, config.jpeg_quality

    def rows():
        with open(source / CSV_PATH, newline="") as f:
            for row in csv.DictReader(f):
                yield {
                    "image_id": row["subDirectory_filePath"].rsplit(".", 1)[0],
                    "path": str(source / IMAGES / row["subDirectory_filePath"]),
                    "box": [float(row[k]) for k in ("face_x", "face_y", "face_width", "face_height")],
                    "landmarks": [float(v) for v in row["facial_landmarks"].split(";")],
                    "human_label": int(row["expression"]),
                    "valence": float(row["valence"]),
                    "arousal": float(row["arousal"]),
                }

    def crop(example):
        x, y, w, h = example["box"]
        side = max(w, h) * (1 + 2 * margin)
        left, top = x + w / 2 - side / 2, y + h / 2 - side / 2
        face = (
            Image.open(example["path"])
            .convert("RGB")
            .crop((round(left), round(top), round(left + side), round(top + side)))
        )
        buffer = io.BytesIO()
        face.resize((size, size), Image.Resampling.BILINEAR).save(buffer, format="JPEG", quality=quality)
        scale = size / side
        points = [(v - (left if i % 2 == 0 else top)) * scale for i, v in enumerate(example["landmarks"])]
        return {"image": {"bytes": buffer.getvalue(), "path": None}, "landmarks": points}

    start = time.perf_counter()
    cache = out / "cache"
    dataset = datasets.Dataset.from_generator(rows, cache_dir=str(cache))
    features = datasets.Features({**dataset.features, "image": datasets.Image()})
    del features["box"], features["path"]
    dataset = dataset.map(
        crop,
        remove_columns=["box", "path"],
        features=features,
        cache_file_name=str(cache / "cropped.arrow"),
        num_proc=num_proc if num_proc > 1 else None,  # None: in this process, as num_proc=1 also does
    )
    dataset.to_parquet(str(out / "train.parquet"))
    elapsed = time.perf_counter() - start
    return len(dataset) / elapsed


def peak_rss_child(source: Path, out: Path, num_proc: int) -> dict:
    """Runs one project build in a fresh process; returns its peak RSS (main, and the largest worker)."""
    result = subprocess.run(
        [sys.executable, __file__, "--child", str(source), str(out), str(num_proc)],
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(result.stdout.strip().splitlines()[-1])


def child(source: str, out: str, num_proc: int) -> None:
    shutil.rmtree(out, ignore_errors=True)
    build(source, out, AffectNetPlusConfig(), BuildOptions(num_proc=num_proc, progress=False))
    main_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    worker_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(json.dumps({"main_mb": round(main_mb, 1), "worker_mb": round(worker_mb, 1)}))


def machine() -> str:
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{platform.machine()}, {usable} usable CPU cores, Python {platform.python_version()}"


def report(results: dict) -> str:
    """A plain-text summary; every figure and label comes from ``results``."""
    load = results["load_average_1min"]
    header = ("processes", "project img/s", "baseline img/s", "ratio", "paired", f"target >= {TARGET:g}x")
    lines = [
        f"{results['images']} images, {results['repeats']} repeats, {results['machine']}",
        f"1-min load average {load['start']} at the start, {load['end']} at the end",
        "ratio: of the medians; paired: median of each repeat's ratio",
        "  ".join(header),
    ]
    for n, r in results["by_num_proc"].items():
        verdict = "holds" if r["target_holds"] else "does not hold"
        cells = (n, f"{r['project_img_s']:.1f}", f"{r['baseline_img_s']:.1f}", f"{r['ratio']:.2f}x",
                 f"{r['paired_ratio_median']:.2f}x", verdict)  # fmt: skip
        lines.append("  ".join(f"{c:>{len(h)}}" for c, h in zip(cells, header)))
    lines.append(f"peak RSS of the project build with {results['rss_num_proc']} processes:")
    for n, r in results["peak_rss"].items():
        lines.append(f"  {n} images: main {r['main_mb']:.1f} MB, largest worker {r['worker_mb']:.1f} MB")
    if "rss_growth_main" in results:
        lines.append(f"  main-process growth {results['rss_growth_main']:+.1%}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[2000, 8000],
                        help="source sizes; throughput on the first, peak RSS on each")  # fmt: skip
    parser.add_argument("--num-proc", type=int, nargs="+", default=[1, 2],
                        help="process counts, each given to the project and to the baseline's map")  # fmt: skip
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each pipeline (median reported)")
    parser.add_argument("--out", type=Path, default=HERE / "out", help="work folder (sources are cached here)")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args.child[0], args.child[1], int(args.child[2]))
        return 0

    args.out.mkdir(parents=True, exist_ok=True)
    base = make_source(args.out, args.sizes[0])
    sources = {n: make_source(args.out, n, None if n == args.sizes[0] else base) for n in args.sizes}
    first = sources[args.sizes[0]]
    start_load = round(os.getloadavg()[0], 2)
    timings = {n: {"project": [], "baseline": []} for n in args.num_proc}
    for _ in range(args.repeats):  # alternate so that machine noise hits every pipeline alike
        for n in args.num_proc:
            timings[n]["project"].append(run_project(first, args.out / "project", n))
            timings[n]["baseline"].append(run_baseline(first, args.out / "baseline", n))
    by_num_proc = {}
    for n, t in timings.items():
        project, baseline = statistics.median(t["project"]), statistics.median(t["baseline"])
        by_num_proc[n] = {
            "project_img_s": round(project, 1),
            "baseline_img_s": round(baseline, 1),
            "ratio": round(project / baseline, 2),
            "paired_ratio_median": round(statistics.median(a / b for a, b in zip(t["project"], t["baseline"])), 2),
            "target_holds": project / baseline >= TARGET,
            "project_runs": [round(v, 1) for v in t["project"]],
            "baseline_runs": [round(v, 1) for v in t["baseline"]],
        }
    rss_num_proc = max(args.num_proc)
    results = {
        "images": count_rows(first),
        "repeats": args.repeats,
        "machine": machine(),
        "load_average_1min": {"start": start_load, "end": round(os.getloadavg()[0], 2)},
        "target_ratio": TARGET,
        "by_num_proc": by_num_proc,
        "rss_num_proc": rss_num_proc,
        "peak_rss": {
            count_rows(src): peak_rss_child(src, args.out / f"rss-{n}", rss_num_proc) for n, src in sources.items()
        },  # fmt: skip
    }
    if len(args.sizes) > 1:
        low, high = (results["peak_rss"][count_rows(sources[n])]["main_mb"] for n in (args.sizes[0], args.sizes[-1]))
        results["rss_growth_main"] = round(high / low - 1, 3)
    print(json.dumps(results, indent=2))
    print(report(results))
    (args.out / "build.json").write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
