import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import ViTForImageClassification

from affectnet_plus import EMOTIONS
from models.data import FaceDataset, fold_of, load_splits
from models.labeling import load_ensemble, read_scores, score_batch
from models.transforms import BatchTransform
from scripts.label import main
from tests.conftest import free_port

ROOT = Path(__file__).parents[2]


def _label(data, experts, out, *extra):
    return main(["--data", str(data), "--experts", str(experts), "--out", str(out), "--batch-size", "16",
                 "--num-workers", "0", "--shard-rows", "32", *extra])  # fmt: skip


def test_scores_are_cross_fitted(built_sample, experts, tmp_path):
    out = tmp_path / "scores"
    assert _label(built_sample, experts, out, "--precision", "fp32") == 0  # exact against float32 references
    splits = load_splits(built_sample)
    train = read_scores(out, "train")
    assert set(train) == set(splits["train"]["image_id"])
    assert sorted(p.name for p in out.glob("train-*.parquet")) == [f"train-{i:05d}.parquet" for i in range(3)]

    ensemble = load_ensemble(experts)
    transform = BatchTransform(ensemble.image_size, ensemble.mean, ensemble.std).eval()
    rows = [0, 1, 2, 3]
    dataset = FaceDataset(splits["train"], np.arange(len(splits["train"])), ensemble.image_size)
    pixels = transform(torch.stack([dataset[i][0] for i in rows]))
    for i, row in enumerate(rows):
        image_id = splits["train"][row]["image_id"]
        fold = fold_of(image_id, 2)
        for k, emotion in enumerate(EMOTIONS):  # the expert that never saw this row's fold, no other
            own = ViTForImageClassification.from_pretrained(experts.parent / f"{emotion}-f{fold}")
            expected = own.eval()(pixel_values=pixels[i : i + 1]).logits.softmax(-1)[0, 1].item()
            assert train[image_id][k] == pytest.approx(expected, abs=1e-5)
    validation = read_scores(out, "validation")
    first = splits["validation"][0]["image_id"]
    vpixels = transform(FaceDataset(splits["validation"], np.zeros(len(splits["validation"])), 64)[0][0][None])
    expected = score_batch(ensemble, vpixels, None)[0].numpy()  # mean over the folds
    np.testing.assert_allclose(validation[first], expected, atol=1e-5)
    assert all(np.isfinite(v).all() and ((v >= 0) & (v <= 1)).all() for v in train.values())


def test_rerun_scores_only_missing_shards(built_sample, experts, tmp_path):
    out = tmp_path / "scores"
    assert _label(built_sample, experts, out) == 0
    kept = out / "train-00000.parquet"
    stamp = kept.stat().st_mtime_ns
    before = read_scores(out, "train")
    (out / "train-00001.parquet").unlink()
    assert _label(built_sample, experts, out) == 0
    assert kept.stat().st_mtime_ns == stamp
    after = read_scores(out, "train")
    assert after.keys() == before.keys()
    assert all(np.allclose(after[k], before[k]) for k in before)


@pytest.mark.slow
def test_two_processes_give_the_same_scores(built_sample, experts, tmp_path):
    single = tmp_path / "single"
    assert _label(built_sample, experts, single) == 0
    double = tmp_path / "double"
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(free_port()), str(ROOT / "scripts/label.py"), "--data", str(built_sample),
               "--experts", str(experts), "--out", str(double), "--batch-size", "16", "--num-workers", "0",
               "--shard-rows", "32"]  # fmt: skip
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    for split in ("train", "validation", "unlabeled"):
        a, b = read_scores(single, split), read_scores(double, split)
        assert a.keys() == b.keys()
        assert all(np.allclose(a[k], b[k], atol=1e-5) for k in a)


def test_bad_manifests_are_clear_errors(built_sample, experts, tmp_path, capsys):
    manifest = json.loads(experts.read_text())
    broken = tmp_path / "experts"
    shutil.copytree(experts.parent, broken)
    incomplete = dict(manifest, experts=[e for e in manifest["experts"] if (e["emotion"], e["fold"]) != ("fear", 1)])
    (broken / "manifest.json").write_text(json.dumps(incomplete))
    assert _label(built_sample, broken / "manifest.json", tmp_path / "o1") == 2
    assert "lacks experts for: fear fold 1" in capsys.readouterr().err

    swapped = json.loads(json.dumps(manifest))
    for entry in swapped["experts"]:  # the happy entries point at the sad experts
        if entry["emotion"] == "happy":
            entry["path"] = entry["path"].replace("happy", "sad")
    (broken / "manifest.json").write_text(json.dumps(swapped))
    assert _label(built_sample, broken / "manifest.json", tmp_path / "o2") == 2
    assert "expected {0: 'not_happy', 1: 'happy'}" in capsys.readouterr().err
    assert _label(built_sample, tmp_path / "nothing.json", tmp_path / "o3") == 2


def test_an_expert_returning_nan_is_an_error_naming_it(built_sample, experts, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    broken = tmp_path / "experts"
    shutil.copytree(experts.parent, broken)
    weights = load_file(broken / "anger-f1" / "model.safetensors")
    weights["classifier.bias"] = torch.full_like(weights["classifier.bias"], float("nan"))
    save_file(weights, broken / "anger-f1" / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "scores"
    assert _label(built_sample, broken / "manifest.json", out) == 2
    err = capsys.readouterr().err
    assert "anger-f1" in err and "NaN" in err
    for shard in out.glob("*.parquet"):  # whatever was written before the error holds no NaN
        assert all(np.isfinite(v).all() for v in read_scores(out, shard.name.split("-")[0]).values())


def test_bfloat16_scores_stay_close_to_float32(built_sample, experts, tmp_path):
    assert _label(built_sample, experts, tmp_path / "fp32", "--precision", "fp32") == 0
    assert _label(built_sample, experts, tmp_path / "bf16", "--precision", "bf16") == 0
    exact, fast = read_scores(tmp_path / "fp32", "validation"), read_scores(tmp_path / "bf16", "validation")
    assert exact.keys() == fast.keys()
    difference = max(np.abs(exact[i] - fast[i]).max() for i in exact)
    assert 0 < difference < 5e-3  # bfloat16 really ran, and moved the probabilities by about 1e-3 at most
