"""The AffectNet+ FER metrics as an ``evaluate`` module, wrapping ``models.metrics.fer_metrics``.

Load it from this folder (works offline: a local module path never touches the Hub); the
``affectnet-plus`` package must be importable (``pip install -e .``).

Example:
    >>> import evaluate  # doctest: +SKIP
    >>> metric = evaluate.load("metrics/affectnet_plus")  # doctest: +SKIP
    >>> metric.compute(predictions=[[2.0, 0.1], [0.3, 1.0]], references=[0, 1])["top1_accuracy"]  # doctest: +SKIP
    1.0
"""

from __future__ import annotations

import datasets
import evaluate
import numpy as np

from models.metrics import fer_metrics

_DESCRIPTION = """Facial-expression classification metrics of the AffectNet+ baselines: top-1 and top-2 accuracy,
macro-F1 and Cohen's kappa against the human labels, expected calibration error of the predicted class,
KL(soft || predicted) and Jensen-Shannon divergence (nats) to the soft labels, and top-1 accuracy per group
(subset, gender, ethnicity, age bucket) with the largest gap between groups."""

_KWARGS_DESCRIPTION = """
Args:
    predictions: per example, a list of C class scores: logits, or probabilities (rows of non-negative
        values summing to 1 are taken as probabilities unless `input="logits"`).
    references: per example, the human label (class index in [0, C)).
    soft_labels: optional, per example the AffectNet+ soft label: C independent confidences in [0, 1] (they are
        normalised to a distribution before KL and JS are computed).
    groups: optional, {name: per-example group} for the breakdowns (e.g. {"subset": ["easy", ...]}).
    input: "auto" (default), "logits" or "probabilities".
Returns:
    a flat dict: count, top1_accuracy, top2_accuracy, macro_f1, cohen_kappa, ece, [kl_divergence,
    js_divergence], and per group {name}_{group}_top1_accuracy, {name}_{group}_count, {name}_top1_gap.
Examples:
    >>> metric = evaluate.load("metrics/affectnet_plus")
    >>> metric.compute(predictions=[[0.9, 0.1], [0.2, 0.8]], references=[0, 0])["top1_accuracy"]
    0.5
"""

_CITATION = """@article{fard2024affectnetplus,
  title={AffectNet+: A Database for Enhancing Facial Expression Recognition with Soft-Labels},
  author={Fard, Ali Pourramezan and Hosseini, Mohammad Mehdi and Sweeny, Timothy D. and Mahoor, Mohammad H.},
  journal={arXiv preprint arXiv:2410.22506},
  year={2024}
}"""


def _as_logits(predictions: np.ndarray, input: str) -> np.ndarray:
    if input not in ("auto", "logits", "probabilities"):
        raise ValueError(f'input must be "auto", "logits" or "probabilities", got {input!r}')
    looks_like_probs = (
        predictions.size > 0 and (predictions >= 0).all() and np.allclose(predictions.sum(-1), 1.0, atol=1e-4)
    )
    if input == "probabilities" or (input == "auto" and looks_like_probs):
        # softmax(log p) = p: fer_metrics sees the same distribution (0 stays 0, as exp(-inf)).
        with np.errstate(divide="ignore"):
            return np.log(predictions)
    return predictions


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class AffectnetPlus(evaluate.Metric):
    """``evaluate`` wrapper of ``models.metrics.fer_metrics``."""

    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Sequence(datasets.Value("float64")), "references": datasets.Value("int64")}
            ),
            reference_urls=["https://arxiv.org/abs/2410.22506"],
        )

    def _compute(self, predictions, references, soft_labels=None, groups=None, input="auto"):
        logits = _as_logits(np.asarray(predictions, dtype=np.float64), input)
        soft = None if soft_labels is None else np.asarray(soft_labels, dtype=np.float64)
        return fer_metrics(logits, np.asarray(references, dtype=np.int64), soft, groups)
