import json
from pathlib import Path

import matplotlib
import numpy as np
import pytest
from PIL import Image

from affectnet_plus import EMOTIONS
from builder.au import AUCalibration, AUModel
from builder.predict import fitted_fusion, predict, resolve_manifest
from builder.softlabel import FusionConfig, fuse
from scripts.cli import main as cli
from tests.conftest import face_image

HOPPER = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"


def test_predict_gives_soft_labels_and_metadata_per_face(experts, tmp_path, needs_gear):
    blank = tmp_path / "blank.png"
    Image.new("RGB", (200, 200), (90, 90, 90)).save(blank)
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8 broken")
    report = predict([HOPPER, blank, broken], str(experts), FusionConfig(expert_weight=0.3))
    (face,) = report[str(HOPPER)]
    soft = np.array([face["soft_label"][e] for e in EMOTIONS])
    assert ((soft >= 0) & (soft <= 1)).all()  # 8 independent confidences
    assert [e for e, _ in face["top"]] == [EMOTIONS[k] for k in np.argsort(-soft)[:3]]
    assert all(0 <= p <= 1 for p in face["expert_probs"]) and all(0 <= a <= 1 for a in face["au_scores"])
    expected = fuse(np.asarray([face["expert_probs"]]), np.asarray([face["au_scores"]]), FusionConfig(0.3))[0]
    np.testing.assert_allclose(soft, expected, atol=5e-4)  # s = 0.3 f + 0.7 a, not renormalised
    assert np.asarray(face["landmarks"]).shape == (68, 2) and 0 <= face["age"] <= 100
    assert set(face["head_pose"]) == {"yaw", "pitch", "roll"} and len(face["ethnicity"]) == 5
    assert report[str(blank)] == [] and report[str(broken)]["error"] in ("not_an_image", "unreadable_file")
    # With a build's fitted AU model the AU scores are that model's (a new face: the mean over folds).
    rng = np.random.default_rng(0)
    features = rng.normal(size=(200, 21))
    calibration = AUCalibration.fit(features, rng.integers(0, 8, 200), np.arange(200) % 2, num_folds=2)
    model = AUModel(calibration=calibration, num_folds=2)
    (tmp_path / "au_model.json").write_text(json.dumps(model.to_json()))
    (fitted,) = predict([HOPPER], str(experts), au_model=str(tmp_path / "au_model.json"))[str(HOPPER)]
    expected = model.scores(np.asarray(fitted["landmarks"])[None], [""], "new")[0]
    np.testing.assert_allclose(fitted["au_scores"], expected, atol=2e-3)
    assert not np.allclose(fitted["au_scores"], face["au_scores"], atol=1e-2)


def test_without_metadata_the_experts_alone_make_the_soft_label(experts, tmp_path):
    paths = []
    for i in range(3):  # already cropped faces: the whole image is the face
        paths.append(tmp_path / f"{i}.jpg")
        face_image(96, 96, seed=i).save(paths[-1])
    report = predict(paths, str(experts.parent), metadata=False, whole_image=True, batch_size=2)
    for path in paths:
        (face,) = report[str(path)]
        assert face["au_scores"] is None and "age" not in face
        # the experts alone, as they are (the soft label is not renormalised)
        np.testing.assert_allclose([face["soft_label"][e] for e in EMOTIONS], face["expert_probs"], atol=5e-4)
    # the same faces one batch at a time: the same numbers
    again = predict(paths, str(experts), metadata=False, whole_image=True, batch_size=1)
    assert again == report


def test_cli_predict_and_bad_experts(experts, tmp_path, capsys):
    path = tmp_path / "face.jpg"
    face_image(96, 96, seed=0).save(path)
    assert cli(["predict", str(path), "--experts", str(experts), "--whole-image", "--no-metadata", "--json"]) == 0
    (face,) = json.loads(capsys.readouterr().out)[str(path)]
    assert len(face["top"]) == 3
    assert cli(["predict", str(path), "--experts", str(experts), "--whole-image", "--no-metadata"]) == 0
    assert "1 face(s)" in capsys.readouterr().out
    with pytest.raises(FileNotFoundError, match="no expert manifest"):
        resolve_manifest(str(tmp_path / "nowhere.json"))
    assert cli(["predict", str(path), "--experts", str(tmp_path / "missing" / "manifest.json")]) == 2


def test_experts_from_a_hub_repository(experts, tmp_path, fake_hub):
    from huggingface_hub import HfApi

    from tests.hub_server import USER

    repo = f"{USER}/affectnet-plus-experts"
    HfApi().create_repo(repo, private=True)
    HfApi().upload_folder(repo_id=repo, folder_path=str(experts.parent), ignore_patterns=["*/checkpoints/*"])
    path = tmp_path / "face.jpg"
    face_image(96, 96, seed=1).save(path)
    remote = predict([path], repo, metadata=False, whole_image=True)
    local = predict([path], str(experts), metadata=False, whole_image=True)
    assert remote == local


def test_predict_fuses_with_the_parameters_a_build_saved(experts, tmp_path, capsys):
    from builder.stage import file_sha256

    path = tmp_path / "face.jpg"
    face_image(96, 96, seed=2).save(path)
    built = tmp_path / "affectnet_plus"  # what a build with --experts leaves next to its data
    built.mkdir()
    saved = {"expert_weight": 0.3, "experts": {"manifest_sha256": file_sha256(experts)}}
    (built / "fusion.json").write_text(json.dumps(saved))
    assert fitted_fusion(built) == FusionConfig(expert_weight=0.3)
    (face,) = predict([path], str(experts), metadata=False, whole_image=True, dataset=str(built))[str(path)]
    # no landmarks: the experts alone, whatever λ
    np.testing.assert_allclose([face["soft_label"][e] for e in EMOTIONS], face["expert_probs"], atol=5e-4)
    # --dataset on the command line; an explicit --expert-weight wins over the build's
    argv = ["predict", str(path), "--experts", str(experts), "--whole-image", "--no-metadata", "--json"]
    assert cli([*argv, "--dataset", str(built)]) == 0
    assert json.loads(capsys.readouterr().out)[str(path)][0]["soft_label"] == face["soft_label"]
    assert cli([*argv, "--dataset", str(built), "--expert-weight", "1"]) == 0
    assert json.loads(capsys.readouterr().out)[str(path)][0]["soft_label"] == face["soft_label"]
    # parameters fitted for other experts are used, with a warning
    (built / "fusion.json").write_text(json.dumps({**saved, "experts": {"manifest_sha256": "0" * 16}}))
    with pytest.warns(UserWarning, match="not the expert manifest"):
        predict([path], str(experts), metadata=False, whole_image=True, dataset=str(built))
    with pytest.raises(FileNotFoundError, match="no fusion.json"):
        predict([path], str(experts), metadata=False, whole_image=True, dataset=str(tmp_path))
