"""Search a fusion type's learning rates (and what else `search.params` names) on validation, with Optuna:
`python -m mcn.tune hparams_search=concatenation [overrides]`.

Workers (`search.workers`: a Slurm job array, or local processes with hydra/launcher=local) share one study in the
search's folder, `${paths.output_root}/search/${search.name}`; each trial is a fusion run in `trials/<number>/`,
pruned on its per-epoch validation metric, resumed where it stopped when its worker is preempted or lost. Launching
the same search again continues it (a finished one submits nothing). Follow it with `python -m mcn.sweep status
<search folder>` (also retry, cancel). At the end: the best parameters (`best.yaml`, an override line), Optuna's plots
(`plots/`), and the command that reruns the best configuration over seeds with every baseline on test.
"""

from __future__ import annotations

from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from mcn.cli import hydra_command, one_line_errors
from mcn.search.launch import launch

RERUN_HYDRA_OVERRIDES = ("hydra.searchpath", "hydra/launcher", "hydra.launcher.")


@hydra.main(version_base="1.3", config_path="../conf", config_name="tune")
def main(cfg: DictConfig) -> None:
    with one_line_errors():
        hc = HydraConfig.get()
        launcher = OmegaConf.to_container(hc.launcher, resolve=True)
        # the rerun of the best configuration goes where the search went, with the user's own config folders
        kept = [o for o in hc.overrides.hydra if o.startswith(RERUN_HYDRA_OVERRIDES)]
        launch(cfg, Path(hc.runtime.output_dir), launcher, [*hc.overrides.task, *kept])


if __name__ == "__main__":
    hydra_command(main)
