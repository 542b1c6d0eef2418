"""Against a live one-node Slurm (scripts/slurm-local/start-slurm.sh; .ci/run starts it).

The production request (720 min, 32 GB, 4 CPUs, 1 GPU, partition gpu) goes through unchanged:
the local cluster advertises fake resources. Skipped where no cluster answers.
"""

import csv
import json
import os
import shutil
import subprocess
import sys
import time

import pytest

from mcn.train import run

from conftest import compose_cfg


def cluster_up() -> bool:
    if shutil.which("scontrol") is None:
        return False
    ping = subprocess.run(["scontrol", "ping"], capture_output=True, text=True)
    return "is UP" in ping.stdout


# .ci/run starts the cluster and sets MCN_REQUIRE_SLURM=1: there a missing cluster fails the tests, not skips them
pytestmark = [
    pytest.mark.slurm,
    pytest.mark.skipif(
        not cluster_up() and not os.environ.get("MCN_REQUIRE_SLURM"),
        reason="no Slurm cluster (scripts/slurm-local/start-slurm.sh)",
    ),
]
ENV = {**os.environ, "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1"}
SLURM = ["experiment=quickstart", "hydra/launcher=slurm", "logger=none", "trainer.progress_bar=false"]


def sweep(args, cwd, env=ENV):
    return subprocess.Popen(
        [sys.executable, "-m", "mcn.train", "-m", *args],
        cwd=cwd,
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )


def report_rows(folder, fusion):
    with open(next(folder.glob(f"fusion_{fusion}_report.csv"))) as f:
        return [{k: v for k, v in r.items() if k != "elapsed_s"} for r in csv.DictReader(f)]


def wait_for_epochs(root, fusion, n, timeout=120):
    """(job folder, Slurm job id) once the running job has validated `n` epochs."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        reports = list(root.glob(f"outputs/multirun/*/*/0_*/fusion_{fusion}_report.csv"))
        if reports and reports[0].read_text().count("\nval,") >= n:
            job_id = subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True).stdout.split()
            if job_id:
                return reports[0].parent, job_id[0]
        time.sleep(0.2)
    raise AssertionError(f"no job got to epoch {n}")


def test_card_sweep_over_four_fusion_types(tmp_path):
    fusions = ["multiplicative", "concatenation", "multiplicativeAddition", "TransformerBase"]
    proc = sweep([f"fusion={','.join(fusions)}", *SLURM, "trainer.epochs=2"], tmp_path)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-3000:]
    sweep_dir = next((tmp_path / "outputs" / "multirun").glob("*/*"))
    script = next(sweep_dir.glob(".submitit/*/*_submission.sh")).read_text()
    for line in (
        "--array=0-3",
        "--time=720",
        "--mem=32GB",
        "--cpus-per-task=4",
        "--gpus-per-node=1",
        "--partition=gpu",
    ):
        assert line in script
    for num, fusion in enumerate(fusions):
        job = next(sweep_dir.glob(f"{num}_fusion={fusion},*"))
        results = json.loads((job / f"fusion_training_results_{fusion}.json").read_text())
        assert results["epochs_run"] == 2 and (job / f"best_complete_fusion_{fusion}.pth").exists()
        assert (job / "experts" / "expert_3_epoch_2.pth").exists() and (
            job / "global" / "global_head_epoch_2.pth"
        ).exists()


@pytest.mark.parametrize("interrupt", ["scontrol requeue", "scancel --signal=USR2"])
def test_requeue_mid_training_loses_nothing(tmp_path, interrupt):
    overrides = ["fusion=multiplicative", "trainer.epochs=20", "trainer.save_every=5", "trainer.deterministic=true"]
    (tmp_path / "slurm").mkdir()
    proc = sweep([*overrides, *SLURM], tmp_path / "slurm")
    folder, job_id = wait_for_epochs(tmp_path / "slurm", "multiplicative", 3)
    subprocess.run([*interrupt.split(), job_id], check=True)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    log = (folder / "train.log").read_text()
    assert "resumed from" in log and log.count("best epoch") == 1
    # the same config, never interrupted, in this process
    straight = tmp_path / "straight"
    run(compose_cfg(tmp_path, [*overrides, "experiment=quickstart"]), str(straight))
    rows = report_rows(folder, "multiplicative")
    assert [(r["phase"], r["epoch"]) for r in rows if r["phase"] != "test"] == [
        (phase, str(e)) for e in range(1, 21) for phase in ("train", "val")
    ]
    assert rows == report_rows(straight, "multiplicative")
    ours = json.loads((folder / "fusion_training_results_multiplicative.json").read_text())
    theirs = json.loads((straight / "fusion_training_results_multiplicative.json").read_text())
    for key in ("best_epoch", "best_val_accuracy", "test_accuracy", "expert_test_accuracy", "ensemble_test_accuracy"):
        assert ours[key] == theirs[key], key


def test_scancel_fails_the_sweep_cleanly_and_a_relaunch_resumes(tmp_path):
    overrides = ["fusion=multiplicative", "trainer.epochs=20", "trainer.deterministic=true", *SLURM]
    proc = sweep(overrides, tmp_path)
    folder, job_id = wait_for_epochs(tmp_path, "multiplicative", 2)
    subprocess.run(["scancel", job_id], check=True)
    out, _ = proc.communicate(timeout=180)
    assert proc.returncode == 2 and "mcn: error: a sweep job ended without a result" in out, out[-2000:]
    assert "Traceback" not in out
    done = [r["epoch"] for r in report_rows(folder, "multiplicative") if r["phase"] == "val"]
    # the same sweep folder again: the job finds its state and finishes, each epoch once
    proc = sweep([*overrides, f"hydra.sweep.dir={folder.parent}"], tmp_path)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-2000:]
    assert "resumed from" in (folder / "train.log").read_text()
    epochs = [r["epoch"] for r in report_rows(folder, "multiplicative") if r["phase"] == "val"]
    assert epochs == [str(e) for e in range(1, 21)] and len(done) >= 2


def test_time_limit_requeues_and_resumes(tmp_path):
    """A real time limit: 1 minute, USR2 20 s before it; the job is requeued and resumes.
    Slurm fires USR2 24-40 s into the minute and each start spends ~12 s importing and loading, so
    80 epochs (~36 s of training) always outlast the first run and take 2 to 4 runs; up to 10 requeues are allowed."""
    proc = sweep(
        [
            "fusion=multiplicative",
            "trainer.epochs=80",
            "trainer.save_every=40",
            *SLURM,
            "hydra.launcher.timeout_min=1",
            "hydra.launcher.signal_delay_s=20",
            "hydra.launcher.max_num_timeout=10",
        ],
        tmp_path,
    )
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-2000:]
    folder = next(tmp_path.glob("outputs/multirun/*/*/0_*"))
    log = (folder / "train.log").read_text()
    assert "caught SIGUSR2" in log and "resumed from" in log
    epochs = [r["epoch"] for r in report_rows(folder, "multiplicative") if r["phase"] == "val"]
    assert epochs == [str(e) for e in range(1, 81)]


def test_impossible_request_surfaces_sbatch_message(tmp_path):
    proc = sweep(["fusion=multiplicative", *SLURM, "hydra.launcher.gpus_per_node=16"], tmp_path)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 2
    assert "mcn: error: Slurm refused the sweep: sbatch: error: Batch job submission failed" in out
    assert "Traceback" not in out


def test_no_sbatch_names_the_local_launcher(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "mcn.train", "-m", "fusion=multiplicative"],
        cwd=tmp_path,
        text=True,
        capture_output=True,
        env={**ENV, "PATH": os.path.dirname(sys.executable)},
    )
    assert proc.returncode == 2 and "add hydra/launcher=local" in proc.stderr and "Traceback" not in proc.stderr


def test_two_task_job_trains_with_gloo_and_one_process_writes(tmp_path):
    proc = sweep(
        [
            "fusion=multiplicative",
            "experiment=quickstart",
            "hydra/launcher=slurm",
            "trainer.progress_bar=false",
            "trainer.epochs=3",
            "trainer.save_every=3",
            "hydra.launcher.tasks_per_node=2",
        ],
        tmp_path,
        env={**ENV, "WANDB_MODE": "offline"},
    )
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-3000:]
    sweep_dir = next((tmp_path / "outputs" / "multirun").glob("*/*"))
    job = next(sweep_dir.glob("0_fusion=multiplicative*"))
    assert "--ntasks-per-node=2" in next(sweep_dir.glob(".submitit/*/*_submission.sh")).read_text()
    assert len(list(sweep_dir.glob(".submitit/*/*_1_log.out"))) == 1  # the second task ran
    log = (job / "train.log").read_text()
    assert "processes=2" in log and log.count("epoch 3/3") == 1  # progress logged by rank 0 only
    rows = report_rows(job, "multiplicative")
    assert [(r["phase"], r["epoch"]) for r in rows if r["phase"] != "test"] == [
        (p, str(e)) for e in (1, 2, 3) for p in ("train", "val")
    ]
    train_loss = [float(r["loss"]) for r in rows if r["phase"] == "train"]
    assert train_loss[-1] < train_loss[0]  # it trains
    assert len(list(job.glob("wandb/offline-run-*"))) == 1  # one tracker run: only rank 0 writes
    assert json.loads((job / "fusion_training_results_multiplicative.json").read_text())["runtime"].endswith(
        "processes=2"
    )
