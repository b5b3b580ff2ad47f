import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForImageClassification, pipeline

from scripts.cli import main as cli
from scripts.train_expert import main
from tests.conftest import face_image, launch_two_processes
from tests.hub_server import USER

ROOT = Path(__file__).parents[2]
FAST = ["--per-device-batch-size", "4", "--eval-batch-size", "16", "--num-workers", "0", "--warmup-ratio", "0"]


def _args(data, out, *extra, emotion="happy"):
    return ["--data", str(data), "--emotion", emotion, "--fold", "0", "--num-folds", "2", "--output-dir", str(out),
            *FAST, *extra]  # fmt: skip


def test_two_step_run_writes_a_loadable_checkpoint(built_sample, tmp_path):
    out = tmp_path / "happy-f0"
    assert main(_args(built_sample, out, "--max-steps", "2")) == 0
    for name in ("model.safetensors", "config.json", "preprocessor_config.json", "training_config.json",
                 "all_results.json", "README.md"):  # fmt: skip
        assert (out / name).is_file(), name
    assert not list(out.glob("*.bin"))
    results = json.loads((out / "all_results.json").read_text())
    assert results["step"] == 2 and results["num_processes"] == 1
    assert 0 <= results["validation_auroc"] <= 1 and 0 <= results["heldout_ece"] <= 1
    config = json.loads((out / "training_config.json").read_text())
    assert config["emotion"] == "happy" and config["train"]["max_steps"] == 2

    model = AutoModelForImageClassification.from_pretrained(out)
    assert model.config.id2label == {0: "not_happy", 1: "happy"}
    classify = pipeline("image-classification", model=str(out))
    predictions = classify(face_image(100, 120))
    assert {p["label"] for p in predictions} == {"happy", "not_happy"}
    assert sum(p["score"] for p in predictions) == pytest.approx(1.0, abs=1e-5)

    card = (out / "README.md").read_text()
    assert "model-index" in card and "auroc" in card and "license: apache-2.0" in card
    assert "happy" in card and "fold 0 of 2" in card


def test_resume_ends_with_the_weights_of_an_uninterrupted_run(built_sample, tmp_path):
    straight = tmp_path / "straight"
    assert main(_args(built_sample, straight, "--max-steps", "7", "--checkpointing-steps", "3")) == 0
    assert sorted(p.name for p in (straight / "checkpoints").iterdir()) == ["step_3", "step_6"]
    resumed = tmp_path / "resumed"
    checkpoint = straight / "checkpoints" / "step_3"
    assert main(_args(built_sample, resumed, "--max-steps", "7", "--resume-from-checkpoint", str(checkpoint))) == 0
    a, b = load_file(straight / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)
    # and the check can fail: a run with another seed ends elsewhere
    other = tmp_path / "other"
    assert main(_args(built_sample, other, "--max-steps", "7", "--seed", "7")) == 0
    assert not torch.equal(load_file(other / "model.safetensors")["classifier.weight"], a["classifier.weight"])


@pytest.mark.slow
def test_accelerate_launch_with_two_cpu_processes(built_sample, tmp_path):
    out = tmp_path / "ddp"
    result = launch_two_processes("scripts/train_expert.py", *_args(built_sample, out, "--max-steps", "3"))
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((out / "all_results.json").read_text())
    assert results["num_processes"] == 2
    assert len(results["replica_checksums"]) == 2
    assert results["replica_checksums"][0] == results["replica_checksums"][1]
    assert AutoModelForImageClassification.from_pretrained(out).config.id2label[1] == "happy"


def _two_emotion_folder(tmp_path, emotions=("happy", "sad")):
    root = tmp_path / "fer"
    for split in ("train", "validation"):
        for e, emotion in enumerate(emotions):
            (root / split / emotion).mkdir(parents=True)
            for i in range(6):
                face_image(64, 64, seed=10 * e + i).save(root / split / emotion / f"{i}.jpg")
    out = tmp_path / "fer_plus"
    assert cli(["build", str(root), "--format", "imagefolder", "--out", str(out), "--quiet", "--no-metadata"]) == 0
    return out


def test_bad_input_fails_before_any_training_step(built_sample, tmp_path, capsys):
    out = tmp_path / "never"
    two = _two_emotion_folder(tmp_path)
    pickle_only = tmp_path / "pickled"
    pickle_only.mkdir()
    (pickle_only / "config.json").write_text(json.dumps({"model_type": "vit"}))
    (pickle_only / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    cases = [
        (_args(built_sample, out, "--fold", "2"), "fold must be in 0..1"),
        (_args(built_sample, out, "--image-size", "60"), "not a multiple of the patch size 8"),
        (_args(built_sample, out, "--init-from", str(pickle_only)), "only pickle weights"),
        (_args(two, out, emotion="fear"), "no training rows with human_label 4 (fear)"),
        (_args(tmp_path, out), "not a built AffectNet+ folder"),
    ]
    for argv, message in cases:
        assert main(argv) == 2
        assert message in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(_args(built_sample, out, emotion="boredom"))
    assert not out.exists()


def test_no_negatives_is_an_error(tmp_path, capsys):
    only_happy = _two_emotion_folder(tmp_path, emotions=("happy",))
    assert main(_args(only_happy, tmp_path / "x")) == 2
    assert "no negatives" in capsys.readouterr().err


def test_train_experts_writes_a_manifest_and_resumes(built_sample, tmp_path, capsys):
    out = tmp_path / "experts"
    argv = ["train-experts", "--data", str(built_sample), "--num-folds", "2", "--output-dir", str(out),
            "--emotions", "happy", "surprise", "--max-steps", "1", *FAST]  # fmt: skip
    assert cli(argv) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert [(e["emotion"], e["fold"]) for e in manifest["experts"]] == [
        ("happy", 0), ("happy", 1), ("surprise", 0), ("surprise", 1)
    ]  # fmt: skip
    assert all((out / e["path"] / "model.safetensors").is_file() for e in manifest["experts"])
    assert all("heldout_auroc" in e["metrics"] for e in manifest["experts"])
    stamp = (out / "happy-f0" / "model.safetensors").stat().st_mtime_ns
    assert cli(argv) == 0  # finished experts are kept, not retrained
    assert (out / "happy-f0" / "model.safetensors").stat().st_mtime_ns == stamp


def test_tensorboard_tracker_writes_events(built_sample, tmp_path):
    pytest.importorskip("tensorboard")
    out = tmp_path / "tb"
    assert main(_args(built_sample, out, "--max-steps", "2", "--report-to", "tensorboard")) == 0
    assert list((out / "logs").rglob("events.out.tfevents.*"))


def test_pixel_pipeline_matches_the_saved_processor(built_sample, tmp_path):
    """The checkpoint's preprocessor gives the model the same input the training pipeline did."""
    from transformers import AutoImageProcessor

    from models.transforms import BatchTransform, decode_image

    out = tmp_path / "p"
    assert main(_args(built_sample, out, "--max-steps", "1")) == 0
    image = face_image(64, 64)
    processor = AutoImageProcessor.from_pretrained(out)
    expected = processor(image, return_tensors="pt")["pixel_values"]
    ours = BatchTransform(64).eval()(decode_image(image, 64)[None])
    assert np.abs((expected - ours).numpy()).max() < 0.02


def test_gradient_accumulation_counts_optimizer_steps(built_sample, tmp_path):
    out = tmp_path / "accumulate"
    assert main(_args(built_sample, out, "--max-steps", "2", "--gradient-accumulation-steps", "2")) == 0
    results = json.loads((out / "all_results.json").read_text())
    assert results["step"] == 2
    assert results["train_samples"] == 2 * 2 * 4  # steps x micro-batches x batch size


def test_push_to_hub_round_trip_through_a_hub_server(built_sample, tmp_path, fake_hub):
    out = tmp_path / "pushed"
    repo = f"{USER}/expert-happy-f0"
    assert main(_args(built_sample, out, "--max-steps", "1", "--checkpointing-steps", "1", "--push-to-hub", repo)) == 0
    assert fake_hub.repos[("model", repo)]["private"] is True
    pushed = AutoModelForImageClassification.from_pretrained(repo)
    local = AutoModelForImageClassification.from_pretrained(out)
    for (name, a), (_, b) in zip(pushed.state_dict().items(), local.state_dict().items()):
        assert torch.equal(a, b), name
    assert pipeline("image-classification", model=repo)(face_image(64, 64))[0]["label"] in ("happy", "not_happy")
