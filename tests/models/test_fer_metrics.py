import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torchmetrics.functional.classification import (
    multiclass_accuracy,
    multiclass_calibration_error,
    multiclass_cohen_kappa,
    multiclass_f1_score,
)

from models.metrics import age_bucket, cohen_kappa, fer_metrics, js_divergence, kl_divergence, macro_f1

ROOT = Path(__file__).parents[2]


def one_hot_logits(predicted, num_classes=8, scale=10.0):
    return np.eye(num_classes)[predicted] * scale


def test_perfect_predictions():
    labels = np.arange(8).repeat(3)
    m = fer_metrics(one_hot_logits(labels), labels)
    assert m["count"] == 24
    assert m["top1_accuracy"] == m["top2_accuracy"] == m["macro_f1"] == m["cohen_kappa"] == 1.0
    confidence = math.exp(10) / (math.exp(10) + 7)  # every row is right with this confidence
    assert m["ece"] == pytest.approx(1 - confidence)
    assert "kl_divergence" not in m


def test_known_confusion():
    # labels 0 0 1 1, predicted 0 1 1 1: F1 2/3 and 4/5; p_o = 3/4, p_e = (1*2 + 3*2) / 16 = 1/2
    m = fer_metrics(one_hot_logits([0, 1, 1, 1], 3), [0, 0, 1, 1])
    assert m["top1_accuracy"] == 0.75
    assert m["macro_f1"] == pytest.approx((2 / 3 + 4 / 5) / 2)
    assert m["cohen_kappa"] == pytest.approx(0.5)
    # top-2: the label is second in row 0, third in row 1
    m = fer_metrics([[0.0, 2.0, 1.0], [3.0, 2.0, 1.0]], [2, 2])
    assert m["top1_accuracy"] == 0.0 and m["top2_accuracy"] == 0.5


def test_top2_breaks_ties_like_argmax():
    # all scores equal: argmax says class 0, so class 1 is "second" and class 2 is not in the top 2
    m = fer_metrics(np.zeros((3, 3)), [0, 1, 2])
    assert m["top1_accuracy"] == pytest.approx(1 / 3) and m["top2_accuracy"] == pytest.approx(2 / 3)


def test_kappa_of_chance_agreement_is_zero():
    assert cohen_kappa([0, 1, 0, 1], [0, 0, 1, 1]) == 0.0
    assert math.isnan(cohen_kappa([1, 1], [1, 1]))  # chance agreement is already 1
    assert macro_f1([0, 0, 1, 1], [0, 1, 1, 1]) == pytest.approx(11 / 15)


def test_kl_and_js_of_identical_distributions_are_zero_and_known_values():
    logits = np.random.default_rng(0).normal(size=(6, 8))
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    probs[0] = np.eye(8)[3] * 0.999 + 0.001 / 8  # a near one-hot row too
    m = fer_metrics(np.log(probs), probs.argmax(1), soft_labels=probs)
    assert m["kl_divergence"] == pytest.approx(0, abs=1e-12) and m["js_divergence"] == pytest.approx(0, abs=1e-12)
    assert kl_divergence([[0.5, 0.5]], [[0.9, 0.1]]) == pytest.approx(0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(5))
    assert js_divergence([[1.0, 0.0]], [[0.0, 1.0]]) == pytest.approx(math.log(2))  # the maximum
    # rows without a soft label are left out
    soft = np.vstack([[0.5, 0.5], [np.nan, np.nan]])
    assert fer_metrics(np.log([[0.9, 0.1], [0.2, 0.8]]), [0, 1], soft)["kl_divergence"] == pytest.approx(
        0.5108, abs=1e-4
    )


def test_group_breakdown_and_gap():
    labels = np.array([0, 1, 2, 3, 0, 1])
    predicted = np.array([0, 1, 2, 0, 1, 1])  # rows 3 and 4 wrong
    groups = {"gender": ["female", "female", "male", "male", None, "female"], "subset": ["easy"] * 6}
    m = fer_metrics(one_hot_logits(predicted), labels, groups=groups)
    assert m["gender_female_top1_accuracy"] == 1.0 and m["gender_female_count"] == 3
    assert m["gender_male_top1_accuracy"] == 0.5 and m["gender_male_count"] == 2  # the None row is left out
    assert m["gender_top1_gap"] == 0.5
    assert m["subset_easy_count"] == 6 and m["subset_top1_gap"] == 0.0
    assert [age_bucket(a) for a in (5, 19.99, 20, 39.5, 40, 59, 60, 90, float("nan"))] == [
        "<20", "<20", "20-39", "20-39", "40-59", "40-59", "60+", "60+", None,
    ]  # fmt: skip


def test_agrees_with_torchmetrics():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(400, 8)) * 2
    labels = rng.integers(0, 8, 400)
    labels[:8] = np.arange(8)
    m = fer_metrics(torch.tensor(logits), torch.tensor(labels))
    preds, target = torch.tensor(logits), torch.tensor(labels)
    assert set(logits.argmax(1)) == set(range(8))  # every class predicted: both macro-F1 conventions agree
    assert m["macro_f1"] == pytest.approx(multiclass_f1_score(preds, target, 8, average="macro").item(), abs=1e-6)
    assert m["cohen_kappa"] == pytest.approx(multiclass_cohen_kappa(preds, target, 8).item(), abs=1e-6)
    top2 = multiclass_accuracy(preds, target, 8, top_k=2, average="micro").item()
    assert m["top2_accuracy"] == pytest.approx(top2, abs=1e-6)
    ece = multiclass_calibration_error(preds.softmax(-1), target, 8, n_bins=15).item()
    assert m["ece"] == pytest.approx(ece, abs=1e-5)


def test_bad_shapes_raise():
    with pytest.raises(ValueError, match="human labels"):
        fer_metrics(np.zeros((2, 3)), [0])
    with pytest.raises(ValueError, match=r"lie in \[0, 3\)"):
        fer_metrics(np.zeros((2, 3)), [0, 3])
    with pytest.raises(ValueError, match="soft labels"):
        fer_metrics(np.zeros((2, 3)), [0, 1], soft_labels=np.zeros((2, 8)))


def test_evaluate_module_matches_fer_metrics():
    import evaluate

    metric = evaluate.load(str(ROOT / "metrics" / "affectnet_plus"))
    rng = np.random.default_rng(2)
    logits = rng.normal(size=(30, 8))
    labels = rng.integers(0, 8, 30)
    soft = rng.dirichlet(np.ones(8), 30)
    groups = {"subset": rng.choice(["easy", "challenging", "difficult"], 30).tolist()}
    expected = fer_metrics(logits, labels, soft, groups)
    got = metric.compute(
        predictions=logits.tolist(), references=labels.tolist(), soft_labels=soft.tolist(), groups=groups
    )
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, abs=1e-9), key
    # probabilities are recognised as such: the same numbers as their logits
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    from_probs = metric.compute(predictions=probs.tolist(), references=labels.tolist(), soft_labels=soft.tolist())
    assert from_probs["kl_divergence"] == pytest.approx(expected["kl_divergence"], abs=1e-9)
    assert from_probs["ece"] == pytest.approx(expected["ece"], abs=1e-9)


def test_kl_and_js_of_confidences_are_those_of_their_normalised_distribution():
    # A release-like soft label: independent confidences, summing to 1.86 and not to 1.
    confidences = np.array([[0.06, 0.91, 0.12, 0.30, 0.07, 0.08, 0.16, 0.16]])
    assert confidences.sum() == pytest.approx(1.86)
    distribution = confidences / confidences.sum()
    probs = np.random.default_rng(3).dirichlet(np.ones(8), 1)
    assert kl_divergence(confidences, probs) == pytest.approx(kl_divergence(distribution, probs), abs=1e-12)
    assert js_divergence(confidences, probs) == pytest.approx(js_divergence(distribution, probs), abs=1e-12)
    m = fer_metrics(np.log(probs), [1], soft_labels=confidences)
    assert m["kl_divergence"] == pytest.approx(kl_divergence(distribution, probs), abs=1e-12)
    # the same model predicting the normalised label exactly is at zero divergence
    exact = fer_metrics(np.log(distribution), [1], soft_labels=confidences)
    assert exact["kl_divergence"] == pytest.approx(0, abs=1e-12) and exact["js_divergence"] == pytest.approx(0, abs=1e-12)


def test_kl_of_confidences_negative_controls():
    confidences = np.array([[0.06, 0.91, 0.12, 0.30, 0.07, 0.08, 0.16, 0.16]])
    probs = np.random.default_rng(3).dirichlet(np.ones(8), 1)
    # the divergence formula on the raw confidences is not the KL of a distribution: normalising matters
    p, q = confidences[0], probs[0]
    raw = float((p * np.log(p / q)).sum())
    assert abs(raw - kl_divergence(confidences, probs)) > 0.1
    # a different label with the same total mass is a different distribution, with a different KL
    other = confidences[:, ::-1].copy()
    assert other.sum() == pytest.approx(confidences.sum())
    assert abs(kl_divergence(other, probs) - kl_divergence(confidences, probs)) > 0.1
