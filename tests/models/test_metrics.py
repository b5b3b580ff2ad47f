import math

import numpy as np
import pytest
import torch

from models.metrics import balanced_accuracy, binary_auroc, binary_metrics, expected_calibration_error


def _pairwise_auroc(scores, targets) -> float:
    pos, neg = scores[targets == 1], scores[targets == 0]
    wins = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return wins / (len(pos) * len(neg))


def _looped_ece(confidence, outcome, n_bins) -> float:
    total = 0.0
    for k in range(n_bins):
        low, high = k / n_bins, (k + 1) / n_bins
        in_bin = (confidence >= low) & ((confidence < high) if k < n_bins - 1 else (confidence <= high))
        if in_bin.any():
            total += in_bin.mean() * abs(confidence[in_bin].mean() - outcome[in_bin].mean())
    return total


@pytest.mark.parametrize("seed", range(5))
def test_auroc_matches_pairwise_count_with_ties(seed):
    rng = np.random.default_rng(seed)
    targets = rng.integers(0, 2, 300)
    scores = np.round(rng.normal(targets * 0.7, 1.0), 1)  # rounding makes many ties
    assert len(np.unique(scores)) < 100
    assert binary_auroc(scores, targets) == pytest.approx(_pairwise_auroc(scores, targets), abs=1e-12)
    assert binary_auroc(torch.tensor(scores), torch.tensor(targets)) == pytest.approx(binary_auroc(scores, targets))


def test_auroc_extremes():
    targets = np.array([0, 0, 1, 1, 0, 1])
    scores = np.array([0.1, 0.2, 0.8, 0.9, 0.3, 0.7])
    assert binary_auroc(scores, targets) == 1.0
    assert binary_auroc(-scores, targets) == 0.0
    assert binary_auroc(np.full(6, 0.4), targets) == 0.5
    assert binary_auroc(torch.tensor(scores).bfloat16(), torch.tensor(targets).bool()) == 1.0


def test_auroc_is_nan_when_undefined():
    assert math.isnan(binary_auroc([0.1, 0.9], [1, 1]))
    assert math.isnan(binary_auroc([0.1, 0.9], [0, 0]))
    assert math.isnan(binary_auroc([float("nan"), 0.9], [0, 1]))


def test_auroc_rejects_bad_targets():
    with pytest.raises(ValueError):
        binary_auroc([0.1, 0.9], [0, 2])
    with pytest.raises(ValueError):
        binary_auroc([0.1, 0.9, 0.5], [0, 1])
    with pytest.raises(ValueError):
        binary_auroc(np.zeros((3, 2)), [0, 1, 1])


def test_balanced_accuracy_on_an_imbalanced_example():
    targets = [0] * 8 + [1] * 2
    predictions = [0] * 8 + [0, 1]  # always right on the majority, half right on the minority
    assert balanced_accuracy(predictions, targets) == pytest.approx((1.0 + 0.5) / 2)
    # plain accuracy would be 0.9
    assert balanced_accuracy(torch.tensor(predictions), torch.tensor(targets)) == pytest.approx(0.75)


def test_balanced_accuracy_ignores_absent_classes_and_argmaxes_scores():
    targets = np.array([0, 0, 2, 2, 2, 2])
    predictions = np.array([0, 1, 2, 2, 2, 0])
    expected = (1 / 2 + 3 / 4) / 2  # class 1 never occurs among targets
    assert balanced_accuracy(predictions, targets, num_classes=3) == pytest.approx(expected)
    scores = np.eye(3)[predictions] * 0.8 + 0.1
    assert balanced_accuracy(scores, targets) == pytest.approx(expected)


def test_balanced_accuracy_edge_cases():
    assert math.isnan(balanced_accuracy([], []))
    with pytest.raises(ValueError):
        balanced_accuracy([0, 1], [0, 3], num_classes=3)
    with pytest.raises(ValueError):
        balanced_accuracy([0, 1], [0, 1, 1])


def test_ece_is_zero_for_calibrated_bins():
    # 25% of the 0.25s and 75% of the 0.75s are positive
    probs = [0.25] * 4 + [0.75] * 4
    targets = [1, 0, 0, 0] + [1, 1, 1, 0]
    assert expected_calibration_error(probs, targets, n_bins=10) == pytest.approx(0.0, abs=1e-12)


def test_ece_binary_by_hand():
    probs = [0.25, 0.25, 0.25, 0.25, 0.75, 0.75]
    targets = [0, 0, 0, 0, 1, 0]
    # bin [0, 0.5): 4 examples, confidence 0.25, positives 0 -> gap 0.25; bin [0.5, 1]: 2, 0.75 vs 0.5 -> 0.25
    assert expected_calibration_error(probs, targets, n_bins=2) == pytest.approx(4 / 6 * 0.25 + 2 / 6 * 0.25)


def test_ece_multiclass_by_hand():
    probs = np.array([[0.9, 0.1], [0.6, 0.4], [0.3, 0.7], [0.2, 0.8]])
    targets = np.array([0, 1, 1, 1])  # top labels 0, 0, 1, 1: right, wrong, right, right
    # one example per bin: |0.9 - 1| + |0.6 - 0| + |0.7 - 1| + |0.8 - 1|, each weighing 1/4
    assert expected_calibration_error(probs, targets, n_bins=10) == pytest.approx((0.1 + 0.6 + 0.3 + 0.2) / 4)
    # with two bins all four share the upper bin: mean confidence 0.75, accuracy 0.75
    assert expected_calibration_error(torch.tensor(probs), torch.tensor(targets), n_bins=2) == pytest.approx(0.0)


@pytest.mark.parametrize("n_bins", [1, 7, 15])
def test_ece_matches_a_looped_reference(n_bins):
    rng = np.random.default_rng(n_bins)
    probs = rng.uniform(0, 1, 500)
    probs[:5] = [0.0, 1.0, 0.5, 0.25, 0.75]
    targets = (rng.uniform(0, 1, 500) < probs**2).astype(int)
    ece = expected_calibration_error(probs, targets, n_bins=n_bins)
    assert 0.0 <= ece <= 1.0
    assert ece == pytest.approx(_looped_ece(probs, targets.astype(float), n_bins))
    logits = rng.normal(size=(500, 8)) * 2
    probs8 = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    labels = rng.integers(0, 8, 500)
    correct = (probs8.argmax(1) == labels).astype(float)
    assert expected_calibration_error(probs8, labels, n_bins) == pytest.approx(
        _looped_ece(probs8.max(1), correct, n_bins)
    )


def test_ece_edge_cases():
    assert math.isnan(expected_calibration_error([], []))
    with pytest.raises(ValueError):
        expected_calibration_error([0.5], [1], n_bins=0)


def test_binary_metrics_keys_and_ranges():
    rng = np.random.default_rng(0)
    targets = (rng.uniform(size=200) < 0.2).astype(int)
    probs = np.clip(targets * 0.4 + rng.uniform(0, 0.6, 200), 0, 1)
    metrics = binary_metrics(torch.tensor(probs, dtype=torch.float32), torch.tensor(targets))
    assert set(metrics) == {"auroc", "balanced_accuracy", "ece", "accuracy", "positives", "count"}
    for name in ("auroc", "balanced_accuracy", "ece", "accuracy"):
        assert isinstance(metrics[name], float) and 0.0 <= metrics[name] <= 1.0
    assert metrics["positives"] == int(targets.sum()) and metrics["count"] == 200
    assert isinstance(metrics["positives"], int) and isinstance(metrics["count"], int)
    assert metrics["auroc"] == pytest.approx(binary_auroc(probs, targets), abs=1e-6)
    assert metrics["accuracy"] == pytest.approx(((probs >= 0.5) == targets).mean())


def test_binary_metrics_threshold():
    probs, targets = [0.9, 0.6, 0.4, 0.1], [1, 0, 1, 0]
    assert binary_metrics(probs, targets)["balanced_accuracy"] == 0.5
    assert binary_metrics(probs, targets, threshold=0.3)["balanced_accuracy"] == 0.75
    perfect = binary_metrics([0.9, 0.8, 0.2], [1, 1, 0])
    assert perfect["auroc"] == 1.0 and perfect["accuracy"] == 1.0 and perfect["balanced_accuracy"] == 1.0
