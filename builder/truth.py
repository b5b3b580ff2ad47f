"""How close the soft labels come to the truth, on the bundled sample (whose true soft labels are known).

Compared on the labelled rows (train and validation, human label 0-7) — rows no expert trained on: a
train row is scored by the experts of the folds that left it out, validation rows by experts that
never saw them. Five candidate soft labels against the true mixture:

(a) the experts alone (``expert_probs``), (b) the AU component alone (``au_scores``), (c) the fused
``soft_label``, (d) the annotator label one-hot, (e) the annotator label with label smoothing 0.1.
(a)-(c) are 8 independent confidences; each is compared as a distribution
(``core.schema.as_distribution``), since the truth is a mixture that sums to 1.

Metrics: mean KL(true || candidate) (candidates clipped at 1e-6 so one-hot labels give a finite,
large value) and how often the candidate's argmax is the true dominant emotion. Also: how often the
annotator agrees with the true dominant emotion, the share of challenging + difficult rows among
rows whose annotator label is wrong vs right (the subsets should track ambiguity), and the experts'
one-vs-rest AUROC (``expert_probs[:, k]`` ranking the rows of emotion k first, mean over the 8 emotions)
against the true dominant emotion and against the annotators' labels. The expert cards can only show
the second, on their held-out folds; the sample's annotators are wrong on about a third of the rows, so
the first says how well the experts find the emotion itself.

Example:
    >>> from builder.truth import truth_check  # doctest: +SKIP
    >>> truth_check("demo/affectnet_plus", "demo/raw/ground_truth.jsonl")["fused"]  # doctest: +SKIP
"""

from __future__ import annotations

import json

import numpy as np
from datasets import load_dataset

from core.schema import EMOTIONS, as_distribution
from models.metrics import binary_auroc

EPS = 1e-6
SMOOTHING = 0.1


def _kl(truth: np.ndarray, candidate: np.ndarray) -> float:
    candidate = np.clip(candidate, EPS, None)
    candidate = candidate / candidate.sum(1, keepdims=True)
    terms = np.where(truth > 0, truth * (np.log(np.where(truth > 0, truth, 1)) - np.log(candidate)), 0.0)
    return float(terms.sum(1).mean())


def truth_check(dataset_dir, ground_truth) -> dict:
    """Compares the soft labels of a built sample with its ``ground_truth.jsonl``; returns the numbers."""
    truth = {}
    with open(ground_truth, encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            if row["soft_label"] is not None:
                truth[row["image_id"]] = np.asarray(row["soft_label"], dtype=np.float64)
    labels = load_dataset(str(dataset_dir), "labels")
    needed = {"soft_label", "expert_probs", "au_scores", "subset"}
    columns = ("true", "human_label", "subset", "expert_probs", "au_scores", "soft_label")
    rows = {name: [] for name in columns}
    for name in ("train", "validation"):
        if name not in labels:
            continue
        split = labels[name]
        missing = needed - set(split.column_names)
        if missing:
            raise ValueError(f"{dataset_dir} has no {sorted(missing)}: build it with --experts first")
        for row in split:
            human_label = row["human_label"]
            if row["image_id"] not in truth or human_label is None or not 0 <= human_label < len(EMOTIONS):
                continue
            if row["au_scores"] is None:
                continue  # no usable landmarks: (b) undefined for this row
            rows["true"].append(truth[row["image_id"]])
            for column in columns[1:]:
                rows[column].append(row[column])
    if not rows["true"]:
        raise ValueError(f"no row of {dataset_dir} has a ground-truth soft label in {ground_truth}")
    true = np.asarray(rows["true"])
    human = np.asarray(rows["human_label"])
    one_hot = np.eye(len(EMOTIONS))[human]
    candidates = {
        "experts": as_distribution(rows["expert_probs"]),
        "au": as_distribution(rows["au_scores"]),
        "fused": as_distribution(rows["soft_label"]),
        "annotator": one_hot,
        "annotator_smoothed": one_hot * (1 - SMOOTHING) + SMOOTHING / len(EMOTIONS),
    }
    dominant = true.argmax(1)
    result = {
        "rows": len(true),
        **{
            name: {"kl": round(_kl(true, c), 4), "argmax_agreement": round(float((c.argmax(1) == dominant).mean()), 4)}
            for name, c in candidates.items()
        },
    }
    right = human == dominant
    hard = np.isin(np.asarray(rows["subset"]), (1, 2))
    result["annotator_agreement"] = round(float(right.mean()), 4)
    result["hard_share_label_wrong"] = round(float(hard[~right].mean()), 4) if (~right).any() else None
    result["hard_share_label_right"] = round(float(hard[right].mean()), 4) if right.any() else None
    experts = np.asarray(rows["expert_probs"], dtype=np.float64)
    result["experts_auroc"] = {
        target: {"mean": _mean(per_emotion), "per_emotion": dict(zip(EMOTIONS, per_emotion))}
        for target, codes in (("true_dominant", dominant), ("annotator_label", human))
        for per_emotion in [[round(binary_auroc(experts[:, k], codes == k), 4) for k in range(len(EMOTIONS))]]
    }
    return result


def _mean(values: list[float]) -> float | None:
    """The mean of the defined values (an emotion with no row of its own has no AUROC)."""
    defined = [v for v in values if v == v]
    return round(float(np.mean(defined)), 4) if defined else None


def format_truth(result: dict) -> str:
    """The comparison as a small markdown table, with the sample size and the annotators' agreement."""
    names = {
        "experts": "(a) experts only",
        "au": "(b) AU only",
        "fused": "(c) fused soft label",
        "annotator": "(d) annotator one-hot",
        "annotator_smoothed": "(e) annotator, smoothing 0.1",
    }
    lines = [
        f"Truth check on {result['rows']} labelled rows no expert trained on:",
        "",
        "| candidate | mean KL(true || s) | argmax = true dominant |",
        "|---|---|---|",
    ]
    lines += [
        f"| {label} | {result[key]['kl']:.4f} | {result[key]['argmax_agreement']:.1%} |" for key, label in names.items()
    ]
    lines += [
        "",
        f"Annotators agree with the true dominant emotion on {result['annotator_agreement']:.1%} of these rows.",
        f"Challenging + difficult: {_share(result['hard_share_label_wrong'])} of rows whose annotator label is "
        f"wrong, {_share(result['hard_share_label_right'])} of rows whose label is right.",
        f"Experts' one-vs-rest AUROC, mean over the emotions: {_score(result['experts_auroc']['true_dominant'])} "
        f"against the true dominant emotion, {_score(result['experts_auroc']['annotator_label'])} against the "
        "annotators' labels.",
    ]
    return "\n".join(lines)


def _score(auroc: dict) -> str:
    return "n/a" if auroc["mean"] is None else f"{auroc['mean']:.3f}"


def _share(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1%}"
