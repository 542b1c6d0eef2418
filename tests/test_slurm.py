"""Against a live one-node Slurm (scripts/slurm-local/start-slurm.sh; .ci/run starts it).

The sweeps are experiment=quickstart's, whose request (30 min, 4 GB, 2 CPUs, no GPU, the default partition;
conf/hydra/launcher/slurm_request/) goes through unchanged. A sweep is submitted and the command returns; tests
that need the jobs' results follow them with `python -m mcn.sweep status --watch` or launch with
hydra.launcher.wait=true. Skipped where no cluster answers.
"""

import csv
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from mcn.files import lock
from mcn.train import run

from helpers import ROOT, compose_cfg, copy_checkout, pretrain_experts, snapshot


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


def skip_unless_required(reason: str) -> None:
    """Skip where the cluster lacks a setup a test needs; under .ci/run (MCN_REQUIRE_SLURM=1) that is a failure."""
    if os.environ.get("MCN_REQUIRE_SLURM"):
        pytest.fail(f"MCN_REQUIRE_SLURM=1 but {reason}")
    pytest.skip(reason)


SLURM = ["experiment=quickstart", "hydra/launcher=slurm", "logger=none", "trainer.progress_bar=false"]
# the run that gets interrupted, and its uninterrupted twin (`straight`)
LONG = ["fusion=multiplicative", "trainer.epochs=40", "trainer.save_every=10", "trainer.deterministic=true"]
# a Slurm job and the in-process run it is compared with compute alike: same threads, precision and memory format
LONG += ["trainer.num_threads=1", "trainer.precision=fp32", "trainer.channels_last=false"]
START_SLURM = ROOT / "scripts" / "slurm-local" / "start-slurm.sh"
# experiment=quickstart's Slurm request as sbatch lines: every submission must carry it, and no GPU or partition
REQUEST = ("--time=30", "--mem=4GB", "--cpus-per-task=2")


def sweep(args, cwd, env=ENV):
    return subprocess.Popen(
        [sys.executable, "-m", "mcn.train", "-m", *args],
        cwd=cwd,
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )


def submit(args, cwd):
    """Launch a sweep that submits and returns: (its output, the sweep folder it printed)."""
    proc = sweep(args, cwd)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out[-3000:]
    return out, cwd / re.search(r"mcn: sweep folder (\S+);", out).group(1)


def sweep_cli(*args, cwd, timeout=60):
    return subprocess.run(
        [sys.executable, "-m", "mcn.sweep", *map(str, args)],
        cwd=cwd,
        env=ENV,
        text=True,
        capture_output=True,
        timeout=timeout,
    )


def last_screen(out):
    """What `status --watch` showed last: the text after its final clear-screen."""
    return out.split("\033[2J")[-1]


def follow(folder, cwd, timeout=400):
    """`status --watch` until no job is queued or running: the final table's rows {job number: columns}."""
    proc = sweep_cli("status", folder, "--watch", "1", cwd=cwd, timeout=timeout)
    table = last_screen(proc.stdout).splitlines()
    rows = {int(line.split()[0]): line.split() for line in table if re.match(r"\s+\d+\s", line)}
    return proc, rows


def report_rows(folder, fusion):
    with open(next(folder.glob(f"fusion_{fusion}_report.csv"))) as f:
        return [{k: v for k, v in r.items() if k != "elapsed_s"} for r in csv.DictReader(f)]


def val_epochs(folder, fusion="multiplicative"):
    return [r["epoch"] for r in report_rows(folder, fusion) if r["phase"] == "val"]


def wait_for_epochs(root, n, pattern="0_*", fusion="multiplicative", timeout=120):
    """(job folder, Slurm job id) once the job running in `pattern` has validated `n` epochs."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        reports = list(root.glob(f"**/multirun/**/{pattern}/fusion_{fusion}_report.csv"))
        if reports and reports[0].read_text().count("\nval,") >= n:
            status = json.loads((reports[0].parent / "run_status.json").read_text())
            return reports[0].parent, status["slurm_job_id"]
        time.sleep(0.2)
    raise AssertionError(f"no job got to epoch {n}")


def slurm_records(job_id, until=None, timeout=30):
    """Every accounting record of a job, requeues included: [state, ...], oldest first; with `until`, once the
    newest one is that state (sacct records arrive asynchronously)."""
    deadline = time.time() + timeout
    while True:
        out = subprocess.run(
            ["sacct", "-n", "-P", "-X", "--duplicates", "-j", job_id, "-o", "State"], capture_output=True, text=True
        ).stdout
        records = [line.split()[0] for line in out.splitlines()]
        if until is None or records[-1:] == [until] or time.time() > deadline:
            return records
        time.sleep(0.5)


def processes_in(folder):
    """Command lines of the processes whose working directory is `folder`."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if os.readlink(f"/proc/{pid}/cwd") == str(folder):
                found.append(Path(f"/proc/{pid}/cmdline").read_text().replace("\0", " "))
        except OSError:
            pass
    return found


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """The LONG run, never interrupted, in this process: what every interrupted run must end as."""
    tmp = tmp_path_factory.mktemp("straight")
    run(compose_cfg(tmp, [*LONG, "experiment=quickstart"]), str(tmp / "run"))
    return tmp / "run"


def assert_same_run(folder, straight):
    """Each epoch once, and the CSV and final metrics of the uninterrupted run."""
    rows = report_rows(folder, "multiplicative")
    assert [(r["phase"], r["epoch"]) for r in rows if r["phase"] != "test"] == [
        (phase, str(e)) for e in range(1, 41) for phase in ("train", "val")
    ]
    assert rows == report_rows(straight, "multiplicative")
    ours = json.loads((folder / "fusion_training_results_multiplicative.json").read_text())
    theirs = json.loads((straight / "fusion_training_results_multiplicative.json").read_text())
    for key in ("best_epoch", "best_val_accuracy", "test_accuracy", "expert_test_accuracy", "ensemble_test_accuracy"):
        assert ours[key] == theirs[key], key


def test_sweep_returns_at_once_and_status_follows_it_to_the_end(tmp_path):
    fusions = ["multiplicative", "concatenation", "multiplicativeAddition", "TransformerBase"]
    out, sweep_dir = submit([f"fusion={','.join(fusions)}", *SLURM, "trainer.epochs=2"], tmp_path)
    array = re.search(r"mcn: submitted 4 jobs to Slurm as array (\d+)\n", out).group(1)
    assert f"python -m mcn.sweep status {sweep_dir.relative_to(tmp_path)} --watch" in out
    # back at the prompt while the jobs are still queued or running, and nothing of the command left behind
    queued = subprocess.run(["squeue", "-h", "-r", "-j", array, "-o", "%i %T"], capture_output=True, text=True)
    assert len(queued.stdout.splitlines()) == 4, queued.stdout
    assert not [cmd for cmd in processes_in(tmp_path) if "mcn.train" in cmd]
    now = sweep_cli("status", sweep_dir, cwd=tmp_path)  # two epochs take a while: some are still to come
    assert now.returncode == 0 and ("PENDING" in now.stdout or "RUNNING" in now.stdout), now.stdout + now.stderr

    proc, rows = follow(sweep_dir, tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr
    assert [rows[n][1:4] for n in range(4)] == [[f"{array}_{n}", "COMPLETED", "2/2"] for n in range(4)]
    script = next(sweep_dir.glob(".submitit/*/*_submission.sh")).read_text()
    for line in ("--array=0-3", *REQUEST):
        assert line in script
    assert "--gpus" not in script and "--partition" not in script
    for num, fusion in enumerate(fusions):
        job = next(sweep_dir.glob(f"{num}_fusion={fusion},*"))
        results = json.loads((job / f"fusion_training_results_{fusion}.json").read_text())
        assert results["epochs_run"] == 2 and (job / f"best_complete_fusion_{fusion}.pth").exists()
        assert rows[num][4] == f"{results['best_val_accuracy']:.4f}"
        assert (job / "experts" / "expert_3_epoch_2.pth").exists() and (
            job / "global" / "global_head_epoch_2.pth"
        ).exists()


def preempt(job_id):
    """A job of the higher-priority partition that needs the whole node: Slurm requeues ours (SIGTERM, no USR2)."""
    if not subprocess.run(["sinfo", "-h", "-p", "urgent"], capture_output=True, text=True).stdout:
        skip_unless_required("no `urgent` partition (start-slurm.sh with SLURM_LOCAL_URGENT_PARTITION=urgent)")
    subprocess.run(
        ["sbatch", "-p", "urgent", "--exclusive", "--mem=1G", "-o", "/dev/null", "--wrap", "sleep 1"], check=True
    )


def node_down(job_id):
    """The job's node goes down (Slurm requeues the job: NODE_FAIL), then comes back."""
    node = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%N"], capture_output=True, text=True).stdout.strip()
    subprocess.run(["scontrol", "update", f"nodename={node}", "state=down", "reason=mcn-test"], check=True)
    deadline = time.time() + 60
    while "NODE_FAIL" not in slurm_records(job_id) and time.time() < deadline:
        time.sleep(0.5)
    # ReturnToService=2 may have brought it back already (then Slurm refuses the update)
    subprocess.run(["scontrol", "update", f"nodename={node}", "state=resume"], capture_output=True)


INTERRUPTS = {
    "scontrol requeue": lambda job_id: subprocess.run(["scontrol", "requeue", job_id], check=True),
    "scancel --signal=USR2": lambda job_id: subprocess.run(["scancel", "--signal=USR2", job_id], check=True),
    "preemption": preempt,
    "node down": node_down,
}


@pytest.mark.parametrize("interrupt", list(INTERRUPTS))
def test_interrupted_job_resumes_and_ends_as_if_never_interrupted(tmp_path, interrupt, straight):
    proc = sweep([*LONG, *SLURM, "hydra.launcher.wait=true"], tmp_path)
    folder, job_id = wait_for_epochs(tmp_path, 3)
    INTERRUPTS[interrupt](job_id)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    log = (folder / "train.log").read_text()
    assert "resumed from" in log and log.count("best epoch") == 1
    assert json.loads((folder / "run_status.json").read_text())["starts"] == 2
    if interrupt in ("preemption", "node down"):  # Slurm's own requeue: SIGTERM, then the job starts again
        assert "caught SIGTERM" in log and "caught SIGUSR2" not in log
        first_end = {"preemption": "PREEMPTED", "node down": "NODE_FAIL"}[interrupt]
        assert slurm_records(job_id, until="COMPLETED") == [first_end, "COMPLETED"]
    assert_same_run(folder, straight)


def test_scancel_then_retry_resumes_and_a_second_retry_submits_nothing(tmp_path, straight):
    proc = sweep([*LONG, *SLURM, "hydra.launcher.wait=true"], tmp_path)
    folder, job_id = wait_for_epochs(tmp_path, 2)
    subprocess.run(["scancel", job_id], check=True)
    out, _ = proc.communicate(timeout=180)
    assert proc.returncode == 2 and "mcn: error: a sweep job ended without a result" in out, out[-2000:]
    assert "Traceback" not in out
    sweep_dir = folder.parent

    cancelled = sweep_cli("status", sweep_dir, cwd=tmp_path)
    assert cancelled.returncode == 1, cancelled.stdout + cancelled.stderr
    row, error = cancelled.stdout.splitlines()[2:4]
    assert row.split()[1:3] == [job_id, "CANCELLED"] and re.match(r"\s+error: SIGTERM during epoch \d+$", error)
    done_before = len(val_epochs(folder))

    first = sweep_cli("retry", sweep_dir, cwd=tmp_path)
    assert first.returncode == 0 and "mcn: submitted 1 job to Slurm as job " in first.stdout, first.stderr
    second = sweep_cli("retry", sweep_dir, cwd=tmp_path)
    assert second.returncode == 2 and second.stderr.startswith(f"mcn: error: nothing to retry in {sweep_dir}: ")
    assert second.stderr.count("\n") == 1 and not second.stdout
    job_ids = json.loads((sweep_dir / "sweep.json").read_text())["jobs"][0]["job_ids"]
    assert len(job_ids) == 2 and job_ids[0] == job_id  # one resubmission
    resubmitted = (sweep_dir / ".submitit" / job_ids[1] / f"{job_ids[1]}_submission.sh").read_text()
    assert all(line in resubmitted for line in REQUEST), resubmitted  # the sweep's original request

    status, rows = follow(sweep_dir, tmp_path)
    assert status.returncode == 0 and rows[0][1:4] == [job_ids[1], "COMPLETED", "40/40"] and rows[0][5] == "1"
    assert "resumed from" in (folder / "train.log").read_text() and done_before >= 2
    assert_same_run(folder, straight)


def test_named_sweep_relaunch_skips_completed_jobs_and_resumes_the_others(tmp_path):
    args = [
        *SLURM,
        "fusion=multiplicative,concatenation",
        "trainer.epochs=15",  # the second job is cancelled 2 epochs in: it must not be done by then
        "trainer.deterministic=true",
        "sweep.name=alpha_study",
        "hydra.launcher.array_parallelism=1",  # one job after the other
    ]
    _, sweep_dir = submit(args, tmp_path)
    assert sweep_dir == tmp_path / "outputs" / "multirun" / "alpha_study"
    second, _ = wait_for_epochs(tmp_path, 2, pattern="1_*", fusion="concatenation", timeout=600)  # the first is done
    cancel = sweep_cli("cancel", sweep_dir, cwd=tmp_path)
    assert re.fullmatch(r"mcn: cancelled 1 job: \d+_1\n", cancel.stdout), cancel.stdout + cancel.stderr
    first = next(sweep_dir.glob("0_fusion=multiplicative,*"))
    log_before = (first / "train.log").read_text()

    proc = sweep([*args, "hydra.launcher.wait=true"], tmp_path)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    assert re.search(r"#0 : .*fusion=multiplicative.*\(COMPLETED: skipped\)\n", out) and "submitted 1 job" in out
    assert (first / "train.log").read_text() == log_before  # the done job did not run again
    assert json.loads((first / "run_status.json").read_text())["starts"] == 1
    assert "resumed from" in (second / "train.log").read_text()
    assert val_epochs(second, "concatenation") == [str(e) for e in range(1, 16)]
    manifest = json.loads((sweep_dir / "sweep.json").read_text())
    assert [len(job["job_ids"]) for job in manifest["jobs"]] == [1, 2]
    assert sorted(p.name for p in sweep_dir.parent.iterdir()) == ["alpha_study"]  # no new sweep folder


@pytest.fixture
def max_array_size_2():
    """The local cluster restarted with MaxArraySize=2 (its queue kept), and restored afterwards."""
    conf = Path("/etc/slurm/slurm.conf")
    if os.geteuid() != 0 or not conf.exists() or "managed by slurm-local" not in conf.read_text():
        skip_unless_required("the test needs root and the cluster of scripts/slurm-local/start-slurm.sh")

    def restart(**env):
        subprocess.run(
            ["bash", str(START_SLURM)],
            env={**os.environ, "SLURM_LOCAL_KEEP_STATE": "1", **env},
            check=True,
            capture_output=True,
        )

    restart(SLURM_LOCAL_MAX_ARRAY_SIZE="2")
    try:
        yield
    finally:
        restart()


def test_sweep_larger_than_max_array_size_is_split_into_arrays(tmp_path, max_array_size_2):
    fusions = ["multiplicative", "concatenation", "TransformerBase"]
    out, sweep_dir = submit([f"fusion={','.join(fusions)}", *SLURM, "trainer.epochs=1"], tmp_path)
    first, second = re.search(r"mcn: submitted 3 jobs to Slurm as arrays (\d+), (\d+)\n", out).groups()
    proc, rows = follow(sweep_dir, tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr
    assert [rows[n][1:4] for n in range(3)] == [
        [f"{first}_0", "COMPLETED", "1/1"],
        [f"{first}_1", "COMPLETED", "1/1"],
        [second, "COMPLETED", "1/1"],
    ]
    assert "--array=0-1%2" in (sweep_dir / ".submitit" / first / f"{first}_submission.sh").read_text()
    assert "--array" not in (sweep_dir / ".submitit" / second / f"{second}_submission.sh").read_text()


def test_time_limit_requeues_and_resumes(tmp_path):
    """A real time limit: 2 minutes, USR2 20 s before it (Slurm fires it up to ~16 s earlier); submitit requeues the
    job and it resumes. Its epochs never run out, whatever the machine's speed, so the first run always meets the
    limit, and 84 s or more leave a loaded machine time to start and save an epoch; once the second run has resumed, the
    test cancels it."""
    args = ["fusion=multiplicative", "trainer.epochs=100000", *SLURM]
    _, sweep_dir = submit([*args, "hydra.launcher.timeout_min=2", "hydra.launcher.signal_delay_s=20"], tmp_path)
    log = sweep_dir / json.loads((sweep_dir / "sweep.json").read_text())["jobs"][0]["folder"] / "train.log"
    try:
        deadline = time.time() + 420
        while not (log.exists() and "resumed from" in log.read_text()) and time.time() < deadline:
            time.sleep(1)
        resumed = sweep_cli("status", sweep_dir, cwd=tmp_path).stdout.splitlines()[2].split()
        assert resumed[2] == "RUNNING" and resumed[5] == "1", resumed  # restarts: 1
    finally:
        cancel = sweep_cli("cancel", sweep_dir, cwd=tmp_path)  # it would run on, time-out after time-out
    assert cancel.returncode == 0, cancel.stderr
    text = log.read_text()
    assert "caught SIGUSR2" in text and "resumed from" in text
    epochs = val_epochs(log.parent)
    assert len(epochs) >= 2 and epochs == [str(e) for e in range(1, len(epochs) + 1)]  # each epoch once
    records = slurm_records(resumed[1], until="CANCELLED")
    # requeued at each time limit (a slow, shared machine may meet a second one before the cancel), then cancelled
    assert records[-1] == "CANCELLED" and records[:-1] and set(records[:-1]) == {"REQUEUED"}, records


def test_impossible_request_surfaces_sbatch_message(tmp_path):
    proc = sweep(["fusion=multiplicative", *SLURM, "hydra.launcher.gpus_per_node=16"], tmp_path)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 2
    assert "mcn: error: Slurm refused the sweep: sbatch: error: Batch job submission failed" in out
    assert "Traceback" not in out
    status = sweep_cli("status", next(tmp_path.glob("outputs/multirun/*/*")), cwd=tmp_path)
    assert status.returncode == 1 and status.stdout.splitlines()[2].split()[1:3] == ["-", "UNSUBMITTED"]


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
            "hydra.launcher.wait=true",
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
    assert " processes=2 " in json.loads((job / "fusion_training_results_multiplicative.json").read_text())["runtime"]


EVERY_OPTION = ["trainer.freeze_experts_epochs=1", "model.ensemble_start=true", "model.expert_dropout=0.25",
                "loss.distill_weight=0.1", "augment.cutmix=1.0", "augment.label_smoothing=0.1"]  # fmt: skip


def test_every_training_option_trains_in_a_two_task_job(tmp_path):
    """Distributed training (gloo) with every fusion option at once: the frozen teacher stays out of DDP, expert
    dropout and CutMix draw per process, the frozen experts' gradients are synchronised at rate 0."""
    experts = pretrain_experts(tmp_path, epochs=1)  # for the distillation teacher
    proc = sweep(
        [
            "fusion=TransformerBase",
            *SLURM,
            "trainer.epochs=2",
            "hydra.launcher.tasks_per_node=2",
            "hydra.launcher.wait=true",
            f"experts.dir={experts}",
            "probe.epochs=3",  # the probe's path, at a fraction of its default 4 x 200 epochs
            "probe.weight_decays=[0.0]",
            *EVERY_OPTION,
        ],
        tmp_path,
    )
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-3000:]
    job = next(tmp_path.glob("outputs/multirun/*/*/0_*"))
    results = json.loads((job / "fusion_training_results_TransformerBase.json").read_text())
    assert " processes=2 " in results["runtime"] and results["epochs_run"] == 2
    rates = [float(r["base_lr"]) for r in report_rows(job, "TransformerBase") if r["phase"] == "train"]
    assert rates[0] == 0.0 and rates[1] > 0  # frozen in epoch 1, joint in epoch 2


def test_held_and_retried_jobs_run_the_code_and_config_submitted_not_the_edited_checkout(tmp_path):
    """Two jobs held in the queue; then the checkout's YAML default (trainer.batch_size) and a Python constant (the
    checkpoint format) change; job 0 is released, job 1 cancelled and retried: both run what was submitted."""
    repo = copy_checkout(tmp_path / "checkout")  # cwd: the jobs would import this copy if nothing pinned them
    held = ["+hydra.launcher.additional_parameters.hold=true", "sweep.name=frozen", "trainer.epochs=1"]
    out, sweep_dir = submit(["fusion=multiplicative,concatenation", *SLURM, *held], repo)
    array = re.search(r"mcn: submitted 2 jobs to Slurm as array (\d+)\n", out).group(1)
    code = json.loads((sweep_dir / "sweep.json").read_text())["code"]
    frozen = sweep_dir / ".code" / code
    quickstart = repo / "conf" / "experiment" / "quickstart.yaml"
    quickstart.write_text(quickstart.read_text().replace("  batch_size: 64 ", "  batch_size: 32 "))
    checkpoint = repo / "mcn" / "files" / "checkpoint.py"
    checkpoint.write_text(checkpoint.read_text().replace('"mcn-checkpoint-v1"', '"edited-after-submitting"'))

    subprocess.run(["scontrol", "release", f"{array}_0"], check=True)
    subprocess.run(["scancel", f"{array}_1"], check=True)
    deadline = time.time() + 60
    while "CANCELLED" not in sweep_cli("status", sweep_dir, cwd=repo).stdout and time.time() < deadline:
        time.sleep(1)
    retried = sweep_cli("retry", sweep_dir, cwd=repo)
    assert retried.returncode == 0, retried.stdout + retried.stderr
    job_id = re.search(r"mcn: submitted 1 job to Slurm as job (\d+)\n", retried.stdout).group(1)
    subprocess.run(["scontrol", "release", job_id], check=True)  # the retry keeps the sweep's request: held too

    status, rows = follow(sweep_dir, repo)
    assert status.returncode == 0, status.stdout[-3000:] + status.stderr
    assert [rows[n][1:3] for n in range(2)] == [[f"{array}_0", "COMPLETED"], [job_id, "COMPLETED"]]
    assert "code:" not in status.stdout  # both ran the sweep's code
    for fusion in ("multiplicative", "concatenation"):
        job = next(sweep_dir.glob(f"*_fusion={fusion},*"))
        assert yaml.safe_load((job / ".hydra" / "config.yaml").read_text())["trainer"]["batch_size"] == 64
        best = torch.load(job / f"best_complete_fusion_{fusion}.pth", weights_only=False)
        assert best["format"] == "mcn-checkpoint-v1"
        ran = json.loads((job / "run_status.json").read_text())["code"]
        assert ran["hash"] == code and ran["path"] == str(frozen)
    for script in sweep_dir.glob(".submitit/*/*_submission.sh"):  # the array's and the retry's
        text = script.read_text()
        assert f"export PYTHONPATH={frozen}${{PYTHONPATH:+:$PYTHONPATH}}\nexport PYTHONSAFEPATH=1\n" in text


def test_a_search_array_with_a_preempted_worker_counts_every_trial_once_and_a_relaunch_submits_nothing(tmp_path):
    import optuna
    from optuna.storages.journal import JournalFileBackend

    args = [*SLURM, "trainer.epochs=20", "search.name=lr", "hparams_search=multiplicative", "search.n_trials=3"]
    args += ["search.workers=2", "search.pruner=none"]
    launched = subprocess.run(
        [sys.executable, "-m", "mcn.tune", *args], cwd=tmp_path, env=ENV, text=True, capture_output=True, timeout=120
    )
    assert launched.returncode == 0, launched.stdout + launched.stderr
    assert re.search(r"mcn: submitted 2 workers to Slurm as array \d+\nmcn: search folder ", launched.stdout)
    folder = tmp_path / "outputs" / "search" / "lr"
    deadline, trial = time.time() + 180, None
    while time.time() < deadline and trial is None:  # a trial 3 epochs in: its worker is preempted there
        for report in folder.glob("trials/*/fusion_multiplicative_report.csv"):
            if report.read_text().count("\nval,") >= 3:
                trial = report.parent
        time.sleep(0.2)
    assert trial is not None, "no trial got to epoch 3"
    job_id = json.loads((trial / "run_status.json").read_text())["slurm_job_id"]
    preempt(job_id)

    status = sweep_cli("status", folder, "--watch", "1", cwd=tmp_path, timeout=600)
    final = last_screen(status.stdout)
    assert status.returncode == 0 and "3 of 3 trials taken: 3 complete" in final, final + status.stderr
    storage = optuna.storages.JournalStorage(JournalFileBackend(str(folder / "study.journal")))
    trials = optuna.load_study(study_name="mcn", storage=storage).trials
    assert [t.state.name for t in trials] == ["COMPLETE"] * 3  # each counted once: none failed, none asked again
    assert all(sorted(t.intermediate_values) == list(range(1, 21)) for t in trials)
    log = (trial / "train.log").read_text()
    assert "caught SIGTERM" in log and "resumed from" in log
    assert json.loads((trial / "run_status.json").read_text())["starts"] == 2
    assert val_epochs(trial) == [str(e) for e in range(1, 21)]  # resumed after its last saved epoch, each once
    assert slurm_records(job_id, until="COMPLETED")[0] == "PREEMPTED"

    workers = json.loads((folder / "search.json").read_text())["workers"]
    again = subprocess.run(
        [sys.executable, "-m", "mcn.tune", *args], cwd=tmp_path, env=ENV, text=True, capture_output=True, timeout=120
    )
    assert again.returncode == 0 and f"mcn: nothing to submit: the search in {folder} is finished" in again.stdout
    assert "submitted" not in again.stdout and json.loads((folder / "search.json").read_text())["workers"] == workers


def test_a_cancelled_search_reads_lost_and_its_retry_resumes_the_trial_counted_once(tmp_path):
    import optuna
    from optuna.storages.journal import JournalFileBackend

    args = [*SLURM, "trainer.epochs=30", "search.name=lr", "hparams_search=multiplicative", "search.n_trials=1"]
    args += ["search.workers=1", "search.pruner=none"]
    launched = subprocess.run(
        [sys.executable, "-m", "mcn.tune", *args], cwd=tmp_path, env=ENV, text=True, capture_output=True, timeout=120
    )
    assert launched.returncode == 0, launched.stdout + launched.stderr
    folder = tmp_path / "outputs" / "search" / "lr"
    report = folder / "trials" / "0" / "fusion_multiplicative_report.csv"
    deadline = time.time() + 180
    while time.time() < deadline and not (report.exists() and report.read_text().count("\nval,") >= 2):
        time.sleep(0.2)
    cancelled = sweep_cli("cancel", folder, cwd=tmp_path, timeout=180)
    said = cancelled.stdout + cancelled.stderr
    assert re.fullmatch(r"mcn: cancelled 1 worker: \d+(_0)?; .*\n", cancelled.stdout), said

    status = sweep_cli("status", folder, cwd=tmp_path)
    assert status.returncode == 1 and re.search(r"\n\s+0\s+LOST\s", status.stdout), status.stdout + status.stderr
    assert f"lost trials resume when a worker asks for one: python -m mcn.sweep retry {folder}" in status.stdout
    retried = sweep_cli("retry", folder, cwd=tmp_path)
    assert retried.returncode == 0 and "mcn: submitted 1 worker to Slurm" in retried.stdout, retried.stderr
    done = sweep_cli("status", folder, "--watch", "1", cwd=tmp_path, timeout=400)
    assert done.returncode == 0 and "1 of 1 trials taken: 1 complete" in last_screen(done.stdout)
    again = sweep_cli("retry", folder, cwd=tmp_path)
    assert again.returncode == 2
    assert again.stderr == f"mcn: error: nothing to retry in {folder}: the search is finished\n"
    trial = report.parent
    assert "resumed from" in (trial / "train.log").read_text()
    assert json.loads((trial / "run_status.json").read_text())["starts"] == 2
    assert val_epochs(trial) == [str(e) for e in range(1, 31)]
    storage = optuna.storages.JournalStorage(JournalFileBackend(str(folder / "study.journal")))
    (only,) = optuna.load_study(study_name="mcn", storage=storage).trials
    assert only.state.name == "COMPLETE"
    assert len(json.loads((folder / "search.json").read_text())["workers"][0]["job_ids"]) == 2


def test_two_launches_of_one_sweep_name_at_once_submit_one_array_that_status_and_cancel_follow(tmp_path):
    """Both launches start at the same instant; the jobs are held in the queue (no CPU spent) until cancelled."""
    held = ["+hydra.launcher.additional_parameters.hold=true", "sweep.name=once", "trainer.epochs=1"]
    procs = [sweep(["fusion=multiplicative,concatenation", *SLURM, *held], tmp_path) for _ in range(2)]
    outs = [proc.communicate(timeout=180)[0] for proc in procs]
    folder = tmp_path / "outputs" / "multirun" / "once"
    ours = subprocess.run(["squeue", "-h", "-r", "-o", "%i %o"], capture_output=True, text=True).stdout.splitlines()
    queued = [line.split()[0] for line in ours if str(folder) in line]
    try:
        assert sorted(proc.returncode for proc in procs) == [0, 2], outs
        submitted, refused = outs if procs[0].returncode == 0 else outs[::-1]
        array = re.search(r"mcn: submitted 2 jobs to Slurm as array (\d+)\n", submitted).group(1)
        assert sorted(queued) == [f"{array}_0", f"{array}_1"]  # one array in the queue, the one on record
        [error] = [line for line in refused.splitlines() if line.startswith("mcn: error:")]
        assert error.startswith(f"mcn: error: sweep {folder} is live: Slurm array {array} has 2 jobs queued or ")
        assert f"python -m mcn.sweep status {folder} --watch" in error and "Traceback" not in refused
        script = next(folder.glob(".submitit/*/*_submission.sh")).read_text()
        assert all(line in script for line in REQUEST) and "--gpus" not in script and "--partition" not in script

        # the record, cut in half, is rebuilt with the array's ids; status and cancel act on that array
        manifest = folder / "sweep.json"
        manifest.write_text(manifest.read_text()[:100])
        status = sweep_cli("status", folder, cwd=tmp_path)
        assert [row.split()[1:3] for row in status.stdout.splitlines()[2:4]] == [
            [f"{array}_{n}", "PENDING"] for n in range(2)
        ], status.stdout + status.stderr
        assert status.stderr.startswith(f"mcn: {manifest} is damaged (JSONDecodeError")
        cancel = sweep_cli("cancel", folder, cwd=tmp_path)
        assert cancel.stdout == f"mcn: cancelled 2 jobs: {array}_0 {array}_1\n", cancel.stdout + cancel.stderr
    finally:
        if queued:
            subprocess.run(["scancel", *queued], check=False)
    ended = subprocess.run(["squeue", "-h", "-r", "-j", array], capture_output=True, text=True).stdout
    assert not ended.strip()


def wait_until_requeued(job_id, folder, timeout=120):
    """Once `scontrol requeuehold` has ended the job's process (its run folder's lock is free) and Slurm holds it."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        state = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True).stdout
        if state.strip() == "PENDING" and lock.holder(folder) is None:
            return
        time.sleep(0.5)
    raise AssertionError(f"job {job_id} was not requeued and held")


def test_a_requeued_job_whose_run_folder_was_moved_refuses_and_leaves_the_moved_run_as_it_was(tmp_path):
    _, sweep_dir = submit([*SLURM, "fusion=multiplicative", "trainer.epochs=40"], tmp_path)
    folder, job_id = wait_for_epochs(tmp_path, 2)
    subprocess.run(["scontrol", "requeuehold", job_id], check=True)
    wait_until_requeued(job_id, folder)
    moved = tmp_path / "moved"
    folder.rename(moved)
    before = snapshot(moved)
    subprocess.run(["scontrol", "release", job_id], check=True)

    proc, rows = follow(sweep_dir, tmp_path)
    assert rows[0][1:3] == [job_id, "FAILED"], proc.stdout
    [error] = [line.strip() for line in last_screen(proc.stdout).splitlines() if "error:" in line]
    assert f"was requeued (restart 1) but its run folder {folder} holds no run: it was moved or deleted" in error
    assert f"move the run back there and resubmit with python -m mcn.sweep retry {sweep_dir}" in error
    assert not folder.exists()  # the restart left nothing where the run was, so `mv` puts it back in place
    assert snapshot(moved) == before


def test_a_sweep_moved_before_its_job_started_says_where_it_was_launched_and_how_to_go_on(tmp_path):
    held = ["+hydra.launcher.additional_parameters.hold=true", "trainer.epochs=1", "sweep.name=moving"]
    _, launched = submit([*SLURM, "fusion=multiplicative", *held], tmp_path)
    job_id = json.loads((launched / "sweep.json").read_text())["jobs"][0]["job_ids"][0]
    moved = tmp_path / "elsewhere"
    launched.rename(moved)
    before = snapshot(moved)
    subprocess.run(["scontrol", "release", job_id], check=True)

    proc, rows = follow(moved, tmp_path)
    assert rows[0][1:3] == [job_id, "FAILED"], proc.stdout
    table = last_screen(proc.stdout)
    advice = f"{moved} was launched as {launched} and has moved since: its jobs run and look for their runs in the old "
    assert f"error: it could not start in its folder: {advice}" in table, table
    assert "retry" not in table  # a retry would submit into the old place
    assert snapshot(moved) == before
    # the printed relaunch starts with `cd` (it pastes from any folder) and names the sweep where it is now
    relaunch = table.rstrip().rsplit("launch it again where it is: ", 1)[1]
    assert relaunch.startswith(f"cd {tmp_path} && python -m mcn.train -m ") and f"hydra.sweep.dir={moved}" in relaunch
