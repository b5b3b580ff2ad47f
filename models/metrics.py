"""Evaluation metrics of the experts in plain numpy: AUROC, balanced accuracy, calibration error.

They take torch tensors (any device or dtype) or numpy arrays and return Python numbers. They know
nothing of distributed training: callers gather predictions from all processes first (e.g. with
``accelerator.gather_for_metrics``), then compute once.

Example:
    >>> binary_metrics([0.9, 0.2, 0.7, 0.4], [1, 0, 1, 1])["auroc"]
    1.0
"""

from __future__ import annotations

import numpy as np
import torch


def _numpy(values, dtype=None) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu()
        if values.is_floating_point():
            values = values.double()  # numpy has no bfloat16
        values = values.numpy()
    return np.asarray(values, dtype=dtype)


def _binary_targets(targets, n: int) -> np.ndarray:
    targets = _numpy(targets).reshape(-1)
    if targets.shape[0] != n:
        raise ValueError(f"{targets.shape[0]} targets for {n} predictions")
    if not np.isin(targets, (0, 1)).all():
        raise ValueError("binary targets must be 0/1 (or booleans)")
    return targets.astype(bool)


def _binary_scores(scores) -> np.ndarray:
    scores = _numpy(scores, np.float64)
    if scores.ndim > 1 and scores.shape[-1] != 1:
        raise ValueError(f"expected one score per example, got shape {scores.shape}")
    return scores.reshape(-1)


def binary_auroc(scores, targets) -> float:
    """Area under the ROC curve from ranks (Mann-Whitney U): tied scores count half.

    ``nan`` when only one class is present or any score is nan.

    Example:
        >>> binary_auroc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1])
        0.75
    """
    scores = _binary_scores(scores)
    positive = _binary_targets(targets, scores.shape[0])
    n_pos = int(positive.sum())
    n_neg = positive.shape[0] - n_pos
    if n_pos == 0 or n_neg == 0 or np.isnan(scores).any():
        return float("nan")
    # 1-based ranks, tied scores sharing the average rank of their run.
    _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    average_rank = np.cumsum(counts) - (counts - 1) / 2.0
    ranks = average_rank[inverse.reshape(-1)]
    u = ranks[positive].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def balanced_accuracy(predictions, targets, num_classes: int | None = None) -> float:
    """Mean per-class recall over the classes present in ``targets`` (``nan`` when there are none).

    ``predictions`` are class indices ``(N,)`` or scores ``(N, C)`` (arg-maxed); ``num_classes`` only
    bounds the labels (a label outside ``[0, num_classes)`` raises).

    Example:
        >>> balanced_accuracy([0, 0, 0, 0, 1], [0, 0, 0, 1, 1])  # recalls 1 and 1/2
        0.75
    """
    predictions = _numpy(predictions)
    if predictions.ndim == 2:
        predictions = predictions.argmax(-1)
    predictions = predictions.reshape(-1).astype(np.int64)
    targets = _numpy(targets).reshape(-1).astype(np.int64)
    if predictions.shape != targets.shape:
        raise ValueError(f"{predictions.shape[0]} predictions for {targets.shape[0]} targets")
    if targets.size == 0:
        return float("nan")
    if targets.min() < 0 or (num_classes is not None and targets.max() >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes or 'C'}), got {targets.min()}..{targets.max()}")
    length = max(int(targets.max()) + 1, num_classes or 0)
    support = np.bincount(targets, minlength=length)
    hits = np.bincount(targets[predictions == targets], minlength=length)
    present = support > 0
    return float((hits[present] / support[present]).mean())


def expected_calibration_error(probs, targets, n_bins: int = 15) -> float:
    """Expected calibration error over ``n_bins`` equal-width confidence bins, weighted by bin counts.

    Binary: ``probs`` ``(N,)`` is P(positive) and ``targets`` are 0/1; each bin compares its mean
    P(positive) with its fraction of positives (as torchmetrics' binary ECE). Multi-class: ``probs``
    ``(N, C)`` with integer ``targets``; top-label ECE compares each bin's mean top probability with
    its accuracy. Bins are ``[k/n, (k+1)/n)``, the last one closed. ``nan`` for an empty input.

    Example:
        >>> expected_calibration_error([0.25, 0.25, 0.25, 0.25, 0.75, 0.75], [0, 0, 0, 1, 1, 0], n_bins=2)
        0.08333333333333333
    """
    if n_bins < 1:
        raise ValueError(f"n_bins must be positive, got {n_bins}")
    probs = _numpy(probs, np.float64)
    if probs.ndim == 2 and probs.shape[1] > 1:
        targets = _numpy(targets).reshape(-1).astype(np.int64)
        if targets.shape[0] != probs.shape[0]:
            raise ValueError(f"{targets.shape[0]} targets for {probs.shape[0]} predictions")
        confidence = probs.max(1)
        outcome = (probs.argmax(1) == targets).astype(np.float64)
    else:
        confidence = _binary_scores(probs)
        outcome = _binary_targets(targets, confidence.shape[0]).astype(np.float64)
    if confidence.size == 0:
        return float("nan")
    bins = np.clip((confidence * n_bins).astype(np.int64), 0, n_bins - 1)
    gaps = np.bincount(bins, weights=confidence - outcome, minlength=n_bins)
    # sum over bins of (count / N) * |mean confidence - mean outcome| = sum |confidence sum - outcome sum| / N
    return float(np.abs(gaps).sum() / confidence.size)


def binary_metrics(prob_positive, targets, threshold: float = 0.5) -> dict:
    """The one-vs-rest expert's evaluation: AUROC, balanced accuracy, ECE and accuracy at ``threshold``.

    Returns floats ``auroc``, ``balanced_accuracy``, ``ece``, ``accuracy`` (``nan`` where undefined)
    and ints ``positives`` and ``count``.

    Example:
        >>> sorted(binary_metrics([0.9, 0.2], [1, 0]))
        ['accuracy', 'auroc', 'balanced_accuracy', 'count', 'ece', 'positives']
    """
    probs = _binary_scores(prob_positive)
    positive = _binary_targets(targets, probs.shape[0])
    predicted = probs >= threshold
    return {
        "auroc": binary_auroc(probs, positive),
        "balanced_accuracy": balanced_accuracy(predicted, positive, num_classes=2),
        "ece": expected_calibration_error(probs, positive),
        "accuracy": float((predicted == positive).mean()) if probs.size else float("nan"),
        "positives": int(positive.sum()),
        "count": int(probs.size),
    }

def concordance_correlation(predictions, targets) -> float:
    """Lin's concordance correlation coefficient (CCC), the usual valence/arousal metric: 1 is perfect
    agreement, 0 none; it punishes bias and scale errors that Pearson's r ignores.

    Example:
        >>> round(concordance_correlation([0.1, 0.5, -0.3], [0.1, 0.5, -0.3]), 4)
        1.0
    """
    x, y = _numpy(predictions, np.float64).ravel(), _numpy(targets, np.float64).ravel()
    if x.size < 2:
        return float("nan")
    covariance = ((x - x.mean()) * (y - y.mean())).mean()
    denominator = x.var() + y.var() + (x.mean() - y.mean()) ** 2
    return float(2 * covariance / denominator) if denominator > 0 else float("nan")


def valence_arousal_metrics(predictions, targets) -> dict:
    """CCC and RMSE of valence and arousal; ``predictions`` and ``targets`` are (N, 2).

    Example:
        >>> sorted(valence_arousal_metrics([[0.1, 0.2], [0.3, -0.1]], [[0.0, 0.2], [0.4, -0.2]]))
        ['arousal_ccc', 'arousal_rmse', 'count', 'valence_ccc', 'valence_rmse']
    """
    predicted, target = _numpy(predictions, np.float64), _numpy(targets, np.float64)
    result = {"count": int(len(target))}
    for i, name in enumerate(("valence", "arousal")):
        result[f"{name}_ccc"] = concordance_correlation(predicted[:, i], target[:, i])
        result[f"{name}_rmse"] = float(np.sqrt(((predicted[:, i] - target[:, i]) ** 2).mean())) if len(target) else float("nan")
    return result


# --- Facial-expression classifier metrics (the Hard-FER / Soft-FER baselines) ---

AGE_BUCKETS = ((0, 20, "<20"), (20, 40, "20-39"), (40, 60, "40-59"), (60, float("inf"), "60+"))
