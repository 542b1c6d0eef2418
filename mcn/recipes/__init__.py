"""Recipes: a training stage as setup -> train -> cleanup (`run_recipe`).

- `mcn.recipes.expert.ExpertRecipe`: pretrain one expert on its share of the expert pool;
- `mcn.recipes.fusion.FusionRecipe`: train the MCN (experts not frozen + fusion + global head).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import threading
from contextlib import contextmanager

from mcn import distributed, shell
from mcn.cluster.manifest import runs_job
from mcn.errors import ConfigError, MCNError, RunInterrupted, StorageError
from mcn.files import (
    RunFolder,
    RunStatus,
    holds_no_run,
    load_train_state,
    lock,
    move_earlier_run,
    read_status,
    remove_stale_temp_files,
)
from mcn.terminal import HEADLINE
from mcn.training.config import resume_changes, resume_refusal

log = logging.getLogger(__name__)


def run_recipe(recipe) -> dict:
    """setup -> train -> cleanup in the recipe's folder, which its process holds for as long as it runs
    (mcn.files.lock: a second process gets one line and leaves every file as it was), with the run's state kept
    there (mcn.files.run_status). A run already done with this config is not run again: its results are read back
    (the test set is read once). SIGTERM before or after the epoch loop ends the run with one line, its state
    `interrupted`. The tracker is closed (as failed) even when training raises."""
    root = recipe.files.root
    # before any file is touched; the job's rank 0 holds it for every process of a multi-process job
    took = lock.acquire(root) if distributed.from_environment().rank == 0 else False
    try:
        _refuse_lost_requeue(root)
        done = _results_when_done(recipe)
        if done is not None:
            return done
        if recipe.cfg.trainer.resume == "never":
            moved = move_earlier_run(root)
            if moved:
                log.info("trainer.resume=never: the earlier run in %s was moved to %s", root, moved)
        _refuse_changed_resume(recipe)  # before the state is touched: a refusal leaves the run as it was
        remove_stale_temp_files(root)
        status = RunStatus(recipe.files.status)
        status.started(**recipe.identity, command=shell.rerun_command())
        with _terminate_in_one_line(status):
            return _run(recipe, status)
    finally:
        if took:
            lock.release(root)


def _run(recipe, status: RunStatus) -> dict:
    failed = True
    try:
        recipe.setup()
        results = recipe.train()
        failed = False
        status.done()
        return results
    except (SystemExit, RunInterrupted):  # a signal ended the loop, which has recorded it
        raise
    except KeyboardInterrupt:
        status.interrupted("Ctrl-C outside the epoch loop")
        raise
    except Exception as e:
        status.failed(str(e) if isinstance(e, MCNError) else f"{type(e).__name__}: {e}")
        raise
    finally:
        recipe.cleanup(failed=failed)
        distributed.cleanup()


def _results_when_done(recipe) -> dict | None:
    """The results of the run in the recipe's folder when it is done and was run with this config (a rerun of the
    same command: nothing to do); None otherwise, and always with trainer.resume other than auto (force continues
    a done run with new values, e.g. more epochs; never starts over)."""
    files = recipe.files
    if recipe.cfg.trainer.resume != "auto" or (read_status(files.status) or {}).get("state") != "done":
        return None
    if not files.train_state.exists() or not recipe.results_file.exists():
        return None
    if resume_changes(load_train_state(files.train_state)["config"], recipe.config):
        return None  # the epoch loop says what changed, and how to go on
    try:
        results = json.loads(recipe.results_file.read_text())
    except (OSError, ValueError):
        return None  # unreadable: the run is finished again, which writes it anew
    log.info(
        "%s: this run is already done (results in %s); set trainer.resume=never to train it again",
        files.root,
        recipe.results_file,
        extra=HEADLINE,
    )
    return results


def _refuse_lost_requeue(root) -> None:
    """StorageError when Slurm restarted this job (a requeue: preemption, time limit, node failure), the job is the
    one its sweep's record runs in this folder, and the folder holds no run: the run was moved or deleted since the
    job first started, and training from epoch 1 here would leave it behind without a word. (A search worker's
    later trials are new runs of a restarted job: they start as usual.) The folder this start recreated (Hydra's
    record, its log) is removed, so that moving the run back puts it where it was; the moved run is not touched."""
    restarts = int(os.environ.get("SLURM_RESTART_COUNT") or 0)
    job_id = lock.slurm_job_id()
    if not restarts or RunFolder(root).status.exists() or not runs_job(root, job_id):
        return
    if distributed.is_main() and holds_no_run(root):
        lock.release(root)
        shutil.rmtree(root, ignore_errors=True)
    retry = shell.command("mcn.sweep", "retry", root.parent.absolute())
    raise StorageError(
        f"Slurm job {job_id} was requeued (restart {restarts}) but its run folder {root.absolute()} holds no run: it "
        f"was moved or deleted after the job first started, so nothing was trained; move the run back there and "
        f"resubmit with {retry} (the same retry without moving it back starts it over)"
    )


def _refuse_changed_resume(recipe) -> None:
    """ConfigError when the run's train state was written with a config this one would change, and
    trainer.resume=auto: said here, before the run's state is rewritten (the epoch loop says it again for callers
    that bypass run_recipe)."""
    state = recipe.files.train_state
    if recipe.cfg.trainer.resume != "auto" or not state.exists():
        return
    try:
        config = load_train_state(state)["config"]
    except MCNError:
        return  # unreadable: the epoch loop reports it in its own words, as a failure of this run
    if resume_changes(config, recipe.config):
        raise ConfigError(resume_refusal(state, config, recipe.config))


@contextmanager
def _terminate_in_one_line(status: RunStatus):
    """SIGTERM outside the epoch loop (which has its own handler) ends the run with one line and its state
    `interrupted`, instead of a silent death that would leave it `running`. Only where SIGTERM would kill the
    process: under submitit, whose handler keeps the job alive for its requeue, nothing changes."""
    if (
        signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL
        or threading.current_thread() is not threading.main_thread()
    ):
        yield
        return

    def terminated(signum, frame):
        raise _Terminated(signum)

    previous = signal.signal(signal.SIGTERM, terminated)
    try:
        yield
    except _Terminated as stop:
        resume = shell.rerun_command()
        why = "SIGTERM outside the epoch loop (setup, or the final test)"
        status.interrupted(why)
        error = RunInterrupted(f"stopped by {why}; " + (f"continue with: {resume}" if resume else "run it again"))
        error.exit_status = 128 + stop.args[0]
        raise error from None
    finally:
        signal.signal(signal.SIGTERM, previous)


class _Terminated(BaseException):
    """SIGTERM outside the epoch loop, on its way out: a BaseException, as KeyboardInterrupt is, because the
    handler raises it wherever the main thread is, and an `except Exception` there (a logging handler's `emit`, a
    library's) would swallow an Exception and let the run go on."""
