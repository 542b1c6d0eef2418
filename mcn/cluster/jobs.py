"""Each job of a sweep as `mcn.sweep status` shows it: its state (Slurm's while it is queued or running, sacct's
once it ended, together with its run folder's run_status.json; without Slurm, the run folder's alone), its
progress and its error line; and the lines the launcher and `status` print."""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path

from mcn import shell
from mcn.cluster.manifest import Sweep, SweepJob
from mcn.cluster.slurm import LIVE, last_error_line, slurm_states
from mcn.files import RunFolder, read_status
from mcn.files.code import describe, snapshot_version

# a run folder's state (run_status.json) as a job state, where Slurm has nothing to say
FROM_RUN_STATE = {"running": "RUNNING", "done": "COMPLETED", "failed": "FAILED", "interrupted": "INTERRUPTED"}


@dataclass
class JobState:
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


def job_states(sweep: Sweep, jobs: list[SweepJob] | None = None) -> tuple[list[JobState], bool]:
    """(every job's view, whether Slurm was asked)."""
    jobs = sweep.jobs if jobs is None else jobs
    moved = sweep.moved_advice()
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
            # how the job's latest start ended, from submitit's result: Hydra hands a job's error back inside its
            # JobReturn, so Slurm saw a refused job (one that never started its run) end well
            error = result_error(sweep.job_file(job.job_id, "result.pkl")) if job.job_id else None
            if error and state == "COMPLETED":
                state = "FAILED"
            error = error or run.get("error")
            log = sweep.job_file(job.job_id, "log.err") if job.job_id else None
            said = log.read_text(errors="replace")[-20000:] if log and log.exists() else None
            if not error and said and said.strip():  # stderr holds every start's: its last error line comes last
                error = last_error_line(said)
            if not error and state != "UNSUBMITTED" and moved:  # Slurm had no folder to write its log in
                error = f"it could not start in its folder: {moved}"
            if not error and said is not None:
                error = last_error_line(said)  # "(no message)"
            if error and sweep.launcher == "slurm":
                error = retry_first(error, sweep.root)
        views.append(JobState(job, state, run, error))
    return views, slurm is not None


def result_error(path: Path) -> str | None:
    """The error a job ended with, from submitit's result file (`path`): the exception Hydra handed back in the job's
    JobReturn (a value refused before its run started leaves no run status to say it), or the last error line of
    submitit's own traceback. None: no such file, or the job did not fail."""
    try:
        with open(path, "rb") as f:
            outcome, value = pickle.load(f)  # written by submitit in the sweep's own folder
    except (OSError, EOFError, ValueError, TypeError, AttributeError, ImportError, pickle.UnpicklingError):
        return None
    if outcome == "error":
        return last_error_line(str(value))
    failure = getattr(value, "_return_value", None)
    return str(failure) if isinstance(failure, BaseException) else None


def retry_first(error: str, root: Path) -> str:
    """A Slurm job's error line with the retry on the cluster as its first suggestion: the run's own "continue
    with" command trains wherever it is pasted (a login node), so it comes second, for a run off the cluster."""
    for marker in ("; continue it with: ", "; continue with: "):
        if marker in error:
            what, local = error.split(marker, 1)
            retry = shell.command("mcn.sweep", "retry", Path(root).absolute())
            return f"{what}; resubmit it on the cluster: {retry} (or, off the cluster, here: {local})"
    return error


def job_code(sweep: Sweep, view: JobState) -> dict | None:
    """The code version a job runs or ran (mcn.files.code): its run's once it has started, else the snapshot it was
    submitted with; None when neither is known."""
    if view.run.get("code") and view.state not in ("PENDING", "UNSUBMITTED"):
        return view.run["code"]
    if view.job.code:
        return snapshot_version(sweep.files.code, view.job.code) or {"hash": view.job.code}
    return None


def plural(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def arrays(job_ids: list[str]) -> str:
    """Slurm job ids as their arrays (`array 5`, `arrays 5, 6`) or jobs (`job 7`, `jobs 7, 9`). A sweep split at
    MaxArraySize can end in a one-job array, which Slurm numbers as a plain job: it still reads `arrays 5, 6`."""
    ids = sorted({i.split("_")[0] for i in job_ids}, key=int)
    noun = "array" if any("_" in i for i in job_ids) else "job"
    return f"{noun}{'s' if len(ids) > 1 else ''} {', '.join(ids)}"


def live_refusal(folder: Path, live: list[JobState]) -> str:
    """The line refusing to launch a sweep again while jobs of it are queued or running (`live`)."""
    folder = Path(folder).absolute()
    states = ", ".join(f"#{v.job.num} {v.state}" for v in live)
    return (
        f"sweep {folder} is live: Slurm {arrays([v.job.job_id for v in live])} has {plural(len(live), 'job')} queued "
        f"or running ({states}); one submission per sweep: follow it with "
        f"{shell.command('mcn.sweep', 'status', folder, '--watch')}, and launch it again once it has ended (or after "
        f"{shell.command('mcn.sweep', 'cancel', folder)})"
    )


def submitted_message(
    folder: str | Path,
    job_ids: list[str],
    skipped: list[JobState],
    *,
    noun: str = "job",
    kind: str = "sweep",
    retries: str = "failed, cancelled and timed-out jobs",
) -> str:
    """What was submitted and the commands that follow it (a sweep's jobs; a search's workers)."""
    lines = [f"mcn: submitted {plural(len(job_ids), noun)} to Slurm as {arrays(job_ids)}"]
    if skipped:
        lines[0] += f" (skipped {len(skipped)}: " + ", ".join(f"#{v.job.num} {v.state}" for v in skipped) + ")"
    lines += [
        f"mcn: {kind} folder {folder}; follow it with",
        f"  {shell.command('mcn.sweep', 'status', folder, '--watch')}",
        f"  {shell.command('mcn.sweep', 'retry', folder)}    # resubmits {retries}",
        f"  {shell.command('mcn.sweep', 'cancel', folder)}",
    ]
    return "\n".join(lines)


def status_table(sweep: Sweep, views: list[JobState], from_slurm: bool) -> str:
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
        code = job_code(sweep, v)
        if sweep.code and code and code["hash"] != sweep.code:
            ours = snapshot_version(sweep.files.code, sweep.code) or {"hash": sweep.code}
            lines.append(f"{'':>5}code: {describe(code)}, not the sweep's latest {describe(ours)}")
    moved = sweep.moved_advice()
    if moved:
        lines.append(moved)
    elif any(v.needs_submit for v in views):
        lines.append(
            f"resubmit the failed ones: {shell.command('mcn.sweep', 'retry', sweep.root)}"
            if sweep.launcher == "slurm"
            else f"rerun the failed ones: {sweep.command}"
        )
    return "\n".join(lines)
