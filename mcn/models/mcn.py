"""The Multiple Choice Network: K experts (trained, not frozen) -> fusion -> global head."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from mcn.errors import ConfigError
from mcn.models.fusion import create_fusion
from mcn.models.registry import build_expert
from mcn.optim import optimizer_from_config


def fusion_width(expert_widths: list[int], width: int | None = None) -> int:
    """The fusion's input width: `width` when given, else the experts' widest feature (their common width when they
    agree; the reference fused its mixed experts at the widest, docs/reference.md §7)."""
    return max(expert_widths) if width is None else int(width)


class MCN(nn.Module):
    """`forward(x)` returns `(global_logits [B, C], expert_logits [K, B, C])`.

    Each expert contributes its pooled features to the fusion and its own classifier's logits
    (the "individual head") to the dual-path loss. The fusion takes `width`-wide features (default: the
    experts' common width): an expert of another width reaches it through its own adapter, a
    Linear(d_k, width) trained with the fusion (identity where d_k == width).
    """

    def __init__(self, experts: list[nn.Module], fusion: nn.Module, num_classes: int, width: int | None = None):
        super().__init__()
        widths = [e.num_features for e in experts]
        if width is None and len(set(widths)) != 1:
            raise ConfigError(
                f"experts disagree on their feature width ({widths}); give the fusion width (fusion.width) "
                f"their adapters map to"
            )
        width = fusion_width(widths, width)
        self.experts = nn.ModuleList(experts)
        self.adapters = nn.ModuleList(nn.Identity() if d == width else nn.Linear(d, width) for d in widths)
        self.fusion = fusion
        self.num_features = width
        self.global_head = nn.Linear(width, num_classes)

    @property
    def num_experts(self) -> int:
        return len(self.experts)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = [expert.forward_features(x) for expert in self.experts]
        expert_logits = torch.stack([expert.forward_head(f) for expert, f in zip(self.experts, features)])
        adapted = torch.stack([adapt(f) for adapt, f in zip(self.adapters, features)], dim=1)
        global_logits = self.global_head(self.fusion(adapted))
        return global_logits, expert_logits

    @property
    def expert_widths(self) -> list[int]:
        return [e.num_features for e in self.experts]

    def parameter_counts(self) -> dict[str, int]:
        count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
        return {
            "experts": count(self.experts),
            "adapters": count(self.adapters),
            "fusion": count(self.fusion),
            "global_head": count(self.global_head),
            "total": count(self),
        }

    def configure_optimizers(
        self, optim: Mapping, base_lr: float, head_lr: float, *, fused: bool | None = None
    ) -> torch.optim.Optimizer:
        """The one place where "experts at base_lr; adapters, fusion and global head at head_lr" lives.
        `optim`: the optimiser's config block (`optim/*.yaml`: name, weight_decay, momentum or betas)."""
        head = [*self.adapters.parameters(), *self.fusion.parameters(), *self.global_head.parameters()]
        return optimizer_from_config(
            optim, [("base_lr", base_lr, self.experts.parameters()), ("head_lr", head_lr, head)], fused=fused
        )


def build_fusion(architecture: dict) -> nn.Module:
    kwargs = {k: v for k, v in architecture.items() if k != "name"}
    return create_fusion(architecture["name"], **kwargs)


def build_mcn(architecture: dict) -> MCN:
    """The inverse of a complete checkpoint's `architecture`: {"experts": [...], "fusion": ..., "global_head": ...};
    the adapters follow from the experts' widths and the fusion's."""
    experts = [build_expert(a) for a in architecture["experts"]]
    fusion = architecture["fusion"]
    return MCN(experts, build_fusion(fusion), architecture["global_head"]["num_classes"], fusion["input_dim"])
