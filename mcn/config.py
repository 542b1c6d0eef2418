"""Checks on the composed config, made before anything runs or is written."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from mcn.errors import ConfigError

# keys that may differ between a run and its resumption without changing what is computed
RESUME_IGNORES = ("trainer.resume", "trainer.progress_bar", "logger.mode", "sweep.name")


def require_positive(cfg: DictConfig, *keys: str) -> None:
    for key in keys:
        value = OmegaConf.select(cfg, key)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
            raise ConfigError(f"{key}={value!r} must be a positive number; e.g. {key}=10")


def require_fraction(cfg: DictConfig, *keys: str) -> None:
    for key in keys:
        value = OmegaConf.select(cfg, key)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 <= value <= 1:
            raise ConfigError(f"{key}={value!r} must lie in [0, 1]")


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
