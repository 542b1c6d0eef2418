"""Faults a user meets, each through the real CLI: one expert, divergence, starting over, foreign expert files,
a full disk, a read-only folder, Ctrl-C, malformed arguments, tracker chatter. Each ends in one clear line (or
runs to the end), never a traceback, a silently wrong result, mixed runs or half-written files."""

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from mcn.data.datasets import DEBIAN_FASHION_MNIST
from mcn.files import TEMP_PATTERN, read_csv, read_status
from mcn.models import create_expert, list_fusions

from helpers import pretrain_experts, read_only_folder, run_cli

QUICK = ["experiment=quickstart", "logger=none", "trainer.progress_bar=false"]


def said(proc: subprocess.CompletedProcess, text: str) -> list[str]:
    """Lines of the whole terminal output (stdout and stderr) that contain `text`."""
    return [line for line in (proc.stdout + proc.stderr).splitlines() if text in line]


def error_line(proc: subprocess.CompletedProcess) -> str:
    """The one error line; no traceback, nothing printed twice."""
    assert "Traceback" not in proc.stdout + proc.stderr, proc.stderr[-2000:]
    lines = said(proc, "error")
    assert len(lines) == 1, lines
    assert lines[0].startswith("mcn: error: ") and lines[0] in proc.stderr
    return lines[0]


def temp_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if TEMP_PATTERN.match(p.name)]


def strict_json(path: Path):
    def refuse(constant):
        raise ValueError(f"{path} holds {constant}")

    return json.loads(path.read_text(), parse_constant=refuse)


def test_one_expert_runs_to_the_end_for_every_fusion_type(tmp_path):
    fusions = list_fusions()
    proc = run_cli(["-m", f"fusion={','.join(fusions)}", *QUICK, "experts.num=1", "trainer.epochs=1"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = sorted(tmp_path.glob("outputs/multirun/*/*/*fusion=*"))
    assert len(jobs) == len(fusions)
    for job in jobs:
        fusion = job.name.split("fusion=")[1].split(",")[0]
        results = strict_json(job / f"fusion_training_results_{fusion}.json")
        assert len(results["expert_test_accuracy"]) == 1 and results["test_accuracy"] is not None
        # what needs two experts is undefined, everywhere
        assert results["ensemble_test_accuracy"] is None and results["oracle_test_accuracy"] is None
        assert results["initial_ensemble_test_accuracy"] is None
        assert {r["ensemble_accuracy"] for r in read_csv(job / f"fusion_{fusion}_report.csv")} == {""}
        assert "logit average undefined with one expert" in (job / "train.log").read_text()
    summary = run_cli([str(jobs[0].parent)], tmp_path, module="mcn.evaluate")
    assert summary.returncode == 0 and f"{len(fusions)} finished runs in {len(fusions)} groups" in summary.stdout
    listing = run_cli(
        ["--checkpoint_dir", str(jobs[0]), "--action", "load_complete"], tmp_path, module="mcn.components"
    )
    assert listing.returncode == 0 and "logit average, oracle: undefined with one expert" in listing.stdout
    robust = run_cli([str(jobs[0])], tmp_path, module="mcn.robustness")  # no logit average to test: none is listed
    assert robust.returncode == 0, robust.stderr[-2000:]
    models = {r["model_type"] for r in read_csv(next(jobs[0].glob("robustness_*.csv")))}
    assert models == {"fusion", "expert"}


def test_divergence_stops_in_its_epoch_with_one_line_and_a_failed_status(tmp_path):
    run_dir = tmp_path / "run"
    proc = run_cli(
        [*QUICK, "optim.base_lr=1e9", "optim.head_lr=1e9", "trainer.epochs=5", f"hydra.run.dir={run_dir}"], tmp_path
    )
    assert proc.returncode == 1
    line = error_line(proc)
    assert "training diverged in epoch 1: the training loss is nan" in line
    assert "optim.base_lr=1e+09, optim.head_lr=1e+09" in line and "lower the learning rates" in line
    assert [r["epoch"] for r in read_csv(run_dir / "fusion_multiplicative_report.csv")] == ["1", "1"]
    assert not (run_dir / "fusion_training_results_multiplicative.json").exists()
    assert (
        not (run_dir / "train_state.pth").exists()
        and not (run_dir / "best_complete_fusion_multiplicative.pth").exists()
    )
    for path in run_dir.rglob("*.json"):  # valid JSON: no NaN, no Infinity
        strict_json(path)
    status = read_status(run_dir / "run_status.json")
    assert status["state"] == "failed" and status["error"] == line.removeprefix("mcn: error: ")
    report = run_cli([str(tmp_path)], tmp_path, module="mcn.evaluate")
    assert report.returncode == 0 and "| multiplicative | failed |" in report.stdout
    assert "training diverged in epoch 1" in report.stdout


def test_starting_over_moves_the_earlier_run_aside(tmp_path):
    run_dir = tmp_path / "run"
    first = run_cli([*QUICK, "trainer.epochs=3", "trainer.save_every=1", f"hydra.run.dir={run_dir}"], tmp_path)
    assert first.returncode == 0, first.stderr[-2000:]
    again = run_cli(
        [*QUICK, "trainer.epochs=1", "trainer.resume=never", "seed=7", f"hydra.run.dir={run_dir}"], tmp_path
    )
    assert again.returncode == 0, again.stderr[-2000:]
    rows = read_csv(run_dir / "fusion_multiplicative_report.csv")
    assert [(r["phase"], r["epoch"]) for r in rows] == [("train", "1"), ("val", "1"), ("test", "1")]
    assert sorted(p.name for p in (run_dir / "global").iterdir()) == ["global_head_epoch_1.pth"]
    earlier = list((run_dir / ".earlier_runs").iterdir())
    assert len(earlier) == 1 and (earlier[0] / "global" / "global_head_epoch_3.pth").exists()
    assert len(said(again, "the earlier run in")) == 1
    old = run_cli(
        ["--checkpoint_dir", str(run_dir), "--action", "reconstruct", "--epoch", "3"], tmp_path, module="mcn.components"
    )
    assert old.returncode == 2 and "no expert saved at epoch 3" in error_line(old) and "saved epochs: [1]" in old.stderr
    summary = run_cli([str(tmp_path)], tmp_path, module="mcn.evaluate")
    assert "1 finished runs in 1 groups" in summary.stdout  # the moved run is not a run of this folder any more


@pytest.fixture(scope="module")
def digits_experts(tmp_path_factory):
    """Four experts pretrained for one epoch on digits, in mcn's format."""
    return pretrain_experts(tmp_path_factory.mktemp("experts"), epochs=1)


@pytest.mark.skipif(
    not DEBIAN_FASHION_MNIST.is_dir() and not os.environ.get("CI"),
    reason="needs Fashion-MNIST (apt-get install dataset-fashion-mnist; .ci/run installs it)",
)
def test_experts_of_another_data_set_are_refused_for_the_real_reason(tmp_path, digits_experts):
    proc = run_cli([*QUICK, "data=fashion_mnist", f"experts.dir={digits_experts}"], tmp_path)
    assert proc.returncode == 2
    assert "was trained on digits, but this run uses fashion_mnist" in error_line(proc)


def test_bare_state_dicts_are_checked_and_what_cannot_be_is_said_once(tmp_path, digits_experts):
    bare = tmp_path / "bare"
    bare.mkdir()
    for i in range(4):
        ckpt = torch.load(digits_experts / f"best_wrn_expert_{i}.pth", weights_only=True)
        torch.save({"model_state_dict": ckpt["state_dict"]}, bare / f"best_wrn_expert_{i}.pth")
    proc = run_cli([*QUICK, f"experts.dir={bare}", "trainer.epochs=1"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    warnings = said(proc, "without mcn's metadata")
    assert (
        len(warnings) == 1 and "data set, split and holdout they were trained on could not be verified" in warnings[0]
    )
    wider = tmp_path / "wider"  # a shape that does not fit is refused, whatever the format
    wider.mkdir()
    for i in range(4):
        torch.save(create_expert("wrn10_1", 100, 1).state_dict(), wider / f"best_wrn_expert_{i}.pth")
    refused = run_cli([*QUICK, f"experts.dir={wider}"], tmp_path)
    assert refused.returncode == 2 and "shape of classifier.weight is [100, 64] in the file" in error_line(refused)


def test_an_expert_copied_out_of_a_fusion_run_is_refused_as_such(tmp_path, digits_experts):
    run_dir = tmp_path / "run"
    done = run_cli([*QUICK, "trainer.epochs=1", f"experts.dir={digits_experts}", f"hydra.run.dir={run_dir}"], tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    copied = tmp_path / "copied"
    copied.mkdir()
    for i in range(4):
        (copied / f"best_wrn_expert_{i}.pth").write_bytes(
            (run_dir / "experts" / f"expert_{i}_epoch_1.pth").read_bytes()
        )
    proc = run_cli([*QUICK, f"experts.dir={copied}"], tmp_path)
    line = error_line(proc)
    assert "was saved by a multiplicative fusion run (epoch 1): it has trained on the fusion holdout" in line
    assert "split None" not in line


@pytest.fixture
def small_disk(tmp_path):
    """A 40 MB tmpfs (needs root, as .ci/run has); skipped where mounting is not allowed."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=40m", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_full_disk_ends_with_one_line_leaves_no_temp_file_and_resumes_once_freed(tmp_path, small_disk):
    run_dir = small_disk / "run"
    ballast = small_disk / "ballast"
    # an epoch's files take ~8 MB (four experts, complete model, train state with Adam's moments): 8 MB left
    ballast.write_bytes(b"\0" * (32 * 2**20))
    args = [*QUICK, "trainer.epochs=4", "trainer.save_every=1", f"hydra.run.dir={run_dir}"]
    full = run_cli(args, tmp_path)
    assert full.returncode == 1
    line = error_line(full)
    assert f"cannot write {run_dir}" in line and "no space left on device" in line
    assert "free space" in line and "run the same command again" in line
    assert temp_files(small_disk) == []
    status = read_status(run_dir / "run_status.json")  # the failed write's partial file is gone: there is room
    assert status["state"] == "failed" and status["error"] == line.removeprefix("mcn: error: ")
    ballast.unlink()
    resumed = run_cli(args, tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert temp_files(small_disk) == []
    rows = read_csv(run_dir / "fusion_multiplicative_report.csv")
    assert [(r["phase"], r["epoch"]) for r in rows if r["phase"] != "test"] == [
        (p, str(e)) for e in range(1, 5) for p in ("train", "val")
    ]


def test_read_only_folder_is_named_with_its_cause(tmp_path):
    with read_only_folder(tmp_path / "ro") as read_only:
        proc = run_cli([*QUICK, f"paths.output_root={read_only}", f"hydra.run.dir={tmp_path / 'run'}"], tmp_path)
    assert proc.returncode == 1
    line = error_line(proc)
    assert f"cannot write {read_only}/splits/digits_iid_k4_split42/" in line and "read-only file system" in line


def test_ctrl_c_says_where_the_last_good_state_is_and_resume_finishes(tmp_path):
    run_dir = tmp_path / "run"
    args = [*QUICK, "trainer.epochs=40", "trainer.save_every=5", f"hydra.run.dir={run_dir}"]
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "mcn.train", *args],
        cwd=tmp_path,
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    deadline = time.time() + 120
    while time.time() < deadline:
        status = read_status(run_dir / "run_status.json") or {}
        if status.get("epoch", 0) >= 2:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    interrupted = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    assert proc.returncode == 130
    line = error_line(interrupted)
    saved = read_status(run_dir / "run_status.json")["epoch"]
    assert (
        f"interrupted (Ctrl-C) during epoch {saved + 1}; epoch {saved} is saved in {run_dir / 'train_state.pth'}"
        in line
    )
    assert (
        f"continue with: cd {shlex.quote(str(tmp_path))} && python -m mcn.train {' '.join(args)}" in line
        and temp_files(run_dir) == []
    )
    assert read_status(run_dir / "run_status.json")["state"] == "interrupted"
    resumed = run_cli(args, tmp_path)
    assert resumed.returncode == 0 and said(resumed, f"resumed from {run_dir / 'train_state.pth'} after epoch {saved}")
    epochs = [r["epoch"] for r in read_csv(run_dir / "fusion_multiplicative_report.csv") if r["phase"] == "val"]
    assert epochs == [str(e) for e in range(1, 41)]


@pytest.mark.parametrize(
    "module,args,expected",
    [
        ("mcn.components", ["--action", "list"], "the following arguments are required: --checkpoint_dir"),
        ("mcn.components", ["--checkpoint_dir", ".", "--action", "lst"], "argument --action: invalid choice: 'lst'"),
        (
            "mcn.components",
            ["--checkpoint_dir", ".", "--action", "reconstruct", "--expert_epochs", "1,x"],
            "'1,x' is not a comma-separated list of epochs",
        ),
        ("mcn.components", ["--checkpoint_dir", ".", "--action", "list", "--epoch", "ten"], "invalid int value: 'ten'"),
        ("mcn.evaluate", [], "the following arguments are required: sweep"),
        ("mcn.sweep", ["stat", "."], "argument command: invalid choice: 'stat'"),
        ("mcn.sweep", ["status", ".", "--watch", "soon"], "argument --watch: invalid float value: 'soon'"),
        ("mcn.robustness", [], "the following arguments are required"),
        ("mcn.robustness", [".", "--batch_size", "many"], "argument --batch_size: invalid int value: 'many'"),
        ("mcn.evaluate", ["a", "b"], "unrecognized arguments: b"),
        ("mcn.train", [*QUICK, "trainer.epochs=zero"], "trainer.epochs='zero' must be a whole number >= 0"),
        ("mcn.experts", [*QUICK, "pretrain.index=9"], "pretrain.index=9 is outside 0..3"),
        (
            "mcn.train",
            [*QUICK, "expert=timm", "expert.name=test_vit"],
            "expert timm/test_vit cannot take the data's 1x8x8",
        ),
    ],
)
def test_malformed_arguments_get_one_line(tmp_path, module, args, expected):
    proc = run_cli(args, tmp_path, module=module)
    assert proc.returncode == 2 and expected in error_line(proc)


def test_tracking_says_where_its_offline_run_lies_in_one_line(tmp_path):
    env_args = ["experiment=quickstart", "logger=wandb", "trainer.epochs=1", "trainer.progress_bar=false"]
    proc = subprocess.run(
        [sys.executable, "-m", "mcn.train", *env_args],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={**os.environ, "WANDB_MODE": "offline"},
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = said(proc, "wandb")
    assert len(lines) == 1 and "offline run in" in lines[0] and "wandb sync" in lines[0]
    assert Path(lines[0].rsplit("wandb sync ", 1)[1]).is_dir()  # its files are kept
