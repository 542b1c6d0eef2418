"""Experiment tracking: wandb when `logger.name=wandb` (offline unless WANDB_MODE says otherwise), else nothing.

Offline, each start of a run writes a folder of its own under `<run>/wandb/` (`offline-run-<time>-<id>`): a resumed
run has several, all with the run's id. `wandb sync` given all of them uploads them as one run (wandb >= 0.28.1:
the folders of one id are replayed in order of their start, each one continuing the history the run has), so the
hint a run prints names them all.
"""

from __future__ import annotations

import logging
import shlex
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
            log.info("wandb: %s", offline_hint((output_dir / self.run.settings.sync_dir).resolve(), run_id))
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


def _offline_folders(wandb_dir: Path, run_id: str) -> list[Path]:
    """Every offline folder of run `run_id` in `wandb_dir`, one per start, oldest first (their names begin with the
    start time)."""
    return sorted(p for p in wandb_dir.glob(f"offline-run-*-{run_id}") if p.is_dir())


def offline_hint(sync_dir: Path, run_id: str) -> str:
    """Where this start's offline run lies, and the one command (quoted for a POSIX shell) that uploads the whole
    run, every start of it, as one wandb run."""
    folders = _offline_folders(sync_dir.parent, run_id) or [sync_dir]  # [sync_dir]: should wandb name them otherwise
    command = shlex.join(["wandb", "sync", *map(str, folders)])
    if len(folders) == 1:
        return f"offline run in {sync_dir}; to upload it later: {command}"
    return (
        f"offline run in {sync_dir} (run {run_id} has {len(folders)} offline folders, one per start); "
        f"to upload them as one run: {command}"
    )
