"""CIFAR-style pre-activation Wide ResNet (Zagoruyko & Komodakis), the study's expert (docs/reference.md §2).

Two layers of builders: `wide_resnet(...)` takes every argument; the registered presets (`wrn28_10()`, ...)
write the numbers out and are what configs name (`expert=wrn28_10`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mcn.models.registry import PooledConvExpert, register_expert


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


class WideResNet(PooledConvExpert):
    """An expert with the uniform interface of `mcn.models.registry`."""

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
        self._finish(widths[3], num_classes)

    def body(self, x: torch.Tensor) -> torch.Tensor:
        return self.stages(self.stem(x))


def wide_resnet(
    depth: int, widen_factor: int, dropout: float = 0.0, num_classes: int = 10, in_channels: int = 3
) -> WideResNet:
    return WideResNet(depth, widen_factor, dropout, num_classes, in_channels)


@register_expert("wrn28_10", family="wide_resnet")
def wrn28_10(num_classes: int, in_channels: int) -> WideResNet:
    """The study's expert: 36.5 M parameters with 100 classes, 640-d features."""
    return wide_resnet(28, 10, 0.3, num_classes, in_channels)


@register_expert("wrn16_8", family="wide_resnet")
def wrn16_8(num_classes: int, in_channels: int) -> WideResNet:
    return wide_resnet(16, 8, 0.3, num_classes, in_channels)


@register_expert("wrn16_4", family="wide_resnet")
def wrn16_4(num_classes: int, in_channels: int) -> WideResNet:
    """2.7 M parameters, 256-d features: a single-GPU or patient-CPU expert."""
    return wide_resnet(16, 4, 0.0, num_classes, in_channels)


@register_expert("wrn10_2", family="wide_resnet")
def wrn10_2(num_classes: int, in_channels: int) -> WideResNet:
    return wide_resnet(10, 2, 0.0, num_classes, in_channels)


@register_expert("wrn10_1", family="wide_resnet")
def wrn10_1(num_classes: int, in_channels: int) -> WideResNet:
    """Tiny (~78 k parameters, 64-d features): what CPU tests and the quickstart afford."""
    return wide_resnet(10, 1, 0.0, num_classes, in_channels)
