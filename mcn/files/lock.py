"""One run per folder: a process holds `.mcn.lock` in its run folder for as long as it runs there.

The lock is the operating system's (`fcntl.lockf`, POSIX record locks; NFS carries them through its lock manager),
so a process that dies any way at all (kill -9, a node failure, a requeue onto another node) lets go of it with no
clean-up; the next start takes it over. The file itself holds who took it last (host, PID, Slurm job id, time):
the line a refused start prints, and what `holder` reports while the lock is held. A folder whose lock nobody holds
has no live run, whatever its run_status.json says (`mcn.files.run_status`).

Locks belong to a process (POSIX closes them all when any descriptor of the file closes), so the locks this process
holds are kept here, once per folder, and asked about without opening the file again.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path

from mcn.errors import MCNError, StorageError

LOCK_FILE = ".mcn.lock"

_held: dict[Path, int] = {}  # folder -> the open descriptor holding its lock, in this process


class FolderInUse(MCNError):
    """Another live process runs in the folder."""


def _key(folder: str | Path) -> Path:
    return Path(folder).absolute()


def slurm_job_id() -> str | None:
    """This process's Slurm job id as squeue and sacct show it: `<array>_<task>` for an array's task (`5_0`; its
    SLURM_JOB_ID is a number of its own), else SLURM_JOB_ID; None outside Slurm."""
    array, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    return f"{array}_{task}" if array and task else os.environ.get("SLURM_JOB_ID")


def _me() -> dict:
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "slurm_job_id": slurm_job_id(),
        "since": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }


def describe(holder: dict | None) -> str:
    if not holder:
        return "another process"
    job = f", Slurm job {holder['slurm_job_id']}" if holder.get("slurm_job_id") else ""
    return f"process {holder.get('pid')} on {holder.get('host')}{job}, since {holder.get('since')}"


def _read(fd: int) -> dict | None:
    try:
        data = json.loads(os.pread(fd, 4096, 0) or b"null")
        return data if isinstance(data, dict) else None
    except (OSError, ValueError):
        return None


def acquire(folder: str | Path) -> bool:
    """Take `folder`'s lock for this process (creating the folder). True when taken now, False when this process
    already held it. FolderInUse (one line naming the holder) when a live process holds it; StorageError when the
    folder cannot be written."""
    folder = _key(folder)
    if folder in _held:
        return False
    path = folder / LOCK_FILE
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise StorageError(
            f"cannot write in {folder}: {e.strerror or e}; fix the folder's permissions or run elsewhere "
            f"(hydra.run.dir=..., or paths.output_root=...)"
        ) from None
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = _read(fd)
        os.close(fd)
        raise FolderInUse(
            f"{folder} is in use by {describe(holder)}; one run per folder: wait for it to end "
            f"(or stop it), or run elsewhere with hydra.run.dir=... / sweep.name=..."
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(_me()).encode(), 0)
    _held[folder] = fd
    return True


def release(folder: str | Path) -> None:
    fd = _held.pop(_key(folder), None)
    if fd is not None:
        os.close(fd)  # the lock goes with it


def holder(folder: str | Path) -> dict | None:
    """Who runs in `folder` now: the holder's record while a live process holds the lock, else None (no lock file:
    no run has started there since runs took locks; a lock file nobody holds: its last run ended, or died)."""
    folder = _key(folder)
    if folder in _held:
        return _read(_held[folder])
    try:
        fd = os.open(folder / LOCK_FILE, os.O_RDONLY)
    except OSError:
        return None
    try:
        try:  # a shared lock can be had exactly when no process holds the exclusive one
            fcntl.lockf(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            return _read(fd) or {}
        return None
    finally:
        os.close(fd)


def has_lock_file(folder: str | Path) -> bool:
    return (Path(folder) / LOCK_FILE).is_file()
