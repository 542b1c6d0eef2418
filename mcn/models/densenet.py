"""DenseNet-BC (Huang et al.) with a CIFAR stem, an expert family.

CIFAR stem: one 3x3 convolution (2 x growth rate channels) at stride 1, no max-pool. Each dense layer is
BN-ReLU-conv1x1 (bn_size x growth) -> BN-ReLU-conv3x3 (growth) -> dropout, its output concatenated to its
input; transitions BN-ReLU-conv1x1 (compression) -> 2x2 average pool. BN -> ReLU -> global average pool of
the last block is the feature (docs/reference.md §7).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mcn.models.registry import PooledConvExpert, register_expert


class _DenseLayer(nn.Module):
    def __init__(self, in_channels: int, growth_rate: int, bn_size: int, dropout: float):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv1 = nn.Conv2d(in_channels, bn_size * growth_rate, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(bn_size * growth_rate)
        self.conv2 = nn.Conv2d(bn_size * growth_rate, growth_rate, 3, 1, 1, bias=False)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        new = self.conv2(F.relu(self.bn2(self.conv1(F.relu(self.bn1(x))))))
        return torch.cat([x, self.dropout(new)], 1)


class _Transition(nn.Sequential):
    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(
            nn.BatchNorm2d(in_channels), nn.ReLU(), nn.Conv2d(in_channels, out_channels, 1, bias=False), nn.AvgPool2d(2)
        )


class DenseNet(PooledConvExpert):
    """An expert with the uniform interface of `mcn.models.registry`."""

    def __init__(
        self,
        growth_rate: int,
        blocks: list[int],
        bn_size: int,
        compression: float,
        dropout: float,
        num_classes: int,
        in_channels: int,
    ):
        super().__init__()
        self.architecture = dict(
            growth_rate=growth_rate,
            blocks=list(blocks),
            bn_size=bn_size,
            compression=compression,
            dropout=dropout,
            num_classes=num_classes,
            in_channels=in_channels,
        )
        width = 2 * growth_rate
        layers: list[nn.Module] = [nn.Conv2d(in_channels, width, 3, 1, 1, bias=False)]
        for i, n in enumerate(blocks):
            layers += [_DenseLayer(width + j * growth_rate, growth_rate, bn_size, dropout) for j in range(n)]
            width += n * growth_rate
            if i < len(blocks) - 1:
                layers.append(_Transition(width, int(width * compression)))
                width = int(width * compression)
        self.features = nn.Sequential(*layers)
        self._finish(width, num_classes)

    def body(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def body_last_stage(self) -> nn.Module:
        """The last dense block: the layers after the last transition."""
        layers = list(self.features)
        last = max((i for i, m in enumerate(layers) if isinstance(m, _Transition)), default=0)
        return nn.Sequential(*layers[last + 1 :])


@register_expert("densenet121", family="densenet")
def densenet121(num_classes: int, in_channels: int) -> DenseNet:
    """The reference's DenseNet-121 (growth 32, blocks 6-12-24-16, dropout 0.2): 7.0 M parameters with 100
    classes, 1024-d features."""
    return DenseNet(32, [6, 12, 24, 16], 4, 0.5, 0.2, num_classes, in_channels)


@register_expert("densenet_tiny", family="densenet")
def densenet_tiny(num_classes: int, in_channels: int) -> DenseNet:
    """Growth 12, two layers per block (~50 k parameters, 48-d features): tests and CPUs."""
    return DenseNet(12, [2, 2, 2, 2], 4, 0.5, 0.0, num_classes, in_channels)
