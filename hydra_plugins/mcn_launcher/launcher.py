"""submitit's Hydra launchers, subclassed so that a sweep that cannot run says why in one line.

- no `sbatch` on the PATH: name `hydra/launcher=local` instead of a traceback;
- sbatch refuses the request (impossible resources, unknown partition): sbatch's own message;
- a job fails: one line per failed job (its overrides and error), then exit status 2 (bad input) or 1.
Requeue on preemption / time-out and the rest are submitit's; resuming is the recipes' (train_state.pth).
"""

from __future__ import annotations

import shutil
import sys
from collections.abc import Sequence
from typing import Any

from hydra.core.utils import JobStatus

from hydra_plugins.hydra_submitit_launcher.submitit_launcher import LocalLauncher, SlurmLauncher
from mcn.cli import fail as _fail
from mcn.errors import MCNError


def _last_error_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    errors = [line for line in lines if "Error" in line.split(":")[0] or line.startswith("sbatch: error")]
    return (errors or lines or ["(no message)"])[-1]


def _launch_with_clear_errors(launcher, job_overrides, initial_job_idx) -> Sequence[Any]:
    from submitit.core.utils import FailedJobError, UncompletedJobError

    try:
        returns = launcher._launch(job_overrides, initial_job_idx)
    except FailedJobError as e:
        text = str(e)
        if "sbatch" in text and "submission failed" in text.lower():
            _fail(
                f"Slurm refused the sweep: {_last_error_line(text)}; adjust hydra.launcher.* (partition, mem_gb, "
                f"cpus_per_task, gpus_per_node, timeout_min)"
            )
        _fail(f"a sweep job failed: {_last_error_line(text)} (job logs: {launcher.config.hydra.sweep.dir}/.submitit/)")
    except UncompletedJobError as e:
        _fail(
            f"a sweep job ended without a result: {_last_error_line(str(e))} "
            f"(job logs: {launcher.config.hydra.sweep.dir}/.submitit/)"
        )
    # Hydra hands a job's exception back inside its JobReturn; the sweep would re-raise it with a traceback
    failed = [(i, r) for i, r in enumerate(returns, initial_job_idx) if r.status == JobStatus.FAILED]
    for i, r in failed:
        error = r._return_value
        print(f"mcn: error: sweep job #{i} ({' '.join(r.overrides)}): {type(error).__name__}: {error}", file=sys.stderr)
    if failed:
        raise SystemExit(2 if all(isinstance(r._return_value, MCNError) for _, r in failed) else 1)
    return returns


class MCNSlurmLauncher(SlurmLauncher):
    _launch = SlurmLauncher.launch

    def launch(self, job_overrides, initial_job_idx):
        if shutil.which("sbatch") is None:
            _fail(
                "no `sbatch` on the PATH, so this machine cannot submit to Slurm; "
                "add hydra/launcher=local to run the sweep here (or experiment=quickstart)"
            )
        return _launch_with_clear_errors(self, job_overrides, initial_job_idx)


class MCNLocalLauncher(LocalLauncher):
    _launch = LocalLauncher.launch

    def launch(self, job_overrides, initial_job_idx):
        return _launch_with_clear_errors(self, job_overrides, initial_job_idx)
