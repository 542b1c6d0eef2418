"""A search's worker: takes trials until the study has its `n_trials`, each an ordinary mcn fusion run in its own
folder, on validation only (mcn.recipes.fusion with a `judge`: the test set is never evaluated).

A worker is a task of the search's Slurm array (a submitit job, `SearchWorker`) or a local process
(`python -m mcn.tune_worker`). Preempted, requeued or timed out, it starts again and adopts its unfinished trial,
which resumes from its train_state.pth with the same parameters; a worker that never comes back leaves its trial to
the next worker that asks (mcn.search.folder).
"""

from __future__ import annotations

import logging
import math
import os
import sys
from pathlib import Path

import optuna
import submitit
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from optuna.trial import FrozenTrial, TrialState

from mcn.errors import ConfigError, MCNError, TrainingDiverged
from mcn.files import RunFolder, lock
from mcn.search.folder import SearchFolder
from mcn.search.space import as_overrides

log = logging.getLogger(__name__)
LOG_FORMAT = "[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"  # Hydra's, as in every other run's train.log


class Judge:
    """Hears each epoch's validation metrics (mcn.training.loop.EpochLoop): reports the objective to Optuna at that
    epoch and says whether the pruner stops the trial. `val_nll` is the global head's mean negative log-likelihood
    on the validation part (nats), from one more pass over it."""

    def __init__(self, trial: optuna.trial.Trial, objective: str):
        self.trial, self.objective = trial, objective
        self.recipe = None  # the run it judges, set once built

    def __call__(self, epoch: int, val: dict) -> bool:
        self.trial.report(self.value(val), epoch)
        return self.trial.should_prune()

    def value(self, val: dict) -> float:
        r = self.recipe
        if self.objective == "val_accuracy":
            return float(val[r.monitor])
        from mcn.training.loop import predict

        logits, labels = predict(r.model, r.val_batches, r.runtime)
        return float(F.cross_entropy(logits[0], labels))


class SearchWorker(submitit.helpers.Checkpointable):
    """The job submitit runs for each worker (its `index`: an array task's) of the search in `folder`; requeued as it
    is (Checkpointable) when Slurm's time limit nears."""

    def __init__(self, folder: str):
        self.folder = str(folder)

    def __call__(self, index: int) -> int:
        log_to_stderr()
        return work(self.folder, int(index))


def work(folder: str | Path, index: int) -> int:
    """Run trials until none is left to take; the number run. The worker that finds the study finished writes its
    report (best.yaml, plots)."""
    from mcn.search.report import finished, write_report

    search = SearchFolder.open(folder)
    if not os.path.isdir(search.data["cwd"]):
        raise MCNError(
            f"{search.root} was launched from {search.data['cwd']}, which is gone: its config's relative paths start "
            f"there; recreate it, or launch the search again from where its paths hold: {search.command}"
        )
    os.chdir(search.data["cwd"])  # the config's relative paths start where the search was launched
    study = search.study(worker=index)
    ran = 0
    while (trial := search.claim(study)) is not None:
        run_trial(search, study, trial)
        ran += 1
    log.info("worker %d: no trial left to take (%d run here)", index, ran)
    if finished(search, study):
        write_report(search, study)
    return ran


def run_trial(search: SearchFolder, study: optuna.Study, frozen: FrozenTrial) -> None:
    """Run (or resume) one trial in its folder, whose lock this process holds, and tell the study how it ended:
    complete, pruned, or failed when its parameters made the run diverge (the search goes on) or made a config the
    run refuses (the worker ends with that line). A signal, or a fault that is not the trial's (a full disk, missing
    data), leaves it running in the study for the next worker (or this one, requeued) to resume."""
    from mcn.recipes import run_recipe
    from mcn.recipes.fusion import FusionRecipe

    folder = search.trial_folder(frozen.number)
    # the running trial, to report to: Optuna's own handle, built from its (private) storage id as study.ask does
    trial = optuna.trial.Trial(study, frozen._trial_id)
    handler = logging.FileHandler(folder / "train.log")
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    logging.getLogger().addHandler(handler)
    resumed = bool(frozen.intermediate_values) or RunFolder(folder).train_state.exists()
    log.info("trial %d%s: %s", frozen.number, " (resumed)" if resumed else "", " ".join(as_overrides(frozen.params)))
    try:
        try:
            judge = Judge(trial, search.objective)
            recipe = FusionRecipe(compose_trial(search, frozen), folder, judge=judge)
            judge.recipe = recipe
            record = run_recipe(recipe)
        except TrainingDiverged as e:  # an outcome of its rates: counted, and the search goes on
            _fail(study, trial, frozen.number, str(e))
            log.warning("trial %d failed: %s", frozen.number, e)
            return
        except ConfigError as e:  # its values make a config the run refuses
            _fail(study, trial, frozen.number, str(e))
            raise
        tell(study, frozen.number, pruned=bool(record.get("pruned")), objective=search.objective)
    finally:
        logging.getLogger().removeHandler(handler)
        handler.close()
        lock.release(folder)


def _fail(study: optuna.Study, trial: optuna.trial.Trial, number: int, error: str) -> None:
    trial.set_user_attr("error", error)  # mcn.sweep status shows it under the trial
    study.tell(number, state=TrialState.FAIL)


def tell(study: optuna.Study, number: int, *, pruned: bool, objective: str) -> None:
    """The trial's end: pruned, or complete with its best value over the epochs it reported. The run keeps the
    weights of its best epoch by validation accuracy; under `val_nll` the epoch of the lowest NLL may be another."""
    values = study.get_trials(deepcopy=False)[number].intermediate_values
    if pruned:
        study.tell(number, state=TrialState.PRUNED)
        return
    finite = [v for v in values.values() if math.isfinite(v)]
    if not finite:
        study.tell(number, state=TrialState.FAIL)
        return
    study.tell(number, max(finite) if objective == "val_accuracy" else min(finite))


def compose_trial(search: SearchFolder, trial: FrozenTrial) -> DictConfig:
    """The trial's config: the search's, as composed when it was launched (`config.yaml`), with the trial's
    parameters set."""
    cfg = OmegaConf.load(search.config_file)
    for key, value in trial.params.items():
        OmegaConf.update(cfg, key, value, merge=False)
    return cfg


def log_to_stderr() -> None:
    root = logging.getLogger()
    if not root.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(LOG_FORMAT))
        root.addHandler(handler)
    root.setLevel(logging.INFO)
