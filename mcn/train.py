"""Fusion training entrypoint: `python -m mcn.train [-m] fusion=... trainer.epochs=...`."""

from __future__ import annotations

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from mcn.cli import hydra_command, one_line_errors
from mcn.recipes import run_recipe
from mcn.recipes.fusion import FusionRecipe
from mcn.terminal import show_on_terminal


def run(cfg: DictConfig, output_dir: str) -> dict:
    return run_recipe(FusionRecipe(cfg, output_dir))


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> None:
    with one_line_errors():
        show_on_terminal(cfg.trainer.terminal, many_runs=False)
        run(cfg, HydraConfig.get().runtime.output_dir)


if __name__ == "__main__":
    hydra_command(main)
