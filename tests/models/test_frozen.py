"""The frozen-backbone heads: the fine-tuning path's class balance, cross-validated L2, folding into a classifier."""

import numpy as np
import pytest
import torch

from models.data import OneVsRestSampler
from models.frozen import L2_GRID, LinearHead, balanced_weights, fit_heads, fit_logistic, inner_folds


def test_the_weights_are_the_samplers_expected_epoch():
    rng = np.random.default_rng(0)
    labels = rng.choice(8, size=300, p=[0.3, 0.2, 0.1, 0.1, 0.1, 0.1, 0.08, 0.02])
    labels[:10] = 9  # uncertain: never drawn
    rows = np.arange(40, 300)
    weights = balanced_weights(labels, 1, rows)
    assert weights.sum() == pytest.approx(1.0) and (weights[:40] == 0).all()
    sampler = OneVsRestSampler(labels, rows, 1, seed=0)
    counts = np.zeros(len(labels))
    for epoch in range(2000):
        sampler.set_epoch(epoch)
        counts += np.bincount(sampler.indices(), minlength=len(labels))
    # balanced_cross_entropy: half the loss on the positives' mean, half on the drawn negatives' mean
    positives = labels == 1
    expected = np.where(positives, 0.5 * counts / counts[positives].sum(), 0.5 * counts / counts[~positives].sum())
    for c in range(8):  # each class's share of the loss, and spread evenly over its rows
        members = rows[labels[rows] == c]
        assert weights[members].sum() == pytest.approx(expected[members].sum(), abs=2e-3), c
        assert np.ptp(weights[members]) < 1e-12
    assert abs(weights[positives].sum() - 0.5) < 1e-12


def test_no_positives_or_negatives_is_an_error_or_zero_weights():
    labels = np.array([1, 1, 1, 2])
    with pytest.raises(ValueError, match=r"no training rows with human_label 4 \(fear\)"):
        balanced_weights(labels, 4, np.arange(4))
    with pytest.raises(ValueError, match="no negatives"):
        balanced_weights(labels, 1, np.arange(3))
    assert not balanced_weights(labels, 4, np.arange(4), strict=False).any()


def test_inner_folds_are_independent_of_the_outer_folds():
    from core.schema import folds

    ids = [f"id{i}" for i in range(3000)]
    outer, inner = folds(ids, 3), inner_folds(ids, 3)
    for fold in range(3):  # unsalted, every row of an outer fold would sit in one inner fold
        assert len(np.unique(inner[outer == fold])) == 3


def test_fit_logistic_reaches_the_optimum():
    torch.manual_seed(0)
    x = torch.randn(200, 5, dtype=torch.float64)
    y = (x[:, 0] + 0.5 * torch.randn(200, dtype=torch.float64) > 0).double()[:, None]
    weights = torch.full((200, 1), 1 / 200, dtype=torch.float64)
    w, b = fit_logistic(x, y, weights, torch.tensor([0.01], dtype=torch.float64))
    w, b = w.requires_grad_(), b.requires_grad_()
    loss = torch.nn.functional.binary_cross_entropy_with_logits(x @ w + b, y, weight=weights, reduction="sum")
    (loss + 0.005 * (w * w).sum()).backward()
    assert w.grad.abs().max() < 1e-6 and b.grad.abs().max() < 1e-6
    assert w[0, 0] > 1.0  # it found the signal


def _problem(n=240, d=12, seed=0):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 8, n)
    centres = rng.normal(size=(8, d)) * 1.5
    features = torch.as_tensor(centres[labels] + rng.normal(size=(n, d)), dtype=torch.float32)
    return features, labels, [f"row{i}" for i in range(n)]


def test_heads_learn_and_fold_into_a_classifier():
    features, labels, ids = _problem()
    rows = np.arange(0, 160)
    heads = fit_heads(features, labels, ids, rows, [1, 3])
    for k, head in heads.items():
        assert head.l2 in L2_GRID and len(head.inner_auroc) == len(L2_GRID)
        held = np.arange(160, 240)
        probs = head.probabilities(features[held].numpy())
        from models.metrics import binary_auroc

        assert binary_auroc(probs, labels[held] == k) > 0.9
        # the two-logit classifier gives the head's probability as its softmax's second entry
        linear = torch.nn.Linear(features.shape[1], 2)
        state = head.classifier_state()
        with torch.no_grad():
            linear.weight.copy_(state["weight"])
            linear.bias.copy_(state["bias"])
            folded = linear(features[held]).softmax(-1)[:, 1].numpy()
        np.testing.assert_allclose(folded, probs, atol=1e-5)
        np.testing.assert_allclose(head.logits(features[held].numpy()).softmax(-1)[:, 1].numpy(), probs, atol=1e-12)


def test_only_the_training_rows_are_read():
    features, labels, ids = _problem()
    rows = np.arange(0, 160)
    before = fit_heads(features, labels, ids, rows, [2])
    changed_features, changed_labels = features.clone(), labels.copy()
    changed_features[160:] = 100.0  # other rows' features and labels play no part
    changed_labels[160:] = 2
    after = fit_heads(changed_features, changed_labels, ids, rows, [2])
    np.testing.assert_array_equal(before[2].weight, after[2].weight)
    assert before[2].bias == after[2].bias and before[2].l2 == after[2].l2
    relabelled = labels.copy()
    relabelled[:20] = 2  # and its own rows' labels do
    assert not np.array_equal(fit_heads(features, relabelled, ids, rows, [2])[2].weight, before[2].weight)


def test_a_fixed_l2_skips_the_inner_cross_validation():
    features, labels, ids = _problem()
    heads = fit_heads(features, labels, ids, np.arange(200), [0], l2=0.1)
    assert heads[0].l2 == 0.1 and heads[0].inner_auroc is None
    stronger = fit_heads(features, labels, ids, np.arange(200), [0], l2=10.0)
    assert np.linalg.norm(stronger[0].weight) < np.linalg.norm(heads[0].weight)


def test_a_linear_head_is_plain_numbers():
    head = LinearHead(weight=np.array([1.0, -2.0]), bias=0.5, l2=0.1)
    assert head.probabilities([[0.0, 0.0]])[0] == pytest.approx(1 / (1 + np.exp(-0.5)))
