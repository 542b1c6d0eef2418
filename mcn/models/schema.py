"""The config blocks of the model (`experts`, `expert`, `fusion`, `model`): every key, its type, default, rule and
meaning. The presets (`conf/expert/*.yaml`, `conf/fusion/*.yaml`) set values of these."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from omegaconf import MISSING, DictConfig

from mcn.errors import ConfigError
from mcn.schema import COUNT, Rule, is_number, key

UNDER_ONE = Rule("a number in [0, 1)", lambda v: is_number(v) and 0 <= v < 1)


@dataclass
class ExpertsConfig:
    """The experts of the MCN: how many, which architecture each, and where their pretrained files are."""

    num: int = key(4, "K, the number of experts in the MCN", COUNT)
    presets: Any = key(
        None,
        "one preset per expert (mixed experts), e.g. [wrn16_4,preact_resnet18,densenet121,resnext29_8x64d] or "
        "timm/<model>; one entry: all alike; null: every expert is the `expert` group's",
        nullable=True,
    )
    dir: str | None = key(
        "${paths.experts_dir}",
        "where the pretrained expert files are; null: the experts start from scratch",
        nullable=True,
    )
    filename: str = key("best_wrn_expert_{index}.pth", "file name pattern inside experts.dir (docs/reference.md §4)")
    trust_pickle: bool = key(
        False,
        "true: expert files holding objects beyond weights, numbers, text, containers and numpy values are unpickled "
        "in full, which can run code: only for files you trust",
    )


@dataclass
class ExpertConfig:
    """One expert architecture: a preset of the expert registry (mcn.models.list_experts())."""

    preset: str = key(MISSING, "the registry's preset, e.g. wrn28_10 (family wide_resnet)")


@dataclass
class TimmExpertConfig(ExpertConfig):
    """Any timm backbone by name (mcn.models.timm_expert): expert=timm expert.name=resnet18."""

    preset: str = key("timm", "the registry's timm entry (family timm)")
    name: str = key("resnet18", "a model of timm.list_models(); it must take the data's image size")
    pretrained: bool = key(False, "true: start from the weights in pretrained_file (nothing is downloaded)")
    pretrained_file: str = key(
        "${paths.data_dir}/timm/${.name}.safetensors",
        "the model's weights file (model.safetensors from its Hugging Face page)",
    )
    native_input: bool = key(
        True, "pretrained: feed it the input size and normalisation it was trained on (timm's data config)"
    )


@dataclass
class FusionConfig:
    """The fusion module (mcn.models.fusion, docs/reference.md §3): its type and constructor arguments."""

    name: str = key(MISSING, "the fusion type, a name of mcn.models.list_fusions()")
    hidden_dim: int | None = key(
        None, "width of the fusion's MLP M; null: the fusion width", COUNT, example=512, nullable=True
    )
    dropout: float = key(0.2, "dropout inside M (and in TransformerBase's attention)", UNDER_ONE)
    width: int | None = key(
        None,
        "input_dim, the width of the features fused; null: the experts' (the widest when they differ); other widths "
        "reach it through a Linear adapter each",
        COUNT,
        example=640,
        nullable=True,
    )

    @classmethod
    def check(cls, node: DictConfig, cfg: DictConfig) -> None:
        from mcn.models.fusion import list_fusions

        if node.name not in list_fusions():
            raise ConfigError(
                f"unknown fusion type {node.name!r}; known: {', '.join(list_fusions())} (set fusion=<one of them>)"
            )


@dataclass
class AttentionFusionConfig(FusionConfig):
    """A fusion with multi-head attention (TransformerBase)."""

    num_heads: int = key(8, "attention heads; must divide the fusion width", COUNT)


@dataclass
class ModelConfig:
    """The MCN around experts and fusion module (mcn.models.MCN)."""

    ensemble_start: bool = key(
        False, "global logits = experts' logit average + gate x fused head, the gate starting at 0"
    )
    new_expert_heads: bool = key(
        False,
        "fusion stage: the experts' own heads start anew over all classes (the reference's class-split fusion stage)",
    )
    expert_dropout: float = key(
        0.0, "fusion stage: chance that a sample loses an expert's features (replaced by the others' mean)", UNDER_ONE
    )

    @classmethod
    def check(cls, node: DictConfig, cfg: DictConfig) -> None:
        if node.new_expert_heads and not cfg.loss.alpha:
            raise ConfigError(
                "model.new_expert_heads=true starts the experts' heads anew, but loss.alpha=0 never trains them "
                "(their accuracies, average and oracle would be of random heads); set loss.alpha=1 or "
                "model.new_expert_heads=false"
            )
        if node.new_expert_heads and node.ensemble_start:
            raise ConfigError(
                "model.ensemble_start=true starts from the experts' logit average, but model.new_expert_heads=true "
                "makes those heads random; set one of them to false"
            )
