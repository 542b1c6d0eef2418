"""Experiment tracking through the CLI: an offline wandb run that is interrupted and resumed is one run, and the
sync command it prints names every offline folder of it, quoted so that it can be pasted into a POSIX shell."""

import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

from mcn.files import read_status

OFFLINE = [
    "experiment=quickstart",
    "logger=wandb",
    "logger.mode=offline",
    "trainer.epochs=3",
    "trainer.save_every=1",
    "trainer.batch_size=64",
    "trainer.progress_bar=false",
    "probe.enabled=false",
]
ENV = {**os.environ, "WANDB_MODE": "offline", "PYTHONUNBUFFERED": "1"}


def hint(output: str) -> str:
    lines = [line for line in output.splitlines() if "wandb: offline run in" in line]
    assert len(lines) == 1, output[-3000:]
    return lines[0]


def test_an_interrupted_offline_run_resumes_as_one_run_with_one_sync_command(tmp_path):
    run_dir = tmp_path / "a run's folder"  # a space and a quote: the command must still paste
    args = [sys.executable, "-m", "mcn.train", *OFFLINE, f'hydra.run.dir="{run_dir}"']  # quoted for Hydra
    first = subprocess.Popen(args, cwd=tmp_path, env=ENV, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while time.time() < deadline and (read_status(run_dir / "run_status.json") or {}).get("epoch", 0) < 1:
        time.sleep(0.05)
    first.send_signal(signal.SIGINT)
    out, err = first.communicate(timeout=300)
    assert first.returncode == 130, err[-3000:]
    run_id = (run_dir / "wandb_run_id.txt").read_text().strip()
    (folder,) = run_dir.glob("wandb/offline-run-*")
    assert shlex.split(hint(out + err).split("to upload it later: ", 1)[1]) == ["wandb", "sync", str(folder)]

    resumed = subprocess.run(args, cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Traceback" not in resumed.stdout + resumed.stderr
    assert (run_dir / "wandb_run_id.txt").read_text().strip() == run_id  # the same tracker run
    folders = sorted(run_dir.glob("wandb/offline-run-*"))
    assert len(folders) == 2 and all(f.name.endswith(f"-{run_id}") for f in folders)
    assert all((f / f"run-{run_id}.wandb").is_file() for f in folders)

    line = hint(resumed.stdout + resumed.stderr)
    assert f"(run {run_id} has 2 offline folders, one per start); to upload them as one run: " in line
    command = line.split("to upload them as one run: ", 1)[1]
    assert shlex.split(command) == ["wandb", "sync", *map(str, folders)]  # every folder, oldest first
    # pasted into a shell, as is: wandb's own dry run lists both folders' logs as the run to upload
    venv_bin = str(Path(sys.executable).parent)
    dry = subprocess.run(
        ["sh", "-c", f"{command} --dry-run"],
        cwd=tmp_path,
        env={**ENV, "PATH": f"{venv_bin}:{ENV['PATH']}"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert dry.returncode == 0, dry.stderr
    assert "Would sync 2 run(s)" in dry.stderr + dry.stdout
    assert all(f"{f.name}/run-{run_id}.wandb" in dry.stderr + dry.stdout for f in folders)
