"""The config blocks of the stages' orchestration (`pretrain`, `pipeline`): every key, its type, default, rule and
meaning."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from omegaconf import DictConfig

from mcn.data.schema import PretrainAugmentConfig
from mcn.errors import ConfigError
from mcn.schema import COUNT, FRACTION, NON_NEGATIVE, POSITIVE, SEED, WHOLE, key, list_of, one_of

# the reference's expert-stage values per expert family (docs/reference.md §7), for the pretrain.* keys left null
FAMILIES = {
    "wide_resnet": {"batch_size": None, "lr": 0.1, "weight_decay": 5e-4, "label_smoothing": 0.05},
    "preact_resnet": {"batch_size": None, "lr": 0.2, "weight_decay": 1e-4, "label_smoothing": 0.1},
    "densenet": {"batch_size": 64, "lr": 0.1, "weight_decay": 1e-4, "label_smoothing": 0.05},
    "resnext": {"batch_size": None, "lr": 0.1, "weight_decay": 5e-4, "label_smoothing": 0.05},
    "timm": {"batch_size": None, "lr": 0.1, "weight_decay": 5e-4, "label_smoothing": 0.05},
}


@dataclass
class PretrainOptimConfig:
    """The expert stage's optimiser, with one rate; keys left null take the expert family's value."""

    name: str = key("sgd", "the optimiser", one_of("sgd", "adamw"))
    lr: float | None = key(None, "the starting rate; null: the family's", POSITIVE, example=0.1, nullable=True)
    momentum: float = key(0.9, "Nesterov momentum when > 0 (sgd)", FRACTION)
    weight_decay: float | None = key(
        None, "on weights only, not on biases or norms; null: the family's", NON_NEGATIVE, example=5e-4, nullable=True
    )
    min_lr_ratio: float = key(0.0, "the cosine decay ends at this fraction of lr", FRACTION)
    warmup_epochs: int = key(0, "linear warm-up epochs before the cosine", WHOLE)
    grad_clip: float | None = key(1.0, "gradient-norm clip; null: off", POSITIVE, nullable=True)


@dataclass
class PretrainConfig:
    """Expert stage (python -m mcn.experts -m pretrain.index=0,1,2,3): the recipe of docs/reference.md §2; saving and
    speed switches come from trainer.*. Keys left null take the value of the expert's family (`families`)."""

    index: int = key(0, "which expert this job trains (0..experts.num-1)", WHOLE)
    epochs: int = key(250, "the study's schedule", COUNT)
    batch_size: int | None = key(
        None,
        "images per step; null: the family's, where that is null too trainer.batch_size",
        COUNT,
        example=128,
        nullable=True,
    )
    optim: PretrainOptimConfig = field(
        default_factory=PretrainOptimConfig, metadata={"doc": "the expert stage's optimiser"}
    )
    augment: PretrainAugmentConfig = field(
        default_factory=PretrainAugmentConfig, metadata={"doc": "the expert stage's training batches"}
    )
    families: Any = key(
        FAMILIES, "the reference's values per expert family (docs/reference.md §7), for the keys left null"
    )

    @classmethod
    def check(cls, node: DictConfig, cfg: DictConfig) -> None:
        if node.index >= cfg.experts.num:
            raise ConfigError(
                f"pretrain.index={node.index} is outside 0..{cfg.experts.num - 1} (experts.num={cfg.experts.num})"
            )


@dataclass
class PipelineConfig:
    """mcn.pipeline: split -> experts -> fusion sweep -> report, once per seed."""

    seeds: list[int] = key(
        ["${seed}"],
        "mcn.pipeline runs the whole study once per seed, e.g. pipeline.seeds=[0,1,2]",
        list_of(SEED, "seeds >= 0"),
        example=[0, 1, 2],
    )
    fusions: list[str] = key(
        ["multiplicative", "concatenation", "multiplicativeAddition", "TransformerBase"],
        "the fusion sweep of mcn.pipeline",
    )
    retrain_experts: bool = key(False, "false: reuse experts in paths.experts_dir that the fusion stage would accept")
