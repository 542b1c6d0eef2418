"""The whole study in one command, locally and in order, for every seed of `pipeline.seeds`:
split -> K experts -> the fusion sweep (`pipeline.fusions`); then one summary over all seeds.

    python -m mcn.pipeline experiment=quickstart
    python -m mcn.pipeline experiment=quickstart pipeline.seeds=[0,1,2]

Expert i is pretrained with its own preset (`experts.presets`, mixed experts) and its family's recipe; experts
already in `paths.experts_dir` (named after the presets) for this split and architecture are reused unless
`pipeline.retrain_experts=true`. Every stage composes the same config tree with the command
line's overrides, so `mcn.experts` / `mcn.train` on Slurm give the same runs.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import hydra
from hydra import compose
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from mcn.cli import hydra_command, one_line_errors
from mcn.data.prepare import PreparedData, prepare_data
from mcn.errors import MCNError
from mcn.evaluation.report import write_report
from mcn.evaluation.summary import collect_runs
from mcn.files import load_file, pretrained_expert_path
from mcn.models import ExpertSpec
from mcn.recipes import run_recipe
from mcn.recipes.expert import ExpertRecipe, apply_family_recipe, check_pretrained_expert
from mcn.recipes.fusion import FusionRecipe
from mcn.training.config import config_changes, expert_specs, resolved

log = logging.getLogger(__name__)


def expert_is_current(path: Path, index: int, spec: ExpertSpec, cfg: DictConfig, data: PreparedData) -> bool:
    """Whether this file may stand for expert `index` without retraining: the fusion stage would accept it
    (`check_pretrained_expert`) and it was pretrained with the recipe `pretrain.*` asks for now."""
    expert = spec.build(data.train.num_classes, data.train.in_channels)
    try:
        ckpt = check_pretrained_expert(load_file(path), path, index, expert.architecture, cfg.data.name, data.split)
    except MCNError:
        return False
    wanted = copy.deepcopy(cfg)  # the expert stage's own view: this index, the family's values filled in
    wanted.pretrain.index = index
    apply_family_recipe(wanted, spec.family)
    changes = config_changes(ckpt.get("config", {}).get("pretrain", {}), resolved(wanted.pretrain))
    if changes:
        log.info("expert %d: %s was pretrained otherwise (%s); retraining it", index, path, "; ".join(changes))
    return not changes


def run_pipeline(cfg: DictConfig, overrides: list[str], output_dir: str | Path) -> list[dict]:
    """The study once per seed of `pipeline.seeds` (each seed: its own experts, its own fusion runs), then
    the summary over all of them."""
    out = Path(output_dir)
    overrides = [o for o in overrides if not o.startswith("seed=")]  # each pass below sets its own
    for seed in cfg.pipeline.seeds:
        seeded = [*overrides, f"seed={seed}"]
        run_seed(compose("train", overrides=seeded), seeded, out / f"seed_{seed}")
    markdown, paths = write_report(out, out / "summary.csv")
    log.info("the study over seeds %s (%s):\n%s", list(cfg.pipeline.seeds), ", ".join(map(str, paths)), markdown)
    return collect_runs(out)


def run_seed(cfg: DictConfig, overrides: list[str], out: Path) -> None:
    """split -> experts (reused when the fusion stage would accept them) -> the fusion sweep, for one seed."""
    data = prepare_data(cfg)
    log.info("seed %s: split %s in %s", cfg.seed, data.split.hash, data.split.directory)
    experts_dir = Path(cfg.paths.experts_dir).resolve()
    for i, spec in enumerate(expert_specs(cfg)):
        path = pretrained_expert_path(experts_dir, cfg.experts.filename, i)
        if not cfg.pipeline.retrain_experts and expert_is_current(path, i, spec, cfg, data):
            log.info("expert %d (%s): reusing %s", i, spec.label, path)
            continue
        stage = compose("train", overrides=[*overrides, f"pretrain.index={i}"])
        run_recipe(ExpertRecipe(stage, out / "experts" / f"expert_{i}"))
    for j, fusion in enumerate(cfg.pipeline.fusions):
        stage = compose("train", overrides=[*overrides, f"fusion={fusion}", f"experts.dir={experts_dir}"])
        run_recipe(FusionRecipe(stage, out / "fusion" / f"{j}_fusion={fusion}"))


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> None:
    with one_line_errors():
        hc = HydraConfig.get()
        run_pipeline(cfg, list(hc.overrides.task), hc.runtime.output_dir)


if __name__ == "__main__":
    hydra_command(main)
