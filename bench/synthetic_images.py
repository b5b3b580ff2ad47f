"""An image folder of smooth random 224 px JPEGs (`ROOT/<split>/<emotion>/*.jpg`), fast to make anywhere.

    python bench/synthetic_images.py --out /tmp/synth --n 24000 --num-proc 16

For throughput checks of the training data path, where the bundled face renderer (about 40 images/s
per core) would take longer than the check itself. Half of the rows are `happy`, the rest spread over
the other seven emotions, so a `happy` expert gets long balanced epochs. The pictures carry no signal.
"""

from __future__ import annotations

import argparse
import multiprocessing
import sys
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from affectnet_plus import EMOTIONS  # noqa: E402


def _write(job: tuple[str, int, int]) -> None:
    root, index, size = job
    rng = np.random.default_rng(index)
    split = "validation" if index % 20 == 0 else "train"
    emotion = EMOTIONS[1] if index % 2 else EMOTIONS[rng.choice([0, 2, 3, 4, 5, 6, 7])]
    y, x = np.mgrid[0:size, 0:size] / size
    waves = [np.sin(rng.uniform(2, 12) * x + rng.uniform(0, 6)) * np.cos(rng.uniform(2, 12) * y) for _ in range(3)]
    pixels = ((np.stack(waves, -1) + 1) * 127.5).astype(np.uint8)
    path = Path(root) / split / emotion / f"{index:07d}.jpg"
    Image.fromarray(pixels).save(path, quality=90)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--n", type=int, default=24000)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--num-proc", type=int, default=multiprocessing.cpu_count())
    args = parser.parse_args(argv)
    for split in ("train", "validation"):
        for emotion in EMOTIONS:
            (args.out / split / emotion).mkdir(parents=True, exist_ok=True)
    jobs = [(str(args.out), i, args.size) for i in range(args.n)]
    with multiprocessing.Pool(args.num_proc) as pool:
        pool.map(_write, jobs, chunksize=256)
    print(f"{args.n} images in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
