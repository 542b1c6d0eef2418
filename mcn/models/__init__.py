from mcn.models.fusion import create_fusion, list_fusions, register_fusion
from mcn.models.mcn import MCN, ExpertStack, build_expert, build_fusion, build_mcn
from mcn.models.wide_resnet import EXPERT_PRESETS, WideResNet, create_expert, wide_resnet

__all__ = [
    "MCN",
    "ExpertStack",
    "build_expert",
    "build_fusion",
    "build_mcn",
    "WideResNet",
    "EXPERT_PRESETS",
    "create_expert",
    "create_fusion",
    "list_fusions",
    "register_fusion",
    "wide_resnet",
]
