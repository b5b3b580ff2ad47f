"""Build throughput and memory of `affectnet-plus build` against a naive `datasets` pipeline.

    python bench/build.py                      # 2,000 and 8,000 raw-layout images, 400-1200 px
    python bench/build.py --sizes 500 --repeats 1

Source: the bundled sample renderer writes 2,000 distinct AffectNet-layout JPEGs of 400-1200 px
(bench/out/source-2000); the 8,000-image source reuses them under new names (hard links), so both
sources have the same per-image cost. Throughput is measured in this process, project and baseline
alternating, and reported as medians; peak RSS is measured in a fresh child process per size.

Baseline (what one writes without this project): `Dataset.from_generator` over the CSV rows, then a
`Dataset.map` that decodes each image at full resolution with PIL, crops, resizes and re-encodes it,
then `Dataset.to_parquet` -- one process, like the project run it is compared with (`--num-proc 1`);
the project is also timed with `--num-proc 2`.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
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


def make_source(out_dir: Path, n: int, base: Path | None = None) -> Path:
    """An AffectNet-layout training split of ``n`` images (cached in ``out_dir``)."""
    root = out_dir / f"source-{n}"
    if (root / CSV_PATH).is_file():
        return root
    if base is None:
        from builder.sample import SampleConfig, write_sample

        tmp = out_dir / f"render-{n}"
        shutil.rmtree(tmp, ignore_errors=True)
        config = SampleConfig(
            n=n, seed=1, min_image_size=400, max_image_size=1200, validation_fraction=0, unlabeled_fraction=0
        )
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


def run_project(source: Path, out: Path, num_proc: int) -> float:
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    report = build(source, out, AffectNetPlusConfig(), BuildOptions(num_proc=num_proc, progress=False))
    elapsed = time.perf_counter() - start
    assert report["rejected"] == {}, report["rejected"]
    return report["written"] / elapsed


def run_baseline(source: Path, out: Path) -> float:
    """The naive pipeline: full decode in a generator, crop in map, to_parquet."""
    import datasets
    from PIL import Image

    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    margin, size = 0.15, 224

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
        face.resize((size, size), Image.Resampling.BILINEAR).save(buffer, format="JPEG", quality=95)
        scale = size / side
        points = [(v - (left if i % 2 == 0 else top)) * scale for i, v in enumerate(example["landmarks"])]
        return {"image": {"bytes": buffer.getvalue(), "path": None}, "landmarks": points}

    start = time.perf_counter()
    cache = out / "cache"
    dataset = datasets.Dataset.from_generator(rows, cache_dir=str(cache))
    features = datasets.Features({**dataset.features, "image": datasets.Image()})
    del features["box"], features["path"]
    dataset = dataset.map(
        crop, remove_columns=["box", "path"], features=features, cache_file_name=str(cache / "cropped.arrow")
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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[2000, 8000], help="source sizes (first = base)")
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
    project1, project2, baseline = [], [], []
    for _ in range(args.repeats):  # alternate so that machine noise hits all three alike
        project1.append(run_project(first, args.out / "project", 1))
        project2.append(run_project(first, args.out / "project", 2))
        baseline.append(run_baseline(first, args.out / "baseline"))
    results = {
        "images": args.sizes[0],
        "repeats": args.repeats,
        "project_1proc_img_s": round(statistics.median(project1), 1),
        "project_2proc_img_s": round(statistics.median(project2), 1),
        "baseline_img_s": round(statistics.median(baseline), 1),
    }
    results["ratio_1proc"] = round(results["project_1proc_img_s"] / results["baseline_img_s"], 2)
    results["ratio_2proc"] = round(results["project_2proc_img_s"] / results["baseline_img_s"], 2)
    results["peak_rss"] = {n: peak_rss_child(src, args.out / f"rss-{n}", 2) for n, src in sources.items()}
    if len(args.sizes) > 1:
        low, high = (results["peak_rss"][n]["main_mb"] for n in (args.sizes[0], args.sizes[-1]))
        results["rss_growth_main"] = round(high / low - 1, 3)
    print(json.dumps(results, indent=2))
    (args.out / "build.json").write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
