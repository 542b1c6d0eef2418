"""Hand-offs a person can trust, through the real CLI: the same command resumes its run, every printed next step
pastes into a POSIX shell and does what it says (whatever the folder's name holds), one process per run folder,
states that never say `running` for a dead process, SIGTERM at any moment ends in one line, moved sweeps and typed
values refused in one line."""

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time

import pytest

from mcn.files import read_csv, read_status
from mcn.schema import check_config
from mcn.shell import hydra_override

from helpers import compose_cfg, read_only_folder, run_cli

QUICK = ["experiment=quickstart", "logger=none", "trainer.progress_bar=false", "trainer.batch_size=64"]
WEIRD = "run dir, é=1 'q'"  # a space, a comma, =, quotes and non-ASCII: what shells and Hydra's grammar read specially
# `python` is this interpreter, as in a shell with the project's environment activated
PATH = f"{os.path.dirname(sys.executable)}{os.pathsep}{os.environ['PATH']}"
ENV = {**os.environ, "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1", "PATH": PATH}


def start(args, cwd, module="mcn.train"):
    return subprocess.Popen(
        [sys.executable, "-m", module, *args],
        cwd=cwd,
        env=ENV,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def wait_for(predicate, timeout=180):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError("timed out")


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("mcn: error:")]


def paste(command: str, cwd) -> subprocess.CompletedProcess:
    """What a person does with a printed command: paste it into a shell."""
    return subprocess.run(["sh", "-c", command], cwd=cwd, env=ENV, text=True, capture_output=True, timeout=600)


def hint(line: str, after: str) -> str:
    return line.split(after, 1)[1].strip()


def test_the_same_command_resumes_its_interrupted_run_and_a_done_run_is_not_run_again(tmp_path):
    args = [*QUICK, "trainer.epochs=4", "trainer.save_every=1"]
    proc = start(args, tmp_path)
    runs = tmp_path / "outputs" / "runs" / "train"
    folder = wait_for(
        lambda: (
            (read_status(next(runs.glob("*/run_status.json"), runs / "x")) or {}).get("epoch", 0) >= 1
            and next(runs.iterdir())
        )
    )
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "Traceback" not in err
    [line] = error_lines(err)
    command = hint(line, "continue with:")
    assert command.startswith(f"cd {shlex.quote(str(tmp_path))} && python -m mcn.train ")
    (tmp_path / "elsewhere").mkdir()
    resumed = paste(command, tmp_path / "elsewhere")  # it pastes from any folder: no new run there
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from" in resumed.stdout + resumed.stderr and [p.name for p in runs.iterdir()] == [folder.name]
    assert list((tmp_path / "elsewhere").iterdir()) == []
    assert read_status(folder / "run_status.json")["state"] == "done"
    # the same command once more: the run is done, nothing is trained or tested again
    again = run_cli(args, tmp_path)
    assert again.returncode == 0 and "this run is already done" in again.stdout + again.stderr
    rows = read_csv(folder / "fusion_multiplicative_report.csv")
    assert [r["phase"] for r in rows].count("test") == 1
    assert [int(r["epoch"]) for r in rows if r["phase"] == "val"] == [1, 2, 3, 4]
    # the overrides in another order name the same folder
    reordered = run_cli(list(reversed(args)), tmp_path)
    assert reordered.returncode == 0 and [p.name for p in runs.iterdir()] == [folder.name]


def test_a_second_process_is_refused_in_one_line_and_a_killed_run_reads_lost_and_resumes(tmp_path):
    run_dir = tmp_path / WEIRD
    pinned = hydra_override("hydra.run.dir", run_dir)
    first = start([*QUICK, "trainer.epochs=6", "trainer.save_every=1", pinned], tmp_path)
    wait_for(lambda: (read_status(run_dir / "run_status.json") or {}).get("epoch", 0) >= 1)
    first.send_signal(signal.SIGSTOP)  # alive and holding its folder, but it cannot finish while the second tries
    hydra_files = {p: p.read_bytes() for p in (run_dir / ".hydra").iterdir()}
    second = run_cli([*QUICK, "trainer.epochs=6", "optim.head_lr=0.01", pinned], tmp_path)
    assert second.returncode == 2 and "Traceback" not in second.stderr
    [line] = error_lines(second.stderr)
    assert f"{run_dir} is in use by process {first.pid} on " in line
    assert {p: p.read_bytes() for p in (run_dir / ".hydra").iterdir()} == hydra_files  # nothing touched
    status = read_status(run_dir / "run_status.json")
    assert status["state"] == "running" and status["starts"] == 1

    first.send_signal(signal.SIGKILL)  # no clean-up at all: the OS lets go of the lock
    first.communicate(timeout=60)
    lost = read_status(run_dir / "run_status.json")
    assert (
        lost["state"] == "lost"
        and f"continue it with: cd {shlex.quote(str(tmp_path))} && python -m mcn.train" in lost["error"]
    )
    resumed = paste(hint(lost["error"], "continue it with:"), tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from" in resumed.stdout + resumed.stderr
    final = read_status(run_dir / "run_status.json")
    assert final["state"] == "done" and final["starts"] == 2


def test_sigterm_before_the_epoch_loop_ends_in_one_line_and_state_interrupted(tmp_path):
    run_dir = tmp_path / "run"
    proc = start([*QUICK, "trainer.epochs=30", f"hydra.run.dir={run_dir}"], tmp_path)
    wait_for(lambda: (read_status(run_dir / "run_status.json") or {}).get("state") == "running", timeout=120)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM and "Traceback" not in err
    [line] = error_lines(err)
    assert "SIGTERM" in line and " && python -m mcn.train" in hint(line, "continue with:")
    assert read_status(run_dir / "run_status.json")["state"] == "interrupted"


def test_sigterm_where_code_catches_every_exception_still_ends_the_run(tmp_path):
    """The handler raises wherever the main thread is: inside a logging handler's `emit` (`except Exception:
    handleError`) or any library's `except Exception`, an Exception would be swallowed and the run would go on."""
    from mcn.errors import RunInterrupted
    from mcn.files import RunStatus
    from mcn.recipes import _terminate_in_one_line

    status = RunStatus(tmp_path / "run_status.json")
    status.started(stage="fusion", fusion_type="concatenation")
    default = signal.signal(signal.SIGTERM, signal.SIG_DFL)  # where SIGTERM would kill: the handler goes in
    try:
        with pytest.raises(RunInterrupted) as stopped, _terminate_in_one_line(status):
            try:
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(5)  # the handler runs here at the latest
            except Exception:  # as logging.Handler.emit does
                pass
            pytest.fail("SIGTERM was swallowed: the run went on")
    finally:
        signal.signal(signal.SIGTERM, default)
    assert stopped.value.exit_status == 128 + signal.SIGTERM and "SIGTERM outside the epoch loop" in str(stopped.value)
    assert read_status(tmp_path / "run_status.json")["state"] == "interrupted"


def test_a_local_sweep_hint_pastes_and_a_moved_sweep_is_refused_in_one_line(tmp_path):
    sweep = tmp_path / WEIRD
    args = [
        "-m",
        *QUICK,
        "trainer.epochs=1",
        "hydra/launcher=local",
        "seed=1,2",
        hydra_override("hydra.sweep.dir", sweep),
    ]
    launched = run_cli(args, tmp_path)
    assert launched.returncode == 0, launched.stderr[-2000:]
    job = next(p for p in sweep.iterdir() if p.name.startswith("1_"))
    (job / "run_status.json").write_text(json.dumps({**read_status(job / "run_status.json"), "state": "failed"}))
    status = run_cli(["status", str(sweep)], tmp_path, module="mcn.sweep")
    assert status.returncode == 1
    command = hint(status.stdout.splitlines()[-1], "rerun the failed ones:")
    rerun = paste(command, tmp_path / "..")  # from anywhere: the command goes where the sweep was launched
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert "skipped" in rerun.stdout + rerun.stderr
    assert read_status(job / "run_status.json")["state"] == "done"

    manifest = json.loads((sweep / "sweep.json").read_text())
    (sweep / "sweep.json").write_text(json.dumps({**manifest, "launcher": "slurm"}))  # as if submitted to Slurm
    moved = tmp_path / "moved"
    shutil.move(sweep, moved)
    retry = run_cli(["retry", str(moved)], tmp_path, module="mcn.sweep")
    assert retry.returncode == 2 and "Traceback" not in retry.stderr
    [line] = error_lines(retry.stderr)
    assert f"was launched as {sweep} and has moved since" in line
    back = hint(line, "move it back (").split(") or", 1)[0]
    assert paste(back, tmp_path).returncode == 0 and sweep.is_dir() and not moved.exists()


@pytest.mark.parametrize(
    "override",
    ["seed=abc", "seed=-1", "seed=1.5", "loss.alpha=-1", "optim.head_lr=-1", "optim.base_lr=nan", "probe.lr=0"],
)
def test_a_value_out_of_range_is_refused_before_any_work_with_a_suggestion_that_passes(tmp_path, override):
    proc = run_cli([*QUICK, override, f"hydra.run.dir={tmp_path / 'run'}"], tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    [line] = error_lines(proc.stderr)
    key = override.split("=")[0]
    suggested = re.search(rf"e\.g\. {re.escape(key)}=(\S+) \(set on the command line\)$", line)[1]
    check_config(compose_cfg(tmp_path, [f"{key}={suggested}"]))  # raises if the suggestion does not pass
    assert not (tmp_path / "run").exists()  # a command refused before its run started leaves no folder


def test_a_read_only_run_folder_is_one_line_before_hydra_writes(tmp_path):
    with read_only_folder(tmp_path / "ro") as read_only:
        proc = run_cli([*QUICK, f"hydra.run.dir={read_only / 'run'}"], tmp_path)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    [line] = error_lines(proc.stderr)
    assert f"cannot create {read_only / 'run'}" in line and "read-only file system" in line


@pytest.mark.parametrize(
    "value", ["plain/path", WEIRD, "a,b=c", "it's", 'say "hi"', "back\\slash\\", "ends with \\'", "ü ß 日本", "$HOME"]
)
def test_a_printed_override_reads_back_as_the_value_in_the_shell_and_in_hydra(value):
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from mcn.shell import command

    printed = command("mcn.train", hydra_override("hydra.run.dir", value))
    words = subprocess.run(
        ["sh", "-c", f"printf '%s\\n' {printed.removeprefix('python -m mcn.train ')}"], capture_output=True, text=True
    ).stdout.splitlines()
    [override] = words
    assert OverridesParser.create().parse_override(override).value() == value
