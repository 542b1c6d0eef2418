"""What Slurm says: job states (squeue, then sacct), the cluster's MaxArraySize, and whether its commands are here.
Every query answers None where Slurm is not installed or does not answer."""

from __future__ import annotations

import re
import shutil
import subprocess

from mcn.errors import MCNError

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
    records = [line.split("|", 1) for line in (accounted or "").splitlines()]
    # a task's own record first; then the record of the array's tasks that never started, e.g. "12_[1-3%2]"
    for job_id, state in sorted(records, key=lambda r: "[" in r[0]):
        for task in _array_tasks(job_id):
            states.setdefault(task, state.split()[0])  # "CANCELLED by 0" -> CANCELLED
    return states


def _array_tasks(job_id: str) -> list[str]:
    """sacct's JobID as the job ids it stands for: "12_[0-2,5%2]" (tasks that never started) -> 12_0, 12_1, 12_2,
    12_5; any other id as itself."""
    match = re.fullmatch(r"(\d+)_\[([\d,-]+)(?:%\d+)?\]", job_id)
    if not match:
        return [job_id]
    tasks = []
    for part in match[2].split(","):
        first, _, last = part.partition("-")
        tasks += [f"{match[1]}_{i}" for i in range(int(first), int(last or first) + 1)]
    return tasks


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


def require_slurm(command: str) -> None:
    if shutil.which(command) is None:
        raise MCNError(f"no `{command}` on the PATH: run this on a machine that can reach the Slurm cluster")
