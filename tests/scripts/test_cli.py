import json
from pathlib import Path

import numpy as np
import pytest
from datasets import load_dataset
from PIL import Image

from scripts.cli import main, make_parser


@pytest.mark.parametrize("command", [[], ["sample"], ["build"], ["show"], ["annotate"], ["fetch-models"],
                                     ["export-release"]])
def test_every_command_explains_itself(command, capsys):
    with pytest.raises(SystemExit) as info:
        main([*command, "--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    assert "usage: affectnet-plus" in text
    if command == ["build"]:
        for option in ("--format", "--out", "--num-proc", "--shard-rows", "--face-size", "--overwrite"):
            assert option in text


def test_sample_build_show_chain(tmp_path, capsys, monkeypatch, needs_gear):
    raw = tmp_path / "raw"
    assert main(["sample", str(raw), "--n", "60", "--seed", "3", "--quiet", "--grid", str(tmp_path / "grid.png")]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["n"] == 60 and (tmp_path / "grid.png").stat().st_size > 10_000
    out = tmp_path / "affectnet_plus"
    assert main(["build", str(raw), "--out", str(out), "--quiet", "--num-proc", "2"]) == 0
    assert "read 60, written 60, rejected 0" in capsys.readouterr().out
    monkeypatch.chdir(tmp_path)
    assert main(["show", "affectnet_plus"]) == 0
    shown = capsys.readouterr().out
    assert "first train row:" in shown and "<RGB image 224x224>" in shown
    card = (out / "README.md").read_text()
    assert "These faces are synthetic" in card and "license: apache-2.0" in card
    dataset = load_dataset("affectnet_plus", split="train")
    assert len(dataset) == summary["splits"]["train"]
    # the metadata the raw layout lacks was estimated (non-face rows excepted), the source's landmarks kept
    assert {"head_pose", "age", "gender", "ethnicity"} <= set(dataset.features)
    faces = [row for row in dataset if row["human_label"] != 10]
    assert all(row["age"] is not None and 0 <= row["age"] <= 100 for row in faces)
    assert all(abs(sum(row["ethnicity"].values()) - 1) < 1e-4 for row in faces)
    assert "estimated by these models" in card and "GEAR" in card


def test_sample_refuses_to_mix_outputs(tmp_path, capsys):
    raw = tmp_path / "raw"
    assert main(["sample", str(raw), "--n", "5", "--quiet"]) == 0
    assert main(["sample", str(raw), "--n", "5", "--quiet"]) == 2
    assert "error" in capsys.readouterr().err


def test_parser_rejects_unknown_format():
    with pytest.raises(SystemExit):
        make_parser().parse_args(["build", "x", "--out", "y", "--format", "tfrecord"])


def test_release_layout_sample_builds_with_its_subsets(tmp_path, capsys):
    raw = tmp_path / "release"
    assert main(["sample", str(raw), "--n", "40", "--layout", "affectnet-plus", "--quiet"]) == 0
    summary = json.loads(capsys.readouterr().out)
    out = tmp_path / "built"
    assert main(["build", str(raw), "--format", "affectnet-plus", "--out", str(out), "--quiet"]) == 0
    report = json.loads((out / "build_report.json").read_text())
    assert report["written"] == 40 and report["rejected"] == {}
    built = {name: sum(report["configs"].get(name, {}).values()) for name in ("easy", "challenging", "difficult")}
    assert built == summary["subsets"]
    easy = load_dataset(str(out), "easy")
    assert {subset for split in easy.values() for subset in split["subset"]} == {0}
    # export-release writes it back in the release layout; building that again gives the same rows
    tree = tmp_path / "exported"
    assert main(["export-release", str(out), str(tree), "--quiet"]) == 0
    assert "release layout" in capsys.readouterr().out
    assert len(list((tree / "human_annotated" / "train_set" / "annotations").glob("*.json"))) == report["splits"][
        "train"]["written"]
    again = tmp_path / "again"
    assert main(["build", str(tree), "--format", "affectnet-plus", "--out", str(again), "--quiet"]) == 0
    first, second = load_dataset(str(out), "labels"), load_dataset(str(again), "labels")
    for split in first:
        for column in ("human_label", "soft_label", "subset"):
            assert sorted(map(str, first[split][column])) == sorted(map(str, second[split][column])), column
    assert main(["export-release", str(out), str(tree), "--quiet"]) == 2  # OUT is not empty: refused
    assert "exists and is not empty" in capsys.readouterr().err


def test_annotate_prints_every_face_or_why_not(tmp_path, capsys, needs_gear):
    import matplotlib

    hopper = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
    blank = tmp_path / "blank.png"
    Image.new("RGB", (300, 300), (128, 128, 128)).save(blank)
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(b"\xff\xd8 nope")
    assert main(["annotate", str(hopper), str(blank), str(corrupt), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    (face,) = report[str(hopper)]
    x, y, w, h = face["box"]
    points = np.asarray(face["landmarks"])
    assert points.shape == (68, 2)
    inside = (points[:, 0] > x - 0.2 * w) & (points[:, 0] < x + 1.2 * w) & (points[:, 1] > y - 0.2 * h)
    assert inside.all() and (points[:, 1] < y + 1.2 * h).all()
    assert points[36:48, 1].mean() < points[30, 1] < points[48:68, 1].mean()  # eyes above nose above mouth
    assert 0 <= face["age"] <= 100 and abs(sum(face["gender"].values()) - 1) < 1e-4
    assert abs(sum(face["ethnicity"].values()) - 1) < 1e-4 and set(face["head_pose"]) == {"yaw", "pitch", "roll"}
    assert report[str(blank)] == [] and report[str(corrupt)]["error"] in ("not_an_image", "unreadable_file")
    assert main(["annotate", str(hopper)]) == 0
    assert "1 face(s)" in capsys.readouterr().out


def test_fetch_models_without_npm_is_a_clear_error(tmp_path, capsys, monkeypatch):
    import shutil

    from builder import model_store

    # The wheel-sourced models are tested offline in tests/builder/test_model_store.py; no index here.
    monkeypatch.setattr(model_store, "fetch_all", lambda dest=None, pip_args=(): [])
    monkeypatch.setattr(shutil, "which", lambda name: None)
    assert main(["fetch-models", "--dest", str(tmp_path / "models")]) == 2
    assert "npm is not installed" in capsys.readouterr().err
