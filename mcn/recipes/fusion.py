"""Fusion training recipe: K experts (not frozen) + a fusion module + a global head, trained jointly.

Feature flags (all in the config):
- `optim.base_lr` / `optim.head_lr`: experts learn slowly, fusion + global head fast; with
  `optim.auto_lr` the input-width rule of REFERENCE.md §3 scales both (logged and saved).
- `trainer.alpha`: weight of the experts' own losses in `CE(global) + alpha * sum_k CE(expert_k)`.
- `experts.dir`: start from pretrained experts (checked against the architecture and the split),
  or `null` to start from scratch.
- `trainer.early_stopping_patience`: stop after that many epochs without a better validation
  accuracy (null: off).
- `trainer.precision` / `channels_last` / `compile` / `data_on_device`: speed, `auto` = fast on GPU.

Model selection uses the validation part of the fusion holdout only; the test set is evaluated
once, at the end, with the weights of the best epoch read back from `best_complete_fusion_*.pth`.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig

from mcn import distributed
from mcn.checkpoint import (atomic_save, check_checkpoint, extract_state_dict, load_checkpoint, load_file, load_weights,
                            make_checkpoint)
from mcn.data.prepare import PreparedData, make_batches, prepare_data
from mcn.engine import CsvReport, cosine_schedule, evaluate, write_json
from mcn.errors import CheckpointError, ConfigError
from mcn.models import MCN, create_expert, create_fusion, list_fusions
from mcn.recipes.common import EpochLoop, RunLogger, absolute_paths, log, require_positive, resolved
from mcn.runtime import Runtime, seed_everything


def input_width_lrs(fusion_type: str, input_dim: int, base_lr: float, head_lr: float) -> tuple[float, float, str]:
    """REFERENCE.md §3: wide features learn slower, narrow ones faster; TransformerBase slower still."""
    notes = []
    if input_dim > 1000:
        base_lr, head_lr = base_lr * 0.7, head_lr * 0.8
        notes.append("d>1000: base x0.7, head x0.8")
    elif input_dim < 100:
        base_lr, head_lr = base_lr * 1.3, head_lr * 1.2
        notes.append("d<100: base x1.3, head x1.2")
    if fusion_type == "TransformerBase" and input_dim > 500:
        base_lr *= 0.8
        notes.append("TransformerBase d>500: base x0.8")
    return base_lr, head_lr, "; ".join(notes) or "no change"


def expert_path(cfg: DictConfig, index: int) -> Path:
    return Path(cfg.experts.dir) / cfg.experts.filename.format(index=index)


def load_pretrained_expert(expert: torch.nn.Module, path: Path, index: int, cfg: DictConfig, data: PreparedData) -> dict:
    """Weights for expert `index`; refuses a file trained on another architecture or split, or on holdout images."""
    obj = load_file(path)
    info = {"path": str(path)}
    if isinstance(obj, dict) and "format" in obj:  # one of ours: check what it claims
        ckpt = check_checkpoint(obj, path, component="expert")
        wanted = {"preset": cfg.expert.preset, **expert.architecture}
        if ckpt["architecture"] != wanted:
            raise CheckpointError(f"{path} is a {ckpt['architecture']} expert, but the config asks for {wanted}; "
                                  f"set expert={ckpt['architecture'].get('preset')} or point experts.dir elsewhere")
        seen = np.asarray(ckpt.get("train_indices", []), dtype=np.int64)
        leaked = np.intersect1d(seen, data.split["fusion_holdout_indices"]).size
        if leaked:
            raise CheckpointError(f"expert {index} ({path}) was trained on {leaked} images of the fusion holdout; "
                                  f"retrain the experts on this split (python -m mcn.experts -m expert.index=...)")
        if ckpt.get("split_hash") != data.split.hash:
            raise CheckpointError(f"expert {index} ({path}) was trained on split {ckpt.get('split_hash')}, but this run's "
                                  f"split is {data.split.hash} ({data.split.directory}); retrain the experts or use their split")
        info.update(epoch=ckpt["epoch"], metrics=ckpt.get("metrics", {}), split_hash=ckpt.get("split_hash"))
    load_weights(expert, extract_state_dict(obj, path), path, f"expert {index} ({cfg.expert.preset})")
    return info


class FusionRecipe:
    def __init__(self, cfg: DictConfig, output_dir: str | Path):
        self.cfg = absolute_paths(cfg)
        self.output_dir = Path(output_dir)
        self.fusion_type = cfg.fusion.name

    # ------------------------------------------------------------------ setup
    def setup(self) -> None:
        cfg = self.cfg
        require_positive(cfg, "trainer.epochs", "trainer.batch_size", "trainer.save_every", "experts.num",
                         "optim.base_lr", "optim.head_lr")
        if self.fusion_type not in list_fusions():
            raise ConfigError(f"unknown fusion type {self.fusion_type!r}; known: {', '.join(list_fusions())} (set fusion=<one of them>)")
        if cfg.experts.dir is not None:  # every file must be there before anything is written
            missing = [str(expert_path(cfg, i)) for i in range(cfg.experts.num) if not expert_path(cfg, i).is_file()]
            if missing:
                raise CheckpointError(f"missing expert checkpoint {missing[0]} ({len(missing)} of {cfg.experts.num} missing); "
                                      f"pretrain them (python -m mcn.experts -m expert.index=0,...,{cfg.experts.num - 1}), "
                                      f"fix experts.dir, or set experts.dir=null to start from scratch")
        seed_everything(cfg.seed, cfg.trainer.deterministic)
        self.runtime = Runtime.from_config(cfg.trainer)
        self.data = prepare_data(cfg)
        classes, channels = self.data.train.num_classes, self.data.train.in_channels

        experts = [create_expert(cfg.expert.preset, classes, channels) for _ in range(cfg.experts.num)]
        self.expert_sources = [
            load_pretrained_expert(e, expert_path(cfg, i), i, cfg, self.data) if cfg.experts.dir is not None else {"path": None}
            for i, e in enumerate(experts)
        ]
        fusion = create_fusion(self.fusion_type, num_experts=len(experts), input_dim=experts[0].num_features,
                               **cfg.fusion.module)
        self.model = MCN(experts, fusion, classes)
        self.forward = self.runtime.prepare(self.model)

        base_lr, head_lr, rule = float(cfg.optim.base_lr), float(cfg.optim.head_lr), "off"
        if cfg.optim.auto_lr:
            base_lr, head_lr, rule = input_width_lrs(self.fusion_type, self.model.num_features, base_lr, head_lr)
        self.lrs = {"base_lr": base_lr, "head_lr": head_lr, "input_width_rule": rule}
        log.info("learning rates: experts %.3g, fusion + global head %.3g (input width %d, rule: %s)",
                 base_lr, head_lr, self.model.num_features, rule)

        self.train_batches = make_batches(self.data.part("fusion_train_indices"), self.data, cfg, self.runtime, True, cfg.seed)
        self.val_batches = make_batches(self.data.part("fusion_val_indices"), self.data, cfg, self.runtime, False, 0)
        self.test_batches = make_batches(self.data.test, self.data, cfg, self.runtime, False, 0)
        self.optimizer = self.model.configure_optimizers(
            cfg.optim.name, base_lr, head_lr, cfg.optim.weight_decay, momentum=cfg.optim.get("momentum", 0.9),
            betas=cfg.optim.get("betas", (0.9, 0.999)), fused=True if self.runtime.fused_optimizer else None)
        steps = cfg.trainer.epochs * len(self.train_batches)
        self.scheduler = cosine_schedule(self.optimizer, steps, cfg.optim.min_lr_ratio,
                                         cfg.optim.warmup_epochs * len(self.train_batches))
        k = len(experts)
        self.loss_weights = torch.tensor([1.0] + [float(cfg.trainer.alpha)] * k, device=self.runtime.device)
        self.head_names = ["global"] + [f"expert_{i}" for i in range(k)]
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.report = CsvReport(self.output_dir / f"fusion_{self.fusion_type}_report.csv",
                                ["phase", "epoch", "loss", "global_accuracy"] + [f"expert_{i}_accuracy" for i in range(k)]
                                + ["ensemble_accuracy", "oracle_accuracy", "base_lr", "head_lr", "elapsed_s"])
        # the experts as they came in, measured before fusion training: the baseline fusion must beat
        self.initial_test = evaluate(self.forward, self.test_batches, self.loss_weights, self.head_names, self.runtime)
        self.logger = RunLogger(cfg, self.output_dir, f"fusion_{self.fusion_type}")
        log.info("%s: %d experts (%s, %d features), %s; %d train / %d val / %d test images; %s",
                 self.fusion_type, k, cfg.expert.preset, self.model.num_features, self.model.parameter_counts(),
                 len(self.train_batches.labels), len(self.val_batches.labels), len(self.test_batches.labels),
                 self.runtime.describe())

    # ------------------------------------------------------------------ train
    def train(self) -> dict:
        cfg = self.cfg
        loop = EpochLoop(self.model, self.forward, self.train_batches, self.val_batches, self.loss_weights, self.head_names,
                         self.optimizer, self.scheduler, self.runtime, cfg.optim.grad_clip, self.report, self.logger,
                         monitor="global_accuracy", state_path=self.output_dir / "train_state.pth", config=resolved(cfg),
                         generators=[self.train_batches.generator], resume=cfg.trainer.resume,
                         progress_bar=cfg.trainer.progress_bar)
        best_file = self.output_dir / f"best_complete_fusion_{self.fusion_type}.pth"
        best, epochs_run, seconds = loop.run(
            int(cfg.trainer.epochs), int(cfg.trainer.save_every), cfg.trainer.early_stopping_patience,
            on_best=lambda epoch, val: self.save_complete(best_file, epoch, val), on_save=self.save_checkpoint)
        return self.finish(best, epochs_run, seconds)

    # ------------------------------------------------------------------ save
    def architectures(self) -> dict:
        m = self.model
        return {
            "experts": [{"preset": self.cfg.expert.preset, **e.architecture} for e in m.experts],
            "fusion": {"name": self.fusion_type, "num_experts": m.num_experts, "input_dim": m.num_features,
                       **{k: v for k, v in resolved(self.cfg.fusion.module).items() if v is not None}},
            "global_head": {"in_features": m.num_features, "num_classes": m.global_head.out_features},
        }

    def save_complete(self, path: Path, epoch: int, metrics: dict) -> None:
        atomic_save(make_checkpoint("complete", self.model, self.architectures(), epoch, fusion_type=self.fusion_type,
                                    metrics=metrics, config=resolved(self.cfg), lrs=self.lrs), path)

    def save_checkpoint(self, epoch: int, metrics: dict) -> None:
        """Every component on its own, plus the complete model, all from this one epoch."""
        arch, out, t = self.architectures(), self.output_dir, self.fusion_type
        common = {"fusion_type": t, "metrics": metrics, "config": resolved(self.cfg)}
        for i, expert in enumerate(self.model.experts):
            atomic_save(make_checkpoint("expert", expert, arch["experts"][i], epoch, index=i, **common),
                        out / "experts" / f"expert_{i}_epoch_{epoch}.pth")
        atomic_save(make_checkpoint("fusion", self.model.fusion, arch["fusion"], epoch, **common),
                    out / "fusion" / f"fusion_{t}_epoch_{epoch}.pth")
        atomic_save(make_checkpoint("global_head", self.model.global_head, arch["global_head"], epoch, **common),
                    out / "global" / f"global_head_epoch_{epoch}.pth")
        self.save_complete(out / f"complete_fusion_{t}_epoch_{epoch}.pth", epoch, metrics)

    def finish(self, best: dict, epochs_run: int, train_time: float) -> dict:
        """Test once, with the best epoch's weights as saved on disk."""
        best_file = self.output_dir / f"best_complete_fusion_{self.fusion_type}.pth"
        distributed.barrier()  # rank 0 has written it
        best_ckpt = load_checkpoint(best_file, component="complete")
        self.model.load_state_dict(best_ckpt["state_dict"])
        if not (self.output_dir / "global" / f"global_head_epoch_{best['epoch']}.pth").exists():
            self.save_checkpoint(best["epoch"], best_ckpt["metrics"])  # the best epoch as components too
        test = evaluate(self.forward, self.test_batches, self.loss_weights, self.head_names, self.runtime)
        self.report.add({"phase": "test", "epoch": best["epoch"], **test, "elapsed_s": round(train_time, 2)})
        k = self.model.num_experts
        results = {
            "fusion_type": self.fusion_type,
            "best_epoch": best["epoch"],
            "best_val_accuracy": best["val_accuracy"],
            "test_accuracy": test["global_accuracy"],
            "test_loss": test["loss"],
            "expert_test_accuracy": [test[f"expert_{i}_accuracy"] for i in range(k)],
            "ensemble_test_accuracy": test["ensemble_accuracy"],
            "oracle_test_accuracy": test["oracle_accuracy"],
            "initial_expert_test_accuracy": [self.initial_test[f"expert_{i}_accuracy"] for i in range(k)],
            "initial_ensemble_test_accuracy": self.initial_test["ensemble_accuracy"],
            "experts_from": [s["path"] for s in self.expert_sources],
            "parameters": self.model.parameter_counts(),
            "learning_rates": self.lrs,
            "epochs_planned": int(self.cfg.trainer.epochs),
            "epochs_run": epochs_run,
            "wall_time_s": round(train_time, 2),
            "split_hash": self.data.split.hash,
            "runtime": self.runtime.describe(),
        }
        write_json(self.output_dir / f"fusion_training_results_{self.fusion_type}.json", results)
        self.logger.summary({f"test/{k}": v for k, v in test.items()} | {"best_epoch": best["epoch"]})
        log.info("%s: best epoch %d, val %.4f, test %.4f (experts %s, logit average %.4f; before fusion: %s)",
                 self.fusion_type, best["epoch"], best["val_accuracy"], test["global_accuracy"],
                 ", ".join(f"{a:.4f}" for a in results["expert_test_accuracy"]), test["ensemble_accuracy"],
                 ", ".join(f"{a:.4f}" for a in results["initial_expert_test_accuracy"]))
        return results

    # ------------------------------------------------------------------ cleanup
    def cleanup(self, failed: bool = False) -> None:
        if hasattr(self, "logger"):
            self.logger.finish(failed)
