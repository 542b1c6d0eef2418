"""Pieces both recipes use: config checks, the logger, the job's log line."""
from __future__ import annotations

import logging
import sys
from contextlib import contextmanager
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from mcn.errors import ConfigError, MCNError

log = logging.getLogger("mcn")


def require_positive(cfg: DictConfig, *keys: str) -> None:
    for key in keys:
        value = OmegaConf.select(cfg, key)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
            raise ConfigError(f"{key}={value!r} must be a positive number; e.g. {key}=10")


def resolved(cfg: DictConfig) -> dict:
    return OmegaConf.to_container(cfg, resolve=True)


class RunLogger:
    """wandb when `logger.name=wandb` (mode from WANDB_MODE, offline by default), else nothing.
    The run id is kept in the output folder so a requeued job continues the same wandb run."""

    def __init__(self, cfg: DictConfig, output_dir: Path, name: str):
        self.run = None
        if cfg.logger.name != "wandb" or cfg.logger.mode == "disabled":
            return
        import wandb

        id_file = output_dir / "wandb_run_id.txt"
        run_id = id_file.read_text().strip() if id_file.exists() else wandb.util.generate_id()
        id_file.write_text(run_id)
        self.run = wandb.init(project=cfg.logger.project, entity=cfg.logger.entity, mode=cfg.logger.mode,
                              dir=str(output_dir), name=name, id=run_id, resume="allow", config=resolved(cfg),
                              tags=list(cfg.logger.tags))

    def log(self, metrics: dict, step: int) -> None:
        if self.run is not None:
            self.run.log(metrics, step=step)

    def summary(self, metrics: dict) -> None:
        if self.run is not None:
            self.run.summary.update(metrics)

    def finish(self, failed: bool = False) -> None:
        if self.run is not None:
            self.run.finish(exit_code=1 if failed else 0)
            self.run = None


@contextmanager
def one_line_errors():
    """Bad input ends the job with one line on stderr and exit status 2, not a traceback."""
    try:
        yield
    except MCNError as e:
        log.error("error: %s", e)
        print(f"mcn: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def progress(iterable, total: int, desc: str, enabled):
    """A tqdm bar when interactive (or when forced), else the iterable itself."""
    if enabled == "auto":
        enabled = sys.stderr.isatty()
    if not enabled:
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, total=total, desc=desc, leave=False, dynamic_ncols=True)
