"""`build --recompute`: the release's own labels kept beside the build's, and their agreement reported."""

import json

import numpy as np
import pytest
from datasets import load_dataset

from builder.export import BuildOptions, build
from builder.report import release_agreement, write_report
from builder.softlabel import SubsetConfig
from core.schema import AffectNetPlusConfig
from tests.builder.release_fixture import write_release
from tests.builder.test_fold_plan import planned_manifest

RELEASE = AffectNetPlusConfig(source_format="affectnet-plus")
QUIET = BuildOptions(progress=False)


def _rows(out, split="train"):
    rows = load_dataset(str(out), split=split)
    return {row["image_id"]: row for row in rows}


@pytest.mark.slow
def test_recomputed_subsets_reproduce_the_release_and_keep_its_own(tmp_path):
    release = write_release(tmp_path / "release", {"train": 60, "validation": 20})
    out = tmp_path / "subsets"
    report = build(tmp_path / "release", out, RELEASE, QUIET, recompute="subsets")
    assert report["written"] == 80
    rows = {**_rows(out), **_rows(out, "validation")}
    emotion_rows = 0
    for image_id, truth in release.items():
        row = rows[image_id]
        given = truth["annotation"]
        # the release's soft labels are kept exactly (float32 of the JSON numbers, not renormalised)
        assert row["soft_label"] == np.float32(given["soft-label"]).tolist()
        if given["human-label"] < 8:
            emotion_rows += 1
            assert row["subset"] == row["release_subset"] == given["subset"], image_id
        else:
            assert row["subset"] == -1
    assert emotion_rows > 50
    card = (out / "README.md").read_text()
    assert "recomputed from them" in card and "r >= 4" in card and "`release_subset`" in card
    # The agreement report: complete agreement under the release's rule.
    write_report(out, tmp_path / "report")
    agreement = json.loads((tmp_path / "report" / "release_agreement.json").read_text())
    assert agreement["subset_agreement"] == 1.0 and agreement["subset_rows"] == emotion_rows
    assert "Agreement with the release's labels" in (tmp_path / "report" / "report.md").read_text()

    # A negative control: another rule disagrees with the release on some rows, and the report says so.
    other = tmp_path / "rank3"
    build(tmp_path / "release", other, RELEASE, QUIET, recompute="subsets",
          subsets=SubsetConfig(difficult_min_rank=3))  # fmt: skip
    moved = [r for r in _rows(other).values() if r["human_label"] < 8 and r["subset"] != r["release_subset"]]
    assert moved and all(r["release_subset"] == 1 and r["subset"] == 2 for r in moved)  # rank 3: now difficult
    write_report(other, tmp_path / "report3")
    assert json.loads((tmp_path / "report3" / "release_agreement.json").read_text())["subset_agreement"] < 1.0


@pytest.mark.slow
def test_recomputed_soft_labels_keep_the_release_ones(experts, tmp_path):
    release = write_release(tmp_path / "release", {"train": 40, "validation": 12})
    experts = planned_manifest(experts, tmp_path / "experts", tmp_path / "release", RELEASE)  # trained on a build of it
    with pytest.raises(ValueError, match="--recompute soft-labels"):
        build(tmp_path / "release", tmp_path / "refused", RELEASE, QUIET, experts=str(experts))
    with pytest.raises(ValueError, match="pass --experts too"):
        build(tmp_path / "release", tmp_path / "refused", RELEASE, QUIET, recompute="soft-labels")
    out = tmp_path / "recomputed"
    build(tmp_path / "release", out, RELEASE, QUIET, experts=str(experts), recompute="soft-labels")
    rows = _rows(out)
    for image_id, row in rows.items():
        given = release[image_id]["annotation"]
        assert row["release_soft_label"] == np.float32(given["soft-label"]).tolist()
        assert row["release_subset"] == given["subset"] or (given["subset"] is None and row["release_subset"] == -1)
        assert row["soft_label"] != row["release_soft_label"]  # the build's own, from experts and AUs
        assert all(0 <= v <= 1 for v in row["soft_label"])
    card = (out / "README.md").read_text()
    assert "`release_soft_label`" in card
    columns = {c: [r[c] for r in rows.values()] for c in ("human_label", "soft_label", "release_soft_label",
                                                           "subset", "release_subset")}  # fmt: skip
    agreement = release_agreement(columns)
    assert set(agreement["correlation"]) >= {"neutral", "happy", "contempt"}
    assert 0 <= agreement["argmax_agreement"] <= 1 and agreement["rows"] > 30
    # The agreement measure can fail: the release against itself agrees completely, a shuffle does not.
    itself = release_agreement({**columns, "soft_label": columns["release_soft_label"],
                                "subset": columns["release_subset"]})  # fmt: skip
    assert itself["argmax_agreement"] == 1.0 and itself["subset_agreement"] == 1.0
    assert all(v == pytest.approx(1.0) for v in itself["correlation"].values())
    shuffled = release_agreement({**columns, "soft_label": columns["release_soft_label"][::-1]})
    assert shuffled["argmax_agreement"] < 0.6
