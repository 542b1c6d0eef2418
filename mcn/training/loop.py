"""The training loop: the loss, one training epoch, one evaluation pass, and the epoch loop around them.

A model's output is viewed as a stack of heads, logits [H, B, C]: the MCN's global head followed by
every expert's own head, or a lone expert's classifier. One weighted cross-entropy over the heads
gives the dual-path loss `CE(global) + alpha * sum_k CE(expert_k)` (docs/reference.md §3); one
evaluation pass gives every head's accuracy plus the experts' logit average and oracle. Metrics are
accumulated on the device and read once per epoch: no host synchronisation per step.

`EpochLoop` runs the epochs of a recipe (fusion training or expert pretraining): train, validate,
report, keep the best on validation, save, resume, stop early or on a signal.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F

from mcn import distributed, shell
from mcn.errors import ConfigError, RunInterrupted, StorageError, TrainingDiverged
from mcn.files import (
    RunStatus,
    clean_state_dict,
    load_train_state,
    restore_rng,
    rng_state,
    save_train_state,
    upgrade_state_dict,
)
from mcn.files.code import code_version, describe
from mcn.training.config import resume_changes, resume_refusal
from mcn.training.optim import resume_optimizer
from mcn.training.runtime import Runtime

log = logging.getLogger(__name__)


def stacked_logits(output) -> torch.Tensor:
    """MCN output (global [B, C], experts [K, B, C]) or plain logits [B, C] -> [H, B, C]."""
    if isinstance(output, tuple):
        global_logits, expert_logits = output
        return torch.cat([global_logits[None], expert_logits])
    return output[None]


def weighted_cross_entropy(
    logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor, head_classes: torch.Tensor | None = None
) -> torch.Tensor:
    """logits [H, B, C]; targets [B] class ids or [B, C] probabilities; weights [H]. With `head_classes` [H, C]
    (bool), head h's cross-entropy is a weighted mean over the samples, each weighing the share of its target on
    h's classes (1 or 0 for a class id; CutMix's mixed targets in between); 0 when no sample of h's classes is in
    the batch. Each head's term stays a mean: an expert's is not diluted by the samples it does not count."""
    h, b, c = logits.shape
    share = None
    if head_classes is not None:
        share = head_classes[:, targets] if targets.dim() == 1 else head_classes.float() @ targets.float().T  # [H, B]
    targets = targets.repeat(h) if targets.dim() == 1 else targets.repeat(h, 1)
    per_sample = F.cross_entropy(logits.reshape(h * b, c).float(), targets, reduction="none").view(h, b)
    if share is None:
        return per_sample.mean(dim=1) @ weights
    share = share.float()
    return ((per_sample * share).sum(1) / share.sum(1).clamp_min(1e-12)) @ weights


@dataclass
class Distillation:
    """Ensemble distillation: `weight * T^2 * KL(teacher || global head)` at temperature T, the teacher's
    distribution being the mean of its experts' softened distributions. `teacher(x)` gives their logits
    [K, B, C] (the pretrained experts, frozen)."""

    teacher: torch.nn.Module
    weight: float
    temperature: float
    runtime: Runtime

    def loss(self, global_logits: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
        t = self.temperature
        with torch.no_grad(), self.runtime.autocast():
            target = (self.teacher(inputs).float() / t).softmax(-1).mean(0)
        student = (global_logits.float() / t).log_softmax(-1)
        return self.weight * t * t * F.kl_div(student, target, reduction="batchmean")


@dataclass
class Objective:
    """What a training step minimises, and how the heads are named in the reports.

    `weights[h]` weighs head h's cross-entropy (the global head 1, each expert alpha);
    `head_classes` [H, C] (bool), when given, limits head h's cross-entropy to samples of its classes (an expert
    trained on a few classes keeps learning only those: `loss.expert_targets=own_classes`);
    `make_targets(x, y) -> (x, targets)` may mix inputs (CutMix) or soften labels;
    `distillation` adds a term pulling the global head towards the pretrained experts' ensemble.
    Head "x" reports `x_accuracy`; a lone unnamed head ("") reports `accuracy`.
    """

    head_names: list[str]
    weights: torch.Tensor
    make_targets: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None
    distillation: Distillation | None = None
    head_classes: torch.Tensor | None = None

    @classmethod
    def dual_path(
        cls, num_experts: int, alpha: float, device: torch.device, expert_classes: torch.Tensor | None = None, **kwargs
    ) -> Objective:
        """The MCN's loss: CE(global) + alpha * sum_k CE(expert_k); `expert_classes` [K, C] (bool) limits expert
        k's term to samples of its classes."""
        weights = torch.tensor([1.0] + [float(alpha)] * num_experts, device=device)
        head_classes = None
        if expert_classes is not None:
            every = torch.ones(1, expert_classes.shape[1], dtype=torch.bool)
            head_classes = torch.cat([every, expert_classes.bool()]).to(device)
        names = ["global"] + [f"expert_{i}" for i in range(num_experts)]
        return cls(names, weights, head_classes=head_classes, **kwargs)

    @classmethod
    def single(cls, device: torch.device, **kwargs) -> Objective:
        """One classifier, one cross-entropy."""
        return cls([""], torch.ones(1, device=device), **kwargs)

    def cross_entropy(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The heads' weighted cross-entropy: what training minimises, and validation reports, without distillation."""
        classes = None if self.head_classes is None else self.head_classes.to(logits.device)
        return weighted_cross_entropy(logits, targets, self.weights.to(logits.device), classes)

    def loss(self, logits: torch.Tensor, targets: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
        loss = self.cross_entropy(logits, targets)
        if self.distillation is not None:
            loss = loss + self.distillation.loss(logits[0], inputs)
        return loss

    @property
    def has_ensemble(self) -> bool:
        """A global head plus at least two experts: the logit average and oracle are defined."""
        return len(self.head_names) > 2


UNDEFINED = "undefined with one expert"  # how the logit average and oracle read when there is one expert


class HeadMetrics:
    """Sums of loss and per-head correct counts, kept on the device until `compute()`."""

    def __init__(self, head_names: list[str], device: torch.device, *, ensemble: bool, sharded: bool = False):
        self.head_names, self.ensemble, self.sharded = head_names, ensemble, sharded
        self.loss = torch.zeros((), device=device)
        self.correct = torch.zeros(len(head_names) + 2 * ensemble, device=device)
        self.count = 0

    @torch.no_grad()
    def update(self, logits: torch.Tensor, labels: torch.Tensor, loss: torch.Tensor) -> None:
        hits = logits.argmax(-1) == labels  # [H, B]
        extra = []
        if self.ensemble:  # over the expert heads (all heads after the global one)
            extra = [(logits[1:].float().mean(0).argmax(-1) == labels).sum()[None], hits[1:].any(0).sum()[None]]
        self.correct += torch.cat([hits.sum(1), *extra]).float()
        self.loss += loss.detach().float() * labels.numel()
        self.count += labels.numel()

    def compute(self) -> dict[str, float]:
        sums = torch.cat([self.loss[None], torch.tensor([float(self.count)], device=self.loss.device), self.correct])
        if self.sharded:  # each process saw its own share of the batches
            distributed.all_reduce_sum(sums)
        values = sums.tolist()  # the one host sync of the epoch
        loss, count = values[0], max(1.0, values[1])
        correct = [c / count for c in values[2:]]
        names = self.head_names + (["ensemble", "oracle"] if self.ensemble else [])
        out = {"loss": round(loss / count, 6)}
        out.update({f"{name}_accuracy" if name else "accuracy": round(acc, 6) for name, acc in zip(names, correct)})
        return out


def train_epoch(
    model: torch.nn.Module,
    batches: Iterable,
    objective: Objective,
    optimizer: torch.optim.Optimizer,
    scheduler,
    runtime: Runtime,
    *,
    grad_clip: float | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> dict[str, float]:
    """One pass over `batches`; `should_stop()` is asked after every step (a signal arrived) and ends the pass early."""
    model.train()
    metrics = HeadMetrics(objective.head_names, runtime.device, ensemble=False, sharded=runtime.dist.enabled)
    for x, y in batches:
        targets = y
        if objective.make_targets is not None:
            x, targets = objective.make_targets(x, y)
        with runtime.autocast():
            logits = stacked_logits(model(x))
        loss = objective.loss(logits, targets, x)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip:  # over the parameters that learn now (frozen experts, at rate 0, would shrink the others)
            torch.nn.utils.clip_grad_norm_(
                [p for g in optimizer.param_groups if g["lr"] > 0 for p in g["params"]], grad_clip
            )
        optimizer.step()
        scheduler.step()
        metrics.update(logits, y, loss)
        if should_stop is not None and should_stop():
            break
    return metrics.compute()


@torch.no_grad()
def evaluate(model: torch.nn.Module, batches: Iterable, objective: Objective, runtime: Runtime) -> dict[str, float]:
    """One forward per batch gives every head's accuracy (and, with several experts, ensemble and oracle)."""
    model.eval()
    metrics = HeadMetrics(objective.head_names, runtime.device, ensemble=objective.has_ensemble)
    for x, y in batches:
        with runtime.autocast():
            logits = stacked_logits(model(x))
        metrics.update(logits, y, objective.cross_entropy(logits, y))
    return metrics.compute()


@torch.no_grad()
def predict(model: torch.nn.Module, batches: Iterable, runtime: Runtime) -> tuple[torch.Tensor, torch.Tensor]:
    """Every head's logits over `batches`, in order: ([H, N, C] float32 on the CPU, labels [N])."""
    model.eval()
    logits, labels = [], []
    for x, y in batches:
        with runtime.autocast():
            logits.append(stacked_logits(model(x)).float().cpu())
        labels.append(y.cpu())
    return torch.cat(logits, dim=1), torch.cat(labels)


def head_metrics(logits: torch.Tensor, labels: torch.Tensor, objective: Objective) -> dict[str, float]:
    """What `evaluate` reports, from logits already computed (`predict`)."""
    metrics = HeadMetrics(objective.head_names, logits.device, ensemble=objective.has_ensemble)
    metrics.update(logits, labels, objective.cross_entropy(logits, labels))
    return metrics.compute()


def progress(iterable, total: int, desc: str, enabled):
    """A tqdm bar when interactive (or when forced), else the iterable itself."""
    if enabled == "auto":
        enabled = sys.stderr.isatty()
    if not enabled:
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, total=total, desc=desc, leave=False, dynamic_ncols=True)


class LoopRecipe(Protocol):
    """What `EpochLoop` needs from a recipe (set up by the recipe's `setup()`)."""

    raw_model: torch.nn.Module  # the module itself: what the train state saves
    model: torch.nn.Module  # what is called: raw_model, compiled and/or wrapped for several processes
    objective: Objective
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    runtime: Runtime
    train_batches: Iterable
    val_batches: Iterable
    files: object  # its run folder's names (mcn.files): `train_state`, `status`
    generators: list[torch.Generator]  # random streams of the recipe's own, saved with the train state
    config: dict  # the resolved config, saved with the train state and compared on resume
    monitor: str  # the validation metric that decides "best"
    lr_keys: dict[str, str]  # each parameter group's role -> the config key of its rate (for messages)
    grad_clip: float | None
    report: object  # mcn.files.EpochCsv
    tracker: object  # mcn.training.tracking.RunTracker

    # epoch 0 of a fresh run (the probe): its validation metrics; None without one, or when `should_stop()` said so
    def initial_epoch(self, should_stop: Callable[[], bool]) -> dict | None: ...

    def start_epoch(self, epoch: int) -> None: ...  # e.g. freeze or unfreeze parts of the model

    def save_best(self, epoch: int, val: dict) -> None: ...

    def save_checkpoint(self, epoch: int, val: dict) -> None: ...


class EpochLoop:
    """Train, validate, report, keep the best (on validation only), save every `save_every` epochs and at
    the end, stop early after `patience` epochs without a better validation metric: counted from the best epoch
    (`patience_since="best"`), or from the best epoch after epoch 0 (`"best_fine_tuned"`: a recipe whose first
    epochs dip below its epoch 0, the probe, can climb back before patience runs out; epoch 0 still competes for the
    best). A loop that ended early (early stopping, a judge) marks its train state finished, so a process that dies
    after it (e.g. during the final test) resumes past the loop without training on; after the last epoch no mark is
    needed, and a resume with more `trainer.epochs` trains on.

    Resume: after every epoch the whole training state (model, optimiser, scheduler, epoch, best so
    far, every RNG stream) goes atomically to `state_path`; a job that finds that file continues after
    its epoch (`resume`: auto, force = even with a changed config, never), on the learning-rate schedule of the
    config it runs with, from the step it has reached (`mcn.training.optim.resume_optimizer`).
    SIGUSR2 (Slurm's pre-timeout signal), SIGTERM or SIGINT (Ctrl-C) stops the loop at the next step
    boundary; the unfinished epoch is dropped (the state on disk is the last finished one), then USR2
    goes on to the handler that was there before (submitit's: requeue), TERM ends the job and Ctrl-C
    ends it with one line saying how to resume.

    A loss that is not a finite number stops the run in the epoch where it appears (TrainingDiverged);
    it is read with the epoch's metrics, so the steps never wait on the host for it.

    `judge(epoch, val) -> bool`, when given (a search's trial, mcn.search), hears every epoch's validation metrics
    once its state is saved; True stops the run there (`pruned`), as early stopping would, before its last epoch.
    """

    def __init__(
        self,
        recipe: LoopRecipe,
        *,
        epochs: int,
        save_every: int,
        patience: int | None = None,
        patience_since: str = "best",
        resume: str = "auto",
        progress_bar="auto",
        judge: Callable[[int, dict], bool] | None = None,
    ):
        self.recipe, self.state_path, self.status = recipe, recipe.files.train_state, RunStatus(recipe.files.status)
        self.epochs, self.save_every, self.patience, self.patience_since = epochs, save_every, patience, patience_since
        self.resume, self.progress_bar, self.judge = resume, progress_bar, judge
        self.pruned = False  # the judge stopped the run
        self.best_fine_tuned = {"epoch": 0, "val_accuracy": -1.0}  # the best epoch after epoch 0 (patience_since)
        self.signal = None
        self.last_saved = 0
        self.saved = False  # whether this run's train state is on disk (epoch 0 counts)

    @classmethod
    def from_config(cls, recipe: LoopRecipe, epochs: int, trainer, judge=None) -> EpochLoop:
        """The loop as `trainer.*` sets it up: save cadence, early stopping, resume, progress bar."""
        return cls(
            recipe,
            judge=judge,
            epochs=int(epochs),
            save_every=int(trainer.save_every),
            patience=trainer.early_stopping_patience,
            patience_since=trainer.get("early_stopping_since", "best"),
            resume=trainer.resume,
            progress_bar=trainer.progress_bar,
        )

    def learning_rates(self) -> dict[str, float]:
        return {g["role"]: g["lr"] for g in self.recipe.optimizer.param_groups}

    def save_state(self, epoch: int, best: dict, elapsed: float, *, finished: bool = False) -> None:
        r = self.recipe
        save_train_state(
            self.state_path,
            epoch=epoch,
            best=best,
            best_fine_tuned=self.best_fine_tuned,
            finished=finished,
            elapsed_s=elapsed,
            model=clean_state_dict(r.raw_model.state_dict()),
            optimizer=r.optimizer.state_dict(),
            scheduler=r.scheduler.state_dict(),
            rng=rng_state(r.generators),
            config=r.config,
            precision="bf16" if r.runtime.bf16 else "fp32",
            code=code_version(),
        )
        self.saved = True

    def load_state(self) -> dict | None:
        if self.resume == "never" or not self.state_path.exists():
            return None
        r = self.recipe
        state = load_train_state(self.state_path)
        changes = resume_changes(state["config"], r.config)
        if changes and self.resume != "force":
            raise ConfigError(resume_refusal(self.state_path, state["config"], r.config))
        if changes:
            log.warning("resuming with a changed config: %s", "; ".join(changes))
        ran, now = state.get("code"), code_version()  # states written before code versions were kept have none
        if ran and ran["hash"] != now["hash"]:
            log.warning(
                "resuming with other code: its epochs so far ran %s, this process runs %s", describe(ran), describe(now)
            )
        r.raw_model.load_state_dict(upgrade_state_dict(r.raw_model, state["model"]))
        # on the schedule of this config (trainer.resume=force may have changed its length), where the run stands
        steps = state["epoch"] * len(r.train_batches)
        resume_optimizer(r.optimizer, r.scheduler, state["optimizer"], state["scheduler"], steps)
        restore_rng(state["rng"], r.generators)
        self.keep_precision(state.get("precision"))
        log.info(
            "resumed from %s after epoch %d (best %.4f @%d)",
            self.state_path,
            state["epoch"],
            state["best"]["val_accuracy"],
            state["best"]["epoch"],
        )
        return state

    def keep_precision(self, started: str | None) -> None:
        """A run resumes in the precision it started in where `auto` would choose otherwise here (a requeue onto a
        node of another kind), so that its epochs are computed alike; an explicit trainer.precision wins. Either
        way a change is said."""
        rt = self.recipe.runtime
        now = "bf16" if rt.bf16 else "fp32"
        if started in (None, now):  # train states written before precision was kept have none
            return
        asked = self.recipe.config.get("trainer", {}).get("precision", "auto")
        if asked == "auto":
            rt.bf16 = started == "bf16"
            rt.why += f"; kept {started} from the run's start"
            log.warning(
                "resuming in %s, the precision this run started in (trainer.precision=auto would choose %s on this "
                "machine); set trainer.precision=%s to switch",
                started,
                now,
                now,
            )
        else:
            log.warning("resuming in %s (trainer.precision=%s); the epochs so far ran in %s", now, asked, started)

    def stop_requested(self) -> bool:
        """Asked after every step; with several processes they agree, so all stop at the same step."""
        stop = distributed.any_process(self.signal is not None, self.recipe.runtime.device)
        if stop and self.signal is None:  # another process got the signal
            self.signal = signal.SIGTERM
        return stop

    def _on_signal(self, signum, frame) -> None:
        self.signal = signum
        log.warning(
            "caught %s: stopping at the next step; the state of epoch %s is on disk",
            signal.Signals(signum).name,
            self.last_saved,
        )

    def run(self) -> tuple[dict, int, float]:
        """Returns (best {"epoch", "val_accuracy"}, epochs run, seconds)."""
        r, epochs = self.recipe, self.epochs
        state = self.load_state()
        if state:
            first, best, before = state["epoch"] + 1, state["best"], state["elapsed_s"]
            self.best_fine_tuned = state.get("best_fine_tuned", best)  # states written before it: the best
        else:
            first, best, before = 1, {"epoch": 0, "val_accuracy": -1.0}, 0.0
        self.last_saved, self.saved = first - 1, state is not None
        r.report.keep_until(self.last_saved if state else -1)  # rows after the saved state belong to no run any more
        r.tracker.catch_up(r.report.rows, self.learning_rates())  # the epochs a kill took before the tracker had them
        if state and state.get("finished") and not resume_changes(state["config"], r.config):
            # the loop had ended (the process died after it); trainer.resume=force with new values trains on
            log.info("the epoch loop had ended after epoch %d; going on after it", state["epoch"])
            return best, state["epoch"], before
        previous = {}
        if threading.current_thread() is threading.main_thread():
            previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGUSR2, signal.SIGTERM, signal.SIGINT)}
        start, epoch = time.time() - before, first - 1
        try:
            if state is None:
                best = self.initial_epoch(best, start)
            for epoch in range(first, epochs + 1) if not self.pruned else ():  # pruned at epoch 0: no other
                if self.signal is not None:  # arrived during epoch 0
                    break
                r.start_epoch(epoch)
                lrs = self.learning_rates()  # the epoch's first step's: what the CSV and the tracker hold for it
                batches = progress(r.train_batches, len(r.train_batches), f"epoch {epoch}/{epochs}", self.progress_bar)
                train = train_epoch(
                    r.model,
                    batches,
                    r.objective,
                    r.optimizer,
                    r.scheduler,
                    r.runtime,
                    grad_clip=r.grad_clip,
                    should_stop=self.stop_requested,
                )
                if self.signal is not None:
                    break
                val = evaluate(r.model, r.val_batches, r.objective, r.runtime)
                elapsed = time.time() - start
                for phase, metrics in (("train", train), ("val", val)):
                    r.report.add({"phase": phase, "epoch": epoch, **metrics, **lrs, "elapsed_s": round(elapsed, 2)})
                self.check_finite(epoch, train, val, lrs)
                if val[r.monitor] > best["val_accuracy"]:
                    best = {"epoch": epoch, "val_accuracy": val[r.monitor]}
                    r.save_best(epoch, val)
                if val[r.monitor] > self.best_fine_tuned["val_accuracy"]:
                    self.best_fine_tuned = {"epoch": epoch, "val_accuracy": val[r.monitor]}
                log.info(
                    "epoch %d/%d  train loss %.4f acc %.4f | val loss %.4f acc %.4f%s | best %.4f @%d | %.1fs",
                    epoch,
                    epochs,
                    train["loss"],
                    train[r.monitor],
                    val["loss"],
                    val[r.monitor],
                    f" ens {val['ensemble_accuracy']:.4f}" if "ensemble_accuracy" in val else "",
                    best["val_accuracy"],
                    best["epoch"],
                    elapsed,
                )
                since = best if self.patience_since == "best" else self.best_fine_tuned
                stop = self.patience is not None and epoch - since["epoch"] >= self.patience
                if epoch % self.save_every == 0 or epoch == epochs or stop:
                    r.save_checkpoint(epoch, val)
                # the judge hears every epoch once its state is saved; the last one ends the run anyway (never pruned)
                self.save_state(epoch, best, elapsed, finished=stop)
                r.tracker.log_epoch(epoch, train, val, lrs)  # once saved: a resume never runs a tracked epoch again
                self.last_saved = epoch
                self.status.progress(epoch, epochs, best)
                if self.judge is not None and self.judge(epoch, val) and epoch < epochs:
                    self.pruned = True
                    self.save_state(epoch, best, elapsed, finished=True)
                    log.info("pruned after epoch %d: its validation metric lags the search's other trials", epoch)
                    break
                if stop:
                    log.info(
                        "early stopping: no better validation accuracy for %d epochs (since epoch %d%s)",
                        self.patience,
                        since["epoch"],
                        "" if self.patience_since == "best" else ", the best fine-tuning epoch",
                    )
                    break
        except StorageError as e:
            if self.saved:
                resume = shell.rerun_command()
                how = f": {resume}" if resume else ""
                raise StorageError(f"{e}; it resumes after epoch {self.last_saved} ({self.state_path}){how}") from None
            raise
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
        if self.signal is not None:
            self.status.interrupted(f"{signal.Signals(self.signal).name} during epoch {self.last_saved + 1}")
            self.hand_over(previous.get(self.signal))
        return best, epoch, time.time() - start

    def initial_epoch(self, best: dict, start: float) -> dict:
        """Epoch 0 of a fresh run, when the recipe has one (the probe of probe-then-fine-tune): reported, a
        candidate for the best epoch like any other, and saved, so a resume never repeats it."""
        r = self.recipe
        val = r.initial_epoch(self.stop_requested)
        if val is None:
            return best
        elapsed = time.time() - start
        self.check_finite(0, val, val, self.learning_rates())
        # no learning rates in its row: epoch 0 did not use the stage's (the probe's are in its record)
        r.report.add({"phase": "val", "epoch": 0, **val, "elapsed_s": round(elapsed, 2)})
        best = {"epoch": 0, "val_accuracy": val[r.monitor]}
        r.save_best(0, val)
        log.info("epoch 0  val loss %.4f acc %.4f | %.1fs", val["loss"], val[r.monitor], elapsed)
        self.save_state(0, best, elapsed)
        r.tracker.log_epoch(0, {}, val, {})
        self.status.progress(0, self.epochs, best)
        if self.judge is not None and self.judge(0, val):
            self.pruned = True
            log.info("pruned after epoch 0: its validation metric lags the search's other trials")
        return best

    def check_finite(self, epoch: int, train: dict, val: dict, lrs: dict[str, float]) -> None:
        for phase, metrics in (("training", train), ("validation", val)):
            if not math.isfinite(metrics["loss"]):
                keys = self.recipe.lr_keys
                rates = ", ".join(f"{keys.get(role, role)}={lr:.3g}" for role, lr in lrs.items())
                raise TrainingDiverged(
                    f"training diverged in epoch {epoch}: the {phase} loss is {metrics['loss']} with {rates}; "
                    f"lower the learning rates (or add warm-up epochs) and start over with trainer.resume=never"
                )

    def hand_over(self, handler) -> None:
        """After a signal: let submitit requeue (its USR2 handler), else end the job with one line saying what is
        saved and the command that continues it; never finish the run. Inside a submitit job SIGTERM just ends the
        process (Slurm requeues a preempted job; its launcher reports the rest)."""
        if self.signal == signal.SIGUSR2 and callable(handler):
            handler(self.signal, None)  # submitit: checkpoint, `scontrol requeue`, exit
        if self.signal != signal.SIGINT and (self.signal != signal.SIGTERM or os.environ.get("SUBMITIT_EXECUTOR")):
            raise SystemExit(128 + self.signal)
        resume = shell.rerun_command()
        saved = (
            f"epoch {self.last_saved} is saved in {self.state_path}; "
            + (f"continue with: {resume}" if resume else "run it again in the same folder to resume")
            if self.saved
            else "no epoch had finished, so nothing was saved"
        )
        why = "Ctrl-C" if self.signal == signal.SIGINT else signal.Signals(self.signal).name
        error = RunInterrupted(f"interrupted ({why}) during epoch {self.last_saved + 1}; {saved}")
        error.exit_status = 130 if self.signal == signal.SIGINT else 128 + self.signal
        raise error
