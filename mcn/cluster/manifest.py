"""A -m sweep's manifest, `sweep.json` in the sweep folder (`mcn.files.SweepFiles`): every job's number,
overrides, run folder and the Slurm job ids it was submitted as; beside it the launcher itself (its Slurm request
and Hydra context), which `mcn.sweep retry` submits again."""

from __future__ import annotations

import json
import os
import shlex
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from mcn import shell
from mcn.errors import MCNError
from mcn.files import RunFolder, SweepFiles, atomic_write, lock, read_status, write_json

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
        self.rebuilt: str | None = None  # why and whence its record was rebuilt (`rebuild`) rather than read

    @classmethod
    def open(cls, folder: str | Path) -> Sweep:
        """The sweep in `folder`. A record (sweep.json) that is missing or damaged is rebuilt from what submitit keeps
        beside it (`rebuild`; `rebuilt` then says why); MCNError where it cannot be."""
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
            missing = not files.manifest.exists()
            damage = f"{files.manifest} is {'missing' if missing else f'damaged ({type(e).__name__}: {e})'}"
        if files.launcher.exists():
            return cls.rebuild(files.root, damage)
        if missing and not any(RunFolder(d).status.exists() for d in files.root.iterdir() if d.is_dir()):
            raise MCNError(
                f"{folder} is not a sweep folder ({files.manifest.name} missing); point at the folder a "
                f"-m sweep printed, e.g. outputs/multirun/2026-11-27/10-00-00"
            )
        raise MCNError(
            f"{damage}, and {files.launcher}, which it is rebuilt from, is missing too; launch the sweep again into "
            f"this folder (its command with {shell.hydra_override('hydra.sweep.dir', files.root.absolute())} in "
            f"place of sweep.name): that writes the record anew, skips the jobs whose run is done, resumes the others"
        )

    @classmethod
    def rebuild(cls, folder: Path, damage: str) -> Sweep:
        """The record rebuilt from what submitit keeps in the sweep folder: the launcher (`.submitit/launcher.pkl`:
        which one, where and how it was launched) and each submitted job's pickle (`<job id>_submitted.pkl`: its
        number and overrides); its run folder composed as the launcher composes it. `damage`: why (see `rebuilt`)."""
        import pickle

        from hydra.core.singleton import Singleton

        sweep = cls(folder, "", "", "", [])
        launcher, singletons = sweep.load_launcher()
        before = Singleton.get_state()  # a launch rebuilding the record goes on with its own Hydra state
        Singleton.set_state(singletons)  # Hydra's config store as it was at launch: composing a job's folder needs it
        try:
            hydra = launcher.config.hydra
            sweep.launcher, sweep.cwd, sweep.code = (
                launcher._EXECUTOR,
                hydra.runtime.cwd,
                launcher.code and launcher.code["hash"],
            )
            sweep.origin = os.path.join(sweep.cwd, str(hydra.sweep.dir))
            sweep.logs = os.path.relpath(os.path.join(sweep.cwd, launcher.params["submitit_folder"]), sweep.origin)
            typed = [o for o in hydra.overrides.hydra if not o.startswith("hydra.mode=")]  # Hydra adds hydra.mode
            sweep.argv = [f"mcn.{hydra.job.name}", "-m", *typed, *hydra.overrides.task]
            for path in folder.glob(f"{sweep.logs.replace('%j', '*')}/*_submitted.pkl"):
                try:
                    with open(path, "rb") as f:
                        submitted = pickle.load(f)
                    overrides, _, num = submitted.args[:3]
                except (OSError, pickle.UnpicklingError, AttributeError, ImportError, ValueError) as e:
                    raise MCNError(f"cannot rebuild {sweep.files.manifest}: {path} is unreadable ({e})") from e
                job = sweep.add(num, list(overrides), launcher.job_folder(num, list(overrides)))
                job.job_ids = sorted({*job.job_ids, path.name.removesuffix("_submitted.pkl")}, key=_submission_order)
                job.code = submitted.function.code and submitted.function.code["hash"]
        finally:
            Singleton.set_state(before)
        sweep.jobs.sort(key=lambda j: j.num)  # as the record keeps them
        sweep.rebuilt = (
            f"{damage}; rebuilt it from {sweep.files.launcher} and the jobs' submissions beside it (a retry or a "
            f"launch of the sweep writes it back)"
        )
        return sweep

    @classmethod
    def create_or_open(cls, folder: Path, launcher: str, logs: str) -> Sweep:
        """The sweep in `folder`, relaunched by `launcher` (its jobs so far kept), or a new one."""
        try:
            sweep = cls.open(folder)
        except MCNError:  # a new sweep, or one whose record cannot be rebuilt: this launch writes it anew
            sweep = cls(folder, launcher, "", "", [])
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

    def moved_advice(self) -> str | None:
        """The line for a sweep that has moved since its launch (None where it has not): its jobs, queued or
        requeued, run and look for their runs in the old place, so a job that starts now fails there."""
        moved = self.moved()
        if not moved:
            return None
        return (
            f"{self.root} was launched as {moved} and has moved since: its jobs run and look for their runs in the "
            f"old place; move it back ({shell.shell_join(['mv', self.root, moved])}) or launch it again where it is: "
            f"{self.command}"
        )

    def add(self, num: int, overrides: list[str], folder: str) -> SweepJob:
        """The job that runs in `folder` (the one on record, or a new one)."""
        for job in self.jobs:
            if job.folder == folder:
                job.num, job.overrides = num, overrides
                return job
        # a job that started has its Slurm job id in its run folder: a record lost since still finds a live job
        started = (read_status(RunFolder(self.root / folder).status) or {}).get("slurm_job_id")
        self.jobs.append(SweepJob(num, overrides, folder, [started] if started else []))
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


def runs_job(run_folder: Path, job_id: str | None) -> bool:
    """Whether the sweep record beside `run_folder` (sweep.json in its parent) has Slurm job `job_id` running in it:
    the folder is that job's own, not one the job made for a run of its own choosing (a search worker's trial)."""
    try:
        manifest = json.loads(SweepFiles(Path(run_folder).parent).manifest.read_text())
        return any(job["folder"] == Path(run_folder).name and job_id in job["job_ids"] for job in manifest["jobs"])
    except (OSError, ValueError, KeyError, TypeError):
        return False


def lock_sweep(folder: Path, wait_s: float = 30.0) -> None:
    """One launch, retry or cancel of a sweep at a time, and sweep.json written by that one: this process takes the
    sweep folder's lock (mcn.files.lock, released with `lock.release(folder)` or when the process ends), waiting up to
    `wait_s` for another process that holds it (a submission takes seconds). MCNError naming the holder otherwise."""
    if not folder.is_dir():
        raise MCNError(f"sweep folder {folder} does not exist")
    deadline, said = time.time() + wait_s, False
    while True:
        try:
            lock.acquire(folder)
            return
        except lock.FolderInUse:
            holder = lock.describe(lock.holder(folder))
        if time.time() >= deadline:
            status = shell.command("mcn.sweep", "status", folder.absolute(), "--watch")
            raise MCNError(
                f"sweep {folder.absolute()} is being submitted, run or cancelled by {holder}: one launch, retry or "
                f"cancel of a sweep at a time; follow it with {status}, and try again once that command has returned"
            )
        if not said:
            print(f"mcn: waiting for {holder}, which is submitting or cancelling {folder}", file=sys.stderr, flush=True)
            said = True
        time.sleep(0.5)


def _submission_order(job_id: str) -> tuple[int, ...]:
    """Slurm's job ids (`5`, `5_0`) grow with each submission."""
    return tuple(int(part) for part in job_id.split("_") if part.isdigit())
