"""Expert pretraining recipe: one Wide ResNet expert on its own share of the expert pool.

Feature flags (`pretrain.*`): SGD + Nesterov or AdamW, cosine schedule with warm-up, label
smoothing, RandAugment, random erasing, CutMix, gradient clipping (REFERENCE.md §2).
Model selection uses the validation part carved from the expert's own share; the fusion holdout
is never touched. The best epoch goes to `paths.experts_dir/best_wrn_expert_{i}.pth` (the name the
fusion stage looks for), self-describing: architecture, classes, feature width, the split hash and
the indices it was trained on, metrics; next to it a per-epoch CSV and a JSON summary.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import torch
from omegaconf import DictConfig

from mcn import distributed
from mcn.checkpoint import atomic_save, load_checkpoint, make_checkpoint
from mcn.data.loader import soft_targets
from mcn.data.prepare import make_batches, prepare_data
from mcn.engine import CsvReport, cosine_schedule, evaluate, write_json
from mcn.errors import ConfigError
from mcn.models import create_expert
from mcn.optim import build_optimizer
from mcn.recipes.common import EpochLoop, RunLogger, absolute_paths, log, require_positive, resolved
from mcn.runtime import Runtime, seed_everything


def randaugment(spec) -> object | None:
    if spec is None:
        return None
    from torchvision.transforms import v2

    num_ops, magnitude = spec
    return v2.RandAugment(num_ops=int(num_ops), magnitude=int(magnitude))


class ExpertRecipe:
    def __init__(self, cfg: DictConfig, output_dir: str | Path):
        self.cfg, self.output_dir = absolute_paths(cfg), Path(output_dir)
        self.index = cfg.expert.index
        self.experts_dir = Path(cfg.paths.experts_dir)
        self.best_name = cfg.experts.filename.format(index=self.index)

    def setup(self) -> None:
        cfg, p = self.cfg, self.cfg.pretrain
        require_positive(cfg, "pretrain.epochs", "pretrain.lr", "trainer.batch_size", "trainer.save_every", "experts.num")
        if not isinstance(self.index, int) or not 0 <= self.index < cfg.experts.num:
            raise ConfigError(f"expert.index={self.index} is outside 0..{cfg.experts.num - 1} (experts.num={cfg.experts.num})")
        for name in ("random_erasing", "cutmix", "label_smoothing"):
            if not 0 <= p[name] <= 1:
                raise ConfigError(f"pretrain.{name}={p[name]} must lie in [0, 1]")
        seed_everything(cfg.seed + self.index, cfg.trainer.deterministic)
        self.runtime = Runtime.from_config(cfg.trainer)
        self.data = prepare_data(cfg)
        train_set = self.data.train
        self.model = create_expert(cfg.expert.preset, train_set.num_classes, train_set.in_channels)
        self.forward = self.runtime.prepare(self.model)
        self.train_indices = self.data.split[f"expert_{self.index}_train_indices"]
        self.train_batches = make_batches(self.data.part(f"expert_{self.index}_train_indices"), self.data, cfg, self.runtime,
                                          True, cfg.seed + self.index, erasing=float(p.random_erasing),
                                          uint8_transform=randaugment(p.randaugment))
        self.val_batches = make_batches(self.data.part(f"expert_{self.index}_val_indices"), self.data, cfg, self.runtime, False, 0)
        self.test_batches = make_batches(self.data.test, self.data, cfg, self.runtime, False, 0)
        self.optimizer = build_optimizer(p.optimizer, [("lr", p.lr, self.model.parameters())], p.weight_decay,
                                         momentum=p.momentum, fused=True if self.runtime.fused_optimizer else None,
                                         config_key="pretrain.optimizer")
        steps = len(self.train_batches)
        self.scheduler = cosine_schedule(self.optimizer, p.epochs * steps, p.min_lr_ratio, p.warmup_epochs * steps)
        self.mix_rng = torch.Generator().manual_seed(cfg.seed + self.index)
        classes = train_set.num_classes
        self.make_targets = lambda x, y: soft_targets(x, y, classes, float(p.label_smoothing), float(p.cutmix), self.mix_rng)
        self.loss_weights = torch.ones(1, device=self.runtime.device)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.report = CsvReport(self.output_dir / f"expert_{self.index}_report.csv",
                                ["phase", "epoch", "loss", "accuracy", "lr", "elapsed_s"])
        self.logger = RunLogger(cfg, self.output_dir, f"expert_{self.index}")
        log.info("expert %d/%d: %s, %d train / %d val images (split %s, %s); %s", self.index, cfg.experts.num,
                 cfg.expert.preset, len(self.train_indices), len(self.val_batches.labels), self.data.split.hash,
                 cfg.split.scheme, self.runtime.describe())

    def checkpoint(self, epoch: int, metrics: dict) -> dict:
        return make_checkpoint("expert", self.model, {"preset": self.cfg.expert.preset, **self.model.architecture}, epoch,
                               index=self.index, stage="pretrain", num_features=self.model.num_features,
                               split_hash=self.data.split.hash, train_indices=torch.as_tensor(self.train_indices),
                               metrics=metrics, config=resolved(self.cfg))

    def train(self) -> dict:
        cfg = self.cfg
        loop = EpochLoop(self.model, self.forward, self.train_batches, self.val_batches, self.loss_weights, [""],
                         self.optimizer, self.scheduler, self.runtime, cfg.pretrain.grad_clip, self.report, self.logger,
                         monitor="accuracy", state_path=self.output_dir / "train_state.pth", config=resolved(cfg),
                         generators=[self.train_batches.generator, self.mix_rng], resume=cfg.trainer.resume,
                         progress_bar=cfg.trainer.progress_bar, make_targets=self.make_targets)
        best_file = self.output_dir / self.best_name
        best, epochs_run, seconds = loop.run(
            int(cfg.pretrain.epochs), int(cfg.trainer.save_every), cfg.trainer.early_stopping_patience,
            on_best=lambda epoch, val: atomic_save(self.checkpoint(epoch, val), best_file),
            on_save=lambda epoch, val: atomic_save(self.checkpoint(epoch, val), self.output_dir / f"expert_{self.index}_last.pth"))
        return self.finish(best_file, best, epochs_run, seconds)

    def finish(self, best_file: Path, best: dict, epochs_run: int, seconds: float) -> dict:
        """Test the best epoch once, then publish it (with its CSV and JSON) to the experts folder."""
        distributed.barrier()  # rank 0 has written it
        ckpt = load_checkpoint(best_file, component="expert")
        self.model.load_state_dict(ckpt["state_dict"])
        test = evaluate(self.forward, self.test_batches, self.loss_weights, [""], self.runtime)
        self.report.add({"phase": "test", "epoch": best["epoch"], **test, "elapsed_s": round(seconds, 2)})
        results = {"index": self.index, "preset": self.cfg.expert.preset, "best_epoch": best["epoch"],
                   "best_val_accuracy": best["val_accuracy"], "test_accuracy": test["accuracy"],
                   "train_images": int(len(self.train_indices)), "split_hash": self.data.split.hash,
                   "split_scheme": self.cfg.split.scheme, "epochs_run": epochs_run, "wall_time_s": round(seconds, 2),
                   "parameters": sum(q.numel() for q in self.model.parameters()), "runtime": self.runtime.describe()}
        ckpt["metrics"] = {**ckpt["metrics"], "test_accuracy": test["accuracy"]}
        atomic_save(ckpt, self.experts_dir / self.best_name)
        write_json(self.experts_dir / f"expert_{self.index}_results.json", results)
        if distributed.is_main():
            shutil.copyfile(self.report.path, self.experts_dir / self.report.path.name)
        log.info("expert %d: best epoch %d, val %.4f, test %.4f -> %s", self.index, best["epoch"], best["val_accuracy"],
                 test["accuracy"], self.experts_dir / self.best_name)
        return results

    def cleanup(self, failed: bool = False) -> None:
        if hasattr(self, "logger"):
            self.logger.finish(failed)
