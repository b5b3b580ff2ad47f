"""The valence/arousal annotator's provenance: what the card and the report say about the checkpoint."""

from __future__ import annotations

import hashlib

import torch

from builder.va_annotator import ValenceArousalAnnotator


def _regressor(folder):
    from transformers import ViTConfig, ViTForImageClassification

    from models.expert import make_processor

    torch.manual_seed(0)
    config = ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                       intermediate_size=64, num_labels=2, id2label={0: "valence", 1: "arousal"},
                       label2id={"valence": 0, "arousal": 1}, problem_type="regression")  # fmt: skip
    ViTForImageClassification(config).save_pretrained(folder)
    make_processor(32).save_pretrained(folder)
    (folder / "README.md").write_text("---\nlicense: cc-by-4.0\n---\n# va\n")
    return folder


def test_provenance_names_the_checkpoint_not_where_it_lies(tmp_path):
    folder = _regressor(tmp_path / "deep" / "place" / "va-base")
    provenance = ValenceArousalAnnotator(folder).provenance()
    assert set(provenance) == {"model", "version", "license", "source"}
    digest = hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()[:16]
    assert provenance["version"] == f"model.safetensors sha256 {digest}"
    assert provenance["license"] == "cc-by-4.0"
    assert "`va-base`" in provenance["model"] and "`va-base`" in provenance["source"]
    for value in provenance.values():
        assert str(tmp_path) not in value and "deep/place" not in value, value
