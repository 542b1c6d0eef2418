"""Experiment tracking: wandb when `logger.name=wandb` (offline unless WANDB_MODE says otherwise), else nothing."""

from __future__ import annotations

import logging
import uuid
from pathlib import Path

from omegaconf import DictConfig

from mcn import distributed
from mcn.files import write_text
from mcn.training.config import resolved

log = logging.getLogger(__name__)


class RunTracker:
    """One tracker run per training job. Its id is kept in `id_file`, so a requeued job continues the
    same run; only rank 0 tracks."""

    def __init__(self, cfg: DictConfig, output_dir: Path, name: str, id_file: Path):
        self.run = None
        if cfg.logger.name != "wandb" or cfg.logger.mode == "disabled" or not distributed.is_main():
            return
        import wandb

        run_id = id_file.read_text().strip() if id_file.exists() else uuid.uuid4().hex[:8]
        write_text(id_file, run_id)
        self.run = wandb.init(
            project=cfg.logger.project,
            entity=cfg.logger.entity,
            mode=cfg.logger.mode,
            dir=str(output_dir),
            name=name,
            id=run_id,
            resume="allow",
            config=resolved(cfg),
            tags=list(cfg.logger.tags),
            settings=wandb.Settings(silent=True),  # its files are kept; its ~28 lines of chatter per run are not
        )
        if cfg.logger.mode == "offline":
            sync_dir = (output_dir / self.run.settings.sync_dir).resolve()
            log.info("wandb: offline run in %s; to upload it later: wandb sync %s", sync_dir, sync_dir)
        else:
            log.info("wandb: logging to %s", self.run.url)

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
