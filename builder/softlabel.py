"""Fusion of expert and AU scores into soft labels, and the complexity subsets (``docs/method.md`` §5, §6).

    s = normalise((λ p̂ + (1 - λ) â) ** (1 / T))

p̂ is the experts' distribution (f_k normalised to sum to 1), â the AU component (``builder.au``).
A row's own human label is not an input of its s; the subsets measure how far s agrees with it. A row
without landmarks (no â) is fused from the experts alone; a row without expert scores from the AU alone.

λ and T can be fitted instead of set (``FusionConfig(fit=True)``, ``fit_fusion``): the pair that
maximises the mean log-probability of the annotators' labels over the rows it is given. A build
gives it the train rows only, whose expert scores are out-of-fold (``docs/method.md`` §3); it never
sees validation labels. Two numbers are fitted for the whole dataset.

Example:
    >>> import numpy as np
    >>> from builder.softlabel import FusionConfig, SubsetConfig, fuse, subsets
    >>> s = fuse(np.eye(8)[[1]] * 0.9 + 0.01, np.eye(8)[[1]], FusionConfig())
    >>> int(subsets(s, np.array([1]), SubsetConfig())[0])  # the annotator agrees: easy
    0
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, replace

import numpy as np

from core.schema import EMOTIONS

NUM_EMOTIONS = len(EMOTIONS)


@dataclass
class FusionConfig:
    """How the experts' scores and the AU component are fused (``docs/method.md`` §5).

    Args:
        expert_weight: λ, the weight of the experts' distribution against the AU component, in [0, 1].
        temperature: T > 0; below 1 sharpens the fused distribution, above 1 flattens it.
        fit: choose λ and T instead: the pair under which the train rows' annotator labels are most
            likely, given their out-of-fold expert scores (validation labels are never used); both are
            recorded in the card.
    """

    expert_weight: float = 0.5
    temperature: float = 1.0
    fit: bool = False

    def __post_init__(self):
        if not 0 <= self.expert_weight <= 1:
            raise ValueError(f"expert_weight must be in [0, 1], got {self.expert_weight}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")


@dataclass
class SubsetConfig:
    """The thresholds of the complexity subsets (``docs/method.md`` §6).

    Args:
        easy_min_confidence: a row is easy when s_h ranks first and is at least this.
        difficult_max_confidence: a row whose s_h is below this is difficult, whatever its rank.
        difficult_min_rank: the rank of s_h (1 = largest) from which a row is difficult.
    """

    easy_min_confidence: float = 0.5
    difficult_max_confidence: float = 0.15
    difficult_min_rank: int = 3

    def __post_init__(self):
        if not 0 <= self.difficult_max_confidence < self.easy_min_confidence <= 1:
            raise ValueError("need 0 <= difficult_max_confidence < easy_min_confidence <= 1")
        if not 2 <= self.difficult_min_rank <= NUM_EMOTIONS:
            raise ValueError(f"difficult_min_rank must be in 2..{NUM_EMOTIONS}, got {self.difficult_min_rank}")


def normalise(scores: np.ndarray) -> np.ndarray:
    """Rows scaled to sum to 1 (all-zero rows become uniform; NaN rows stay NaN)."""
    scores = np.asarray(scores, dtype=np.float64)
    total = scores.sum(-1, keepdims=True)
    uniform = np.where(np.isnan(total), np.nan, 1 / scores.shape[-1])
    return np.where(total > 0, scores / np.where(total > 0, total, 1), uniform)


def fuse(expert_probs: np.ndarray | None, au_scores: np.ndarray | None, config: FusionConfig) -> np.ndarray:
    """(N, 8) expert probabilities f_k and (N, 8) AU scores -> (N, 8) soft labels.

    A NaN row (or a missing array) in one input falls back to the other input for that row; a row
    missing in both is an error.
    """
    if expert_probs is None and au_scores is None:
        raise ValueError("fuse needs expert scores, AU scores or both")
    n = len(expert_probs if expert_probs is not None else au_scores)
    missing = np.full((n, NUM_EMOTIONS), np.nan)
    p = normalise(expert_probs) if expert_probs is not None else missing
    a = normalise(au_scores) if au_scores is not None else missing
    has_p, has_a = ~np.isnan(p).any(1), ~np.isnan(a).any(1)
    if not (has_p | has_a).all():
        rows = np.flatnonzero(~(has_p | has_a))[:10].tolist()
        raise ValueError(f"rows {rows} have neither expert scores nor landmarks to fuse")
    weight = np.where(has_p, np.where(has_a, config.expert_weight, 1.0), 0.0)[:, None]  # the experts' share
    mixed = weight * np.nan_to_num(p) + (1 - weight) * np.nan_to_num(a)
    return normalise(mixed ** (1 / config.temperature))


# The grid fit_fusion searches: λ in steps of 0.05, T log-spaced over [0.05, 4].
FIT_WEIGHTS = np.linspace(0, 1, 21)
FIT_TEMPERATURES = np.geomspace(0.05, 4, 41)
FIT_MAX_ROWS = 50_000


def fit_fusion(
    expert_probs: np.ndarray, au_scores: np.ndarray, human_labels: np.ndarray, config: FusionConfig
) -> tuple[FusionConfig, dict]:
    """λ and T that maximise the mean log s_h of the annotator labels h, over the rows with h in 0-7.

    The caller chooses the rows: a build passes its train rows, whose expert scores are out-of-fold
    (``docs/method.md`` §3, §5). At most ``FIT_MAX_ROWS`` of them, drawn with a fixed seed, are used.
    A grid search (``FIT_WEIGHTS`` x ``FIT_TEMPERATURES``) keeps the first best pair, rounded to 4
    decimals. Returns the fitted config (``fit`` off) and what the fit saw (rows, mean log-likelihood).

    Example:
        >>> import numpy as np
        >>> rng = np.random.default_rng(0)
        >>> truth = rng.dirichlet(np.full(8, 0.3), 2000)
        >>> human = np.array([rng.choice(8, p=t) for t in truth])
        >>> fitted, info = fit_fusion(truth, rng.dirichlet(np.ones(8), 2000), human, FusionConfig(fit=True))
        >>> fitted.expert_weight > 0.8  # the experts know the truth, the AU scores are noise
        True
    """
    human_labels = np.asarray(human_labels)
    rows = np.flatnonzero((human_labels >= 0) & (human_labels < NUM_EMOTIONS))
    if len(rows) == 0:
        raise ValueError("fitting λ and T needs rows with a human label 0-7; there are none")
    if len(rows) > FIT_MAX_ROWS:
        rows = np.sort(np.random.default_rng(0).choice(rows, FIT_MAX_ROWS, replace=False))
    h = human_labels[rows]
    best = (-np.inf, config.expert_weight, config.temperature)
    for weight in FIT_WEIGHTS:
        mixed = fuse(expert_probs[rows], au_scores[rows], replace(config, expert_weight=weight, temperature=1.0))
        log_mixed = np.log(np.clip(mixed, 1e-12, None))
        for temperature in FIT_TEMPERATURES:
            # log normalise(m ** (1/T))[h] without forming it: log m_h / T - logsumexp(log m / T)
            scaled = log_mixed / temperature
            top = scaled.max(1, keepdims=True)
            log_norm = top[:, 0] + np.log(np.exp(scaled - top).sum(1))
            score = float((scaled[np.arange(len(h)), h] - log_norm).mean())
            if score > best[0]:
                best = (score, float(weight), float(temperature))
    score, weight, temperature = best
    fitted = replace(config, expert_weight=round(weight, 4), temperature=round(temperature, 4), fit=False)
    return fitted, {"rows": int(len(rows)), "mean_log_likelihood": round(score, 4)}


def subsets(soft_labels: np.ndarray, human_labels: np.ndarray, config: SubsetConfig | None = None) -> np.ndarray:
    """0 easy / 1 challenging / 2 difficult per row; -1 where the human label is not an emotion (8-10,
    or negative: missing).

    r is the rank of s_h in s (1 = largest; ties count in h's favour). easy: r = 1 and s_h >= the
    easy threshold; difficult: r >= difficult_min_rank or s_h < the difficult threshold; else
    challenging (``docs/method.md`` §6). ``config`` defaults to ``SubsetConfig()``; a ``FusionConfig``
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
    rank = 1 + (soft_labels[rows] > s_h[:, None]).sum(1)
    easy = (rank == 1) & (s_h >= config.easy_min_confidence)
    difficult = (rank >= config.difficult_min_rank) | (s_h < config.difficult_max_confidence)
    result[rows] = np.where(easy, 0, np.where(difficult, 2, 1))
    return result


def validate(soft_labels: np.ndarray, tolerance: float = 1e-4) -> None:
    """Raises ``ValueError`` naming the first bad rows unless every row is finite, >= 0 and sums to 1."""
    soft_labels = np.asarray(soft_labels, dtype=np.float64)
    if soft_labels.ndim != 2 or soft_labels.shape[1] != NUM_EMOTIONS:
        raise ValueError(f"soft labels must have shape (N, {NUM_EMOTIONS}), got {soft_labels.shape}")
    bad = ~np.isfinite(soft_labels).all(1) | (soft_labels < 0).any(1)
    bad |= np.abs(np.nan_to_num(soft_labels).sum(1) - 1) >= tolerance
    if bad.any():
        rows = np.flatnonzero(bad)
        raise ValueError(
            f"{len(rows)} invalid soft labels (rows {rows[:10].tolist()}): not finite, negative or not summing to 1"
        )
