"""Soft labels and metadata for new photos: the build's face path, the expert ensemble and the fusion.

Each photo's faces are found and cropped as a build crops them, annotated with the metadata models
(landmarks, head pose, age, gender, ethnicity), scored by every expert of a manifest (a new photo is
in no training fold, so each emotion's score is the mean over its folds), measured for action units
on its landmarks, and fused (``builder.softlabel.fuse``) into a soft label. All faces of all photos
are scored in batches. ``dataset`` names a built folder whose fitted parameters are reused: the λ and
T its soft labels were fused with (``fusion.json``) and its AU model (``au_model.json``); explicit
``fusion`` and ``au_model`` arguments override them. A face whose landmarks are missing or degenerate
(``builder.au.degenerate_landmarks``) gets null ``au_scores`` (with the reason) and a soft label from
the experts alone.

Example:
    >>> from builder.predict import predict
    >>> faces = predict(["photo.jpg"], "experts/manifest.json")  # doctest: +SKIP
    >>> faces["photo.jpg"][0]["top"]  # doctest: +SKIP
    [['happy', 0.71], ['neutral', 0.12], ['surprise', 0.06]]
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from builder.au import AUModel, au_scores, degenerate_landmarks
from builder.softlabel import FusionConfig, fuse
from builder.stage import file_sha256
from core.schema import AU_MODEL_FILE, EMOTIONS, FUSION_FILE, AffectNetPlusConfig
from models.features import autocast_for
from models.labeling import load_ensemble, score_batch
from models.transforms import BatchTransform, decode_image


@dataclass
class PredictOptions:
    """What ``predict`` scores new photos with (the ``predict`` command's options).

    Args:
        experts: experts/manifest.json, a folder holding one, or a Hub repo id holding one.
        dataset: a folder built with these experts: fuse with the λ its soft labels were fused with
            (its fusion.json, fitted or given) and score the AUs with its AU model (its au_model.json);
            --expert-weight and --au-model override them.
        au_model: a build's au_model.json: score the AUs with its shape model and calibration, as that
            build did (default: the --dataset folder's, else the EMFACS scores).
        metadata: also estimate landmarks, head pose, age, gender, ethnicity.
        whole_image: each photo is one face crop: no detection.
        batch_size: faces per forward pass.
    """

    experts: str
    dataset: str | None = None
    au_model: str | None = None
    metadata: bool = True
    whole_image: bool = False
    batch_size: int = 64


def fitted_fusion(dataset, experts: Path | None = None) -> FusionConfig:
    """The λ a built folder's soft labels were fused with (its ``fusion.json``).

    Warns when ``experts`` is not the manifest that build used (its sha256 differs): the parameters were
    chosen for that build's experts.
    """
    path = Path(dataset) / FUSION_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{dataset} has no {FUSION_FILE}: build it with --experts first")
    saved = json.loads(path.read_text())
    used = saved.get("experts", {}).get("manifest_sha256")
    if experts is not None and used and file_sha256(experts) != used:
        warnings.warn(f"{experts} is not the expert manifest {dataset} was built with; its λ was chosen "
                      "for that build's experts", stacklevel=2)  # fmt: skip
    return FusionConfig(expert_weight=saved["expert_weight"])


def resolve_manifest(experts: str) -> Path:
    """A local ``manifest.json`` (or a folder holding one), or a Hub model repo holding one at its root."""
    path = Path(experts)
    if path.is_dir():
        path = path / "manifest.json"
    if path.is_file():
        return path
    if path.exists() or experts.count("/") != 1 or experts.endswith(".json"):
        raise FileNotFoundError(f"no expert manifest at {experts}")
    from huggingface_hub import snapshot_download

    folder = snapshot_download(experts, allow_patterns=["manifest.json", "*/config.json", "*/model.safetensors",
                                                        "*/preprocessor_config.json"])  # fmt: skip
    return Path(folder) / "manifest.json"


def predict(
    photos,
    experts: str,
    fusion: FusionConfig | None = None,
    metadata: bool = True,
    whole_image: bool = False,
    batch_size: int = 64,
    au_model: str | None = None,
    dataset: str | None = None,
) -> dict[str, list[dict] | dict]:
    """``{photo: [face, ...]}``, faces largest first, or ``{photo: {"error": reason, "detail": ...}}``.

    A face is ``{"box", "soft_label": {emotion: p}, "top": [[emotion, p] x 3], "expert_probs",
    "au_scores"}`` plus, with ``metadata``, ``landmarks`` (photo pixels), ``head_pose``, ``age``,
    ``gender``, ``ethnicity`` and the reasons of any that are missing. ``whole_image`` takes each photo
    as one face crop (no detection); without it a photo with no face has an empty list. ``au_model``
    is a build's ``au_model.json``: its shape model and AU calibration score the faces as that build
    scored its rows (a new face is in no fold: the mean over folds); without it (and without
    ``dataset``), the EMFACS scores. ``dataset`` is a built folder: ``fusion`` defaults to the λ it
    used and ``au_model`` to its ``au_model.json``. Without either, ``FusionConfig()``.
    """
    from builder.annotators import crop_to_photo, face_annotators, face_crops, run_annotators
    from builder.images import Rejected

    manifest = resolve_manifest(experts)
    if dataset is not None:
        fusion = fusion or fitted_fusion(dataset, manifest)
        if au_model is None and (Path(dataset) / AU_MODEL_FILE).is_file():
            au_model = str(Path(dataset) / AU_MODEL_FILE)
    fusion = fusion or FusionConfig()
    fitted_au = AUModel.from_json(json.loads(Path(au_model).read_text())) if au_model else None
    config = AffectNetPlusConfig(source_format="imagefolder")
    ensemble = load_ensemble(manifest)
    transform = BatchTransform(ensemble.image_size, ensemble.mean, ensemble.std).eval()
    annotators = face_annotators(config.crop_margin) if metadata else []
    report: dict[str, list[dict] | dict] = {}
    faces, crops = [], []
    for photo in map(str, photos):
        try:
            found = face_crops(photo, config, whole_image=whole_image)
        except Rejected as err:
            report[photo] = {"error": err.reason, "detail": err.detail}
            continue
        report[photo] = []
        for box, crop in found:
            face = {"box": [box.x, box.y, box.w, box.h]}
            report[photo].append(face)
            faces.append((face, box))
            crops.append(crop)
    if not crops:
        return report
    annotated = run_annotators(annotators, crops) if annotators else [{} for _ in crops]
    scores = []
    for start in range(0, len(crops), batch_size):
        images = torch.stack([decode_image(c, ensemble.image_size) for c in crops[start : start + batch_size]])
        with autocast_for("cpu"):  # the build's precision, so a photo gets the scores its build would give
            scores.append(score_batch(ensemble, transform(images), None).numpy())
    expert = np.concatenate(scores).astype(np.float64)
    points = [r.get("landmarks") for r in annotated]
    landmarks = np.stack([np.full((68, 2), np.nan) if p is None else np.asarray(p, np.float64) for p in points])
    degenerate = degenerate_landmarks(landmarks)
    landmarks[degenerate] = np.nan  # no AU component: the experts alone make the soft label
    au = fitted_au.scores(landmarks, [""] * len(landmarks), "new") if fitted_au else au_scores(landmarks)
    soft = fuse(expert, au, fusion)
    margin = 0.0 if whole_image else config.crop_margin
    for i, ((face, box), result) in enumerate(zip(faces, annotated)):
        order = np.argsort(-soft[i])[:3]
        face["soft_label"] = {e: round(float(p), 4) for e, p in zip(EMOTIONS, soft[i])}
        face["top"] = [[EMOTIONS[k], round(float(soft[i, k]), 4)] for k in order]
        face["expert_probs"] = [round(float(p), 4) for p in expert[i]]
        face["au_scores"] = None if np.isnan(au[i]).any() else [round(float(p), 4) for p in au[i]]
        if result.get("landmarks") is not None:
            result["landmarks"] = np.round(
                crop_to_photo(result["landmarks"], box, margin, config.face_size), 2
            ).tolist()
        face.update(result)
        if degenerate[i]:
            face.setdefault("_reasons", {})["au_scores"] = "degenerate_landmarks"
    return report
