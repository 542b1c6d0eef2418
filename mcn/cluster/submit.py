"""submitit's executor for a `hydra.launcher` request (conf/hydra/launcher/): what a -m sweep's jobs (on Slurm or as
local processes) and a search's Slurm workers (mcn.search) are submitted with."""

from __future__ import annotations

import shlex

OURS = {"_target_", "wait", "setup", "submitit_folder", "max_num_timeout"}  # mcn's keys, not submitit's


def make_executor(kind: str, params: dict, folder: str, *, environment: dict[str, str] | None = None):
    """submitit's executor (`kind`: slurm or local) for the launcher request `params` (hydra.launcher.*), its job
    files in `folder` (`%j`: the job id). On Slurm, `setup` lines and `environment` (exported) go into the job script,
    so that they hold again when Slurm requeues the job; `max_num_timeout` bounds the requeues after a time-out."""
    import submitit
    from omegaconf import OmegaConf

    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf

    shared = set(OmegaConf.structured(BaseQueueConf).keys())  # submitit's own keys; the others are the cluster's
    init = {"folder": folder}
    if params.get("max_num_timeout") is not None:
        init[f"{kind}_max_num_timeout"] = params["max_num_timeout"]
    executor = submitit.AutoExecutor(cluster=kind, **init)
    executor.update_parameters(**{k if k in shared else f"{kind}_{k}": v for k, v in params.items() if k not in OURS})
    if kind == "slurm":
        own = "${PYTHONPATH:+:$PYTHONPATH}"  # the job's own PYTHONPATH, as its setup lines left it
        exports = [
            f"export {k}={shlex.quote(v)}{own if k == 'PYTHONPATH' else ''}" for k, v in (environment or {}).items()
        ]
        executor.update_parameters(slurm_setup=[*(params.get("setup") or []), *exports])
    return executor
