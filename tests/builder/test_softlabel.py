import numpy as np
import pytest

from builder.softlabel import (
    FusionConfig,
    SubsetConfig,
    fit_fusion,
    fuse,
    one_vs_rest_log_likelihood,
    subsets,
    validate,
)


def _one_hot(k, confidence=0.9):
    row = np.full(8, (1 - confidence) / 7)
    row[k] = confidence
    return row


def test_fusion_mixes_raw_confidences_by_lambda_without_renormalising():
    experts = np.array([[0.9, 0.9, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]])  # one-vs-rest scores need not sum to 1
    au = np.eye(8)[[2]] * 0.6
    fused = fuse(experts, au, FusionConfig(expert_weight=0.5))
    np.testing.assert_allclose(fused[0, :3], [0.45, 0.45, 0.3])
    assert fused.sum() == pytest.approx(1.2)  # s_k = λ f_k + (1 - λ) a_k, per emotion
    np.testing.assert_allclose(fuse(experts, au, FusionConfig(expert_weight=1.0)), experts)
    np.testing.assert_allclose(fuse(experts, au, FusionConfig(expert_weight=0.0)), au)
    validate(fused)


def test_rows_without_landmarks_fall_back_to_experts_and_vice_versa():
    experts = np.stack([_one_hot(1), _one_hot(1), np.full(8, np.nan)])
    au = np.stack([_one_hot(3), np.full(8, np.nan), _one_hot(3)])
    fused = fuse(experts, au, FusionConfig(expert_weight=0.7))
    np.testing.assert_allclose(fused[1], experts[1])
    np.testing.assert_allclose(fused[2], au[2])
    assert fused[0].argmax() == 1
    with pytest.raises(ValueError, match="neither"):
        fuse(np.full((1, 8), np.nan), np.full((1, 8), np.nan), FusionConfig())


def _release_rule(soft, human):
    """The release's rule, written out: rank of s_h (ties against h) 1 easy, 2-3 challenging, >= 4 difficult."""
    out = []
    for row, h in zip(soft, human):
        if not 0 <= h < 8:
            out.append(-1)
            continue
        rank = sum(row[j] >= row[h] for j in range(8) if j != h) + 1
        out.append(0 if rank == 1 else 1 if rank <= 3 else 2)
    return out


def test_subsets_follow_the_release_rank_rule_by_default():
    soft = np.array(
        [
            [0.1, 0.8, 0.2, 0.1, 0.1, 0.1, 0.1, 0.1],  # h=1 first: easy
            [0.1, 0.3, 0.2, 0.1, 0.1, 0.1, 0.1, 0.1],  # h=1 first even at 0.3 (no confidence bound): easy
            [0.3, 0.35, 0.2, 0.05, 0.04, 0.03, 0.02, 0.01],  # h=0 second: challenging
            [0.3, 0.35, 0.2, 0.05, 0.04, 0.03, 0.02, 0.01],  # h=2 third: challenging
            [0.3, 0.35, 0.2, 0.05, 0.04, 0.03, 0.02, 0.01],  # h=3 fourth: difficult
            [0.5, 0.5, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1],  # h=1 tied for first: the tie counts against h
            [0.1, 0.9, 0.2, 0.1, 0.1, 0.1, 0.1, 0.1],  # h=9 (uncertain): no subset
        ]
    )
    human = np.array([1, 1, 0, 2, 3, 1, 9])
    expected = [0, 0, 1, 1, 2, 1, -1]
    assert subsets(soft, human).tolist() == expected == _release_rule(soft, human)
    assert subsets(soft, human, SubsetConfig()).tolist() == expected
    rng = np.random.default_rng(0)  # and on random independent confidences, ties included
    random_soft = np.round(rng.uniform(0.05, 1, (2000, 8)), 1)
    random_human = rng.integers(0, 11, 2000)
    assert subsets(random_soft, random_human).tolist() == _release_rule(random_soft, random_human)
    # A negative control: the earlier rule (ties in h's favour, rank >= 3 difficult) disagrees.
    assert subsets(random_soft, random_human, SubsetConfig(difficult_min_rank=3)).tolist() != _release_rule(
        random_soft, random_human)
    # Thresholds stay configurable.
    bounded = SubsetConfig(easy_min_confidence=0.5, difficult_max_confidence=0.15, difficult_min_rank=3)
    assert subsets(soft, human, bounded).tolist() == [0, 1, 1, 2, 2, 1, -1]
    assert "r >= 3 or s_h < 0.15" in bounded.describe() and "r >= 4" in SubsetConfig().describe()
    with pytest.warns(DeprecationWarning, match="SubsetConfig"):  # a FusionConfig holds no thresholds
        assert subsets(soft, human, FusionConfig()).tolist() == expected
    with pytest.raises(TypeError, match="SubsetConfig"):
        subsets(soft, human, {"easy_min_confidence": 0.9})


def test_validation_names_bad_rows():
    good = np.stack([_one_hot(0), _one_hot(5)])
    validate(good)
    validate(np.full((2, 8), 0.9))  # independent confidences: the sum is not checked
    for bad in (np.nan, -0.1, 1.5, np.inf):
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
        SubsetConfig(easy_min_confidence=0.1, difficult_max_confidence=0.2)
    with pytest.raises(ValueError):
        SubsetConfig(difficult_min_rank=1)


def test_fit_recovers_the_informative_input():
    rng = np.random.default_rng(0)
    human = rng.integers(0, 8, 4000)
    knows = np.clip(np.eye(8)[human] * 0.7 + rng.uniform(0.05, 0.25, (4000, 8)), 0, 1)  # informative presences
    noise = rng.uniform(0, 1, (4000, 8))
    fitted, info = fit_fusion(knows, noise, human, FusionConfig(fit=True))
    assert fitted.expert_weight >= 0.9
    assert not fitted.fit and info["rows"] == 4000
    assert info["mean_log_likelihood"] == pytest.approx(
        one_vs_rest_log_likelihood(fuse(knows, noise, fitted), human), abs=1e-4)
    swapped, _ = fit_fusion(noise, knows, human, FusionConfig(fit=True))
    assert swapped.expert_weight <= 0.1
    # Two half-informative inputs: the fit mixes them.
    half = np.where(rng.uniform(size=(4000, 1)) < 0.5, knows, noise)
    other = np.where(np.isclose(half, knows).all(1, keepdims=True), noise, knows)
    mixed, _ = fit_fusion(half, other, human, FusionConfig(fit=True))
    assert 0.2 < mixed.expert_weight < 0.8
    # rows without an emotion label are not used; none at all is an error
    _, info = fit_fusion(knows, noise, np.where(np.arange(4000) < 1000, 9, human), FusionConfig(fit=True))
    assert info["rows"] == 3000
    with pytest.raises(ValueError, match="human label 0-7"):
        fit_fusion(knows, noise, np.full(4000, 10), FusionConfig(fit=True))
