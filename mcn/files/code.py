"""The code a run ran, and a sweep's copy of it.

`code_version()`: what this process runs, as a record kept in `run_status.json` (`code`), the fusion results JSON
and a sweep's manifest: `hash` (of the files below, 12 hex digits), `mcn` (the package's version), `git_commit` and
`git_dirty` (uncommitted changes in the checkout, untracked files included; both None: "not a git checkout"),
`source` (the checkout the code came from) and `path` (where this process imports it from).

`snapshot_code(folder)`: the code and config files (CODE_DIRS: the `mcn` package, the `hydra_plugins/mcn_launcher`
launchers, the `conf/` tree) copied to `<folder>/<hash>/`, with their version in `code_version.json` there; a copy
with the same content is reused. A sweep's jobs import and compose their config from it
(hydra_plugins/mcn_launcher), so that an edit made after submitting reaches no job already submitted: pending,
requeued or retried. Its files are the same as the checkout's, so its hash is too.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path

import mcn
from mcn.files.io import write_json

CODE_DIRS = ("mcn", "hydra_plugins/mcn_launcher", "conf")  # relative to the code root, the folder holding `mcn`
VERSION_FILE = "code_version.json"  # in a snapshot's root: the version of the checkout it was copied from
_SKIP = shutil.ignore_patterns("__pycache__", "*.pyc")


def code_root() -> Path:
    """The folder this process imports `mcn` from: a checkout, a sweep's snapshot, or site-packages. Read from this
    module's own file: `mcn.__file__` is None where a folder named `mcn` in the working directory made `mcn` a
    namespace package (launching from the parent of a clone called `mcn`)."""
    return Path(__file__).resolve().parents[2]


def _files(root: Path) -> list[Path]:
    found = []
    for name in CODE_DIRS:
        for path in sorted((root / name).rglob("*")):
            if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc":
                found.append(path)
    return found


def code_hash(root: Path) -> str:
    """12 hex digits of a SHA-256 over the names and contents of the code and config files under `root`."""
    digest = hashlib.sha256()
    for path in _files(root):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:12]


def _git(root: Path, *args: str) -> str | None:
    try:
        proc = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):  # no git here
        return None
    return proc.stdout if proc.returncode == 0 else None


def checkout_version(root: Path) -> dict:
    """The version of the code under `root` as it is on disk now (see the module's docstring)."""
    commit = _git(root, "rev-parse", "HEAD")
    changes = _git(root, "status", "--porcelain") if commit else None
    return {
        "hash": code_hash(root),
        "mcn": mcn.__version__,
        "git_commit": commit.strip() if commit else None,
        "git_dirty": bool(changes.strip()) if changes is not None else None,
        "source": str(root),
        "path": str(root),
    }


@functools.cache
def code_version() -> dict:
    """The version of the code this process runs: its snapshot's record when it runs from one, else its checkout's.
    Computed once per process: what it imported at its start is what it runs."""
    root = code_root()
    try:
        return {**json.loads((root / VERSION_FILE).read_text()), "path": str(root)}
    except (OSError, ValueError):  # not a snapshot
        return checkout_version(root)


def describe(version: dict) -> str:
    """One line: `3f2a91c0e1b2 (mcn 0.1.0, git c4f4956, uncommitted changes)`, or `... not a git checkout)`; the hash
    alone when that is all there is."""
    if "mcn" not in version:
        return version["hash"]
    if version.get("git_commit"):
        git = f"git {version['git_commit'][:7]}" + (", uncommitted changes" if version.get("git_dirty") else "")
    else:
        git = "not a git checkout"
    return f"{version['hash']} (mcn {version.get('mcn')}, {git})"


def snapshot_version(folder: Path, code: str) -> dict | None:
    """The record of snapshot `code` in `folder`; None when it is not there."""
    try:
        return json.loads((folder / code / VERSION_FILE).read_text())
    except (OSError, ValueError):
        return None


def snapshot_code(folder: Path) -> dict:
    """The code this process runs, copied to `folder/<hash>/` (reused when a copy of the same content is there); its
    version record, with `path` the copy. The files are hashed as copied, so the hash names what the copy holds
    even if the checkout changes meanwhile."""
    source, folder = code_root(), Path(folder).absolute()  # absolute: jobs find it from wherever they start
    folder.mkdir(parents=True, exist_ok=True)
    staging = folder / f".tmp-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    for name in CODE_DIRS:
        if (source / name).is_dir():  # an installed mcn has no conf/ beside it
            shutil.copytree(source / name, staging / name, ignore=_SKIP)
    version = {**code_version(), "hash": code_hash(staging)}  # git as the process found it at its start
    target = folder / version["hash"]
    if (target / VERSION_FILE).exists():
        shutil.rmtree(staging)
    else:
        write_json(staging / VERSION_FILE, {k: v for k, v in version.items() if k != "path"})
        shutil.rmtree(target, ignore_errors=True)  # a copy that never got its record: cut short
        os.replace(staging, target)
    return {**version, "path": str(target)}


def snapshot_environment(code: dict | None, pythonpath: str | None) -> dict[str, str]:
    """What a job's environment needs to import from the snapshot `code` (`snapshot_code`'s record): the snapshot
    first on sys.path, then `pythonpath` (the job's own PYTHONPATH), and no checkout in the working directory ahead of
    them (`python -m submitit.core._submit` puts the working directory first, unless PYTHONSAFEPATH is set). Nothing
    without a snapshot."""
    if code is None:
        return {}
    return {"PYTHONPATH": code["path"] + (f":{pythonpath}" if pythonpath else ""), "PYTHONSAFEPATH": "1"}
