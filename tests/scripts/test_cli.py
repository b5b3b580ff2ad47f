import json

import pytest
from datasets import load_dataset

from scripts.cli import main, make_parser


@pytest.mark.parametrize("command", [[], ["sample"], ["build"], ["show"]])
def test_every_command_explains_itself(command, capsys):
    with pytest.raises(SystemExit) as info:
        main([*command, "--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    assert "usage: affectnet-plus" in text
    if command == ["build"]:
        for option in ("--format", "--out", "--num-proc", "--shard-rows", "--face-size", "--overwrite"):
            assert option in text


def test_sample_build_show_chain(tmp_path, capsys, monkeypatch):
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
