"""Losses of the project's models, computed explicitly.

transformers 5 picks a loss from the labels' dtype (BCE for float labels, whatever they mean), which is
wrong for a distribution over mutually exclusive classes and for the experts' class-balanced objective;
the training loop calls these on the logits instead, and each model says which one it learns. None of
them syncs with the host, so they are cheap on GPU.

Soft labels are 8 independent per-emotion confidences that do not sum to 1 (``docs/method.md``):
``soft_cross_entropy`` takes a distribution, which the caller makes with ``core.schema.as_distribution``;
``multilabel_bce`` takes the confidences as they are.

Example:
    >>> import torch
    >>> logits = torch.randn(4, 8)
    >>> soft_cross_entropy(logits, label_smoothing_targets(torch.tensor([0, 1, 2, 3]), 8, 0.1)).dim()
    0
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _float32_at_least(logits: Tensor) -> Tensor:
    # Half-precision log-softmax loses the small probabilities soft targets weigh; float64 stays float64.
    return logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits


def soft_cross_entropy(logits: Tensor, target: Tensor) -> Tensor:
    """Cross-entropy against probability targets: ``-(target * log_softmax(logits)).sum(-1).mean()``.

    ``target`` has the logits' shape and its rows are distributions summing to 1 (not checked: that would
    sync with the host). A soft label is not one: pass ``core.schema.as_distribution`` of it, over the
    model's classes.

    Example:
        >>> soft_cross_entropy(torch.zeros(1, 2), torch.tensor([[0.5, 0.5]])).item()  # log 2
        0.6931471824645996
    """
    if target.shape != logits.shape:
        raise ValueError(f"target shape {tuple(target.shape)} != logits shape {tuple(logits.shape)}")
    log_probs = F.log_softmax(_float32_at_least(logits), dim=-1)
    return -(target.to(log_probs.dtype) * log_probs).sum(-1).mean()


def multilabel_bce(logits: Tensor, target: Tensor) -> Tensor:
    """Binary cross-entropy of each output's sigmoid against an independent confidence in [0, 1], averaged
    over rows and classes: the multi-label reading of a soft label, each emotion present to some extent.

    ``target`` has the logits' shape; its rows need not sum to anything.

    Example:
        >>> round(multilabel_bce(torch.zeros(1, 2), torch.tensor([[0.9, 0.6]])).item(), 4)  # log 2
        0.6931
    """
    if target.shape != logits.shape:
        raise ValueError(f"target shape {tuple(target.shape)} != logits shape {tuple(logits.shape)}")
    logits = _float32_at_least(logits)
    return F.binary_cross_entropy_with_logits(logits, target.to(logits.dtype))


def balanced_cross_entropy(logits: Tensor, labels: Tensor, num_classes: int | None = None) -> Tensor:
    """Class-balanced cross-entropy: the mean over classes present in the batch of each class's mean CE.

    Every present class weighs the same whatever its count, so a one-vs-rest expert (two logits) is not
    swamped by its negatives: for two classes this is the "balanced BCE". ``num_classes`` defaults to
    the logits' last dimension. An empty batch gives 0.

    Example:
        >>> logits = torch.tensor([[2.0, 0.0]]).repeat(4, 1)  # always says class 0
        >>> round(balanced_cross_entropy(logits, torch.tensor([0, 0, 0, 1])).item(), 4)  # (0.1269 + 2.1269) / 2
        1.1269
    """
    if logits.dim() != 2 or labels.shape != logits.shape[:1]:
        raise ValueError(f"expected logits (N, C) and labels (N,), got {tuple(logits.shape)} and {tuple(labels.shape)}")
    num_classes = logits.shape[-1] if num_classes is None else num_classes
    per_sample = F.cross_entropy(_float32_at_least(logits), labels, reduction="none")
    sums = per_sample.new_zeros(num_classes).index_add(0, labels, per_sample)
    counts = per_sample.new_zeros(num_classes).index_add(0, labels, torch.ones_like(per_sample))
    present = (counts > 0).to(per_sample.dtype)
    # Dividing by clamped counts instead of indexing the present classes keeps the shapes static (no sync).
    return (sums / counts.clamp(min=1)).sum() / present.sum().clamp(min=1)


def label_smoothing_targets(labels: Tensor, num_classes: int, smoothing: float) -> Tensor:
    """One-hot targets smoothed as ``F.cross_entropy(label_smoothing=...)`` does: ``(1 - s) * onehot + s / C``.

    Example:
        >>> label_smoothing_targets(torch.tensor([1]), 4, 0.2)
        tensor([[0.0500, 0.8500, 0.0500, 0.0500]])
    """
    if not 0.0 <= smoothing <= 1.0:
        raise ValueError(f"smoothing must be in [0, 1], got {smoothing}")
    one_hot = F.one_hot(labels.long(), num_classes).to(torch.float32)
    return one_hot * (1.0 - smoothing) + smoothing / num_classes
