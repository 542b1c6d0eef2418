"""What a search leaves a researcher: where it stands (trials complete / pruned / running / lost / failed, the best
value and its parameters), the best parameters as overrides and as a preset (`best.yaml`), Optuna's plots
(optimisation history, parameter importances, slices; PNG through matplotlib), and the commands that rerun the
best configuration over seeds and report it (mcn.evaluate) beside every baseline of the same experts on test."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np
import optuna
from omegaconf import OmegaConf
from optuna.trial import FrozenTrial, TrialState

from mcn import shell
from mcn.files import atomic_write, lock
from mcn.search.folder import OBJECTIVES, SearchFolder
from mcn.search.space import as_overrides

log = logging.getLogger(__name__)

# keys of the search's own command line that a rerun of its best configuration leaves out
NOT_RERUN = ("search.", "hparams_search=", "seed=", "sweep.name=", "fusion=")


def trial_state(search: SearchFolder, trial: FrozenTrial) -> str:
    """COMPLETE, PRUNED, FAIL, RUNNING (a live process holds its folder) or LOST (running in the study, but no live
    process holds its folder: the next worker to ask resumes it)."""
    if trial.state == TrialState.RUNNING and lock.holder(search.trial_folder(trial.number)) is None:
        return "LOST"
    return trial.state.name


def finished(search: SearchFolder, study: optuna.Study) -> bool:
    """`n_trials` trials have ended (complete, pruned or failed) and none is running or lost."""
    trials = study.get_trials(deepcopy=False)
    ended = sum(t.state.is_finished() for t in trials)
    return ended >= search.n_trials and not any(t.state == TrialState.RUNNING for t in trials)


def best_trial(study: optuna.Study) -> FrozenTrial | None:
    complete = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE]
    if not complete:
        return None
    pick = max if study.direction == optuna.study.StudyDirection.MAXIMIZE else min
    return pick(complete, key=lambda t: t.value)


def rerun_commands(search: SearchFolder, trial: FrozenTrial) -> list[str]:
    """The best configuration over `search.rerun_seeds` as a -m sweep of mcn.train (on the search's launcher: Slurm
    or local), each seed with its own experts as the search had them, then its study report (mcn.evaluate): the
    fusion and every baseline of the same experts on test, with paired intervals over the seeds."""
    data, cfg = search.data, search.config
    kept = [a for a in data["rerun_overrides"] if not a.lstrip("+~").startswith(NOT_RERUN)]
    seeds = ",".join(str(int(s)) for s in search.settings["rerun_seeds"])
    name = f"{cfg['search']['name']}_best"
    args = [
        *kept,
        shell.hydra_override("fusion", cfg["fusion"]["name"]),
        *as_overrides(trial.params),
        f"seed={seeds}",
        shell.hydra_override("sweep.name", name),
    ]
    folder = Path(cfg["paths"]["output_root"]) / "multirun" / name
    cd = f"cd {shell.shell_join([data['cwd']])} && "
    return [cd + shell.command("mcn.train", "-m", *args), cd + shell.command("mcn.evaluate", folder)]


def summary(search: SearchFolder, study: optuna.Study, live_workers: int = 0) -> list[str]:
    """The lines `mcn.sweep status` and `mcn.tune` print: counts, the best trial, one row per trial, the next step.
    `live_workers`: how many of its workers are queued or running (a requeued one among them), which adopt lost
    trials without a retry."""
    trials = study.get_trials(deepcopy=False)
    states = [trial_state(search, t) for t in trials]
    counts = {s: states.count(s) for s in ("COMPLETE", "PRUNED", "RUNNING", "LOST", "FAIL") if s in states}
    objective = f"{search.objective} ({'max' if OBJECTIVES[search.objective] == 'maximize' else 'min'})"
    lines = [
        f"search {search.root}: {len(trials)} of {search.n_trials} trials taken"
        + (": " + ", ".join(f"{n} {s.lower()}" for s, n in counts.items()) if counts else "")
        + f"; objective {objective} on validation (the test set is not evaluated)",
        f"{'#':>3}  {'state':<9} {'epochs':>6} {'value':>8}  parameters",
    ]
    for trial, state in zip(trials, states):
        value = f"{trial.value:.4f}" if trial.value is not None else "-"
        if trial.value is None and trial.intermediate_values:  # running, lost or pruned: its latest
            value = f"{trial.intermediate_values[max(trial.intermediate_values)]:.4f}"
        epochs = max(trial.intermediate_values) if trial.intermediate_values else "-"
        shown = " ".join(f"{k}={_short(v)}" for k, v in sorted(trial.params.items()))
        lines.append(f"{trial.number:>3}  {state:<9} {epochs!s:>6} {value:>8}  {shown}")
        if state == "FAIL" and trial.user_attrs.get("error"):
            lines.append(f"{'':>5}error: {trial.user_attrs['error']}")
    best = best_trial(study)
    if best is not None:
        lines.append(
            f"best: trial {best.number}, {search.objective} {best.value:.4f}: {' '.join(as_overrides(best.params))}"
        )
    if finished(search, study):
        if best is not None:
            rerun, report = rerun_commands(search, best)
            lines += [
                f"best parameters as a preset: {search.best_file}; plots in {search.plots}",
                f"rerun the best over seeds: {rerun}",
                f"then its test results beside every baseline of the same experts: {report}",
            ]
    elif "LOST" in states and live_workers:
        lines.append(
            f"lost trials resume when a worker asks for its next trial: {live_workers} worker"
            f"{'s are' if live_workers > 1 else ' is'} queued or running and will adopt them; nothing to do"
        )
    elif "LOST" in states:
        lines.append("lost trials resume when a worker asks for one: " + _continue_hint(search))
    return lines


def _continue_hint(search: SearchFolder) -> str:
    if search.data["launcher"] == "slurm":
        return shell.command("mcn.sweep", "retry", search.root)
    return search.command


def report_once(search: SearchFolder, study: optuna.Study) -> None:
    """The report of a finished search, when no worker wrote it (the last one was killed before it could)."""
    if not search.best_file.exists():
        write_report(search, study)


def write_report(search: SearchFolder, study: optuna.Study) -> None:
    """best.yaml and the plots, once the search is finished (rewritten as a whole, atomically)."""
    best = best_trial(study)
    if best is None:
        log.warning("%s: no trial completed, so there is no best configuration", search.root)
        return
    preset = OmegaConf.create()
    for key, value in sorted(best.params.items()):
        OmegaConf.update(preset, key, value)
    header = (
        f"# @package _global_\n# The best of {len(study.trials)} trials of {search.root} (trial {best.number}: "
        f"{search.objective} {best.value:.4f} on validation).\n# As overrides: {' '.join(as_overrides(best.params))}"
        f"\n"
    )
    atomic_write(search.best_file, lambda f: f.write((header + OmegaConf.to_yaml(preset)).encode()))
    _plots(study, search.plots)
    log.info(
        "%s: best trial %d (%s %.4f); preset %s",
        search.root,
        best.number,
        search.objective,
        best.value,
        search.best_file,
    )


def _plots(study: optuna.Study, folder: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as vis

    folder.mkdir(parents=True, exist_ok=True)
    complete = [t for t in study.trials if t.state == TrialState.COMPLETE]
    plots = {"history": vis.plot_optimization_history, "slice": vis.plot_slice}
    if len(complete) >= 2 and len(study.best_trial.params) >= 2:  # importances compare parameters over trials
        plots["importances"] = vis.plot_param_importances
    for name, plot in plots.items():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                axes = plot(study)
        except Exception as e:  # a plot is a help, not the result: e.g. trials too alike to rank the parameters
            log.warning("no %s plot: %s", name, e)
            continue
        figure = np.asarray(axes, dtype=object).flat[0].figure  # one Axes, or an array of them (slices)
        figure.savefig(folder / f"{name}.png", dpi=120, bbox_inches="tight")
        plt.close(figure)


def _short(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
