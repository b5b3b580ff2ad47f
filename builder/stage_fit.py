"""Build stage 4, fit: the AU model of the build's faces and, with ``FusionConfig.fit``, λ.

The AU model (``builder.au.AUModel``, ``docs/method.md`` §4): a ``ShapeModel`` fitted on the landmarks of
every written row whose human label is not non-face (no other label is used), when there are at least
``SHAPE_ROWS_PER_COMPONENT`` faces per mode; and, with ``AUModelConfig.calibrate_au``, an
``AUCalibration`` fitted on the train rows' annotator labels, one model per fold of the experts
(§3). λ (§5): ``builder.softlabel.fit_fusion`` on the **train rows only**: their expert scores
are out-of-fold and their calibrated AU scores cross-fitted, and no validation label is ever read.

Landmarks come from the metadata stage's shards where it estimated them, else from the crop shards
(the source's own). Missing landmarks are NaN; degenerate ones (``builder.au.degenerate_landmarks``)
are set to NaN too: the shape model and the calibration leave such rows out, and the λ fit
counts them as rows without landmarks (fused from the experts alone). Outputs in ``OUT/.build/fit/``: ``au_model.json``
then, when fitted, ``fusion.json`` (λ, T and what the fit saw); a resumed stage reuses what it finds.

Fingerprint: the crop and metadata stages' digests, the experts' fold count and the ``AUModelConfig``;
with ``fit``, also the score stage's digest and the ``FusionConfig``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from builder.au import AUCalibration, AUModel, ShapeModel, calibration_features, degenerate_landmarks, shape_moments
from builder.softlabel import FusionConfig, fit_fusion
from builder.stage import Stage, read_columns, write_json_atomic
from core.schema import AU_MODEL_FILE, FUSION_FILE, HUMAN_LABELS, folds

NAME = "fit"
NON_FACE = HUMAN_LABELS.index("non_face")
# A shape model is only fitted on at least this many faces per mode (a PCA of few faces learns their noise).
SHAPE_ROWS_PER_COMPONENT = 10


@dataclass
class AUModelConfig:
    """How a build fits the AU component on its own faces (``docs/method.md`` §4).

    Args:
        shape_components: modes of the landmark shape model (a PCA of the build's frontalised faces,
            fitted without labels) that denoises the landmarks before the action units are measured;
            0: none. Skipped, and the landmarks used as they are, with fewer than 10 faces per mode.
        calibrate_au: map the AU features to emotion probabilities with a logistic regression fitted on
            the train rows' annotator labels, cross-fitted with the experts' folds, instead of the
            normalised EMFACS prototype scores (recorded in the card).
        au_l2: the calibration's L2 penalty on its standardised weights.
    """

    shape_components: int = 24
    calibrate_au: bool = False
    au_l2: float = 0.01

    def __post_init__(self):
        if not 0 <= self.shape_components < 136:
            raise ValueError(f"shape_components must be in 0..135, got {self.shape_components}")
        if self.au_l2 < 0:
            raise ValueError(f"au_l2 must be >= 0, got {self.au_l2}")


def fingerprint(crop: str, metadata: str | None, score: str, num_folds: int, au_config: AUModelConfig,
                fusion: FusionConfig) -> dict:  # fmt: skip
    result = {"crop": crop, "metadata": metadata, "num_folds": num_folds, "au_model": asdict(au_config)}
    if fusion.fit:
        result.update(score=score, fusion=asdict(fusion))
    return result


def landmark_table(table: pa.Table) -> tuple[list[str], np.ndarray | None, np.ndarray, np.ndarray]:
    """image ids, (N, 68, 2) landmarks (None without the column; NaN rows where missing or degenerate),
    human labels (-1 where missing) and the (N,) mask of degenerate rows, from a shard's columns."""
    ids = table["image_id"].to_pylist()
    points = None
    degenerate = np.zeros(len(ids), dtype=bool)
    if "landmarks" in table.column_names and ids:
        points = np.stack([np.full((68, 2), np.nan) if p is None else np.asarray(p, dtype=np.float64)
                           for p in table["landmarks"].to_pylist()])  # fmt: skip
        degenerate = degenerate_landmarks(points)
        points[degenerate] = np.nan
    if "human_label" in table.column_names:
        human = np.asarray([-1 if h is None else h for h in table["human_label"].to_pylist()], dtype=np.int64)
    else:
        human = np.full(len(ids), -1, dtype=np.int64)
    return ids, points, human, degenerate


def read_landmarks(name: str, dirs: list[Path]):
    """``landmark_table`` of shard ``name`` (landmarks from the first stage folder in ``dirs`` that has them)."""
    return landmark_table(read_columns(name, dirs, ["image_id", "landmarks", "human_label"]))


def _fit_au(shards: list[str], dirs: list[Path], au_config: AUModelConfig, num_folds: int) -> AUModel:
    info, shape, calibration = {}, None, None
    faces = []
    for name in shards:
        _, points, human, _ = read_landmarks(name, dirs)
        if points is not None:
            faces.append(shape_moments(points[human != NON_FACE]))
    count = sum(f[0] for f in faces)
    wanted = au_config.shape_components
    if wanted and count >= SHAPE_ROWS_PER_COMPONENT * wanted:
        shape = ShapeModel.from_moments(count, sum(f[1] for f in faces), sum(f[2] for f in faces), wanted)
        info["shape_model"] = {"components": wanted, "faces": count, "variance_kept": shape.variance_kept}
    elif wanted:
        info["shape_model"] = {
            "components": 0,
            "faces": count,
            "skipped": (f"{count} faces, fewer than {SHAPE_ROWS_PER_COMPONENT} per mode: landmarks used as they are"),
        }
    if au_config.calibrate_au:
        features, labels, ids = [], [], []
        for name in (n for n in shards if n.startswith("train-")):
            shard_ids, points, human, _ = read_landmarks(name, dirs)
            if points is not None:
                features.append(calibration_features(points, shape))
                labels.append(human)
                ids += shard_ids
        if not features:  # AUCalibration.fit names what is missing when there are rows but no usable labels
            raise ValueError("--calibrate-au needs train rows with landmarks; there are none")
        calibration = AUCalibration.fit(np.concatenate(features), np.concatenate(labels), folds(ids, num_folds),
                                        num_folds, au_config.au_l2)  # fmt: skip
        info["calibration"] = {"rows": calibration.rows, "num_folds": num_folds, "l2": au_config.au_l2}
    return AUModel(shape, calibration, num_folds, info)


def _fit_fusion(shards: list[str], dirs: list[Path], score_dir: Path, fusion: FusionConfig, au_model: AUModel) -> dict:
    """λ on the train rows (out-of-fold expert scores, their annotator labels); never other splits."""
    expert, au, human = [], [], []
    for name in (n for n in shards if n.startswith("train-")):
        ids, points, labels, _ = read_landmarks(name, dirs)
        scores = pq.read_table(score_dir / name)
        if scores["image_id"].to_pylist() != ids:
            raise RuntimeError(f"the expert scores of {name} do not list its rows")
        expert.append(np.asarray(scores["expert_probs"].to_pylist(), dtype=np.float64).reshape(len(ids), 8))
        au.append(au_model.scores(points, ids, "train") if points is not None else np.full((len(ids), 8), np.nan))
        human.append(labels)
    if not expert or not any(len(h) for h in human):
        raise ValueError(
            "--fit-fusion needs labelled train rows (λ is fitted on them only); this build has none"
        )
    fitted, info = fit_fusion(np.concatenate(expert), np.concatenate(au), np.concatenate(human), fusion)
    return {"expert_weight": fitted.expert_weight, "fitted_on": {"split": "train", **info}}


def run(stage: Stage, shards: list[str], dirs: list[Path], score_dir: Path, au_config: AUModelConfig,
        fusion: FusionConfig, num_folds: int) -> dict:  # fmt: skip
    """Runs (or resumes, or skips) the fit stage; returns ``{"au_model": info}`` plus, with
    ``fusion.fit``, ``"fusion": {"expert_weight", "fitted_on"}``."""
    if not stage.start():
        return stage.result()
    saved = stage.dir / AU_MODEL_FILE
    if saved.is_file():
        au_model = AUModel.from_json(json.loads(saved.read_text()))
    else:
        au_model = _fit_au(shards, dirs, au_config, num_folds)
        write_json_atomic(saved, au_model.to_json(), stage.work, indent=None)
        stage.wrote()
    result = {"au_model": au_model.info}
    if fusion.fit:
        fitted = stage.dir / FUSION_FILE
        if fitted.is_file():
            result["fusion"] = json.loads(fitted.read_text())
        else:
            result["fusion"] = _fit_fusion(shards, dirs, score_dir, fusion, au_model)
            write_json_atomic(fitted, result["fusion"], stage.work)
            stage.wrote()
    return stage.finish(result)


def load_au_model(stage: Stage) -> AUModel:
    return AUModel.from_json(json.loads((stage.dir / AU_MODEL_FILE).read_text()))
