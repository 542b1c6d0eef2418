"""Expert pretraining recipe: one expert on its own share of the expert pool.

Expert i is built from its own preset (`experts.presets[i]`, or `expert` for all; `mcn.training.config.expert_specs`).
Feature flags (`pretrain.*`):
- `pretrain.optim`: SGD + Nesterov or AdamW, cosine schedule with warm-up, gradient clipping;
- `pretrain.augment`: label smoothing, RandAugment (per image, costs CPU time), random erasing, CutMix
  (`mcn.data.prepare.training_augmentation`, shared with the fusion stage's `augment`).
The defaults are the recipe of docs/reference.md §2; batch size, learning rate, weight decay and label smoothing
left null are the expert family's (`pretrain.families`, docs/reference.md §7).

Model selection uses the validation part carved from the expert's own share; the fusion holdout
is never touched. The best epoch is published to `paths.experts_dir` under `experts.filename` (the
name the fusion stage looks for), self-describing: architecture, feature width, the split hash and
the indices it was trained on, metrics; next to it a per-epoch CSV and a JSON summary.
`check_pretrained_expert` is the one rule for whether such a file may start a fusion run.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from mcn import distributed
from mcn.data.prepare import make_batches, prepare_data, training_augmentation
from mcn.data.splits import Split
from mcn.errors import CheckpointError, ConfigError
from mcn.files import (
    EpochCsv,
    ExpertRunFiles,
    check_checkpoint,
    load_checkpoint,
    save_component,
    save_torch,
    write_bytes,
    write_json,
)
from mcn.models import ExpertSpec
from mcn.schema import check_config
from mcn.terminal import HEADLINE
from mcn.training.config import absolute_paths, expert_specs, resolved
from mcn.training.loop import EpochLoop, Objective, evaluate
from mcn.training.optim import optimizer_from_config, schedule_from_config
from mcn.training.runtime import Runtime, seed_everything, stream_seeds
from mcn.training.tracking import RunTracker

log = logging.getLogger(__name__)


def check_pretrained_expert(obj: Any, path: Path, index: int, architecture: dict, data_name: str, split: Split) -> dict:
    """Whether an mcn expert file may start fusion training on `split` of `data_name`: it must be a
    pretrained expert (not one saved by a fusion run) of `architecture`, trained on this data set and
    split, and never on an image of the fusion holdout. Returns the checkpoint; raises CheckpointError
    with the first reason it may not."""
    ckpt = check_checkpoint(obj, path, component="expert")
    name = f"expert {index} ({path})"
    if "fusion_type" in ckpt:
        raise CheckpointError(
            f"{name} was saved by a {ckpt['fusion_type']} fusion run (epoch {ckpt.get('epoch')}): it has trained on "
            f"the fusion holdout; start from pretrained experts (python -m mcn.experts -m pretrain.index=...)"
        )
    trained_on = ckpt.get("config", {}).get("data", {}).get("name")
    if trained_on is not None and trained_on != data_name:
        raise CheckpointError(
            f"{name} was trained on {trained_on}, but this run uses {data_name}; "
            f"pretrain experts on {data_name} or set data={trained_on}"
        )
    theirs = ckpt["architecture"]
    for key, what in (("num_classes", "classes"), ("in_channels", "input channels")):
        if theirs.get(key) != architecture.get(key):
            raise CheckpointError(
                f"{name} has {theirs.get(key)} {what}, but {data_name} has {architecture.get(key)}; "
                f"point experts.dir at experts of this data set"
            )
    if theirs != architecture:
        label = ExpertSpec.parse(theirs).label if "preset" in theirs else "?"
        raise CheckpointError(
            f"{path} is a {ckpt['architecture']} expert, but the config asks for {architecture} as expert {index}; "
            f"set expert={label} (or entry {index} of experts.presets) or point experts.dir elsewhere"
        )
    seen = np.asarray(ckpt.get("train_indices", []), dtype=np.int64)
    leaked = np.intersect1d(seen, split["fusion_holdout_indices"]).size
    if leaked:
        raise CheckpointError(
            f"expert {index} ({path}) was trained on {leaked} images of the fusion holdout; "
            f"retrain the experts on this split (python -m mcn.experts -m pretrain.index=...)"
        )
    if ckpt.get("split_hash") != split.hash:
        raise CheckpointError(
            f"expert {index} ({path}) was trained on split {ckpt.get('split_hash')}, but this run's split is "
            f"{split.hash} ({split.directory}); retrain the experts or use their split"
        )
    return ckpt


# pretrain.* keys that a family's row (pretrain.families) fills when they are null
FAMILY_KEYS = {
    "batch_size": "pretrain.batch_size",
    "lr": "pretrain.optim.lr",
    "weight_decay": "pretrain.optim.weight_decay",
    "label_smoothing": "pretrain.augment.label_smoothing",
}


def apply_family_recipe(cfg: DictConfig, family: str) -> None:
    """Fill the expert stage's null values with the family's (docs/reference.md §7); a null batch size in both
    is trainer.batch_size. What is set explicitly (command line, experiment) stays."""
    row = cfg.pretrain.families.get(family)
    if row is None:
        raise ConfigError(
            f"pretrain.families has no row for expert family {family!r}; add one "
            f"(pretrain.families.{family}={{batch_size: null, lr: 0.1, weight_decay: 5e-4, label_smoothing: 0.05}})"
        )
    for name, key in FAMILY_KEYS.items():
        if OmegaConf.select(cfg, key) is None:
            OmegaConf.update(cfg, key, row.get(name))
    if cfg.pretrain.batch_size is None:
        cfg.pretrain.batch_size = cfg.trainer.batch_size


EXPERT_STAGE = 1  # what tells the expert stage's random streams from the fusion stage's (stream_seeds)


class ExpertRecipe:
    monitor = "accuracy"
    lr_keys = {"lr": "pretrain.optim.lr"}

    def __init__(self, cfg: DictConfig, output_dir: str | Path):
        self.cfg = absolute_paths(cfg)
        self.index = cfg.pretrain.index
        self._check_inputs()  # before run_recipe touches the folder: a refused value leaves no state behind
        self.files = ExpertRunFiles(Path(output_dir), Path(cfg.paths.experts_dir), cfg.experts.filename, self.index)
        self.identity = {"stage": "expert", "index": self.index}
        self.results_file = self.files.results  # what a finished run leaves: read back when it is run again

    # ------------------------------------------------------------------ setup
    def setup(self) -> None:
        cfg = self.cfg
        init_seed, self.batch_seed, augment_seed = stream_seeds(cfg.seed, EXPERT_STAGE, self.index, streams=3)
        seed_everything(init_seed, deterministic=cfg.trainer.deterministic)
        self.runtime = Runtime.from_config(cfg.trainer)
        self.data = prepare_data(cfg, expert_specs(cfg))  # every expert's input, as the fusion stage will feed it
        train = self.data.train
        self.raw_model = self.spec.build(train.num_classes, train.in_channels, self.data.image_size)
        self.model = self.runtime.prepare(self.raw_model)
        self.augmentation = training_augmentation(cfg.pretrain.augment, self.data.train.num_classes, augment_seed)
        self._setup_batches()
        self._setup_optimizer()
        self.objective = Objective.single(self.runtime.device, make_targets=self.augmentation.make_targets)
        self.generators = [self.train_batches.generator, self.augmentation.generator]
        self._setup_outputs()
        log.info(
            "expert %d/%d: %s (%s family: batch %d, lr %g, weight decay %g, label smoothing %g), "
            "%d train / %d val images (split %s, %s); %s",
            self.index,
            cfg.experts.num,
            self.spec.label,
            self.spec.family,
            cfg.pretrain.batch_size,
            cfg.pretrain.optim.lr,
            cfg.pretrain.optim.weight_decay,
            cfg.pretrain.augment.label_smoothing,
            len(self.train_indices),
            len(self.val_batches.labels),
            self.data.split.hash,
            cfg.split.scheme,
            self.runtime.describe(),
        )

    def _check_inputs(self) -> None:
        """The config against its schema (mcn.schema.check_config); also settles which expert this is: its spec, and
        its family's values for what the config left null (so the config saved with the run holds the values used)."""
        cfg = self.cfg
        check_config(cfg)  # and once more below, with the family's values in place of pretrain.* nulls
        self.spec = expert_specs(cfg)[self.index]
        apply_family_recipe(cfg, self.spec.family)
        self.config = resolved(cfg)
        check_config(cfg)

    def _setup_batches(self) -> None:
        cfg, data, i = self.cfg, self.data, self.index
        batch = int(cfg.pretrain.batch_size)
        self.train_indices = data.split[f"expert_{i}_train_indices"]
        self.train_batches = make_batches(
            data.part(f"expert_{i}_train_indices"),
            data,
            cfg,
            self.runtime,
            train=True,
            seed=self.batch_seed,
            batch_size=batch,
            **self.augmentation.batch_extras,
        )
        val = data.part(f"expert_{i}_val_indices")
        self.val_batches = make_batches(val, data, cfg, self.runtime, train=False, batch_size=batch)
        self.test_batches = make_batches(data.test, data, cfg, self.runtime, train=False, batch_size=batch)

    def _setup_optimizer(self) -> None:
        optim = self.cfg.pretrain.optim
        self.optimizer = optimizer_from_config(
            optim,
            [("lr", optim.lr, self.raw_model.parameters())],
            fused=True if self.runtime.fused_optimizer else None,
            config_key="pretrain.optim.name",
        )
        self.scheduler = schedule_from_config(self.optimizer, optim, self.cfg.pretrain.epochs, len(self.train_batches))
        self.grad_clip = optim.grad_clip

    def _setup_outputs(self) -> None:
        self.files.root.mkdir(parents=True, exist_ok=True)
        self.report = EpochCsv(self.files.report, ["phase", "epoch", "loss", "accuracy", "lr", "elapsed_s"])
        self.tracker = RunTracker(self.cfg, self.files, f"expert_{self.index}")

    # ------------------------------------------------------------------ train
    def train(self) -> dict:
        best, epochs_run, seconds = EpochLoop.from_config(self, self.cfg.pretrain.epochs, self.cfg.trainer).run()
        return self.finish(best, epochs_run, seconds)

    # ------------------------------------------------------------------ save
    def _save(self, path: Path, epoch: int, metrics: dict) -> None:
        """The expert with what the fusion stage checks before it starts from it (`check_pretrained_expert`)."""
        save_component(
            path,
            "expert",
            self.raw_model,
            epoch,
            index=self.index,
            stage="pretrain",
            family=self.spec.family,
            num_features=self.raw_model.num_features,
            split_hash=self.data.split.hash,
            train_indices=torch.as_tensor(self.train_indices),
            metrics=metrics,
            config=self.config,
        )

    def initial_epoch(self, should_stop) -> None:  # an expert starts from its initial weights: no epoch 0
        return None

    def start_epoch(self, epoch: int) -> None:
        pass

    def save_best(self, epoch: int, val: dict) -> None:
        self._save(self.files.best, epoch, val)

    def save_checkpoint(self, epoch: int, val: dict) -> None:
        self._save(self.files.last, epoch, val)

    def finish(self, best: dict, epochs_run: int, seconds: float) -> dict:
        """Test the best epoch once, then publish it (with its CSV and JSON) to the experts folder."""
        distributed.barrier()  # rank 0 has written it
        ckpt = load_checkpoint(self.files.best, component="expert")
        self.raw_model.load_state_dict(ckpt["state_dict"])
        test = evaluate(self.model, self.test_batches, self.objective, self.runtime)
        self.report.add({"phase": "test", "epoch": best["epoch"], **test, "elapsed_s": round(seconds, 2)})
        results = {
            "index": self.index,
            "preset": self.spec.label,
            "family": self.spec.family,
            "best_epoch": best["epoch"],
            "best_val_accuracy": best["val_accuracy"],
            "test_accuracy": test["accuracy"],
            "train_images": int(len(self.train_indices)),
            "split_hash": self.data.split.hash,
            "split_scheme": self.cfg.split.scheme,
            "epochs_run": epochs_run,
            "wall_time_s": round(seconds, 2),
            "parameters": sum(q.numel() for q in self.raw_model.parameters()),
            "runtime": self.runtime.describe(),
        }
        ckpt["metrics"] = {**ckpt["metrics"], "test_accuracy": test["accuracy"]}
        save_torch(ckpt, self.files.published)
        write_json(self.files.results, results)
        write_bytes(self.files.published_report, self.files.report.read_bytes())
        log.info(
            "expert %d: best epoch %d, val %.4f, test %.4f -> %s",
            self.index,
            best["epoch"],
            best["val_accuracy"],
            test["accuracy"],
            self.files.published,
            extra=HEADLINE,
        )
        return results

    # ------------------------------------------------------------------ cleanup
    def cleanup(self, *, failed: bool = False) -> None:
        if hasattr(self, "tracker"):
            self.tracker.finish(failed)
