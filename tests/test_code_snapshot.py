"""What runs is what was submitted (mcn.files.code): every run records its code version, a sweep's jobs import and
compose from the copy of the code made when it was submitted, and `mcn.sweep status` names the jobs that ran other
code than the sweep's latest submission. The live-cluster side (a held job, edited code, release, retry) is in
tests/test_slurm.py. Every test edits a copy of the checkout, never the checkout."""

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

import mcn
from mcn.files.code import checkout_version, code_hash

from helpers import copy_checkout

LOCAL = ["experiment=quickstart", "logger=none", "trainer.progress_bar=false", "trainer.epochs=1", "sweep.name=frozen"]


def git(repo: Path, *args: str) -> None:
    subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=repo, check=True, capture_output=True
    )


def committed_copy(tmp_path: Path) -> Path:
    """A copy of the checkout's code and config, committed to a git repository of its own."""
    repo = copy_checkout(tmp_path / "checkout")
    (repo / ".gitignore").write_text("outputs/\n__pycache__/\n")
    git(repo, "init", "-q")
    git(repo, "add", ".")
    git(repo, "commit", "-q", "-m", "copy")
    return repo


def run(repo: Path, module: str, *args: str) -> subprocess.CompletedProcess:
    """`python -m module args` in `repo`, which it imports from (the working directory comes first on sys.path)."""
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1"}
    env.pop("PYTHONSAFEPATH", None)
    return subprocess.run(
        [sys.executable, "-m", module, *args], cwd=repo, env=env, capture_output=True, text=True, timeout=600
    )


def test_code_version_names_the_commit_and_uncommitted_changes_or_no_checkout(tmp_path):
    repo = committed_copy(tmp_path)
    clean = checkout_version(repo)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True).stdout.strip()
    assert (clean["git_commit"], clean["git_dirty"], clean["hash"]) == (commit, False, code_hash(repo))
    with open(repo / "conf" / "experiment" / "quickstart.yaml", "a") as f:
        f.write("# edited\n")
    dirty = checkout_version(repo)
    assert dirty["git_dirty"] is True and dirty["git_commit"] == commit and dirty["hash"] != clean["hash"]
    bare = checkout_version(copy_checkout(tmp_path / "bare"))
    assert bare["git_commit"] is None and bare["git_dirty"] is None and bare["hash"] == clean["hash"]


def test_local_sweep_jobs_run_their_snapshot_and_status_names_jobs_of_older_code(tmp_path):
    repo = committed_copy(tmp_path)
    first = run(repo, "mcn.train", "-m", "fusion=multiplicative", *LOCAL)
    assert first.returncode == 0, first.stderr[-3000:]
    sweep = repo / "outputs" / "multirun" / "frozen"
    manifest = json.loads((sweep / "sweep.json").read_text())
    snapshot = sweep / ".code" / manifest["code"]
    assert f"mcn: the jobs run code {manifest['code']} (mcn {mcn.__version__}, git " in first.stdout
    assert f" from {snapshot}, not the checkout\n" in first.stdout
    job = sweep / manifest["jobs"][0]["folder"]
    assert (
        "mcn: job #0 done: best val " in first.stdout and f"at epoch 1 of 1 ({job.relative_to(repo)})\n" in first.stdout
    )
    code = json.loads((job / "run_status.json").read_text())["code"]
    assert code["path"] == str(snapshot) and code["hash"] == manifest["code"] == code_hash(repo)
    assert code["git_dirty"] is False and code["source"] == str(repo)
    sources = yaml.safe_load((job / ".hydra" / "hydra.yaml").read_text())["hydra"]["runtime"]["config_sources"]
    assert str(snapshot / "conf") in [s["path"] for s in sources]  # the job composed its config from the copy
    assert json.loads((job / "fusion_training_results_multiplicative.json").read_text())["code"] == code

    quickstart = repo / "conf" / "experiment" / "quickstart.yaml"
    quickstart.write_text(quickstart.read_text().replace("  batch_size: 64 ", "  batch_size: 32 "))
    second = run(repo, "mcn.train", "-m", "fusion=multiplicative,concatenation", *LOCAL)
    assert second.returncode == 0, second.stderr[-3000:]
    latest = json.loads((sweep / "sweep.json").read_text())
    assert latest["code"] != manifest["code"] and sorted(p.name for p in (sweep / ".code").iterdir()) == sorted(
        [manifest["code"], latest["code"]]
    )
    added = sweep / latest["jobs"][1]["folder"]
    assert yaml.safe_load((added / ".hydra" / "config.yaml").read_text())["trainer"]["batch_size"] == 32

    status = run(repo, "mcn.sweep", "status", str(sweep))
    assert status.returncode == 0, status.stderr
    lines = status.stdout.splitlines()
    row = lines.index(next(line for line in lines if line.split()[:1] == ["0"]))
    assert lines[row + 1] == (
        f"     code: {manifest['code']} (mcn {mcn.__version__}, git {code['git_commit'][:7]}), not the sweep's latest "
        f"{latest['code']} (mcn {mcn.__version__}, git {code['git_commit'][:7]}, uncommitted changes)"
    )
    assert sum(line.lstrip().startswith("code:") for line in lines) == 1  # job 1 ran the sweep's latest code


def test_resuming_with_edited_code_says_so(tmp_path):
    repo = copy_checkout(tmp_path / "checkout")
    run_dir = tmp_path / "run"
    args = ["experiment=quickstart", "logger=none", "trainer.progress_bar=false", f"hydra.run.dir={run_dir}"]
    first = run(repo, "mcn.train", *args, "trainer.epochs=1")
    assert first.returncode == 0, first.stderr[-3000:]
    before = json.loads((run_dir / "run_status.json").read_text())["code"]
    with open(repo / "mcn" / "training" / "loop.py", "a") as f:
        f.write("# edited\n")
    resumed = run(repo, "mcn.train", *args, "trainer.epochs=2", "trainer.resume=force")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    now = json.loads((run_dir / "run_status.json").read_text())["code"]
    assert now["hash"] == code_hash(repo) != before["hash"]
    version = f"mcn {mcn.__version__}, not a git checkout"
    assert (
        f"resuming with other code: its epochs so far ran {before['hash']} ({version}), this process runs "
        f"{now['hash']} ({version})\n" in resumed.stdout
    )
