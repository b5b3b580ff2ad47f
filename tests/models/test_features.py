"""ViT/DINOv2 experts from any backbone checkpoint, their classifier input, the backbone digest and the feature cache."""

import json

import numpy as np
import pytest
import torch
from transformers import (
    AutoModelForImageClassification,
    Dinov2ForImageClassification,
    ViTForImageClassification,
    pipeline,
)

from models import features as features_module
from models.expert import make_expert, make_processor
from models.features import FeatureCache, backbone_digest, compute_features, features_of, pixel_keys, weights_sha256
from models.transforms import BatchTransform
from models.vit import input_size, make_vit
from tests.conftest import face_image
from tests.models.tiny_backbones import tiny_dinov2, tiny_vit


@pytest.fixture(scope="module")
def dinov2(tmp_path_factory):
    return tiny_dinov2(tmp_path_factory.mktemp("dinov2") / "tiny-dinov2")


@pytest.fixture(scope="module")
def vit(tmp_path_factory):
    return tiny_vit(tmp_path_factory.mktemp("vit") / "tiny-vit")


def test_an_expert_from_a_bare_dinov2_backbone_keeps_its_weights(dinov2):
    from transformers import Dinov2Model

    expert = make_expert("happy", init_from=str(dinov2))
    assert isinstance(expert, Dinov2ForImageClassification)
    assert expert.config.id2label == {0: "not_happy", 1: "happy"}
    assert expert.classifier.in_features == 2 * 32  # CLS + mean patch token
    assert input_size(expert, str(dinov2)) == 28  # the processor's size, not the 56 px position grid
    assert expert.config.image_size == 56  # kept: it sizes the grid the weights fill
    backbone = Dinov2Model.from_pretrained(dinov2)
    for name, value in backbone.state_dict().items():
        assert torch.equal(expert.dinov2.state_dict()[name], value), name
    with pytest.raises(ValueError, match="not a multiple of the patch size 14"):
        make_expert("happy", init_from=str(dinov2), image_size=30)
    assert input_size(make_expert("happy", init_from=str(dinov2), image_size=42), str(dinov2), 42) == 42


def test_an_expert_from_a_bare_vit_backbone(vit):
    expert = make_expert("sad", init_from=str(vit))
    assert isinstance(expert, ViTForImageClassification) and expert.classifier.in_features == 32
    with pytest.raises(ValueError, match="was trained at 32 px"):
        make_expert("sad", init_from=str(vit), image_size=48)


def test_other_model_types_are_refused(tmp_path):
    from transformers import BertConfig, BertModel

    BertModel(BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16,
                         vocab_size=30)).save_pretrained(tmp_path / "bert")  # fmt: skip
    with pytest.raises(ValueError, match="'bert' checkpoint; experts start from a ViT or DINOv2"):
        make_expert("happy", init_from=str(tmp_path / "bert"))


@pytest.mark.parametrize("family", ["dinov2", "vit"])
def test_the_features_are_the_classifier_input(family, dinov2, vit):
    model = make_expert("happy", init_from=str(dinov2 if family == "dinov2" else vit)).eval()
    size = input_size(model, str(dinov2 if family == "dinov2" else vit))
    pixels = torch.randn(3, 3, size, size)
    with torch.no_grad():
        features = features_of(model, pixels)
        torch.testing.assert_close(model.classifier(features), model(pixel_values=pixels).logits, rtol=0, atol=1e-6)
    assert features.shape == (3, model.classifier.in_features)


def test_a_saved_dinov2_expert_loads_in_pipeline(dinov2, tmp_path):
    expert = make_expert("fear", init_from=str(dinov2))
    expert.save_pretrained(tmp_path / "fear-f0")
    make_processor(28).save_pretrained(tmp_path / "fear-f0")
    assert not list((tmp_path / "fear-f0").glob("*.bin"))
    assert isinstance(AutoModelForImageClassification.from_pretrained(tmp_path / "fear-f0"), Dinov2ForImageClassification)
    predictions = pipeline("image-classification", model=str(tmp_path / "fear-f0"))(face_image(50, 60))
    assert {p["label"] for p in predictions} == {"fear", "not_fear"}


def test_a_hub_backbone_is_loaded_and_digested_like_a_folder(dinov2, fake_hub):
    from huggingface_hub import HfApi

    from tests.hub_server import USER

    repo = f"{USER}/tiny-dinov2"
    api = HfApi()
    api.create_repo(repo, private=True)
    api.upload_folder(folder_path=str(dinov2), repo_id=repo)
    expert = make_vit({0: "not_happy", 1: "happy"}, init_from=repo)
    assert isinstance(expert, Dinov2ForImageClassification)
    assert weights_sha256(repo) == weights_sha256(str(dinov2))
    assert backbone_digest(repo) == backbone_digest(str(dinov2))


def test_the_digest_names_weights_and_preprocessing(dinov2, tmp_path):
    digest = backbone_digest(str(dinov2))
    assert digest == backbone_digest(str(dinov2), 28) and len(digest) == 64
    assert backbone_digest(str(dinov2), 42) != digest  # another input size
    assert backbone_digest(str(dinov2), mean=(0.5,) * 3, std=(0.5,) * 3) != digest
    other = tiny_dinov2(tmp_path / "other", seed=1)
    assert backbone_digest(str(other)) != digest
    again = tiny_dinov2(tmp_path / "again", seed=0)  # the same weights written again
    assert weights_sha256(str(again)) == weights_sha256(str(dinov2)) and backbone_digest(str(again)) == digest


def test_the_cache_serves_rows_by_image_id_and_pixels(tmp_path):
    cache = FeatureCache(tmp_path, "d1")
    assert len(cache) == 0 and cache.get(["a"], ["k"])[0] is None
    cache.put(["a", "b"], ["ka", "kb"], torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
    cache.put(["c"], ["kc"], torch.tensor([[5.0, 6.0]]))
    again = FeatureCache(tmp_path, "d1")  # what another process wrote is read too
    features, found = again.get(["c", "a", "b", "x"], ["kc", "ka", "stale", "kx"])
    assert found.tolist() == [True, True, False, False]
    assert features[:2].tolist() == [[5.0, 6.0], [1.0, 2.0]]
    assert len(again) == 3 and FeatureCache(tmp_path, "d2").get(["a"], ["ka"])[0] is None
    assert not list(tmp_path.rglob(".tmp-*"))
    with pytest.raises(PermissionError):
        FeatureCache(tmp_path, "d1", writable=False).put(["z"], ["kz"], torch.ones(1, 2))


def test_compute_features_runs_the_backbone_once_per_image(dinov2, tmp_path, monkeypatch):
    calls = []
    original = features_module.features_of
    monkeypatch.setattr(features_module, "features_of", lambda m, x: calls.append(len(x)) or original(m, x))
    model = make_expert("happy", init_from=str(dinov2)).eval()
    images = torch.stack([torch.from_numpy(np.array(face_image(28, 28, seed=i))).permute(2, 0, 1) for i in range(10)])
    dataset = torch.utils.data.TensorDataset(images, torch.arange(10))
    loader = torch.utils.data.DataLoader(dataset, batch_size=4)
    ids = [f"img{i}" for i in range(10)]
    transform = BatchTransform(28, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    cache = FeatureCache(tmp_path, backbone_digest(str(dinov2)))
    first = compute_features(model, transform, loader, ids, cache=cache)
    assert sum(calls) == 10 and len(cache) == 10
    calls.clear()
    second = compute_features(model, transform, loader, ids, cache=FeatureCache(tmp_path, cache.digest))
    assert sum(calls) == 0 and torch.equal(first, second)
    with torch.no_grad():
        torch.testing.assert_close(first, features_of(model, transform.eval()(images)), rtol=0, atol=1e-5)
    # a changed image under the same id is computed again, not served stale
    images[3] = 255 - images[3]
    third = compute_features(model, transform, torch.utils.data.DataLoader(dataset, batch_size=4), ids, cache=cache)
    assert sum(calls) == 1 and not torch.equal(third[3], first[3]) and torch.equal(third[4], first[4])
    assert pixel_keys(images[:1]) != pixel_keys(255 - images[:1])


def test_the_cache_files_hold_no_pickle(tmp_path):
    cache = FeatureCache(tmp_path, "d")
    cache.put(["a"], ["k"], torch.ones(1, 3))
    (stored,) = (tmp_path / "d").glob("*.safetensors")
    header = json.loads(stored.read_bytes()[8 : 8 + int.from_bytes(stored.read_bytes()[:8], "little")])
    assert json.loads(header["__metadata__"]["image_ids"]) == ["a"]


def test_each_precision_reads_only_its_own_features(dinov2, tmp_path, monkeypatch):
    cache = FeatureCache(tmp_path, "d")
    cache.put(["a"], ["k"], torch.ones(1, 2))
    assert cache.get(["a"], ["k"], "bf16")[0] is None and cache.get(["a"], ["k"], "fp32")[1].tolist() == [True]
    with pytest.raises(ValueError, match="fp32 or bf16"):
        cache.put(["b"], ["k"], torch.ones(1, 2), "auto")

    calls = []
    original = features_module.features_of
    monkeypatch.setattr(features_module, "features_of", lambda m, x: calls.append(len(x)) or original(m, x))
    model = make_expert("happy", init_from=str(dinov2)).eval()
    images = torch.stack([torch.from_numpy(np.array(face_image(28, 28, seed=i))).permute(2, 0, 1) for i in range(6)])
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images, torch.arange(6)), batch_size=4)
    ids = [f"img{i}" for i in range(6)]
    transform = BatchTransform(28, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    cache = FeatureCache(tmp_path, backbone_digest(str(dinov2)))
    exact = compute_features(model, transform, loader, ids, cache=cache, precision="fp32")
    fast = compute_features(model, transform, loader, ids, cache=cache, precision="bf16")
    assert sum(calls) == 12 and len(cache) == 12  # bfloat16 did not take the float32 rows, and was stored apart
    assert not torch.equal(exact, fast) and (exact - fast).abs().max() < 0.1 * exact.abs().max()
    calls.clear()
    again = FeatureCache(tmp_path, cache.digest)
    assert torch.equal(compute_features(model, transform, loader, ids, cache=again, precision="bf16"), fast)
    assert torch.equal(compute_features(model, transform, loader, ids, cache=again, precision="fp32"), exact)
    assert sum(calls) == 0
    with pytest.raises(ValueError, match="precision must be one of"):
        compute_features(model, transform, loader, ids, precision="fp16")
