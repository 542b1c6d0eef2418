"""How mcn writes and reads files: atomic writes (a temporary name, then a rename: a kill leaves the previous
file whole), safe loads (`torch.load(weights_only=True)`, with the harmless metadata other code saves allowed: a
file that would need full unpickling is refused, not executed, unless the user trusts it), and what a run folder's
start does to leftovers (an earlier run moved aside, stale temp files)."""

from __future__ import annotations

import argparse
import codecs
import contextlib
import csv
import functools
import io
import json
import math
import os
import pickle
import re
import shutil
import time
import types
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch

from mcn import distributed
from mcn.errors import CheckpointError, FileError, MCNError, StorageError
from mcn.files.lock import LOCK_FILE

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
_NOT_A_RUN_FILE = {".hydra", ".submitit", EARLIER_RUNS, LOCK_FILE}


def holds_no_run(root: Path) -> bool:
    """Whether `root` holds nothing of a run: only what a command writes before its run starts (Hydra's record,
    submitit's files, the logs, the lock), or nothing at all."""
    root = Path(root)
    return not root.is_dir() or all(p.name in _NOT_A_RUN_FILE or p.suffix == ".log" for p in root.iterdir())


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


def read_csv(
    path: str | Path, columns: tuple[str, ...] = (), numbers: tuple[str, ...] = (), fix: str = "delete or replace it"
) -> list[dict]:
    """The rows of a CSV mcn wrote, as dicts. `columns` must be in its header; `numbers` are read as floats (an empty
    cell as None). FileError naming the file, the line and `fix` when it is unreadable, truncated or foreign."""
    path = Path(path)
    try:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            rows = list(reader)
            header = reader.fieldnames or []
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        cause = e.strerror.lower() if isinstance(e, OSError) and e.strerror else f"not a text CSV ({type(e).__name__})"
        raise FileError(f"cannot read {path}: {cause}; {fix}") from None
    missing = [c for c in columns if c not in header]
    if missing:
        raise FileError(f"{path} is not the CSV it should be (no column {missing[0]!r}); {fix}")
    for line, row in enumerate(rows, start=2):
        for column in numbers:
            text = row.get(column)
            try:
                row[column] = None if text in ("", None) else float(text)
            except ValueError:
                raise FileError(f"{path}, line {line}: {column} is {text!r}, not a number; {fix}") from None
    return rows


def check_writable(paths: list[Path], fix: str) -> None:
    """Before the first byte of a command's output is written: each path must be creatable as a file (not a folder,
    no file where its folder should be, a folder this process may write to). MCNError for a path of the wrong kind,
    StorageError for a folder that is not writable; both name the path and end with `fix` (e.g. "pass another
    --output_file")."""
    for path in map(Path, paths):
        if path.is_dir():
            raise MCNError(f"cannot write {path}: a folder of that name is in the way; move it, or {fix}")
        folder = path.parent
        while not folder.exists() and folder != folder.parent:  # atomic_write makes the missing folders
            folder = folder.parent
        if not folder.is_dir():
            raise MCNError(f"cannot write {path}: {folder} is a file, not a folder; {fix}")
        if not os.access(folder, os.W_OK | os.X_OK):
            raise StorageError(
                f"cannot write {path}: {folder} is not writable (permissions, or a read-only disk); make it writable, "
                f"or {fix}"
            )


# ---------------------------------------------------------------- loads


def _numpy_multiarray():
    """numpy's `multiarray` module: `numpy._core` since numpy 2 (`numpy.core` there only warns), `numpy.core` before."""
    try:
        from numpy._core import multiarray
    except ImportError:
        from numpy.core import multiarray
    return multiarray


@functools.cache
def _harmless_globals() -> list:
    """What the safe loader may build besides torch's own tensors, numbers, text, dicts, lists and OrderedDicts: the
    metadata other code saves beside its weights, none of which runs code when built. numpy's scalars, dtypes and
    arrays (`'best_acc': np.float64(0.9)`, `'epoch': np.int64(3)`: numbers and raw bytes); attribute bags
    (`argparse.Namespace`, the `args` training scripts save; `types.SimpleNamespace`); sets; and bytes, which torch
    allows by default only from 2.5 on (`_codecs.encode`). Entries for torch's `safe_globals` / `add_safe_globals`."""
    multiarray = _numpy_multiarray()
    entries = [
        multiarray.scalar,
        multiarray._reconstruct,
        np.ndarray,
        np.dtype,
        *{type(np.dtype(code)) for code in np.typecodes["All"]},  # a dtype's own class: its state is set on load
        argparse.Namespace,
        types.SimpleNamespace,
        set,
        frozenset,
        codecs.encode,
    ]
    if torch.__version__ >= "2.6":  # (object, name) entries: torch 2.6 on
        # the same functions under the names that files pickled with the other numpy major give them
        other = "numpy.core.multiarray" if multiarray.__name__ == "numpy._core.multiarray" else "numpy._core.multiarray"
        entries += [(multiarray.scalar, f"{other}.scalar"), (multiarray._reconstruct, f"{other}._reconstruct")]
    return entries


def allowing_harmless_globals():
    """A context in which torch's safe loader also builds the harmless metadata of `_harmless_globals`, also for code
    that calls `torch.load(weights_only=True)` itself (timm). torch 2.4 has no context manager for its allow-list:
    there the entries are allowed from the first use on, in this process."""
    if hasattr(torch.serialization, "safe_globals"):
        return torch.serialization.safe_globals(_harmless_globals())
    _allow_in_this_process()
    return contextlib.nullcontext()


@functools.cache
def _allow_in_this_process() -> None:
    torch.serialization.add_safe_globals(_harmless_globals())


_OWN_FILE_FIX = "mcn writes no such objects, so it is not a file mcn wrote: replace or delete it"


def load_file(path: str | Path, *, trusted: bool = False, refused_fix: str = _OWN_FILE_FIX) -> Any:
    """Load any checkpoint-like file safely; a clear error for missing, truncated or foreign files.

    The safe loader (`torch.load(weights_only=True)`) builds tensors, numbers, text, containers and the harmless
    metadata of `_harmless_globals`; a file that holds any other object is refused (CheckpointError, its line ending
    in `refused_fix`: what the user can do, e.g. the option that trusts the file), as building it could run code.
    `trusted`: such a file is unpickled in full instead (only for files the user trusts)."""
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{path} is a folder, where a checkpoint file is expected; pass a .pth file")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        with allowing_harmless_globals():
            # mmap: tensors are read only when used, so listing a folder of large checkpoints stays cheap
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as e:
        needs = unsafe_object(e)
        if needs is None:
            raise CheckpointError(
                f"cannot read {path}: truncated or not a PyTorch checkpoint (bad pickle); delete or replace it"
            ) from None
        if not trusted:
            raise refusal(path, needs, refused_fix) from None
    except (RuntimeError, EOFError, OSError, ValueError, KeyError) as e:
        raise CheckpointError(
            f"cannot read {path}: truncated or not a PyTorch checkpoint ({type(e).__name__}); delete or replace it"
        ) from None
    try:
        return torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception as e:  # other code's objects, built by other code: anything can fail
        fix = (
            "make the code that saved it importable here (PYTHONPATH)"
            if isinstance(e, (ImportError, AttributeError))  # its class is not found
            else "fix or replace the file"
        )
        raise CheckpointError(
            f"cannot load {path}, trusted: building {needs} failed ({type(e).__name__}: {e}); {fix}, or save the "
            f"weights alone (its state_dict) and point at that"
        ) from None


def refusal(path: str | Path, needs: str, fix: str) -> CheckpointError:
    """The one line that refuses a file the safe loader does not build (`needs`: what, from `unsafe_object`)."""
    return CheckpointError(
        f"refused to load {path}: it needs {needs}, which only full unpickling builds, and full unpickling can run "
        f"code; {fix}"
    )


def unsafe_object(error: pickle.UnpicklingError) -> str | None:
    """What the safe loader would not build, from its error (None: the file is not a checkpoint at all). torch names
    a pickle GLOBAL it will not import ("Unsupported global: GLOBAL posix.system ...", "Trying to load unsupported
    GLOBAL posix.system ...") or the class of an object it will not build ("... but got <class 'x.Y'>")."""
    message = str(error)
    named = re.search(r"GLOBAL ([\w.]+)|<class '([\w.]+)'>", message)
    if named:
        return named[1] or named[2]
    return "an object the safe loader does not build" if "Weights only load failed" in message else None
