import json

import numpy as np
import pytest
from datasets import load_dataset
from PIL import Image
from transformers import AutoModelForImageClassification

from affectnet_plus import AffectNetPlusConfig
from builder.export import BuildOptions, build
from builder.va_annotator import ValenceArousalAnnotator
from scripts.train import main as train
from tests.conftest import face_image, launch_two_processes


def main(argv):
    return train(["valence-arousal", *argv])


FAST = ["--per-device-batch-size", "8", "--eval-batch-size", "16", "--num-workers", "0", "--warmup-ratio", "0"]


@pytest.fixture(scope="module")
def regressor(built_sample, tmp_path_factory):
    out = tmp_path_factory.mktemp("va") / "va"
    assert main(["--data", str(built_sample), "--output-dir", str(out), "--max-steps", "3", *FAST]) == 0
    return out


def test_regressor_checkpoint_loads_and_reports_ccc_and_rmse(regressor):
    for name in ("model.safetensors", "config.json", "preprocessor_config.json", "all_results.json", "README.md"):
        assert (regressor / name).is_file()
    model = AutoModelForImageClassification.from_pretrained(regressor)
    assert model.config.id2label == {0: "valence", 1: "arousal"} and model.config.problem_type == "regression"
    results = json.loads((regressor / "all_results.json").read_text())
    for key in ("validation_valence_ccc", "validation_arousal_ccc", "validation_valence_rmse", "validation_arousal_rmse"):
        assert np.isfinite(results[key])
    assert results["train_rows"] > 0
    assert "valence_ccc" in (regressor / "README.md").read_text()


def test_annotator_estimates_bounded_values_and_refuses_other_checkpoints(regressor, experts):
    crops = [face_image(224, 224, seed=i) for i in range(5)]
    values = ValenceArousalAnnotator(regressor, batch_size=2).annotate(crops, [{}] * 5)
    assert all(-1 <= v["valence"] <= 1 and -1 <= v["arousal"] <= 1 for v in values)
    one_by_one = [ValenceArousalAnnotator(regressor).annotate([c], [{}])[0] for c in crops]
    np.testing.assert_allclose([list(v.values()) for v in values], [list(v.values()) for v in one_by_one], atol=1e-5)
    happy_expert = experts.parent / "happy-f0"
    with pytest.raises(ValueError, match="not a valence/arousal regressor"):
        ValenceArousalAnnotator(happy_expert)


def test_build_estimates_valence_arousal_for_a_source_without_them(regressor, tmp_path, needs_gear):
    root = tmp_path / "fer"
    (root / "train" / "happy").mkdir(parents=True)
    for i in range(4):
        face_image(160, 160, seed=i).save(root / "train" / "happy" / f"{i}.jpg")
    out = tmp_path / "built"
    config = AffectNetPlusConfig(source_format="imagefolder")
    with pytest.raises(ValueError, match="needs --metadata"):
        build(root, out, config, BuildOptions(progress=False), va_model=str(regressor))
    build(root, out, config, BuildOptions(progress=False), metadata=True, va_model=str(regressor))
    rows = load_dataset(str(out), split="train")
    assert all(-1 <= v <= 1 for v in [*rows["valence"], *rows["arousal"]])
    assert "estimates of that regressor for every row" in (out / "README.md").read_text()


def test_no_rows_with_valence_arousal_is_a_clear_error(tmp_path, capsys):
    root = tmp_path / "fer"
    (root / "train" / "sad").mkdir(parents=True)
    Image.new("RGB", (64, 64)).save(root / "train" / "sad" / "0.jpg")
    build(root, tmp_path / "built", AffectNetPlusConfig(source_format="imagefolder"), BuildOptions(progress=False))
    assert main(["--data", str(tmp_path / "built"), "--output-dir", str(tmp_path / "va"), *FAST]) == 2
    assert "valence" in capsys.readouterr().err


def test_accelerate_launch_with_two_cpu_processes(built_sample, tmp_path):
    out = tmp_path / "ddp"
    args = ["--data", str(built_sample), "--output-dir", str(out), "--max-steps", "2", *FAST]
    result = launch_two_processes("scripts/train.py", "valence-arousal", *args)
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((out / "all_results.json").read_text())
    assert results["num_processes"] == 2 and results["replica_checksums"][0] == results["replica_checksums"][1]
