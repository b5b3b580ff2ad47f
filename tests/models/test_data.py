import subprocess
import sys
from collections import Counter

import numpy as np
import pytest

from models.data import OneVsRestSampler, fold_of, folds


def test_fold_is_a_stable_hash_across_processes():
    ids = [f"Manually_Annotated_Images/{i % 7}/{i:05d}" for i in range(2000)]
    here = folds(ids, 5).tolist()
    code = "import sys; from models.data import folds; print(folds(sys.argv[1:], 5).tolist())"
    # PYTHONHASHSEED differs per process: the fold must not depend on Python's hash()
    there = subprocess.run([sys.executable, "-c", code, *ids[:50]], capture_output=True, text=True, check=True,
                           env={"PYTHONHASHSEED": "123", "PATH": ""}, cwd=".")  # fmt: skip
    assert eval(there.stdout) == here[:50]
    counts = Counter(here)
    assert set(counts) == set(range(5)) and min(counts.values()) > 330  # roughly even
    assert fold_of(ids[0], 5) == here[0]


def _labels():
    # 40 happy (1), other emotions unevenly represented, plus non-emotion codes 8-10
    return np.array(
        [1] * 40 + [0] * 30 + [2] * 3 + [3] * 10 + [4] * 10 + [5] * 10 + [6] * 10 + [7] * 2 + [8, 9, 10] * 5
    )


def test_one_vs_rest_epochs_are_balanced_and_even():
    labels = _labels()
    sampler = OneVsRestSampler(labels, np.arange(len(labels)), emotion=1, seed=0)
    epoch = sampler.indices()
    assert len(epoch) == len(sampler) == 80 and len(set(epoch.tolist())) == 80
    drawn = Counter(labels[epoch].tolist())
    assert drawn[1] == 40
    assert not {8, 9, 10} & set(drawn)  # none / uncertain / non-face never train an expert
    assert drawn[2] == 3 and drawn[7] == 2  # small classes give all they have ...
    others = [drawn[c] for c in (0, 3, 4, 5, 6)]
    assert max(others) - min(others) <= 1 and sum(others) == 35  # ... the rest share the difference evenly


def test_epochs_are_redrawn_and_reproducible():
    labels = _labels()
    a = OneVsRestSampler(labels, np.arange(len(labels)), emotion=1, seed=3)
    b = OneVsRestSampler(labels, np.arange(len(labels)), emotion=1, seed=3)
    first = a.indices()
    a.set_epoch(1)
    assert not np.array_equal(first, a.indices())
    b.set_epoch(1)
    assert np.array_equal(a.indices(), b.indices())


def test_rows_restrict_the_draw_and_missing_classes_fail():
    labels = _labels()
    rows = np.arange(0, len(labels), 2)
    sampler = OneVsRestSampler(labels, rows, emotion=1, seed=0)
    assert set(sampler.indices().tolist()) <= set(rows.tolist())
    with pytest.raises(ValueError, match="no training rows with human_label 7"):
        OneVsRestSampler(labels, np.arange(40), emotion=7)
    with pytest.raises(ValueError, match="no negatives"):
        OneVsRestSampler(labels, np.arange(40), emotion=1)
