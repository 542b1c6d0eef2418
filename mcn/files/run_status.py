"""A run's state on disk, `run_status.json` in its folder: what `mcn.evaluate` and sweep tools read.

Fields: `stage` (fusion | expert) with `fusion_type` or `index`; `state` (running | done | failed |
interrupted; read back as `lost` when it says running but no live process holds the folder's lock, mcn.files.lock:
killed with SIGKILL, or its node failed); `command` (the command that continues the run, when a Hydra command
started it); `starts` (how many times a job started in this folder: 1 + restarts and requeues);
`code` (the code version it started with, mcn.files.code); `epoch` / `epochs` (progress); `best_epoch` /
`best_val_accuracy`; `error` (one line, for failed and interrupted runs); `slurm_job_id`; `updated`.
Only rank 0 writes; every write is atomic.
"""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path

from mcn.errors import FileError, MCNError
from mcn.files import lock
from mcn.files.code import code_version
from mcn.files.io import write_bytes, write_json
from mcn.files.layout import RunFolder

LOST = "the process ended without a word (killed, or its node failed)"
STATES = ("running", "done", "failed", "interrupted", "lost")  # what `state` may say, as read back


def read_status(path: str | Path) -> dict | None:
    """The status as it stands now, or None when there is none (or it cannot be read: a run that has not started).
    A `running` state that no live process backs (the folder's lock is free) reads as `lost`."""
    path = Path(path)
    try:
        status = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(status, dict):
        return None
    if status.get("state") == "running" and lock.has_lock_file(path.parent) and lock.holder(path.parent) is None:
        resume = f"; continue it with: {status['command']}" if status.get("command") else ""
        status.update(state="lost", error=LOST + resume)
    return status


def load_status(path: str | Path) -> dict | None:
    """`read_status` for a reader that must not guess (the study report): None only when there is no status file;
    FileError naming it when it is there but unreadable, truncated or not a status."""
    path = Path(path)
    if not path.exists():
        return None
    status = read_status(path)
    if status is None or status.get("state") not in STATES:
        raise FileError(
            f"cannot read {path}: truncated or not an mcn run status (a JSON object with a state); delete it: a "
            f"run with its results JSON then reads as finished, and a live run writes it anew at its next epoch"
        )
    return status


class RunStatus:
    def __init__(self, path: str | Path):
        self.path = Path(path)

    def _update(self, **fields) -> None:
        """Best effort: a status that cannot be written (full disk) must not hide the error that matters. Rank 0's
        alone: the other processes of a multi-process job run the same run (one start, not one per rank)."""
        from mcn.distributed import from_environment  # torch: imported when a run writes, not when a reader reads

        if from_environment().rank != 0:
            return
        status = read_status(self.path) or {}
        status.update(fields, updated=time.strftime("%Y-%m-%dT%H:%M:%S"))
        with contextlib.suppress(MCNError):
            write_json(self.path, status)

    def started(self, **identity) -> None:
        """A job starts in this folder; `identity`: what the run is (stage, fusion type or expert index)."""
        previous = read_status(self.path) or {}
        self._update(
            **identity,
            state="running",
            starts=previous.get("starts", 0) + 1,
            error=None,
            slurm_job_id=lock.slurm_job_id(),
            code=code_version(),
        )

    def progress(self, epoch: int, epochs: int, best: dict) -> None:
        self._update(epoch=epoch, epochs=epochs, best_epoch=best["epoch"], best_val_accuracy=best["val_accuracy"])

    def done(self) -> None:
        self._update(state="done", error=None)

    def failed(self, error: str) -> None:
        self._update(state="failed", error=" ".join(str(error).split()))

    def interrupted(self, why: str) -> None:
        self._update(state="interrupted", error=why)


class HydraRecord:
    """Hydra's record of a command (`.hydra/` in its run folder: config, hydra and overrides YAML), which Hydra writes
    before the command can refuse to run there (a resume whose config changed). `keep(folder)` reads the earlier
    record and the run's status first; `restore_unless_started()` puts that record back when the status has not
    changed since: the command was refused before its run started, so the folder stays as it was."""

    def __init__(self, folder: Path, files: dict[Path, bytes], status: bytes | None):
        self.folder, self.files, self.status = folder, files, status

    @classmethod
    def keep(cls, folder: str | Path) -> HydraRecord:
        folder = Path(folder)
        record = folder / ".hydra"
        files = {p: p.read_bytes() for p in record.iterdir() if p.is_file()} if record.is_dir() else {}
        return cls(folder, files, _bytes(RunFolder(folder).status))

    def restore_unless_started(self) -> None:
        if not self.files or _bytes(RunFolder(self.folder).status) != self.status:
            return
        for path, data in self.files.items():
            with contextlib.suppress(MCNError):
                write_bytes(path, data)


def _bytes(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except OSError:
        return None
