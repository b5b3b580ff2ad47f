"""The official release format: a build reads it exactly, rejects damage with its reason, and any build
is written back in it (``builder.release.export_release``) and reads back to the same rows."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from builder.export import BuildOptions, build
from builder.release import export_release, release_annotation
from builder.sample import SampleConfig, write_sample
from builder.softlabel import subsets
from core.schema import RELEASE_ETHNICITY_CLASSES, SPLITS, AffectNetPlusConfig, config_files
from tests.builder.release_fixture import DAMAGES, PARTS, RACE, damage, rank_subset, write_release
from tests.builder.test_fold_plan import planned_manifest

QUIET = BuildOptions(progress=False)
RELEASE = AffectNetPlusConfig(source_format="affectnet-plus")
COUNTS = {"train": 24, "validation": 8, "unlabeled": 8}
# What a round trip keeps (the image's bytes are compared on their own).
COLUMNS = ("human_label", "soft_label", "subset", "landmarks", "landmarks_29", "head_pose", "age", "gender",
           "ethnicity", "valence", "arousal")  # fmt: skip


def _rows(folder: Path) -> dict[str, dict]:
    """Every row of a built folder by image_id, with its split, read through ``config_files``."""
    rows = {}
    for split in SPLITS:
        for path in config_files(folder, "default", split):
            for row in pq.read_table(path).to_pylist():
                rows[row["image_id"]] = {**row, "split": split}
    return rows


def _f32(values) -> np.ndarray:
    return np.asarray(values, dtype=np.float32)


def _va(value):
    return None if value is None or value == -2 else float(np.float32(value))


def test_fixture_subsets_are_the_rank_rule_of_softlabel(tmp_path):
    rows = write_release(tmp_path, {"train": 60, "validation": 20, "unlabeled": 20})
    soft = np.array([r["annotation"]["soft-label"] for r in rows.values()])
    human = np.array([r["annotation"]["human-label"] for r in rows.values()])
    expected = [-1 if r["annotation"]["subset"] is None else r["annotation"]["subset"] for r in rows.values()]
    assert subsets(soft, human).tolist() == expected
    assert set(expected) == {-1, 0, 1, 2}
    assert rank_subset([0.5, 0.5, 0, 0, 0, 0, 0, 0], 0) == 1 and rank_subset([0.9, 0.5, 0.5, 0.5, 0, 0, 0, 0], 1) == 2
    sums = soft.sum(1)
    assert sums.min() > 1.1 and 1.5 < np.median(sums) < 2.5  # independent confidences, like the release's


def test_every_good_row_is_built_exactly(tmp_path):
    fixture = write_release(tmp_path / "release", COUNTS)
    report = build(tmp_path / "release", tmp_path / "out", RELEASE, QUIET)
    assert report["read"] == report["written"] == len(fixture) and report["rejected"] == {}
    rows = _rows(tmp_path / "out")
    assert sorted(rows) == sorted(fixture)
    schema = pq.read_schema(config_files(tmp_path / "out", "default", "train")[0])
    assert tuple(f.name for f in schema.field("ethnicity").type) == RELEASE_ETHNICITY_CLASSES
    nulls = 0
    for image_id, row in rows.items():
        ann, split = fixture[image_id]["annotation"], fixture[image_id]["split"]
        meta = ann["meta-data"]
        assert row["split"] == split and row["human_label"] == ann["human-label"]
        # float32 of the JSON's numbers: not renormalised, not rounded otherwise
        assert np.array_equal(_f32(row["soft_label"]), _f32(ann["soft-label"]))
        assert row["subset"] == (-1 if ann["subset"] is None else ann["subset"])
        assert np.array_equal(_f32(row["landmarks"]), _f32(meta["landmark-68"]).reshape(68, 2))
        if meta["landmark-29"] is None:
            assert row["landmarks_29"] is None
            nulls += 1
        else:
            assert np.array_equal(_f32(row["landmarks_29"]), _f32(meta["landmark-29"]).reshape(29, 2))
        if meta["pose"] is None:
            assert row["head_pose"] is None
        else:
            for key, radians in meta["pose"].items():
                assert row["head_pose"][key] == pytest.approx(math.degrees(radians), rel=1e-6)
        if meta["race"] is None:
            assert row["ethnicity"] is None
        else:
            spelled = {name.replace(" ", "_"): p for name, p in meta["race"].items()}
            assert row["ethnicity"] == {name: float(np.float32(spelled[name])) for name in RELEASE_ETHNICITY_CLASSES}
        assert row["age"] == (None if meta["age"] is None else float(np.float32(meta["age"])))
        assert row["gender"] == (None if meta["gender"] is None else
                                 {k: float(np.float32(v)) for k, v in meta["gender"].items()})  # fmt: skip
        assert row["valence"] == _va(meta["valence"]) and row["arousal"] == _va(meta["arousal"])
        part, stem = image_id.rsplit("/images/", 1)
        assert row["image"]["bytes"] == (tmp_path / "release" / part / "images" / f"{stem}.jpg").read_bytes()
    assert nulls >= 2  # rows whose meta-data says null are kept, with null columns
    assert any(row["valence"] is None for row in rows.values())  # -2: no valence


def test_damaged_annotations_are_rejected_with_the_key_and_the_value(tmp_path):
    root = tmp_path / "release"
    fixture = write_release(root, {"train": 40, "validation": 4})
    damaged = {}
    for i, kind in enumerate(DAMAGES):
        image_id = f"{PARTS['train']}/images/{3 * i + 1}"
        damaged[image_id] = damage(root, image_id, kind)
    options = BuildOptions(progress=False, max_rejected_fraction=0.25)
    report = build(root, tmp_path / "out", RELEASE, options)
    assert report["read"] == len(fixture) == report["written"] + sum(report["rejected"].values())
    assert report["rejected"] == {"malformed_annotation": len(DAMAGES)}
    rejects = [json.loads(line) for line in (tmp_path / "out/rejects.jsonl").read_text().splitlines()]
    by_id = {r["image_id"]: r for r in rejects}
    assert sorted(by_id) == sorted(damaged)
    for image_id, detail in damaged.items():
        assert by_id[image_id]["reason"] == "malformed_annotation"
        assert detail in by_id[image_id]["detail"], by_id[image_id]
        assert str(tmp_path) not in by_id[image_id]["detail"]
    assert sorted(_rows(tmp_path / "out")) == sorted(set(fixture) - set(damaged))


def test_a_release_in_degrees_read_as_radians_is_rejected_and_pose_unit_reads_it(tmp_path):
    root = tmp_path / "release"
    write_release(root, {"train": 4})
    path = root / PARTS["train"] / "annotations/0.json"
    data = json.loads(path.read_text())
    data["meta-data"]["pose"] = {"yaw": 12.5, "pitch": -4.0, "roll": 1.0}  # degrees
    path.write_text(json.dumps(data))
    report = build(root, tmp_path / "out", RELEASE, BuildOptions(progress=False, max_rejected_fraction=1.0))
    (reject,) = [json.loads(line) for line in (tmp_path / "out/rejects.jsonl").read_text().splitlines()]
    assert reject["detail"].startswith("meta-data.pose.yaw = 12.5 not in [-pi, pi] radians") and report["written"] == 3

    degrees = AffectNetPlusConfig(source_format="affectnet-plus", pose_unit="degrees")
    build(root, tmp_path / "deg", degrees, BuildOptions(progress=False, max_rejected_fraction=1.0))
    row = _rows(tmp_path / "deg")[f"{PARTS['train']}/images/0"]
    assert row["head_pose"] == {"yaw": 12.5, "pitch": -4.0, "roll": 1.0}


def _id_map(release: Path) -> dict[str, str]:
    with open(release / "image_ids.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["release_image_id", "image_id"]
    return {r["release_image_id"]: r["image_id"] for r in rows}


def _assert_round_trip(first: dict[str, dict], second: dict[str, dict], id_map: dict[str, str]) -> None:
    """``second`` (a build of the export) holds ``first``'s rows, matched through the id map."""
    assert sorted(id_map.values()) == sorted(first) and sorted(id_map) == sorted(second)
    for release_id, image_id in id_map.items():
        a, b = first[image_id], second[release_id]
        assert a["split"] == b["split"]
        assert a["image"]["bytes"] == b["image"]["bytes"]
        for column in COLUMNS:
            if column == "head_pose" and a.get(column) is not None:
                assert b[column] == pytest.approx(a[column], abs=1e-3), (image_id, column)
            else:
                assert a.get(column) == b[column], (image_id, column)


def _export_and_rebuild(built: Path, tmp_path: Path) -> tuple[dict, dict[str, dict]]:
    release = tmp_path / "exported"
    report = export_release(built, release, progress=False)
    rebuilt = build(release, tmp_path / "rebuilt", RELEASE, QUIET)
    assert rebuilt["read"] == rebuilt["written"] == sum(report["rows"].values())  # image_ids.csv is no row
    return report, _rows(tmp_path / "rebuilt")


def test_export_of_a_release_build_reads_back_to_the_same_rows(tmp_path):
    fixture = write_release(tmp_path / "release", COUNTS)
    build(tmp_path / "release", tmp_path / "out", RELEASE, QUIET)
    first = _rows(tmp_path / "out")
    report, second = _export_and_rebuild(tmp_path / "out", tmp_path)
    assert report == {"rows": COUNTS, "id_map": "image_ids.csv"}
    release = tmp_path / "exported"
    id_map = _id_map(release)
    _assert_round_trip(first, second, id_map)

    assert sorted(p.name for p in release.iterdir()) == ["human_annotated", "image_ids.csv", "no_human_annotated"]
    for split, part in PARTS.items():
        n = COUNTS[split]
        assert sorted(p.name for p in (release / part / "images").iterdir()) == sorted(f"{i}.jpg" for i in range(n))
        assert sorted(p.name for p in (release / part / "annotations").iterdir()) == sorted(
            f"{i}.json" for i in range(n)
        )
    # The JSON is the release's: its keys, radians, -2, the race classes as the release spells them.
    for release_id, image_id in id_map.items():
        part, stem = release_id.rsplit("/images/", 1)
        data = json.loads((release / part / "annotations" / f"{stem}.json").read_text())
        original = fixture[image_id]["annotation"]
        assert list(data) == ["human-label", "soft-label", "subset", "meta-data"]
        assert list(data["meta-data"]) == list(original["meta-data"])
        assert data["soft-label"] == [float(np.float32(v)) for v in original["soft-label"]]
        assert data["subset"] == original["subset"]
        meta, given = data["meta-data"], original["meta-data"]
        assert len(meta["landmark-68"]) == 136
        assert meta["landmark-29"] is None or len(meta["landmark-29"]) == 58
        if given["pose"] is not None:
            assert meta["pose"] == pytest.approx(given["pose"], abs=1e-6)
        if given["race"] is not None:
            assert list(meta["race"]) == list(RACE)
        assert meta["valence"] == (-2 if given["valence"] in (None, -2) else pytest.approx(given["valence"]))
        assert meta["arousal"] == (-2 if given["arousal"] in (None, -2) else pytest.approx(given["arousal"]))


def test_other_ethnicity_classes_keep_their_names_through_an_export(tmp_path):
    classes = ("white", "black", "asian", "indian", "other")
    write_release(tmp_path / "release", {"train": 6}, race=classes)
    build(tmp_path / "release", tmp_path / "out", RELEASE, QUIET)
    first = _rows(tmp_path / "out")
    _, second = _export_and_rebuild(tmp_path / "out", tmp_path)
    _assert_round_trip(first, second, _id_map(tmp_path / "exported"))
    row = next(r for r in second.values() if r["ethnicity"] is not None)
    assert tuple(row["ethnicity"]) == classes


def test_release_annotation_writes_the_release_formats():
    row = {"image_id": "x", "human_label": 9, "soft_label": [0.25] * 8, "subset": -1, "valence": None,
           "head_pose": {"yaw": 30.0, "pitch": None, "roll": 0.0}, "gender": None,
           "ethnicity": {"middle_eastern": 0.5, "latino_hispanic": 0.25, "other": 0.25},
           "landmarks": [[1.5, 2.5]] * 68}  # fmt: skip
    data = release_annotation(row)
    assert data["human-label"] == 9 and data["subset"] is None and data["soft-label"] == [0.25] * 8
    meta = data["meta-data"]
    assert meta["race"] == {"middle eastern": 0.5, "latino hispanic": 0.25, "other": 0.25}
    assert meta["pose"] is None  # a pose with a missing angle is no pose
    assert meta["valence"] == meta["arousal"] == -2.0
    assert meta["age"] is None and meta["gender"] is None and meta["landmark-29"] is None
    assert meta["landmark-68"] == [1.5, 2.5] * 68
    assert release_annotation({**row, "head_pose": {"yaw": 90.0, "pitch": 0.0, "roll": -45.0}})["meta-data"][
        "pose"
    ] == {"yaw": math.pi / 2, "pitch": 0.0, "roll": -math.pi / 4}
    with pytest.raises(ValueError, match="no soft_label"):
        release_annotation({**row, "soft_label": None})


def test_export_refuses_what_it_cannot_write(small_affectnet, tmp_path):
    with pytest.raises(FileNotFoundError, match="not a built AffectNet"):
        export_release(tmp_path, tmp_path / "release", progress=False)
    build(small_affectnet, tmp_path / "plain", AffectNetPlusConfig(), QUIET)
    with pytest.raises(ValueError, match="no soft_label, subset column.*[Bb]uild with soft labels first"):
        export_release(tmp_path / "plain", tmp_path / "release", progress=False)
    assert not (tmp_path / "release").exists()

    write_release(tmp_path / "src", {"train": 3})
    build(tmp_path / "src", tmp_path / "out", RELEASE, QUIET)
    (tmp_path / "full").mkdir()
    (tmp_path / "full/note.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty"):
        export_release(tmp_path / "out", tmp_path / "full", progress=False)
    with pytest.raises(ValueError, match="inside the built folder"):
        export_release(tmp_path / "out", tmp_path / "out/release", progress=False)
    (tmp_path / "out/.build").mkdir()
    with pytest.raises(ValueError, match="unfinished build"):
        export_release(tmp_path / "out", tmp_path / "release", progress=False)
    (tmp_path / "out/.build").rmdir()

    (tmp_path / ".empty.partial").mkdir()  # in the way, and not an export's
    with pytest.raises(FileExistsError, match="not written by one"):
        export_release(tmp_path / "out", tmp_path / "empty", progress=False)
    (tmp_path / ".empty.partial/.export-release-partial").write_text("")  # what a killed export leaves
    (tmp_path / "empty").mkdir()  # an empty folder is fine; nothing is left beside it
    assert export_release(tmp_path / "out", tmp_path / "empty", progress=False)["rows"] == {"train": 3}
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
    assert not (tmp_path / "empty/.export-release-partial").exists()


def test_export_of_a_raw_affectnet_build_with_experts_reads_back_to_the_same_rows(experts, tmp_path):
    write_sample(tmp_path / "raw", SampleConfig(n=30, seed=5, non_emotion_fraction=0.15, min_image_size=128,
                                                max_image_size=224))  # fmt: skip
    experts = planned_manifest(experts, tmp_path / "experts", tmp_path / "raw")  # as if trained on these faces
    build(tmp_path / "raw", tmp_path / "out", AffectNetPlusConfig(), QUIET, experts=str(experts))
    first = _rows(tmp_path / "out")
    assert any(row["subset"] == -1 for row in first.values())  # labels 8-10: no subset, null in the JSON
    _, second = _export_and_rebuild(tmp_path / "out", tmp_path)
    _assert_round_trip(first, second, _id_map(tmp_path / "exported"))
    assert all(row["landmarks_29"] is None and row["head_pose"] is None for row in second.values())
