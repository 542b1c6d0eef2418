"""Pieces both recipes use: config checks, the logger, the job's log line."""
from __future__ import annotations

import logging
import sys
import time
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


def absolute_paths(cfg: DictConfig) -> DictConfig:
    """Pin `paths.*` to absolute paths, so a saved config still finds the data and split from anywhere."""
    for key in ("output_root", "data_dir", "split_dir", "experts_dir"):  # output_root first: the others interpolate it
        cfg.paths[key] = str(Path(cfg.paths[key]).absolute())
    return cfg


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


class EpochLoop:
    """The epoch loop both recipes share: train, validate, report, keep the best (validation only),
    save every `save_every` epochs and at the end, stop early after `patience` epochs without progress.

    `on_best(epoch, val)` and `on_save(epoch, val)` write the recipe's files; `monitor` names the
    validation metric that decides "best".
    """

    def __init__(self, forward, train_batches, val_batches, loss_weights, head_names: list[str], optimizer, scheduler,
                 runtime, grad_clip, report, logger: RunLogger, monitor: str, progress_bar="auto", make_targets=None):
        self.forward, self.train_batches, self.val_batches = forward, train_batches, val_batches
        self.loss_weights, self.head_names, self.optimizer, self.scheduler = loss_weights, head_names, optimizer, scheduler
        self.runtime, self.grad_clip, self.report, self.logger = runtime, grad_clip, report, logger
        self.monitor, self.progress_bar, self.make_targets = monitor, progress_bar, make_targets

    def learning_rates(self) -> dict[str, float]:
        return {g["role"]: g["lr"] for g in self.optimizer.param_groups}

    def run(self, epochs: int, save_every: int, patience: int | None, on_best, on_save) -> tuple[dict, int, float]:
        """Returns (best {"epoch", "val_accuracy"}, epochs run, seconds)."""
        from mcn.engine import evaluate, train_epoch

        start, best, epoch = time.time(), {"epoch": 0, "val_accuracy": -1.0}, 0
        for epoch in range(1, epochs + 1):
            lrs = self.learning_rates()
            batches = progress(self.train_batches, len(self.train_batches), f"epoch {epoch}/{epochs}", self.progress_bar)
            train = train_epoch(self.forward, batches, self.loss_weights, self.head_names, self.optimizer, self.scheduler,
                                self.runtime, self.grad_clip, self.make_targets)
            val = evaluate(self.forward, self.val_batches, self.loss_weights, self.head_names, self.runtime)
            elapsed = time.time() - start
            for phase, metrics in (("train", train), ("val", val)):
                self.report.add({"phase": phase, "epoch": epoch, **metrics, **lrs, "elapsed_s": round(elapsed, 2)})
            self.logger.log({**{f"train/{k}": v for k, v in train.items()}, **{f"val/{k}": v for k, v in val.items()}, **lrs}, epoch)
            if val[self.monitor] > best["val_accuracy"]:
                best = {"epoch": epoch, "val_accuracy": val[self.monitor]}
                on_best(epoch, val)
            log.info("epoch %d/%d  train loss %.4f acc %.4f | val loss %.4f acc %.4f%s | best %.4f @%d | %.1fs",
                     epoch, epochs, train["loss"], train[self.monitor], val["loss"], val[self.monitor],
                     f" ens {val['ensemble_accuracy']:.4f}" if "ensemble_accuracy" in val else "",
                     best["val_accuracy"], best["epoch"], elapsed)
            stop = patience is not None and epoch - best["epoch"] >= patience
            if epoch % save_every == 0 or epoch == epochs or stop:
                on_save(epoch, val)
            if stop:
                log.info("early stopping: no better validation accuracy for %d epochs", patience)
                break
        return best, epoch, time.time() - start


def run_recipe(recipe) -> dict:
    """setup -> train -> cleanup; the logger is closed (as failed) even when training raises."""
    failed = True
    try:
        recipe.setup()
        results = recipe.train()
        failed = False
        return results
    finally:
        recipe.cleanup(failed)
