"""Sweep manifests and `python -m mcn.sweep` without Slurm: job states read from the run folders, local
sweeps followed and relaunched in place, and one-line errors. tests/test_slurm.py has the live-cluster side."""

import json
import os
import subprocess
import sys

import pytest

from mcn.cluster.jobs import job_states, status_table
from mcn.cluster.manifest import Sweep, SweepJob
from mcn.files import RunStatus, SweepFiles
from mcn.sweep import main

from helpers import run_cli

LOCAL = ["experiment=quickstart", "logger=none", "trainer.progress_bar=false", "trainer.epochs=1"]


def sweep_cli(args, cwd, path=None):
    env = {**os.environ, "PATH": path or os.environ["PATH"]}
    return subprocess.run([sys.executable, "-m", "mcn.sweep", *args], cwd=cwd, capture_output=True, text=True, env=env)


def test_states_come_from_the_run_folders_without_slurm(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", os.path.dirname(sys.executable))  # no squeue, no sacct
    jobs = [
        SweepJob(n, [f"fusion={f}", "trainer.epochs=8"], f"{n}_fusion={f}", [f"7_{n}"]) for n, f in enumerate("abcd")
    ]
    jobs.append(SweepJob(4, ["fusion=e", "trainer.epochs=8"], "4_fusion=e"))  # its array was refused
    sweep = Sweep(tmp_path, "slurm", str(tmp_path), ".submitit/%j", jobs)
    sweep.save()
    running, done, failed = (RunStatus(tmp_path / f"{n}_fusion={f}" / "run_status.json") for n, f in enumerate("abc"))
    for status in (running, done, failed):
        status.started(stage="fusion", fusion_type="multiplicative")
    running.started(stage="fusion", fusion_type="multiplicative")  # requeued once
    running.progress(3, 8, {"epoch": 2, "val_accuracy": 0.625})
    done.progress(8, 8, {"epoch": 7, "val_accuracy": 0.875})
    done.done()
    failed.failed("RuntimeError: CUDA out of memory.\n Tried to allocate 2 GiB")
    # job #3 never started its run: submitit's result file says it ended, its log says why
    logs = tmp_path / ".submitit" / "7_3"
    logs.mkdir(parents=True)
    (logs / "7_3_0_result.pkl").write_bytes(b"")
    (logs / "7_3_0_log.err").write_text("Traceback (most recent call last):\n  ...\nImportError: no module named x\n")

    views, from_slurm = job_states(Sweep.open(tmp_path))
    assert not from_slurm
    assert [v.state for v in views] == ["RUNNING", "COMPLETED", "FAILED", "FAILED", "UNSUBMITTED"]
    assert [v.needs_submit for v in views] == [False, False, True, True, True]
    assert views[2].error == "RuntimeError: CUDA out of memory. Tried to allocate 2 GiB"
    assert views[3].error == "ImportError: no module named x"
    table = status_table(Sweep.open(tmp_path), views, from_slurm).splitlines()
    assert table[0].endswith("5 jobs, 1 RUNNING, 1 COMPLETED, 2 FAILED, 1 UNSUBMITTED")
    assert table[2].split() == ["0", "7_0", "RUNNING", "3/8", "0.6250", "1", "fusion=a"]  # restarts: 1
    assert table[3].split() == ["1", "7_1", "COMPLETED", "8/8", "0.8750", "0", "fusion=b"]
    assert main(["status", str(tmp_path)]) == 1  # failed jobs: non-zero


def test_bad_folders_and_commands_are_one_line(tmp_path):
    missing = sweep_cli(["status", str(tmp_path / "nope")], tmp_path)
    assert (
        missing.returncode == 2 and missing.stderr == f"mcn: error: sweep folder {tmp_path / 'nope'} does not exist\n"
    )
    not_a_sweep = sweep_cli(["retry", str(tmp_path)], tmp_path)
    assert not_a_sweep.returncode == 2 and "is not a sweep folder (sweep.json missing" in not_a_sweep.stderr
    SweepFiles(tmp_path).manifest.write_text("{not json")
    damaged = sweep_cli(["status", str(tmp_path)], tmp_path).stderr
    assert f"{tmp_path / 'sweep.json'} is damaged (JSONDecodeError" in damaged and "launch the sweep again" in damaged
    Sweep(tmp_path, "local", str(tmp_path), ".submitit/%j", [SweepJob(0, ["fusion=a"], "0_fusion=a", ["123"])]).save()
    local = sweep_cli(["retry", str(tmp_path)], tmp_path)
    assert local.returncode == 2 and "ran on the local launcher; rerun its unfinished jobs with: cd " in local.stderr
    no_slurm = sweep_cli(["cancel", str(tmp_path)], tmp_path, path=os.path.dirname(sys.executable))
    assert no_slurm.returncode == 2 and "no `scancel` on the PATH" in no_slurm.stderr
    for proc in (missing, not_a_sweep, local, no_slurm):
        assert "Traceback" not in proc.stderr and proc.stderr.count("\n") == 1


@pytest.mark.slow
def test_local_sweep_reports_a_failed_job_and_a_named_relaunch_skips_done_jobs(tmp_path):
    first = run_cli(["-m", "fusion=multiplicative", "trainer.epochs=1,-1", *LOCAL[:-1], "sweep.name=study"], tmp_path)
    assert first.returncode == 2 and "sweep job #1" in first.stderr, first.stderr[-2000:]
    folder = tmp_path / "outputs" / "multirun" / "study"
    status = sweep_cli(["status", str(folder)], tmp_path)
    assert status.returncode == 1, status.stderr
    lines = status.stdout.splitlines()
    done = json.loads(next(folder.glob("0_*/fusion_training_results_multiplicative.json")).read_text())
    best = f"{done['best_val_accuracy']:.4f}"
    assert lines[2].split()[2:] == ["COMPLETED", "1/1", best, "0", "trainer.epochs=1"]
    assert lines[3].split()[2:] == ["FAILED", "-", "-", "0", "trainer.epochs=-1"]
    assert lines[4].strip() == (
        "error: trainer.epochs=-1 must be a whole number >= 0; e.g. trainer.epochs=10 (set on the command line)"
    )

    # the same name, one job more: job 0 is done and skipped, only the new one runs
    args = ["-m", *LOCAL, "sweep.name=relaunch"]
    assert run_cli([*args, "fusion=multiplicative"], tmp_path).returncode == 0
    relaunch = tmp_path / "outputs" / "multirun" / "relaunch"
    log_0 = next(relaunch.glob("0_fusion=multiplicative*/train.log"))
    before = log_0.read_text()
    second = run_cli([*args, "fusion=multiplicative,TransformerBase"], tmp_path)
    assert second.returncode == 0, second.stderr[-2000:]
    job_lines = second.stdout.splitlines()[1:3]  # Hydra's "#0 : overrides" lines
    assert job_lines[0].endswith("(COMPLETED: skipped)") and "fusion=TransformerBase" in job_lines[1]
    assert log_0.read_text() == before  # not run again
    manifest = json.loads(SweepFiles(relaunch).manifest.read_text())
    assert [len(j["job_ids"]) for j in manifest["jobs"]] == [1, 1]
    assert json.loads(next(relaunch.glob("1_fusion=TransformerBase*/run_status.json")).read_text())["state"] == "done"


@pytest.mark.slow
def test_a_damaged_or_lost_record_is_rebuilt_from_the_sweep_folder(tmp_path):
    args = ["-m", "fusion=multiplicative,concatenation", *LOCAL, "trainer.batch_size=128", "sweep.name=kept"]
    first = run_cli(args, tmp_path)
    assert first.returncode == 0, first.stderr[-2000:]
    folder = tmp_path / "outputs" / "multirun" / "kept"
    manifest = SweepFiles(folder).manifest
    record, command, table = (
        manifest.read_text(),
        Sweep.open(folder).command,
        sweep_cli(["status", str(folder)], tmp_path),
    )
    assert table.returncode == 0 and "2 COMPLETED" in table.stdout

    for damage, why in [
        (lambda: manifest.write_text(record[: len(record) // 2]), "is damaged"),
        (manifest.unlink, "is missing"),
    ]:
        damage()
        before = manifest.read_text() if manifest.exists() else None
        status = sweep_cli(["status", str(folder)], tmp_path)
        assert status.returncode == 0 and status.stdout == table.stdout  # the same jobs, ids, states and progress
        assert status.stderr == f"mcn: {manifest} {why}" + status.stderr.split(why, 1)[1]
        assert "; rebuilt it from" in status.stderr and status.stderr.count("\n") == 1
        assert Sweep.open(folder).command == command  # the printed relaunch is the command as typed
        local = sweep_cli(["retry", str(folder)], tmp_path)  # local: its hint is the relaunch
        assert local.returncode == 2 and local.stderr.splitlines()[-1].endswith(command), local.stderr
        assert (manifest.read_text() if manifest.exists() else None) == before  # a query writes nothing

    # the relaunch finds both jobs done (nothing runs again) and writes the record back whole
    relaunch = run_cli(args, tmp_path)
    assert relaunch.returncode == 0 and "nothing to submit: every job" in relaunch.stdout, relaunch.stderr[-2000:]
    assert _jobs(manifest.read_text()) == _jobs(record)

    # nothing left to rebuild from: one line that says what is missing and how to write the record anew, which works
    (folder / ".submitit" / "launcher.pkl").unlink()
    manifest.write_text("{")
    lost = sweep_cli(["status", str(folder)], tmp_path)
    assert lost.returncode == 2 and lost.stderr.count("\n") == 1 and "Traceback" not in lost.stderr
    assert "launcher.pkl, which it is rebuilt from, is missing too; launch the sweep again" in lost.stderr
    assert run_cli(args, tmp_path).returncode == 0
    assert [j["folder"] for j in _jobs(manifest.read_text())] == [j["folder"] for j in _jobs(record)]
    rows = [line.split() for line in sweep_cli(["status", str(folder)], tmp_path).stdout.splitlines()[2:]]
    # the same states and progress; a local job's id (a process id) is not in its run folder, a Slurm job's is
    assert [[r[0], *r[2:]] for r in rows] == [[r[0], *r[2:]] for r in map(str.split, table.stdout.splitlines()[2:])]


def _jobs(manifest_text: str) -> list[dict]:
    return [
        {k: j[k] for k in ("num", "overrides", "folder", "job_ids", "code")} for j in json.loads(manifest_text)["jobs"]
    ]


def test_a_sweep_held_by_another_launch_is_refused_in_one_line_after_a_wait(tmp_path):
    from mcn.files import lock

    Sweep(tmp_path, "slurm", str(tmp_path), ".submitit/%j", [SweepJob(0, ["fusion=a"], "0_fusion=a", ["7_0"])]).save()
    record = SweepFiles(tmp_path).manifest.read_text()
    lock.acquire(tmp_path)  # this process is "submitting" the sweep
    try:
        refused = sweep_cli(["cancel", str(tmp_path)], tmp_path)  # waits 30 s for the holder, then gives up
    finally:
        lock.release(tmp_path)
    waiting, error = refused.stderr.splitlines()
    assert refused.returncode == 2 and waiting.startswith(f"mcn: waiting for process {os.getpid()} on ")
    assert error.startswith(
        f"mcn: error: sweep {tmp_path} is being submitted, run or cancelled by process {os.getpid()}"
    )
    assert error.endswith(
        f"follow it with python -m mcn.sweep status {tmp_path} --watch, and try again once that command has returned"
    )
    assert SweepFiles(tmp_path).manifest.read_text() == record
