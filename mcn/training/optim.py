"""Optimisers with named parameter groups, their learning-rate schedule, and the input-width rule."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from mcn.errors import ConfigError


def build_optimizer(
    name: str,
    roles: Iterable[tuple[str, float, Iterable[torch.nn.Parameter]]],
    weight_decay: float,
    *,
    momentum: float = 0.9,
    betas: tuple[float, float] = (0.9, 0.999),
    fused: bool | None = None,
    config_key: str = "optim.name",
) -> torch.optim.Optimizer:
    """AdamW or SGD (Nesterov when momentum > 0) over `(role, lr, params)` groups.

    Weight decay goes to matrices and conv kernels only; biases and norm parameters are not decayed.
    Each group keeps its `role`, the name its rate has in the reports (`base_lr`, `head_lr`, `lr`).
    """
    groups = []
    for role, lr, params in roles:
        params = [p for p in params if p.requires_grad]
        groups.append(
            {"params": [p for p in params if p.dim() >= 2], "lr": lr, "weight_decay": weight_decay, "role": role}
        )
        groups.append({"params": [p for p in params if p.dim() < 2], "lr": lr, "weight_decay": 0.0, "role": role})
    extra = {} if fused is None else {"fused": fused}
    if name == "adamw":
        return torch.optim.AdamW(groups, betas=tuple(betas), **extra)
    if name == "sgd":
        return torch.optim.SGD(groups, momentum=momentum, nesterov=momentum > 0, **extra)
    raise ConfigError(f"unknown optimiser {name!r}; known: adamw, sgd (set {config_key}=adamw or {config_key}=sgd)")


def cosine_schedule(
    optimizer: torch.optim.Optimizer,
    total_steps: int,
    min_lr_ratio: float,
    warmup_steps: int = 0,
    start_steps: dict[str, int] | None = None,
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up, then cosine decay from each group's lr to `min_lr_ratio` times it. A group whose
    role is in `start_steps` stays at 0 until that step, then runs its own warm-up and cosine over the
    steps that remain (frozen experts joining the training)."""

    def factor_from(start: int):
        def factor(step: int) -> float:
            step -= start
            if step < 0:
                return 0.0
            if step < warmup_steps:
                return (step + 1) / warmup_steps
            progress = min(1.0, (step - warmup_steps) / max(1, total_steps - start - warmup_steps))
            return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

        return factor

    starts = start_steps or {}
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, [factor_from(starts.get(g.get("role"), 0)) for g in optimizer.param_groups]
    )


def resume_optimizer(
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LambdaLR,
    saved_optimizer: dict,
    saved_scheduler: dict,
    step: int,
) -> None:
    """Load a train state's optimiser (its moments) and schedule into those built from the current config, and go on
    at `step` (the finished epochs times the current steps per epoch) of the current config's schedule: its rates,
    length and warm-up, and its weight decay and betas, win over the saved ones. With the config a run was saved
    with, this is exactly where that run stood; after `trainer.resume=force` with, e.g., more epochs, a warm-up or a
    batch size of another length, or other rates, the run continues on the one schedule the new values describe,
    from the step it has reached, with no jump at the first step."""
    current = [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
    optimizer.load_state_dict(saved_optimizer)
    scheduler.load_state_dict(saved_scheduler)
    for group, settings in zip(optimizer.param_groups, current):
        group.update(settings)
    scheduler.base_lrs = [group["initial_lr"] for group in optimizer.param_groups]
    scheduler.last_epoch = step
    for group, base_lr, factor in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["lr"] = base_lr * factor(step)


def input_width_lrs(fusion_type: str, input_dim: int, base_lr: float, head_lr: float) -> tuple[float, float, str]:
    """docs/reference.md §3: wide features learn slower, narrow ones faster; TransformerBase slower still.
    Returns the scaled rates and what was applied, in words."""
    notes = []
    if input_dim > 1000:
        base_lr, head_lr = base_lr * 0.7, head_lr * 0.8
        notes.append("d>1000: base x0.7, head x0.8")
    elif input_dim < 100:
        base_lr, head_lr = base_lr * 1.3, head_lr * 1.2
        notes.append("d<100: base x1.3, head x1.2")
    if fusion_type == "TransformerBase" and input_dim > 500:
        base_lr *= 0.8
        notes.append("TransformerBase d>500: base x0.8")
    return base_lr, head_lr, "; ".join(notes) or "no change"


def optimizer_from_config(
    optim, roles, *, fused: bool | None = None, config_key: str = "optim.name"
) -> torch.optim.Optimizer:
    """`build_optimizer` with the keys of an `optim` config block (`optim/*.yaml`, `pretrain.optim`, or a dict)."""
    return build_optimizer(
        optim["name"],
        roles,
        optim["weight_decay"],
        momentum=optim.get("momentum", 0.9),
        betas=tuple(optim.get("betas", (0.9, 0.999))),
        fused=fused,
        config_key=config_key,
    )


def schedule_from_config(
    optimizer, optim, epochs: int, steps_per_epoch: int, start_epochs: dict[str, int] | None = None
) -> torch.optim.lr_scheduler.LambdaLR:
    """`cosine_schedule` over `epochs`, with the warm-up and end ratio of an `optim` config block;
    `start_epochs`: roles that join later (e.g. {"base_lr": 5} for experts frozen for 5 epochs)."""
    return cosine_schedule(
        optimizer,
        epochs * steps_per_epoch,
        optim["min_lr_ratio"],
        optim["warmup_epochs"] * steps_per_epoch,
        {role: n * steps_per_epoch for role, n in (start_epochs or {}).items()},
    )
