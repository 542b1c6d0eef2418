"""The config blocks of training (`trainer`, `optim`, `probe`, `finetune`, `loss`, `logger`): every key, its type,
default, rule and meaning. The YAML files of `conf/` hold presets of these, not their definitions."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig

from mcn.errors import ConfigError
from mcn.schema import (
    COUNT,
    FRACTION,
    NON_NEGATIVE,
    POSITIVE,
    WHOLE,
    Rule,
    as_typed,
    is_number,
    key,
    list_of,
    one_of,
)

AUTO_SWITCH = one_of("auto", True, False)

# the guide's per-fusion-type schedule and AdamW rates (docs/reference.md §3)
FUSION_EPOCHS = {
    "default": 100,
    "multiplicative": 80,
    "multiplicativeAddition": 100,
    "concatenation": 100,
    "TransformerBase": 120,
    "simpleAddition": 100,
    "multiplicativeShifted": 80,
}
ADAMW_RATES = {
    "default": {"base_lr": 1e-4, "head_lr": 1e-3},
    "multiplicative": {"base_lr": 1e-4, "head_lr": 5e-4},
    "multiplicativeAddition": {"base_lr": 1e-4, "head_lr": 1e-3},
    "concatenation": {"base_lr": 1e-4, "head_lr": 1e-3},
    "TransformerBase": {"base_lr": 5e-5, "head_lr": 2e-4},
    "simpleAddition": {"base_lr": 1e-4, "head_lr": 1e-3},
    "multiplicativeShifted": {"base_lr": 1e-4, "head_lr": 5e-4},
}


@dataclass
class TrainerConfig:
    """How a stage trains: both mcn.train (fusion) and mcn.experts (pretraining) read it."""

    epochs: int = key(
        "${oc.select:.fusion_epochs.${fusion.name},${.fusion_epochs.default}}",
        "fusion stage epochs; by default the fusion type's entry of fusion_epochs (none: its `default`); "
        "trainer.epochs=150 wins; 0: the probe alone",
        WHOLE,
        example=10,
    )
    fusion_epochs: Any = key(FUSION_EPOCHS, "the guide's fusion-stage epochs per fusion type (docs/reference.md §3)")
    batch_size: int = key(128, "images per step (one process)", COUNT)
    freeze_experts_epochs: int = key(
        0, "fusion stage: the first N epochs train fusion + global head on frozen experts, then all", WHOLE
    )
    save_every: int = key(10, "components + complete model every N epochs, and at the end", COUNT)
    resume: str = key(
        "auto",
        "auto: continue from train_state.pth in the run folder; force: even if the config changed; never: start over",
        one_of("auto", "force", "never"),
    )
    early_stopping_patience: int | None = key(
        None, "epochs without a better validation accuracy before stopping; null: off", COUNT, example=10, nullable=True
    )
    early_stopping_since: str = key(
        "best_fine_tuned",
        "fusion stage with the probe: best_fine_tuned: patience counts from the best fine-tuning epoch (1..), so the "
        "stage can climb out of its first-epoch dip (docs/results.md §8) | best: from the best epoch, the probe's "
        "(epoch 0) included; without the probe both are the same",
        one_of("best_fine_tuned", "best"),
        example="best",
    )
    device: str = key("auto", "auto: cuda when visible, else cpu; or a torch device (cpu, cuda, cuda:1)")
    precision: str = key(
        "auto",
        "auto: bf16 autocast on a GPU, and on a CPU that computes bf16 natively; else fp32",
        one_of("auto", "bf16", "fp32"),
    )
    channels_last: Any = key(
        "auto", "channels-last memory format; auto: on (measured faster on GPU and CPU)", AUTO_SWITCH
    )
    compile: Any = key("auto", "torch.compile the model; auto: on for GPU", AUTO_SWITCH)
    fused_optimizer: Any = key("auto", "fused AdamW/SGD kernels; auto: on for GPU", AUTO_SWITCH)
    data_on_device: bool = key(True, "keep the uint8 data set on the device and augment there")
    num_threads: int | None = key(
        None,
        "CPU threads; null: SLURM_CPUS_PER_TASK, else this machine's cores shared by the processes on it",
        COUNT,
        example=4,
        nullable=True,
    )
    deterministic: bool = key(False, "deterministic kernels (slower)")
    progress_bar: Any = key("auto", "auto: a bar when the terminal is interactive", AUTO_SWITCH)
    terminal: str = key(
        "auto",
        "what the terminal shows (the run's log file gets every line): all | runs (one line per finished run) | "
        "auto: all for one run, runs for mcn.pipeline",
        one_of("auto", "all", "runs"),
        example="runs",
    )

    @classmethod
    def check(cls, node: DictConfig, cfg: DictConfig) -> None:
        freeze, epochs = node.freeze_experts_epochs, node.epochs
        if freeze and not 0 < freeze < epochs:
            raise ConfigError(
                f"trainer.freeze_experts_epochs={freeze} must be 0 (no freezing) or lie in 1..trainer.epochs-1 "
                f"(trainer.epochs={epochs}): the experts must train at least one epoch"
            )


@dataclass
class OptimConfig:
    """Fusion stage: the optimiser over two parameter groups (mcn.models.MCN.param_groups); the rates in use are
    printed at start and saved in the results JSON."""

    name: str = key("adamw", "the optimiser", one_of("adamw", "sgd"))
    base_lr: float = key(1e-4, "the experts' learning rate", POSITIVE)
    head_lr: float = key(1e-3, "the fusion module's and global head's learning rate", POSITIVE)
    input_width_rule: bool = key(
        False, "true: scale both rates by the experts' feature width, as the reference did (docs/reference.md §3)"
    )
    weight_decay: float = key(1e-4, "on weights only, not on biases or norms", NON_NEGATIVE)
    min_lr_ratio: float = key(0.1, "the cosine decay ends at this fraction of each starting rate", FRACTION)
    warmup_epochs: int = key(0, "linear warm-up epochs before the cosine", WHOLE)
    grad_clip: float | None = key(1.0, "gradient-norm clip; null: off", POSITIVE, nullable=True)


@dataclass
class AdamWConfig(OptimConfig):
    """AdamW; by default the rates are the guide's for the fusion type (`rates`)."""

    base_lr: float = key(
        "${oc.select:.rates.${fusion.name}.base_lr,${.rates.default.base_lr}}",
        "the experts' learning rate; by default the fusion type's row of rates (no row: `default`); "
        "optim.base_lr=1e-5 wins",
        POSITIVE,
        example=1e-4,
    )
    head_lr: float = key(
        "${oc.select:.rates.${fusion.name}.head_lr,${.rates.default.head_lr}}",
        "the fusion module's and global head's learning rate; by default the fusion type's row of rates",
        POSITIVE,
        example=1e-3,
    )
    rates: Any = key(ADAMW_RATES, "the guide's tuned AdamW rates per fusion type (docs/reference.md §3)")
    betas: list[float] = key([0.9, 0.999], "Adam's moment decay rates")


@dataclass
class SGDConfig(OptimConfig):
    """SGD with Nesterov momentum; its rates are not tuned: set them for your study."""

    name: str = key("sgd", "the optimiser", one_of("adamw", "sgd"))
    base_lr: float = key(1e-3, "the experts' learning rate", POSITIVE)
    head_lr: float = key(1e-2, "the fusion module's and global head's learning rate", POSITIVE)
    weight_decay: float = key(5e-4, "on weights only, not on biases or norms", NON_NEGATIVE)
    momentum: float = key(0.9, "Nesterov momentum when > 0", FRACTION)


@dataclass
class ProbeConfig:
    """Fusion stage, probe then fine-tune (LP-FT, mcn.training.probe): epoch 0 fits the fusion side on the frozen
    experts' cached features."""

    enabled: Any = key(
        "auto",
        "fit adapters + fusion + global head on the experts' cached features first, then fine-tune all from there; "
        "auto: when the experts are pretrained (experts.dir set; measured in docs/results.md §5)",
        one_of("auto", True, False),
    )
    epochs: int = key(200, "at most, over the cached features (an epoch takes well under a second on a CPU)", COUNT)
    patience: int = key(20, "stop a fit after this many epochs without a better validation accuracy", COUNT)
    lr: float = key(1e-3, "AdamW's learning rate", POSITIVE)
    weight_decays: list[float] = key(
        [0.0, 0.01, 0.1, 1.0],
        "AdamW's (decoupled) weight decays, one fit each from the same start; the best on validation is kept",
        list_of(Rule("", lambda v: is_number(v) and v >= 0), "weight decays >= 0"),
        example=[0, 0.01, 0.1],
    )
    batch_size: int = key(256, "images per step of the fit", COUNT)

    @classmethod
    def check(cls, node: DictConfig, cfg: DictConfig) -> None:
        if node.enabled is True and cfg.experts.dir is None:
            raise ConfigError(
                "probe.enabled=true fits the fusion on the pretrained experts, but experts.dir is null (experts "
                "from scratch); set experts.dir or probe.enabled=false"
            )
        if cfg.trainer.epochs == 0 and not probe_on(cfg):
            raise ConfigError(
                "trainer.epochs=0 must be a whole number > 0 without the probe (trainer.epochs=0 is the probe alone, "
                "which needs pretrained experts); e.g. trainer.epochs=10"
            )


def probe_on(cfg: DictConfig) -> bool:
    """Whether the fusion stage starts with the probe: probe.enabled=true, or auto with pretrained experts (experts
    from scratch have nothing to probe)."""
    return cfg.probe.enabled is True or (cfg.probe.enabled == "auto" and cfg.experts.dir is not None)


def expert_loss_weight(cfg: DictConfig) -> float:
    """`loss.alpha` as the fusion stage uses it: the number set, or for `auto` 0 after the probe and 1 without it or
    with `model.new_expert_heads`. Measured (docs/results.md §8): after the probe, the experts' own terms pull their
    features towards their own heads and away from what the fitted global head reads."""
    alpha = cfg.loss.alpha
    if alpha != "auto":
        return float(alpha)
    return 0.0 if probe_on(cfg) and not cfg.model.new_expert_heads else 1.0


def wise_ft_on(cfg: DictConfig) -> bool:
    """Whether WiSE-FT ends the fusion stage: `finetune.wise_ft=true`, or `auto` with the probe on and fine-tuning
    epochs to interpolate towards."""
    wise = cfg.finetune.wise_ft
    if wise == "auto":
        return probe_on(cfg) and int(cfg.trainer.epochs) > 0
    return bool(wise)


@dataclass
class FinetuneConfig:
    """Fusion stage, the joint epochs after the probe (mcn.training.finetune; measured in docs/results.md §7, §8)."""

    expert_norm: str = key(
        "train",
        "train: the experts' BatchNorm re-estimates its statistics on the fusion batches | frozen: eval mode, the "
        "statistics of pretraining kept while the weights learn",
        one_of("train", "frozen"),
    )
    expert_layers: str = key(
        "all",
        "which of the experts' parameters learn: all | last_stage (surgical fine-tuning: the last stage, final norm "
        "and own head; the rest stays as pretrained)",
        one_of("all", "last_stage"),
    )
    alpha_schedule: str = key(
        "constant",
        "constant: loss.alpha in every epoch | linear: loss.alpha in epoch 1, falling linearly towards 0",
        one_of("constant", "linear"),
    )
    wise_ft: Any = key(
        "auto",
        "WiSE-FT: after the last epoch, the whole MCN interpolated in weight space between epoch 0 (the probe) and "
        "the last epoch, the mixing weight chosen on validation; true needs the probe; auto: on when the probe runs "
        "and trainer.epochs > 0 (measured in docs/results.md §8)",
        AUTO_SWITCH,
        example=False,
    )
    wise_ft_weights: list[float] = key(
        [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9],
        "the mixing weights tried (w: (1-w) x epoch 0 + w x last epoch; 0 and 1 are those epochs, measured anyway)",
        list_of(
            Rule("", lambda v: is_number(v) and 0 < v < 1),
            "mixing weights strictly between 0 and 1",
        ),
        example=[0.25, 0.5, 0.75],
    )

    @classmethod
    def check(cls, node: DictConfig, cfg: DictConfig) -> None:
        if node.alpha_schedule == "linear" and expert_loss_weight(cfg) == 0:
            raise ConfigError(
                f"finetune.alpha_schedule=linear fades the experts' own loss terms from loss.alpha, but loss.alpha="
                f"{as_typed(cfg.loss.alpha)} is 0 here (auto: 0 after the probe); set loss.alpha=1 or "
                f"finetune.alpha_schedule=constant"
            )
        if node.wise_ft is not True:
            return
        if not probe_on(cfg):
            raise ConfigError(
                "finetune.wise_ft=true interpolates from epoch 0, the probe, but this run has no probe; set "
                "probe.enabled=true (pretrained experts) or finetune.wise_ft=false"
            )
        if int(cfg.trainer.epochs) == 0:
            raise ConfigError(
                "finetune.wise_ft=true needs fine-tuning epochs to interpolate towards, but trainer.epochs=0 (the "
                "probe alone); set trainer.epochs to 1 or more, or finetune.wise_ft=false"
            )


@dataclass
class LossConfig:
    """Fusion stage loss (mcn.training.loop.Objective): CE(global) + alpha * sum_k CE(expert_k) + distillation."""

    alpha: Any = key(
        "auto",
        "the weight of the experts' own terms, sum_k CE(expert_k); 0: off; auto: 0 after the probe (the joint epochs "
        "fine-tune on the global head's loss alone, measured in docs/results.md §8), 1 without the probe or with "
        "model.new_expert_heads (their own terms are what trains the experts' heads)",
        Rule("auto or a finite number >= 0", lambda v: v == "auto" or NON_NEGATIVE.test(v)),
        example=1.0,
    )
    expert_targets: str = key(
        "all",
        "all: expert k's term over every sample | own_classes: only samples of the classes in its pretraining share",
        one_of("all", "own_classes"),
        example="own_classes",
    )
    distill_weight: float = key(
        0.0,
        "+ weight * T^2 * KL(pretrained experts' averaged soft targets || global head); 0: off",
        NON_NEGATIVE,
    )
    distill_temperature: float = key(4.0, "T, the softening of both distributions", POSITIVE)

    @classmethod
    def check(cls, node: DictConfig, cfg: DictConfig) -> None:
        if node.expert_targets == "own_classes" and expert_loss_weight(cfg) == 0:
            raise ConfigError(
                f"loss.expert_targets=own_classes limits the experts' own loss terms, but loss.alpha="
                f"{as_typed(node.alpha)} is 0 here (auto: 0 after the probe), so they are off; set loss.alpha=1 or "
                f"loss.expert_targets=all"
            )
        if node.distill_weight and cfg.experts.dir is None:
            raise ConfigError(
                f"loss.distill_weight={node.distill_weight} distils from the pretrained experts, but experts.dir "
                f"is null (experts from scratch); set experts.dir or loss.distill_weight=0"
            )


@dataclass
class LoggerConfig:
    """No experiment tracker: the CSV report and the results JSON only."""

    name: str = key("none", "the tracker", one_of("none", "csv", "tensorboard", "mlflow", "wandb"))


@dataclass
class NoLoggerConfig(LoggerConfig):
    """No experiment tracker: the CSV report and the results JSON only."""

    mode: str = key("disabled", "nothing to sync")


@dataclass
class WandbConfig(LoggerConfig):
    """Weights & Biases, offline by default: nothing needs a network (sync later with `wandb sync`)."""

    name: str = key("wandb", "the tracker", one_of("wandb"))
    project: str = key("mcn", "the wandb project")
    entity: str | None = key(None, "the wandb team or user; null: your default", nullable=True)
    mode: str = key(
        "${oc.env:WANDB_MODE,offline}",
        "offline (default), online (set WANDB_MODE=online to log live) or disabled (no tracking)",
        one_of("offline", "online", "disabled"),
        example="offline",
    )
    tags: list[str] = key([], "extra wandb tags")


@dataclass
class MlflowConfig(LoggerConfig):
    """MLflow, offline: no server, runs go to a SQLite file under outputs/ (view: `mlflow ui`)."""

    name: str = key("mlflow", "the tracker", one_of("mlflow"))
    tracking_uri: str | None = key(
        None,
        "null: sqlite in ${paths.output_root}/mlflow.db; or any MLflow tracking URI (http://localhost:5000, "
        "sqlite:////abs/mlflow.db)",
        nullable=True,
    )
    experiment: str = key("mcn", "the MLflow experiment the runs go to (made when missing)")
