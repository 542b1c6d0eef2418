"""submitit's Hydra launchers, subclassed so that a Slurm sweep is submitted and left to run, can be followed,
retried and relaunched in place (mcn.sweep), and says why in one line when it cannot run.

- Slurm: the jobs go out as arrays no larger than the cluster's MaxArraySize, the command prints the array
  ids, the sweep folder and the `python -m mcn.sweep` commands and returns; hydra.launcher.wait=true waits
  for the jobs instead (submitit's behaviour). The local launcher always waits.
- What runs is what was submitted: `launch` copies the code and config (the mcn package, these launchers, conf/) to
  `<sweep>/.code/<hash>/` (mcn.files.code, reused while they do not change), and every job of that submission
  imports and composes its config from the copy, whether it starts at once, hours later, after a requeue or from
  `mcn.sweep retry`: PYTHONPATH names the copy (PYTHONSAFEPATH keeps a checkout in the working directory off
  sys.path, Python >= 3.11), and the Hydra context pickled with the launcher searches the copy's conf/.
- Every sweep keeps a manifest in its folder (mcn.cluster.manifest.Sweep), written under the folder's lock: one
  launch of a sweep at a time (a second one waits for the first's submission), and none while jobs of it are queued
  or running (one line names their array). Launching into a sweep folder that has one (the same sweep.name, or
  hydra.sweep.dir) skips the jobs whose run is done; the others start again in their own folders, where they
  resume from train_state.pth.
- no `sbatch` on the PATH: name `hydra/launcher=local` instead of a traceback;
- sbatch refuses the request (impossible resources, unknown partition): sbatch's own message;
- a job fails (while waiting): one line per failed job (its overrides and error), then exit status 2 (bad
  input) or 1.
Requeue on preemption / time-out is Slurm's and submitit's; resuming is the recipes' (train_state.pth).
"""

import dataclasses
import logging
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from hydra._internal.config_loader_impl import ConfigLoaderImpl
from hydra._internal.config_search_path_impl import ConfigSearchPathImpl
from hydra.core.config_store import ConfigStore
from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, filter_overrides
from omegaconf import open_dict

from hydra_plugins.hydra_submitit_launcher.config import SlurmQueueConf
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import BaseSubmititLauncher
from mcn import shell
from mcn.cli import fail as _fail
from mcn.cluster.jobs import JobState, job_states, live_refusal, submitted_message
from mcn.cluster.manifest import Sweep, lock_sweep
from mcn.cluster.slurm import last_error_line, max_array_size
from mcn.cluster.submit import make_executor
from mcn.errors import MCNError
from mcn.files import HydraRecord, RunFolder, lock, read_status
from mcn.files.code import code_root, describe, snapshot_code, snapshot_environment

log = logging.getLogger(__name__)


@dataclass
class MCNSlurmQueueConf(SlurmQueueConf):
    _target_: str = "hydra_plugins.mcn_launcher.launcher.MCNSlurmLauncher"
    wait: bool = False  # true: stay in the foreground until every job ended


ConfigStore.instance().store(group="hydra/launcher", name="mcn_slurm", node=MCNSlurmQueueConf, provider="mcn")


class _SweepLauncher(BaseSubmititLauncher):
    """What both launchers share: the manifest, the code snapshot, skipping finished jobs, submitting in arrays,
    waiting."""

    code: dict | None = None  # the snapshot the jobs run (mcn.files.code); None: a launcher pickled before snapshots

    def freeze_code(self, sweep: Sweep) -> None:
        """Copy the code and config to the sweep folder and point this launcher's jobs at the copy: their config is
        composed from its conf/ (Hydra's search path, pickled with the launcher), their modules come from it
        (`code_environment`)."""
        self.code = snapshot_code(sweep.files.code)
        sweep.code = self.code["hash"]
        conf, copy = code_root() / "conf", Path(self.code["path"]) / "conf"
        loader = self.hydra_context.config_loader
        search_path = ConfigSearchPathImpl()
        for element in loader.get_search_path().get_path():
            path = element.path
            if element.provider == "main" and Path(path.removeprefix("file://")).resolve() == conf:
                path = str(copy)
            elif element.provider == "main":
                log.warning("the config in %s is not mcn's conf/: jobs read it as it is when they start", path)
            search_path.append(element.provider, path)
        self.hydra_context = dataclasses.replace(self.hydra_context, config_loader=ConfigLoaderImpl(search_path))
        print(f"mcn: the jobs run code {describe(self.code)} from {self.code['path']}, not the checkout", flush=True)
        if sys.version_info < (3, 11) and (Path.cwd() / "mcn").is_dir():  # no PYTHONSAFEPATH before 3.11
            log.warning(
                "Python %d.%d puts the working directory, a checkout, ahead of the snapshot on the jobs' sys.path: "
                "they import its code as it is when they start; launch from another folder to pin it",
                *sys.version_info[:2],
            )

    def code_environment(self, pythonpath: str | None) -> dict[str, str]:
        """What a job's environment needs to import from the snapshot: the snapshot first on sys.path, then
        `pythonpath` (the job's own PYTHONPATH), and no checkout in the working directory ahead of them (`python -m
        submitit.core._submit` puts the working directory first, unless PYTHONSAFEPATH is set)."""
        return snapshot_environment(self.code, pythonpath)

    def skip(self, view: JobState) -> bool:
        """A relaunch skips the jobs whose run is done (one with jobs queued or running is refused: live_refusal)."""
        return view.done

    def __call__(self, sweep_overrides, job_dir_key, job_num, job_id, singleton_state) -> JobReturn:
        """The job, in its process: Hydra rewrites the run folder's .hydra/ before the task can refuse to run there (a
        resume whose config changed); a job that failed before its run started puts the earlier record back."""
        Singleton.set_state(singleton_state)
        record = HydraRecord.keep(Path(str(self.config.hydra.sweep.dir)) / self.job_folder(job_num, sweep_overrides))
        ret = super().__call__(sweep_overrides, job_dir_key, job_num, job_id, singleton_state)
        if ret.status == JobStatus.FAILED:
            record.restore_unless_started()
        return ret

    def job_folder(self, num: int, overrides: list[str]) -> str:
        """The job's run folder under the sweep folder, composed as the job will compose it."""
        config = self.hydra_context.config_loader.load_sweep_config(self.config, overrides)
        with open_dict(config.hydra.job):
            config.hydra.job.num = num
        return str(config.hydra.sweep.subdir)

    def executor(self):
        """submitit's executor with the launcher's request; on Slurm its job script puts the job on the sweep's code
        snapshot, again when Slurm requeues it."""
        return make_executor(
            self._EXECUTOR, self.params, self.params["submitit_folder"], environment=self.code_environment(None)
        )

    def array_size(self) -> int | None:
        return None

    def submit(self, sweep, jobs: list, singletons: dict) -> list:
        """Submit `jobs` (mcn.cluster.manifest.SweepJob) in arrays of at most `array_size()`; their job ids go to the
        manifest as each array is accepted."""
        from submitit.core.utils import FailedJobError

        executor, size, submitted = self.executor(), self.array_size() or len(jobs), []
        for start in range(0, len(jobs), size):
            chunk = jobs[start : start + size]
            args = [(j.overrides, "hydra.sweep.dir", j.num, f"job_id_for_{j.num}", singletons) for j in chunk]
            try:
                arrays = executor.map_array(self, *zip(*args))
            except FailedJobError as e:
                sweep.save()
                refused = f"Slurm refused the sweep: {last_error_line(str(e))}"
                if not submitted:
                    _fail(
                        f"{refused}; adjust hydra.launcher.* (partition, mem_gb, cpus_per_task, gpus_per_node, "
                        f"timeout_min)"
                    )
                _fail(
                    f"{refused}, after {len(submitted)} of {len(jobs)} jobs; "
                    f"{shell.command('mcn.sweep', 'retry', sweep.root)} submits the rest"
                )
            for job, array_job in zip(chunk, arrays):
                job.job_ids.append(array_job.job_id)
                job.code = self.code and self.code["hash"]
            sweep.save()
            submitted += arrays
        return submitted

    def launch(self, job_overrides, initial_job_idx):
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        log.info(f"Submitit '{self._EXECUTOR}' sweep output dir : {sweep_dir}")
        sweep_dir.mkdir(parents=True, exist_ok=True)
        if "mode" in self.config.hydra.sweep:
            os.chmod(sweep_dir, mode=int(str(self.config.hydra.sweep.mode), 8))
        try:
            lock_sweep(sweep_dir)  # a second launch of the same sweep waits for this one's submission, then refuses
        except MCNError as e:
            _fail(str(e))
        try:
            return self._launch(sweep_dir, job_overrides, initial_job_idx)
        finally:
            lock.release(sweep_dir)

    def _launch(self, sweep_dir: Path, job_overrides, initial_job_idx):
        sweep = Sweep.create_or_open(sweep_dir, self._EXECUTOR, self.params["submitit_folder"])
        if sweep.rebuilt:
            print(f"mcn: {sweep.rebuilt}", file=sys.stderr, flush=True)
        jobs = [
            sweep.add(num, list(overrides), self.job_folder(num, list(overrides)))
            for num, overrides in enumerate(job_overrides, initial_job_idx)
        ]
        every, _ = job_states(sweep)  # the sweep's jobs on record, this command's among them
        live = [v for v in every if v.live]
        if live:
            _fail(live_refusal(sweep_dir, live))
        views = [next(v for v in every if v.job is job) for job in jobs]
        skipped = [v for v in views if self.skip(v)]
        todo = [v.job for v in views if not self.skip(v)]
        for v in views:
            note = f" ({v.state}: skipped)" if self.skip(v) else ""
            log.info(f"\t#{v.job.num} : {' '.join(filter_overrides(v.job.overrides))}{note}")
        sweep.save()
        if not todo:
            print(f"mcn: nothing to submit: every job of {sweep_dir} is done")
            print(f"mcn: {shell.command('mcn.sweep', 'status', sweep_dir)}")
            return []
        self.freeze_code(sweep)
        singletons = Singleton.get_state()
        sweep.keep_launcher(self, singletons)
        submitted = self.submit(sweep, todo, singletons)
        return self.results(submitted, todo, skipped, sweep_dir)

    def results(self, submitted: list, jobs: list, skipped: list[JobState], sweep_dir: Path) -> list:
        """Wait for every job, with one line as each ends; a job that failed or ended without a result is one line,
        then the exit."""
        from submitit.core.utils import FailedJobError, UncompletedJobError

        self.follow(submitted, jobs, sweep_dir)
        try:
            returns = [job.results()[0] for job in submitted]
        except FailedJobError as e:
            _fail(f"a sweep job failed: {last_error_line(str(e))} (job logs: {sweep_dir}/.submitit/)")
        except UncompletedJobError as e:
            _fail(f"a sweep job ended without a result: {last_error_line(str(e))} (job logs: {sweep_dir}/.submitit/)")
        # Hydra hands a job's exception back inside its JobReturn; the sweep would re-raise it with a traceback
        failed = [(job, r) for job, r in zip(jobs, returns) if r.status == JobStatus.FAILED]
        for job, r in failed:
            error = r._return_value
            print(
                f"mcn: error: sweep job #{job.num} ({' '.join(r.overrides)}): {type(error).__name__}: {error}",
                file=sys.stderr,
            )
        if failed:
            raise SystemExit(2 if all(isinstance(r._return_value, MCNError) for _, r in failed) else 1)
        return returns

    def follow(self, submitted: list, jobs: list, sweep_dir: Path, every_s: float = 1.0) -> None:
        """Until every job has ended: one line as each ends, with its run's outcome (run_status.json); the jobs'
        own lines, each epoch's included, are in the log files of their folders."""
        waiting = list(zip(jobs, submitted))
        seen: dict[int, float] = {}  # job number -> when it was first seen in a state Slurm may requeue it from
        while waiting:
            running = []
            for job, submission in waiting:
                if not submission.done():
                    seen.pop(job.num, None)
                    running.append((job, submission))
                elif _may_come_back(submission, seen.setdefault(job.num, time.time())):
                    running.append((job, submission))
                else:
                    print(f"mcn: job #{job.num} {_outcome(sweep_dir / job.folder)}", flush=True)
            waiting = running
            if waiting:
                time.sleep(every_s)


REQUEUED_FROM = ("NODE_FAIL", "PREEMPTED")  # a requeued job passes through these before it is PENDING again


def _may_come_back(submission, since: float, grace_s: float = 60.0) -> bool:
    """Whether an ended-looking job may still be requeued: Slurm shows NODE_FAIL or PREEMPTED for a moment
    before it requeues the job; after `grace_s` in such a state it is taken as final."""
    state = str(getattr(submission, "state", "")).split()[0] if getattr(submission, "state", "") else ""
    return state in REQUEUED_FROM and time.time() - since < grace_s


def _outcome(folder: Path) -> str:
    """How a job's run ended (its run_status.json), and its folder."""
    run = read_status(RunFolder(folder).status) or {}
    if run.get("state") != "done":
        return f"{run.get('state') or 'ended before its run started'} ({folder})"
    return f"done: best val {run['best_val_accuracy']:.4f} at epoch {run['best_epoch']} of {run['epochs']} ({folder})"


class MCNSlurmLauncher(_SweepLauncher):
    _EXECUTOR = "slurm"

    def __init__(self, wait: bool = False, **params) -> None:
        super().__init__(**params)
        self.wait = wait  # a hydra.launcher key of ours, not an sbatch parameter

    def array_size(self) -> int | None:
        return max_array_size()

    def results(self, submitted: list, jobs: list, skipped: list[JobState], sweep_dir: Path) -> list:
        """Say what was submitted and how to follow it; wait only with hydra.launcher.wait=true."""
        print(submitted_message(sweep_dir, [j.job_id for j in submitted], skipped), flush=True)
        return super().results(submitted, jobs, skipped, sweep_dir) if self.wait else []

    def launch(self, job_overrides, initial_job_idx):
        if shutil.which("sbatch") is None:
            _fail(
                "no `sbatch` on the PATH, so this machine cannot submit to Slurm; "
                "add hydra/launcher=local to run the sweep here (or experiment=quickstart)"
            )
        return super().launch(job_overrides, initial_job_idx)


class MCNLocalLauncher(_SweepLauncher):
    _EXECUTOR = "local"

    def submit(self, sweep, jobs: list, singletons: dict) -> list:
        """The jobs run at once on this machine's cores: each learns how many share them (MCN_LOCAL_JOBS), so that
        its default thread count (mcn.training.runtime.choose_threads) does not oversubscribe them."""
        # the job processes inherit these: the jobs sharing the cores, and the code snapshot
        env = {"MCN_LOCAL_JOBS": str(len(jobs)), **self.code_environment(os.environ.get("PYTHONPATH"))}
        before = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        try:
            return super().submit(sweep, jobs, singletons)
        finally:
            for k, v in before.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
