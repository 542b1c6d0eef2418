"""CIFAR-style pre-activation ResNeXt (Xie et al.), an expert family.

ResNeXt-29 (C x Wd): a 3x3 stem (64 channels), three stages of three bottleneck blocks at strides 1, 2, 2
with outputs 256, 512, 1024; each block is BN-ReLU-conv1x1 -> BN-ReLU-grouped conv3x3 (C groups of width W
at the first stage, doubling per stage) -> dropout -> BN-ReLU-conv1x1, a 1x1 projection of the
pre-activation where the shape changes. BN -> ReLU -> global average pool is the feature (docs/reference.md §7).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mcn.models.registry import PooledConvExpert, register_expert


class _Bottleneck(nn.Module):
    def __init__(
        self, in_planes: int, out_planes: int, group_width: int, cardinality: int, stride: int, dropout: float
    ):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, group_width, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(group_width)
        self.conv2 = nn.Conv2d(group_width, group_width, 3, stride, 1, groups=cardinality, bias=False)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.bn3 = nn.BatchNorm2d(group_width)
        self.conv3 = nn.Conv2d(group_width, out_planes, 1, bias=False)
        self.shortcut = (
            nn.Conv2d(in_planes, out_planes, 1, stride, bias=False) if stride != 1 or in_planes != out_planes else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(x))
        residual = x if self.shortcut is None else self.shortcut(out)
        out = self.conv2(F.relu(self.bn2(self.conv1(out))))
        out = self.conv3(F.relu(self.bn3(self.dropout(out))))
        return out + residual


class PreActResNeXt(PooledConvExpert):
    """An expert with the uniform interface of `mcn.models.registry`. `widths` are the stages' outputs;
    a stage's grouped convolution is `cardinality x base_width x (its output / the first output)` wide."""

    def __init__(
        self,
        blocks: list[int],
        widths: list[int],
        cardinality: int,
        base_width: int,
        stem_width: int,
        dropout: float,
        num_classes: int,
        in_channels: int,
    ):
        super().__init__()
        if len(blocks) != len(widths) or min(blocks) < 1:
            raise ValueError(f"PreActResNeXt needs one block count >= 1 per stage width, got {blocks} and {widths}")
        self.architecture = dict(
            blocks=list(blocks),
            widths=list(widths),
            cardinality=cardinality,
            base_width=base_width,
            stem_width=stem_width,
            dropout=dropout,
            num_classes=num_classes,
            in_channels=in_channels,
        )
        self.stem = nn.Conv2d(in_channels, stem_width, 3, 1, 1, bias=False)
        stages, in_planes = [], stem_width
        for stage, (n, planes) in enumerate(zip(blocks, widths)):
            group_width = cardinality * base_width * planes // widths[0]
            first = _Bottleneck(in_planes, planes, group_width, cardinality, 1 if stage == 0 else 2, dropout)
            rest = [_Bottleneck(planes, planes, group_width, cardinality, 1, dropout) for _ in range(n - 1)]
            stages.append(nn.Sequential(first, *rest))
            in_planes = planes
        self.stages = nn.Sequential(*stages)
        self._finish(widths[-1], num_classes)

    def body(self, x: torch.Tensor) -> torch.Tensor:
        return self.stages(self.stem(x))


@register_expert("resnext29_8x64d", family="resnext")
def resnext29_8x64d(num_classes: int, in_channels: int) -> PreActResNeXt:
    """The reference's PreAct-ResNeXt-29 8x64d (dropout 0.3): 34.4 M parameters with 100 classes, 1024-d features."""
    return PreActResNeXt([3, 3, 3], [256, 512, 1024], 8, 64, 64, 0.3, num_classes, in_channels)


@register_expert("resnext_tiny", family="resnext")
def resnext_tiny(num_classes: int, in_channels: int) -> PreActResNeXt:
    """One block per stage, 4 groups of 4 (~0.1 M parameters, 256-d features): tests and CPUs."""
    return PreActResNeXt([1, 1, 1], [64, 128, 256], 4, 4, 16, 0.0, num_classes, in_channels)
