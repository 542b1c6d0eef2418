"""Fusion training recipe: K experts (not frozen) + a fusion module + a global head, trained jointly.

Feature flags (all in the config):
- `optim.base_lr` / `optim.head_lr`: experts learn slowly, fusion + global head fast (the AdamW
  defaults are the guide's per fusion type); `optim.input_width_rule=true` scales both by the feature
  width as the reference did (docs/reference.md §3; logged and saved);
- `loss.alpha`: weight of the experts' own losses in `CE(global) + alpha * sum_k CE(expert_k)` (0: off; auto, the
  default: 0 after the probe, 1 without it);
  `loss.expert_targets=own_classes` counts expert k's term only on samples of the classes in its pretraining share,
  so that under a class split joint training does not retrain every expert on every class;
- `model.new_expert_heads`: every expert's own head starts anew at the fusion stage (after the pretrained experts'
  baselines are measured), as the reference's class-split fusion stage did;
- `experts.dir`: start from pretrained experts (checked by `check_pretrained_expert`), or `null` to
  start from scratch; `experts.trust_pickle`: other code's expert files that hold objects the safe loader does not
  build are unpickled in full (they are refused otherwise: unpickling can run code);
- options that help the fusion beat its experts' free logit average (all off by default; what each
  did is measured in docs/results.md): `trainer.freeze_experts_epochs` (fusion + head first learn
  on frozen experts), `model.ensemble_start` (start from the logit average), `loss.distill_weight` /
  `loss.distill_temperature` (distil the pretrained experts' ensemble), `model.expert_dropout`,
  and `augment.*` (CutMix, label smoothing, random erasing, RandAugment);
- `probe.enabled`: probe, then fine-tune (LP-FT, mcn.training.probe): epoch 0 fits the fusion side on the frozen
  experts' cached features, with its weight decay chosen on validation; epochs 1.. fine-tune everything from
  there, and epoch 0 competes for the best epoch like any other (`trainer.epochs=0`: the probe alone);
- `finetune.*`: how the joint epochs fine-tune after the probe (mcn.training.finetune): the experts' BatchNorm
  statistics frozen, surgical fine-tuning of their last stage, the experts' loss terms fading out, WiSE-FT
  (`wise_ft`, on by default after the probe: after the last epoch, the model interpolated between epoch 0 and the
  last epoch, the mixing weight chosen on validation; the chosen mixture is saved as epoch `last + 1`, components
  and complete model, its record naming the weight, and competes for the best epoch like any other);
- `trainer.early_stopping_patience`: stop after that many epochs without a better validation
  accuracy (null: off), counted from the best fine-tuning epoch (a dip below the probe does not end the stage) or,
  with `trainer.early_stopping_since=best`, from the best epoch, the probe's included;
- `trainer.precision` / `channels_last` / `compile` / `data_on_device`: speed, `auto` = fast on GPU.

Model selection uses the validation part of the fusion holdout only; the test set is evaluated
once, at the end, with the weights of the best epoch read back from `best_complete_fusion_*.pth`. A search's trial
(`judge` given, mcn.search) never reads it: no test pass, no baselines; it writes its validation record instead.
"""

from __future__ import annotations

import copy
import json
import logging
from dataclasses import asdict
from pathlib import Path

import torch
from omegaconf import DictConfig

from mcn import distributed
from mcn.data.prepare import make_batches, prepare_data, training_augmentation
from mcn.errors import CheckpointError
from mcn.evaluation.baselines import calibration, class_accuracy, expert_baselines, reliability
from mcn.files import (
    EpochCsv,
    FusionResults,
    FusionRunFiles,
    clean_state_dict,
    extract_state_dict,
    load_checkpoint,
    load_expert_file,
    load_weights,
    pretrained_expert_path,
    save_component,
    write_bytes,
    write_json,
)
from mcn.files.code import code_version
from mcn.inference.card import write_model_card
from mcn.models import MCN, ExpertStack, create_fusion, fusion_width
from mcn.recipes.expert import check_pretrained_expert
from mcn.schema import check_config
from mcn.terminal import HEADLINE
from mcn.training.config import absolute_paths, expert_specs, resolved
from mcn.training.finetune import alpha_at, freeze_early_expert_layers, interpolate_weights
from mcn.training.loop import UNDEFINED, Distillation, EpochLoop, Objective, evaluate, head_metrics, predict
from mcn.training.optim import input_width_lrs, optimizer_from_config, schedule_from_config
from mcn.training.probe import expert_outputs, fit_probe
from mcn.training.runtime import Runtime, seed_everything, stream_seeds
from mcn.training.schema import expert_loss_weight, probe_on, wise_ft_on
from mcn.training.tracking import RunTracker

log = logging.getLogger(__name__)


def fusion_arguments(fusion_cfg: DictConfig) -> dict:
    """The fusion module's constructor arguments: everything in `fusion/*.yaml` but its name and `width` (its
    `input_dim`, which depends on the experts)."""
    return {k: v for k, v in resolved(fusion_cfg).items() if k not in ("name", "width")}


def experts_of(part: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The experts' logits [K, N, C] (without the global head's) and the labels, from `predict`."""
    logits, labels = part
    return logits[1:], labels


FUSION_STAGE = 0  # what tells the fusion stage's random streams from the expert stage's (stream_seeds)


class FusionRecipe:
    monitor = "global_accuracy"
    lr_keys = {"base_lr": "optim.base_lr", "head_lr": "optim.head_lr"}

    def __init__(self, cfg: DictConfig, output_dir: str | Path, judge=None):
        """`judge(epoch, val) -> bool`: a search's trial (mcn.search.worker) hears each epoch's validation metrics
        (WiSE-FT's mixture's too, as the epoch after the last) and may stop the run (pruned); such a run never passes
        the test set through the model."""
        self.cfg = absolute_paths(cfg)
        self.judge = judge
        self.reads_test = judge is None
        self.config = resolved(self.cfg)
        self.fusion_type = cfg.fusion.name
        self.files = FusionRunFiles(Path(output_dir), self.fusion_type)
        self.identity = {"stage": "fusion", "fusion_type": self.fusion_type}
        self.probe_fit = None  # this run's probe (mcn.training.probe.ProbeFit), once epoch 0 fitted it
        self.wise_ft = None  # WiSE-FT's record (grid, chosen weight, its epoch label) once measured
        # what a finished run leaves: read back when it is run again
        self.results_file = self.files.results if self.reads_test else self.files.validation_results
        self._check_inputs()  # before run_recipe touches the folder: a refused value leaves no state behind

    # ------------------------------------------------------------------ setup
    def setup(self) -> None:
        cfg = self.cfg
        init_seed, self.batch_seed, augment_seed, self.probe_seed, self.head_seed = stream_seeds(
            cfg.seed, FUSION_STAGE, streams=5
        )
        seed_everything(init_seed, deterministic=cfg.trainer.deterministic)
        self.runtime = Runtime.from_config(cfg.trainer)
        self.data = prepare_data(cfg, expert_specs(cfg))
        self._setup_model()
        self._setup_learning_rates()
        self.augmentation = training_augmentation(cfg.augment, self.data.train.num_classes, augment_seed)
        self._setup_batches()
        self._setup_optimizer()
        self._setup_objective()
        self._setup_outputs()
        log.info(
            "%s: %d experts (%s, %d features), %s; %d train / %d val / %s; %s",
            self.fusion_type,
            self.raw_model.num_experts,
            " + ".join(dict.fromkeys(s.label for s in self.expert_specs)),
            self.raw_model.num_features,
            self.raw_model.parameter_counts(),
            len(self.train_batches.labels),
            len(self.val_batches.labels),
            f"{len(self.test_batches.labels)} test images" if self.reads_test else "no test images (a search's trial)",
            self.runtime.describe(),
        )
        if self.probe_on:
            log.info(
                "after the probe: the experts' own loss terms weigh %g (loss.alpha=%s), WiSE-FT %s "
                "(finetune.wise_ft=%s), early stopping counted from the %s",
                self.alpha,
                cfg.loss.alpha,
                "on" if self.wise_ft_on else "off",
                cfg.finetune.wise_ft,
                "best fine-tuning epoch" if cfg.trainer.early_stopping_since == "best_fine_tuned" else "best epoch",
            )

    def _check_inputs(self) -> None:
        """The config against its schema, and the expert files it names: ConfigError or CheckpointError in one line."""
        cfg = self.cfg
        check_config(cfg)
        self.probe_on = probe_on(cfg)
        self.alpha = expert_loss_weight(cfg)  # loss.alpha as used (auto resolved)
        self.wise_ft_on = wise_ft_on(cfg)
        if cfg.experts.dir is not None:  # every file must be there before anything is written
            paths = [pretrained_expert_path(cfg.experts.dir, cfg.experts.filename, i) for i in range(cfg.experts.num)]
            missing = [str(p) for p in paths if not p.is_file()]
            if missing:
                raise CheckpointError(
                    f"missing expert checkpoint {missing[0]} ({len(missing)} of {cfg.experts.num} missing); "
                    f"pretrain them (python -m mcn.experts -m pretrain.index=0,...,{cfg.experts.num - 1}), "
                    f"fix experts.dir, or set experts.dir=null to start from scratch"
                )

    def _setup_model(self) -> None:
        """Expert i of `expert_specs` (its pretrained weights when experts.dir is set), the fusion at `fusion.width`
        (default: the experts' widest), an adapter for each expert of another width, the global head."""
        cfg, classes, channels = self.cfg, self.data.train.num_classes, self.data.train.in_channels
        self.expert_specs = expert_specs(cfg)
        size = self.data.image_size
        experts = [spec.build(classes, channels, size) for spec in self.expert_specs]
        self.expert_sources = [self._load_pretrained(e, i) for i, e in enumerate(experts)]
        unverified = [s["path"] for s in self.expert_sources if s["path"] and "split_hash" not in s]
        if unverified:
            log.warning(
                "%d expert file(s) without mcn's metadata (%s): their shapes fit, but the data set, split and "
                "holdout they were trained on could not be verified",
                len(unverified),
                ", ".join(unverified),
            )
        width = fusion_width([e.num_features for e in experts], cfg.fusion.get("width"))
        fusion = create_fusion(
            self.fusion_type, num_experts=len(experts), input_dim=width, **fusion_arguments(cfg.fusion)
        )
        self.raw_model = MCN(
            experts,
            fusion,
            classes,
            width,
            ensemble_start=cfg.model.ensemble_start,
            expert_dropout=float(cfg.model.expert_dropout),
        )
        self.raw_model.expert_norms_frozen = cfg.finetune.expert_norm == "frozen"
        if cfg.finetune.expert_layers == "last_stage":  # before the optimiser and the teacher's copy are made
            kept, frozen = freeze_early_expert_layers(self.raw_model)
            log.info(
                "finetune.expert_layers=last_stage: %d expert parameters learn (last stages, final norms, own heads), "
                "%d stay as pretrained",
                kept,
                frozen,
            )
        # the pretrained experts as they came in, frozen: the teacher of ensemble distillation
        self.teacher = ExpertStack(copy.deepcopy(experts)).requires_grad_(False) if cfg.loss.distill_weight else None
        self.model = self.runtime.prepare(self.raw_model)
        log.info(
            "experts %s -> fusion width %d (adapters: %s)",
            ", ".join(f"{s.label} ({d})" for s, d in zip(self.expert_specs, self.raw_model.expert_widths)),
            width,
            ", ".join(
                "identity" if isinstance(a, torch.nn.Identity) else f"Linear({a.in_features}, {a.out_features})"
                for a in self.raw_model.adapters
            ),
        )

    def _load_pretrained(self, expert: torch.nn.Module, index: int) -> dict:
        """Expert `index`'s pretrained weights (none when experts.dir is null); where they came from. A file of other
        code's is taken when its weights fit (a state dict, bare or under `state_dict` / `model_state_dict`, or a
        whole module when the file is trusted); its other contents are not read."""
        cfg, label = self.cfg, self.expert_specs[index].label
        if cfg.experts.dir is None:
            return {"path": None}
        path = pretrained_expert_path(cfg.experts.dir, cfg.experts.filename, index)
        obj = load_expert_file(path, cfg.experts.trust_pickle)
        info = {"path": str(path)}
        if isinstance(obj, dict) and "format" in obj:  # one of ours: check what it claims
            ckpt = check_pretrained_expert(obj, path, index, expert.architecture, cfg.data.name, self.data.split)
            info.update(epoch=ckpt["epoch"], metrics=ckpt.get("metrics", {}), split_hash=ckpt.get("split_hash"))
        # a bare state dict (other code's) is taken when it fits this expert
        load_weights(expert, extract_state_dict(obj, path), path, f"expert {index} ({label})")
        return info

    def _setup_learning_rates(self) -> None:
        optim = self.cfg.optim
        base_lr, head_lr, rule = float(optim.base_lr), float(optim.head_lr), "off"
        if optim.input_width_rule:
            base_lr, head_lr, rule = input_width_lrs(self.fusion_type, self.raw_model.num_features, base_lr, head_lr)
        self.lrs = {"base_lr": base_lr, "head_lr": head_lr, "input_width_rule": rule}
        for table, where in (
            (optim.get("rates"), "optim.rates"),
            (self.cfg.trainer.get("fusion_epochs"), "trainer.fusion_epochs"),
        ):
            if table is not None and self.fusion_type not in table:
                log.info(
                    "%s has no entry for %s: its `default` entry applies unless overridden", where, self.fusion_type
                )
        log.info(
            "learning rates: experts %.3g, fusion + global head %.3g (input width %d, input-width rule: %s)",
            base_lr,
            head_lr,
            self.raw_model.num_features,
            rule,
        )

    def _setup_batches(self) -> None:
        cfg, data, rt = self.cfg, self.data, self.runtime
        self.train_batches = make_batches(
            data.part("fusion_train_indices"),
            data,
            cfg,
            rt,
            train=True,
            seed=self.batch_seed,
            **self.augmentation.batch_extras,
        )
        self.val_batches = make_batches(data.part("fusion_val_indices"), data, cfg, rt, train=False)
        self.generators = [self.train_batches.generator, self.augmentation.generator]
        # what the baselines are fitted on, selected on and measured on (the training part plain, in order)
        self.measured_parts = {
            "train": make_batches(data.part("fusion_train_indices"), data, cfg, rt, train=False),
            "val": self.val_batches,
        }
        if self.reads_test:
            self.test_batches = make_batches(data.test, data, cfg, rt, train=False)
            self.measured_parts["test"] = self.test_batches

    def _setup_optimizer(self) -> None:
        optim, frozen = self.cfg.optim, int(self.cfg.trainer.freeze_experts_epochs)
        self.optimizer = optimizer_from_config(
            optim,
            self.raw_model.param_groups(self.lrs["base_lr"], self.lrs["head_lr"]),
            fused=True if self.runtime.fused_optimizer else None,
        )
        # frozen experts: their rate is 0, then they warm up and decay over the epochs that remain
        self.scheduler = schedule_from_config(
            self.optimizer, optim, self.cfg.trainer.epochs, len(self.train_batches), start_epochs={"base_lr": frozen}
        )
        self.grad_clip = optim.grad_clip

    def _setup_objective(self) -> None:
        loss, rt = self.cfg.loss, self.runtime
        distillation = None
        if self.teacher is not None:
            teacher = rt.prepare(self.teacher, frozen=True).eval()
            distillation = Distillation(teacher, float(loss.distill_weight), float(loss.distill_temperature), rt)
        self.objective = Objective.dual_path(
            self.raw_model.num_experts,
            self.alpha,
            rt.device,
            expert_classes=self._own_classes() if loss.expert_targets == "own_classes" else None,
            make_targets=self.augmentation.make_targets,
            distillation=distillation,
        )

    def _own_classes(self) -> torch.Tensor:
        """[K, C] bool: the classes in each expert's pretraining share of the split."""
        labels, classes = self.data.train.labels, self.data.train.num_classes
        own = torch.zeros(self.raw_model.num_experts, classes, dtype=torch.bool)
        for i in range(self.raw_model.num_experts):
            own[i, labels[torch.as_tensor(self.data.split[f"expert_{i}_train_indices"])].unique().cpu()] = True
        log.info(
            "loss.expert_targets=own_classes: expert k's term counts only its share's classes (%s)",
            "; ".join(f"expert {i}: {row.nonzero().flatten().tolist()}" for i, row in enumerate(own)),
        )
        if own.all():
            log.warning(
                "loss.expert_targets=own_classes changes nothing here: every expert's share holds every class "
                "(split=%s); it is meant for class splits (split=classes)",
                self.cfg.split.scheme,
            )
        return own

    def _setup_outputs(self) -> None:
        k = self.raw_model.num_experts
        self.files.root.mkdir(parents=True, exist_ok=True)
        self.report = EpochCsv(
            self.files.report,
            ["phase", "epoch", "loss", "global_accuracy"]
            + [f"expert_{i}_accuracy" for i in range(k)]
            + ["ensemble_accuracy", "oracle_accuracy", "base_lr", "head_lr", "elapsed_s"],
        )
        self.tracker = RunTracker(self.cfg, self.files, f"fusion_{self.fusion_type}")

    # ------------------------------------------------------------------ train
    def predict_parts(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Every head's logits [K + 1, N, C] and the labels: fusion training part, validation part, test set (not in
        a search's trial)."""
        return {part: predict(self.model, batches, self.runtime) for part, batches in self.measured_parts.items()}

    def train(self) -> dict:
        if self.reads_test:  # the experts as they came in, measured before fusion training: the baselines to beat
            self.initial = self.predict_parts()
            self.initial_test = head_metrics(*self.initial["test"], self.objective)
        if self.cfg.model.new_expert_heads:  # after the pretrained heads were measured; a resume loads its own
            with torch.random.fork_rng(devices=[self.runtime.device] if self.runtime.device.type == "cuda" else []):
                torch.manual_seed(self.head_seed)
                self.raw_model.reset_expert_heads()
            log.info("model.new_expert_heads=true: every expert's own head starts anew over all classes")
        self._take_back_the_saved_mixture()
        loop = EpochLoop.from_config(self, self.cfg.trainer.epochs, self.cfg.trainer, judge=self.judge)
        best, epochs_run, seconds = loop.run()
        if self.wise_ft_on and not loop.pruned:
            best = self.interpolate_epochs(best, epochs_run, seconds)
        if not self.reads_test:
            return self.finish_trial(best, epochs_run, seconds, pruned=loop.pruned)
        return self.finish(best, epochs_run, seconds)

    def initial_epoch(self, should_stop) -> dict | None:
        """With the probe on (`probe.enabled`): fit the fusion side on the frozen experts' cached features of the
        training and validation parts (one pass of the experts over each), then measure the whole model on
        validation as epoch 0. None without the probe, or when `should_stop()` (a signal) ended the fit."""
        probe = self.cfg.probe
        if not self.probe_on:
            return None
        cache = {
            part: expert_outputs(self.raw_model, self.measured_parts[part], self.runtime) for part in ("train", "val")
        }
        self.probe_fit = fit_probe(
            self.raw_model,
            cache["train"],
            cache["val"],
            lr=float(probe.lr),
            weight_decays=[float(d) for d in probe.weight_decays],
            epochs=int(probe.epochs),
            patience=int(probe.patience),
            batch_size=int(probe.batch_size),
            seed=self.probe_seed,
            should_stop=should_stop,
        )
        if self.probe_fit is None:
            return None
        # every process fitted the same probe; rank 0's weights are the ones all fine-tune from (kernels may differ)
        distributed.broadcast_module(self.raw_model.fusion_side())
        fit = self.probe_fit
        log.info(
            "probe: weight decay %g kept (best epoch %d of %d on cached features; val %.4f), %s, in %.1fs",
            fit.weight_decay,
            fit.epoch,
            fit.epochs_run,
            fit.val_accuracy,
            ", ".join(f"wd {c['weight_decay']:g}: {c['accuracy']:.4f}" for c in fit.candidates),
            fit.seconds,
        )
        val = evaluate(self.model, self.val_batches, self.objective, self.runtime)
        self.save_checkpoint(0, val)  # the probe's weights, each component on its own, with the fit's record
        return val

    def start_epoch(self, epoch: int) -> None:
        cfg = self.cfg
        self.raw_model.experts_frozen = epoch <= cfg.trainer.freeze_experts_epochs
        alpha = alpha_at(self.alpha, cfg.finetune.alpha_schedule, epoch, int(cfg.trainer.epochs))
        self.objective.weights[1:] = alpha

    def interpolate_epochs(self, best: dict, last: int, seconds: float) -> dict:
        """WiSE-FT (mcn.training.finetune): the model at `(1 - w) * epoch 0 + w * epoch last` for every w of
        `finetune.wise_ft_weights`, each measured on validation; the best mixture is reported and saved as epoch
        `last + 1` (components and complete model, naming the weight) and becomes the best epoch when it beats it.
        Each measured weight is recorded as it is measured, so a resumed run measures only the rest."""
        label, monitor = last + 1, self.monitor
        start = load_checkpoint(self.files.complete(0), component="complete")["state_dict"]
        end = clean_state_dict(self.raw_model.state_dict())  # the last epoch's: the loop has just ended there
        record = self._wise_ft_record(last)
        for weight in (float(w) for w in self.cfg.finetune.wise_ft_weights):
            if f"{weight:g}" in record["measured"]:
                continue
            self.raw_model.load_state_dict(interpolate_weights(start, end, weight))
            record["measured"][f"{weight:g}"] = evaluate(self.model, self.val_batches, self.objective, self.runtime)
            write_json(self.files.wise_ft, record)
        grid = {float(w): record["measured"][f"{float(w):g}"] for w in self.cfg.finetune.wise_ft_weights}
        chosen = max(grid, key=lambda w: (grid[w][monitor], -grid[w]["loss"]))
        val = grid[chosen]
        self.raw_model.load_state_dict(interpolate_weights(start, end, chosen))
        self.wise_ft = {
            "weight": chosen,
            "between_epochs": [0, last],
            "epoch": label,
            "val_accuracy": {f"{w:g}": m[monitor] for w, m in grid.items()},
        }
        self.report.add({"phase": "val", "epoch": label, **val, "elapsed_s": round(seconds, 2)})
        self.tracker.log({f"val/{k}": v for k, v in val.items()} | {"wise_ft_weight": chosen}, label)
        if self.judge is not None:  # a search's trial: its value counts the mixture, which can be the run's best
            self.judge(label, val)  # after the last epoch: nothing left to prune
        selected = val[monitor] > best["val_accuracy"]
        if selected and not self.files.complete(best["epoch"]).exists():
            # the loop's best is about to be replaced as the best: kept under its epoch, so a run that goes on after
            # this one (trainer.resume=force, more epochs) can take the mixture back (_take_back_the_saved_mixture)
            write_bytes(self.files.complete(best["epoch"]), self.files.complete().read_bytes())
        saved = {"saved_as": label, "best_before": best["epoch"] if selected else None}
        write_json(self.files.wise_ft, record | saved)  # before the files: a death in between leaves them undoable
        if selected:
            best = {"epoch": label, "val_accuracy": val[monitor]}
            self.save_best(label, val)
        self.save_checkpoint(label, val)
        self.wise_ft["selected"] = selected
        log.info(
            "WiSE-FT between epochs 0 and %d: weight %g best on validation (%s); saved as epoch %d, %s",
            last,
            chosen,
            ", ".join(f"{w:g}: {m[monitor]:.4f}" for w, m in grid.items()),
            label,
            "the best epoch" if selected else f"epoch {best['epoch']} stays the best ({best['val_accuracy']:.4f})",
        )
        return best

    # ------------------------------------------------------------------ save
    def _save_complete(self, path: Path, epoch: int, metrics: dict) -> None:
        m = self.raw_model
        probe = {"probe": self.probe_fit.as_dict()} if epoch == 0 and self.probe_fit is not None else {}
        save_component(
            path,
            "complete",
            m,
            epoch,
            fusion_type=self.fusion_type,
            metrics=metrics,
            config=self.config,
            lrs=self.lrs,
            **probe,
            **self._wise_ft_field(epoch),
        )

    def _take_back_the_saved_mixture(self) -> None:
        """A run that goes on after its WiSE-FT mixture was saved (trainer.resume=force with more epochs, or a rerun
        after a death in the final test) takes the mixture back before the loop: the best model returns to the loop's
        best epoch, the one its train state names, and the mixture's epoch files go, since the loop may now train an
        epoch of that number. WiSE-FT then runs again after the loop, between epoch 0 and its new last epoch (with
        the same last epoch, from the weights already measured). CheckpointError when the loop's best is missing."""
        try:
            record = json.loads(self.files.wise_ft.read_text())
        except (OSError, ValueError):
            return
        if not isinstance(record, dict) or record.get("saved_as") is None:
            return
        files, label, before = self.files, record["saved_as"], record.get("best_before")
        if before is not None:
            if not files.complete(before).exists():
                raise CheckpointError(
                    f"{files.complete(before)} is missing: it holds epoch {before}, the best before WiSE-FT's mixture "
                    f"in {files.complete()}, which this run goes on from; restore it, or start over with "
                    f"trainer.resume=never"
                )
            write_bytes(files.complete(), files.complete(before).read_bytes())
        if distributed.is_main():
            experts = [files.expert(i, label) for i in range(self.raw_model.num_experts)]
            for path in [*experts, files.fusion(label), files.global_head(label), files.complete(label)]:
                path.unlink(missing_ok=True)
        write_json(files.wise_ft, {"between_epochs": record["between_epochs"], "measured": record["measured"]})
        log.info("WiSE-FT's mixture saved as epoch %d is taken back: the run goes on from the loop's best", label)

    def _wise_ft_record(self, last: int) -> dict:
        """The WiSE-FT weights already measured between epochs 0 and `last` (a resumed run's); none when the file is
        missing, unreadable, or of other epochs."""
        try:
            record = json.loads(self.files.wise_ft.read_text())
        except (OSError, ValueError):
            record = None
        if not isinstance(record, dict) or record.get("between_epochs") != [0, last]:
            return {"between_epochs": [0, last], "measured": {}}
        return record

    def _wise_ft_field(self, epoch: int) -> dict:
        """What a checkpoint of WiSE-FT's mixture says of itself: the weight and the epochs it mixes."""
        if self.wise_ft is None or epoch != self.wise_ft["epoch"]:
            return {}
        return {"wise_ft": {"weight": self.wise_ft["weight"], "between_epochs": self.wise_ft["between_epochs"]}}

    def save_best(self, epoch: int, val: dict) -> None:
        self._save_complete(self.files.complete(), epoch, val)

    def save_checkpoint(self, epoch: int, val: dict) -> None:
        """Every component on its own, plus the complete model, all from this one epoch."""
        m, files = self.raw_model, self.files
        common = {"fusion_type": self.fusion_type, "metrics": val, "config": self.config, **self._wise_ft_field(epoch)}
        for i, (expert, spec) in enumerate(zip(m.experts, self.expert_specs)):
            save_component(files.expert(i, epoch), "expert", expert, epoch, index=i, family=spec.family, **common)
        # the adapters train with the fusion module and travel with it: its file holds their weights
        adapters = {"expert_widths": m.expert_widths, "adapters": clean_state_dict(m.adapters.state_dict())}
        save_component(files.fusion(epoch), "fusion", m.fusion, epoch, **adapters, **common)
        save_component(files.global_head(epoch), "global_head", m.global_head, epoch, **common)
        self._save_complete(files.complete(epoch), epoch, val)

    # ------------------------------------------------------------------ finish
    def finish(self, best: dict, epochs_run: int, train_time: float) -> dict:
        """Test once, with the best epoch's weights as saved on disk; write the results record."""
        final = self._reload_best(best["epoch"])
        test = head_metrics(*final["test"], self.objective)
        self.report.add({"phase": "test", "epoch": best["epoch"], **test, "elapsed_s": round(train_time, 2)})
        results = self._results(best, final, test, epochs_run, train_time)
        results.write(self.files.results)
        write_model_card(self.files, self.data, final["val"])
        self.tracker.summary({f"test/{k}": v for k, v in test.items()} | {"best_epoch": best["epoch"]})
        self._log_results(results)
        return asdict(results)

    def finish_trial(self, best: dict, epochs_run: int, train_time: float, *, pruned: bool) -> dict:
        """A search's trial ends on validation: its record, and no test pass."""
        record = {
            "fusion_type": self.fusion_type,
            "best_epoch": best["epoch"],
            "best_val_accuracy": best["val_accuracy"],
            "wise_ft": self.wise_ft,
            "pruned": pruned,
            "epochs_run": epochs_run,
            "epochs_planned": int(self.cfg.trainer.epochs),
            "wall_time_s": round(train_time, 2),
            "learning_rates": self.lrs,
            "config": self.config,
            "code": code_version(),
        }
        write_json(self.files.validation_results, record)
        log.info(
            "%s: %s after epoch %d, best val %.4f at epoch %d (a search's trial: the test set is not read)",
            self.fusion_type,
            "pruned" if pruned else "done",
            epochs_run,
            best["val_accuracy"],
            best["epoch"],
            extra=HEADLINE,
        )
        return record

    def _reload_best(self, epoch: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """The best epoch's complete model read back (and saved as components too, if it was not), then every
        head's predictions on each part."""
        distributed.barrier()  # rank 0 has written it
        best_ckpt = load_checkpoint(self.files.complete(), component="complete")
        self.raw_model.load_state_dict(best_ckpt["state_dict"])
        if not self.files.global_head(epoch).exists():
            self.save_checkpoint(epoch, best_ckpt["metrics"])
        return self.predict_parts()

    def _results(self, best: dict, final: dict, test: dict, epochs_run: int, train_time: float) -> FusionResults:
        k, m = self.raw_model.num_experts, self.raw_model
        pretrained = self.cfg.experts.dir is not None  # experts from scratch have no "pretrained" baselines
        test_logits, test_labels = final["test"]
        return FusionResults(
            fusion_type=self.fusion_type,
            best_epoch=best["epoch"],
            best_val_accuracy=best["val_accuracy"],
            test_accuracy=test["global_accuracy"],
            test_loss=test["loss"],
            expert_test_accuracy=[test[f"expert_{i}_accuracy"] for i in range(k)],
            ensemble_test_accuracy=test.get("ensemble_accuracy"),  # undefined (None) with one expert
            oracle_test_accuracy=test.get("oracle_accuracy"),
            initial_expert_test_accuracy=[self.initial_test[f"expert_{i}_accuracy"] for i in range(k)],
            initial_ensemble_test_accuracy=self.initial_test.get("ensemble_accuracy"),
            test_calibration=calibration(test_logits[0], test_labels),
            baselines={
                "pretrained": expert_baselines(*map(experts_of, self.initial.values())) if pretrained else None,
                "joint": expert_baselines(*map(experts_of, final.values())),
            },
            reliability={
                "fusion": reliability(test_logits[0], test_labels),
                "logit_average": reliability(self.initial["test"][0][1:].mean(0), test_labels) if pretrained else None,
            },
            experts_from=[s["path"] for s in self.expert_sources],
            parameters=m.parameter_counts(),
            learning_rates=self.lrs,
            expert_loss_weight=self.alpha,
            probe=self._probe_record(),
            wise_ft=self.wise_ft,
            epochs_planned=int(self.cfg.trainer.epochs),
            epochs_run=epochs_run,
            wall_time_s=round(train_time, 2),
            split_hash=self.data.split.hash,
            class_test_accuracy=class_accuracy(test_logits[0], test_labels, self.data.train.classes),
            seed=int(self.cfg.seed),
            split_seed=int(self.cfg.split.seed),
            runtime=self.runtime.describe(),
            config=self.config,
            code=code_version(),
        )

    def _probe_record(self) -> dict | None:
        """The probe's fit as epoch 0's complete checkpoint keeps it (a resumed run did not fit it itself); None
        without the probe, or when this run had no epoch 0 (probe.enabled switched on by trainer.resume=force)."""
        if self.probe_fit is not None:
            return self.probe_fit.as_dict()
        path = self.files.complete(0)
        if not self.probe_on or not path.exists():
            return None
        return load_checkpoint(path, component="complete").get("probe")

    def _log_results(self, r: FusionResults) -> None:
        log.info(
            "%s: best epoch %d, val %.4f, test %.4f (experts %s, logit average %s; before fusion: %s)",
            self.fusion_type,
            r.best_epoch,
            r.best_val_accuracy,
            r.test_accuracy,
            ", ".join(f"{a:.4f}" for a in r.expert_test_accuracy),
            UNDEFINED if r.ensemble_test_accuracy is None else f"{r.ensemble_test_accuracy:.4f}",
            ", ".join(f"{a:.4f}" for a in r.initial_expert_test_accuracy),
            extra=HEADLINE,
        )
        for experts, per_baseline in r.baselines.items():
            if per_baseline is not None:
                log.info(
                    "%s: %s experts' baselines on test: %s",
                    self.fusion_type,
                    experts,
                    ", ".join(f"{name} {v['accuracy']:.4f}" for name, v in per_baseline.items() if v is not None),
                )

    # ------------------------------------------------------------------ cleanup
    def cleanup(self, *, failed: bool = False) -> None:
        if hasattr(self, "tracker"):
            self.tracker.finish(failed)
