"""What the fusion and expert recipes share: config checks, the experiment logger, one-line errors,
the resumable epoch loop (`EpochLoop`) and setup -> train -> cleanup (`run_recipe`)."""
from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from mcn import distributed
from mcn.checkpoint import atomic_save, clean_state_dict, load_file, restore_rng, rng_state
from mcn.engine import evaluate, train_epoch
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
        if cfg.logger.name != "wandb" or cfg.logger.mode == "disabled" or not distributed.is_main():
            return
        import wandb

        id_file = output_dir / "wandb_run_id.txt"
        run_id = id_file.read_text().strip() if id_file.exists() else uuid.uuid4().hex[:8]
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
    """Bad input ends the job with one line on stderr and exit status 2, not a traceback.
    Inside a submitit job the error is re-raised instead, so that it reaches the launcher, which
    prints its one line in the submitting terminal."""
    try:
        yield
    except MCNError as e:
        if log.hasHandlers():  # the job log, under Hydra; a plain CLI gets the stderr line below only
            log.error("error: %s", e)
        if os.environ.get("SUBMITIT_EXECUTOR"):
            raise
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


# keys that may differ between a run and its resumption without changing what is computed
RESUME_IGNORES = ("trainer.resume", "trainer.progress_bar", "logger.mode")


class EpochLoop:
    """The epoch loop both recipes share: train, validate, report, keep the best (validation only),
    save every `save_every` epochs and at the end, stop early after `patience` epochs without progress.

    `on_best(epoch, val)` and `on_save(epoch, val)` write the recipe's files; `monitor` names the
    validation metric that decides "best".

    Resume: after every epoch the whole training state (model, optimiser, scheduler, epoch, best so
    far, every RNG stream incl. `generators`) goes atomically to `state_path`; a job that finds that
    file continues after its epoch (`resume`: auto, force = even with a changed config, never).
    SIGUSR2 (Slurm's pre-timeout signal) or SIGTERM stops the loop at the next step boundary; the
    unfinished epoch is dropped (the state on disk is the last finished one), then USR2 goes on to
    the handler that was there before (submitit's: requeue) and TERM ends the job.
    """

    def __init__(self, model, forward, train_batches, val_batches, loss_weights, head_names: list[str], optimizer,
                 scheduler, runtime, grad_clip, report, logger: RunLogger, monitor: str, state_path: Path, config: dict,
                 generators: list, resume: str = "auto", progress_bar="auto", make_targets=None):
        self.model, self.forward, self.train_batches, self.val_batches = model, forward, train_batches, val_batches
        self.loss_weights, self.head_names, self.optimizer, self.scheduler = loss_weights, head_names, optimizer, scheduler
        self.runtime, self.grad_clip, self.report, self.logger = runtime, grad_clip, report, logger
        self.monitor, self.progress_bar, self.make_targets = monitor, progress_bar, make_targets
        self.state_path, self.config, self.generators, self.resume = Path(state_path), config, generators, resume
        self.signal = None

    def learning_rates(self) -> dict[str, float]:
        return {g["role"]: g["lr"] for g in self.optimizer.param_groups}

    def save_state(self, epoch: int, best: dict, elapsed: float) -> None:
        atomic_save({"format": "mcn-train-state-v1", "epoch": epoch, "best": best, "elapsed_s": elapsed,
                     "model": clean_state_dict(self.model.state_dict()), "optimizer": self.optimizer.state_dict(),
                     "scheduler": self.scheduler.state_dict(), "rng": rng_state(self.generators), "config": self.config},
                    self.state_path)

    def load_state(self) -> dict | None:
        if self.resume == "never" or not self.state_path.exists():
            return None
        state = load_file(self.state_path)
        changes = [c for c in config_changes(state["config"], self.config) if not c.startswith(RESUME_IGNORES)]
        if changes and self.resume != "force":
            raise ConfigError(f"{self.state_path} was written with another config ({'; '.join(changes)}); "
                              f"set trainer.resume=force to continue with the new values, or trainer.resume=never to start over")
        if changes:
            log.warning("resuming with a changed config: %s", "; ".join(changes))
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        restore_rng(state["rng"], self.generators)
        log.info("resumed from %s after epoch %d (best %.4f @%d)", self.state_path, state["epoch"],
                 state["best"]["val_accuracy"], state["best"]["epoch"])
        return state

    def stop_requested(self) -> bool:
        """Asked after every step; with several processes they agree, so all stop at the same step."""
        stop = distributed.any_process(self.signal is not None, self.runtime.device)
        if stop and self.signal is None:  # another process got the signal
            self.signal = signal.SIGTERM
        return stop

    def _on_signal(self, signum, frame) -> None:
        self.signal = signum
        log.warning("caught %s: stopping at the next step; the state of epoch %s is on disk",
                    signal.Signals(signum).name, self.last_saved)

    def run(self, epochs: int, save_every: int, patience: int | None, on_best, on_save) -> tuple[dict, int, float]:
        """Returns (best {"epoch", "val_accuracy"}, epochs run, seconds)."""
        state = self.load_state()
        first, best, before = (state["epoch"] + 1, state["best"], state["elapsed_s"]) if state else (1, {"epoch": 0, "val_accuracy": -1.0}, 0.0)
        self.last_saved = first - 1
        previous = {}
        if threading.current_thread() is threading.main_thread():
            previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGUSR2, signal.SIGTERM)}
        start, epoch = time.time() - before, first - 1
        try:
            for epoch in range(first, epochs + 1):
                lrs = self.learning_rates()
                batches = progress(self.train_batches, len(self.train_batches), f"epoch {epoch}/{epochs}", self.progress_bar)
                train = train_epoch(self.forward, batches, self.loss_weights, self.head_names, self.optimizer, self.scheduler,
                                    self.runtime, self.grad_clip, self.make_targets, should_stop=self.stop_requested)
                if self.signal is not None:
                    break
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
                self.save_state(epoch, best, elapsed)
                self.last_saved = epoch
                if stop:
                    log.info("early stopping: no better validation accuracy for %d epochs", patience)
                    break
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
        if self.signal is not None:
            self.hand_over(previous.get(self.signal))
        return best, epoch, time.time() - start

    def hand_over(self, handler) -> None:
        """After a signal: let submitit requeue (its USR2 handler), else end the job; never finish the run."""
        if self.signal == signal.SIGUSR2 and callable(handler):
            handler(self.signal, None)  # submitit: checkpoint, `scontrol requeue`, exit
        raise SystemExit(128 + self.signal)


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
        distributed.cleanup()
