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


# -- the fold plan, and experts sharing a frozen backbone -----------------------------------------------------------


def test_label_refuses_a_manifest_of_another_plan(built_sample, experts, tmp_path, capsys):
    from models.labeling import check_manifest_plan

    manifest = json.loads(experts.read_text())
    broken = tmp_path / "experts"
    shutil.copytree(experts.parent, broken)
    cases = [
        ({**manifest, "fold_plan": {**manifest["fold_plan"], "train_ids_sha256": "0" * 64}}, "train_ids_sha256"),
        ({**manifest, "fold_plan": {**manifest["fold_plan"], "num_folds": 3}}, "num_folds: 3 in the manifest, 2"),
        ({**manifest, "fold_plan": {**manifest["fold_plan"], "rule": "md5"}}, "rule"),
        ({k: v for k, v in manifest.items() if k != "fold_plan"}, "records no fold plan"),
    ]
    for content, message in cases:
        (broken / "manifest.json").write_text(json.dumps(content))
        assert _label(built_sample, broken / "manifest.json", tmp_path / "scores") == 2, message
        assert message in capsys.readouterr().err
        assert not list((tmp_path / "scores").glob("*.parquet"))  # refused before anything was scored
    ids = load_splits(built_sample)["train"]["image_id"]
    check_manifest_plan(experts, ids)  # the data the experts were trained on
    check_manifest_plan(manifest, list(reversed(ids)))  # a set of rows: the order does not matter
    with pytest.raises(ValueError, match="train_ids_sha256"):
        check_manifest_plan(manifest, ids[:-1])


@pytest.fixture(scope="module")
def frozen_experts(built_sample, tmp_path_factory):
    """8 emotions x 2 folds of experts on one frozen tiny DINOv2 backbone, and that backbone."""
    from scripts.cli import main as cli
    from tests.models.tiny_backbones import tiny_dinov2

    root = tmp_path_factory.mktemp("frozen")
    backbone = tiny_dinov2(root / "tiny-dinov2")
    argv = ["train-experts", "--data", str(built_sample), "--num-folds", "2", "--init-from", str(backbone),
            "--freeze-backbone", "--output-dir", str(root / "experts"), "--num-workers", "0", "--quiet",
            "--feature-precision", "fp32"]  # fmt: skip
    assert cli(argv) == 0
    return root / "experts" / "manifest.json"


def _pixels(data, ensemble, split="train", rows=range(8)):
    split_rows = load_splits(data)[split]
    dataset = FaceDataset(split_rows, np.arange(len(split_rows)), ensemble.image_size)
    transform = BatchTransform(ensemble.image_size, ensemble.mean, ensemble.std).eval()
    return transform(torch.stack([dataset[i][0] for i in rows])), [split_rows[i]["image_id"] for i in rows]


def _per_expert(ensemble, pixels):
    """{(emotion index, fold): P(emotion)} from each expert's own AutoModelForImageClassification forward."""
    from transformers import AutoModelForImageClassification

    out = {}
    for k, row in enumerate(ensemble.paths):
        for fold, path in enumerate(row):
            model = AutoModelForImageClassification.from_pretrained(path).eval()
            with torch.no_grad():
                out[(k, fold)] = model(pixel_values=pixels).logits.softmax(-1)[:, 1]
    return out


def test_experts_sharing_a_frozen_backbone_score_like_each_expert(built_sample, frozen_experts):
    ensemble = load_ensemble(frozen_experts)
    assert len(ensemble.groups) == 1 and len(ensemble.groups[0].members) == 16  # one backbone, 16 heads
    pixels, ids = _pixels(built_sample, ensemble)
    expected = _per_expert(ensemble, pixels)
    row_folds = torch.tensor([fold_of(i, 2) for i in ids])
    own = score_batch(ensemble, pixels, row_folds)
    mean = score_batch(ensemble, pixels, None)
    for k in range(len(EMOTIONS)):
        chosen = torch.where(row_folds == 0, expected[(k, 0)], expected[(k, 1)])
        torch.testing.assert_close(own[:, k], chosen, rtol=0, atol=1e-5)
        torch.testing.assert_close(mean[:, k], (expected[(k, 0)] + expected[(k, 1)]) / 2, rtol=0, atol=1e-5)


def test_experts_of_different_backbones_each_run_their_own(built_sample, frozen_experts, experts, tmp_path):
    """Half the emotions from one frozen backbone, half from another: two groups, the same scores."""
    from scripts.cli import main as cli
    from tests.models.tiny_backbones import tiny_dinov2

    other = tiny_dinov2(tmp_path / "other", seed=1)
    argv = ["train-experts", "--data", str(built_sample), "--num-folds", "2", "--init-from", str(other),
            "--freeze-backbone", "--output-dir", str(tmp_path / "other-experts"), "--num-workers", "0", "--quiet",
            "--emotions", *EMOTIONS[4:]]  # fmt: skip
    assert cli(argv) == 0
    mixed = json.loads(frozen_experts.read_text())
    for entry in mixed["experts"]:
        source = frozen_experts.parent if EMOTIONS.index(entry["emotion"]) < 4 else tmp_path / "other-experts"
        shutil.copytree(source / entry["path"], tmp_path / "mixed" / entry["path"])
    (tmp_path / "mixed" / "manifest.json").write_text(json.dumps({k: v for k, v in mixed.items() if k != "features"}))
    ensemble = load_ensemble(tmp_path / "mixed" / "manifest.json")
    assert sorted(len(g.members) for g in ensemble.groups) == [8, 8]
    pixels, ids = _pixels(built_sample, ensemble)
    expected = _per_expert(ensemble, pixels)
    row_folds = torch.tensor([fold_of(i, 2) for i in ids])
    scores = score_batch(ensemble, pixels, row_folds)
    for k in range(len(EMOTIONS)):
        torch.testing.assert_close(scores[:, k], torch.where(row_folds == 0, expected[(k, 0)], expected[(k, 1)]),
                                   rtol=0, atol=1e-5)  # fmt: skip
    # fine-tuned experts never share: 16 groups of one
    assert [len(g.members) for g in load_ensemble(experts).groups] == [1] * 16


def test_the_feature_cache_is_read_when_labelling(built_sample, frozen_experts, tmp_path, monkeypatch):
    import models.features

    computed, original = [], models.features.pool
    monkeypatch.setattr(models.features, "pool", lambda h, f: computed.append(len(h)) or original(h, f))
    assert _label(built_sample, frozen_experts, tmp_path / "cached", "--precision", "fp32") == 0
    splits = load_splits(built_sample, columns=("image_id",))
    # train and validation rows were cached by train-experts: only the unlabeled ones ran the backbone
    assert sum(computed) == len(splits["unlabeled"])
    computed.clear()  # features computed in float32 are not served to a bfloat16 run
    assert _label(built_sample, frozen_experts, tmp_path / "bf16", "--precision", "bf16") == 0
    assert sum(computed) == sum(len(s) for s in splits.values())
    uncached = tmp_path / "uncached"
    shutil.copytree(frozen_experts.parent, uncached, ignore=shutil.ignore_patterns("features"))
    computed.clear()
    assert _label(built_sample, uncached / "manifest.json", tmp_path / "plain", "--precision", "fp32") == 0
    assert sum(computed) == sum(len(s) for s in splits.values())
    for split in splits:
        a, b = read_scores(tmp_path / "cached", split), read_scores(tmp_path / "plain", split)
        assert a.keys() == b.keys()
        assert max(np.abs(a[i] - b[i]).max() for i in a) < 1e-5


def test_a_train_rows_score_depends_on_the_other_folds_labels_only(built_sample, frozen_experts, tmp_path):
    """Cross-fitting, observed: relabelling fold-0 rows changes no fold-0 row's score, and moves fold 1's."""
    from scripts.cli import main as cli
    from tests.scripts.test_train_expert import relabelled

    def change(ids, labels):
        labels = labels.copy()
        in_fold_0 = np.array([fold_of(i, 2) == 0 for i in ids]) & (labels < 8)
        flip = np.flatnonzero(in_fold_0)[::3]
        labels[flip] = (labels[flip] + 1) % 8
        return labels

    data = relabelled(built_sample, tmp_path / "relabelled", change)
    train_labels = np.asarray(load_splits(data)["train"]["human_label"])
    assert all((train_labels == k).sum() >= 2 for k in range(8))  # every emotion can still be learnt
    backbone = frozen_experts.parent.parent / "tiny-dinov2"
    argv = ["train-experts", "--data", str(data), "--num-folds", "2", "--init-from", str(backbone), "--freeze-backbone",
            "--output-dir", str(tmp_path / "experts"), "--num-workers", "0", "--quiet",
            "--feature-cache", str(frozen_experts.parent / "features"), "--feature-precision", "fp32"]  # fmt: skip
    assert cli(argv) == 0
    assert _label(built_sample, frozen_experts, tmp_path / "before", "--precision", "fp32") == 0
    assert _label(data, tmp_path / "experts" / "manifest.json", tmp_path / "after", "--precision", "fp32") == 0
    before, after = read_scores(tmp_path / "before", "train"), read_scores(tmp_path / "after", "train")
    fold_0 = [i for i in before if fold_of(i, 2) == 0]
    fold_1 = [i for i in before if fold_of(i, 2) == 1]
    assert max(np.abs(before[i] - after[i]).max() for i in fold_0) < 1e-6
    assert max(np.abs(before[i] - after[i]).max() for i in fold_1) > 1e-3
