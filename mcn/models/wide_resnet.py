"""CIFAR-style pre-activation Wide ResNet (Zagoruyko & Komodakis), the MCN expert.

Two layers of builders: `wide_resnet(...)` takes every argument; the presets (`wrn28_10()`, ...)
write the numbers out and are what configs name (`expert.preset`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from mcn.errors import ConfigError


class _Block(nn.Module):
    """BN-ReLU-conv3x3-dropout-BN-ReLU-conv3x3, 1x1 conv shortcut when the shape changes."""

    def __init__(self, in_planes: int, out_planes: int, stride: int, dropout: float):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.conv2 = nn.Conv2d(out_planes, out_planes, 3, 1, 1, bias=False)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.shortcut = (
            nn.Conv2d(in_planes, out_planes, 1, stride, 0, bias=False)
            if stride != 1 or in_planes != out_planes
            else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(x))
        # the pre-activation feeds the projection shortcut too (as in the WRN paper's code)
        residual = x if self.shortcut is None else self.shortcut(out)
        out = self.conv1(out)
        out = self.conv2(self.dropout(F.relu(self.bn2(out))))
        return out + residual


class WideResNet(nn.Module):
    """Expert with the uniform interface the MCN relies on:
    `forward_features` (pooled features), `forward_head` (the expert's own classifier),
    `num_features` (the feature width), and `architecture` (constructor arguments)."""

    def __init__(self, depth: int, widen_factor: int, dropout: float, num_classes: int, in_channels: int):
        super().__init__()
        if (depth - 4) % 6 != 0 or depth < 10:
            raise ValueError(f"WRN depth must be 6n+4 and at least 10, got {depth}")
        n = (depth - 4) // 6
        widths = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.architecture = dict(
            depth=depth, widen_factor=widen_factor, dropout=dropout, num_classes=num_classes, in_channels=in_channels
        )
        self.stem = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        stages = []
        for stage, stride in enumerate((1, 2, 2)):
            blocks = [
                _Block(
                    widths[stage] if i == 0 else widths[stage + 1], widths[stage + 1], stride if i == 0 else 1, dropout
                )
                for i in range(n)
            ]
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.bn = nn.BatchNorm2d(widths[3])
        self.num_features = widths[3]
        self.classifier = nn.Linear(widths[3], num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stages(self.stem(x))
        return F.adaptive_avg_pool2d(F.relu(self.bn(x)), 1).flatten(1)

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        return self.classifier(features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def wide_resnet(
    depth: int, widen_factor: int, dropout: float = 0.0, num_classes: int = 10, in_channels: int = 3
) -> WideResNet:
    return WideResNet(depth, widen_factor, dropout, num_classes, in_channels)


def wrn28_10(num_classes: int, in_channels: int) -> WideResNet:
    """The study's expert: 36.5 M parameters with 100 classes, 640-d features."""
    return wide_resnet(28, 10, 0.3, num_classes, in_channels)


def wrn16_8(num_classes: int, in_channels: int) -> WideResNet:
    return wide_resnet(16, 8, 0.3, num_classes, in_channels)


def wrn16_4(num_classes: int, in_channels: int) -> WideResNet:
    """2.7 M parameters, 256-d features: a single-GPU or patient-CPU expert."""
    return wide_resnet(16, 4, 0.0, num_classes, in_channels)


def wrn10_2(num_classes: int, in_channels: int) -> WideResNet:
    return wide_resnet(10, 2, 0.0, num_classes, in_channels)


def wrn10_1(num_classes: int, in_channels: int) -> WideResNet:
    """Tiny (~78 k parameters, 64-d features): what CPU tests and the quickstart afford."""
    return wide_resnet(10, 1, 0.0, num_classes, in_channels)


EXPERT_PRESETS: dict[str, Callable[[int, int], WideResNet]] = {
    fn.__name__: fn for fn in (wrn28_10, wrn16_8, wrn16_4, wrn10_2, wrn10_1)
}


def create_expert(preset: str, num_classes: int, in_channels: int) -> WideResNet:
    if preset not in EXPERT_PRESETS:
        raise ConfigError(
            f"unknown expert preset {preset!r}; known: {', '.join(EXPERT_PRESETS)} (set expert=<one of them>)"
        )
    return EXPERT_PRESETS[preset](num_classes, in_channels)
