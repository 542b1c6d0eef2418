"""Follow a -m sweep or a search (mcn.tune) after submitting it: `python -m mcn.sweep status|retry|cancel FOLDER`.

    python -m mcn.sweep status outputs/multirun/alpha_study [--watch [SECONDS]]   one row per job
    python -m mcn.sweep retry outputs/multirun/alpha_study    resubmit failed, cancelled, timed-out, unsubmitted jobs
    python -m mcn.sweep cancel outputs/multirun/alpha_study   cancel the jobs still queued or running

The launchers (hydra_plugins/mcn_launcher) keep a manifest in the sweep folder, `sweep.json`: every job's
number, overrides, run folder and the Slurm job ids it was submitted as (mcn.files.SweepFiles); beside it the
launcher itself (its Slurm request and Hydra context), which `retry` submits again, each job into its own
folder, where it resumes from train_state.pth. A job's state is Slurm's (squeue while it is queued or
running, sacct once it ended) together with its run folder's run_status.json (mcn.files.run_status); without Slurm,
the run folder's alone. A search's folder (search.json) shows its trials and workers instead (mcn.search.launch).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from mcn import shell
from mcn.cli import ArgumentParser, one_line_errors
from mcn.cluster.jobs import job_states, plural, status_table, submitted_message
from mcn.cluster.manifest import Sweep, lock_sweep
from mcn.cluster.slurm import require_slurm
from mcn.errors import MCNError
from mcn.search import launch as search_launch
from mcn.search.folder import SearchFolder


def open_sweep(folder: str) -> Sweep:
    """The sweep in `folder`, saying so on stderr when its record had to be rebuilt."""
    sweep = Sweep.open(folder)
    if sweep.rebuilt:
        print(f"mcn: {sweep.rebuilt}", file=sys.stderr, flush=True)
    return sweep


def status(folder: str, watch: float | None = None) -> int:
    """Print the table (every `watch` seconds until no job is queued or running); 1 when a job needs a retry."""
    sweep = open_sweep(folder)
    while True:
        views, from_slurm = job_states(sweep)
        table = status_table(sweep, views, from_slurm)
        print(table if watch is None else "\033[H\033[2J" + time.strftime("%H:%M:%S ") + table, flush=True)
        if watch is None or not any(v.live for v in views):
            return 1 if any(v.needs_submit for v in views) else 0
        time.sleep(watch)


def retry(folder: str) -> int:
    Sweep.open(folder)  # a sweep folder (or the line saying why not) before its lock is taken there
    lock_sweep(Path(folder))  # no launch or cancel of the sweep meanwhile; sweep.json is written under it
    sweep = open_sweep(folder)
    if sweep.launcher != "slurm":
        raise MCNError(
            f"{folder} ran on the {sweep.launcher} launcher; rerun its unfinished jobs with: {sweep.command}"
        )
    moved = sweep.moved_advice()
    if moved:
        raise MCNError(moved)
    require_slurm("sbatch")
    views, _ = job_states(sweep)
    todo = [v for v in views if v.needs_submit]
    if not todo:
        states = ", ".join(sorted({v.state for v in views}))
        raise MCNError(f"nothing to retry in {folder}: every job is done or still queued or running ({states})")
    if not os.path.isdir(sweep.cwd):
        raise MCNError(
            f"{folder} was launched from {sweep.cwd}, which is gone; relaunch it from the folder its config's relative "
            f"paths start in, with {shell.hydra_override('hydra.sweep.dir', Path(folder).absolute())}"
        )
    launcher, singletons = sweep.load_launcher()
    os.chdir(sweep.cwd)  # the sweep's config holds paths relative to where it was launched
    submitted = launcher.submit(sweep, [v.job for v in todo], singletons)
    print(submitted_message(folder, [j.job_id for j in submitted], []))
    return 0


def cancel(folder: str) -> int:
    Sweep.open(folder)  # a sweep folder (or the line saying why not) before its lock is taken there
    lock_sweep(Path(folder))  # no submission of the sweep meanwhile: what it cancels is every job there is
    sweep = open_sweep(folder)
    require_slurm("scancel")
    views, _ = job_states(sweep)
    live = [v.job.job_id for v in views if v.live]
    if not live:
        raise MCNError(f"nothing to cancel in {folder}: no job is queued or running")
    refused = subprocess.run(["scancel", *live], capture_output=True, text=True)
    if refused.returncode:
        raise MCNError(f"scancel refused to cancel {' '.join(live)}: {refused.stderr.strip() or refused.returncode}")
    # back once they have left the queue (KillWait: SIGTERM, then SIGKILL), so that a retry or relaunch sees them ended
    deadline = time.time() + 120
    while time.time() < deadline and any(v.live for v in job_states(sweep, [v.job for v in views if v.live])[0]):
        time.sleep(1)
    print(f"mcn: cancelled {plural(len(live), 'job')}: {' '.join(live)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m mcn.sweep", description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=["status", "retry", "cancel"])
    parser.add_argument("folder", help="the sweep folder a -m sweep printed, or a search's folder (mcn.tune)")
    parser.add_argument(
        "--watch", nargs="?", type=float, const=10.0, metavar="SECONDS", help="status: refresh until every job ended"
    )
    args = parser.parse_args(argv)
    with one_line_errors():
        try:
            if SearchFolder.is_search(args.folder):
                if args.command == "status":
                    return search_launch.status(args.folder, args.watch)
                return {"retry": search_launch.retry, "cancel": search_launch.cancel}[args.command](args.folder)
            if args.command == "status":
                return status(args.folder, args.watch)
            return {"retry": retry, "cancel": cancel}[args.command](args.folder)
        except KeyboardInterrupt:
            print(file=sys.stderr)
            return 130


if __name__ == "__main__":
    raise SystemExit(main())
