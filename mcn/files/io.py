"""How mcn writes and reads files: atomic writes (a temporary name, then a rename: a kill leaves the previous
file whole), safe loads (`torch.load(weights_only=True)`: a file that would need arbitrary unpickling is refused,
not executed), and what a run folder's start does to leftovers (an earlier run moved aside, stale temp files)."""

from __future__ import annotations

import csv
import io
import json
import math
import os
import pickle
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch

from mcn import distributed
from mcn.errors import CheckpointError, MCNError, StorageError

TEMP_PATTERN = re.compile(r"^\..+\.tmp\d+$")  # `.NAME.tmpPID`, what atomic_write writes before the rename


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], None]) -> Path:
    """`write(f)` into a temporary file beside `path`, then rename it into place: a kill, a full disk or
    Ctrl-C leaves the previous file whole and no temporary file behind. Only rank 0 of a multi-process
    job writes. A write that fails raises StorageError naming the path and the cause."""
    path = Path(path)
    if not distributed.is_main():
        return path
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException as e:
        cause = _write_failure(e, path.parent)  # before the partial file is removed: a full disk frees up then
        tmp.unlink(missing_ok=True)
        if not isinstance(e, Exception) or isinstance(e, MCNError):  # Ctrl-C, exit, or already explained
            raise
        raise StorageError(
            f"cannot write {path}: {cause}; free space or fix the folder's permissions "
            f"(or point paths.output_root / hydra.run.dir elsewhere), then run the same command again"
        ) from None
    return path


def _write_failure(error: BaseException, folder: Path) -> str:
    """In words. torch.save reports a full disk as an internal RuntimeError, so the free space is asked."""
    if isinstance(error, OSError) and error.strerror:
        return error.strerror[0].lower() + error.strerror[1:]
    try:
        if shutil.disk_usage(folder).free < 2**20:
            return "no space left on device"
    except OSError:
        pass
    return f"{type(error).__name__}: {error}"


EARLIER_RUNS = ".earlier_runs"  # where starting over (trainer.resume=never) moves a folder's earlier run
# what stays when a run starts over in a folder: Hydra's and submitit's own files, the job's open log
_NOT_A_RUN_FILE = {".hydra", ".submitit", EARLIER_RUNS}


def move_earlier_run(root: Path) -> Path | None:
    """Start over in `root`: every file an earlier run left there moves to `root/.earlier_runs/<time>/`, so
    none of it mixes with the new run's. Returns that folder, or None when there was nothing to move."""
    root = Path(root)
    leftovers = (
        [p for p in sorted(root.iterdir()) if p.name not in _NOT_A_RUN_FILE and p.suffix != ".log"]
        if root.is_dir()
        else []
    )
    if not leftovers or not distributed.is_main():
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S")
    target = root / EARLIER_RUNS / stamp
    for n in range(1, 1000):  # two restarts within one second
        if not target.exists():
            break
        target = root / EARLIER_RUNS / f"{stamp}-{n}"
    target.mkdir(parents=True)
    for path in leftovers:
        os.replace(path, target / path.name)
    return target


def remove_stale_temp_files(root: Path) -> list[Path]:
    """Temporary files that writes cut short (a kill) left in a run folder; a starting run removes them."""
    stale = [p for p in Path(root).rglob(".*.tmp*") if TEMP_PATTERN.match(p.name) and p.is_file()]
    if distributed.is_main():
        for path in stale:
            path.unlink(missing_ok=True)
    return stale


def save_torch(obj: Any, path: str | Path) -> Path:
    return atomic_write(path, lambda f: torch.save(obj, f))


def write_json(path: str | Path, data: Any) -> Path:
    """JSON has no NaN or Infinity: a non-finite number is written as null (undefined)."""
    text = json.dumps(_finite(data), indent=2, allow_nan=False)
    return atomic_write(path, lambda f: f.write(text.encode()))


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda f: f.write(text.encode()))


def write_bytes(path: str | Path, data: bytes) -> Path:
    return atomic_write(path, lambda f: f.write(data))


def write_npy(path: str | Path, array: np.ndarray) -> Path:
    return atomic_write(path, lambda f: np.save(f, array))


def write_csv(path: str | Path, columns: list[str], rows: list[dict]) -> Path:
    def write(f: IO[bytes]) -> None:
        text = io.StringIO(newline="")
        writer = csv.DictWriter(text, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
        f.write(text.getvalue().encode())

    return atomic_write(path, write)


def read_csv(path: str | Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# ---------------------------------------------------------------- loads


def load_file(path: str | Path) -> Any:
    """Load any checkpoint-like file safely; a clear error for missing, truncated or foreign files."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        # mmap: tensors are read only when used, so listing a folder of large checkpoints stays cheap
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as e:
        # torch names the pickle GLOBAL it would have to import ("Unsupported global: GLOBAL posix.system", or
        # "Trying to load unsupported GLOBAL posix.system ..." in newer releases)
        needs = [line.strip() for line in str(e).splitlines() if "GLOBAL" in line]
        if needs:  # an object the safe unpickler will not build: it could run code
            raise CheckpointError(
                f"refused to load {path}: it needs arbitrary unpickling, which could run code ({needs[0]})"
            ) from None
        raise CheckpointError(
            f"cannot read {path}: truncated or not a PyTorch checkpoint (bad pickle); delete or replace it"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError, KeyError) as e:
        raise CheckpointError(
            f"cannot read {path}: truncated or not a PyTorch checkpoint ({type(e).__name__}); delete or replace it"
        ) from None
