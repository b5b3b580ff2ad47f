"""One-vs-rest heads on frozen backbone features: class-balanced, L2-regularised logistic regressions.

With ``--freeze-backbone`` (``docs/method.md`` §2) an expert is its backbone, unchanged, plus a linear head
fitted on the backbone's features (``models.features``). The head of emotion k is a logistic regression of
``h == k`` on the standardised features, fitted by LBFGS on the full training set with the weights that
make its loss the expectation of the fine-tuning path's: ``OneVsRestSampler`` draws every positive and as
many negatives, water-filled evenly over the other seven emotions, and ``balanced_cross_entropy`` averages
the two class means (``balanced_weights``). The L2 strength, one for the heads of a fold, is chosen from
``L2_GRID`` by an inner cross-validation on their own training rows (``inner_folds``: a salted hash of
``image_id``, independent of the outer folds), by the mean AUROC of the inner held-out rows. The fitted head is then
folded back into the two-logit classifier of the image classifier (``LinearHead.classifier_state``), so
a frozen expert is an ordinary checkpoint.

Example:
    >>> import numpy as np, torch
    >>> labels = np.array([1, 1, 0, 2, 3, 1, 0, 2])
    >>> balanced_weights(labels, 1, np.arange(8)).round(3).tolist()
    [0.167, 0.167, 0.083, 0.083, 0.167, 0.167, 0.083, 0.083]
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from core.schema import EMOTIONS, folds
from models.metrics import binary_auroc

L2_GRID = tuple(float(v) for v in 10.0 ** np.arange(-2.0, 2.01, 0.5))  # 0.01 .. 100, on the mean loss
SMALL_PROBLEM = 4_000_000  # rows x features up to which the fit runs on one thread
INNER_FOLDS = 3
MAX_ITER = 500
TOLERANCE = 1e-9  # LBFGS's gradient tolerance of a head's fit: float64 reaches the optimum
# The inner cross-validation's fits only rank the strengths by AUROC, so they stop earlier: on the demo's
# 5 folds a stop at 1e-5 picks the same strength as one at 1e-9 in every fold, in half the time.
INNER_TOLERANCE = 1e-5
_INNER_SALT = "#inner"  # the inner folds must not coincide with the outer ones (both hash image_id)


def balanced_weights(labels: np.ndarray, emotion: int, rows: np.ndarray, strict: bool = True) -> np.ndarray:
    """Per-row loss weights (``len(labels)``, summing to 1) of emotion ``emotion``'s head over ``rows``.

    Positives (``label == emotion``) share 1/2; the negatives share the other 1/2 as
    ``OneVsRestSampler``'s epochs draw them: ``min(#positives, #negatives)`` places water-filled evenly
    over the other emotions (one with too few rows gives all it has), a class's places spread over its
    rows. Rows outside ``rows`` or labelled 8-10 weigh 0. Without positives or negatives: ``ValueError``,
    or all zeros when not ``strict``.
    """
    labels = np.asarray(labels)
    rows = np.asarray(rows, dtype=np.int64)
    rows = rows[labels[rows] < len(EMOTIONS)]
    weights = np.zeros(len(labels))
    positives = rows[labels[rows] == emotion]
    negatives = {c: rows[labels[rows] == c] for c in range(len(EMOTIONS)) if c != emotion}
    total_negatives = sum(len(r) for r in negatives.values())
    if not strict and (len(positives) == 0 or total_negatives == 0):
        return weights
    if len(positives) == 0:
        raise ValueError(f"no training rows with human_label {emotion} ({EMOTIONS[emotion]}): nothing to learn")
    if total_negatives == 0:
        raise ValueError(f"no training rows of any other emotion than {EMOTIONS[emotion]}: no negatives")
    places = float(min(len(positives), total_negatives))
    quotas = dict.fromkeys(negatives, 0.0)
    open_classes = [c for c, r in negatives.items() if len(r)]
    remaining = places
    while remaining > 1e-9 and open_classes:  # water-filling, in real numbers: no leftovers to draw at random
        share = remaining / len(open_classes)
        for c in open_classes:
            quotas[c] += min(share, len(negatives[c]) - quotas[c])
        remaining = places - sum(quotas.values())
        open_classes = [c for c in open_classes if quotas[c] < len(negatives[c]) - 1e-9]
    weights[positives] = 0.5 / len(positives)
    for c, members in negatives.items():
        if len(members):
            weights[members] = 0.5 * quotas[c] / (len(members) * places)
    return weights


def inner_folds(image_ids, num_folds: int = INNER_FOLDS) -> np.ndarray:
    """The inner cross-validation fold of each row: ``fold_of`` of the salted id, so it is stable and
    independent of the outer fold (the same hash unsalted would put each outer fold in one inner fold)."""
    return folds([f"{i}{_INNER_SALT}" for i in image_ids], num_folds)


def fit_logistic(x: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor, l2: torch.Tensor,
                 max_iter: int = MAX_ITER, init=None, tolerance: float = TOLERANCE) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """C independent weighted logistic regressions on shared features, fitted together by LBFGS.

    ``x`` (N, D), ``targets`` and ``weights`` (N, C), ``l2`` (C,). Column c minimises
    ``sum_i weights[i, c] * BCE(x_i . w_c + b_c, targets[i, c]) + l2[c] / 2 * |w_c|^2`` (the bias is not
    penalised); the objective is a sum over the columns, so one LBFGS solves them all. ``init`` is a
    starting ``(w, b)`` (a warm start along a path of strengths); LBFGS stops when no gradient entry exceeds
    ``tolerance`` (or the loss changes by under a thousandth of it). Returns ``(w (D, C), b (C,))``.
    """
    d, c = x.shape[1], targets.shape[1]
    start = init or (torch.zeros(d, c, dtype=x.dtype, device=x.device), torch.zeros(c, dtype=x.dtype, device=x.device))
    w = start[0].detach().clone().requires_grad_(True)
    b = start[1].detach().clone().requires_grad_(True)
    optimizer = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, history_size=20, tolerance_grad=tolerance,
                                  tolerance_change=tolerance * 1e-3, line_search_fn="strong_wolfe")  # fmt: skip

    def closure():
        optimizer.zero_grad()
        logits = x @ w + b
        loss = F.binary_cross_entropy_with_logits(logits, targets, weight=weights, reduction="sum")
        loss = loss + 0.5 * (l2 * (w * w).sum(0)).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    return w.detach(), b.detach()


@dataclass
class LinearHead:
    """A fitted head, on the raw features: ``logit = features @ weight + bias`` is the log-odds of the
    emotion. ``l2`` is the strength used, ``inner_auroc`` the inner cross-validation's mean AUROC of each
    grid value, in ascending order of strength (None when ``l2`` was given)."""

    weight: np.ndarray
    bias: float
    l2: float
    inner_auroc: list[float] | None = None
    train_loss: float | None = None

    def log_odds(self, features) -> np.ndarray:
        return np.asarray(features, dtype=np.float64) @ self.weight + self.bias

    def probabilities(self, features) -> np.ndarray:
        """P(emotion present) of each row of ``features`` (N, D)."""
        return 1.0 / (1.0 + np.exp(-self.log_odds(features)))

    def logits(self, features) -> torch.Tensor:
        """The two logits ``(not_k, k)`` of the folded classifier: softmax(...)[:, 1] is ``probabilities``."""
        z = torch.as_tensor(self.log_odds(features))
        return torch.stack([torch.zeros_like(z), z], 1)

    def classifier_state(self, dtype=torch.float32) -> dict[str, torch.Tensor]:
        """``classifier.weight`` (2, D) and ``classifier.bias`` (2,) of the image classifier: the first
        logit is 0, the second the log-odds, so the softmax's second probability is the head's."""
        weight = torch.zeros(2, len(self.weight), dtype=torch.float64)
        weight[1] = torch.as_tensor(self.weight)
        bias = torch.tensor([0.0, self.bias], dtype=torch.float64)
        return {"weight": weight.to(dtype), "bias": bias.to(dtype)}


def _standardise(features: torch.Tensor, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    subset = features[torch.as_tensor(rows)]
    return subset.mean(0), subset.std(0, unbiased=False) + 1e-6


def _row_space(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(z, basis)`` with ``x = z @ basis``, ``basis`` orthonormal rows, when there are fewer rows than features.

    An L2-penalised linear model's weights lie in the span of the rows (the penalty only grows outside it),
    so fitting ``z`` and mapping back with ``basis`` is the same fit, in at most N dimensions.
    """
    if x.shape[0] >= x.shape[1]:
        return x, None
    u, singular, basis = torch.linalg.svd(x, full_matrices=False)
    return u * singular, basis


def _path(z, targets, weights, grid) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The inner fits on ``z`` for every strength of ``grid`` (descending), each warm-started from the previous one."""
    fits, previous = [], None
    for strength in grid:
        penalty = torch.full((targets.shape[1],), strength, dtype=z.dtype)
        previous = fit_logistic(z, targets, weights, penalty, init=previous, tolerance=INNER_TOLERANCE)
        fits.append(previous)
    return fits


@contextlib.contextmanager
def _threads_for(size: int):
    """One intra-op thread for small problems, whose matrices are too small for threads to pay for their
    start-up and waits (on a busy machine they cost many times the work); torch's setting otherwise."""
    before = torch.get_num_threads()
    if size <= SMALL_PROBLEM:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def fit_heads(features, labels, image_ids, rows, emotions: list[int], l2: float | None = None,
              grid=L2_GRID, num_inner: int = INNER_FOLDS) -> dict[int, LinearHead]:  # fmt: skip
    """The heads of ``emotions`` (codes), each fitted on ``rows`` of ``features`` (N, D) and ``labels``.

    ``l2`` fixes the strength. By default the heads share the ``grid`` value whose fits on ``num_inner - 1``
    inner folds of ``rows`` rank the remaining one best: the highest AUROC, averaged over the emotions and
    the inner folds (ties go to the stronger penalty). One strength for all the heads of a fold, chosen by
    the experts' own metric: per head, a few positives per inner fold make the choice noisy, and a
    log-loss choice, punished by the annotators' label noise, picks near-constant heads. Only ``rows``
    are read (labels, features and ids of other rows play no part).

    Example:
        >>> heads = fit_heads(features, labels, ids, np.flatnonzero(row_folds != 0), [1])  # doctest: +SKIP
        >>> heads[1].probabilities(features[:2])  # doctest: +SKIP
    """
    rows = np.asarray(rows, dtype=np.int64)
    labels = np.asarray(labels)
    rows = rows[labels[rows] < len(EMOTIONS)]
    with _threads_for(len(rows) * features.shape[1]):
        return _fit_heads(torch.as_tensor(features), labels, image_ids, rows, emotions, l2, grid, num_inner)


def _inner_choice(z, local, targets, image_ids, emotions, grid, num_inner) -> tuple[float, list[float]]:
    """The strength of ``grid`` whose inner cross-validation ranks best (see ``fit_heads``) and the mean
    inner AUROC of every grid value, in ascending order of strength. ``z`` is the rows' standardised
    features in their row space (``_row_space``): the fits and their log-odds are the same there.

    Every (inner fold, emotion) pair is one column of a single LBFGS per strength: a column's rows outside
    its fold's fitting rows weigh 0, so each column is exactly the fit on those rows, and the solver's
    fixed cost per step is paid once for all the inner folds instead of once per fold.
    """
    inner = inner_folds(image_ids, num_inner)
    grid = sorted(grid, reverse=True)  # strong to weak: each fit starts from the smoother one before it
    columns, weights = [], []  # (inner fold, emotion position) of each column, and its row weights
    for fold in range(num_inner):
        fit_rows, check_rows = np.flatnonzero(inner != fold), np.flatnonzero(inner == fold)
        for e, k in enumerate(emotions):
            w = balanced_weights(local, k, fit_rows, strict=False)
            # an inner split without both classes of an emotion tells nothing about it
            if w.sum() > 0 and 0 < (local[check_rows] == k).sum() < len(check_rows):
                columns.append((fold, e))
                weights.append(w)
    if not columns:
        return grid[len(grid) // 2], [float("nan")] * len(grid)
    stacked_targets = targets[:, [e for _, e in columns]]
    fits = _path(z, stacked_targets, torch.as_tensor(np.stack(weights, 1), dtype=z.dtype), grid)
    means = []
    for w, b in fits:
        log_odds = (z @ w + b).numpy()
        scores = [binary_auroc(log_odds[inner == fold, c], local[inner == fold] == emotions[e])
                  for c, (fold, e) in enumerate(columns)]  # fmt: skip
        means.append(float(np.mean(scores)))
    # argmax over strong-to-weak: the first maximum is the strongest penalty among ties
    l2 = grid[int(np.argmax(means))]
    order = np.argsort(grid)  # reported in the grid's ascending order, as L2_GRID
    return l2, [means[i] for i in order]


def _fit_heads(features, labels, image_ids, rows, emotions, l2, grid, num_inner) -> dict[int, LinearHead]:
    # float64 where it fits: LBFGS then converges to the optimum, not to float32's noise floor
    dtype = torch.float64 if len(rows) * features.shape[1] <= 50_000_000 else torch.float32
    mean, std = _standardise(features.double(), rows)
    x = ((features[torch.as_tensor(rows)].double() - mean) / std).to(dtype)
    local = labels[rows]
    targets = torch.as_tensor(np.stack([(local == k) for k in emotions], 1), dtype=dtype)
    z, basis = _row_space(x)  # once: the inner fits and the final one share it

    inner_auroc = None
    if l2 is None:
        l2, inner_auroc = _inner_choice(z, local, targets, [image_ids[r] for r in rows], emotions, grid, num_inner)
    penalty = torch.full((len(emotions),), float(l2), dtype=dtype)
    everything = np.arange(len(rows))
    all_weights = torch.as_tensor(np.stack([balanced_weights(local, k, everything) for k in emotions], 1), dtype=dtype)
    w, b = fit_logistic(z, targets, all_weights, penalty)
    w = w if basis is None else basis.T @ w
    train_loss = F.binary_cross_entropy_with_logits(x @ w + b, targets, weight=all_weights, reduction="none").sum(0)
    heads = {}
    for e, k in enumerate(emotions):
        # fold the standardisation in: (f - mean) / std . w + b = f . (w / std) + (b - mean . (w / std))
        raw = w[:, e].double() / std
        heads[k] = LinearHead(weight=raw.numpy(), bias=float(b[e].double() - (mean * raw).sum()), l2=float(l2),
                              inner_auroc=inner_auroc, train_loss=float(train_loss[e]))  # fmt: skip
    return heads
