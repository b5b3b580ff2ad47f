import numpy as np
import pytest

from affectnet_plus import EMOTIONS
from builder.au import AUS, AUConfig, au_intensities, au_scores, frontalise, reference_landmarks
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
    np.testing.assert_allclose(scores.sum(1), 1, atol=1e-9)
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
