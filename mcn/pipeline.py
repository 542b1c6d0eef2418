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
from mcn.files import load_expert_file, pretrained_expert_path
from mcn.models import ExpertSpec
from mcn.recipes import run_recipe
from mcn.recipes.expert import ExpertRecipe, apply_family_recipe, check_pretrained_expert
from mcn.recipes.fusion import FusionRecipe
from mcn.schema import check_config
from mcn.terminal import HEADLINE, show_on_terminal
from mcn.training.config import config_changes, expert_specs, resolved

log = logging.getLogger(__name__)


def expert_is_current(path: Path, index: int, spec: ExpertSpec, cfg: DictConfig, data: PreparedData) -> bool:
    """Whether this file may stand for expert `index` without retraining: the fusion stage would accept it
    (`check_pretrained_expert`) and it was pretrained with the recipe `pretrain.*` asks for now."""
    expert = spec.build(data.train.num_classes, data.train.in_channels)
    try:
        obj = load_expert_file(path, cfg.experts.trust_pickle)
        ckpt = check_pretrained_expert(obj, path, index, expert.architecture, cfg.data.name, data.split)
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
    the summary over all of them. Every stage's config is composed before the first stage runs: an edit of conf/
    made while the pipeline runs reaches none of its stages."""
    check_config(cfg)
    out = Path(output_dir)
    overrides = [o for o in overrides if not o.startswith("seed=")]  # each pass below sets its own
    for seed, stages in [(seed, stage_configs([*overrides, f"seed={seed}"])) for seed in cfg.pipeline.seeds]:
        run_seed(*stages, out / f"seed_{seed}")
    markdown, paths = write_report(out, out / "summary.csv")
    log.info(
        "the study over seeds %s (%s):\n%s",
        list(cfg.pipeline.seeds),
        ", ".join(map(str, paths)),
        markdown,
        extra=HEADLINE,
    )
    return collect_runs(out)


def stage_configs(overrides: list[str]) -> tuple[DictConfig, list[DictConfig], list[DictConfig]]:
    """One seed's configs, composed from `overrides` (its seed among them): (the seed's, each expert's pretraining,
    each fusion run's, from the experts in paths.experts_dir)."""
    cfg = compose("train", overrides=overrides)
    experts_dir = Path(cfg.paths.experts_dir).resolve()
    experts = [compose("train", overrides=[*overrides, f"pretrain.index={i}"]) for i in range(len(expert_specs(cfg)))]
    fusions = [
        compose("train", overrides=[*overrides, f"fusion={fusion}", f"experts.dir={experts_dir}"])
        for fusion in cfg.pipeline.fusions
    ]
    return cfg, experts, fusions


def run_seed(cfg: DictConfig, experts: list[DictConfig], fusions: list[DictConfig], out: Path) -> None:
    """split -> experts (reused when the fusion stage would accept them) -> the fusion sweep, for one seed."""
    data = prepare_data(cfg)
    log.info("seed %s: split %s in %s", cfg.seed, data.split.hash, data.split.directory, extra=HEADLINE)
    for i, (spec, stage) in enumerate(zip(expert_specs(cfg), experts)):
        path = pretrained_expert_path(Path(cfg.paths.experts_dir).resolve(), cfg.experts.filename, i)
        if not cfg.pipeline.retrain_experts and expert_is_current(path, i, spec, cfg, data):
            log.info("expert %d (%s): reusing %s", i, spec.label, path, extra=HEADLINE)
            continue
        run_recipe(ExpertRecipe(stage, out / "experts" / f"expert_{i}"))
    for j, (fusion, stage) in enumerate(zip(cfg.pipeline.fusions, fusions)):
        run_recipe(FusionRecipe(stage, out / "fusion" / f"{j}_fusion={fusion}"))


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> None:
    with one_line_errors():
        show_on_terminal(cfg.trainer.terminal, many_runs=True)
        hc = HydraConfig.get()
        run_pipeline(cfg, list(hc.overrides.task), hc.runtime.output_dir)


if __name__ == "__main__":
    hydra_command(main)
