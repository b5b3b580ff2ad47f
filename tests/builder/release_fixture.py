"""Release-layout fixtures in the official AffectNet+ format, written independently of the project's writer.

The annotations look like the release's: independent soft labels (per-class floors near 0.06, sums
well above 1), subsets by the rank rule, pose in radians, the six race classes spelled as the release
spells them, landmarks as flat lists of 136 and 58 numbers, valence/arousal -2 where there is none.
A few rows say ``null`` for some meta-data, and ``damage`` spoils one annotation in a known way.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from tests.conftest import face_image

PARTS = {
    "train": "human_annotated/train_set",
    "validation": "human_annotated/validation_set",
    "unlabeled": "no_human_annotated",
}
RACE = ("asian", "indian", "black", "white", "middle eastern", "latino hispanic")
FLOORS = np.array([0.06, 0.116, 0.06, 0.06, 0.06, 0.06, 0.06, 0.06])


def rank_subset(soft, label: int) -> int | None:
    """The release's subset: r = rank of soft[label] among the 8 (1 = largest, ties count against the
    label); r = 1 easy (0), r = 2-3 challenging (1), r >= 4 difficult (2); none for labels 8-10."""
    if not 0 <= label < 8:
        return None
    rank = 1 + sum(1 for k, v in enumerate(soft) if k != label and v >= soft[label])
    return 0 if rank == 1 else 1 if rank <= 3 else 2


def soft_label(rng: np.random.Generator, dominant: int) -> list[float]:
    """8 independent confidences: one strong, one medium, the rest near their floors."""
    x = rng.uniform(0.0, 0.2, 8)
    x[dominant] = rng.uniform(0.55, 0.97)
    x[(dominant + int(rng.integers(1, 8))) % 8] = rng.uniform(0.1, 0.75)
    return (FLOORS + (1 - FLOORS) * x).tolist()


def annotation(rng: np.random.Generator, index: int, split: str, race: tuple[str, ...] = RACE) -> dict:
    """One annotation in the release's format (row ``index`` decides its special cases)."""
    dominant = int(rng.integers(8))
    soft = soft_label(rng, dominant)
    # Mostly the dominant emotion, sometimes another one: every subset occurs.
    label = dominant if rng.random() < 0.6 else int(rng.integers(8))
    if split != "unlabeled" and index % 11 == 5:
        label = 8 + index % 3  # none / uncertain / non-face: no subset
    if index % 13 == 7:
        soft[(label + 1) % 8] = soft[label % 8]  # a tie: it counts against the label
    shares = rng.dirichlet(np.ones(len(race)))
    points = rng.uniform(20, 204, 136)
    female = float(rng.uniform())
    data = {
        "human-label": label,
        "soft-label": soft,
        "subset": rank_subset(soft, label),
        "meta-data": {
            "age": float(rng.uniform(18, 70)),
            "gender": {"female": female, "male": 1 - female},
            "race": {name: float(p) for name, p in zip(race, shares)},
            "pose": {name: float(rng.uniform(-0.5, 0.5)) for name in ("yaw", "pitch", "roll")},
            "valence": -2 if label in (9, 10) else float(rng.uniform(-1, 1)),
            "arousal": -2 if label in (9, 10) else float(rng.uniform(-1, 1)),
            "landmark-68": points.tolist(),
            "landmark-29": points.reshape(68, 2)[::2][:29].reshape(-1).tolist(),
        },
    }
    if index % 17 == 3:  # a row without some meta-data
        data["meta-data"].update(age=None, gender=None, race=None, pose=None, arousal=None)
        data["meta-data"]["landmark-29"] = None
    return data


def write_release(root: Path, counts: dict[str, int], seed: int = 0, race: tuple[str, ...] = RACE) -> dict[str, dict]:
    """Writes a release under ``root``; returns ``{image_id: {"annotation": ..., "split": ...}}``.

    ``race``: the race classes (the release's six by default).

    ``image_id`` is what a build of ``root`` calls the row (``<part>/images/<i>``).
    """
    rng = np.random.default_rng(seed)
    rows = {}
    for split, n in counts.items():
        part = root / PARTS[split]
        (part / "images").mkdir(parents=True, exist_ok=True)
        (part / "annotations").mkdir(parents=True, exist_ok=True)
        for i in range(n):
            data = annotation(rng, i, split, race)
            # another picture in every split: the same bytes under two ids are a duplicate_image
            face_image(224, 224, seed=seed * 1000 + 300 * list(PARTS).index(split) + i).save(
                part / "images" / f"{i}.jpg", quality=90
            )
            (part / "annotations" / f"{i}.json").write_text(json.dumps(data), encoding="utf-8")
            rows[f"{PARTS[split]}/images/{i}"] = {"annotation": data, "split": split}
    return rows


def _set(path: tuple, value):
    def change(data):
        target = data
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value

    return change


def _drop(path: tuple):
    def change(data):
        target = data
        for key in path[:-1]:
            target = target[key]
        del target[path[-1]]

    return change


# kind -> (how the annotation is spoiled, what the rejection's detail says)
DAMAGES = {
    "value_459": (_set(("soft-label", 3), 459.0), "soft-label[3] = 459.0 not in [0, 1]"),
    "missing_key": (_drop(("meta-data", "pose", "yaw")), "missing key meta-data.pose.yaw"),
    "wrong_length": (
        lambda d: d["meta-data"].update({"landmark-68": d["meta-data"]["landmark-68"][:134]}),
        "meta-data.landmark-68: expected 136 numbers, got 134",
    ),
    "nan": (_set(("meta-data", "age"), math.nan), "meta-data.age = nan is not finite"),
    "nan_soft_label": (_set(("soft-label", 2), math.nan), "soft-label[2] = nan is not finite"),
    "inf": (_set(("meta-data", "pose", "roll"), math.inf), "meta-data.pose.roll = inf is not finite"),
    "subset_3": (_set(("subset",), 3), "subset = 3 not in 0..2"),
    "race_classes": (_set(("meta-data", "race"), {"white": 1.0}), "meta-data.race: classes ['white']"),
    "malformed_json": (None, "malformed JSON"),
}


def damage(root: Path, image_id: str, kind: str) -> str:
    """Spoils the annotation of ``image_id`` (``DAMAGES[kind]``); returns the expected detail."""
    change, detail = DAMAGES[kind]
    part, stem = image_id.rsplit("/images/", 1)
    path = root / part / "annotations" / f"{stem}.json"
    if change is None:
        path.write_text(path.read_text(encoding="utf-8")[:-7], encoding="utf-8")
    else:
        data = json.loads(path.read_text(encoding="utf-8"))
        change(data)
        path.write_text(json.dumps(data), encoding="utf-8")  # NaN is written as the token NaN
    return detail
