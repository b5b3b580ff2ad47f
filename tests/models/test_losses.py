import math

import pytest
import torch
import torch.nn.functional as F

from models.losses import balanced_cross_entropy, label_smoothing_targets, multilabel_bce, soft_cross_entropy


@pytest.fixture
def logits():
    return torch.randn(16, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


def test_soft_cross_entropy_with_one_hot_targets_is_cross_entropy(logits):
    labels = torch.arange(16) % 8
    targets = F.one_hot(labels, 8).double()
    torch.testing.assert_close(soft_cross_entropy(logits, targets), F.cross_entropy(logits, labels))


def test_soft_cross_entropy_with_probability_targets(logits):
    probs = torch.softmax(torch.randn(16, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64), -1)
    torch.testing.assert_close(soft_cross_entropy(logits, probs), F.cross_entropy(logits, probs))


def test_soft_cross_entropy_gradient_matches_torch(logits):
    probs = torch.softmax(torch.randn(16, 8, dtype=torch.float64), -1)
    ours = logits.clone().requires_grad_()
    theirs = logits.clone().requires_grad_()
    soft_cross_entropy(ours, probs).backward()
    F.cross_entropy(theirs, probs).backward()
    assert ours.grad is not None and ours.grad.abs().sum() > 0
    torch.testing.assert_close(ours.grad, theirs.grad)


def test_soft_cross_entropy_of_half_precision_logits_is_float32():
    logits = torch.randn(4, 8).bfloat16()
    loss = soft_cross_entropy(logits, torch.full((4, 8), 1 / 8))
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, F.cross_entropy(logits.float(), torch.full((4, 8), 1 / 8)))


def test_soft_cross_entropy_rejects_mismatched_shapes(logits):
    with pytest.raises(ValueError, match="shape"):
        soft_cross_entropy(logits, torch.arange(16))


def test_balanced_cross_entropy_equals_cross_entropy_on_balanced_batches(logits):
    labels = torch.arange(16) % 8  # two of each class
    torch.testing.assert_close(balanced_cross_entropy(logits, labels), F.cross_entropy(logits, labels))


def test_balanced_cross_entropy_by_hand():
    logits = torch.tensor([[2.0, 0.0]]).repeat(4, 1)  # always predicts class 0
    labels = torch.tensor([0, 0, 0, 1])
    right, wrong = math.log1p(math.exp(-2)), math.log1p(math.exp(2))
    assert balanced_cross_entropy(logits, labels).item() == pytest.approx((right + wrong) / 2)
    # the unbalanced mean lets the three negatives dominate
    assert F.cross_entropy(logits, labels).item() == pytest.approx((3 * right + wrong) / 4)


def test_balanced_cross_entropy_is_inverse_frequency_weighted_cross_entropy(logits):
    labels = torch.tensor([0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 3, 3, 5, 6, 6, 6])  # classes 2, 4, 7 absent
    counts = torch.bincount(labels, minlength=8).double()
    weight = torch.where(counts > 0, 1 / counts.clamp(min=1), torch.zeros_like(counts))
    torch.testing.assert_close(balanced_cross_entropy(logits, labels), F.cross_entropy(logits, labels, weight=weight))
    # absent classes don't count, whatever num_classes says
    torch.testing.assert_close(
        balanced_cross_entropy(logits, labels, num_classes=12), balanced_cross_entropy(logits, labels)
    )


def test_balanced_cross_entropy_gradient_flows(logits):
    logits = logits.clone().requires_grad_()
    balanced_cross_entropy(logits, torch.tensor([0] * 12 + [1] * 4)).backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0


def test_balanced_cross_entropy_of_an_empty_batch_is_zero():
    loss = balanced_cross_entropy(torch.zeros(0, 2, requires_grad=True), torch.zeros(0, dtype=torch.long))
    assert loss.item() == 0.0 and loss.requires_grad


def test_balanced_cross_entropy_rejects_bad_shapes():
    with pytest.raises(ValueError):
        balanced_cross_entropy(torch.zeros(4, 2), torch.zeros(3, dtype=torch.long))


@pytest.mark.parametrize("smoothing", [0.0, 0.1, 0.5, 1.0])
def test_label_smoothing_targets(smoothing):
    labels = torch.tensor([0, 3, 7, 3])
    targets = label_smoothing_targets(labels, 8, smoothing)
    assert targets.shape == (4, 8) and targets.dtype == torch.float32
    torch.testing.assert_close(targets.sum(-1), torch.ones(4))
    assert targets[1, 3].item() == pytest.approx(1 - smoothing + smoothing / 8)
    assert targets[1, 0].item() == pytest.approx(smoothing / 8)
    logits = torch.randn(4, 8)
    torch.testing.assert_close(
        soft_cross_entropy(logits, targets), F.cross_entropy(logits, labels, label_smoothing=smoothing)
    )


def test_label_smoothing_rejects_bad_values():
    with pytest.raises(ValueError):
        label_smoothing_targets(torch.tensor([0]), 2, 1.5)


def test_multilabel_bce_is_binary_cross_entropy_on_each_confidence(logits):
    # Independent confidences in [0, 1] whose rows do not sum to 1, like the release's soft labels.
    confidences = torch.rand(16, 8, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    assert (confidences.sum(-1) - 1).abs().min() > 0.1
    expected = -(confidences * F.logsigmoid(logits) + (1 - confidences) * F.logsigmoid(-logits)).mean()
    torch.testing.assert_close(multilabel_bce(logits, confidences), expected)
    # it is not the soft cross-entropy of the same confidences (a negative control)
    assert abs(multilabel_bce(logits, confidences).item() - soft_cross_entropy(logits, confidences).item()) > 0.1


def test_multilabel_bce_is_lowest_at_the_logits_of_the_confidences():
    confidences = torch.tensor([[0.1, 0.9, 0.5, 0.7]], dtype=torch.float64)
    best = torch.logit(confidences).requires_grad_()
    loss = multilabel_bce(best, confidences)
    loss.backward()
    torch.testing.assert_close(best.grad, torch.zeros_like(best))
    assert multilabel_bce(best.detach() + 0.5, confidences) > loss


def test_multilabel_bce_of_half_precision_logits_is_float32_and_rejects_bad_shapes():
    loss = multilabel_bce(torch.randn(4, 8).bfloat16(), torch.full((4, 8), 0.3))
    assert loss.dtype == torch.float32
    with pytest.raises(ValueError, match="shape"):
        multilabel_bce(torch.zeros(4, 8), torch.zeros(4, 7))
