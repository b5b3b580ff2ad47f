import numpy as np
import pytest

from affectnet_plus import EMOTIONS
from builder.au import (
    AUS,
    STABLE_POINTS,
    AUCalibration,
    AUConfig,
    AUModel,
    ShapeModel,
    au_features,
    au_intensities,
    au_scores,
    calibration_features,
    degenerate_landmarks,
    frontalise,
    reference_landmarks,
    shape_moments,
)
from builder.face3d import MEAN_FACE_68
from builder.sample import expression_displacements, render_face, rotation_matrix


def _prototypes(intensity=1.0):
    shapes = MEAN_FACE_68[None] + intensity * expression_displacements()
    return shapes[..., :2] * 150 + 112  # pixel-like coordinates of a 224 px crop


def _similarity(points, angle_deg, scale, shift):
    a = np.radians(angle_deg)
    rotation = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
    return points @ rotation.T * scale + shift


def test_every_prototype_scores_its_own_emotion_highest():
    scores = au_scores(_prototypes())
    assert scores.shape == (8, 8)
    assert ((scores >= 0) & (scores <= 1)).all()  # presences, not a distribution
    assert not np.allclose(scores.sum(1), 1)
    assert scores.argmax(1).tolist() == list(range(8))
    assert scores[0, 0] > 0.9  # neutral


def test_scores_ignore_position_scale_and_in_plane_rotation():
    faces = _prototypes()
    moved = _similarity(faces, angle_deg=25, scale=0.4, shift=np.array([30.0, -12.0]))
    np.testing.assert_allclose(au_scores(moved), au_scores(faces), atol=1e-9)
    np.testing.assert_allclose(frontalise(moved), frontalise(faces), atol=1e-9)


def test_intensities_grow_with_expression_strength():
    half, full = au_intensities(_prototypes(0.5)), au_intensities(_prototypes(1.0))
    assert ((half >= 0) & (half <= 1)).all() and ((full >= 0) & (full <= 1)).all()
    smile = AUS.index("AU12")
    jaw = AUS.index("AU26")
    assert 0 < half[1, smile] < full[1, smile]  # happy: lip corners up
    assert 0 < half[3, jaw] < full[3, jaw]  # surprise: jaw drop
    np.testing.assert_allclose(au_intensities(reference_landmarks()[None]), 0, atol=1e-9)


def test_contempt_is_unilateral():
    shapes = _prototypes()
    mirrored = shapes[7].copy()
    mirrored[:, 0] = 224 - mirrored[:, 0]
    from builder.sample import _MIRROR  # iBUG index permutation of a left-right flip

    mirrored = mirrored[_MIRROR]
    both = au_scores(np.stack([shapes[7], mirrored]))
    assert both.argmax(1).tolist() == [7, 7]
    # a symmetric smile is happy, not contempt
    assert au_scores(shapes[[1]])[0, EMOTIONS.index("contempt")] < 0.05


def test_rendered_faces_with_head_pose_still_rank_their_emotion_first():
    """Landmarks of rendered, posed faces (the sample's noise-free truth), mostly one emotion each."""
    rng = np.random.default_rng(0)
    correct = 0
    for trial in range(40):
        emotion = trial % 8
        soft = np.full(8, 0.02)
        soft[emotion] = 1 - 0.02 * 7
        pose = rng.uniform([-15, -10, -20], [15, 10, 20])
        _, landmarks, _ = render_face(rng, soft, tuple(pose), 256, photometric=False)
        correct += au_scores(landmarks[None]).argmax() == emotion
    assert correct >= 34, correct  # frontalisation undoes roll and, to first order, yaw and pitch


def test_missing_landmarks_stay_missing_and_config_is_checked():
    faces = _prototypes()[:2].copy()
    faces[1] = np.nan
    scores = au_scores(faces)
    assert np.isfinite(scores[0]).all() and np.isnan(scores[1]).all()
    with pytest.raises(ValueError, match="lacks"):
        AUConfig(full_scale={"AU1": 0.1})
    assert rotation_matrix(0, 0, 0).shape == (3, 3)


def _expression_faces(rng, n, noise_px):
    """n frontal faces mixing the sample's expression shapes at random, in 224 px crops: (clean, noisy)."""
    weights = rng.dirichlet(np.full(8, 0.5), n) * rng.uniform(0.5, 1.2, (n, 1))
    shapes = MEAN_FACE_68[None] + np.einsum("nk,kpd->npd", weights, expression_displacements())
    clean = shapes[..., :2] * 150 + 112
    return clean, clean + rng.normal(0, noise_px, clean.shape)


def test_shape_model_removes_landmark_noise():
    clean, noisy = _expression_faces(np.random.default_rng(0), 1000, 1.5)
    model = ShapeModel.fit(noisy, components=12)
    before = np.abs(frontalise(noisy) - frontalise(clean)).mean()
    after = np.abs(model.denoise(frontalise(noisy)) - frontalise(clean)).mean()
    assert after < 0.6 * before, (before, after)
    assert 0 < model.variance_kept < 1 and model.rows == 1000
    # Moments summed over batches (how the build fits it) give the same model; NaN rows are skipped.
    with_gap = np.concatenate([noisy[:400], np.full((3, 68, 2), np.nan), noisy[400:]])
    parts = [shape_moments(with_gap[:401]), shape_moments(with_gap[401:])]
    merged = ShapeModel.from_moments(sum(p[0] for p in parts), sum(p[1] for p in parts), sum(p[2] for p in parts), 12)
    np.testing.assert_allclose(merged.modes.T @ merged.modes, model.modes.T @ model.modes, atol=1e-8)
    again = ShapeModel.from_json(model.to_json())
    np.testing.assert_allclose(again.denoise(frontalise(noisy[:5])), model.denoise(frontalise(noisy[:5])))
    assert np.isnan(au_scores(np.full((1, 68, 2), np.nan), shape_model=model)).all()
    with pytest.raises(ValueError, match="components"):
        ShapeModel.fit(noisy, components=0)
    with pytest.raises(ValueError, match="needs more than 12 faces"):
        ShapeModel.fit(noisy[:10], components=12)


def test_au_features_are_intensities_then_emfacs_scores():
    faces = _prototypes()
    features = au_features(faces)
    np.testing.assert_allclose(features[:, : len(AUS)], au_intensities(faces))
    np.testing.assert_allclose(features[:, len(AUS) :], au_scores(faces))


def test_calibration_is_cross_fitted():
    rng = np.random.default_rng(1)
    features = rng.normal(size=(2000, 21))
    labels = (3 * features[:, :8] + rng.gumbel(size=(2000, 8))).argmax(1)  # noisy labels of a linear truth
    row_folds = np.arange(2000) % 2
    model = AUCalibration.fit(features, labels, row_folds, num_folds=2)
    probs = model.predict(features, row_folds)
    assert ((probs > 0) & (probs < 1)).all() and not np.allclose(probs.sum(1), 1)  # 8 one-vs-rest presences
    truth = features[:, :8].argmax(1)
    assert (probs.argmax(1) == truth).mean() > (labels == truth).mean() + 0.05  # it denoises the labels
    # A train row's own label never enters its score: row 0 (fold 0) is scored by the model that left fold 0 out.
    relabelled = labels.copy()
    relabelled[0] = (labels[0] + 1) % 8
    other = AUCalibration.fit(features, relabelled, row_folds, num_folds=2)
    np.testing.assert_allclose(other.predict(features[:1], row_folds[:1]), probs[:1])
    assert not np.allclose(other.predict(features[1:2], row_folds[1:2]), probs[1:2])  # fold 1's model saw row 0
    # Rows no model trained on (validation, unlabeled: fold -1) get the mean over folds.
    mean = model.predict(features[:5], np.full(5, -1))
    by_fold = [model.predict(features[:5], np.full(5, j)) for j in (0, 1)]
    np.testing.assert_allclose(mean, (by_fold[0] + by_fold[1]) / 2)
    np.testing.assert_allclose(AUCalibration.from_json(model.to_json()).predict(features, row_folds), probs)
    assert np.isnan(model.predict(np.full((1, 21), np.nan), np.array([0]))).all()
    with pytest.raises(ValueError, match="outside fold 0"):
        AUCalibration.fit(features, labels, np.zeros(2000, dtype=int), num_folds=1)


def test_au_model_file_round_trip():
    clean, noisy = _expression_faces(np.random.default_rng(2), 300, 1.0)
    features = au_features(noisy)
    labels = au_scores(clean).argmax(1)
    model = AUModel(ShapeModel.fit(noisy, 8), AUCalibration.fit(features, labels, np.arange(300) % 2, 2), 2, {"a": 1})
    again = AUModel.from_json(model.to_json())
    ids = [f"Manually_Annotated_Images/1/{i}" for i in range(300)]
    for split in ("train", "validation"):
        np.testing.assert_allclose(again.scores(noisy, ids, split), model.scores(noisy, ids, split))
    plain = AUModel()
    np.testing.assert_allclose(plain.scores(noisy, ids, "train"), au_scores(noisy))
    with pytest.raises(ValueError, match="not an AU model"):
        AUModel.from_json({"weights": []})


def _degenerate_faces() -> dict[str, np.ndarray]:
    """Landmarks that are present but unusable, each kind once."""
    face = _prototypes()[1]
    collinear = face.copy()
    collinear[:, 1] = 0.5 * collinear[:, 0] + 3  # every point on one line: the camera has rank 1
    stable_collapsed = face.copy()
    stable_collapsed[STABLE_POINTS] = stable_collapsed[STABLE_POINTS].mean(0)  # the pose points coincide
    one_nan, one_inf = face.copy(), face.copy()
    one_nan[30, 0] = np.nan
    one_inf[8, 1] = np.inf
    return {"all_equal": np.full((68, 2), 112.0), "collinear": collinear, "stable_points_equal": stable_collapsed,
            "one_nan": one_nan, "one_inf": one_inf, "huge": face * 1e300}  # fmt: skip


def test_a_degenerate_face_alone_gives_nan_instead_of_an_error():
    for kind, face in _degenerate_faces().items():
        batch = face[None]
        assert degenerate_landmarks(batch).tolist() == [True], kind
        for function in (au_features, au_intensities, au_scores, frontalise):
            assert np.isnan(function(batch)).all(), (kind, function.__name__)
        assert shape_moments(batch)[0] == 0, kind


def test_a_degenerate_face_in_a_batch_is_nan_and_the_others_are_unchanged():
    normal = _prototypes()  # 8 faces, one per emotion
    bad = _degenerate_faces()
    missing = np.full((68, 2), np.nan)
    batch = np.stack([normal[0], bad["all_equal"], normal[1], missing, *normal[2:], bad["collinear"]])
    flags = degenerate_landmarks(batch)
    assert flags.tolist() == [False, True, False, False] + [False] * 6 + [True]  # missing is not degenerate
    expected = np.full((len(batch), 8), np.nan)
    expected[[0, 2, *range(4, 10)]] = au_scores(normal)  # the same numbers as without the bad rows
    scores = au_scores(batch)
    np.testing.assert_allclose(scores, expected, atol=1e-12)  # NaN where expected is NaN, equal elsewhere
    assert np.isfinite(scores[[0, 2, *range(4, 10)]]).all()
    assert scores[[0, 2, *range(4, 10)]].argmax(1).tolist() == list(range(8))
    model = ShapeModel.fit(_expression_faces(np.random.default_rng(3), 200, 1.0)[1], 8)
    features = au_features(batch, shape_model=model)
    assert np.isnan(features[[1, 3, 10]]).all() and np.isfinite(features[[0, 2, *range(4, 10)]]).all()
    count, total, _ = shape_moments(batch)
    reference_count, reference_total, _ = shape_moments(normal)
    assert count == reference_count == 8
    np.testing.assert_allclose(total, reference_total)


def test_normal_faces_are_not_degenerate_whatever_their_pose_and_scale():
    rng = np.random.default_rng(4)
    faces = [_similarity(face, rng.uniform(-40, 40), rng.uniform(1e-3, 1e3), rng.uniform(-500, 500, 2))
             for face in _prototypes()]  # fmt: skip
    posed = [render_face(rng, np.eye(8)[k], (60.0, 40.0, 30.0), 256, photometric=False)[1] for k in range(8)]
    batch = np.stack(faces + posed)
    assert not degenerate_landmarks(batch).any()
    assert np.isfinite(au_scores(batch)).all()


def test_calibration_reads_the_frontalised_coordinates_too():
    clean, noisy = _expression_faces(np.random.default_rng(3), 400, 1.0)
    features = calibration_features(noisy)
    assert features.shape == (400, 21 + 136)
    np.testing.assert_allclose(features[:, :21], au_features(noisy))  # the AU columns, then the coordinates
    np.testing.assert_allclose(features[:, 21:].reshape(400, 68, 2), frontalise(noisy))
    labels = au_scores(clean).argmax(1)
    row_folds = np.arange(400) % 2
    model = AUModel(None, AUCalibration.fit(features, labels, row_folds, 2), 2)
    ids = [f"id{i}" for i in range(400)]
    scores = model.scores(noisy, ids, "validation")
    assert scores.shape == (400, 8) and ((scores > 0) & (scores < 1)).all()
    # a model fitted on the 21 AU columns alone (an older au_model.json) still scores
    older = AUModel(None, AUCalibration.fit(features[:, :21], labels, row_folds, 2), 2)
    assert older.scores(noisy, ids, "validation").shape == (400, 8)
