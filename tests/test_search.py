"""The learning-rate search (`python -m mcn.tune`, mcn.search): its space notation, its presets, trials that never
read the test set, pruning, a local search with two workers end to end, and a trial whose worker was killed resumed
by the relaunch its status prints. (A Slurm array with a preempted worker: tests/test_slurm.py.)"""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from optuna.storages.journal import JournalFileBackend

import mcn.recipes.fusion as fusion_recipe
from mcn.errors import ConfigError
from mcn.files import read_csv
from mcn.models import list_fusions
from mcn.recipes import run_recipe
from mcn.recipes.fusion import FusionRecipe
from mcn.search.folder import SearchFolder
from mcn.search.report import summary
from mcn.search.space import as_overrides, search_space

from helpers import CONF, compose_cfg, run_cli

PATH = f"{os.path.dirname(sys.executable)}{os.pathsep}{os.environ['PATH']}"
ENV = {**os.environ, "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1", "PATH": PATH}
QUICK = ["experiment=quickstart", "logger=none", "trainer.progress_bar=false", "trainer.batch_size=64"]
GOOD, BAD = {"optim.base_lr": 3e-3, "optim.head_lr": 3e-3}, {"optim.base_lr": 1e-9, "optim.head_lr": 1e-9}
SPACE = "search.params={optim.base_lr:'choice(1e-9, 3e-3)',optim.head_lr:'choice(1e-9, 3e-3)'}"


@pytest.mark.parametrize(
    "text, kind, low, high, log",
    [
        ("tag(log, interval(1e-5, 1e-3))", optuna.distributions.FloatDistribution, 1e-5, 1e-3, True),
        ("interval(0.0, 2.0)", optuna.distributions.FloatDistribution, 0.0, 2.0, False),
        ("tag(int, interval(32, 128))", optuna.distributions.IntDistribution, 32, 128, False),
        ("range(2, 10, 2)", optuna.distributions.IntDistribution, 2, 10, False),  # both ends, as the sweeper
        ("range(2, 9, 2)", optuna.distributions.IntDistribution, 2, 8, False),
    ],
)
def test_the_sweeper_notation_becomes_optuna_distributions(text, kind, low, high, log):
    dist = search_space({"a.b": text})["a.b"]
    assert type(dist) is kind and (dist.low, dist.high, dist.log) == (low, high, log)


def test_a_choice_is_categorical_and_parameters_read_back_as_overrides():
    assert search_space({"k": "choice(64, 128)"})["k"].choices == (64, 128)
    assert as_overrides({"optim.base_lr": 1.2345678901e-05, "x": True}) == ["optim.base_lr=1.2345678901e-05", "x=true"]


@pytest.mark.parametrize(
    "params, says",
    [
        ({}, "search.params is empty"),
        ({"optim.base_lr": "5"}, "search.params.optim.base_lr=5 is one value, not a range"),
        ({"optim.base_lr": "interval(1e-3, 1e-5)"}, "must have start < end"),
        ({"optim.base_lr": "tag(log, interval(0, 1))"}, "start > 0 (log scale)"),
        ({"optim.base_lr": "range(5, 1, 1)"}, "holds no value"),
        ({"optim.base_lr": "range(1, 5, 0)"}, "holds no value"),
        ({"optim.base_lr": "tag(lg, interval(1e-5, 1e-3))"}, "unknown tag lg"),
        ({"k": "choice([1, 2], [3])"}, "a choice is one number"),
        ({"optim.base_lr": "interval(1e-3"}, "does not parse"),
    ],
)
def test_a_bad_space_is_one_line_naming_the_key(params, says):
    with pytest.raises(ConfigError, match=re.escape(says)) as e:
        search_space(params)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("fusion", list_fusions())
def test_every_fusion_type_has_a_preset_whose_space_names_config_keys(tmp_path, fusion):
    from omegaconf import OmegaConf

    assert (CONF / "hparams_search" / f"{fusion}.yaml").is_file()
    cfg = compose_cfg(tmp_path, [f"hparams_search={fusion}"], config_name="tune")
    assert cfg.fusion.name == fusion
    space = search_space(cfg.search.params)
    assert {"optim.base_lr", "optim.head_lr"} <= set(space)
    for key in space:
        assert OmegaConf.select(cfg, key, default=None) is not None, key


class NotRead:
    """Stands for the test set: any use of it fails the test."""

    def __getattr__(self, name):
        raise AssertionError(f"the test set was read ({name})")


def test_a_trial_never_reads_the_test_set_and_its_judge_prunes_it(tmp_path, monkeypatch):
    real = fusion_recipe.prepare_data

    def without_test(cfg, *experts):
        data = real(cfg, *experts)
        data.test = NotRead()
        return data

    monkeypatch.setattr(fusion_recipe, "prepare_data", without_test)
    heard = []

    def judge(epoch, val):
        heard.append((epoch, val["global_accuracy"]))
        return epoch == 2  # prune after epoch 2 of 3

    recipe = FusionRecipe(compose_cfg(tmp_path, ["trainer.epochs=3"]), tmp_path / "trial", judge=judge)
    record = run_recipe(recipe)
    assert record["pruned"] is True and record["epochs_run"] == 2 and [e for e, _ in heard] == [1, 2]
    assert json.loads(recipe.files.validation_results.read_text())["best_val_accuracy"] == max(a for _, a in heard)
    assert not recipe.files.results.exists()  # no test results
    assert {row["phase"] for row in read_csv(recipe.files.report)} == {"train", "val"}
    assert json.loads(recipe.files.status.read_text())["state"] == "done"


def study_of(folder: Path) -> optuna.Study:
    storage = optuna.storages.JournalStorage(JournalFileBackend(str(folder / "study.journal")))
    return optuna.load_study(study_name="mcn", storage=storage)


def test_a_local_search_with_two_workers_and_pruning_counts_every_trial_once_and_never_reads_test(tmp_path):
    folder = tmp_path / "outputs" / "search" / "lr"
    folder.mkdir(parents=True)
    # the trials the researcher wants tried, in order: two that learn, then two that cannot
    storage = optuna.storages.JournalStorage(JournalFileBackend(str(folder / "study.journal")))
    study = optuna.create_study(study_name="mcn", storage=storage, direction="maximize")
    for params in (GOOD, GOOD, BAD, BAD):
        study.enqueue_trial(params)
    args = [*QUICK, "trainer.epochs=4", "search.name=lr", SPACE, "search.n_trials=4", "search.workers=2"]
    args += ["search.pruner=median", "search.startup_trials=1", "search.warmup_epochs=0"]
    proc = run_cli(args, tmp_path, module="mcn.tune")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "Traceback" not in out, out[-3000:]
    assert "mcn: worker 0 ended: no trial left to take" in out and "mcn: worker 1 ended" in out
    assert f"search {folder}: 4 of 4 trials taken: 2 complete, 2 pruned" in out

    trials = study_of(folder).trials
    assert len(trials) == 4  # none asked twice, none lost
    for trial in trials:
        good = trial.params == GOOD
        assert trial.state.name == ("COMPLETE" if good else "PRUNED"), (trial.number, trial.state, trial.params)
        assert len(trial.intermediate_values) == (4 if good else 1)
        run = folder / "trials" / str(trial.number)
        assert not list(run.glob("fusion_training_results_*.json"))  # the test set is never read
        assert {row["phase"] for row in read_csv(run / "fusion_multiplicative_report.csv")} == {"train", "val"}
        assert "no test images (a search's trial)" in (run / "train.log").read_text()
        record = json.loads((run / "fusion_validation_results_multiplicative.json").read_text())
        assert record["pruned"] is not good and record["learning_rates"]["head_lr"] == trial.params["optim.head_lr"]
    assert "head_lr: 0.003" in (folder / "best.yaml").read_text()
    assert (folder / "plots" / "history.png").stat().st_size > 0 and (folder / "plots" / "slice.png").exists()
    rerun = re.search(r"rerun the best over seeds: (.+)", out).group(1)
    assert "python -m mcn.train -m" in rerun and "optim.head_lr=0.003" in rerun and "seed=0,1,2" in rerun
    report = re.search(r"then its test results beside every baseline of the same experts: (.+)", out).group(1)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    for command in (rerun, report):  # both paste and work, from anywhere
        pasted = subprocess.run(["sh", "-c", command], cwd=elsewhere, env=ENV, text=True, capture_output=True)
        assert pasted.returncode == 0, pasted.stdout[-2000:] + pasted.stderr[-2000:]
    rows = read_csv(tmp_path / "outputs" / "multirun" / "lr_best" / "fusion_performance_summary.csv")
    assert sorted(int(r["seed"]) for r in rows) == [0, 1, 2] and {r["status"] for r in rows} == {"done"}

    status = run_cli(["status", str(folder)], tmp_path, module="mcn.sweep")
    assert status.returncode == 0 and "best: trial 0" in status.stdout, status.stdout + status.stderr
    manifest = (folder / "search.json").read_text()
    again = run_cli(args, tmp_path, module="mcn.tune")
    assert again.returncode == 0 and f"mcn: nothing to submit: the search in {folder} is finished" in again.stdout
    assert (folder / "search.json").read_text().count("job_ids") == manifest.count("job_ids")
    assert len(study_of(folder).trials) == 4


def start_search(args, tmp_path, epochs):
    """`mcn.tune` started with `args` (search.name=lr): (its process, trial 0's folder, its worker's PID) once that
    trial has validated `epochs` epochs."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "mcn.tune", *args],
        cwd=tmp_path,
        env=ENV,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    trial = tmp_path / "outputs" / "search" / "lr" / "trials" / "0"
    report = trial / "fusion_multiplicative_report.csv"
    deadline = time.time() + 120
    while time.time() < deadline and not (report.exists() and report.read_text().count("\nval,") >= epochs):
        time.sleep(0.2)
    return proc, trial, json.loads((trial / ".mcn.lock").read_text())["pid"]


def test_a_killed_worker_leaves_its_trial_lost_and_the_printed_relaunch_resumes_it(tmp_path):
    args = [*QUICK, "trainer.epochs=12", "search.name=lr", "hparams_search=multiplicative", "search.n_trials=1"]
    args += ["search.workers=1", "search.pruner=none"]
    proc, trial, worker = start_search(args, tmp_path, epochs=3)
    report = trial / "fusion_multiplicative_report.csv"
    os.kill(worker, signal.SIGKILL)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 2 and "Traceback" not in out + err, out + err
    assert err.count("mcn: error:") == 1 and "mcn: error: worker 0 failed: killed by SIGKILL" in err

    status = run_cli(["status", str(trial.parents[1])], tmp_path, module="mcn.sweep")
    assert status.returncode == 1, status.stdout + status.stderr
    assert re.search(r"\n\s+0\s+LOST\s", status.stdout), status.stdout
    hint = re.search(r"lost trials resume when a worker asks for one: (.+)", status.stdout).group(1)
    # while a worker is queued or running (a requeued one), it adopts the trial: no command to paste
    search = SearchFolder.open(trial.parents[1])
    assert summary(search, search.study(), live_workers=1)[-1] == (
        "lost trials resume when a worker asks for its next trial: 1 worker is queued or running and will adopt "
        "them; nothing to do"
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    pasted = subprocess.run(["sh", "-c", hint], cwd=elsewhere, env=ENV, text=True, capture_output=True, timeout=300)
    assert pasted.returncode == 0, pasted.stdout[-2000:] + pasted.stderr[-2000:]
    assert "1 of 1 trials taken: 1 complete" in pasted.stdout
    assert "resumed from" in (trial / "train.log").read_text()
    assert json.loads((trial / "run_status.json").read_text())["starts"] == 2
    val = [int(row["epoch"]) for row in read_csv(report) if row["phase"] == "val"]
    assert val == list(range(1, 13))  # every epoch once
    (only,) = study_of(trial.parents[1]).trials
    assert only.state.name == "COMPLETE" and sorted(only.intermediate_values) == list(range(1, 13))


def test_sigterm_stops_a_local_search_and_its_workers_in_one_line(tmp_path):
    args = [*QUICK, "trainer.epochs=30", "search.name=lr", "hparams_search=multiplicative", "search.n_trials=1"]
    proc, trial, worker = start_search([*args, "search.workers=1"], tmp_path, epochs=2)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "Traceback" not in out + err, out + err
    assert err.count("mcn: error:") == 1 and "interrupted: the workers were stopped; go on with: cd " in err
    deadline = time.time() + 30
    while time.time() < deadline and os.path.exists(f"/proc/{worker}"):
        time.sleep(0.2)
    assert not os.path.exists(f"/proc/{worker}")  # no worker left behind
    status = run_cli(["status", str(trial.parents[1])], tmp_path, module="mcn.sweep")
    assert re.search(r"\n\s+0\s+LOST\s", status.stdout) and status.returncode == 1, status.stdout + status.stderr


def test_the_nll_objective_reports_the_global_heads_validation_nll_each_epoch(tmp_path):
    import torch.nn.functional as F

    from mcn.search.worker import Judge, tell
    from mcn.training.loop import predict

    study = optuna.create_study(direction="minimize")
    trial = study.ask()
    judge = Judge(trial, "val_nll")
    recipe = FusionRecipe(compose_cfg(tmp_path, ["trainer.epochs=2"]), tmp_path / "trial", judge=judge)
    judge.recipe = recipe
    run_recipe(recipe)
    values = study.trials[0].intermediate_values
    assert sorted(values) == [1, 2] and all(0 < v < 10 for v in values.values())
    logits, labels = predict(recipe.model, recipe.val_batches, recipe.runtime)  # the last epoch's weights
    assert values[2] == pytest.approx(float(F.cross_entropy(logits[0], labels)), rel=1e-5)
    tell(study, trial.number, pruned=False, objective="val_nll")
    assert study.trials[0].value == min(values.values())  # the best epoch's, for a minimised objective


def test_a_long_sweep_job_name_is_cut_short_with_a_hash():
    from mcn.training.config import job_dirname

    short = "0_fusion=concatenation"
    assert job_dirname(short) == short
    long = "0_" + ",".join(f"optim.k{i}=0.00011804224323917872" for i in range(12))
    other = long.replace("k11", "k12")
    assert len(job_dirname(long).encode()) <= 200 and job_dirname(long) != job_dirname(other)
    assert job_dirname(long).startswith("0_optim.k0=") and job_dirname("é" * 150)  # cut at a character boundary


def test_a_search_relaunched_after_mcns_defaults_changed_names_the_overrides_that_go_on_with_it(tmp_path):
    """The same command under another mcn's defaults composes another config: the refusal names the overrides that
    give the search's config back, and the command with them added goes on with it (here: finds it finished)."""
    args = [*QUICK, "trainer.epochs=1", "search.name=lr", SPACE, "search.n_trials=1", "search.workers=1"]
    first = run_cli(args, tmp_path, module="mcn.tune")
    assert first.returncode == 0, first.stderr[-3000:]
    folder = tmp_path / "outputs" / "search" / "lr"
    manifest = json.loads((folder / "search.json").read_text())  # as an mcn before docs/results.md §8 wrote it
    manifest["config"]["loss"]["alpha"], manifest["config"]["finetune"]["wise_ft"] = 1.0, False
    (folder / "search.json").write_text(json.dumps(manifest))
    refused = run_cli(args, tmp_path, module="mcn.tune")
    [line] = [x for x in refused.stderr.splitlines() if x.startswith("mcn: error:")]
    assert refused.returncode == 2 and "finetune.wise_ft: False -> auto; loss.alpha: 1.0 -> auto" in line, line
    back = re.search(r"or add (.+) to this command to go on with that one as it began$", line).group(1)
    assert back == "finetune.wise_ft=false loss.alpha=1.0"
    again = run_cli([*args, *back.split()], tmp_path, module="mcn.tune")
    assert again.returncode == 0 and f"nothing to submit: the search in {folder} is finished" in again.stdout
    other = run_cli([*args, "optim.weight_decay=0.5"], tmp_path, module="mcn.tune")  # another command: the old one
    assert f"launch that one again as it was: cd {tmp_path} && python -m mcn.tune" in other.stderr, other.stderr
