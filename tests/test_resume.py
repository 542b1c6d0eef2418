"""A run stopped mid-epoch (signal, kill) and started again in its folder ends exactly like an uninterrupted one."""

import csv
import json
import re
import shlex
import signal

import pytest

import mcn.training.loop as loop
from mcn.errors import ConfigError, RunInterrupted
from mcn.files import read_status
from mcn.train import run

from helpers import compose_cfg, interrupt_epoch

RUN = ["trainer.epochs=4", "trainer.save_every=2", "trainer.deterministic=true"]


def rows(folder, fusion="multiplicative"):
    with open(folder / f"fusion_{fusion}_report.csv") as f:
        return [{k: v for k, v in r.items() if k != "elapsed_s"} for r in csv.DictReader(f)]


def results(folder, fusion="multiplicative"):
    r = json.loads((folder / f"fusion_training_results_{fusion}.json").read_text())
    return {k: v for k, v in r.items() if k not in ("wall_time_s", "runtime", "config")}  # config: its paths differ


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("straight")
    run(compose_cfg(tmp, RUN), str(tmp / "job"))
    return tmp / "job"


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR2])
def test_signal_mid_epoch_then_resume_equals_uninterrupted(tmp_path, monkeypatch, uninterrupted, signum):
    cfg = lambda: compose_cfg(tmp_path, RUN)  # noqa: E731  (a fresh config per start, as a requeued job gets)
    interrupt_epoch(monkeypatch, 3, signum)
    # SIGTERM outside a submitit job ends with one line (RunInterrupted); USR2 goes on to the handler before, here none
    with pytest.raises((SystemExit, RunInterrupted)) as stopped:
        run(cfg(), str(tmp_path / "job"))
    stopped = stopped.value
    assert (stopped.code if isinstance(stopped, SystemExit) else stopped.exit_status) == 128 + signum
    assert isinstance(stopped, RunInterrupted) == (signum == signal.SIGTERM)
    assert [r["epoch"] for r in rows(tmp_path / "job") if r["phase"] == "val"] == ["1", "2"]
    assert not list((tmp_path / "job").glob("fusion_training_results_*.json"))
    assert signal.getsignal(signum) is not None  # our handler was taken off again
    status = read_status(tmp_path / "job" / "run_status.json")
    assert status["state"] == "interrupted" and status["epoch"] == 2 and signal.Signals(signum).name in status["error"]
    monkeypatch.undo()
    run(cfg(), str(tmp_path / "job"))
    status = read_status(tmp_path / "job" / "run_status.json")
    assert (status["state"], status["starts"], status["epoch"], status["epochs"]) == ("done", 2, 4, 4)
    assert rows(tmp_path / "job") == rows(uninterrupted)  # each epoch once, same numbers
    assert results(tmp_path / "job") == results(uninterrupted)


def test_crash_leaves_a_partial_temp_file_that_resume_ignores(tmp_path, monkeypatch, uninterrupted):
    real, calls = loop.train_epoch, []

    def crashing(*args, **kwargs):  # the process dies in epoch 3, as under kill -9
        calls.append(1)
        if len(calls) == 3:
            raise MemoryError("killed")
        return real(*args, **kwargs)

    monkeypatch.setattr(loop, "train_epoch", crashing)
    with pytest.raises(MemoryError):
        run(compose_cfg(tmp_path, RUN), str(tmp_path / "job"))
    monkeypatch.undo()
    partial = tmp_path / "job" / ".train_state.pth.tmp999"
    partial.write_bytes(b"half a checkpoint")  # a write cut short
    run(compose_cfg(tmp_path, RUN), str(tmp_path / "job"))
    assert not partial.exists()  # a starting run removes its folder's stale temp files
    assert rows(tmp_path / "job") == rows(uninterrupted)
    assert results(tmp_path / "job") == results(uninterrupted)


def test_changed_config_continues_only_when_told(tmp_path):
    run(compose_cfg(tmp_path, [*RUN, "trainer.epochs=2"]), str(tmp_path / "job"))
    with pytest.raises(ConfigError, match=r"loss.alpha: auto -> 2.0"):
        run(compose_cfg(tmp_path, [*RUN, "trainer.epochs=2", "loss.alpha=2.0"]), str(tmp_path / "job"))
    out = run(compose_cfg(tmp_path, [*RUN, "trainer.epochs=3", "trainer.resume=force"]), str(tmp_path / "job"))
    assert out["epochs_run"] == 3
    assert [r["epoch"] for r in rows(tmp_path / "job") if r["phase"] == "val"] == ["1", "2", "3"]


def test_a_run_started_under_the_old_joint_stage_defaults_continues_as_it_began(tmp_path, monkeypatch, uninterrupted):
    """docs/how-to/resume.md: a run saved with the values the defaults had before docs/results.md §8 is refused by
    the same command, naming them and the overrides that continue it as it began (those of `tuning=ft_plain`)."""
    before = ["finetune.wise_ft=false", "loss.alpha=1.0", "trainer.early_stopping_since=best"]
    interrupt_epoch(monkeypatch, 3, signal.SIGTERM)
    with pytest.raises(RunInterrupted):
        run(compose_cfg(tmp_path, [*RUN, *before]), str(tmp_path / "job"))
    monkeypatch.undo()
    named = "finetune.wise_ft: False -> auto; loss.alpha: 1.0 -> auto; trainer.early_stopping_since: best -> best_fine"
    with pytest.raises(ConfigError, match=named) as refused:
        run(compose_cfg(tmp_path, RUN), str(tmp_path / "job"))
    hint = re.search(r"; add (.+) to the command to continue as it began, set trainer.resume=force", str(refused.value))
    assert shlex.split(hint.group(1)) == before
    assert compose_cfg(tmp_path, [*RUN, "tuning=ft_plain"]) == compose_cfg(tmp_path, [*RUN, *before])
    run(compose_cfg(tmp_path, [*RUN, *shlex.split(hint.group(1))]), str(tmp_path / "job"))
    # without the probe (RUN's) the old values and today's defaults train alike: the uninterrupted run is the reference
    assert rows(tmp_path / "job") == rows(uninterrupted)
    assert results(tmp_path / "job") == results(uninterrupted)
