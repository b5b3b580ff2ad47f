import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForImageClassification, pipeline

from scripts.cli import main as cli
from scripts.train import main as train
from tests.conftest import face_image, launch_two_processes
from tests.hub_server import USER

ROOT = Path(__file__).parents[2]
FAST = ["--per-device-batch-size", "4", "--eval-batch-size", "16", "--num-workers", "0", "--warmup-ratio", "0"]


def main(argv):
    return train(["expert", *argv])


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


def _weights(folder):
    return load_file(folder / "model.safetensors")


def _assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)


def test_resume_ends_with_the_weights_of_an_uninterrupted_run(built_sample, tmp_path, capsys):
    straight = tmp_path / "straight"
    assert main(_args(built_sample, straight, "--max-steps", "7", "--checkpointing-steps", "3")) == 0
    assert sorted(p.name for p in (straight / "checkpoints").iterdir()) == ["step_3", "step_6"]  # no partial left
    assert json.loads((straight / "checkpoints" / "step_3" / "checkpoint.json").read_text())["step"] == 3
    # The run is interrupted after step 5: its checkpoints folder holds step_3, a step_5 half-written by an
    # older writer (no marker, garbage state) and the temporary folder of a save in progress.
    resumed = tmp_path / "resumed"
    shutil.copytree(straight / "checkpoints" / "step_3", resumed / "checkpoints" / "step_3")
    for partial in ("step_5", ".step_6.partial"):
        shutil.copytree(straight / "checkpoints" / "step_6", resumed / "checkpoints" / partial)
        (resumed / "checkpoints" / partial / "checkpoint.json").unlink()
        (resumed / "checkpoints" / partial / "optimizer.bin").write_bytes(b"half")
    assert main(_args(built_sample, resumed, "--max-steps", "7", "--resume-from-checkpoint", "latest")) == 0
    out = capsys.readouterr().out
    assert f"resumed from {(resumed / 'checkpoints' / 'step_3').resolve()} at step 3" in out
    _assert_same_weights(_weights(straight), _weights(resumed))
    # and the check can fail: a run with another seed ends elsewhere
    other = tmp_path / "other"
    assert main(_args(built_sample, other, "--max-steps", "7", "--seed", "7")) == 0
    assert not torch.equal(_weights(other)["classifier.weight"], _weights(straight)["classifier.weight"])


def test_resume_reads_training_state_only_from_the_runs_own_checkpoints(built_sample, tmp_path, capsys):
    first = tmp_path / "first"
    assert main(_args(built_sample, first, "--max-steps", "2", "--checkpointing-steps", "1")) == 0
    foreign = first / "checkpoints" / "step_1"
    assert (
        main(_args(built_sample, tmp_path / "second", "--max-steps", "2", "--resume-from-checkpoint", str(foreign)))
        == 2
    )
    assert "not in this run's checkpoints folder" in capsys.readouterr().err
    # a symbolic link inside the run's folder that points elsewhere is refused the same way
    link = tmp_path / "third" / "checkpoints" / "step_1"
    link.parent.mkdir(parents=True)
    link.symlink_to(foreign, target_is_directory=True)
    assert main(_args(built_sample, tmp_path / "third", "--max-steps", "2", "--resume-from-checkpoint", "latest")) == 2
    assert "not in this run's checkpoints folder" in capsys.readouterr().err
    assert main(_args(built_sample, tmp_path / "fourth", "--max-steps", "2", "--resume-from-checkpoint", "latest")) == 2
    assert "no finished checkpoint" in capsys.readouterr().err


def test_checkpoints_are_rotated(built_sample, tmp_path):
    out = tmp_path / "rotated"
    assert (
        main(_args(built_sample, out, "--max-steps", "4", "--checkpointing-steps", "1", "--save-total-limit", "2")) == 0
    )
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_3", "step_4"]


@pytest.mark.slow
def test_rerun_from_the_saved_config_gives_the_same_weights(built_sample, tmp_path):
    first = tmp_path / "first"
    options = ["--max-steps", "3", "--seed", "5", "--learning-rate", "3e-3", "--hflip", "0.2", "--scale", "0.8", "1.0"]
    assert main(_args(built_sample, first, *options)) == 0
    saved = json.loads((first / "training_config.json").read_text())
    assert saved["train"]["seed"] == 5 and saved["augment"]["scale"] == [0.8, 1.0]
    again = tmp_path / "again"
    assert main(["--config", str(first / "training_config.json"), "--output-dir", str(again)]) == 0
    _assert_same_weights(_weights(first), _weights(again))
    assert json.loads((again / "training_config.json").read_text()) == {
        **saved, "train": {**saved["train"], "output_dir": str(again)}
    }  # fmt: skip
    # negative control: without the saved options (defaults: another seed, rate, augmentation) it differs
    plain = tmp_path / "plain"
    assert main(_args(built_sample, plain, "--max-steps", "3")) == 0
    assert not torch.equal(_weights(plain)["classifier.weight"], _weights(first)["classifier.weight"])


def test_all_results_is_written_last(built_sample, tmp_path, monkeypatch):
    out = tmp_path / "done"
    assert main(_args(built_sample, out, "--max-steps", "1")) == 0
    assert (out / "all_results.json").is_file()

    def broken_card(config, results):
        raise RuntimeError("disk full")

    monkeypatch.setattr("models.cards.expert_card", broken_card)
    with pytest.raises(RuntimeError, match="disk full"):
        main(_args(built_sample, out, "--max-steps", "1", "--seed", "3"))
    # The model was rewritten, then the save failed: no marker, so train-experts retrains this expert.
    assert (out / "model.safetensors").is_file() and not (out / "all_results.json").exists()
    assert not list(out.glob(".tmp-*"))


@pytest.mark.slow
def test_accelerate_launch_with_two_cpu_processes(built_sample, tmp_path):
    out = tmp_path / "ddp"
    args = _args(built_sample, out, "--max-steps", "3", "--checkpointing-steps", "2")
    result = launch_two_processes("scripts/train.py", "expert", *args)
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((out / "all_results.json").read_text())
    assert results["num_processes"] == 2
    assert len(results["replica_checksums"]) == 2
    assert results["replica_checksums"][0] == results["replica_checksums"][1]
    assert AutoModelForImageClassification.from_pretrained(out).config.id2label[1] == "happy"
    checkpoint = out / "checkpoints" / "step_2"
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_2"]
    for rank in (0, 1):  # every process's states went into the folder before it was renamed
        assert (checkpoint / f"random_states_{rank}.pkl").is_file()
        assert (checkpoint / f"augment_rng_{rank}.safetensors").is_file()
    # both processes resume from it and end with the weights of the uninterrupted run
    straight = _weights(out)
    result = launch_two_processes("scripts/train.py", "expert", *args, "--resume-from-checkpoint", "latest")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "at step 2" in result.stdout
    _assert_same_weights(straight, _weights(out))


def _two_emotion_folder(tmp_path, emotions=("happy", "sad")):
    root = tmp_path / "fer"
    for s, split in enumerate(("train", "validation")):
        for e, emotion in enumerate(emotions):
            (root / split / emotion).mkdir(parents=True)
            for i in range(6):  # every image distinct: a build rejects duplicates
                face_image(64, 64, seed=100 * s + 10 * e + i).save(root / split / emotion / f"{i}.jpg")
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


# -- experts on a frozen backbone ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def backbone(tmp_path_factory):
    """A tiny random DINOv2 backbone folder (a bare Dinov2Model, as fetch-models converts one)."""
    from tests.models.tiny_backbones import tiny_dinov2

    return tiny_dinov2(tmp_path_factory.mktemp("backbone") / "tiny-dinov2")


def _frozen(data, out, init_from, *extra, num_folds=2, emotions=("happy", "sad")):
    return ["train-experts", "--data", str(data), "--num-folds", str(num_folds), "--init-from", str(init_from),
            "--freeze-backbone", "--output-dir", str(out), "--num-workers", "0", "--quiet",
            *(["--emotions", *emotions] if emotions else []), *extra]  # fmt: skip


def relabelled(data, out, change):
    """A copy of the built folder ``data`` whose train labels are ``change(image_ids, labels)``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    shutil.copytree(data, out)
    for path in sorted((out / "data" / "train").glob("*.parquet")):
        table = pq.read_table(path)
        index = table.schema.get_field_index("human_label")
        field = table.schema.field(index)
        labels = change(table["image_id"].to_pylist(), np.asarray(table["human_label"]))
        pq.write_table(table.set_column(index, field, pa.array(np.asarray(labels), type=field.type)), path)
    return out


class Recorder:
    """Wraps ``models.frozen.fit_heads`` to keep what each call fitted on and returned."""

    def __init__(self, monkeypatch):
        import models.frozen

        self.calls = []
        original = models.frozen.fit_heads

        def fit_heads(features, labels, image_ids, rows, emotions, **kwargs):
            heads = original(features, labels, image_ids, rows, emotions, **kwargs)
            self.calls.append({"features": features, "ids": list(image_ids), "rows": np.asarray(rows), "heads": heads})
            return heads

        monkeypatch.setattr(models.frozen, "fit_heads", fit_heads)


def count_backbone_rows(monkeypatch) -> list:
    """Counts the images the feature pass runs the backbone on."""
    import models.features

    seen, original = [], models.features.features_of
    monkeypatch.setattr(models.features, "features_of", lambda m, x: seen.append(len(x)) or original(m, x))
    return seen


def test_frozen_experts_are_complete_checkpoints_that_never_saw_their_fold(built_sample, backbone, tmp_path,
                                                                           monkeypatch):  # fmt: skip
    from transformers import AutoImageProcessor

    from core.schema import fold_plan, folds, ids_digest
    from models.data import FaceDataset, load_splits
    from models.features import backbone_digest
    from models.transforms import BatchTransform

    recorder = Recorder(monkeypatch)
    out = tmp_path / "experts"
    # float32 features: the checkpoint, run in float32, must then give the fitted head's probabilities
    assert cli(_frozen(built_sample, out, backbone, "--feature-precision", "fp32")) == 0
    train = load_splits(built_sample)["train"]
    ids, labels = list(train["image_id"]), np.asarray(train["human_label"])
    row_folds = folds(ids, 2)
    # one fit per fold, on the train rows of the other fold only
    assert len(recorder.calls) == 2
    for fold, call in enumerate(recorder.calls):
        assert len(call["rows"]) and (row_folds[call["rows"]] != fold).all()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["training_mode"] == "frozen" and manifest["features"] == "features"
    assert manifest["fold_plan"] == {**fold_plan(ids, 2, labels), "data": built_sample.name}
    assert manifest["backbone"]["digest"] == backbone_digest(str(backbone))
    for emotion, k in (("happy", 1), ("sad", 2)):
        for fold in (0, 1):
            folder = out / f"{emotion}-f{fold}"
            for name in ("model.safetensors", "config.json", "preprocessor_config.json", "training_config.json",
                         "all_results.json", "README.md"):  # fmt: skip
                assert (folder / name).is_file(), name
            results = json.loads((folder / "all_results.json").read_text())
            assert results["training_mode"] == "frozen" and results["fold_plan"] == manifest["fold_plan"]
            assert results["backbone"] == manifest["backbone"]
            for key in ("heldout_auroc", "heldout_balanced_accuracy", "heldout_ece", "validation_auroc",
                        "validation_balanced_accuracy", "validation_ece"):  # fmt: skip
                assert 0 <= results[key] <= 1, key
            seen = np.flatnonzero((row_folds != fold) & (labels < 8))
            assert results["train_rows"]["ids_sha256"] == ids_digest([ids[i] for i in seen])
            assert json.loads((folder / "training_config.json").read_text())["freeze_backbone"] is True
            card = (folder / "README.md").read_text()
            assert "frozen" in card and results["backbone"]["digest"] in card and "license: apache-2.0" in card
            assert manifest["fold_plan"]["train_ids_sha256"] in card and "Cross-fitting" in card

            # the checkpoint reproduces the probabilities of the head the fit computed, on the same pixels
            model = AutoModelForImageClassification.from_pretrained(folder).eval()
            processor = AutoImageProcessor.from_pretrained(folder)
            size = processor.size["height"]
            rows = list(range(6))
            dataset = FaceDataset(train, np.arange(len(train)), size)
            pixels = BatchTransform(size, processor.image_mean, processor.image_std).eval()(
                torch.stack([dataset[i][0] for i in rows]))  # fmt: skip
            with torch.no_grad():
                saved = model(pixel_values=pixels).logits.softmax(-1)[:, 1].numpy()
            call = recorder.calls[fold]
            fitted = call["heads"][k].probabilities(call["features"][rows].numpy())
            np.testing.assert_allclose(saved, fitted, atol=1e-5)
            predictions = pipeline("image-classification", model=str(folder))(face_image(80, 90))
            assert {p["label"] for p in predictions} == {emotion, f"not_{emotion}"}


def test_stale_experts_are_refused_and_overwrite_retrains_them(built_sample, backbone, tmp_path, capsys,
                                                               monkeypatch):  # fmt: skip
    from models.features import resolve_precision
    from tests.models.tiny_backbones import tiny_dinov2

    out = tmp_path / "experts"
    emotions = ("happy",)
    assert cli(_frozen(built_sample, out, backbone, emotions=emotions)) == 0
    stamp = (out / "happy-f0" / "model.safetensors").stat().st_mtime_ns
    # the default precision is this machine's auto choice, and it is recorded
    results = json.loads((out / "happy-f0" / "all_results.json").read_text())
    assert results["features"]["precision"] == resolve_precision("cpu", "auto")
    assert cli(_frozen(built_sample, out, backbone, emotions=emotions)) == 0  # the same contract: kept
    assert (out / "happy-f0" / "model.safetensors").stat().st_mtime_ns == stamp
    capsys.readouterr()

    other = tiny_dinov2(tmp_path / "other-backbone", seed=1)
    changed_label = relabelled(built_sample, tmp_path / "relabelled",
                               lambda ids, labels: np.where(np.arange(len(labels)) == 0, (labels + 1) % 8, labels))
    cases = [
        (_frozen(built_sample, out, backbone, num_folds=3, emotions=emotions), "fold_plan.num_folds: 2 there, 3 now"),
        (_frozen(built_sample, out, other, emotions=emotions), "backbone"),
        (_frozen(changed_label, out, backbone, emotions=emotions), "fold_plan.train_labels_sha256"),
        (["train-experts", "--data", str(built_sample), "--num-folds", "2", "--output-dir", str(out), "--emotions",
          "happy", "--max-steps", "1", "--quiet", *FAST], "training_mode: 'frozen' there, 'fine-tuned' now"),
    ]  # fmt: skip
    for argv, message in cases:
        assert cli(argv) == 2, message
        err = capsys.readouterr().err
        assert message in err and "--overwrite" in err
    assert (out / "happy-f0" / "model.safetensors").stat().st_mtime_ns == stamp  # nothing was touched

    computed = count_backbone_rows(monkeypatch)
    assert cli(_frozen(changed_label, out, backbone, "--overwrite", emotions=emotions)) == 0
    results = json.loads((out / "happy-f0" / "all_results.json").read_text())
    assert results["fold_plan"]["data"] == "relabelled"
    manifest = json.loads((out / "manifest.json").read_text())
    assert results["fold_plan"]["train_labels_sha256"] == manifest["fold_plan"]["train_labels_sha256"]
    assert (out / "happy-f0" / "model.safetensors").stat().st_mtime_ns != stamp
    assert sum(computed) == 0  # the same images and backbone: every feature came from the cache
    assert cli(_frozen(changed_label, out, backbone, emotions=emotions)) == 0  # and now it is current


def test_freeze_backbone_needs_a_pretrained_backbone(built_sample, tmp_path, capsys):
    argv = ["train-experts", "--data", str(built_sample), "--output-dir", str(tmp_path / "x"), "--freeze-backbone",
            "--quiet"]  # fmt: skip
    assert cli(argv) == 2
    assert "--freeze-backbone needs a pretrained backbone (--init-from)" in capsys.readouterr().err


def test_one_frozen_expert_from_train_py(built_sample, backbone, tmp_path):
    out = tmp_path / "experts" / "sad-f1"
    argv = ["--data", str(built_sample), "--emotion", "sad", "--fold", "1", "--num-folds", "2", "--init-from",
            str(backbone), "--freeze-backbone", "--output-dir", str(out), "--num-workers", "0"]  # fmt: skip
    assert main(argv) == 0
    results = json.loads((out / "all_results.json").read_text())
    assert results["training_mode"] == "frozen" and results["fold"] == 1
    assert list((tmp_path / "experts" / "features").rglob("*.safetensors"))  # the cache sits beside the expert


def test_a_fine_tuned_expert_records_its_contract(built_sample, backbone, tmp_path):
    from models.features import backbone_digest

    out = tmp_path / "dino-ft"
    assert main(_args(built_sample, out, "--max-steps", "1", "--init-from", str(backbone))) == 0
    results = json.loads((out / "all_results.json").read_text())
    assert results["training_mode"] == "fine-tuned" and results["fold_plan"]["num_folds"] == 2
    assert results["backbone"]["digest"] == backbone_digest(str(backbone)) and results["image_size"] == 28
    assert type(AutoModelForImageClassification.from_pretrained(out)).__name__ == "Dinov2ForImageClassification"
    assert pipeline("image-classification", model=str(out))(face_image(40, 40))[0]["label"] in ("happy", "not_happy")
    tiny = tmp_path / "tiny"
    assert main(_args(built_sample, tiny, "--max-steps", "1")) == 0
    assert json.loads((tiny / "all_results.json").read_text())["backbone"]["digest"] == "preset:tiny"


@pytest.mark.slow
def test_two_processes_share_the_feature_pass(built_sample, backbone, tmp_path):
    from models.data import load_splits
    from models.features import FeatureCache, backbone_digest

    out = tmp_path / "experts" / "happy-f0"
    argv = ["--data", str(built_sample), "--emotion", "happy", "--fold", "0", "--num-folds", "2", "--init-from",
            str(backbone), "--freeze-backbone", "--output-dir", str(out), "--num-workers", "0"]  # fmt: skip
    result = launch_two_processes("scripts/train.py", "expert", *argv)
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((out / "all_results.json").read_text())
    assert results["num_processes"] == 2 and results["training_mode"] == "frozen"
    splits = load_splits(built_sample, columns=("image_id",))
    cache = FeatureCache(tmp_path / "experts" / "features", backbone_digest(str(backbone)))
    # each row computed by one of the two processes, once
    assert len(cache) == len(splits["train"]) + len(splits["validation"])
    assert len(list(cache.dir.glob("*.safetensors"))) == 4  # train and validation, one file per process each
