"""Fusion modules: K pooled expert features [B, K, d] -> one fused feature [B, d].

Registry in the timm manner: `@register_fusion("name")`, `create_fusion(name, ...)`, `list_fusions()`.
Notation (docs/reference.md §3): `LN_k` a per-expert LayerNorm(d), `M` the MLP
Linear(d, h) -> ReLU -> Dropout -> Linear(h, d), with h = d unless `hidden_dim` says otherwise.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from torch import nn

from mcn.errors import ConfigError

_FUSIONS: dict[str, type[nn.Module]] = {}


def register_fusion(name: str) -> Callable[[type[nn.Module]], type[nn.Module]]:
    def decorator(cls: type[nn.Module]) -> type[nn.Module]:
        if name in _FUSIONS:
            warnings.warn(f"fusion {name!r} registered twice; the later definition wins", stacklevel=2)
        _FUSIONS[name] = cls
        cls.fusion_name = name
        return cls

    return decorator


def list_fusions() -> list[str]:
    return sorted(_FUSIONS)


def create_fusion(name: str, num_experts: int, input_dim: int, **kwargs) -> nn.Module:
    """Build a registered fusion; `None` kwargs are dropped so one config schema serves every type. The module
    records what rebuilds it, `architecture` = {"name", "num_experts", "input_dim", **kwargs} (`build_fusion`)."""
    if name not in _FUSIONS:
        raise ConfigError(
            f"unknown fusion type {name!r}; known: {', '.join(list_fusions())} (set fusion=<one of them>)"
        )
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    try:
        fusion = _FUSIONS[name](num_experts=num_experts, input_dim=input_dim, **kwargs)
    except TypeError as e:  # a config key the constructor does not take
        raise ConfigError(f"fusion {name!r} does not accept {sorted(kwargs)}: {e}") from None
    fusion.architecture = {"name": name, "num_experts": num_experts, "input_dim": input_dim, **kwargs}
    return fusion


def build_fusion(architecture: dict) -> nn.Module:
    """The inverse of `fusion.architecture` (as a checkpoint records it)."""
    kwargs = {k: v for k, v in architecture.items() if k != "name"}
    return create_fusion(architecture["name"], **kwargs)


def _mlp(in_dim: int, hidden_dim: int, out_dim: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden_dim, out_dim))


class _Fusion(nn.Module):
    """Shared parts: per-expert LayerNorms and the output MLP `M`."""

    # parameters saved under an earlier name (files written before mcn 0.2), read back under today's
    renamed_keys = {"expert_logits": "mix_weights"}

    def __init__(
        self,
        num_experts: int,
        input_dim: int,
        hidden_dim: int | None = None,
        dropout: float = 0.2,
        layer_norms: bool = True,
        mlp_in_dim: int | None = None,
    ):
        super().__init__()
        if num_experts < 1 or input_dim < 1:
            raise ConfigError(f"fusion needs num_experts >= 1 and input_dim >= 1, got {num_experts} and {input_dim}")
        self.num_experts, self.input_dim = num_experts, input_dim
        self.hidden_dim = hidden_dim or input_dim
        self.norms = nn.ModuleList(nn.LayerNorm(input_dim) for _ in range(num_experts)) if layer_norms else None
        self.mlp = _mlp(mlp_in_dim or input_dim, self.hidden_dim, input_dim, dropout)

    def checked(self, features: torch.Tensor) -> torch.Tensor:
        if features.shape[1:] != (self.num_experts, self.input_dim):
            raise ValueError(
                f"{type(self).__name__} expects features [B, {self.num_experts}, {self.input_dim}], "
                f"got {list(features.shape)}"
            )
        return features

    def normed(self, features: torch.Tensor) -> torch.Tensor:
        """[B, K, d] -> [B, K, d], LN_k applied to expert k."""
        features = self.checked(features)
        return torch.stack([norm(features[:, k]) for k, norm in enumerate(self.norms)], dim=1)


@register_fusion("multiplicative")
class MultiplicativeFusion(_Fusion):
    """z = M(prod_k LN_k(f_k))"""

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.normed(features).prod(dim=1))


@register_fusion("multiplicativeShifted")
class MultiplicativeShiftedFusion(_Fusion):
    """z = M(prod_k (LN_k(f_k) + 1)): the shift keeps a near-zero feature from zeroing the product."""

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.mlp((self.normed(features) + 1).prod(dim=1))


@register_fusion("multiplicativeAddition")
class MultiplicativeAdditionFusion(_Fusion):
    """z = M(prod_k LN_k(f_k) + sum_k softmax(theta)_k LN_k(f_k)), theta initialised to ones."""

    def __init__(self, num_experts: int, input_dim: int, hidden_dim: int | None = None, dropout: float = 0.2):
        super().__init__(num_experts, input_dim, hidden_dim, dropout)
        self.mix_weights = nn.Parameter(torch.ones(num_experts))  # theta: one logit per expert

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        normed = self.normed(features)
        weights = self.mix_weights.softmax(0).to(normed.dtype)
        return self.mlp(normed.prod(dim=1) + torch.einsum("bkd,k->bd", normed, weights))


@register_fusion("simpleAddition")
class SimpleAdditionFusion(_Fusion):
    """z = M(sum_k softmax(theta)_k f_k): no LayerNorms."""

    def __init__(self, num_experts: int, input_dim: int, hidden_dim: int | None = None, dropout: float = 0.2):
        super().__init__(num_experts, input_dim, hidden_dim, dropout, layer_norms=False)
        self.mix_weights = nn.Parameter(torch.ones(num_experts))  # theta: one logit per expert

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        weights = self.mix_weights.softmax(0).to(features.dtype)
        return self.mlp(torch.einsum("bkd,k->bd", self.checked(features), weights))


@register_fusion("concatenation")
class ConcatenationFusion(_Fusion):
    """z = MLP(concat_k LN_k(f_k)), MLP = Linear(K*d, h) -> ReLU -> Dropout -> Linear(h, d)."""

    def __init__(self, num_experts: int, input_dim: int, hidden_dim: int | None = None, dropout: float = 0.2):
        super().__init__(num_experts, input_dim, hidden_dim, dropout, mlp_in_dim=num_experts * input_dim)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.normed(features).flatten(1))


@register_fusion("TransformerBase")
class TransformerBaseFusion(_Fusion):
    """S = stack_k LN_k(f_k); z = M(mean_k MultiheadAttention(S, S, S))."""

    def __init__(
        self, num_experts: int, input_dim: int, hidden_dim: int | None = None, dropout: float = 0.2, num_heads: int = 8
    ):
        super().__init__(num_experts, input_dim, hidden_dim, dropout)
        if input_dim % num_heads:
            raise ConfigError(
                f"TransformerBase needs the feature width {input_dim} divisible by fusion.num_heads={num_heads}; "
                f"pick a divisor of {input_dim}, or a fusion.width that {num_heads} divides"
            )
        self.attention = nn.MultiheadAttention(input_dim, num_heads, dropout=dropout, batch_first=True)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        tokens = self.normed(features)
        attended, _ = self.attention(tokens, tokens, tokens, need_weights=False)
        return self.mlp(attended.mean(dim=1))
