"""Decoded data sets kept once on disk as uint8 arrays, reused by every run, stage and job that asks for them.

An entry is a folder `<cache_dir>/<name>-<key>/` with `train_images.npy` (uint8 [N, C, H, W]), `train_labels.npy`
(int64 [N]), `train_hashes.npy` (each image's SHA-1, `mcn.data.leakage`), the same three for `test`, and
`meta.json`, written last. `key` is 16 hex digits of the SHA-256 of the
recipe that made it (the source files' paths, sizes and modification times, the labels, the transform), so an
edited file or another image size makes another entry. A job builds an entry in a private folder and renames it
into place in one step: two jobs that build the same entry at once both finish, and one copy is kept.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import socket
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from mcn.data.leakage import content_hashes
from mcn.errors import DataError, StorageError
from mcn.files import write_json, write_npy

PARTS = ("train", "test")


def cache_key(recipe: dict) -> str:
    return hashlib.sha256(json.dumps(recipe, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _read_meta(folder: Path) -> dict | None:
    try:
        return json.loads((folder / "meta.json").read_text())
    except FileNotFoundError:
        return None
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"the cached data set {folder} is unreadable ({e}); delete that folder to rebuild it") from None


def _remove_dead_builds(cache_dir: Path, entry: str) -> None:
    """Building folders of `entry` that a killed job on this host left behind (their process is gone)."""
    host = socket.gethostname()
    for folder in cache_dir.glob(f".{entry}.building-{host}-*"):
        pid = folder.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            shutil.rmtree(folder, ignore_errors=True)


def wait_for(folder: Path, poll_s: float = 2.0) -> dict:
    """The meta of the entry another process (rank 0) is building, once it is in place. A build that fails ends
    that process, and torchrun or Slurm then end this one."""
    while (meta := _read_meta(folder)) is None:
        time.sleep(poll_s)
    return meta


def open_or_build(
    cache_dir: Path, name: str, recipe: dict, build: Callable[[Path], dict], may_build: bool = True
) -> tuple[Path, dict, bool]:
    """The entry for `recipe`: (its folder, its meta, whether this call built it). `build(folder)` writes the four
    arrays into an empty folder and returns the meta (JSON-able); with `may_build=False` (the other ranks of a
    job) this waits for the entry instead. Raises StorageError when the cache folder cannot be written, DataError
    (from `build`) for bad data."""
    folder = cache_dir / f"{name}-{cache_key(recipe)}"
    meta = _read_meta(folder)
    if meta is not None:
        return folder, meta, False
    if not may_build:
        return folder, wait_for(folder), False
    _remove_dead_builds(cache_dir, folder.name)
    building = cache_dir / f".{folder.name}.building-{socket.gethostname()}-{os.getpid()}"
    try:
        shutil.rmtree(building, ignore_errors=True)
        building.mkdir(parents=True)
        meta = {"recipe": recipe, **build(building)}
        for part in PARTS:  # the duplicate check's hashes, once (mcn.data.leakage)
            write_npy(building / f"{part}_hashes.npy", content_hashes(open_arrays(building, part)[0]))
        write_json(building / "meta.json", meta)
        try:
            os.rename(building, folder)
        except OSError:  # another job put the same entry in place first: keep theirs
            if _read_meta(folder) is None:
                raise
            shutil.rmtree(building, ignore_errors=True)
            return folder, _read_meta(folder), False
    except OSError as e:
        shutil.rmtree(building, ignore_errors=True)
        if e.errno not in (errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EDQUOT, errno.EPERM):
            raise
        raise StorageError(
            f"cannot write the data cache in {cache_dir} ({e.strerror or e}); free space there or set "
            f"paths.cache_dir to a writable folder"
        ) from None
    except BaseException:
        shutil.rmtree(building, ignore_errors=True)
        raise
    return folder, meta, True


def open_hashes(folder: Path, part: str) -> np.ndarray:
    try:
        return np.load(folder / f"{part}_hashes.npy")
    except (OSError, ValueError) as e:
        raise DataError(f"the cached data set {folder} is damaged ({e}); delete that folder to rebuild it") from None


def open_arrays(folder: Path, part: str) -> tuple[np.ndarray, np.ndarray]:
    """(images, labels) of one part, the images memory-mapped (read only: nothing is read until used)."""
    try:
        images = np.load(folder / f"{part}_images.npy", mmap_mode="r")
        labels = np.load(folder / f"{part}_labels.npy")
    except (OSError, ValueError) as e:
        raise DataError(f"the cached data set {folder} is damaged ({e}); delete that folder to rebuild it") from None
    if images.dtype != np.uint8 or images.ndim != 4 or len(images) != len(labels):
        raise DataError(f"the cached data set {folder} is damaged (shape {images.shape}); delete it to rebuild it")
    return images, labels


def new_array(path: Path, shape: tuple[int, ...]) -> np.ndarray:
    """A uint8 .npy of `shape`, memory-mapped for writing."""
    return np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=shape)


def write_rows(folder: Path, part: str, images: np.ndarray, labels: np.ndarray, rows: np.ndarray) -> int:
    """Write `images[rows]` and `labels[rows]` as one part, chunk by chunk (a set larger than memory never has to
    fit). Returns the count."""
    out = new_array(folder / f"{part}_images.npy", (len(rows), *images.shape[1:]))
    for start in range(0, len(rows), 4096):
        out[start : start + 4096] = images[rows[start : start + 4096]]
    out.flush()
    np.save(folder / f"{part}_labels.npy", np.asarray(labels, dtype=np.int64)[rows])
    return int(len(rows))


def write_part(folder: Path, part: str, fill: Callable[[Callable], tuple[np.ndarray, np.ndarray, list]]) -> int:
    """Write one part: `fill(new)` decodes into `new(shape)` and returns (the array, a mask of the rows kept, the
    labels). Returns the count kept."""
    raw_path = folder / f"{part}_raw.npy"
    raw, kept, labels = fill(lambda shape: new_array(raw_path, shape))
    raw.flush()
    if kept.all():
        del raw
        os.replace(raw_path, folder / f"{part}_images.npy")
        np.save(folder / f"{part}_labels.npy", np.asarray(labels, dtype=np.int64))
        return int(len(labels))
    count = write_rows(folder, part, raw, np.asarray(labels), np.flatnonzero(kept))
    del raw
    raw_path.unlink()
    return count
