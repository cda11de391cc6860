"""Meta-learnable classifiers: a feature extractor ``backbone`` and a linear ``head``.

Normalisation is GroupNorm throughout: BatchNorm keeps running statistics (hidden module state)
that break both per-episode DP gradients and ``torch.func`` calls.
"""

from __future__ import annotations

import torch
import torchvision
from torch import nn

from shared.config import ModelConfig

BACKBONE_PREFIX = "backbone."
HEAD_PREFIX = "head."


def _group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(8, channels), channels)


def _conv_block(in_channels: int, out_channels: int) -> nn.Sequential:
    # Pooling before ReLU is the same function (max commutes with ReLU) at a quarter of the ReLU cost.
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1),
        _group_norm(out_channels),
        nn.MaxPool2d(2),
        nn.ReLU(),
    )


class MetaClassifier(nn.Module):
    def __init__(self, backbone: nn.Module, feature_dim: int, n_way: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(feature_dim, n_way)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x).flatten(1))


def conv4(cfg: ModelConfig) -> MetaClassifier:
    backbone = nn.Sequential(
        _conv_block(cfg.in_channels, cfg.width),
        *(_conv_block(cfg.width, cfg.width) for _ in range(3)),
    )
    side = cfg.image_size
    for _ in range(4):
        side //= 2
    return MetaClassifier(backbone, cfg.width * side * side, cfg.n_way)


def resnet18(cfg: ModelConfig) -> MetaClassifier:
    """torchvision's ResNet-18 with GroupNorm and random weights (nothing is downloaded)."""
    net = torchvision.models.resnet18(weights=None, norm_layer=_group_norm)
    if cfg.in_channels != 3:
        net.conv1 = nn.Conv2d(cfg.in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
    feature_dim = net.fc.in_features
    net.fc = nn.Identity()
    return MetaClassifier(net, feature_dim, cfg.n_way)


def build_model(cfg: ModelConfig) -> MetaClassifier:
    return {"conv4": conv4, "resnet18": resnet18}[cfg.arch](cfg)
