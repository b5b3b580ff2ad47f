"""Evaluation metrics in plain numpy: the experts' (AUROC, balanced accuracy, calibration error), the
valence/arousal regressor's (CCC, RMSE) and the FER baselines' (``fer_metrics``).

They take torch tensors (any device or dtype) or numpy arrays and return Python numbers. They know
nothing of distributed training: callers gather predictions from all processes first (e.g. with
``accelerator.gather_for_metrics``), then compute once. Soft labels are independent confidences that do
not sum to 1 (``docs/method.md``); the divergences normalise them with ``core.schema.as_distribution``.

Example:
    >>> binary_metrics([0.9, 0.2, 0.7, 0.4], [1, 0, 1, 1])["auroc"]
    1.0
"""

from __future__ import annotations

import numpy as np
import torch

from core.schema import as_distribution


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


# --- Facial-expression classifier metrics (the FER baselines) ---

AGE_BUCKETS = ((0, 20, "<20"), (20, 40, "20-39"), (40, 60, "40-59"), (60, float("inf"), "60+"))


def age_bucket(age) -> str | None:
    """The age group of the demographic breakdown: ``<20``, ``20-39``, ``40-59``, ``60+`` (None if unknown).

    Example:
        >>> [age_bucket(a) for a in (19.9, 20, 59, 60, None)]
        ['<20', '20-39', '40-59', '60+', None]
    """
    if age is None or not np.isfinite(age):
        return None
    return next(name for low, high, name in AGE_BUCKETS if low <= age < high)


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(-1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(-1, keepdims=True)


def macro_f1(predictions, targets) -> float:
    """Unweighted mean of the per-class F1 over the classes present in ``targets`` or ``predictions``
    (as scikit-learn's ``f1_score(average="macro")``); ``nan`` for an empty input.

    Example:
        >>> macro_f1([0, 0, 1, 1], [0, 1, 1, 1])  # F1 of class 0: 2/3, of class 1: 4/5
        0.7333333333333334
    """
    predictions = _numpy(predictions).reshape(-1).astype(np.int64)
    targets = _numpy(targets).reshape(-1).astype(np.int64)
    if targets.size == 0:
        return float("nan")
    length = int(max(predictions.max(), targets.max())) + 1
    true_positive = np.bincount(targets[predictions == targets], minlength=length)
    support, predicted = np.bincount(targets, minlength=length), np.bincount(predictions, minlength=length)
    present = (support + predicted) > 0
    return float((2 * true_positive[present] / (support[present] + predicted[present])).mean())


def cohen_kappa(predictions, targets) -> float:
    """Cohen's kappa (unweighted): agreement beyond chance, ``(p_o - p_e) / (1 - p_e)``; 0 is chance.

    ``nan`` when chance agreement is already 1 (a single class in both), or for an empty input.

    Example:
        >>> cohen_kappa([0, 1, 0, 1], [0, 0, 1, 1])  # agrees half the time, as chance would
        0.0
    """
    predictions = _numpy(predictions).reshape(-1).astype(np.int64)
    targets = _numpy(targets).reshape(-1).astype(np.int64)
    if targets.size == 0:
        return float("nan")
    length = int(max(predictions.max(), targets.max())) + 1
    observed = float((predictions == targets).mean())
    chance = float((np.bincount(predictions, minlength=length) * np.bincount(targets, minlength=length)).sum())
    chance /= targets.size**2
    return (observed - chance) / (1 - chance) if chance < 1 else float("nan")


def _kl_rows(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    # 0 * log(0 / q) = 0; q is clipped so that a confident wrong prediction gives a large, finite value.
    q = np.clip(q, 1e-12, None)
    terms = np.where(p > 0, p * (np.log(np.where(p > 0, p, 1.0)) - np.log(q)), 0.0)
    return terms.sum(-1)


def kl_divergence(soft_labels, probs) -> float:
    """Mean KL(soft label || predicted distribution) over rows, in nats.

    A soft label holds independent confidences that do not sum to 1: each row is made a distribution with
    ``core.schema.as_distribution`` first (a distribution stays as it is). ``probs`` are the predicted
    distributions, rows summing to 1.

    Example:
        >>> round(kl_divergence([[0.5, 0.5]], [[0.9, 0.1]]), 4)
        0.5108
        >>> round(kl_divergence([[0.8, 0.8]], [[0.9, 0.1]]), 4)  # the same label, as confidences
        0.5108
    """
    p, q = as_distribution(_numpy(soft_labels, np.float64)), _numpy(probs, np.float64)
    return float(_kl_rows(p, q).mean()) if len(p) else float("nan")


def js_divergence(soft_labels, probs) -> float:
    """Mean Jensen-Shannon divergence between soft labels and predicted distributions, in nats (<= ln 2).

    Soft labels are normalised as in ``kl_divergence``; ``probs`` rows sum to 1.

    Example:
        >>> round(js_divergence([[1.0, 0.0]], [[0.0, 1.0]]), 4)  # ln 2
        0.6931
    """
    p, q = as_distribution(_numpy(soft_labels, np.float64)), _numpy(probs, np.float64)
    if not len(p):
        return float("nan")
    m = (p + q) / 2
    return float((0.5 * _kl_rows(p, m) + 0.5 * _kl_rows(q, m)).mean())


def fer_metrics(logits, human_labels, soft_labels=None, groups: dict | None = None, n_bins: int = 15) -> dict:
    """Evaluation of an emotion classifier against human labels (and soft labels), with breakdowns.

    Args:
        logits: ``(N, C)`` class scores (softmax is applied; pass ``log(probs)`` for probabilities).
        human_labels: ``(N,)`` class indices in ``[0, C)``.
        soft_labels: optional ``(N, C)`` soft labels over the same classes: confidences (normalised here
            with ``core.schema.as_distribution``) or distributions; rows with a non-finite value are left
            out of ``kl_divergence`` / ``js_divergence``.
        groups: optional ``{name: (N,) group of each row}`` (e.g. ``subset``, ``gender``, ``ethnicity``,
            ``age``); a row whose group is None or ``""`` is left out of that breakdown.
        n_bins: bins of the expected calibration error of the predicted class.

    Returns a flat dict of Python numbers: ``count``, ``top1_accuracy``, ``top2_accuracy``, ``macro_f1``,
    ``cohen_kappa``, ``ece``, with soft labels ``kl_divergence`` and ``js_divergence`` (nats); per group
    ``{name}_{group}_top1_accuracy`` and ``{name}_{group}_count``, and ``{name}_top1_gap``, the largest
    difference of top-1 accuracy between two groups of ``name``.

    Example:
        >>> m = fer_metrics([[2.0, 0.0], [0.0, 1.0]], [0, 0], groups={"subset": ["easy", "difficult"]})
        >>> m["top1_accuracy"], m["top2_accuracy"], m["subset_easy_top1_accuracy"], m["subset_top1_gap"]
        (0.5, 1.0, 1.0, 1.0)
    """
    logits = _numpy(logits, np.float64)
    if logits.ndim != 2:
        raise ValueError(f"expected logits of shape (N, C), got {logits.shape}")
    labels = _numpy(human_labels).reshape(-1).astype(np.int64)
    count, num_classes = logits.shape
    if labels.shape[0] != count:
        raise ValueError(f"{labels.shape[0]} human labels for {count} predictions")
    if count and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"human labels must lie in [0, {num_classes}), got {labels.min()}..{labels.max()}")
    probs = _softmax(logits)
    predicted = probs.argmax(-1) if count else labels
    # Ties broken by index, like argmax: the label is in the top 2 if fewer than 2 classes beat it.
    above = (probs > probs[np.arange(count), labels][:, None]).sum(-1)
    tied_before = ((probs == probs[np.arange(count), labels][:, None]) & (np.arange(num_classes) < labels[:, None]))
    rank = above + tied_before.sum(-1)
    correct = predicted == labels
    nan = float("nan")
    result = {
        "count": int(count),
        "top1_accuracy": float(correct.mean()) if count else nan,
        "top2_accuracy": float((rank < 2).mean()) if count else nan,
        "macro_f1": macro_f1(predicted, labels),
        "cohen_kappa": cohen_kappa(predicted, labels),
        "ece": expected_calibration_error(probs, labels, n_bins=n_bins) if num_classes > 1 else nan,
    }
    if soft_labels is not None:
        soft = _numpy(soft_labels, np.float64)
        if soft.shape != probs.shape:
            raise ValueError(f"soft labels of shape {soft.shape} for predictions of shape {probs.shape}")
        known = np.isfinite(soft).all(-1)
        result["kl_divergence"] = kl_divergence(soft[known], probs[known])
        result["js_divergence"] = js_divergence(soft[known], probs[known])
    for name, values in (groups or {}).items():
        values = np.asarray(values, dtype=object).reshape(-1)
        if values.shape[0] != count:
            raise ValueError(f"{values.shape[0]} values of group {name!r} for {count} predictions")
        accuracies = {}
        for group in sorted({v for v in values.tolist() if v is not None and v != ""}, key=str):
            rows = np.asarray([v == group for v in values.tolist()], dtype=bool)
            accuracies[group] = float(correct[rows].mean())
            result[f"{name}_{group}_top1_accuracy"] = accuracies[group]
            result[f"{name}_{group}_count"] = int(rows.sum())
        if accuracies:
            result[f"{name}_top1_gap"] = max(accuracies.values()) - min(accuracies.values())
    return result
