"""Tests of the rendered sample: layouts, determinism, truth, label noise, pose and expression geometry."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from affectnet_plus import EMOTIONS, HUMAN_LABELS
from builder import release, sample
from builder.sample import (
    CSV_COLUMNS,
    LANDMARK_29,
    SampleConfig,
    contact_sheet,
    release_soft_label,
    render_face,
    render_non_face,
    rotation_matrix,
    write_sample,
)
from core.schema import RELEASE_RACE_CLASSES

SMALL = {"min_image_size": 128, "max_image_size": 224}  # small images keep the file fast
CSV_FILES = {
    "train": ("Manually_Annotated_file_lists/training.csv", "Manually_Annotated_Images"),
    "validation": ("Manually_Annotated_file_lists/validation.csv", "Manually_Annotated_Images"),
    "unlabeled": ("Automatically_Annotated_file_lists/automatically_annotated.csv", "Automatically_Annotated_Images"),
}


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _truth(root: Path) -> dict[str, dict]:
    lines = (root / "ground_truth.jsonl").read_text(encoding="utf-8").splitlines()
    rows = [json.loads(line) for line in lines]
    assert [r["image_id"] for r in rows] == sorted(r["image_id"] for r in rows)
    return {r["image_id"]: r for r in rows}


@pytest.fixture(scope="module")
def raw_sample(tmp_path_factory):
    """A 300-image raw-AffectNet-layout sample with enough non-emotion rows to see every code."""
    out = tmp_path_factory.mktemp("raw")
    summary = write_sample(out, SampleConfig(n=300, seed=7, non_emotion_fraction=0.06, **SMALL))
    return out, summary


@pytest.fixture(scope="module")
def release_sample(tmp_path_factory):
    out = tmp_path_factory.mktemp("release")
    summary = write_sample(out, SampleConfig(n=80, seed=3, layout="affectnet-plus", **SMALL))
    return out, summary


# ------------------------------------------------------------------------------------------ config


@pytest.mark.parametrize(
    "kwargs",
    [
        {"layout": "imagefolder"},
        {"n": 0},
        {"validation_fraction": 0.6, "unlabeled_fraction": 0.5},
        {"min_image_size": 400, "max_image_size": 300},
        {"jpeg_quality": (95, 70)},
        {"dominant_mass": (0.2, 0.9)},
        {"non_emotion_fraction": 1.5},
    ],
)
def test_config_rejects_bad_values(kwargs):
    with pytest.raises(ValueError):
        SampleConfig(**kwargs)


# ----------------------------------------------------------------------------------- determinism


def test_same_seed_gives_byte_identical_files_and_another_seed_does_not(tmp_path):
    config = SampleConfig(n=24, seed=11, non_emotion_fraction=0.2, **SMALL)
    write_sample(tmp_path / "a", config)
    write_sample(tmp_path / "b", config)
    write_sample(tmp_path / "c", SampleConfig(n=24, seed=12, non_emotion_fraction=0.2, **SMALL))
    a, b, c = _files(tmp_path / "a"), _files(tmp_path / "b"), _files(tmp_path / "c")
    assert len(a) == 24 + 3 + 2  # images + 3 CSVs + ground truth + manifest
    assert a == b  # the signed manifest too: it holds no time, no path, nothing but the config and the files
    assert set(a) != set(c)  # names derive from the seed
    assert sorted(a.values()) != sorted(c.values())


def test_an_image_depends_on_its_index_only_not_on_the_sample_size(tmp_path):
    # Every row an emotion row and no validation/unlabeled split: index i is the same image in both.
    small = SampleConfig(n=6, seed=5, non_emotion_fraction=0.0, validation_fraction=0, unlabeled_fraction=0, **SMALL)
    large = SampleConfig(n=9, seed=5, non_emotion_fraction=0.0, validation_fraction=0, unlabeled_fraction=0, **SMALL)
    write_sample(tmp_path / "small", small)
    write_sample(tmp_path / "large", large)
    a, b = _files(tmp_path / "small"), _files(tmp_path / "large")
    images = [k for k in a if k.endswith(".jpg")]
    assert len(images) == 6
    assert all(a[k] == b[k] for k in images)


def test_existing_sample_is_not_overwritten_silently(tmp_path):
    config = SampleConfig(n=4, seed=0, **SMALL)
    write_sample(tmp_path, config)
    with pytest.raises(FileExistsError):
        write_sample(tmp_path, config)
    write_sample(tmp_path, SampleConfig(n=3, seed=1, **SMALL), overwrite=True)
    assert len(_truth(tmp_path)) == 3
    assert len(list(tmp_path.rglob("*.jpg"))) == 3  # the old images are gone


@pytest.mark.parametrize("layout", ["affectnet", "affectnet-plus"])
def test_rendering_in_worker_processes_writes_byte_identical_files(tmp_path, monkeypatch, layout):
    config = SampleConfig(n=24, seed=11, layout=layout, non_emotion_fraction=0.2, **SMALL)
    serial = write_sample(tmp_path / "serial", config)
    # The pool's workers import the module afresh; here, rendering is broken, so every image the
    # parallel run writes was rendered in a worker.
    monkeypatch.setattr(sample, "_rendered", lambda *args: pytest.fail("rendered in the main process"))
    parallel = write_sample(tmp_path / "parallel", config, num_proc=2)
    a, b = _files(tmp_path / "serial"), _files(tmp_path / "parallel")
    assert len(a) == 24 + (3 + 2 if layout == "affectnet" else 24 + 2)  # images, CSVs or JSONs, truth, manifest
    assert a == b  # every image, file list, annotation, ground_truth.jsonl and the signed manifest
    assert parallel == serial
    assert sample.is_bundled_sample(tmp_path / "parallel", layout)


@pytest.mark.parametrize("num_proc", [0, -1, 1.5, True])
def test_write_sample_rejects_a_bad_num_proc(tmp_path, num_proc):
    with pytest.raises(ValueError, match="num_proc"):
        write_sample(tmp_path / "out", SampleConfig(n=2, seed=0, **SMALL), num_proc=num_proc)
    assert not (tmp_path / "out").exists()  # checked before anything is written


# ------------------------------------------------------------------------------- raw AffectNet CSV


def _read_csv(root: Path, split: str) -> list[dict]:
    csv_path, _ = CSV_FILES[split]
    with open(root / csv_path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        assert tuple(next(reader)) == CSV_COLUMNS
        rows = list(reader)
    assert all(len(row) == len(CSV_COLUMNS) for row in rows)
    return [dict(zip(CSV_COLUMNS, row)) for row in rows]


def test_csv_rows_parse_and_match_images_and_ground_truth(raw_sample):
    root, summary = raw_sample
    truth = _truth(root)
    seen = set()
    for split, (_, images) in CSV_FILES.items():
        rows = _read_csv(root, split)
        assert len(rows) == summary["splits"][split]
        for row in rows:
            subdir, name = row["subDirectory_filePath"].split("/")
            assert subdir.isdigit() and len(name) == 60 and name.endswith(".jpg")
            int(name[:-4], 16)  # a hex name
            path = root / images / row["subDirectory_filePath"]
            image_id = f"{images}/{row['subDirectory_filePath'][:-4]}"
            gt = truth[image_id]
            seen.add(image_id)
            assert gt["split"] == split
            code = int(row["expression"])
            assert 0 <= code < len(HUMAN_LABELS) and code == gt["human_label"]
            if split == "unlabeled":
                assert code < len(EMOTIONS)
            box = [int(row[k]) for k in ("face_x", "face_y", "face_width", "face_height")]
            landmarks = np.array([float(v) for v in row["facial_landmarks"].split(";")])
            assert landmarks.shape == (136,) and np.isfinite(landmarks).all()
            assert all(len(v.split(".")[1]) == 2 for v in row["facial_landmarks"].split(";"))
            valence, arousal = float(row["valence"]), float(row["arousal"])
            if code in (9, 10):
                assert valence == arousal == -2
            else:
                assert -1 <= valence <= 1 and -1 <= arousal <= 1
            with Image.open(path) as image:
                assert image.format == "JPEG" and image.mode == "RGB"
                width, height = image.size
            assert SMALL["min_image_size"] <= min(width, height) <= max(width, height) <= SMALL["max_image_size"]
            x, y, w, h = box
            assert w > 0 and h > 0 and x >= 0 and y >= 0 and x + w <= width and y + h <= height
            if gt["landmarks"] is not None:
                gt_points = np.array(gt["landmarks"])
                assert gt_points.shape == (68, 2)
                assert (gt_points >= 0).all() and (gt_points[:, 0] <= width).all() and (gt_points[:, 1] <= height).all()
                slack = 0.15 * max(w, h)
                assert (gt_points[:, 0] >= x - slack).all() and (gt_points[:, 0] <= x + w + slack).all()
                assert (gt_points[:, 1] >= y - slack).all() and (gt_points[:, 1] <= y + h + slack).all()
                # Written landmarks are the truth plus ~1 % annotation noise: close, but not equal.
                error = np.linalg.norm(landmarks.reshape(68, 2) - gt_points, axis=1)
                assert 0 < error.mean() < 0.04 * max(w, h)
    assert seen == set(truth)


def test_ground_truth_soft_labels_are_valid_and_non_emotion_rows_follow_affectnet(raw_sample):
    root, summary = raw_sample
    truth = _truth(root).values()
    codes = {r["human_label"] for r in truth if r["split"] != "unlabeled"}
    assert {8, 9, 10} <= codes and set(range(8)) <= codes
    for row in truth:
        if row["human_label"] == 10:
            assert row["soft_label"] is row["dominant"] is row["landmarks"] is row["valence"] is None
            assert row["split"] != "unlabeled"
            continue
        soft = np.array(row["soft_label"])
        assert soft.shape == (8,) and (soft >= 0).all() and abs(soft.sum() - 1) < 1e-9
        assert int(np.argmax(soft)) == row["dominant"]
        assert 0.45 <= soft[row["dominant"]] <= 0.95
        assert set(row["head_pose"]) == {"yaw", "pitch", "roll"}
        assert abs(row["head_pose"]["yaw"]) <= 30 and abs(row["head_pose"]["roll"]) <= 20
        assert -1 <= row["valence"] <= 1 and -1 <= row["arousal"] <= 1
    assert summary["non_emotion_rows"] == sum(r["human_label"] >= 8 for r in truth)


def test_annotator_agreement_is_affectnet_like_and_matches_the_summary(raw_sample):
    root, summary = raw_sample
    rows = [r for r in _truth(root).values() if r["split"] != "unlabeled" and r["human_label"] < 8]
    assert len(rows) >= 200
    agreement = np.mean([r["human_label"] == r["dominant"] for r in rows])
    assert summary["label_agreement"] == pytest.approx(agreement)
    assert 0.55 <= agreement <= 0.8  # noisy like real annotators, yet mostly right
    # Disagreements are mostly the mixture's secondary emotions, not uniform noise.
    wrong = [r for r in rows if r["human_label"] != r["dominant"]]
    on_secondary = np.mean([np.argsort(r["soft_label"])[-2] == r["human_label"] for r in wrong])
    assert on_secondary > 0.5


def test_valence_and_arousal_follow_the_mixture(raw_sample):
    root, _ = raw_sample
    rows = [r for r in _truth(root).values() if r["dominant"] is not None]
    by_dominant = {k: [r for r in rows if r["dominant"] == k] for k in range(8)}
    mean_valence = {k: np.mean([r["valence"] for r in v]) for k, v in by_dominant.items()}
    mean_arousal = {k: np.mean([r["arousal"] for r in v]) for k, v in by_dominant.items()}
    assert mean_valence[1] > 0.4 > 0 > -0.3 > mean_valence[2]  # happy positive, sad negative
    assert mean_arousal[3] > 0.4 > 0 > mean_arousal[2]  # surprise aroused, sad calm


# -------------------------------------------------------------------------------- release layout


def _subset_rule(soft: list[float], label: int) -> int:
    """The release's rule: rank r of soft[label] (1 = largest, ties count against it); 1 easy, 2-3
    challenging, >= 4 difficult."""
    rank = 1 + sum(v >= soft[label] for k, v in enumerate(soft) if k != label)
    return 0 if rank == 1 else 1 if rank <= 3 else 2


def test_release_layout_json_images_and_subsets(release_sample):
    root, summary = release_sample
    truth = _truth(root)
    subsets, sums = [0, 0, 0], []
    for split, part in release.PARTS.items():
        annotations = sorted((root / part / "annotations").glob("*.json"))
        assert len(annotations) == summary["splits"][split] == len(list((root / part / "images").glob("*.jpg")))
        for path in annotations:
            data = json.loads(path.read_text(encoding="utf-8"))
            assert list(data) == ["human-label", "soft-label", "subset", "meta-data"]
            meta = data["meta-data"]
            assert list(meta) == ["age", "gender", "race", "pose", "valence", "arousal", "landmark-68", "landmark-29"]
            assert 0 <= data["human-label"] <= 7
            gt = truth[f"{part}/images/{path.stem}"]
            # independent per-emotion confidences, as the release's: in [0, 1], not summing to 1
            soft = data["soft-label"]
            assert len(soft) == 8 and all(0.05 < v <= 1 for v in soft)
            assert soft == release_soft_label(gt["soft_label"]).tolist()
            assert int(np.argmax(soft)) == gt["dominant"]
            sums.append(sum(soft))
            assert data["subset"] == _subset_rule(soft, data["human-label"])
            subsets[data["subset"]] += 1
            assert 10 <= meta["age"] <= 90
            assert meta["gender"]["female"] + meta["gender"]["male"] == pytest.approx(1)
            assert tuple(meta["race"]) == RELEASE_RACE_CLASSES
            assert sum(meta["race"].values()) == pytest.approx(1, abs=1e-6)
            # radians, near the true pose (degrees) up to the estimate's noise
            assert list(meta["pose"]) == ["yaw", "pitch", "roll"]
            for key, value in meta["pose"].items():
                assert abs(value) < 0.7 and value == pytest.approx(np.radians(gt["head_pose"][key]), abs=0.15)
            assert -1 <= meta["valence"] <= 1 and -1 <= meta["arousal"] <= 1
            assert len(meta["landmark-68"]) == 136 and len(meta["landmark-29"]) == 58
            lm68, lm29 = np.reshape(meta["landmark-68"], (68, 2)), np.reshape(meta["landmark-29"], (29, 2))
            assert np.array_equal(lm29, lm68[list(LANDMARK_29)])
            image_path = root / part / "images" / f"{path.stem}.jpg"
            with Image.open(image_path) as image:
                assert image.size == (224, 224) and image.format == "JPEG"
            assert gt["split"] == split and gt["human_label"] == data["human-label"]
            gt_points = np.array(gt["landmarks"])
            assert (gt_points > 0).all() and (gt_points < 224).all()  # the face is inside its crop
            assert np.abs(lm68 - gt_points).mean() < 0.04 * 224
    assert summary["subsets"] == dict(zip(("easy", "challenging", "difficult"), subsets))
    assert subsets[0] > 0 and subsets[1] + subsets[2] > 0
    assert 1.3 < np.median(sums) < 2.5 and min(sums) > 1.1


def test_release_layout_builds_without_a_rejection(release_sample, tmp_path):
    from builder.export import BuildOptions, build
    from core.schema import AffectNetPlusConfig

    root, summary = release_sample
    report = build(root, tmp_path / "out", AffectNetPlusConfig(source_format="affectnet-plus"),
                   BuildOptions(progress=False))  # fmt: skip
    assert report["read"] == report["written"] == summary["n"] and report["rejected"] == {}


# ------------------------------------------------------------------------------------ rendering


def _face(label: int | np.ndarray, pose=(0.0, 0.0, 0.0), seed: int = 0, size=256, fraction: float = 0.6, **kwargs):
    soft = np.eye(8)[label] if np.isscalar(label) else label
    rng = np.random.default_rng([seed, 99])  # the same identity for every expression
    return render_face(rng, soft, pose, size, intensity=1.0, face_fraction=(fraction, fraction), **kwargs)


def test_render_face_returns_the_image_landmarks_and_box():
    image, landmarks, box = _face(1, size=(200, 180))
    assert image.mode == "RGB" and image.size == (200, 180)
    assert landmarks.shape == (68, 2) and np.isfinite(landmarks).all()
    x, y, w, h = box
    assert landmarks[:, 0].min() >= x - 0.1 * w and landmarks[:, 0].max() <= x + w + 0.1 * w
    assert landmarks[:, 1].min() >= y - 0.1 * h and landmarks[:, 1].max() <= y + h + 0.1 * h
    with pytest.raises(ValueError):
        render_face(np.random.default_rng(0), np.full(8, -0.1), (0, 0, 0), 100)


def test_pose_signs_follow_the_documented_convention():
    def nose_minus_eyes(pose):
        _, lm, _ = _face(0, pose)
        return lm[30] - lm[36:48].mean(axis=0)

    # yaw > 0: the face turns toward the image's left, so the nose tip moves left of the eyes' centre.
    assert nose_minus_eyes((25, 0, 0))[0] < -5 < 5 < nose_minus_eyes((-25, 0, 0))[0]
    # pitch > 0: looking down, so the nose tip drops toward the mouth.
    assert nose_minus_eyes((0, 15, 0))[1] > nose_minus_eyes((0, 0, 0))[1] + 5 > nose_minus_eyes((0, -15, 0))[1] + 10
    # roll > 0: clockwise in the image, so the image-right eye corner (45) drops below the left (36).
    _, lm, _ = _face(0, (0, 0, 15))
    assert lm[45, 1] - lm[36, 1] > 10
    assert np.allclose(rotation_matrix(10, 20, 30) @ rotation_matrix(10, 20, 30).T, np.eye(3))


def _geometry(label) -> dict[str, float]:
    _, lm, _ = _face(label)
    iod = np.linalg.norm(lm[45] - lm[36])  # inter-ocular distance: the scale of every cue

    def up(a, b):  # how far point(s) a sit above point(s) b, in inter-ocular distances
        return float(np.mean(lm[b, 1]) - np.mean(lm[a, 1])) / iod

    return {
        "mouth_open": float(np.linalg.norm(lm[66] - lm[62])) / iod,
        "corners_up": up([48, 54], [51, 57]),
        "inner_brows_up": up([21, 22], [39, 42]),
        "brow_gap": float(lm[22, 0] - lm[21, 0]) / iod,
        "corner_asymmetry": abs(up(48, 54)),
        "upper_lip_to_nose": up(33, 51),
        "eye_open": up([37, 38, 43, 44], [40, 41, 46, 47]),
        "mouth_width": float(lm[54, 0] - lm[48, 0]) / iod,
    }


def test_expressions_move_the_landmarks_the_way_facs_says():
    g = {name: _geometry(k) for k, name in enumerate(EMOTIONS)}
    neutral = g["neutral"]
    # Thresholds are in inter-ocular distances (~0.76 face units), for one fixed identity, frontal.
    assert g["surprise"]["mouth_open"] > 0.2 > 10 * neutral["mouth_open"]  # AU26 jaw drop
    assert g["happy"]["corners_up"] > neutral["corners_up"] + 0.08 > g["sad"]["corners_up"] + 0.16  # AU12 vs AU15
    for raised in ("surprise", "sad", "fear"):  # AU1 inner brow raiser vs AU4 brow lowerer
        assert g[raised]["inner_brows_up"] > g["anger"]["inner_brows_up"] + 0.15
    assert g["anger"]["inner_brows_up"] < neutral["inner_brows_up"] - 0.08
    assert g["anger"]["brow_gap"] < neutral["brow_gap"] - 0.08  # brows drawn together
    assert g["surprise"]["eye_open"] > neutral["eye_open"] + 0.035  # AU5 upper lid raiser
    assert g["happy"]["eye_open"] < neutral["eye_open"] - 0.025  # AU6 cheek raiser narrows the eye
    assert g["contempt"]["corner_asymmetry"] > 0.07 > 0.01 > neutral["corner_asymmetry"]  # unilateral AU12/14
    assert g["happy"]["corner_asymmetry"] < 0.01  # a smile is symmetric
    assert g["disgust"]["upper_lip_to_nose"] < neutral["upper_lip_to_nose"] - 0.015  # AU10 upper lip raiser
    assert g["fear"]["mouth_width"] > neutral["mouth_width"] + 0.1  # AU20 lip stretcher


def test_mixtures_interpolate_between_expressions():
    half = np.zeros(8)
    half[[0, 3]] = 0.5
    assert _geometry(0)["mouth_open"] < _geometry(half)["mouth_open"] < _geometry(3)["mouth_open"]


def _mask(size: tuple[int, int], polygon: np.ndarray) -> np.ndarray:
    mask = Image.new("L", size, 0)
    ImageDraw.Draw(mask).polygon([tuple(p) for p in polygon], fill=255)
    return np.asarray(mask) > 0


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pixels_follow_the_landmarks_and_read_at_64_px(seed):
    # The generator's draws do not depend on the soft label, so the two renders share identity,
    # colours, placement and background: every pixel difference is the expression.
    # (At 0.45 of the image the dropped jaw never touches the border, which would shift the face.)
    surprise, lm, _ = _face(3, seed=seed, fraction=0.45, photometric=False)
    neutral, lm_neutral, _ = _face(0, seed=seed, fraction=0.45, photometric=False)
    assert np.allclose(lm[27:36], lm_neutral[27:36], atol=1.0)  # the nose does not move
    grey_s = np.asarray(surprise.convert("L"), dtype=np.float64)
    grey_n = np.asarray(neutral.convert("L"), dtype=np.float64)
    # The open mouth is drawn (dark, with some teeth) exactly where the inner-lip landmarks are.
    mouth = _mask(surprise.size, lm[60:68])
    assert mouth.sum() > 100
    assert (grey_s[mouth] < 70).mean() > 0.3
    # Pixels change around the mouth and brows, not in the background.
    changed = np.abs(grey_s - grey_n) > 30
    x0, y0 = lm[17:68].min(axis=0) - 10
    x1, y1 = lm[list(range(3, 14)) + list(range(17, 68))].max(axis=0) + 10
    features = np.zeros_like(changed)
    features[int(y0) : int(y1), int(x0) : int(x1)] = True
    assert changed[features].sum() > 200 and changed[~features].mean() < 0.01
    # At 64 px the jaw drop still reads: the mouth region differs clearly.
    small_s = np.asarray(surprise.resize((64, 64), Image.Resampling.LANCZOS).convert("L"), dtype=np.float64)
    small_n = np.asarray(neutral.resize((64, 64), Image.Resampling.LANCZOS).convert("L"), dtype=np.float64)
    mx0, my0 = np.floor(lm[48:68].min(axis=0) / 4).astype(int)
    mx1, my1 = np.ceil(lm[48:68].max(axis=0) / 4).astype(int)
    assert np.abs(small_s - small_n)[my0:my1, mx0:mx1].mean() > 15


def test_non_face_images_are_pictures_of_the_asked_size():
    image = render_non_face(np.random.default_rng(0), (120, 90))
    assert image.size == (120, 90) and image.mode == "RGB"
    assert np.asarray(image, dtype=np.float64).std() > 5


def test_contact_sheet_writes_a_grid(tmp_path):
    path = contact_sheet(tmp_path / "grid.png", SampleConfig(seed=0, **SMALL), n=6, columns=3)
    with Image.open(path) as sheet:
        assert sheet.size[0] == 3 * 224 and sheet.size[1] > 2 * 224
        top_left = np.asarray(sheet.crop((0, 0, 224, 224)).convert("L"), dtype=np.float64)
    assert top_left.std() > 10  # a picture, not an empty cell
