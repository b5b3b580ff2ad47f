import csv
import json
import os

import numpy as np
import pytest

from affectnet_plus import AffectNetPlusConfig
from builder.sources import Record, Rejection, open_source
from core.schema import RELEASE_ETHNICITY_CLASSES
from tests.builder.release_fixture import damage, write_release
from tests.conftest import affectnet_row, face_image


def _items(reader, split):
    items = list(reader.records(split))
    return [i for i in items if isinstance(i, Record)], [i for i in items if isinstance(i, Rejection)]


def test_affectnet_reader_reads_all_parts(small_affectnet):
    reader = open_source(small_affectnet, AffectNetPlusConfig(source_format="affectnet"))
    assert reader.splits() == ["train", "validation", "unlabeled"]
    records, rejections = _items(reader, "train")
    assert len(records) == 12 and not rejections
    first = records[0]
    assert first.image_id == "Manually_Annotated_Images/0/t0000"
    assert first.origin == "Manually_Annotated_file_lists/training.csv" and first.row == 2
    assert first.face_box == (60.0, 50.0, 150.0, 160.0)
    assert first.annotations["landmarks"].shape == (68, 2)
    assert first.annotations["human_label"] == 0 and first.annotations["valence"] == 0.5
    unlabeled, _ = _items(reader, "unlabeled")
    assert unlabeled[0].image_id.startswith("Automatically_Annotated_Images/")


def test_affectnet_csv_without_header_and_sentinel(make_affectnet):
    root = make_affectnet({"validation": [affectnet_row("1/a.jpg", label=10, valence=-2, arousal=-2)]}, header=False)
    reader = open_source(root, AffectNetPlusConfig())
    (record,), rejections = _items(reader, "validation")
    assert not rejections
    assert record.row == 1
    assert record.annotations["valence"] is None and record.annotations["arousal"] is None
    assert record.annotations["human_label"] == 10


def _reasons(rejections):
    return [r.reason for r in rejections]


def test_affectnet_malformed_rows_are_rejected_with_reasons(make_affectnet, tmp_path):
    good = affectnet_row("0/good.jpg")
    short_landmarks = affectnet_row("0/a.jpg")
    short_landmarks[5] = ";".join(["1.0"] * 134)
    nan_landmarks = affectnet_row("0/b.jpg")
    nan_landmarks[5] = ";".join(["nan"] * 136)
    text_box = affectnet_row("0/c.jpg")
    text_box[1] = "left"
    rows = [
        good,
        short_landmarks,
        nan_landmarks,
        text_box,
        affectnet_row("0/d.jpg", label=11),
        affectnet_row("0/e.jpg", label=-1),
        affectnet_row("0/f.jpg", valence=1.5),
        affectnet_row("0/g.jpg", arousal=-1.01),
        affectnet_row("../../../etc/passwd"),
        affectnet_row("/etc/passwd"),
        good[:5],
        [],
    ]
    root = make_affectnet({"train": rows})
    reader = open_source(root, AffectNetPlusConfig())
    records, rejections = _items(reader, "train")
    assert [r.image_id for r in records] == ["Manually_Annotated_Images/0/good"]
    assert _reasons(rejections) == [
        "malformed_row",
        "malformed_row",
        "malformed_row",
        "label_out_of_range",
        "label_out_of_range",
        "valence_arousal_out_of_range",
        "valence_arousal_out_of_range",
        "path_escapes_root",
        "path_escapes_root",
        "malformed_row",
        "malformed_row",
    ]
    assert [r.row for r in rejections] == list(range(3, 14))


def test_symlink_out_of_the_source_is_rejected(make_affectnet, tmp_path):
    outside = tmp_path / "secret.jpg"
    face_image(100, 100).save(outside)
    root = make_affectnet({"train": [affectnet_row("0/link.jpg")]}, images=False)
    (root / "Manually_Annotated_Images/0").mkdir(parents=True)
    os.symlink(outside, root / "Manually_Annotated_Images/0/link.jpg")
    _, rejections = _items(open_source(root, AffectNetPlusConfig()), "train")
    assert _reasons(rejections) == ["path_escapes_root"]


def test_not_an_affectnet_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a raw AffectNet folder"):
        open_source(tmp_path, AffectNetPlusConfig())
    with pytest.raises(FileNotFoundError, match="does not exist"):
        open_source(tmp_path / "missing", AffectNetPlusConfig())


def _release(tmp_path, n=3):
    root = tmp_path / "release"
    write_release(root, {"train": n, "validation": n, "unlabeled": n})
    return root


def test_release_reader_keeps_every_value_as_given(tmp_path):
    root = tmp_path / "release"
    fixture = write_release(root, {"train": 12, "validation": 3, "unlabeled": 3})
    reader = open_source(root, AffectNetPlusConfig(source_format="affectnet-plus"))
    assert reader.splits() == ["train", "validation", "unlabeled"]
    assert reader.ethnicity_classes == RELEASE_ETHNICITY_CLASSES
    assert "landmarks_29" in reader.columns
    records, rejections = _items(reader, "train")
    assert not rejections and len(records) == 12
    assert [r.image_id for r in records][:3] == [f"human_annotated/train_set/images/{i}" for i in range(3)]
    for record in records:
        ann, given = record.annotations, fixture[record.image_id]["annotation"]
        meta = given["meta-data"]
        assert ann["soft_label"] == given["soft-label"] and sum(ann["soft_label"]) > 1.1  # never renormalised
        assert ann["subset"] == (-1 if given["subset"] is None else given["subset"])
        assert ann["human_label"] == given["human-label"]
        assert ann["landmarks"].shape == (68, 2) and ann["landmarks"].reshape(-1).tolist() == meta["landmark-68"]
        if meta["landmark-29"] is not None:
            assert ann["landmarks_29"].reshape(-1).tolist() == meta["landmark-29"]
        if meta["pose"] is not None:  # radians in the release, degrees in the row
            assert ann["head_pose"] == {k: pytest.approx(np.degrees(v)) for k, v in meta["pose"].items()}
        if meta["race"] is not None:
            assert list(ann["ethnicity"]) == list(RELEASE_ETHNICITY_CLASSES)
            assert ann["ethnicity"]["latino_hispanic"] == meta["race"]["latino hispanic"]
    assert AffectNetPlusConfig().pose_unit == "radians"


def test_release_null_meta_data_is_not_available_and_minus_two_is_no_valence(tmp_path):
    root = _release(tmp_path, n=1)
    path = root / "human_annotated/train_set/annotations/0.json"
    data = json.loads(path.read_text())
    data["subset"] = None
    data["meta-data"] = {key: None for key in data["meta-data"]}
    data["meta-data"]["valence"] = -2
    path.write_text(json.dumps(data))
    (record,), _ = _items(open_source(root, AffectNetPlusConfig(source_format="affectnet-plus")), "train")
    columns = ("valence", "arousal", "landmarks", "landmarks_29", "head_pose", "age", "gender", "ethnicity")
    assert {c: record.annotations[c] for c in columns} == dict.fromkeys(columns)
    assert record.annotations["subset"] == -1


def test_release_pose_in_degrees_is_read_with_pose_unit(tmp_path):
    root = _release(tmp_path, n=1)
    path = root / "human_annotated/train_set/annotations/0.json"
    data = json.loads(path.read_text())
    data["meta-data"]["pose"] = {"yaw": 30.0, "pitch": 0.0, "roll": -5.0}
    path.write_text(json.dumps(data))
    reader = open_source(root, AffectNetPlusConfig(source_format="affectnet-plus", pose_unit="degrees"))
    (record,), _ = _items(reader, "train")
    assert record.annotations["head_pose"] == {"yaw": 30.0, "pitch": 0.0, "roll": -5.0}
    _, (rejection,) = _items(open_source(root, AffectNetPlusConfig(source_format="affectnet-plus")), "train")
    assert rejection.detail.startswith("meta-data.pose.yaw = 30.0 not in [-pi, pi] radians")


def test_release_bad_annotations_are_rejections(tmp_path):
    root = _release(tmp_path, n=8)
    annotations = root / "human_annotated/train_set/annotations"
    (annotations / "0.json").write_text("{not json")
    expected = [damage(root, f"human_annotated/train_set/images/{i}", kind)
                for i, kind in ((1, "value_459"), (2, "subset_3"), (3, "race_classes"), (5, "wrong_length"),
                                (6, "missing_key"))]  # fmt: skip
    (root / "human_annotated/train_set/images/4.jpg").unlink()
    face_image(224, 224).save(root / "human_annotated/train_set/images/orphan.jpg")
    records, rejections = _items(open_source(root, AffectNetPlusConfig(source_format="affectnet-plus")), "train")
    assert [r.image_id for r in records] == ["human_annotated/train_set/images/7"]
    assert _reasons(rejections) == ["malformed_annotation"] * 4 + ["missing_file"] + ["malformed_annotation"] * 2 + [
        "missing_annotation"
    ]
    details = [r.detail for r in rejections]
    assert details[0].startswith("malformed JSON: ")
    assert all(details[i].startswith(e) for i, e in zip((1, 2, 3, 5, 6), expected)), details
    assert details[1] == "soft-label[3] = 459.0 not in [0, 1]"


def test_release_race_classes_of_another_model_are_read_under_their_names(tmp_path):
    root = tmp_path / "release"
    write_release(root, {"train": 3}, race=("white", "black", "asian", "indian", "other"))
    reader = open_source(root, AffectNetPlusConfig(source_format="affectnet-plus"))
    assert reader.ethnicity_classes == ("white", "black", "asian", "indian", "other")
    records, rejections = _items(reader, "train")
    assert len(records) == 3 and not rejections


def test_make_example_maps_both_landmark_sets_to_the_crop(tmp_path):
    from builder.sources import make_example

    root = _release(tmp_path, n=1)
    face_image(448, 560).save(root / "human_annotated/train_set/images/0.jpg")  # not a 224 px crop: cropped
    config = AffectNetPlusConfig(source_format="affectnet-plus")
    reader = open_source(root, config)
    (record,), _ = _items(reader, "train")
    example = make_example(record, config, reader.columns)
    # centre square 448 x 448 from y = 56, resized by 0.5: both point sets go through the same mapping
    for name in ("landmarks", "landmarks_29"):
        expected = (record.annotations[name] - (0, 56)) * 0.5
        assert example[name].dtype == np.float32 and np.allclose(example[name], expected, atol=1e-4), name


def test_imagefolder_reader_takes_names_codes_and_val(tmp_path):
    root = tmp_path / "fer"
    for split, label in [("train", "Happy"), ("train", "6"), ("val", "surprise"), ("train", "bored")]:
        (root / split / label).mkdir(parents=True, exist_ok=True)
        face_image(48, 48).save(root / split / label / "x.png")
    reader = open_source(root, AffectNetPlusConfig(source_format="imagefolder"))
    assert reader.splits() == ["train", "validation"]
    records, rejections = _items(reader, "train")
    assert sorted(r.annotations["human_label"] for r in records) == [1, 6]
    assert [(r.reason, r.origin) for r in rejections] == [("malformed_row", "train/bored/x.png")]
    (val,), _ = _items(reader, "validation")
    assert val.annotations["human_label"] == 3 and val.image_id == "val/surprise/x"


def test_csv_reader(tmp_path):
    root = tmp_path / "csvdata"
    (root / "img").mkdir(parents=True)
    face_image(64, 64).save(root / "img" / "a.jpg")
    with open(root / "labels.csv", "w", newline="") as f:
        csv.writer(f).writerows(
            [
                ["path", "label", "split"],
                ["img/a.jpg", "sad", ""],
                ["img/a.jpg", "0", "validation"],
                ["../x.jpg", "1", ""],
            ]
        )
    reader = open_source(root / "labels.csv", AffectNetPlusConfig(source_format="csv"))
    assert reader.splits() == ["train", "validation"]
    records, rejections = _items(reader, "train")
    assert [r.annotations["human_label"] for r in records] == [2]
    assert [(r.reason, r.row) for r in rejections] == [("path_escapes_root", 4)]
    (root / "bad.csv").write_text("file,emotion\n")
    with pytest.raises(ValueError, match="path,label"):
        open_source(root / "bad.csv", AffectNetPlusConfig(source_format="csv"))


def test_reader_columns_match_the_schema():
    from affectnet_plus import FEATURES
    from builder.sources import READERS

    for reader in READERS.values():
        assert set(reader.columns) <= set(FEATURES)
        assert {"image_id", "image", "human_label"} <= set(reader.columns)


def test_count_matches_records_for_every_reader(make_affectnet, tmp_path):
    root = make_affectnet({"train": [affectnet_row("0/a.jpg"), affectnet_row("../b.jpg"), []]})
    release = tmp_path / "release"
    write_release(release, {"unlabeled": 2})
    face_image(224, 224).save(release / "no_human_annotated/images/orphan.jpg")
    (release / "no_human_annotated/annotations/x.json").write_text("{}")  # an annotation without an image
    folder = tmp_path / "folder"
    (folder / "train/happy").mkdir(parents=True)
    face_image(48, 48).save(folder / "train/happy/a.png")
    for source, fmt in [(root, "affectnet"), (release, "affectnet-plus"), (folder, "imagefolder")]:
        reader = open_source(source, AffectNetPlusConfig(source_format=fmt))
        for split in reader.splits():
            assert reader.count(split) == len(list(reader.records(split))) > 0


def test_rejection_details_name_paths_relative_to_the_source(make_affectnet, tmp_path):
    from builder.images import Rejected
    from builder.sources import make_example, source_relative

    outside = tmp_path / "outside.jpg"
    face_image(100, 100).save(outside)
    root = make_affectnet({"train": [affectnet_row("0/gone.jpg"), affectnet_row(str(outside))]})
    (root / "Manually_Annotated_Images/0/gone.jpg").unlink()
    config = AffectNetPlusConfig()
    (record,), (absolute,) = _items(open_source(root, config), "train")
    assert record.source_root == str(root.resolve())
    with pytest.raises(Rejected) as err:
        make_example(record, config, ("image_id", "image"))
    assert err.value.detail == "Manually_Annotated_Images/0/gone.jpg"
    assert absolute.reason == "path_escapes_root" and str(tmp_path) not in absolute.detail
    assert "'outside.jpg'" in absolute.detail

    release = _release(tmp_path, n=2)
    (release / "human_annotated/train_set/annotations/1.json").unlink()
    (release / "human_annotated/train_set/annotations/1.json").mkdir()  # unreadable: an OSError names it
    folder = tmp_path / "fer"
    (folder / "train/happy").mkdir(parents=True)
    os.symlink(outside, folder / "train/happy/link.jpg")
    details = {}
    for source, fmt, reason in ((release, "affectnet-plus", "malformed_annotation"),
                                (folder, "imagefolder", "path_escapes_root")):  # fmt: skip
        _, (rejection,) = _items(open_source(source, AffectNetPlusConfig(source_format=fmt)), "train")
        assert rejection.reason == reason and str(tmp_path) not in rejection.detail, rejection.detail
        details[fmt] = rejection.detail
    assert details["affectnet-plus"].endswith("Is a directory: 'human_annotated/train_set/annotations/1.json'")
    assert details["imagefolder"] == "train/happy/link.jpg links outside the source"

    assert source_relative("/data/src/a.jpg and /data/src2/b.jpg and /data/src", "/data/src") == (
        "a.jpg and /data/src2/b.jpg and ."  # a sibling folder's name is not cut
    )
    assert source_relative("nothing to do", "/data/src") == "nothing to do"


def _duplicates(make_affectnet):
    """A raw AffectNet folder with rows whose image files repeat another row's bytes, in the same split and
    in later ones, and a near-identical picture (the same pixels encoded again: other bytes).

    Returns the root and, for each duplicate's image_id, the image_id of the row it repeats.
    """
    from PIL import Image

    names = {"train": ["0/z", "0/a", "0/b", "0/near", "0/c"], "validation": ["1/v", "1/w"], "unlabeled": ["2/u", "2/x"]}
    root = make_affectnet({split: [affectnet_row(f"{n}.jpg", label=i % 8, seed=i) for i, n in enumerate(rows)]
                           for split, rows in names.items()})  # fmt: skip

    def image_id(name: str) -> str:
        return ("Automatically" if name.startswith("2/") else "Manually") + f"_Annotated_Images/{name}"

    def path(name: str):
        return root / f"{image_id(name)}.jpg"

    for seed, name in enumerate(["0/z", "0/b", "0/c", "1/w", "2/x"], start=100):
        face_image(300, 280, seed=seed).save(path(name), quality=90)
    for copy, original in (("0/a", "0/z"), ("1/v", "0/b"), ("2/u", "0/z")):
        path(copy).write_bytes(path(original).read_bytes())
    with Image.open(path("0/z")) as image:
        image.save(path("0/near"), quality=90)
    assert path("0/near").read_bytes() != path("0/z").read_bytes()
    return root, {image_id("0/a"): image_id("0/z"), image_id("1/v"): image_id("0/b"), image_id("2/u"): image_id("0/z")}


def test_make_example_hashes_the_source_file_and_duplicate_image_keeps_the_first(make_affectnet):
    import hashlib

    from builder.sources import duplicate_image, make_example

    root, repeats = _duplicates(make_affectnet)
    config = AffectNetPlusConfig()
    reader = open_source(root, config)
    records, _ = _items(reader, "train")
    examples = [make_example(r, config, reader.columns) for r in records]
    for record, example in zip(records, examples):  # the source file's bytes, not the crop's
        assert example["_sha256"] == hashlib.sha256(record.image_path.read_bytes()).hexdigest()
    first: dict[str, str] = {}
    rejected = [duplicate_image(r, e, first) for r, e in zip(records, examples)]
    (dup,) = [r for r in rejected if r is not None]
    assert (dup.reason, dup.image_id, dup.detail) == ("duplicate_image", "Manually_Annotated_Images/0/a",
                                                      repeats["Manually_Annotated_Images/0/a"])  # fmt: skip
    assert dup.row == 3 and dup.origin == "Manually_Annotated_file_lists/training.csv"
    assert sorted(first.values()) == sorted(r.image_id for r in records if r.image_id != dup.image_id)


def test_a_build_keeps_the_first_row_of_each_image_and_rejects_its_copies(make_affectnet, tmp_path):
    """In source order across splits, whatever the number of worker processes; a near-identical picture is kept."""
    import hashlib

    import pyarrow.parquet as pq

    from builder.export import BuildOptions, build

    root, repeats = _duplicates(make_affectnet)
    built = {}
    for num_proc in (1, 2):
        out = tmp_path / f"proc{num_proc}" / "affectnet_plus"
        options = BuildOptions(shard_rows=2, num_proc=num_proc, progress=False, max_rejected_fraction=1.0)
        report = build(root, out, AffectNetPlusConfig(), options)
        built[num_proc] = {p.relative_to(out).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
                           for p in sorted(out.rglob("*")) if p.is_file()}  # fmt: skip
    assert built[1] == built[2]

    assert report["read"] == 9 and report["written"] == 6 and report["rejected"] == {"duplicate_image": 3}
    assert {s: c["rejected"] for s, c in report["splits"].items()} == {
        split: {"duplicate_image": 1} for split in ("train", "validation", "unlabeled")
    }
    rejects = [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]
    assert {r["image_id"]: r["detail"] for r in rejects} == repeats  # the kept row, by its image_id
    assert [r["split"] for r in rejects] == ["train", "validation", "unlabeled"]
    assert all(r["reason"] == "duplicate_image" and str(tmp_path) not in json.dumps(r) for r in rejects)
    written = [i for p in (out / "labels").rglob("*.parquet") for i in pq.read_table(p)["image_id"].to_pylist()]
    kept = [f"Manually_Annotated_Images/{n}" for n in ("0/z", "0/b", "0/near", "0/c", "1/w")]
    assert sorted(written) == sorted([*kept, "Automatically_Annotated_Images/2/x"])
