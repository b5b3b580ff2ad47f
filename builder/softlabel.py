"""Fusion of expert and AU scores into soft labels, and the complexity subsets (``docs/method.md`` §5, §6).

    s_k = λ f_k + (1 - λ) a_k        (per emotion, no renormalisation)

f_k is the emotion-k expert's probability that k is present, a_k the AU component's presence of k
(``builder.au``), both in [0, 1]; so is s_k. A soft label is 8 independent confidences, like the
official release's: it does not sum to 1 (``core.schema.as_distribution`` makes it a distribution
where one is needed). A row's own human label is not an input of its s; the subsets measure how far
s agrees with it. A row without landmarks (no a) is fused from the experts alone; a row without
expert scores from the AU alone.

λ can be fitted instead of set (``FusionConfig(fit=True)``, ``fit_fusion``): the λ under which the
annotators' labels are most likely, read one-vs-rest (label h: emotion h present, the others absent),
over the rows it is given. A build gives it the train rows only, whose expert scores are out-of-fold
(``docs/method.md`` §3); it never sees validation labels. One number is fitted for the whole dataset.

Example:
    >>> import numpy as np
    >>> from builder.softlabel import FusionConfig, SubsetConfig, fuse, subsets
    >>> s = fuse(np.eye(8)[[1]] * 0.9 + 0.05, np.eye(8)[[1]] * 0.8, FusionConfig())
    >>> s.round(3).tolist()
    [[0.025, 0.875, 0.025, 0.025, 0.025, 0.025, 0.025, 0.025]]
    >>> int(subsets(s, np.array([1]), SubsetConfig())[0])  # s_h ranks first: easy
    0
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, replace

import numpy as np

from core.schema import EMOTIONS, as_distribution

NUM_EMOTIONS = len(EMOTIONS)


@dataclass
class FusionConfig:
    """How the experts' scores and the AU component are fused (``docs/method.md`` §5).

    Args:
        expert_weight: λ, the weight of the experts' confidences against the AU component's, in [0, 1].
        fit: choose λ instead: the λ under which the train rows' annotator labels are most likely
            (one-vs-rest), given their out-of-fold expert scores (validation labels are never used);
            it is recorded in the card.
    """

    expert_weight: float = 0.5
    fit: bool = False

    def __post_init__(self):
        if not 0 <= self.expert_weight <= 1:
            raise ValueError(f"expert_weight must be in [0, 1], got {self.expert_weight}")


@dataclass
class SubsetConfig:
    """The rule of the complexity subsets (``docs/method.md`` §6); the defaults are the release's.

    r is the rank of the human label's confidence s_h among the 8 (1 = largest; a tie counts against
    h). easy: r = 1 and s_h >= ``easy_min_confidence``; difficult: r >= ``difficult_min_rank`` or
    s_h < ``difficult_max_confidence``; else challenging. With the defaults: r = 1 easy, r = 2-3
    challenging, r >= 4 difficult.

    Args:
        easy_min_confidence: a row whose s_h ranks first is easy only when s_h is at least this (0: always).
        difficult_max_confidence: a row whose s_h is below this is difficult, whatever its rank (0: never).
        difficult_min_rank: the rank of s_h (1 = largest) from which a row is difficult.
    """

    easy_min_confidence: float = 0.0
    difficult_max_confidence: float = 0.0
    difficult_min_rank: int = 4

    def __post_init__(self):
        if not 0 <= self.difficult_max_confidence <= self.easy_min_confidence <= 1:
            raise ValueError("need 0 <= difficult_max_confidence <= easy_min_confidence <= 1")
        if not 2 <= self.difficult_min_rank <= NUM_EMOTIONS:
            raise ValueError(f"difficult_min_rank must be in 2..{NUM_EMOTIONS}, got {self.difficult_min_rank}")

    def describe(self) -> str:
        """The rule in words, for the card."""
        easy = "r = 1" + (f" and s_h >= {self.easy_min_confidence:g}" if self.easy_min_confidence > 0 else "")
        difficult = f"r >= {self.difficult_min_rank}" + (
            f" or s_h < {self.difficult_max_confidence:g}" if self.difficult_max_confidence > 0 else "")
        return f"easy: {easy}; difficult: {difficult}; challenging: the rest (r = rank of s_h, ties against h)"


def normalise(scores: np.ndarray) -> np.ndarray:
    """Rows scaled to sum to 1: ``core.schema.as_distribution``."""
    return as_distribution(scores)


def fuse(expert_probs: np.ndarray | None, au_scores: np.ndarray | None, config: FusionConfig) -> np.ndarray:
    """(N, 8) expert probabilities f_k and (N, 8) AU presences a_k -> (N, 8) soft labels in [0, 1].

    A NaN row (or a missing array) in one input falls back to the other input for that row; a row
    missing in both is an error.
    """
    if expert_probs is None and au_scores is None:
        raise ValueError("fuse needs expert scores, AU scores or both")
    n = len(expert_probs if expert_probs is not None else au_scores)
    missing = np.full((n, NUM_EMOTIONS), np.nan)
    f = np.asarray(expert_probs, dtype=np.float64) if expert_probs is not None else missing
    a = np.asarray(au_scores, dtype=np.float64) if au_scores is not None else missing
    has_f, has_a = ~np.isnan(f).any(1), ~np.isnan(a).any(1)
    if not (has_f | has_a).all():
        rows = np.flatnonzero(~(has_f | has_a))[:10].tolist()
        raise ValueError(f"rows {rows} have neither expert scores nor landmarks to fuse")
    weight = np.where(has_f, np.where(has_a, config.expert_weight, 1.0), 0.0)[:, None]  # the experts' share
    return np.clip(weight * np.nan_to_num(f) + (1 - weight) * np.nan_to_num(a), 0.0, 1.0)


# The grid fit_fusion searches: λ in steps of 0.01.
FIT_WEIGHTS = np.linspace(0, 1, 101)
FIT_MAX_ROWS = 50_000
FIT_EPS = 1e-6  # confidences clipped to [eps, 1 - eps] inside the log-likelihood


def one_vs_rest_log_likelihood(soft_labels: np.ndarray, human_labels: np.ndarray) -> float:
    """Mean over rows of sum_k [y_k log s_k + (1 - y_k) log(1 - s_k)], y = one-hot of the human label.

    The likelihood of the annotators' labels read as 8 independent presences: label h says emotion h
    is present and the others are not. Rows with labels outside 0-7 are skipped.
    """
    human_labels = np.asarray(human_labels)
    rows = np.flatnonzero((human_labels >= 0) & (human_labels < NUM_EMOTIONS))
    s = np.clip(np.asarray(soft_labels, dtype=np.float64)[rows], FIT_EPS, 1 - FIT_EPS)
    y = np.eye(NUM_EMOTIONS)[human_labels[rows]]
    return float((y * np.log(s) + (1 - y) * np.log1p(-s)).sum(1).mean())


def fit_fusion(
    expert_probs: np.ndarray, au_scores: np.ndarray, human_labels: np.ndarray, config: FusionConfig
) -> tuple[FusionConfig, dict]:
    """The λ that maximises ``one_vs_rest_log_likelihood`` of the annotator labels (h in 0-7).

    The caller chooses the rows: a build passes its train rows, whose expert scores are out-of-fold
    (``docs/method.md`` §3, §5). At most ``FIT_MAX_ROWS`` of them, drawn with a fixed seed, are used.
    A grid search over ``FIT_WEIGHTS`` keeps the first best λ. Returns the fitted config (``fit``
    off) and what the fit saw (rows, mean log-likelihood).

    Example:
        >>> import numpy as np
        >>> rng = np.random.default_rng(0)
        >>> human = rng.integers(0, 8, 2000)
        >>> knows = np.clip(np.eye(8)[human] * 0.8 + rng.uniform(0, 0.2, (2000, 8)), 0, 1)
        >>> fitted, info = fit_fusion(knows, rng.uniform(0, 1, (2000, 8)), human, FusionConfig(fit=True))
        >>> fitted.expert_weight > 0.8  # the experts know the labels, the AU scores are noise
        True
    """
    human_labels = np.asarray(human_labels)
    rows = np.flatnonzero((human_labels >= 0) & (human_labels < NUM_EMOTIONS))
    if len(rows) == 0:
        raise ValueError("fitting λ needs rows with a human label 0-7; there are none")
    if len(rows) > FIT_MAX_ROWS:
        rows = np.sort(np.random.default_rng(0).choice(rows, FIT_MAX_ROWS, replace=False))
    h = human_labels[rows]
    best = (-np.inf, config.expert_weight)
    for weight in FIT_WEIGHTS:
        fused = fuse(expert_probs[rows], au_scores[rows], replace(config, expert_weight=float(weight)))
        score = one_vs_rest_log_likelihood(fused, h)
        if score > best[0]:
            best = (score, float(weight))
    score, weight = best
    fitted = replace(config, expert_weight=round(weight, 4), fit=False)
    return fitted, {"rows": int(len(rows)), "mean_log_likelihood": round(score, 4)}


def subsets(soft_labels: np.ndarray, human_labels: np.ndarray, config: SubsetConfig | None = None) -> np.ndarray:
    """0 easy / 1 challenging / 2 difficult per row; -1 where the human label is not an emotion (8-10,
    or negative: missing).

    r is the rank of s_h in s (1 = largest; a tie counts against h). With the default ``SubsetConfig``
    (the release's rule): r = 1 easy, r = 2-3 challenging, r >= 4 difficult; its thresholds can add
    confidence bounds (``docs/method.md`` §6). ``config`` defaults to ``SubsetConfig()``; a ``FusionConfig``
    (which held the thresholds before ``SubsetConfig`` did, and holds none now) is read as the defaults,
    with a ``DeprecationWarning``.
    """
    if isinstance(config, FusionConfig):
        warnings.warn("subsets takes a SubsetConfig: a FusionConfig holds no thresholds, the defaults are used",
                      DeprecationWarning, stacklevel=2)  # fmt: skip
        config = None
    if config is None:
        config = SubsetConfig()
    elif not isinstance(config, SubsetConfig):
        raise TypeError(f"subsets takes a SubsetConfig (the thresholds), got {type(config).__name__}")
    soft_labels = np.asarray(soft_labels, dtype=np.float64)
    human_labels = np.asarray(human_labels)
    result = np.full(len(human_labels), -1, dtype=np.int64)
    emotion = (human_labels >= 0) & (human_labels < NUM_EMOTIONS)
    rows = np.flatnonzero(emotion)
    s_h = soft_labels[rows, human_labels[rows]]
    # Every other emotion at least as confident as h ranks above it (s_h itself is counted once).
    rank = (soft_labels[rows] >= s_h[:, None]).sum(1)
    easy = (rank == 1) & (s_h >= config.easy_min_confidence)
    difficult = (rank >= config.difficult_min_rank) | (s_h < config.difficult_max_confidence)
    result[rows] = np.where(easy, 0, np.where(difficult, 2, 1))
    return result


def validate(soft_labels: np.ndarray) -> None:
    """Raises ``ValueError`` naming the first bad rows unless every value is finite and in [0, 1].

    Soft labels are 8 independent confidences: their sum is not checked.
    """
    soft_labels = np.asarray(soft_labels, dtype=np.float64)
    if soft_labels.ndim != 2 or soft_labels.shape[1] != NUM_EMOTIONS:
        raise ValueError(f"soft labels must have shape (N, {NUM_EMOTIONS}), got {soft_labels.shape}")
    bad = ~np.isfinite(soft_labels).all(1) | (np.nan_to_num(soft_labels) < 0).any(1)
    bad |= (np.nan_to_num(soft_labels) > 1).any(1)
    if bad.any():
        rows = np.flatnonzero(bad)
        raise ValueError(f"{len(rows)} invalid soft labels (rows {rows[:10].tolist()}): not finite or outside [0, 1]")
