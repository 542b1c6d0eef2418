"""The expert registry: every expert architecture mcn builds, by preset name, in the manner of the fusion registry.

`@register_expert("densenet121", family="densenet")` on a builder `(num_classes, in_channels, **options)`;
`create_expert(preset, num_classes, in_channels, **options)`; `list_experts()`; `expert_family(preset)`.

Every expert has the uniform interface the MCN relies on:
- `forward_features(x)`: pooled features [B, d];
- `forward_head(features)`: the expert's own logits [B, C];
- `get_classifier()`: the module `forward_head` applies (timm's name), e.g. to start it anew;
- `num_features`: d;
- `last_stage()`: the modules of the last stage and everything after it (final norm, own classifier): what
  surgical fine-tuning trains (`finetune.expert_layers=last_stage`);
- `architecture`: what rebuilds it (`build_expert`): the preset, its options, and the numbers that fix its shape.

A config names an expert with an `ExpertSpec`: a preset name, `timm/<model name>`, or a mapping
`{preset: ..., **options}` (what `conf/expert/*.yaml` holds).
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from mcn.errors import ConfigError

_EXPERTS: dict[str, tuple[Callable[..., nn.Module], str]] = {}  # preset -> (builder, family)
_SHAPE_ARGS = ("num_classes", "in_channels")  # every builder's first two arguments, taken from the data


class PooledConvExpert(nn.Module):
    """What the CIFAR families share: `body(x)`, the family's own (the last feature map), then BatchNorm ->
    ReLU -> global average pool (the feature, `num_features` wide) and the expert's own classifier.
    A family builds its layers, then calls `_finish(width, num_classes)`."""

    def _finish(self, width: int, num_classes: int) -> None:
        self.bn = nn.BatchNorm2d(width)
        self.num_features = width
        self.classifier = nn.Linear(width, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def body(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def body_last_stage(self) -> nn.Module:
        """The last stage of `body` (a family with `stages` has it there; others say where theirs is)."""
        return self.stages[-1]

    def last_stage(self) -> list[nn.Module]:
        return [self.body_last_stage(), self.bn, self.classifier]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return F.adaptive_avg_pool2d(F.relu(self.bn(self.body(x))), 1).flatten(1)

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        return self.classifier(features)

    def get_classifier(self) -> nn.Module:
        return self.classifier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def register_expert(name: str, family: str) -> Callable:
    def decorator(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _EXPERTS:
            warnings.warn(f"expert preset {name!r} registered twice; the later definition wins", stacklevel=2)
        _EXPERTS[name] = (builder, family)
        return builder

    return decorator


def list_experts() -> list[str]:
    return sorted(_EXPERTS)


def _entry(preset: str) -> tuple[Callable[..., nn.Module], str]:
    if preset not in _EXPERTS:
        raise ConfigError(
            f"unknown expert preset {preset!r}; known: {', '.join(list_experts())} "
            f"(set expert=<one of them>, or name them in experts.presets)"
        )
    return _EXPERTS[preset]


def expert_family(preset: str) -> str:
    return _entry(preset)[1]


def expert_options(preset: str) -> list[str]:
    """The keyword options a preset's builder takes besides the data's class count and channels."""
    params = inspect.signature(_entry(preset)[0]).parameters
    return [p for p in params if p not in _SHAPE_ARGS]


def create_expert(preset: str, num_classes: int, in_channels: int, **options) -> nn.Module:
    builder, _ = _entry(preset)
    unknown = sorted(set(options) - set(expert_options(preset)))
    if unknown:
        raise ConfigError(
            f"expert preset {preset!r} takes no option {unknown[0]!r}; its options: {expert_options(preset) or 'none'}"
        )
    expert = builder(num_classes, in_channels, **options)
    expert.architecture = {"preset": preset, **expert.architecture}
    return expert


def build_expert(architecture: dict) -> nn.Module:
    """The inverse of `expert.architecture` (as a checkpoint records it): rebuild, and check that it is what the
    record describes."""
    options = {k: v for k, v in architecture.items() if k in expert_options(architecture["preset"])}
    expert = create_expert(architecture["preset"], architecture["num_classes"], architecture["in_channels"], **options)
    if expert.architecture != architecture:
        raise ConfigError(
            f"preset {architecture['preset']} is {expert.architecture}, the file describes {architecture}"
        )
    return expert


@dataclass(frozen=True)
class ExpertSpec:
    """One expert as a config names it: a preset and its options (e.g. timm's model `name`)."""

    preset: str
    options: dict = field(default_factory=dict)

    @classmethod
    def parse(cls, entry: str | Mapping) -> ExpertSpec:
        """`"wrn16_4"`, `"timm/resnet18"` (a preset and its `name` option), or `{"preset": ..., **options}`."""
        if isinstance(entry, Mapping):
            options = {k: v for k, v in entry.items() if k != "preset"}
            return cls(str(entry["preset"]), options)
        preset, _, name = str(entry).partition("/")
        return cls(preset, {"name": name} if name else {})

    @property
    def label(self) -> str:
        """The short form: the preset, with the model name where it has one (`timm/resnet18`)."""
        return f"{self.preset}/{self.options['name']}" if self.options.get("name") else self.preset

    @property
    def family(self) -> str:
        return expert_family(self.preset)

    def build(self, num_classes: int, in_channels: int, image_size: tuple[int, int] | None = None) -> nn.Module:
        """The expert; with `image_size`, checked by one forward pass that it takes the data's images (a timm
        backbone may not), so a misfit ends in one line at setup, not in a traceback at the first step."""
        expert = create_expert(self.preset, num_classes, in_channels, **self.options)
        if image_size is not None:
            was_training = expert.training
            try:
                with torch.no_grad():
                    expert.eval()(torch.zeros(1, in_channels, *image_size))
            except (RuntimeError, AssertionError, ValueError) as e:  # timm asserts on input sizes
                raise ConfigError(
                    f"expert {self.label} cannot take the data's {in_channels}x{image_size[0]}x{image_size[1]} "
                    f"images ({str(e).splitlines()[0]}); choose a model that accepts them"
                ) from None
            expert.train(was_training)
        return expert
