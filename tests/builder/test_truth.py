"""truth_check against numbers computed here, on labels folders whose soft labels are made to measure."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from builder.truth import SMOOTHING, format_truth, truth_check
from core.schema import LABELS_CONFIG, LABELS_DIR, SUBSETS, config_pattern

N = 120  # labelled emotion rows that truth_check must use
EIGHT = pa.list_(pa.float32(), 8)
SPLITS = ("train", "validation", "unlabeled")
CARD = (
    "---\nconfigs:\n- config_name: labels\n  data_files:\n"
    + "".join(f"  - split: {split}\n    path: {config_pattern(LABELS_CONFIG, split)}\n" for split in SPLITS)
    + "---\n"
)


def _kl(truth: np.ndarray, candidate: np.ndarray) -> float:
    """Mean KL(truth || candidate), the candidate floored at 1e-6 and renormalised (truth has no zero)."""
    c = np.maximum(candidate, 1e-6)
    c = c / c.sum(1, keepdims=True)
    return float(np.mean(np.sum(truth * np.log(truth / c), axis=1)))


@pytest.fixture(scope="module")
def world():
    """True mixtures, annotator labels (right for about 70% of rows) and subsets, plus rows to be skipped."""
    rng = np.random.default_rng(0)
    true = 0.85 * rng.dirichlet(np.full(8, 0.4), N) + 0.15 / 8  # no zero: KL stays finite everywhere
    dominant = true.argmax(1)
    wrong = rng.random(N) < 0.3
    human = np.where(wrong, (dominant + rng.integers(1, 8, N)) % 8, dominant)
    subset = np.where(wrong, rng.choice([1, 2], N), rng.choice([0, 0, 0, 1], N))
    noisy = 0.5 * true + 0.5 * rng.dirichlet(np.ones(8), N)  # right on average, wrong on detail
    return {"true": true, "human": human, "subset": subset, "noisy": noisy, "rng": rng}


def _write(folder: Path, world: dict, soft: np.ndarray, au: np.ndarray, expert: np.ndarray) -> tuple[Path, Path]:
    """A labels folder (train: the first 90 rows, validation: the rest; one file per subset, as a build
    writes them) and its ground_truth.jsonl, with rows truth_check must skip: unlabeled, human label 8-10,
    no AU scores, no truth, not in the truth file."""
    true, human, subset = world["true"], world["human"], world["subset"]
    ids = [f"img/{i:04d}" for i in range(N)]
    parts = {"train": slice(0, 90), "validation": slice(90, N)}
    extra_truth = np.full(8, 1 / 8)
    skipped = {  # image_id: (split, human_label, au_scores is None, in the truth file with a soft label)
        "skip/unlabeled": ("unlabeled", 1, False, True),
        "skip/none_label": ("train", 8, False, True),
        "skip/non_face": ("validation", 10, False, True),
        "skip/no_au": ("train", 2, True, True),
        "skip/no_truth": ("train", 3, False, False),
        "skip/not_in_truth_file": ("validation", 4, False, None),
    }
    for split in SPLITS:
        rows = parts.get(split, slice(0, 0))
        table = {
            "image_id": ids[rows],
            "human_label": human[rows].tolist(),
            "soft_label": soft[rows].tolist(),
            "subset": subset[rows].tolist(),
            "expert_probs": expert[rows].tolist(),
            "au_scores": au[rows].tolist(),
        }
        for image_id, (where, label, no_au, _) in skipped.items():
            if where == split:
                for column, value in (("image_id", image_id), ("human_label", label), ("subset", 0),
                                      ("soft_label", extra_truth.tolist()), ("expert_probs", extra_truth.tolist()),
                                      ("au_scores", None if no_au else extra_truth.tolist())):  # fmt: skip
                    table[column].append(value)
        schema = pa.schema([("image_id", pa.string()), ("human_label", pa.int64()), ("soft_label", EIGHT),
                            ("subset", pa.int64()), ("expert_probs", EIGHT), ("au_scores", EIGHT)])  # fmt: skip
        written = pa.table(table, schema=schema)
        (folder / LABELS_DIR / split).mkdir(parents=True, exist_ok=True)
        for code, name in enumerate(SUBSETS):
            part = written.filter(pc.equal(written["subset"], code))
            if part.num_rows:
                pq.write_table(part, folder / LABELS_DIR / split / f"{name}-00000-of-00001.parquet")
    (folder / "README.md").write_text(CARD)
    truth_file = folder.parent / f"{folder.name}_ground_truth.jsonl"
    with open(truth_file, "w") as f:
        for i, image_id in enumerate(ids):
            f.write(json.dumps({"image_id": image_id, "soft_label": true[i].tolist()}) + "\n")
        for image_id, (_, _, _, has_truth) in skipped.items():
            if has_truth is not None:
                f.write(json.dumps({"image_id": image_id, "soft_label": extra_truth.tolist() if has_truth else None}))
                f.write("\n")
    return folder, truth_file


def _pairwise_auroc(scores: np.ndarray, positive: np.ndarray) -> float:
    """P(a positive row outscores a negative one), ties half: every pair counted, no ranks."""
    pos, neg = scores[positive], scores[~positive]
    return float(((pos[:, None] > neg[None]) + 0.5 * (pos[:, None] == neg[None])).mean())


def _stored(values: np.ndarray) -> np.ndarray:
    """What a float32 Parquet column gives back."""
    return values.astype(np.float32).astype(np.float64)


def test_truth_check_equals_an_independent_computation(world, tmp_path):
    true, human = world["true"], world["human"]
    expert = 3.0 * world["noisy"][::-1]  # not normalised: truth_check must normalise the experts' probabilities
    folder, truth_file = _write(tmp_path / "built", world, soft=true, au=world["noisy"], expert=expert)

    result = truth_check(folder, truth_file)

    assert result["rows"] == N  # every skipped row was skipped, every other row used
    one_hot = np.eye(8)[human]
    expected = {
        "experts": _stored(expert) / _stored(expert).sum(1, keepdims=True),
        "au": _stored(world["noisy"]),
        "fused": _stored(true),
        "annotator": one_hot,
        "annotator_smoothed": one_hot * (1 - SMOOTHING) + SMOOTHING / 8,
    }
    dominant = true.argmax(1)
    for name, candidate in expected.items():
        assert result[name]["kl"] == pytest.approx(_kl(true, candidate), abs=1e-4), name
        assert result[name]["argmax_agreement"] == pytest.approx(np.mean(candidate.argmax(1) == dominant), abs=1e-4)
    right = human == dominant
    hard = np.isin(world["subset"], (1, 2))
    assert result["annotator_agreement"] == pytest.approx(right.mean(), abs=1e-4)
    assert result["hard_share_label_wrong"] == pytest.approx(hard[~right].mean(), abs=1e-4)
    assert result["hard_share_label_right"] == pytest.approx(hard[right].mean(), abs=1e-4)
    assert 0.6 < right.mean() < 0.8 and hard[~right].mean() == 1  # the world is what it claims to be
    for target, codes in (("true_dominant", dominant), ("annotator_label", human)):
        per_emotion = [_pairwise_auroc(_stored(expert)[:, k], codes == k) for k in range(8)]
        got = result["experts_auroc"][target]
        assert list(got["per_emotion"].values()) == pytest.approx(per_emotion, abs=1e-4), target
        assert got["mean"] == pytest.approx(np.mean(per_emotion), abs=1e-4)

    # The perfect candidate is perfect, and the ranking is the one built in: truth < noisy < reversed rows.
    assert result["fused"]["kl"] < 1e-4 and result["fused"]["argmax_agreement"] == 1
    assert result["fused"]["kl"] < result["au"]["kl"] < result["experts"]["kl"]
    assert result["au"]["argmax_agreement"] > result["experts"]["argmax_agreement"]
    assert result["annotator_smoothed"]["kl"] < result["annotator"]["kl"]
    text = format_truth(result)
    assert f"Truth check on {N} labelled rows" in text and f"{result['au']['kl']:.4f}" in text


def test_shuffled_soft_labels_score_worse(world, tmp_path):
    """Negative control: the same soft labels given to the wrong rows must lose to the right rows."""
    true, noisy = world["true"], world["noisy"]
    order = world["rng"].permutation(N)
    right_rows, _ = _write(tmp_path / "right", world, soft=noisy, au=noisy, expert=noisy)
    folder, truth_file = _write(tmp_path / "shuffled", world, soft=noisy[order], au=noisy, expert=noisy)
    good = truth_check(right_rows, tmp_path / "right_ground_truth.jsonl")
    shuffled = truth_check(folder, truth_file)
    assert shuffled["fused"]["kl"] > good["fused"]["kl"] + 0.2
    assert shuffled["fused"]["argmax_agreement"] < good["fused"]["argmax_agreement"] - 0.3
    assert shuffled["fused"]["kl"] == pytest.approx(_kl(true, _stored(noisy[order])), abs=1e-4)
    assert shuffled["au"] == good["au"]  # only the shuffled column moved
    # the experts' AUROC sees the rows too: truth-tracking probabilities rank well, shuffled ones at chance
    _, _ = _write(tmp_path / "experts_shuffled", world, soft=noisy, au=noisy, expert=noisy[order])
    chance = truth_check(tmp_path / "experts_shuffled", tmp_path / "experts_shuffled_ground_truth.jsonl")
    assert good["experts_auroc"]["true_dominant"]["mean"] > 0.8
    assert abs(chance["experts_auroc"]["true_dominant"]["mean"] - 0.5) < 0.1


def test_truth_check_refuses_folders_it_cannot_judge(world, tmp_path):
    folder, truth_file = _write(tmp_path / "built", world, soft=world["true"], au=world["noisy"], expert=world["noisy"])
    empty_truth = tmp_path / "other_truth.jsonl"
    empty_truth.write_text(json.dumps({"image_id": "elsewhere/1", "soft_label": [0.125] * 8}) + "\n")
    with pytest.raises(ValueError, match="no row of .* has a ground-truth soft label"):
        truth_check(folder, empty_truth)
    stage = tmp_path / "stage"  # a build without experts: no expert_probs (a new folder: datasets caches by mtime)
    for shard in folder.glob(f"{LABELS_DIR}/*/*.parquet"):
        target = stage / shard.relative_to(folder)
        target.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pq.read_table(shard).drop_columns(["expert_probs"]), target)
    (stage / "README.md").write_text(CARD)
    with pytest.raises(ValueError, match=r"no \['expert_probs'\]: build it with --experts"):
        truth_check(stage, truth_file)


def test_cli_truth_prints_the_table_and_writes_the_same_numbers(world, tmp_path, capsys):
    from scripts.cli import main as cli

    folder, truth_file = _write(tmp_path / "built", world, soft=world["true"], au=world["noisy"], expert=world["noisy"])
    result = truth_check(folder, truth_file)
    assert cli(["truth", str(folder), "--ground-truth", str(truth_file), "--json", str(tmp_path / "t.json")]) == 0
    printed = capsys.readouterr().out
    assert format_truth(result) in printed and "(c) fused soft label | 0.0000 | 100.0%" in printed
    assert json.loads((tmp_path / "t.json").read_text()) == result
