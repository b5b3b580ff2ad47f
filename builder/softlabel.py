"""Fusion of expert and AU scores into soft labels, and the complexity subsets (DESIGN §5, steps 3, 5, 6).

    s = normalise((λ p̂ + (1 - λ) â) ** (1 / T))

p̂ is the experts' distribution (f_k normalised to sum to 1), â the AU component (``builder.au``).
The human label never enters s; the subsets measure how far s agrees with it. A row without
landmarks (no â) is fused from the experts alone; a row without expert scores from the AU alone.

Example:
    >>> import numpy as np
    >>> from builder.softlabel import FusionConfig, fuse, subsets
    >>> s = fuse(np.eye(8)[[1]] * 0.9 + 0.01, np.eye(8)[[1]], FusionConfig())
    >>> int(subsets(s, np.array([1]), FusionConfig())[0])  # the annotator agrees: easy
    0
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from affectnet_plus import EMOTIONS

NUM_EMOTIONS = len(EMOTIONS)


@dataclass
class FusionConfig:
    """Every parameter of the soft-label method; all of them are written to the dataset card.

    Args:
        expert_weight: λ, the weight of the experts' distribution against the AU component.
        temperature: T; below 1 sharpens the fused distribution, above 1 flattens it.
        easy_min_confidence: easy needs rank 1 and s_h at least this.
        difficult_max_confidence: s_h below this is difficult whatever its rank.
        difficult_min_rank: rank of s_h (1 = largest) from which a row is difficult.
    """

    expert_weight: float = 0.5
    temperature: float = 1.0
    easy_min_confidence: float = 0.5
    difficult_max_confidence: float = 0.15
    difficult_min_rank: int = 3

    def __post_init__(self):
        if not 0 <= self.expert_weight <= 1:
            raise ValueError(f"expert_weight must be in [0, 1], got {self.expert_weight}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
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


def fuse(expert_scores: np.ndarray | None, au_scores: np.ndarray | None, config: FusionConfig) -> np.ndarray:
    """(N, 8) expert probabilities f_k and (N, 8) AU scores -> (N, 8) soft labels.

    A NaN row (or a missing array) in one input falls back to the other input for that row; a row
    missing in both is an error.
    """
    if expert_scores is None and au_scores is None:
        raise ValueError("fuse needs expert scores, AU scores or both")
    n = len(expert_scores if expert_scores is not None else au_scores)
    missing = np.full((n, NUM_EMOTIONS), np.nan)
    p = normalise(expert_scores) if expert_scores is not None else missing
    a = normalise(au_scores) if au_scores is not None else missing
    has_p, has_a = ~np.isnan(p).any(1), ~np.isnan(a).any(1)
    if not (has_p | has_a).all():
        rows = np.flatnonzero(~(has_p | has_a))[:10].tolist()
        raise ValueError(f"rows {rows} have neither expert scores nor landmarks to fuse")
    weight = np.where(has_p, np.where(has_a, config.expert_weight, 1.0), 0.0)[:, None]  # the experts' share
    mixed = weight * np.nan_to_num(p) + (1 - weight) * np.nan_to_num(a)
    return normalise(mixed ** (1 / config.temperature))


def subsets(soft_labels: np.ndarray, human_labels: np.ndarray, config: FusionConfig) -> np.ndarray:
    """0 easy / 1 challenging / 2 difficult per row; -1 where the human label is not an emotion (8-10).

    r is the rank of s_h in s (1 = largest; ties count in h's favour). easy: r = 1 and s_h >= the
    easy threshold; difficult: r >= difficult_min_rank or s_h < the difficult threshold; else challenging.
    """
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
