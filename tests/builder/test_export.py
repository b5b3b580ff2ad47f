import hashlib
import json
import os
import shutil
import struct
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from datasets import Image as ImageFeature
from datasets import load_dataset
from huggingface_hub import DatasetCard
from PIL import Image

from affectnet_plus import AffectNetPlus, AffectNetPlusConfig, select_features
from builder.au import AUModel
from builder.export import AUModelConfig, BuildOptions, build
from builder.softlabel import FusionConfig
from builder.sources import AffectNetPlusReader, AffectNetReader
from core.schema import SUBSETS, config_files, config_pattern
from tests.builder.test_fold_plan import planned_manifest
from tests.conftest import affectnet_row, face_image, write_release_annotation

QUIET = BuildOptions(progress=False)
TOLERANT = BuildOptions(progress=False, max_rejected_fraction=1.0)  # for sources made of bad rows


def _files(out: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file in a built folder."""
    return {
        p.relative_to(out).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(out.rglob("*"))
        if p.is_file()
    }


def test_built_folder_loads_with_declared_features(small_affectnet, tmp_path, monkeypatch):
    out = tmp_path / "site" / "affectnet_plus"
    report = build(small_affectnet, out, AffectNetPlusConfig(), BuildOptions(shard_rows=5, progress=False))
    assert report["read"] == report["written"] == 20 and report["rejected"] == {}
    assert report["configs"]["default"] == {"train": 12, "validation": 4, "unlabeled": 4}
    # no subset column: every row is unassigned, one file per crop shard, with its index and count
    data = ["train/00000-of-00003-unassigned.parquet", "train/00001-of-00003-unassigned.parquet",
            "train/00002-of-00003-unassigned.parquet", "unlabeled/00000-of-00001-unassigned.parquet",
            "validation/00000-of-00001-unassigned.parquet"]  # fmt: skip
    assert _parquet(out, "data") == data and _parquet(out, "labels") == data
    card = DatasetCard.load(out / "README.md")
    assert [c["config_name"] for c in card.data.configs] == ["default", "labels"]
    assert card.data.configs[0]["data_files"][0] == {"split": "train", "path": "data/train/*.parquet"}
    assert card.data.configs[1]["data_files"][0] == {"split": "train", "path": "labels/train/*.parquet"}
    assert not (out / ".build").exists()
    expected = select_features(AffectNetReader.columns)

    monkeypatch.chdir(out.parent)  # a local folder wins over a Hub id: load_dataset("affectnet_plus")
    dataset = load_dataset("affectnet_plus")
    assert {s: len(d) for s, d in dataset.items()} == {"train": 12, "validation": 4, "unlabeled": 4}
    assert dataset["train"].features == expected
    row = dataset["train"][0]
    assert row["image"].size == (224, 224) and row["image"].mode == "RGB"
    assert np.asarray(row["landmarks"]).shape == (68, 2)
    assert row["image_id"] == "Manually_Annotated_Images/0/t0000"

    labels = load_dataset("affectnet_plus", "labels")
    assert "image" not in labels["train"].features
    assert labels["train"]["image_id"] == dataset["train"]["image_id"]

    streamed = load_dataset("affectnet_plus", split="validation", streaming=True)
    assert streamed.features == expected
    assert [r["image_id"] for r in streamed] == dataset["validation"]["image_id"]

    card = (out / "README.md").read_text()
    assert "read = written + rejected: 20 = 20 + 0" in card
    assert "non-commercial academic research" in card


def _parquet(out: Path, top: str) -> list[str]:
    """The Parquet files under ``out/top``, relative to it."""
    return sorted(p.relative_to(out / top).as_posix() for p in (out / top).rglob("*.parquet"))


def _bomb_png(path: Path) -> None:
    def chunk(kind, payload):
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    header = struct.pack(">IIBBBBB", 40000, 40000, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b""))


def test_every_row_is_written_or_rejected_with_its_reason(make_affectnet, tmp_path):
    names = ["ok", "gray", "cmyk", "png", "exif", "missing", "empty", "text", "truncated", "bomb", "ok"]
    rows = [affectnet_row(f"0/{n}.jpg", seed=i) for i, n in enumerate(names)]
    rows.append(affectnet_row("0/nan.jpg", valence=float("nan")))
    rows.append(affectnet_row("0/label.jpg", label=12))
    rows.append(affectnet_row("../outside.jpg"))
    rows.append(affectnet_row("0/copy.jpg"))
    root = make_affectnet({"train": rows, "validation": [affectnet_row("1/v.jpg", valence=-2, arousal=-2)]})
    images = root / "Manually_Annotated_Images/0"
    face_image(300, 280, seed=99).save(root / "Manually_Annotated_Images/1/v.jpg", quality=90)
    (images / "copy.jpg").write_bytes((images / "ok.jpg").read_bytes())  # ok.jpg's bytes under another id
    face_image(300, 280).convert("L").save(images / "gray.jpg")
    face_image(300, 280).convert("CMYK").save(images / "cmyk.jpg")
    face_image(300, 280).save(images / "png.jpg", format="PNG")
    exif = Image.Exif()
    exif[0x0112] = 6
    face_image(280, 300).save(images / "exif.jpg", exif=exif)
    (images / "missing.jpg").unlink()
    (images / "empty.jpg").write_bytes(b"")
    (images / "text.jpg").write_text("not an image")
    data = (images / "ok.jpg").read_bytes()
    (images / "truncated.jpg").write_bytes(data[: len(data) // 3])
    _bomb_png(images / "bomb.jpg")

    out = tmp_path / "out"
    report = build(root, out, AffectNetPlusConfig(), TOLERANT)
    assert report["read"] == 16
    assert report["written"] == 6  # ok, gray, cmyk, png, exif + the validation row
    assert report["rejected"] == {
        "decompression_bomb": 1,
        "duplicate_image": 1,
        "duplicate_image_id": 1,
        "empty_file": 1,
        "label_out_of_range": 1,
        "malformed_row": 1,
        "missing_file": 1,
        "not_an_image": 1,
        "path_escapes_root": 1,
        "truncated_image": 1,
    }
    assert report["read"] == report["written"] + sum(report["rejected"].values())
    rejects = [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]
    assert len(rejects) == 10
    assert {r["row"] for r in rejects} == {7, 8, 9, 10, 11, 12, 13, 14, 15, 16}
    (copy,) = (r for r in rejects if r["reason"] == "duplicate_image")
    assert copy["image_id"] == "Manually_Annotated_Images/0/copy" and copy["detail"] == "Manually_Annotated_Images/0/ok"
    assert all(r["source"] == "Manually_Annotated_file_lists/training.csv" for r in rejects)
    assert json.loads((out / "build_report.json").read_text())["rejected"] == report["rejected"]

    dataset = load_dataset(str(out))
    assert sorted(dataset["train"]["image_id"]) == sorted(f"Manually_Annotated_Images/0/{n}" for n in names[:5])
    assert all(img.mode == "RGB" and img.size == (224, 224) for img in dataset["train"]["image"])
    assert dataset["validation"][0]["valence"] is None  # AffectNet's -2 sentinel is a null


def _release(root: Path, n: int) -> Path:
    rng = np.random.default_rng(0)
    for k, part in enumerate(("human_annotated/train_set", "human_annotated/validation_set")):
        (root / part / "images").mkdir(parents=True)
        for i in range(n):  # other pictures in each part: the same bytes twice would be a duplicate_image
            face_image(224, 224, seed=100 * k + i).save(root / part / "images" / f"{i:03d}.jpg", quality=90)
            soft = rng.dirichlet(np.ones(8))
            write_release_annotation(root / part / "annotations" / f"{i:03d}.json", label=i % 8, soft=soft.tolist(),
                                     subset=i % 3, pose={"yaw": 0.1, "pitch": -0.05, "roll": 0.02})  # fmt: skip
    return root


def test_release_build_keeps_soft_labels_and_writes_subset_configs(tmp_path):
    root = _release(tmp_path / "release", 9)
    out = tmp_path / "out"
    report = build(
        root, out, AffectNetPlusConfig(source_format="affectnet-plus"), BuildOptions(shard_rows=2, progress=False)
    )
    assert set(report["configs"]) == {"default", "labels", "easy", "challenging", "difficult"}
    assert report["configs"]["easy"] == {"train": 3, "validation": 3}

    reader = AffectNetPlusReader(root, AffectNetPlusConfig(source_format="affectnet-plus"))
    full = load_dataset(str(out), split="train")
    assert full.features == select_features(AffectNetPlusReader.columns, reader.ethnicity_classes)
    original = json.loads((root / "human_annotated/train_set/annotations/004.json").read_text())
    (row,) = (r for r in full if r["image_id"].endswith("/004"))
    assert row["soft_label"] == pytest.approx(original["soft-label"], abs=1e-6)
    assert row["subset"] == original["subset"]
    assert row["image"].size == (224, 224)
    # 224 px JPEGs are stored byte for byte, not re-encoded
    stored = full.cast_column("image", ImageFeature(decode=False))
    (image,) = (r["image"] for r in stored if r["image_id"].endswith("/004"))
    assert image["bytes"] == (root / "human_annotated/train_set/images/004.jpg").read_bytes()

    easy = load_dataset(str(out), "easy")
    assert set(easy["train"]["subset"]) == {0} and len(easy["train"]) == 3
    # 9 rows a split, 2 a crop shard, subsets 0, 1, 2, 0, ...: the easy rows 0, 3, 6 lie in crop shards 0, 1 and 3
    assert [p for p in _parquet(out, "data") if "easy" in p] == [
        f"{split}/{i:05d}-of-00005-easy.parquet" for split in ("train", "validation") for i in (0, 1, 3)
    ]
    assert _parquet(out, "labels") == _parquet(out, "data") and len(_parquet(out, "data")) == 2 * 9
    assert "easy = load_dataset" in (out / "README.md").read_text()


def test_parallel_build_is_byte_identical(small_affectnet, tmp_path):
    one = tmp_path / "one" / "affectnet_plus"
    two = tmp_path / "two" / "affectnet_plus"
    build(small_affectnet, one, AffectNetPlusConfig(), BuildOptions(shard_rows=3, progress=False))
    build(small_affectnet, two, AffectNetPlusConfig(), BuildOptions(shard_rows=3, num_proc=2, progress=False))
    assert _files(one) == _files(two)


def test_output_folder_rules(small_affectnet, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not an AffectNet\\+ build"):
        build(small_affectnet, out, AffectNetPlusConfig(), QUIET)
    # --overwrite deletes only what a build wrote: anything else is refused, and left alone
    with pytest.raises(FileExistsError, match="--overwrite deletes only a folder that a build wrote"):
        build(small_affectnet, out, AffectNetPlusConfig(), BuildOptions(overwrite=True, progress=False))
    assert (out / "notes.txt").read_text() == "mine"
    (out / "notes.txt").unlink()
    build(small_affectnet, out, AffectNetPlusConfig(), QUIET)  # an empty folder is fine
    first = _files(out)
    assert "build_config.json" in first and not (out / ".build").exists()
    build(small_affectnet, out, AffectNetPlusConfig(), QUIET)  # same arguments: same bytes
    assert _files(out) == first
    with pytest.raises(FileExistsError, match="different build"):
        build(small_affectnet, out, AffectNetPlusConfig(face_size=112), QUIET)
    (out / "mine.txt").write_text("a file of mine in a finished build")
    build(small_affectnet, out, AffectNetPlusConfig(face_size=112), BuildOptions(overwrite=True, progress=False))
    assert not (out / "mine.txt").exists() and json.loads((out / "build_report.json").read_text())[
        "fingerprint"]["face_size"] == 112  # fmt: skip
    with pytest.raises(FileExistsError, match="is a file"):
        build(small_affectnet, out / "README.md", AffectNetPlusConfig(), BuildOptions(overwrite=True, progress=False))


def test_generator_based_builder_is_usable_directly(small_affectnet, tmp_path):
    builder = AffectNetPlus(data_dir=str(small_affectnet), cache_dir=str(tmp_path / "cache"))
    builder.download_and_prepare()
    dataset = builder.as_dataset()
    assert {s: len(d) for s, d in dataset.items()} == {"train": 12, "validation": 4, "unlabeled": 4}
    assert dataset["train"].features == select_features(AffectNetReader.columns)
    (Path(small_affectnet) / "Manually_Annotated_Images/0/t0000.jpg").write_bytes(b"")
    rebuilt = AffectNetPlus(data_dir=str(small_affectnet), cache_dir=str(tmp_path / "cache2"))
    rebuilt.download_and_prepare()
    assert len(rebuilt.as_dataset(split="train")) == 11
    assert [r.reason for r in rebuilt.rejections] == ["empty_file"]


def test_cli_build_reports_and_errors(small_affectnet, tmp_path, capsys, monkeypatch):
    from scripts.cli import main

    out = tmp_path / "first" / "o"
    options = ["--quiet", "--no-metadata", "--shard-rows", "7", "--face-size", "112", "--jpeg-quality", "90"]
    assert main(["build", str(small_affectnet), "--out", str(out), *options]) == 0
    assert "read 20, written 20, rejected 0" in capsys.readouterr().out
    assert main(["build", str(tmp_path / "nowhere"), "--out", str(tmp_path / "p"), "--quiet"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert os.path.exists(out / "README.md")
    # the resolved config repeats the build (it holds no absolute path); options given override it
    saved = json.loads((out / "build_config.json").read_text())
    assert saved["options"] == {"shard_rows": 7} and saved["source"]["face_size"] == 112
    assert "/" + tmp_path.name not in (out / "build_config.json").read_text()
    again = tmp_path / "again" / "o"
    assert main(["build", str(small_affectnet), "--config", str(out / "build_config.json"), "--out", str(again)]) == 0
    assert _files(again) == _files(out)
    other = tmp_path / "other" / "o"
    assert main(["build", str(small_affectnet), "--config", str(out / "build_config.json"), "--out", str(other),
                 "--shard-rows", "20", "--quiet"]) == 0  # fmt: skip
    assert json.loads((other / "build_config.json").read_text())["options"] == {"shard_rows": 20}
    (tmp_path / "bad.json").write_text(json.dumps({"shard_rowz": 3}))
    with pytest.raises(SystemExit):
        main(["build", str(small_affectnet), "--config", str(tmp_path / "bad.json"), "--out", str(tmp_path / "b")])
    assert "unknown options shard_rowz" in capsys.readouterr().err


def test_build_with_experts_adds_soft_labels_and_subsets(built_sample, experts, tmp_path):
    from builder.softlabel import validate

    raw = built_sample.parent / "raw"
    out = tmp_path / "affectnet_plus"
    report = build(raw, out, AffectNetPlusConfig(), BuildOptions(shard_rows=40, progress=False), experts=str(experts))
    present = [name for name in ("easy", "challenging", "difficult") if name in report["configs"]]
    assert present and "labels" in report["configs"]
    assert report["soft_labels_without_landmarks"] == {"train": 0, "validation": 0, "unlabeled": 0}
    full = load_dataset(str(out), split="train")
    for column in ("soft_label", "subset", "expert_probs", "au_scores"):
        assert column in full.features
    soft = np.asarray(full["soft_label"], dtype=np.float64)
    validate(soft)
    human = np.asarray(full["human_label"])
    subset = np.asarray(full["subset"])
    assert (subset[human >= 8] == -1).all() and set(subset[human < 8]) <= {0, 1, 2}
    for code, name in enumerate(("easy", "challenging", "difficult")):
        if name in present:
            rows = load_dataset(str(out), name)
            assert {s for split in rows.values() for s in split["subset"]} == {code}
            assert sum(len(split) for split in rows.values()) == sum(report["configs"][name].values())
    assert sum(sum(report["configs"][n].values()) for n in present) == int((subset >= 0).sum()) + sum(
        int((np.asarray(load_dataset(str(out), split=s)["subset"]) >= 0).sum()) for s in ("validation", "unlabeled")
    )
    card = (out / "README.md").read_text()
    assert "λ (expert weight)" in card and "rows without landmarks (experts only) | 0" in card
    probs = np.asarray(full["expert_probs"])  # raw one-vs-rest probabilities: each in [0, 1], not a distribution
    assert ((probs >= 0) & (probs <= 1)).all() and not np.allclose(probs.sum(1), 1, atol=1e-3)
    # the same arguments again: the same bytes
    first = _files(out)
    build(raw, out, AffectNetPlusConfig(), BuildOptions(shard_rows=40, progress=False), experts=str(experts))
    assert _files(out) == first


def test_degenerate_landmarks_get_null_au_scores_a_note_and_a_count(make_affectnet, experts, tmp_path):
    rows = [affectnet_row(f"0/{i:02d}.jpg", label=i % 8, seed=i) for i in range(12)]
    rows[3][5] = ";".join(["120.00"] * 136)  # all 68 points equal: no camera can be fitted
    rows[7][5] = ";".join(f"{60 + i:.2f};{50 + 2 * i:.2f}" for i in range(68))  # all on one line
    root = make_affectnet({"train": rows, "validation": [affectnet_row("1/v.jpg", seed=20)]})
    face_image(300, 280, seed=20).save(root / "Manually_Annotated_Images/1/v.jpg", quality=90)  # not a train image
    experts = planned_manifest(experts, tmp_path / "experts", root)  # as if trained on this source
    out = tmp_path / "out"
    report = build(root, out, AffectNetPlusConfig(), QUIET, experts=str(experts), fusion=FusionConfig(fit=True),
                   au_model=AUModelConfig(shape_components=1, calibrate_au=True))  # fmt: skip
    assert report["degenerate_landmarks"] == {"train": 2, "validation": 0}
    assert report["soft_labels_without_landmarks"] == {"train": 2, "validation": 0}
    assert report["metadata_notes"]["null"] == {"au_scores": {"degenerate_landmarks": 2}}
    train = load_dataset(str(out), split="train")
    bad = {r["image_id"] for r in train if r["au_scores"] is None}
    assert bad == {"Manually_Annotated_Images/0/03", "Manually_Annotated_Images/0/07"}
    for row in train:  # the experts alone make the soft label of those rows
        if row["image_id"] in bad:
            np.testing.assert_allclose(row["soft_label"], row["expert_probs"], atol=1e-6)
    notes = [json.loads(line) for line in (out / "metadata_notes.jsonl").read_text().splitlines()]
    assert {n["image_id"] for n in notes} == bad and all(n["reasons"] == {"au_scores": "degenerate_landmarks"}
                                                         for n in notes)  # fmt: skip
    assert "of which degenerate landmarks (`metadata_notes.jsonl`) | 2" in (out / "README.md").read_text()


def test_imagefolder_build_with_experts_falls_back_to_experts_only(experts, tmp_path):
    root = tmp_path / "fer"
    for k, (split, emotion) in enumerate((s, e) for s in ("train", "validation") for e in ("happy", "sad")):
        (root / split / emotion).mkdir(parents=True)
        for i in range(3):  # 12 pictures: the same bytes twice would be a duplicate_image
            face_image(64, 64, seed=10 * k + i).save(root / split / emotion / f"{i}.jpg")
    config = AffectNetPlusConfig(source_format="imagefolder")
    experts = planned_manifest(experts, tmp_path / "experts", root, config)  # as if trained on this folder
    out = tmp_path / "fer_plus"
    report = build(root, out, config, QUIET, experts=str(experts))
    assert report["soft_labels_without_landmarks"] == {"train": 6, "validation": 6}
    rows = load_dataset(str(out), split="train")
    assert all(a is None for a in rows["au_scores"])
    np.testing.assert_allclose(np.asarray(rows["soft_label"]), np.asarray(rows["expert_probs"]), atol=1e-6)


def test_fitted_fusion_uses_train_labels_and_beats_smoothing_on_the_sample(built_sample, experts, tmp_path, capsys):
    """λ fitted on the train rows; the truth check's own numbers are tested in test_truth.py."""
    from builder.truth import truth_check
    from scripts.cli import main as cli

    raw = built_sample.parent / "raw"
    out = tmp_path / "affectnet_plus"
    report = build(raw, out, AffectNetPlusConfig(), QUIET, experts=str(experts), fusion=FusionConfig(fit=True))
    # λ is fitted on the train rows' labels only (out-of-fold scores), never the validation rows'
    train = load_dataset(str(out), "labels", split="train")
    assert report["fusion"]["fitted_on"] == {**report["fusion"]["fitted_on"], "split": "train",
                                             "rows": sum(h < 8 for h in train["human_label"])}  # fmt: skip
    saved = json.loads((out / "fusion.json").read_text())  # what predict --dataset reads
    assert saved["expert_weight"] == report["fusion"]["expert_weight"]
    assert "fitted: the λ under which" in (out / "README.md").read_text()
    result = truth_check(out, raw / "ground_truth.jsonl")
    labelled = [r for r in map(json.loads, (raw / "ground_truth.jsonl").read_text().splitlines())
                if r["split"] != "unlabeled" and r["soft_label"] is not None and r["human_label"] < 8]  # fmt: skip
    assert result["rows"] == len(labelled)
    assert result["au"]["argmax_agreement"] > 0.3  # landmarks carry the expression (chance: 1/8)
    # the fitted sharpness brings the fused labels closer to the truth than label smoothing does
    assert result["fused"]["kl"] < result["annotator_smoothed"]["kl"]
    assert (
        cli(["truth", str(out), "--ground-truth", str(raw / "ground_truth.jsonl"), "--json", str(tmp_path / "t.json")])
        == 0
    )
    assert "(c) fused soft label" in capsys.readouterr().out
    assert json.loads((tmp_path / "t.json").read_text()) == result
    with pytest.raises(ValueError, match="--experts"):
        truth_check(built_sample, raw / "ground_truth.jsonl")


@pytest.mark.slow
def test_soft_labels_denoise_the_annotators_on_the_sample(experts, tmp_path):
    """The truth check (docs/method.md §7) on 600 rendered faces, with the calibrated AU component: the fused
    soft label beats experts, AU and label smoothing on KL, its argmax finds the true dominant emotion more often than
    the annotators do, and the subsets single out the rows whose label is wrong. (The tiny experts of the
    fixture know nothing: the landmarks carry the signal here.)"""
    from builder.sample import SampleConfig, write_sample
    from builder.truth import truth_check

    raw = tmp_path / "raw"
    write_sample(raw, SampleConfig(n=600, seed=5, min_image_size=128, max_image_size=224))
    experts = planned_manifest(experts, tmp_path / "experts", raw)  # as if trained on these faces
    out = tmp_path / "affectnet_plus"
    report = build(raw, out, AffectNetPlusConfig(), BuildOptions(progress=False, num_proc=2), experts=str(experts),
                   fusion=FusionConfig(fit=True), au_model=AUModelConfig(calibrate_au=True))  # fmt: skip
    au_model = report["fusion"]["au_model"]
    assert au_model["shape_model"]["components"] == 24 and au_model["calibration"]["num_folds"] == 2
    card = (out / "README.md").read_text()
    assert "24 modes fitted on" in card and "one-vs-rest logistic regressions" in card
    saved = AUModel.from_json(json.loads((out / "au_model.json").read_text()))  # what predict --au-model reads
    assert saved.shape is not None and saved.calibration is not None and saved.info == au_model
    result = truth_check(out, raw / "ground_truth.jsonl")
    assert result["rows"] > 400 and 0.6 <= result["annotator_agreement"] <= 0.75
    for other in ("experts", "au", "annotator_smoothed"):
        assert result["fused"]["kl"] < result[other]["kl"], other
    assert result["fused"]["argmax_agreement"] > result["annotator_agreement"]
    assert result["hard_share_label_wrong"] > result["hard_share_label_right"] + 0.3


def test_release_soft_labels_are_replaced_only_when_asked(experts, tmp_path):
    root = _release(tmp_path / "release", 4)
    config = AffectNetPlusConfig(source_format="affectnet-plus")
    experts = planned_manifest(experts, tmp_path / "experts", root, config)  # as if trained on a build of it
    with pytest.raises(ValueError, match="--recompute"):
        build(root, tmp_path / "kept", config, QUIET, experts=str(experts))
    out = tmp_path / "recomputed"
    build(root, out, config, QUIET, experts=str(experts), recompute="soft-labels")
    original = json.loads((root / "human_annotated/train_set/annotations/001.json").read_text())["soft-label"]
    (row,) = (r for r in load_dataset(str(out), split="train") if r["image_id"].endswith("/001"))
    assert row["expert_probs"] is not None
    assert not np.allclose(row["soft_label"], original, atol=1e-3)


def test_rebuilding_a_finished_folder_redoes_derived_files(small_affectnet, tmp_path):
    out = tmp_path / "out"
    build(small_affectnet, out, AffectNetPlusConfig(), QUIET)
    first = _files(out)
    stale = config_files(out, "labels", "train")[0]
    stale.write_bytes(b"left over from an older version")
    build(small_affectnet, out, AffectNetPlusConfig(), QUIET)
    assert _files(out) == first


def _photo_folder(root: Path) -> dict[str, str]:
    """An image folder of public-domain photos and bad inputs; returns file stem -> what it is."""
    import matplotlib
    from skimage import data

    folder = root / "train" / "happy"
    folder.mkdir(parents=True)
    astronaut = Image.fromarray(data.astronaut())
    hopper = Image.open(Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg").convert("RGB")
    astronaut.save(folder / "astronaut.jpg")
    hopper.save(folder / "hopper.jpg")
    pair = Image.new("RGB", (1024, 600))
    pair.paste(astronaut.resize((400, 400)), (0, 100))
    pair.paste(hopper.resize((600, 600)), (424, 0))
    pair.save(folder / "two_faces.jpg")
    non_face = data.lfw_subset()[150]  # the second half of the subset are non-face patches
    Image.fromarray((non_face * 255).astype(np.uint8)).resize((200, 200)).save(folder / "non_face.jpg")
    astronaut.resize((24, 24)).save(folder / "tiny.jpg")
    (folder / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    return {"astronaut": "face", "hopper": "face", "two_faces": "face", "non_face": "no_face",
            "tiny": "too_small", "corrupt": "unreadable_file"}  # fmt: skip


def test_image_folder_build_estimates_metadata_and_rejects_what_has_no_face(tmp_path, needs_gear):
    kinds = _photo_folder(tmp_path / "photos")
    out = tmp_path / "built"
    config = AffectNetPlusConfig(source_format="imagefolder", detect_faces=True)
    report = build(tmp_path / "photos", out, config, TOLERANT, metadata=True)
    rejected = {json.loads(line)["image_id"].split("/")[-1]: json.loads(line)["reason"]
                for line in (out / "rejects.jsonl").read_text().splitlines()}  # fmt: skip
    assert rejected == {stem: kind for stem, kind in kinds.items() if kind != "face"}
    assert report["read"] == report["written"] + sum(report["rejected"].values()) == len(kinds)
    rows = {r["image_id"].split("/")[-1]: r for r in load_dataset(str(out), split="train")}
    assert sorted(rows) == ["astronaut", "hopper", "two_faces"]
    for row in rows.values():
        points = np.asarray(row["landmarks"])
        assert points.shape == (68, 2) and ((points > 0) & (points < 224)).all()
        eyes, nose, mouth = points[36:48, 1].mean(), points[30, 1], points[48:68, 1].mean()
        assert eyes < nose < mouth
        assert set(row["head_pose"]) == {"yaw", "pitch", "roll"} and all(abs(v) < 60 for v in row["head_pose"].values())
        assert 0 <= row["age"] <= 100
        assert abs(sum(row["gender"].values()) - 1) < 1e-4 and abs(sum(row["ethnicity"].values()) - 1) < 1e-4
    notes = [json.loads(line) for line in (out / "metadata_notes.jsonl").read_text().splitlines()]
    several = [n["image_id"].split("/")[-1] for n in notes if n.get("info", {}).get("faces_detected", 0) > 1]
    assert "two_faces" in several and report["metadata_notes"]["several_faces"] == len(several)
    card = (out / "README.md").read_text()
    assert "dlib HOG detector" in card and f"{len(several)} images showed several faces" in card


def test_metadata_keeps_the_sources_landmarks_and_resumes(small_affectnet, tmp_path, needs_gear):
    plain = tmp_path / "plain"
    build(small_affectnet, plain, AffectNetPlusConfig(), QUIET)
    out = tmp_path / "annotated"
    build(small_affectnet, out, AffectNetPlusConfig(), QUIET, metadata=True)
    before = load_dataset(str(plain), split="train")
    after = load_dataset(str(out), split="train")
    assert after["landmarks"] == before["landmarks"]
    assert {"head_pose", "age", "gender", "ethnicity"} <= set(after.features) - set(before.features)
    report = json.loads((out / "build_report.json").read_text())
    assert set(report["fingerprint"]["metadata"]) == {"head_pose", "age_gender", "ethnicity"}
    first = _files(out)
    build(small_affectnet, out, AffectNetPlusConfig(), QUIET, metadata=True)  # same arguments: same bytes
    assert _files(out) == first


def test_report_plots_soft_labels_subsets_and_metadata(built_sample, experts, tmp_path):
    from scripts.cli import main as cli

    out = tmp_path / "affectnet_plus"
    build(built_sample.parent / "raw", out, AffectNetPlusConfig(), QUIET, experts=str(experts))
    assert cli(["report", str(out), "--out", str(tmp_path / "report")]) == 0
    page = (tmp_path / "report" / "report.md").read_text()
    for plot in ("soft_label_per_human_label.png", "subsets_per_emotion.png", "soft_label_entropy.png",
                 "examples_per_subset.png"):  # fmt: skip
        assert f"]({plot})" in page
        with Image.open(tmp_path / "report" / plot) as image:
            assert image.size[0] > 300 and len(np.unique(np.asarray(image.convert("L")))) > 20  # a drawing, not a blank
    assert "The soft label's top emotion is the human label on" in page
    # a folder without soft labels gets the metadata-free, soft-label-free page, not an error
    assert cli(["report", str(built_sample), "--out", str(tmp_path / "plain")]) == 0
    assert "no soft labels" in (tmp_path / "plain" / "report.md").read_text()


def test_a_build_that_rejects_too_much_or_writes_nothing_fails_and_keeps_its_output(make_affectnet, tmp_path, capsys):
    from builder.export import TooManyRejections
    from scripts.cli import main as cli

    rows = [affectnet_row(f"0/{i}.jpg", label=i % 8, seed=i) for i in range(10)]
    root = make_affectnet({"train": rows})
    (root / "Manually_Annotated_Images" / "0" / "3.jpg").unlink()  # 1 of 10 rejected: 10% > 5%
    with pytest.raises(TooManyRejections, match=r"train: 1 of 10 rows rejected \(10.0% > 5.0%"):
        build(root, tmp_path / "strict", AffectNetPlusConfig(), QUIET)
    # the folder is finished and kept for inspection
    assert json.loads((tmp_path / "strict" / "build_report.json").read_text())["rejected"] == {"missing_file": 1}
    assert len((tmp_path / "strict" / "rejects.jsonl").read_text().splitlines()) == 1
    # a threshold above the share passes (negative control)
    ok = build(root, tmp_path / "lenient", AffectNetPlusConfig(), BuildOptions(progress=False, max_rejected_fraction=0.1))
    assert ok["written"] == 9
    # the command line prints the summary and exits non-zero
    assert cli(["build", str(root), "--out", str(tmp_path / "cli"), "--no-metadata", "--quiet"]) == 1
    captured = capsys.readouterr()
    assert "read 10, written 9, rejected 1" in captured.out and "--max-rejected-fraction" in captured.err
    # nothing written at all fails whatever the threshold
    for i in range(10):
        (root / "Manually_Annotated_Images" / "0" / f"{i}.jpg").unlink(missing_ok=True)
    with pytest.raises(TooManyRejections, match="no row was written"):
        build(root, tmp_path / "empty", AffectNetPlusConfig(), TOLERANT)


@pytest.fixture(scope="module")
def partitioned(tmp_path_factory):
    """200 faces of the bundled sample in the release layout, built in crop shards of 100 rows: every row
    has a subset, all three subsets are present."""
    from builder.sample import SampleConfig, write_sample

    root = tmp_path_factory.mktemp("partitioned")
    # quality 95: face crops about the size of AffectNet+'s own 224 px JPEGs
    write_sample(root / "raw", SampleConfig(n=200, seed=0, layout="affectnet-plus", jpeg_quality=(95, 95)))
    out = root / "affectnet_plus"
    config = AffectNetPlusConfig(source_format="affectnet-plus")  # the release's poses are in radians
    report = build(root / "raw", out, config, BuildOptions(shard_rows=100, progress=False))
    assert all(report["configs"].get(name) for name in SUBSETS)
    return out


def _stored_rows(dataset) -> list[dict]:
    """Every column, images as their stored bytes (decoded images do not compare)."""
    if "image" in dataset.column_names:
        dataset = dataset.cast_column("image", ImageFeature(decode=False))
    return dataset.to_list()


def test_each_image_is_stored_once(partitioned):
    data = sorted(partitioned.glob("data/*/*.parquet"))
    labels = sorted(partitioned.glob("labels/*/*.parquet"))
    assert sorted(partitioned.rglob("*.parquet")) == sorted(data + labels)  # no copy anywhere else
    ids, image_bytes, subset_image_bytes = Counter(), 0, 0
    for path in data:
        table = pq.read_table(path, columns=["image_id", "image", "subset"])
        ids.update(table["image_id"].to_pylist())
        sizes = [len(image["bytes"]) for image in table["image"].to_pylist()]
        image_bytes += sum(sizes)
        subset_image_bytes += sum(n for n, code in zip(sizes, table["subset"].to_pylist()) if code in (0, 1, 2))
    assert max(ids.values()) == 1  # no image_id in two data/ files
    assert sum(ids.values()) == json.loads((partitioned / "build_report.json").read_text())["written"] == 200
    assert all("image" not in pq.read_schema(p).names for p in labels)
    on_disk = sum(p.stat().st_size for p in data + labels)
    assert on_disk < 1.3 * image_bytes
    # Negative control: a layout that copies the subset rows stores their images a second time, which alone
    # breaks the bound (here every row has a subset).
    assert subset_image_bytes == image_bytes and on_disk + subset_image_bytes > 1.3 * image_bytes


def test_subset_and_labels_configs_select_the_default_rows(partitioned):
    report = json.loads((partitioned / "build_report.json").read_text())
    default = load_dataset(str(partitioned))
    rows = {split: _stored_rows(d) for split, d in default.items()}
    for code, name in enumerate(SUBSETS):
        subset = load_dataset(str(partitioned), name)
        want = {split: [r for r in split_rows if r["subset"] == code] for split, split_rows in rows.items()}
        assert {s: _stored_rows(d) for s, d in subset.items()} == {s: r for s, r in want.items() if r}, name
        assert {s: len(d) for s, d in subset.items()} == report["configs"][name]
    labels = load_dataset(str(partitioned), "labels")
    assert set(labels) == set(default)
    for split in default:  # the same rows in the same order, without the image
        assert labels[split].to_list() == default[split].remove_columns("image").to_list()
    # dataset_info: per config, its files' rows and sizes
    card = DatasetCard.load(partitioned / "README.md")
    for info in card.data.dataset_info:
        config = info["config_name"]
        files = {s["name"]: config_files(partitioned, config, s["name"]) for s in info["splits"]}
        assert {s["name"]: s["num_examples"] for s in info["splits"]} == report["configs"][config]
        assert info["download_size"] == sum(p.stat().st_size for paths in files.values() for p in paths)
    sizes = {i["config_name"]: i["download_size"] for i in card.data.dataset_info}
    assert sum(sizes[name] for name in SUBSETS) == sizes["default"]  # no unassigned rows in a release
    assert {c["config_name"]: c["data_files"][0]["path"] for c in card.data.configs} == {
        config: config_pattern(config, "train") for config in ("default", "labels", *SUBSETS)
    }


def test_every_config_streams(partitioned):
    for config in ("default", "labels", *SUBSETS):
        for split, rows in load_dataset(str(partitioned), config).items():
            streamed = load_dataset(str(partitioned), config, split=split, streaming=True)
            assert streamed.features == rows.features
            assert [r["image_id"] for r in streamed] == rows["image_id"], (config, split)


def test_load_splits_reads_a_build_finished_or_in_progress(partitioned, tmp_path):
    from models.data import load_splits

    columns = ("image_id", "image", "subset")
    finished = load_splits(partitioned, columns)
    running = tmp_path / "running"  # an unfinished build: a work folder, no card yet
    shutil.copytree(partitioned, running)
    (running / ".build").mkdir()
    (running / "README.md").unlink()
    read = load_splits(running, columns)
    assert list(read) == ["train", "validation", "unlabeled"]
    for split, rows in finished.items():
        assert read[split]["image_id"] == rows["image_id"] and read[split][0]["image"] == rows[0]["image"]


def test_rows_are_partitioned_by_subset_in_their_order():
    import pyarrow as pa

    from builder.stage_export import partition_file, partitions

    table = pa.table({"image_id": list("abcdefg"), "subset": pa.array([0, -1, 2, None, 1, 0, 2], pa.int64())})
    got = {name: rows["image_id"].to_pylist() for name, rows in partitions(table)}
    assert got == {"easy": ["a", "f"], "challenging": ["e"], "difficult": ["c", "g"], "unassigned": ["b", "d"]}
    assert [name for name, _ in partitions(table.slice(0, 1))] == ["easy"]  # empty partitions get no file
    assert partitions(table.slice(0, 0)) == []
    assert [name for name, _ in partitions(table.drop_columns(["subset"]))] == ["unassigned"]
    assert partition_file("unlabeled-00003-of-00012.parquet", "easy") == ("unlabeled", "00003-of-00012-easy.parquet")
