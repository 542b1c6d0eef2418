"""A -m sweep's manifest, `sweep.json` in the sweep folder (`mcn.files.SweepFiles`): every job's number,
overrides, run folder and the Slurm job ids it was submitted as; beside it the launcher itself (its Slurm request
and Hydra context), which `mcn.sweep retry` submits again."""

from __future__ import annotations

import json
import os
import shlex
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

from mcn import shell
from mcn.errors import MCNError
from mcn.files import SweepFiles, atomic_write, write_json

FORMAT = "mcn-sweep-v1"


@dataclass
class SweepJob:
    num: int  # hydra.job.num
    overrides: list[str]
    folder: str  # the run folder, relative to the sweep folder
    job_ids: list[str] = field(default_factory=list)  # every Slurm job id it was submitted as, the current one last
    code: str | None = None  # the code snapshot it was last submitted with (`.code/<hash>`, mcn.files.code)

    @property
    def job_id(self) -> str | None:
        return self.job_ids[-1] if self.job_ids else None


class Sweep:
    """A sweep folder and its manifest. `logs`: submitit's job folder pattern (`%j`: the job id), relative to
    the sweep folder; `cwd`: where the sweep was launched from (relative paths in its config start there); `code`: the
    code snapshot its latest launch submitted (`.code/<hash>`; None before snapshots)."""

    def __init__(
        self, root: str | Path, launcher: str, cwd: str, logs: str, jobs: list[SweepJob], code: str | None = None
    ):
        self.root, self.files = Path(root), SweepFiles(Path(root))
        self.launcher, self.cwd, self.logs, self.jobs, self.code = launcher, cwd, logs, jobs, code
        self.origin = str(self.root.absolute())  # where it was launched: its jobs' config holds this path
        self.argv: list[str] | None = None  # the -m command that launched it (module, then its arguments as typed)

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
            sweep = cls(files.root, manifest["launcher"], manifest["cwd"], manifest["logs"], jobs, manifest.get("code"))
            sweep.origin, sweep.argv = manifest.get("root"), manifest.get("argv")
            return sweep
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise MCNError(
                f"{folder} is not a sweep folder ({files.manifest.name} missing or unreadable); point at the folder a "
                f"-m sweep printed, e.g. outputs/multirun/2026-11-27/10-00-00"
            ) from e

    @classmethod
    def create_or_open(cls, folder: Path, launcher: str, logs: str) -> Sweep:
        """The sweep in `folder`, relaunched by `launcher` (its jobs so far kept), or a new one."""
        sweep = cls.open(folder) if SweepFiles(folder).manifest.exists() else cls(folder, launcher, "", "", [])
        sweep.launcher, sweep.cwd, sweep.origin = launcher, os.getcwd(), str(folder.absolute())
        sweep.argv = [f"mcn.{Path(sys.argv[0]).stem}", *sys.argv[1:]]
        sweep.logs = os.path.relpath(Path(logs).absolute(), folder.absolute())
        return sweep

    @property
    def command(self) -> str:
        """The command that launches the sweep again into this folder, where it is now, skipping the jobs done: its
        own command line as typed, with the folder pinned (`hydra.sweep.dir` instead of a `sweep.name` or a
        timestamp), run from where it was launched (relative paths in its config start there)."""
        module, *args = self.argv or ["mcn.train", "-m", "..."]  # a manifest from before the record
        kept = [a for a in args if not a.lstrip("+~").startswith(("hydra.sweep.dir=", "sweep.name="))]
        folder = shell.hydra_override("hydra.sweep.dir", self.root.absolute())
        return f"cd {shlex.quote(self.cwd or '.')} && {shell.command(module, *kept, folder)}"

    def moved(self) -> str | None:
        """Where the sweep was launched, when it has moved since (None: it is where it was launched, or its manifest
        predates the record). Its launcher's config holds that path: a retry would write there."""
        if self.origin and os.path.realpath(self.origin) != os.path.realpath(self.root):
            return self.origin
        return None

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
                "root": self.origin,
                "argv": self.argv,
                "cwd": self.cwd,
                "logs": self.logs,
                "code": self.code,
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
                f"{shell.hydra_override('hydra.sweep.dir', self.root.absolute())} instead"
            ) from e

    def job_file(self, job_id: str, name: str) -> Path:
        """A file of submitit's for a job's first task: `log.err` (its stderr), `result.pkl` (written as it ends)."""
        return self.root / self.logs.replace("%j", job_id) / f"{job_id}_0_{name}"
