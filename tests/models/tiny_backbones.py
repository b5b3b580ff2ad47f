"""Tiny random backbones saved like real checkpoints (safetensors, config, image processor), for tests."""

from __future__ import annotations

from pathlib import Path

import torch

from models.transforms import IMAGENET_MEAN, IMAGENET_STD
from models.vit import make_processor


def tiny_dinov2(folder: Path, image_size: int = 28, grid_size: int = 56, seed: int = 0, processor: bool = True) -> Path:
    """A bare ``Dinov2Model`` (hidden 32, 2 layers, patch 14) whose position grid is ``grid_size`` px, used at
    ``image_size`` px (its processor's size), as the converted DINOv2-small backbone is (518 and 224)."""
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(seed)
    config = Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=2, patch_size=14,
                          image_size=grid_size, layerscale_value=1.0)  # fmt: skip
    model = Dinov2Model(config)
    with torch.no_grad():  # random weights, but not the all-equal init that makes every face look alike
        for parameter in model.parameters():
            parameter.add_(0.02 * torch.randn_like(parameter))
    model.save_pretrained(folder)
    if processor:
        make_processor(image_size, IMAGENET_MEAN, IMAGENET_STD).save_pretrained(folder)
    return Path(folder)


def tiny_vit(folder: Path, image_size: int = 32, seed: int = 0) -> Path:
    """A bare ``ViTModel`` (hidden 32, 2 layers, patch 8) at ``image_size`` px, with a 0.5/0.5 processor."""
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(seed)
    config = ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                       patch_size=8, image_size=image_size)  # fmt: skip
    ViTModel(config, add_pooling_layer=False).save_pretrained(folder)
    make_processor(image_size).save_pretrained(folder)
    return Path(folder)
