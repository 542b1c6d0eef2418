"""Experts (a registry of families, `mcn.models.registry`), fusion modules (`mcn.models.fusion`) and the MCN.

Importing this package registers every expert family and fusion type."""

from mcn.models import densenet, preact_resnet, resnext, timm_expert  # noqa: F401  (registers them)
from mcn.models.fusion import build_fusion, create_fusion, list_fusions, register_fusion
from mcn.models.mcn import MCN, ExpertStack, build_mcn, fusion_width
from mcn.models.registry import (
    ExpertSpec,
    build_expert,
    create_expert,
    expert_family,
    list_experts,
    register_expert,
)
from mcn.models.wide_resnet import WideResNet, wide_resnet

__all__ = [
    "MCN",
    "ExpertStack",
    "ExpertSpec",
    "WideResNet",
    "build_expert",
    "build_fusion",
    "build_mcn",
    "create_expert",
    "create_fusion",
    "expert_family",
    "fusion_width",
    "list_experts",
    "list_fusions",
    "register_expert",
    "register_fusion",
    "wide_resnet",
]
