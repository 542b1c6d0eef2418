"""A run's state on disk, `run_status.json` in its folder: what `mcn.evaluate` and sweep tools read.

Fields: `stage` (fusion | expert) with `fusion_type` or `index`; `state` (running | done | failed |
interrupted); `starts` (how many times a job started in this folder: 1 + restarts and requeues);
`epoch` / `epochs` (progress); `best_epoch` / `best_val_accuracy`; `error` (one line, for failed and
interrupted runs); `slurm_job_id`; `updated`.
Only rank 0 writes; every write is atomic.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path

from mcn.errors import MCNError
from mcn.files.io import write_json


def read_status(path: str | Path) -> dict | None:
    """The status on disk, or None when there is none (or it cannot be read: a run that has not started)."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


class RunStatus:
    def __init__(self, path: str | Path):
        self.path = Path(path)

    def _update(self, **fields) -> None:
        """Best effort: a status that cannot be written (full disk) must not hide the error that matters."""
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
            slurm_job_id=os.environ.get("SLURM_JOB_ID"),
        )

    def progress(self, epoch: int, epochs: int, best: dict) -> None:
        self._update(epoch=epoch, epochs=epochs, best_epoch=best["epoch"], best_val_accuracy=best["val_accuracy"])

    def done(self) -> None:
        self._update(state="done", error=None)

    def failed(self, error: str) -> None:
        self._update(state="failed", error=" ".join(str(error).split()))

    def interrupted(self, why: str) -> None:
        self._update(state="interrupted", error=why)
