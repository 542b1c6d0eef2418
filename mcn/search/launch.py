"""Launch a search's workers and follow them: `python -m mcn.tune` (launch, or continue), `python -m mcn.sweep
status|retry|cancel <search folder>`.

On Slurm the workers go out as one job array (`search.workers` tasks) with the request of `hydra.launcher` (the
guide's, conf/hydra/launcher/slurm.yaml) and the command returns; with hydra/launcher=local they run as processes of
this machine and the command waits for them. Either way every worker imports the search's code snapshot
(`<search>/.code/<hash>`, mcn.files.code), whenever it starts or restarts.
"""

from __future__ import annotations

import copy
import difflib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from mcn import shell
from mcn.cluster.jobs import plural, submitted_message
from mcn.cluster.slurm import LIVE, last_error_line, require_slurm, slurm_states
from mcn.cluster.submit import make_executor
from mcn.errors import ConfigError, MCNError
from mcn.files import atomic_write, lock
from mcn.files.code import describe, snapshot_code, snapshot_environment, snapshot_version
from mcn.schema import check_config
from mcn.search.folder import FORMAT, RELAUNCH_IGNORES, SearchFolder, Worker, check_settings
from mcn.search.report import finished, report_once, summary
from mcn.search.worker import SearchWorker
from mcn.training.config import config_changes, resolved, restoring_overrides

SUBMITIT = ".submitit/%j"  # the Slurm workers' job files, under the search folder
AS_WORKERS = {"noun": "worker", "kind": "search", "retries": "ended workers while trials remain or are lost"}


def launch(cfg: DictConfig, folder: Path, launcher: dict, rerun_overrides: list[str]) -> None:
    """Start the search in `folder` (or go on with it: the same config, more trials or workers allowed), submit the
    workers that are not queued or running, and (locally) wait for them. `launcher`: the resolved `hydra.launcher`;
    `rerun_overrides`: the command line's overrides, which the rerun of the best configuration keeps."""
    check_config(cfg)
    check_settings(cfg.search)
    for key in cfg.search.params:
        if OmegaConf.select(cfg, str(key), default="<absent>") == "<absent>":
            close = difflib.get_close_matches(str(key), _leaf_keys(OmegaConf.to_container(cfg)), n=2)
            raise ConfigError(
                f"search.params names {key}, which is not a config key"
                + (f" (did you mean {' or '.join(close)}?)" if close else "; e.g. optim.base_lr")
            )
    kind = "slurm" if launcher["_target_"].endswith("SlurmLauncher") else "local"
    if kind == "slurm" and shutil.which("sbatch") is None:
        raise MCNError(
            "no `sbatch` on the PATH, so this machine cannot submit to Slurm; add hydra/launcher=local to run the "
            "search's workers here"
        )
    config = resolved(cfg)
    search = SearchFolder(folder)
    if SearchFolder.is_search(folder):
        search = SearchFolder.open(folder)
        changes = [c for c in config_changes(search.config, config) if not c.startswith(RELAUNCH_IGNORES)]
        if changes:
            # the same command composing another config: mcn's defaults changed since; the overrides give them back
            back = restoring_overrides(search.config, config, RELAUNCH_IGNORES)
            again = (
                f"add {shell.shell_join(back)} to this command to go on with that one as it began"
                if back and search.launched_with(["mcn.tune", *sys.argv[1:]])
                else f"launch that one again as it was: {search.command}"
            )
            raise ConfigError(
                f"{folder} holds a search with another config ({'; '.join(changes[:3])}"
                f"{'; ...' if len(changes) > 3 else ''}); give this one its own search.name=..., or {again}"
            )
    search.data.update(
        format=FORMAT,
        root=str(folder.absolute()),
        cwd=os.getcwd(),
        argv=["mcn.tune", *sys.argv[1:]],
        rerun_overrides=rerun_overrides,
        launcher=kind,
        launcher_params={k: v for k, v in launcher.items() if k not in ("_target_", "submitit_folder")},
        config=config,
        workers=search.data.get("workers", []),
    )
    search.save()
    composed = copy.deepcopy(cfg)
    composed.sweep.name = str(cfg.sweep.name)  # Hydra's ${now:} resolves in Hydra's processes only
    atomic_write(search.config_file, lambda f: f.write(OmegaConf.to_yaml(composed).encode()))
    study = search.study()
    if finished(search, study):
        report_once(search, study)
        print(f"mcn: nothing to submit: the search in {folder} is finished", flush=True)
        print("\n".join(summary(search, study)), flush=True)
        return
    live = _live_workers(search)
    todo = [i for i in range(int(cfg.search.workers)) if i not in live]
    if not todo:
        print(f"mcn: nothing to submit: every worker of {folder} is queued or running", flush=True)
        print(f"mcn: {shell.command('mcn.sweep', 'status', folder)}", flush=True)
        return
    code = snapshot_code(search.code_dir)
    search.data["code"] = code["hash"]
    search.save()
    print(f"mcn: the workers run code {describe(code)} from {code['path']}, not the checkout", flush=True)
    jobs = submit(search, todo, code)
    if kind == "slurm":
        print(submitted_message(search.root, [j.job_id for j in jobs], [], **AS_WORKERS), flush=True)
        return
    wait(search, jobs)


def submit(search: SearchFolder, indices: list[int], code: dict) -> list:
    """Workers `indices` as one Slurm array through submitit (their job ids go to the manifest), or as processes
    of this machine (their logs in `<search>/workers/`)."""
    from submitit.core.utils import FailedJobError

    kind, params = search.data["launcher"], dict(search.data["launcher_params"])
    if kind == "local":
        return [start_local(search, index, code, len(indices)) for index in indices]
    executor = make_executor(kind, params, str(search.root / SUBMITIT), environment=snapshot_environment(code, None))
    executor.update_parameters(slurm_array_parallelism=len(indices))
    try:
        jobs = executor.map_array(SearchWorker(str(search.root.absolute())), indices)
    except FailedJobError as e:
        raise MCNError(
            f"Slurm refused the search's workers: {last_error_line(str(e))}; adjust hydra.launcher.* (partition, "
            f"mem_gb, cpus_per_task, gpus_per_node, timeout_min)"
        ) from None
    workers = {w.index: w for w in search.workers}
    for index, job in zip(indices, jobs):
        workers.setdefault(index, Worker(index)).job_ids.append(job.job_id)
    search.data["workers"] = [workers[i] for i in sorted(workers)]
    search.save()
    return jobs


def start_local(search: SearchFolder, index: int, code: dict, sharing: int) -> subprocess.Popen:
    """Worker `index` as a process of this machine, on the search's code snapshot; its output appended to
    `<search>/workers/worker_<index>.log`. `sharing`: the workers on the cores (each takes its share of threads)."""
    env = {**os.environ, **snapshot_environment(code, os.environ.get("PYTHONPATH")), "MCN_LOCAL_JOBS": str(sharing)}
    log = search.worker_log(index)
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "mcn.tune_worker", str(search.root.absolute()), str(index)],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # Ctrl-C reaches the workers once, from `wait`
        )


def wait(search: SearchFolder, workers: list[subprocess.Popen]) -> None:
    """Local workers: one line as each ends, then where the search stands. Ctrl-C or SIGTERM stops them too, each at
    its trial's next step with its last epoch saved (the trials stay running in the study: launched again, the search
    resumes them)."""

    def terminated(signum, frame):
        raise KeyboardInterrupt

    failed, previous = [], signal.signal(signal.SIGTERM, terminated)
    try:
        waiting = dict(enumerate(workers))
        while waiting:
            for index, proc in list(waiting.items()):
                if proc.poll() is None:
                    continue
                del waiting[index]
                if proc.returncode == 0:
                    print(f"mcn: worker {index} ended: no trial left to take", flush=True)
                    continue
                failed.append(f"worker {index} failed: {_why(proc.returncode, search.worker_log(index))}")
            time.sleep(0.5)
    except KeyboardInterrupt:
        for proc in workers:
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
        for proc in workers:
            proc.wait()
        error = MCNError(f"interrupted: the workers were stopped; go on with: {search.command}")
        error.exit_status = 130
        raise error from None
    finally:
        signal.signal(signal.SIGTERM, previous)
    study = search.study()
    print("\n".join(summary(search, study)), flush=True)
    if failed:
        raise MCNError(f"{'; '.join(failed)}; go on with: {search.command}")


def _why(returncode: int, log: Path) -> str:
    """A failed local worker's line: the signal that killed it, or its log's last error line."""
    if returncode < 0:
        return f"killed by {signal.Signals(-returncode).name} (its log: {log})"
    tail = log.read_text(errors="replace")[-20000:] if log.exists() else ""
    errors = [line.removeprefix("mcn: error: ") for line in tail.splitlines() if line.startswith("mcn: error: ")]
    return f"{errors[-1] if errors else last_error_line(tail)} (its log: {log})"


def _live_workers(search: SearchFolder) -> set[int]:
    """The workers Slurm holds as queued or running (none for local workers: the command that ran them has ended)."""
    if search.data["launcher"] != "slurm":
        return set()
    states = slurm_states([w.job_id for w in search.workers if w.job_id]) or {}
    return {w.index for w in search.workers if states.get(w.job_id) in LIVE}


def status(folder: str | Path, watch: float | None = None) -> int:
    """Trials and workers (every `watch` seconds until no worker is queued or running); 1 when the search is not
    finished and no worker is left to finish it (retry, or launch again)."""
    while True:
        search = SearchFolder.open(folder)
        study = search.study()
        slurm = search.data["launcher"] == "slurm"
        states = slurm_states([w.job_id for w in search.workers if w.job_id]) if slurm else None
        if finished(search, study):
            report_once(search, study)
        if slurm:
            live = sum((states or {}).get(w.job_id) in LIVE for w in search.workers)
        else:  # local workers: one that runs holds its trial's folder
            live = sum(lock.holder(search.trial_folder(t.number)) is not None for t in study.get_trials(deepcopy=False))
        text = "\n".join(summary(search, study, live) + _worker_lines(search, slurm, states))
        print(text if watch is None else "\033[H\033[2J" + time.strftime("%H:%M:%S ") + text, flush=True)
        if watch is None or not live:
            return 0 if finished(search, study) or live else 1
        time.sleep(watch)


def _worker_lines(search: SearchFolder, slurm: bool, states: dict | None) -> list[str]:
    if not slurm:
        return [f"workers: local processes (their logs: {search.root / 'workers'}/)"]
    if states is None:
        shown = "Slurm does not answer here (squeue, sacct)"
    else:
        shown = ", ".join(f"#{w.index} {w.job_id or '-'} {states.get(w.job_id, 'UNKNOWN')}" for w in search.workers)
    lines = [f"workers: {shown}"]
    code = snapshot_version(search.code_dir, search.data["code"]) if search.data.get("code") else None
    if code:
        lines.append(f"code: {describe(code)}")
    return lines


def retry(folder: str | Path) -> int:
    """Resubmit the workers that ended (failed, cancelled, timed out for good) while trials remain or are lost."""
    search = SearchFolder.open(folder)
    if search.data["launcher"] != "slurm":
        raise MCNError(f"{folder} ran on local processes; go on with it with: {search.command}")
    moved = search.moved()
    if moved:
        raise MCNError(
            f"{folder} was launched as {moved} and has moved since: its workers would write in the old place; move it "
            f"back ({shell.shell_join(['mv', folder, moved])}) or launch it again where it is: {search.command}"
        )
    require_slurm("sbatch")
    study = search.study()
    if finished(search, study):
        raise MCNError(f"nothing to retry in {folder}: the search is finished")
    if not os.path.isdir(search.data["cwd"]):
        raise MCNError(
            f"{folder} was launched from {search.data['cwd']}, which is gone; launch it again from the folder its "
            f"config's relative paths start in, with {shell.hydra_override('hydra.run.dir', search.root)}"
        )
    live = _live_workers(search)
    todo = [w.index for w in search.workers if w.index not in live]
    if not todo:
        raise MCNError(f"nothing to retry in {folder}: every worker is queued or running")
    code = snapshot_version(search.code_dir, search.data.get("code"))
    if code is None:
        raise MCNError(f"{search.code_dir} lacks the search's code snapshot; launch it again: {search.command}")
    os.chdir(search.data["cwd"])  # the config's relative paths start where it was launched
    jobs = submit(search, todo, {**code, "path": str(search.code_dir / search.data["code"])})
    print(submitted_message(search.root, [j.job_id for j in jobs], [], **AS_WORKERS), flush=True)
    return 0


def cancel(folder: str | Path) -> int:
    search = SearchFolder.open(folder)
    require_slurm("scancel")
    live = [w.job_id for w in search.workers if w.index in _live_workers(search)]
    if not live:
        raise MCNError(f"nothing to cancel in {folder}: no worker is queued or running")
    refused = subprocess.run(["scancel", *live], capture_output=True, text=True)
    if refused.returncode:
        raise MCNError(f"scancel refused to cancel {' '.join(live)}: {refused.stderr.strip() or refused.returncode}")
    deadline = time.time() + 120
    while time.time() < deadline and _live_workers(search):
        time.sleep(1)
    print(
        f"mcn: cancelled {plural(len(live), 'worker')}: {' '.join(live)}; their trials resume when the search goes on"
    )
    return 0


def _leaf_keys(node: dict, prefix: str = "") -> list[str]:
    keys = []
    for key, value in node.items():
        keys += _leaf_keys(value, f"{prefix}{key}.") if isinstance(value, dict) else [f"{prefix}{key}"]
    return keys
