"""The Multiple Choice Network: K experts (trained, not frozen) -> fusion -> global head."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mcn.errors import ConfigError
from mcn.models.fusion import build_fusion
from mcn.models.registry import build_expert


class ExpertStack(nn.Module):
    """Experts side by side, without fusion: `forward(x)` gives their logits [K, B, C]."""

    def __init__(self, experts: list[nn.Module]):
        super().__init__()
        self.experts = nn.ModuleList(experts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([expert(x) for expert in self.experts])


class GlobalHead(nn.Linear):
    """Linear(d, classes) over the fused feature. With `ensemble_start`, the MCN's global logits are the
    experts' logit average plus `gate` times this head's output; the gate starts at 0, so training starts
    from the logit average and the fusion only adds what it learns (the gate lives here, so the global
    head's component file is complete)."""

    def __init__(self, in_features: int, num_classes: int, ensemble_start: bool = False):
        super().__init__(in_features, num_classes)
        self.gate = nn.Parameter(torch.zeros(())) if ensemble_start else None

    @property
    def architecture(self) -> dict:
        arch = {"in_features": self.in_features, "num_classes": self.out_features}
        return arch | ({"ensemble_start": True} if self.gate is not None else {})


def drop_experts(features: torch.Tensor, p: float) -> torch.Tensor:
    """Expert dropout: each sample loses each expert's features with probability p (at least one expert stays).
    A dropped expert's features are replaced by the mean of the kept ones: a neutral stand-in for every
    fusion type (zeros would wipe out a product fusion)."""
    b, k, _ = features.shape
    keep = torch.rand(b, k, device=features.device) >= p
    # a sample that lost every expert gets one back at random (no host sync: the graph stays static)
    rescue = F.one_hot(torch.randint(0, k, (b,), device=features.device), k).bool()
    keep = keep | (rescue & ~keep.any(dim=1, keepdim=True))
    weights = keep.unsqueeze(-1).to(features.dtype)
    mean = (features * weights).sum(1, keepdim=True) / weights.sum(1, keepdim=True)
    return torch.where(keep.unsqueeze(-1), features, mean)


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
    Training options: `ensemble_start` (see GlobalHead), `expert_dropout` (see drop_experts),
    `experts_frozen`, set per epoch by the recipe, which keeps the experts in eval mode (their learning
    rate is 0 then: see mcn.training.optim.cosine_schedule), and `expert_norms_frozen`, which keeps the experts'
    BatchNorm layers in eval mode (running statistics fixed, affine weights still learning) while the rest trains.
    """

    def __init__(
        self,
        experts: list[nn.Module],
        fusion: nn.Module,
        num_classes: int,
        width: int | None = None,
        *,
        ensemble_start: bool = False,
        expert_dropout: float = 0.0,
    ):
        super().__init__()
        widths = [e.num_features for e in experts]
        if width is None and len(set(widths)) != 1:
            raise ConfigError(
                f"experts disagree on their feature width ({widths}); give the fusion width (fusion.width) "
                f"their adapters map to"
            )
        if not 0 <= expert_dropout < 1:
            raise ConfigError(f"model.expert_dropout={expert_dropout} must lie in [0, 1)")
        width = fusion_width(widths, width)
        self.experts = nn.ModuleList(experts)
        self.adapters = nn.ModuleList(nn.Identity() if d == width else nn.Linear(d, width) for d in widths)
        self.fusion = fusion
        self.num_features = width
        self.global_head = GlobalHead(width, num_classes, ensemble_start)
        self.expert_dropout = expert_dropout
        self.experts_frozen = False
        self.expert_norms_frozen = False

    @property
    def num_experts(self) -> int:
        return len(self.experts)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features, expert_logits = self.forward_experts(x)
        return self.fuse(features, expert_logits), expert_logits

    def forward_experts(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """The experts' side: each expert's pooled features ([B, d_k] each) and their own logits [K, B, C]."""
        features = [expert.forward_features(x) for expert in self.experts]
        return features, torch.stack([expert.forward_head(f) for expert, f in zip(self.experts, features)])

    def fuse(self, features: list[torch.Tensor], expert_logits: torch.Tensor) -> torch.Tensor:
        """The fusion side, on what `forward_experts` gave (or a cache of it: the probe, mcn.training.probe):
        adapters -> fusion -> global head; the global logits [B, C]."""
        adapted = torch.stack([adapt(f) for adapt, f in zip(self.adapters, features)], dim=1)
        if self.training and self.expert_dropout > 0:
            adapted = drop_experts(adapted, self.expert_dropout)
        global_logits = self.global_head(self.fusion(adapted))
        if self.global_head.gate is not None:
            global_logits = expert_logits.mean(0) + self.global_head.gate * global_logits
        return global_logits

    def reset_expert_heads(self) -> None:
        """Start every expert's own classifier anew (default initialisation, in place: an optimiser holding its
        parameters keeps them), as the reference's fusion stage gave its class-split experts new heads over all
        classes."""
        for expert in self.experts:
            for module in expert.get_classifier().modules():
                if hasattr(module, "reset_parameters"):
                    module.reset_parameters()

    def fusion_side(self) -> list[nn.Module]:
        """What learns at head_lr and what the probe fits: adapters, fusion module, global head."""
        return [self.adapters, self.fusion, self.global_head]

    def train(self, mode: bool = True) -> MCN:
        super().train(mode)
        if mode and self.experts_frozen:  # frozen experts: fixed BatchNorm statistics, no dropout
            self.experts.eval()
        elif mode and self.expert_norms_frozen:  # statistics of the pretraining data kept; weights learn
            for module in self.experts.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.eval()
        return self

    def expert_last_stages(self) -> list[nn.Parameter]:
        """Every expert's last stage, final norm and own head (`last_stage()`): what surgical fine-tuning trains."""
        return [p for expert in self.experts for module in expert.last_stage() for p in module.parameters()]

    @property
    def architecture(self) -> dict:
        """What rebuilds this MCN (`build_mcn`): each expert's, the fusion module's and the global head's own
        record; the adapters follow from the experts' widths and the fusion's."""
        return {
            "experts": [e.architecture for e in self.experts],
            "fusion": self.fusion.architecture,
            "global_head": self.global_head.architecture,
        }

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

    def param_groups(self, base_lr: float, head_lr: float) -> list[tuple[str, float, list[nn.Parameter]]]:
        """The one place where "experts at base_lr; adapters, fusion and global head at head_lr" lives:
        `(role, lr, parameters)` groups for `mcn.training.optim.build_optimizer`."""
        head = [p for module in self.fusion_side() for p in module.parameters()]
        return [("base_lr", base_lr, list(self.experts.parameters())), ("head_lr", head_lr, head)]


def build_mcn(architecture: dict) -> MCN:
    """The inverse of `MCN.architecture` (as a complete checkpoint records it)."""
    experts = [build_expert(a) for a in architecture["experts"]]
    fusion, head = architecture["fusion"], architecture["global_head"]
    return MCN(
        experts,
        build_fusion(fusion),
        head["num_classes"],
        fusion["input_dim"],
        ensemble_start=head.get("ensemble_start", False),
    )
