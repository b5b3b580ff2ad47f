"""The FER baselines' targets, losses and evaluation, on a handful of rows (no training)."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset

from core.schema import as_distribution
from models.fer import (
    TARGETS,
    FERConfig,
    FERTask,
    ValidationMetrics,
    fer_card,
    make_classifier,
    predicted_distribution,
    soft_confidences,
    soft_targets,
    write_results,
)
from models.metrics import fer_metrics
from models.training import TrainConfig

# Release-like soft labels: independent confidences, row sums 1.86, 2.2, 1.3 (none is a distribution).
SOFT = [
    [0.06, 0.91, 0.12, 0.30, 0.07, 0.08, 0.16, 0.16],
    [0.70, 0.10, 0.60, 0.10, 0.10, 0.10, 0.10, 0.40],
    [0.10, 0.10, 0.10, 0.10, 0.10, 0.10, 0.10, 0.60],
    None,
]
LABELS = [1, 0, 7, 2]  # row 2 is contempt, row 3 has no soft label


def split(soft=SOFT, labels=LABELS):
    return Dataset.from_dict({"image_id": [f"r{i}" for i in range(len(labels))], "human_label": labels,
                              "soft_label": soft})  # fmt: skip


def task(target, classes=8, tmp_path="out"):
    return FERTask(FERConfig(data="d", train=TrainConfig(str(tmp_path)), target=target, num_classes=classes))


def test_the_cli_choices_are_the_targets():
    assert TARGETS == ("hard", "soft", "soft-multilabel")
    with pytest.raises(ValueError, match="target must be one of"):
        FERConfig(data="d", train=TrainConfig("o"), target="multilabel")


@pytest.mark.parametrize("classes", [8, 7])
def test_soft_targets_normalise_the_confidences_after_dropping_contempt(classes):
    confidences = soft_confidences(split(), classes)
    assert confidences.shape == (4, classes) and np.isnan(confidences[3]).all()
    np.testing.assert_allclose(confidences[:3], np.asarray(SOFT[:3])[:, :classes], rtol=1e-6)
    targets = soft_targets(split(), classes)
    np.testing.assert_allclose(targets[:3], as_distribution(np.asarray(SOFT[:3])[:, :classes]), rtol=1e-6)
    np.testing.assert_allclose(targets[:3].sum(1), 1, rtol=1e-6)
    assert np.isnan(targets[3]).all()
    if classes == 7:  # normalised over the 7, not the 8 then truncated
        assert targets[0, 1] == pytest.approx(0.91 / (1.86 - 0.16), rel=1e-6)


@pytest.mark.parametrize("classes", [8, 7])
def test_training_targets_of_each_variant(classes):
    rows = {"hard": None, "soft": None, "soft-multilabel": None}
    for target in rows:
        training = task(target, classes).training_set({"train": split()})
        rows[target] = sorted(training.sampler)
        assert training.results["target"] == target and training.results["train_rows"] == len(rows[target])
        usable = rows[target]
        if target == "hard":
            assert training.targets.tolist() == LABELS
        elif target == "soft":
            np.testing.assert_allclose(training.targets[usable].sum(1), 1, rtol=1e-6)
        else:  # the raw confidences, which do not sum to 1
            np.testing.assert_allclose(training.targets[usable], np.asarray(SOFT[:3])[usable][:, :classes], rtol=1e-6)
            assert (np.abs(training.targets[usable].sum(1) - 1) > 0.2).all()
    # hard needs no soft label; contempt rows are out of the 7-class models
    assert rows["hard"] == ([0, 1, 2, 3] if classes == 8 else [0, 1, 3])
    assert rows["soft"] == rows["soft-multilabel"] == ([0, 1, 2] if classes == 8 else [0, 1])


@pytest.mark.parametrize("target", ["soft", "soft-multilabel"])
def test_soft_targets_need_valid_soft_labels(target):
    with pytest.raises(ValueError, match="no soft_label column"):
        task(target).training_set({"train": Dataset.from_dict({"human_label": [0]})})
    damaged = [[0.1] * 7 + [4.59], *SOFT[1:]]  # a value no confidence can have: refused, not clipped
    with pytest.raises(ValueError, match=r"outside \[0, 1\]"):
        task(target).training_set({"train": split(damaged)})


def test_each_variant_computes_its_own_loss():
    logits = torch.randn(3, 8, generator=torch.Generator().manual_seed(0))
    confidences = torch.tensor(SOFT[:3])
    distribution = torch.tensor(as_distribution(SOFT[:3]), dtype=torch.float32)
    labels = torch.tensor(LABELS[:3])
    torch.testing.assert_close(task("hard").loss(logits, labels), F.cross_entropy(logits, labels))
    torch.testing.assert_close(task("soft").loss(logits, distribution), F.cross_entropy(logits, distribution))
    torch.testing.assert_close(task("soft-multilabel").loss(logits, confidences),
                               F.binary_cross_entropy_with_logits(logits, confidences))  # fmt: skip


def test_the_multilabel_model_is_marked_multilabel():
    assert make_classifier(8).config.problem_type == "single_label_classification"
    assert task("soft-multilabel", 7).make_model().config.problem_type == "multi_label_classification"
    assert task("soft").make_model().config.num_labels == 8


def test_predicted_distribution_of_each_variant():
    logits = torch.tensor([[2.0, -1.0, 0.5], [-3.0, -2.0, -4.0]])
    np.testing.assert_allclose(predicted_distribution(logits, "hard"), logits.double().softmax(-1).numpy())
    sigmoids = logits.double().sigmoid().numpy()
    multilabel = predicted_distribution(logits, "soft-multilabel")
    np.testing.assert_allclose(multilabel, sigmoids / sigmoids.sum(1, keepdims=True))
    assert (multilabel.argmax(1) == sigmoids.argmax(1)).all()
    # a negative control: normalised sigmoids are not the softmax
    assert np.abs(multilabel - predicted_distribution(logits, "soft")).max() > 0.05


def test_validation_metrics_score_the_multilabel_model_on_its_normalised_sigmoids():
    rng = np.random.default_rng(4)
    logits = torch.tensor(rng.normal(size=(12, 8)), dtype=torch.float32)
    labels = rng.integers(0, 8, 12)
    soft = rng.uniform(0.05, 0.95, (12, 8))  # confidences; the metrics normalise them
    metrics = ValidationMetrics(labels, soft, {"subset": ["easy"] * 12}, target="soft-multilabel")
    rows = torch.arange(12).flip(0)  # gathered in any order
    got = metrics(logits[rows], rows)
    probs = predicted_distribution(logits[rows], "soft-multilabel")
    expected = fer_metrics(np.log(probs), labels[rows.numpy()], as_distribution(soft[rows.numpy()]),
                           {"subset": ["easy"] * 12})  # fmt: skip
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, abs=1e-9), key
    assert got["top1_accuracy"] == float((logits[rows].sigmoid().argmax(1).numpy() == labels[rows.numpy()]).mean())
    np.testing.assert_allclose(metrics.last["probs"].sum(1), 1, rtol=1e-5)
    np.testing.assert_allclose(metrics.last["confidences"], logits[rows].sigmoid().numpy(), rtol=1e-5)
    # the softmax variants keep their scores as they were
    softmax = ValidationMetrics(labels, soft, {}, target="soft")(logits[rows], rows)
    assert softmax["ece"] == pytest.approx(fer_metrics(logits[rows], labels[rows.numpy()])["ece"], abs=1e-9)
    hard = ValidationMetrics(labels, soft, {}, target="hard")
    hard(logits[rows], rows)
    assert set(hard.last) == {"probs", "labels"}


RESULTS = {"validation_top1_accuracy": 0.5, "validation_kl_divergence": 0.25, "train_rows": 3, "epoch": 1,
           "step": 2, "num_processes": 1, "image_size": 64, "image_mean": [0.5] * 3, "image_std": [0.5] * 3}  # fmt: skip


@pytest.mark.parametrize(("target", "says", "never"), [
    ("hard", ["Hard-FER", "cross-entropy on human_label", "softmax"], ["sigmoid"]),
    ("soft", ["Soft-FER", "scaled to sum to 1", "soft cross-entropy"], ["sigmoid", "multi-label)"]),
    ("soft-multilabel", ["Soft-FER (multi-label)", "binary cross-entropy", "do not sum to 1", "sigmoid"],
     ["soft cross-entropy on soft_label"]),
])  # fmt: skip
def test_the_card_says_what_the_target_was(target, says, never, tmp_path):
    config = FERConfig(data=str(tmp_path), train=TrainConfig(str(tmp_path / "o")), target=target, num_classes=7)
    card = str(fer_card(config, RESULTS))
    for text in says:
        assert text in card, text
    for text in never:
        assert text not in card, text
    assert f"affectnet-plus-fer-{target}-7" in card and "docs/method.md" in card


def test_results_table_names_every_variant(tmp_path):
    import json

    for target in TARGETS:
        run = tmp_path / f"{target}-8"
        run.mkdir()
        (run / "all_results.json").write_text(json.dumps({**RESULTS, "target": target, "num_classes": 8}))
    summary = write_results([tmp_path / f"{t}-8" for t in TARGETS], tmp_path / "out")
    assert [e["target"] for e in summary.values()] == list(TARGETS)
    table = (tmp_path / "out" / "results.md").read_text()
    for title in ("| Hard-FER |", "| Soft-FER |", "| Soft-FER (multi-label) |"):
        assert table.count(title) == 1, title
    assert "binary cross-entropy per class on the raw soft_label confidences" in table
    assert "normalised to sum to 1" in table
