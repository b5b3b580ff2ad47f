"""A build refuses experts trained under another fold plan than its own train rows (``docs/method.md`` §3).

``planned_manifest`` gives tests the experts of the ``experts`` fixture (trained on the bundled sample)
as if they had been trained on a build of another source: its manifest records that build's fold plan.
"""

import json
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from builder.export import BuildOptions, build
from core.schema import AffectNetPlusConfig, config_files, fold_plan, ids_digest

QUIET = BuildOptions(progress=False, max_rejected_fraction=1.0)


def train_rows(data: Path) -> tuple[list[str], list[int]]:
    """The image_ids and human labels of a built folder's train rows: what train-experts trains on."""
    table = pq.read_table([str(p) for p in config_files(data, "labels", "train")], columns=["image_id", "human_label"])
    return table["image_id"].to_pylist(), table["human_label"].to_pylist()


def planned_manifest(experts: Path, out: Path, source, config: AffectNetPlusConfig | None = None, **changes) -> Path:
    """``out/manifest.json``: the experts of the manifest ``experts`` (their folders where they are) with the
    fold plan of a build of ``source`` (made in ``out/stage``, without experts), ``changes`` replacing its keys.

    ``out`` may be the experts' own folder: the manifest is then rewritten in place.
    """
    stage = out / "stage"
    build(source, stage, config or AffectNetPlusConfig(), QUIET)
    manifest = json.loads(experts.read_text())
    ids, labels = train_rows(stage)
    out.mkdir(parents=True, exist_ok=True)
    for entry in manifest["experts"]:  # relative to the new manifest, as train-experts writes them
        entry["path"] = os.path.relpath((experts.parent / entry["path"]).resolve(), out.resolve())
    manifest["fold_plan"] = {**fold_plan(ids, manifest["num_folds"], labels), **changes}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return out / "manifest.json"


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    """40 rendered faces in the raw AffectNet layout."""
    from builder.sample import SampleConfig, write_sample

    root = tmp_path_factory.mktemp("fold_plan") / "raw"
    write_sample(root, SampleConfig(n=40, seed=1))
    return root


def _score_outputs(out: Path) -> list[str]:
    return sorted(p.name for p in (out / ".build" / "score").glob("*")) if (out / ".build" / "score").is_dir() else []


def test_experts_of_another_fold_plan_are_refused_before_scoring_and_the_matching_ones_build(raw, experts, tmp_path):
    good = planned_manifest(experts, tmp_path / "good", raw)
    ids, _ = train_rows(tmp_path / "good" / "stage")
    out = tmp_path / "affectnet_plus"

    # What the manifest alone tells is checked before anything is written.
    planned = json.loads(good.read_text())
    variants = {
        "unplanned": ({k: v for k, v in planned.items() if k != "fold_plan"},
                      r"records no fold plan.*affectnet-plus train-experts --data"),
        "other_k": (planned | {"fold_plan": planned["fold_plan"] | {"num_folds": 3}},
                    r"\(num_folds is 3 in its fold plan, 2 for this build\).*train-experts --data"),
        "other_rule": (planned | {"fold_plan": planned["fold_plan"] | {"rule": "sha256(image_id) mod K"}},
                       r"\(rule is 'sha256\(image_id\) mod K' in its fold plan, 'sha1"),
    }  # fmt: skip
    for name, (manifest, message) in variants.items():
        (tmp_path / "good" / f"{name}.json").write_text(json.dumps(manifest))
        with pytest.raises(ValueError, match=message):
            build(raw, out, AffectNetPlusConfig(), QUIET, experts=str(tmp_path / "good" / f"{name}.json"))
        assert not out.exists()

    # Experts trained on all but one of the build's train rows: refused once the crop stage has written
    # the train rows, before any expert (or metadata model) runs.
    fewer = planned_manifest(experts, tmp_path / "fewer", raw, train_ids_sha256=ids_digest(ids[1:]))
    message = r"fewer/manifest.json, on this build's 28 train rows: .*train_ids_sha256.*train-experts --data STAGE"
    with pytest.raises(ValueError, match=message) as err:
        build(raw, out, AffectNetPlusConfig(), QUIET, experts=str(fewer))
    assert str(tmp_path) in str(err.value)  # names the manifest (an error message, never published)
    assert (out / ".build" / "crop" / "DONE.json").is_file() and _score_outputs(out) == []

    # The experts of this very build's train rows: built, the crops of the refused build reused.
    report = build(raw, out, AffectNetPlusConfig(), QUIET, experts=str(good))
    assert report["written"] == 40 and "expert_weight" in report["fusion"]
    train = pq.read_table([str(p) for p in config_files(out, "labels", "train")], columns=["image_id", "expert_probs"])
    assert sorted(train["image_id"].to_pylist()) == sorted(ids) and train["expert_probs"].null_count == 0


def test_the_command_line_says_what_to_do(raw, experts, tmp_path, capsys):
    from scripts.cli import main as cli

    manifest = json.loads(experts.read_text())
    manifest.pop("fold_plan", None)
    manifest["experts"] = [{**e, "path": str((experts.parent / e["path"]).resolve())} for e in manifest["experts"]]
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    argv = ["build", str(raw), "--out", str(tmp_path / "out"), "--experts", str(tmp_path / "manifest.json"), "--quiet",
            "--no-metadata"]  # fmt: skip
    assert cli(argv) == 2
    err = capsys.readouterr().err
    assert "records no fold plan" in err and "affectnet-plus train-experts --data" in err and len(err.splitlines()) == 1


def test_recomputing_the_release_with_experts_trained_on_a_build_of_it_passes(experts, tmp_path):
    from tests.builder.release_fixture import write_release

    release = tmp_path / "release"
    write_release(release, {"train": 12}, seed=0)
    write_release(release, {"validation": 4}, seed=1)  # other pictures than the train rows'
    config = AffectNetPlusConfig(source_format="affectnet-plus")
    manifest = planned_manifest(experts, tmp_path / "experts", release, config)
    out = tmp_path / "recomputed"
    report = build(release, out, config, QUIET, experts=str(manifest), recompute="soft-labels")
    assert report["written"] == 16 and report["rejected"] == {}


def test_train_ids_are_read_from_the_score_stage_once_the_export_consumed_the_crop_shard(tmp_path):
    from builder.stage_score import train_ids

    crop, score = tmp_path / "crop", tmp_path / "score"
    crop.mkdir(), score.mkdir()
    pq.write_table(pa.table({"image_id": ["t/0", "t/1"]}), crop / "train-00000-of-00002.parquet")
    pq.write_table(pa.table({"image_id": ["t/2"]}), score / "train-00001-of-00002.parquet")  # consumed crop shard
    pq.write_table(pa.table({"image_id": ["v/0"]}), crop / "validation-00000-of-00001.parquet")
    shards = ["train-00000-of-00002.parquet", "train-00001-of-00002.parquet", "validation-00000-of-00001.parquet"]
    assert train_ids([crop, score], shards) == ["t/0", "t/1", "t/2"]
