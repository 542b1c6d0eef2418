"""CIFAR-style pre-activation ResNet (He et al., "Identity Mappings in Deep Residual Networks"), an expert family.

CIFAR stem: one 3x3 convolution at stride 1, no max-pool; four stages of basic blocks at strides 1, 2, 2, 2;
BN -> ReLU -> global average pool of the last stage is the feature (docs/reference.md §7).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mcn.models.registry import PooledConvExpert, register_expert


class _Block(nn.Module):
    """BN-ReLU-conv3x3-BN-ReLU-conv3x3; a 1x1 projection of the pre-activation where the shape changes."""

    def __init__(self, in_planes: int, planes: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.shortcut = (
            nn.Conv2d(in_planes, planes, 1, stride, bias=False) if stride != 1 or in_planes != planes else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(x))
        residual = x if self.shortcut is None else self.shortcut(out)
        out = self.conv2(F.relu(self.bn2(self.conv1(out))))
        return out + residual


class PreActResNet(PooledConvExpert):
    """An expert with the uniform interface of `mcn.models.registry`."""

    def __init__(self, blocks: list[int], widths: list[int], num_classes: int, in_channels: int):
        super().__init__()
        if len(blocks) != len(widths) or min(blocks) < 1:
            raise ValueError(f"PreActResNet needs one block count >= 1 per stage width, got {blocks} and {widths}")
        self.architecture = dict(
            blocks=list(blocks), widths=list(widths), num_classes=num_classes, in_channels=in_channels
        )
        self.stem = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        stages, in_planes = [], widths[0]
        for stage, (n, planes) in enumerate(zip(blocks, widths)):
            first = _Block(in_planes, planes, 1 if stage == 0 else 2)
            stages.append(nn.Sequential(first, *(_Block(planes, planes, 1) for _ in range(n - 1))))
            in_planes = planes
        self.stages = nn.Sequential(*stages)
        self._finish(widths[-1], num_classes)

    def body(self, x: torch.Tensor) -> torch.Tensor:
        return self.stages(self.stem(x))


@register_expert("preact_resnet18", family="preact_resnet")
def preact_resnet18(num_classes: int, in_channels: int) -> PreActResNet:
    """The reference's PreAct-ResNet-18: 11.2 M parameters with 100 classes, 512-d features."""
    return PreActResNet([2, 2, 2, 2], [64, 128, 256, 512], num_classes, in_channels)


@register_expert("preact_resnet_tiny", family="preact_resnet")
def preact_resnet_tiny(num_classes: int, in_channels: int) -> PreActResNet:
    """One block per stage, a quarter of the widths (~0.3 M parameters, 128-d features): tests and CPUs."""
    return PreActResNet([1, 1, 1, 1], [16, 32, 64, 128], num_classes, in_channels)
