import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from datasets import Dataset
from transformers import AutoModelForImageClassification, pipeline

from affectnet_plus import EMOTIONS, AffectNetPlusConfig
from builder.export import BuildOptions, build
from core.schema import config_files
from models.fer import TITLES, demographic_groups, write_results
from scripts.train import main as train
from tests.conftest import face_image, launch_two_processes

ROOT = Path(__file__).parents[2]
FAST = ["--max-steps", "2", "--per-device-batch-size", "8", "--eval-batch-size", "32", "--num-workers", "0",
        "--warmup-ratio", "0"]  # fmt: skip
RUNS = [("hard", 8), ("soft", 8), ("soft-multilabel", 8), ("hard", 7), ("soft", 7), ("soft-multilabel", 7)]


def main(argv):
    return train(["fer", *argv])


def validation_labels(data: Path) -> np.ndarray:
    shards = [str(p) for p in config_files(data, "default", "validation")]
    return np.asarray(Dataset.from_parquet(shards, columns=["human_label"])["human_label"])


@pytest.fixture(scope="module")
def soft_sample(built_sample, experts, tmp_path_factory):
    """The bundled sample built with the tiny experts: soft labels and subsets."""
    out = tmp_path_factory.mktemp("fer_data") / "affectnet_plus"
    build(built_sample.parent / "raw", out, AffectNetPlusConfig(), BuildOptions(progress=False), experts=str(experts))
    return out


@pytest.fixture(scope="module")
def runs(soft_sample, tmp_path_factory):
    root = tmp_path_factory.mktemp("fer")
    for target, classes in RUNS:
        argv = ["--data", str(soft_sample), "--target", target, "--num-classes", str(classes), *FAST]
        assert main([*argv, "--output-dir", str(root / f"{target}-{classes}")]) == 0
    return root


@pytest.mark.parametrize(("target", "classes"), RUNS)
def test_checkpoint_loads_and_reports_the_metrics(runs, target, classes):
    folder = runs / f"{target}-{classes}"
    model = AutoModelForImageClassification.from_pretrained(folder)
    assert list(model.config.id2label.values()) == list(EMOTIONS[:classes])
    assert model.config.num_labels == classes and ("contempt" in model.config.label2id) == (classes == 8)
    predictions = pipeline("image-classification", model=str(folder), top_k=classes)(face_image(90, 90))
    assert {p["label"] for p in predictions} == set(EMOTIONS[:classes])
    if target == "soft-multilabel":  # one sigmoid per emotion: independent confidences
        assert model.config.problem_type == "multi_label_classification"
        assert all(0 < p["score"] < 1 for p in predictions)
    else:
        assert model.config.problem_type == "single_label_classification"
        assert sum(p["score"] for p in predictions) == pytest.approx(1, abs=1e-4)
    results = json.loads((folder / "all_results.json").read_text())
    assert results["target"] == target and results["num_classes"] == classes and results["step"] == 2
    for key in ("top1_accuracy", "top2_accuracy", "macro_f1", "cohen_kappa", "ece", "kl_divergence", "js_divergence"):
        assert np.isfinite(results[f"validation_{key}"]), key
    assert results["validation_top2_accuracy"] >= results["validation_top1_accuracy"]
    subsets = [k for k in results if k.startswith("validation_subset_") and k.endswith("_top1_accuracy")]
    assert subsets and "validation_subset_top1_gap" in results
    counts = sum(v for k, v in results.items() if k.startswith("validation_subset_") and k.endswith("_count"))
    assert counts == results["validation_count"]  # every evaluated row is in one subset
    card = (folder / "README.md").read_text()
    assert f"# AffectNet+ {TITLES[target]} ({classes} classes)" in card and "top1_accuracy" in card
    assert json.loads((folder / "training_config.json").read_text())["target"] == target


def test_seven_classes_leave_out_contempt_rows(runs, soft_sample):
    eight = json.loads((runs / "hard-8" / "all_results.json").read_text())
    seven = json.loads((runs / "hard-7" / "all_results.json").read_text())
    validation = validation_labels(soft_sample)
    assert eight["validation_count"] == int((validation < 8).sum())
    assert seven["validation_count"] == int((validation < 7).sum()) < eight["validation_count"]
    assert seven["train_rows"] < eight["train_rows"]


def test_results_table(runs, tmp_path):
    summary = write_results([runs / f"{t}-{c}" for t, c in RUNS], tmp_path)
    assert list(summary) == [f"{t}-{c}" for t, c in RUNS]
    table = (tmp_path / "results.md").read_text()
    assert "| model | classes | top-1 | top-2 | macro-F1 | kappa | KL | JS | ECE | top-1 easy |" in table
    for title in ("| Hard-FER |", "| Soft-FER |", "| Soft-FER (multi-label) |"):
        assert table.count(title) == 2, title
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["soft-7"]["num_classes"] == 7 and "top1_accuracy" in saved["soft-7"]
    assert saved["soft-multilabel-8"]["target"] == "soft-multilabel"


def test_reproduce_script_summarises_finished_runs(runs, soft_sample, tmp_path):
    # Training all six runs through `accelerate launch` does not fit the test budget: give the script
    # finished runs (it skips them) and check that it writes the table with the same numbers.
    for target, classes in RUNS:
        shutil.copytree(runs / f"{target}-{classes}", tmp_path / f"{target}-{classes}")
    env = {**os.environ, "PYTHON": str(Path(os.sys.executable))}
    script = str(ROOT / "scripts" / "reproduce_baselines.sh")
    done = subprocess.run([script, str(soft_sample), str(tmp_path)], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("already trained") == len(RUNS)
    assert json.loads((tmp_path / "results.json").read_text()) == write_results(
        [tmp_path / f"{t}-{c}" for t, c in RUNS], tmp_path / "again"
    )
    assert subprocess.run([script], capture_output=True, text=True).returncode == 2


@pytest.mark.parametrize("target", ["soft", "soft-multilabel"])
def test_soft_target_without_soft_labels_is_a_clear_error(built_sample, tmp_path, capsys, target):
    argv = ["--data", str(built_sample), "--target", target, "--output-dir", str(tmp_path / "soft"), *FAST]
    assert main(argv) == 2
    assert f"no soft_label column, which --target {target} learns" in capsys.readouterr().err
    assert not (tmp_path / "soft").exists()


def test_demographic_groups_from_metadata_columns():
    rows = Dataset.from_dict({
        "subset": [0, 2, -1],
        "gender": [{"female": 0.8, "male": 0.2}, {"female": 0.1, "male": 0.9}, None],
        "ethnicity": [{"white": 0.1, "asian": 0.9}, {"white": 0.6, "asian": 0.4}, {"white": 0.5, "asian": 0.5}],
        "age": [12.0, 45.0, None],
    })  # fmt: skip
    assert demographic_groups(rows) == {
        "subset": ["easy", "difficult", None],
        "gender": ["female", "male", None],
        "ethnicity": ["asian", "white", "white"],
        "age": ["<20", "40-59", None],
    }


def test_accelerate_launch_with_two_cpu_processes(soft_sample, tmp_path):
    # The multi-label target: float (N, 8) targets through DDP, its own loss, its normalised evaluation.
    out = tmp_path / "ddp"
    args = ["--data", str(soft_sample), "--target", "soft-multilabel", "--output-dir", str(out), *FAST]
    result = launch_two_processes("scripts/train.py", "fer", *args)
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((out / "all_results.json").read_text())
    assert results["num_processes"] == 2 and results["replica_checksums"][0] == results["replica_checksums"][1]
    # the gathered evaluation saw every validation row once, padding dropped
    assert results["validation_count"] == int((validation_labels(soft_sample) < 8).sum())
    assert results["target"] == "soft-multilabel" and np.isfinite(results["validation_kl_divergence"])


def test_report_draws_the_baselines(runs, soft_sample, tmp_path):
    from scripts.cli import main as cli

    for target, classes in RUNS:
        with np.load(runs / f"{target}-{classes}" / "validation_predictions.npz") as saved:
            assert saved["probs"].shape == (len(saved["labels"]), classes)
            np.testing.assert_allclose(saved["probs"].sum(1), 1, atol=1e-5)
            if target == "soft-multilabel":  # the distribution is the normalised sigmoids
                confidences = saved["confidences"]
                np.testing.assert_allclose(saved["probs"], confidences / confidences.sum(1, keepdims=True), atol=1e-5)
    assert cli(["report", str(soft_sample), "--out", str(tmp_path / "report"), "--baselines", str(runs)]) == 0
    page = (tmp_path / "report" / "report.md").read_text()
    assert "](baselines_confusion.png)" in page and "](baselines_reliability.png)" in page
    assert cli(["report", str(soft_sample), "--out", str(tmp_path / "r2"), "--baselines", str(tmp_path)]) == 2
