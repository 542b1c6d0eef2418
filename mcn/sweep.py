"""Follow a -m sweep after submitting it: `python -m mcn.sweep status|retry|cancel FOLDER`.

    python -m mcn.sweep status outputs/multirun/alpha_study [--watch [SECONDS]]   one row per job
    python -m mcn.sweep retry outputs/multirun/alpha_study    resubmit failed, cancelled, timed-out, unsubmitted jobs
    python -m mcn.sweep cancel outputs/multirun/alpha_study   cancel the jobs still queued or running

The launchers (hydra_plugins/mcn_launcher) keep a manifest in the sweep folder, `sweep.json`: every job's
number, overrides, run folder and the Slurm job ids it was submitted as (mcn.files.SweepFiles); beside it the
launcher itself (its Slurm request and Hydra context), which `retry` submits again, each job into its own
folder, where it resumes from train_state.pth. A job's state is Slurm's (squeue while it is queued or
running, sacct once it ended) together with its run folder's run_status.json (mcn.status); without Slurm,
the run folder's alone.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from mcn.cli import ArgumentParser, one_line_errors
from mcn.errors import MCNError
from mcn.files import RunFolder, SweepFiles, atomic_write, write_json
from mcn.status import read_status

# Slurm states of a job that is still queued or running (it may yet finish)
LIVE = {
    "PENDING",
    "CONFIGURING",
    "RUNNING",
    "COMPLETING",
    "REQUEUED",
    "REQUEUE_FED",
    "REQUEUE_HOLD",
    "RESIZING",
    "SIGNALING",
    "STAGE_OUT",
    "SUSPENDED",
    "STOPPED",
}
# a run folder's state (run_status.json) as a job state, where Slurm has nothing to say
FROM_RUN_STATE = {"running": "RUNNING", "done": "COMPLETED", "failed": "FAILED", "interrupted": "INTERRUPTED"}
FORMAT = "mcn-sweep-v1"


@dataclass
class SweepJob:
    num: int  # hydra.job.num
    overrides: list[str]
    folder: str  # the run folder, relative to the sweep folder
    job_ids: list[str] = field(default_factory=list)  # every Slurm job id it was submitted as, the current one last

    @property
    def job_id(self) -> str | None:
        return self.job_ids[-1] if self.job_ids else None


class Sweep:
    """A sweep folder and its manifest. `logs`: submitit's job folder pattern (`%j`: the job id), relative to
    the sweep folder; `cwd`: where the sweep was launched from (relative paths in its config start there)."""

    def __init__(self, root: str | Path, launcher: str, cwd: str, logs: str, jobs: list[SweepJob]):
        self.root, self.files = Path(root), SweepFiles(Path(root))
        self.launcher, self.cwd, self.logs, self.jobs = launcher, cwd, logs, jobs

    @classmethod
    def open(cls, folder: str | Path) -> Sweep:
        files = SweepFiles(Path(folder))
        if not files.root.is_dir():
            raise MCNError(f"sweep folder {folder} does not exist")
        try:
            manifest = json.loads(files.manifest.read_text())
            if manifest["format"] != FORMAT:
                raise ValueError(manifest["format"])
            jobs = [SweepJob(**job) for job in manifest["jobs"]]
            return cls(files.root, manifest["launcher"], manifest["cwd"], manifest["logs"], jobs)
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise MCNError(
                f"{folder} is not a sweep folder ({files.manifest.name} missing or unreadable); point at the folder a "
                f"-m sweep printed, e.g. outputs/multirun/2026-11-27/10-00-00"
            ) from e

    @classmethod
    def create_or_open(cls, folder: Path, launcher: str, logs: str) -> Sweep:
        """The sweep in `folder`, relaunched by `launcher` (its jobs so far kept), or a new one."""
        sweep = cls.open(folder) if SweepFiles(folder).manifest.exists() else cls(folder, launcher, "", "", [])
        sweep.launcher, sweep.cwd = launcher, os.getcwd()
        sweep.logs = os.path.relpath(Path(logs).absolute(), folder.absolute())
        return sweep

    def add(self, num: int, overrides: list[str], folder: str) -> SweepJob:
        """The job that runs in `folder` (the one on record, or a new one)."""
        for job in self.jobs:
            if job.folder == folder:
                job.num, job.overrides = num, overrides
                return job
        self.jobs.append(SweepJob(num, overrides, folder))
        return self.jobs[-1]

    def save(self) -> None:
        write_json(
            self.files.manifest,
            {
                "format": FORMAT,
                "launcher": self.launcher,
                "cwd": self.cwd,
                "logs": self.logs,
                "jobs": [asdict(job) for job in sorted(self.jobs, key=lambda j: j.num)],
            },
        )

    def keep_launcher(self, launcher, singletons: dict) -> None:
        import cloudpickle

        atomic_write(self.files.launcher, lambda f: cloudpickle.dump((launcher, singletons), f))

    def load_launcher(self):
        """(launcher, Hydra's singletons) as the sweep was submitted. A pickle like submitit's own job files, and
        as trusted: the sweep's own folder."""
        import pickle

        try:
            with open(self.files.launcher, "rb") as f:
                return pickle.load(f)
        except (OSError, pickle.UnpicklingError, AttributeError, ImportError) as e:
            raise MCNError(
                f"cannot read {self.files.launcher} ({type(e).__name__}: {e}); relaunch the sweep with "
                f"hydra.sweep.dir={self.root} instead"
            ) from e

    def job_file(self, job_id: str, name: str) -> Path:
        """A file of submitit's for a job's first task: `log.err` (its stderr), `result.pkl` (written as it ends)."""
        return self.root / self.logs.replace("%j", job_id) / f"{job_id}_0_{name}"


# ---------------------------------------------------------------- Slurm


def _slurm(*command: str) -> str | None:
    """stdout of a Slurm command; None where Slurm is not installed or does not answer."""
    if shutil.which(command[0]) is None:
        return None
    try:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        return None
    if proc.returncode != 0:
        # squeue -j with ids that have all left the queue: no live job, not an error
        return "" if "Invalid job id" in proc.stderr else None
    return proc.stdout


def slurm_states(job_ids: list[str]) -> dict[str, str] | None:
    """{job id: Slurm state} (squeue for queued and running jobs, sacct for the others); None without Slurm."""
    if not job_ids:
        return {}
    arrays = ",".join(sorted({i.split("_")[0] for i in job_ids}))  # "12_3": task 3 of array 12
    queued = _slurm("squeue", "-h", "-r", "-j", arrays, "-o", "%i|%T")
    if queued is None:
        return None
    states = dict(line.split("|", 1) for line in queued.split())
    ended = ",".join(sorted({i.split("_")[0] for i in job_ids if i not in states}))
    accounted = _slurm("sacct", "-n", "-P", "-X", "-j", ended, "-o", "JobID,State") if ended else ""
    for line in (accounted or "").splitlines():
        job_id, state = line.split("|", 1)
        states.setdefault(job_id, state.split()[0])  # "CANCELLED by 0" -> CANCELLED
    return states


def max_array_size() -> int | None:
    """The cluster's MaxArraySize: a job array's task indices must stay below it. None where Slurm does not say."""
    for line in (_slurm("scontrol", "show", "config") or "").splitlines():
        key, _, value = line.partition("=")
        if key.strip() == "MaxArraySize":
            return int(value)
    return None


def last_error_line(text: str) -> str:
    """The line of a log or error message that says what went wrong (its last error line, else its last line)."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    errors = [line for line in lines if "Error" in line.split(":")[0] or "error:" in line]
    return (errors or lines or ["(no message)"])[-1]


# ---------------------------------------------------------------- jobs


@dataclass
class JobView:
    """One job as `status` shows it."""

    job: SweepJob
    state: str
    run: dict  # its run_status.json ({} before it starts)
    error: str | None

    @property
    def live(self) -> bool:
        return self.state in LIVE

    @property
    def done(self) -> bool:
        return self.run.get("state") == "done"

    @property
    def needs_submit(self) -> bool:
        """Failed, cancelled, timed out for good, or never submitted: what retry and a relaunch resubmit."""
        return not self.live and not self.done


def look(sweep: Sweep, jobs: list[SweepJob] | None = None) -> tuple[list[JobView], bool]:
    """(every job's view, whether Slurm was asked)."""
    jobs = sweep.jobs if jobs is None else jobs
    slurm = slurm_states([j.job_id for j in jobs if j.job_id]) if sweep.launcher == "slurm" else None
    views = []
    for job in jobs:
        run = read_status(RunFolder(sweep.root / job.folder).status) or {}
        state = (slurm or {}).get(job.job_id) if job.job_id else "UNSUBMITTED"
        if state is None or (state not in LIVE and run.get("state") == "done"):  # the run folder says
            # submitit's result file without a run status: the job failed before its run started
            ended = job.job_id is not None and sweep.job_file(job.job_id, "result.pkl").exists()
            state = FROM_RUN_STATE.get(run.get("state"), "FAILED" if ended else "PENDING")
        error = None
        if state not in LIVE and run.get("state") != "done":
            error = run.get("error")
            log = sweep.job_file(job.job_id, "log.err") if job.job_id else None
            if not error and log and log.exists():
                error = last_error_line(log.read_text(errors="replace")[-20000:])
        views.append(JobView(job, state, run, error))
    return views, slurm is not None


def plural(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def submitted_message(folder: str | Path, job_ids: list[str], skipped: list[JobView]) -> str:
    arrays = sorted({i.split("_")[0] for i in job_ids}, key=int)
    what = f"array{'s' if len(arrays) > 1 else ''} {', '.join(arrays)}" if "_" in job_ids[0] else f"job {arrays[0]}"
    lines = [f"mcn: submitted {plural(len(job_ids), 'job')} to Slurm as {what}"]
    if skipped:
        lines[0] += f" (skipped {len(skipped)}: " + ", ".join(f"#{v.job.num} {v.state}" for v in skipped) + ")"
    lines += [
        f"mcn: sweep folder {folder}; follow it with",
        f"  python -m mcn.sweep status {folder} --watch",
        f"  python -m mcn.sweep retry {folder}    # resubmits failed, cancelled and timed-out jobs",
        f"  python -m mcn.sweep cancel {folder}",
    ]
    return "\n".join(lines)


def status_table(sweep: Sweep, views: list[JobView], from_slurm: bool) -> str:
    counts: dict[str, int] = {}
    for v in views:
        counts[v.state] = counts.get(v.state, 0) + 1
    source = "Slurm and run folders" if from_slurm else "run folders"
    lines = [
        f"sweep {sweep.root} ({source}): {plural(len(views), 'job')}, "
        + ", ".join(f"{n} {s}" for s, n in counts.items()),
        f"{'#':>3}  {'job':<12} {'state':<12} {'epoch':>7} {'best val':>8} {'restarts':>8}  overrides",
    ]
    # the overrides that tell the jobs apart (all of them for a single job)
    shared = set.intersection(*(set(v.job.overrides) for v in views)) if len(views) > 1 else set()
    for v in sorted(views, key=lambda v: v.job.num):
        run = v.run
        epoch = f"{run['epoch']}/{run['epochs']}" if run.get("epochs") else "-"
        best = f"{run['best_val_accuracy']:.4f}" if run.get("best_val_accuracy", -1) >= 0 else "-"
        restarts = max(run.get("starts", 1) - 1, 0)
        overrides = " ".join(o for o in v.job.overrides if o not in shared)
        lines.append(
            f"{v.job.num:>3}  {v.job.job_id or '-':<12} {v.state:<12} {epoch:>7} {best:>8} {restarts:>8}  {overrides}"
        )
        if v.error:
            lines.append(f"{'':>5}error: {v.error}")
    if any(v.needs_submit for v in views):
        lines.append(
            f"resubmit the failed ones: python -m mcn.sweep retry {sweep.root}"
            if sweep.launcher == "slurm"
            else f"rerun the failed ones: the same command with hydra.sweep.dir={sweep.root}"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------- commands


def status(folder: str, watch: float | None = None) -> int:
    """Print the table (every `watch` seconds until no job is queued or running); 1 when a job needs a retry."""
    sweep = Sweep.open(folder)
    while True:
        views, from_slurm = look(sweep)
        table = status_table(sweep, views, from_slurm)
        print(table if watch is None else "\033[H\033[2J" + time.strftime("%H:%M:%S ") + table, flush=True)
        if watch is None or not any(v.live for v in views):
            return 1 if any(v.needs_submit for v in views) else 0
        time.sleep(watch)


def require_slurm(command: str) -> None:
    if shutil.which(command) is None:
        raise MCNError(f"no `{command}` on the PATH: run this on a machine that can reach the Slurm cluster")


def retry(folder: str) -> int:
    sweep = Sweep.open(folder)
    if sweep.launcher != "slurm":
        raise MCNError(
            f"{folder} ran on the {sweep.launcher} launcher; run the same command again with hydra.sweep.dir={folder} "
            f"(or its sweep.name) to rerun its unfinished jobs"
        )
    require_slurm("sbatch")
    views, _ = look(sweep)
    todo = [v for v in views if v.needs_submit]
    if not todo:
        states = ", ".join(sorted({v.state for v in views}))
        raise MCNError(f"nothing to retry in {folder}: every job is done or still queued or running ({states})")
    if not os.path.isdir(sweep.cwd):
        raise MCNError(
            f"{folder} was launched from {sweep.cwd}, which is gone; relaunch it with hydra.sweep.dir={folder} instead"
        )
    launcher, singletons = sweep.load_launcher()
    os.chdir(sweep.cwd)  # the sweep's config holds paths relative to where it was launched
    submitted = launcher.submit(sweep, [v.job for v in todo], singletons)
    print(submitted_message(folder, [j.job_id for j in submitted], []))
    return 0


def cancel(folder: str) -> int:
    sweep = Sweep.open(folder)
    require_slurm("scancel")
    views, _ = look(sweep)
    live = [v.job.job_id for v in views if v.live]
    if not live:
        raise MCNError(f"nothing to cancel in {folder}: no job is queued or running")
    refused = subprocess.run(["scancel", *live], capture_output=True, text=True)
    if refused.returncode:
        raise MCNError(f"scancel refused to cancel {' '.join(live)}: {refused.stderr.strip() or refused.returncode}")
    # back once they have left the queue (KillWait: SIGTERM, then SIGKILL), so that a retry or relaunch sees them ended
    deadline = time.time() + 120
    while time.time() < deadline and any(v.live for v in look(sweep, [v.job for v in views if v.live])[0]):
        time.sleep(1)
    print(f"mcn: cancelled {plural(len(live), 'job')}: {' '.join(live)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m mcn.sweep", description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=["status", "retry", "cancel"])
    parser.add_argument("folder", help="the sweep folder a -m sweep printed")
    parser.add_argument(
        "--watch", nargs="?", type=float, const=10.0, metavar="SECONDS", help="status: refresh until every job ended"
    )
    args = parser.parse_args(argv)
    with one_line_errors():
        try:
            if args.command == "status":
                return status(args.folder, args.watch)
            return {"retry": retry, "cancel": cancel}[args.command](args.folder)
        except KeyboardInterrupt:
            print(file=sys.stderr)
            return 130


if __name__ == "__main__":
    raise SystemExit(main())
