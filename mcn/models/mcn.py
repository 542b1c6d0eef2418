"""The Multiple Choice Network: K experts (trained, not frozen) -> fusion -> global head."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from mcn.errors import ConfigError
from mcn.models.fusion import create_fusion
from mcn.models.wide_resnet import create_expert
from mcn.optim import optimizer_from_config


class MCN(nn.Module):
    """`forward(x)` returns `(global_logits [B, C], expert_logits [K, B, C])`.

    Each expert contributes its pooled features to the fusion and its own classifier's logits
    (the "individual head") to the dual-path loss. The feature width is read off the experts.
    """

    def __init__(self, experts: list[nn.Module], fusion: nn.Module, num_classes: int):
        super().__init__()
        widths = {e.num_features for e in experts}
        if len(widths) != 1:
            raise ConfigError(
                f"experts disagree on their feature width ({sorted(widths)}); use one expert preset for all"
            )
        self.experts = nn.ModuleList(experts)
        self.fusion = fusion
        self.num_features = widths.pop()
        self.global_head = nn.Linear(self.num_features, num_classes)

    @property
    def num_experts(self) -> int:
        return len(self.experts)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = [expert.forward_features(x) for expert in self.experts]
        expert_logits = torch.stack([expert.forward_head(f) for expert, f in zip(self.experts, features)])
        global_logits = self.global_head(self.fusion(torch.stack(features, dim=1)))
        return global_logits, expert_logits

    def parameter_counts(self) -> dict[str, int]:
        count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
        return {
            "experts": count(self.experts),
            "fusion": count(self.fusion),
            "global_head": count(self.global_head),
            "total": count(self),
        }

    def configure_optimizers(
        self, optim: Mapping, base_lr: float, head_lr: float, *, fused: bool | None = None
    ) -> torch.optim.Optimizer:
        """The one place where "experts at base_lr, fusion + global head at head_lr" lives.
        `optim`: the optimiser's config block (`optim/*.yaml`: name, weight_decay, momentum or betas)."""
        head = [*self.fusion.parameters(), *self.global_head.parameters()]
        return optimizer_from_config(
            optim, [("base_lr", base_lr, self.experts.parameters()), ("head_lr", head_lr, head)], fused=fused
        )


def build_expert(architecture: dict) -> nn.Module:
    expert = create_expert(architecture["preset"], architecture["num_classes"], architecture["in_channels"])
    wanted = {k: v for k, v in architecture.items() if k != "preset"}
    if expert.architecture != wanted:
        raise ConfigError(f"preset {architecture['preset']} is {expert.architecture}, the file describes {wanted}")
    return expert


def build_fusion(architecture: dict) -> nn.Module:
    kwargs = {k: v for k, v in architecture.items() if k != "name"}
    return create_fusion(architecture["name"], **kwargs)


def build_mcn(architecture: dict) -> MCN:
    """The inverse of a complete checkpoint's `architecture`: {"experts": [...], "fusion": ..., "global_head": ...}."""
    experts = [build_expert(a) for a in architecture["experts"]]
    return MCN(experts, build_fusion(architecture["fusion"]), architecture["global_head"]["num_classes"])
