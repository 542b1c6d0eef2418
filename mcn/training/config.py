"""Checks on the composed config, made before anything runs or is written."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from mcn.errors import ConfigError
from mcn.models import ExpertSpec

# keys that may differ between a run and its resumption without changing what is computed
RESUME_IGNORES = ("trainer.resume", "trainer.progress_bar", "logger.mode", "sweep.name")
# keys in which runs may differ and still be replicates of one study group (mcn.study): the seed, and what only
# says where files live, how a run is shown or how it was orchestrated
REPLICATE_IGNORES = (
    *RESUME_IGNORES,
    "seed",
    "paths",
    "experts.dir",
    "logger",
    "pipeline",
    "sweep",
    "trainer.num_threads",
    "split.force",
    "data.download",
)


def require_positive(cfg: DictConfig, *keys: str) -> None:
    for key in keys:
        value = OmegaConf.select(cfg, key)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
            raise ConfigError(f"{key}={value!r} must be a positive number; e.g. {key}=10")


def require_positive_int(cfg: DictConfig, *keys: str) -> None:
    for key in keys:
        value = OmegaConf.select(cfg, key)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ConfigError(f"{key}={value!r} must be a whole number > 0; e.g. {key}=10")


def require_fraction(cfg: DictConfig, *keys: str) -> None:
    for key in keys:
        value = OmegaConf.select(cfg, key)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 <= value <= 1:
            raise ConfigError(f"{key}={value!r} must lie in [0, 1]")


def _preset_entries(cfg: DictConfig) -> list:
    """`experts.presets` as a list (one name is one entry), or the `expert` group when that is null."""
    presets = cfg.experts.get("presets")
    if presets is None:
        return [cfg.expert]
    return [presets] if isinstance(presets, str) else list(presets)


def expert_specs(cfg: DictConfig) -> list[ExpertSpec]:
    """One spec per expert: `experts.presets` (one entry per expert, or one for all), or, when that is null, the
    `expert` group for every expert."""
    k, entries = int(cfg.experts.num), _preset_entries(cfg)
    if len(entries) not in (1, k):
        raise ConfigError(
            f"experts.presets names {len(entries)} experts ({', '.join(map(str, entries))}) for experts.num={k}; "
            f"give one preset per expert, e.g. experts.presets=[wrn16_4,preact_resnet18,densenet121,resnext29_8x64d], "
            f"or one for all"
        )
    specs = [
        ExpertSpec.parse(OmegaConf.to_container(e, resolve=True) if OmegaConf.is_config(e) else e) for e in entries
    ]
    return specs * k if len(specs) == 1 else specs


def _experts_tag(*, _root_: DictConfig) -> str:
    """`paths.experts_dir`'s last part: the experts' preset (`wrn10_1`, `timm-resnet18`), or every expert's joined
    by `+` when they differ. Never fails: a bad `experts.presets` is reported by `expert_specs` when a stage starts."""
    labels = [ExpertSpec.parse(e).label.replace("/", "-") for e in _preset_entries(_root_)]
    return labels[0] if len(set(labels)) == 1 else "+".join(labels)


OmegaConf.register_new_resolver("mcn.experts_tag", _experts_tag, replace=True)


def absolute_paths(cfg: DictConfig) -> DictConfig:
    """Pin `paths.*` to absolute paths, so a saved config still finds the data and split from anywhere."""
    for key in ("output_root", "data_dir", "split_dir", "experts_dir"):  # output_root first: the others interpolate it
        cfg.paths[key] = str(Path(cfg.paths[key]).absolute())
    return cfg


def resolved(cfg: DictConfig) -> dict:
    return OmegaConf.to_container(cfg, resolve=True)


def config_changes(old: dict, new: dict, prefix: str = "") -> list[str]:
    """`key: old -> new` for every leaf that differs between two resolved configs."""
    changes = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key, "<absent>"), new.get(key, "<absent>")
        if isinstance(a, dict) and isinstance(b, dict):
            changes += config_changes(a, b, f"{prefix}{key}.")
        elif a != b:
            changes.append(f"{prefix}{key}: {a} -> {b}")
    return changes


def resume_changes(old: dict, new: dict) -> list[str]:
    """The config changes that would make a resumed run compute something else."""
    return [c for c in config_changes(old, new) if not c.startswith(RESUME_IGNORES)]
