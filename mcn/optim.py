"""Optimisers with named parameter groups, for fusion training and expert pretraining alike."""
from __future__ import annotations

from typing import Iterable

import torch

from mcn.errors import ConfigError


def build_optimizer(name: str, roles: Iterable[tuple[str, float, Iterable[torch.nn.Parameter]]], weight_decay: float,
                    momentum: float = 0.9, betas: tuple[float, float] = (0.9, 0.999), fused: bool | None = None,
                    config_key: str = "optim") -> torch.optim.Optimizer:
    """AdamW or SGD (Nesterov when momentum > 0) over `(role, lr, params)` groups.

    Weight decay goes to matrices and conv kernels only; biases and norm parameters are not decayed.
    Each group keeps its `role`, the name its rate has in the reports (`base_lr`, `head_lr`, `lr`).
    """
    groups = []
    for role, lr, params in roles:
        params = [p for p in params if p.requires_grad]
        groups.append({"params": [p for p in params if p.dim() >= 2], "lr": lr, "weight_decay": weight_decay, "role": role})
        groups.append({"params": [p for p in params if p.dim() < 2], "lr": lr, "weight_decay": 0.0, "role": role})
    extra = {} if fused is None else {"fused": fused}
    if name == "adamw":
        return torch.optim.AdamW(groups, betas=tuple(betas), **extra)
    if name == "sgd":
        return torch.optim.SGD(groups, momentum=momentum, nesterov=momentum > 0, **extra)
    raise ConfigError(f"unknown optimiser {name!r}; known: adamw, sgd (set {config_key}=adamw or {config_key}=sgd)")
