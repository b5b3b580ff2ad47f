import numpy as np
import pytest

from builder.softlabel import FusionConfig, SubsetConfig, fit_fusion, fuse, normalise, subsets, validate


def _one_hot(k, confidence=0.9):
    row = np.full(8, (1 - confidence) / 7)
    row[k] = confidence
    return row


def test_fusion_mixes_normalised_inputs_by_lambda():
    experts = np.array([[0.9, 0.9, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]])  # one-vs-rest scores need not sum to 1
    au = np.eye(8)[[2]]
    fused = fuse(experts, au, FusionConfig(expert_weight=0.5))
    np.testing.assert_allclose(fused[0, :3], [0.25, 0.25, 0.5])
    np.testing.assert_allclose(fuse(experts, au, FusionConfig(expert_weight=1.0))[0, :2], [0.5, 0.5])
    validate(fused)


def test_temperature_sharpens_and_flattens():
    p = np.array([[0.5, 0.3, 0.2, 0, 0, 0, 0, 0]])
    entropy = lambda s: -(s * np.log(np.where(s > 0, s, 1))).sum()  # noqa: E731
    sharp = fuse(p, p, FusionConfig(temperature=0.5))
    flat = fuse(p, p, FusionConfig(temperature=2.0))
    plain = fuse(p, p, FusionConfig())
    assert entropy(sharp) < entropy(plain) < entropy(flat)
    assert sharp.argmax() == plain.argmax() == flat.argmax() == 0


def test_rows_without_landmarks_fall_back_to_experts_and_vice_versa():
    experts = np.stack([_one_hot(1), _one_hot(1), np.full(8, np.nan)])
    au = np.stack([_one_hot(3), np.full(8, np.nan), _one_hot(3)])
    fused = fuse(experts, au, FusionConfig(expert_weight=0.7))
    np.testing.assert_allclose(fused[1], normalise(experts[1]))
    np.testing.assert_allclose(fused[2], au[2])
    assert fused[0].argmax() == 1
    with pytest.raises(ValueError, match="neither"):
        fuse(np.full((1, 8), np.nan), np.full((1, 8), np.nan), FusionConfig())


def test_subsets_follow_the_rank_and_confidence_rule():
    config = SubsetConfig()
    soft = np.stack(
        [
            _one_hot(1, 0.8),  # h=1 ranks first with 0.8: easy
            _one_hot(1, 0.4),  # h=1 ranks first with 0.4: challenging
            np.array([0.3, 0.35, 0.2, 0.05, 0.04, 0.03, 0.02, 0.01]),  # h=0 ranks second with 0.3: challenging
            np.array([0.3, 0.35, 0.2, 0.05, 0.04, 0.03, 0.02, 0.01]),  # h=2 ranks third: difficult
            np.array([0.1, 0.2, 0.12, 0.14, 0.11, 0.11, 0.11, 0.11]),  # h=0: s_h < 0.15: difficult
            _one_hot(1),  # h=9 (uncertain): no subset
        ]
    )
    human = np.array([1, 1, 0, 2, 0, 9])
    assert subsets(soft, human, config).tolist() == [0, 1, 1, 2, 2, -1]
    assert subsets(soft, human).tolist() == [0, 1, 1, 2, 2, -1]  # the defaults
    assert subsets(soft, human, SubsetConfig(easy_min_confidence=0.9)).tolist() == [1, 1, 1, 2, 2, -1]
    with pytest.warns(DeprecationWarning, match="SubsetConfig"):  # a FusionConfig holds no thresholds
        assert subsets(soft, human, FusionConfig()).tolist() == [0, 1, 1, 2, 2, -1]
    with pytest.raises(TypeError, match="SubsetConfig"):
        subsets(soft, human, {"easy_min_confidence": 0.9})


def test_validation_names_bad_rows():
    good = np.stack([_one_hot(0), _one_hot(5)])
    validate(good)
    for bad in (np.nan, -0.1, 0.5):
        rows = good.copy()
        rows[1, 2] = bad
        with pytest.raises(ValueError, match=r"rows \[1\]"):
            validate(rows)
    with pytest.raises(ValueError, match="shape"):
        validate(np.ones((2, 7)) / 7)


def test_config_is_checked():
    with pytest.raises(ValueError):
        FusionConfig(expert_weight=1.5)
    with pytest.raises(ValueError):
        FusionConfig(temperature=0)
    with pytest.raises(ValueError):
        SubsetConfig(easy_min_confidence=0.1, difficult_max_confidence=0.2)
    with pytest.raises(ValueError):
        SubsetConfig(difficult_min_rank=1)


def test_fit_recovers_the_informative_input_and_the_sharpness():
    rng = np.random.default_rng(0)
    truth = rng.dirichlet(np.full(8, 0.5), 4000)
    human = np.array([rng.choice(8, p=t) for t in truth])  # annotators sample what they perceive
    blurred = truth ** (1 / 2.0)  # an input twice as flat as the truth (in log space): T = 0.5 undoes it
    noise = rng.dirichlet(np.ones(8), 4000)
    fitted, info = fit_fusion(blurred, noise, human, FusionConfig(fit=True))
    assert fitted.expert_weight >= 0.9 and 0.4 <= fitted.temperature <= 0.6
    assert not fitted.fit and info["rows"] == 4000
    swapped, _ = fit_fusion(noise, blurred, human, FusionConfig(fit=True))
    assert swapped.expert_weight <= 0.1
    # rows without an emotion label are not used; none at all is an error
    _, info = fit_fusion(blurred, noise, np.where(np.arange(4000) < 1000, 9, human), FusionConfig(fit=True))
    assert info["rows"] == 3000
    with pytest.raises(ValueError, match="human label 0-7"):
        fit_fusion(blurred, noise, np.full(4000, 10), FusionConfig(fit=True))
