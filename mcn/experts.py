"""Expert pretraining entrypoint: `python -m mcn.experts [-m] pretrain.index=0,1,2,3` (one expert per job)."""

from __future__ import annotations

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from mcn.cli import hydra_command, one_line_errors
from mcn.recipes import run_recipe
from mcn.recipes.expert import ExpertRecipe
from mcn.terminal import show_on_terminal


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> None:
    with one_line_errors():
        show_on_terminal(cfg.trainer.terminal, many_runs=False)
        run_recipe(ExpertRecipe(cfg, HydraConfig.get().runtime.output_dir))


if __name__ == "__main__":
    hydra_command(main)
