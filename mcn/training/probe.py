"""The probe of probe-then-fine-tune (LP-FT; Kumar et al., "Fine-Tuning can Distort Pretrained Features and
Underperform Out-of-Distribution", ICLR 2022): before joint training, the fusion side of an MCN (adapters, fusion
module, global head) is fitted on the *frozen* experts, so that fine-tuning starts from a converged head instead of
a random one.

The experts run once over each part (`expert_outputs`: plain images, eval mode); the fusion side is then trained
on those cached features for up to `epochs` epochs (AdamW, cross-entropy of the global head), stopping after
`patience` epochs without a better validation accuracy. Each AdamW weight decay of `weight_decays` is fitted from
the same initial weights; the one with the best validation accuracy (ties: lower validation loss) is kept. Every
random draw (shuffles, dropout) comes from `seed`, and the caller's random state is left as it was, so a fit is
reproducible on its own.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from mcn.models import MCN
from mcn.training.runtime import Runtime


@dataclass
class ExpertOutputs:
    """What the frozen experts give for one part: features (one [N, d_k] per expert), their logits [K, N, C] and
    the labels [N], all float32 (labels int64) on the runtime's device."""

    features: list[torch.Tensor]
    expert_logits: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)

    def select(self, index: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
        return [f[index] for f in self.features], self.expert_logits[:, index], self.labels[index]


@torch.no_grad()
def expert_outputs(model: MCN, batches: Iterable, runtime: Runtime) -> ExpertOutputs:
    """One pass of the experts (eval mode) over `batches`, in order: the probe's cache for that part."""
    model.eval()
    features, logits, labels = [], [], []
    for x, y in batches:
        with runtime.autocast():
            f, expert_logits = model.forward_experts(x)
        features.append([t.float() for t in f])
        logits.append(expert_logits.float())
        labels.append(y)
    return ExpertOutputs(
        [torch.cat([f[k] for f in features]) for k in range(len(features[0]))],
        torch.cat(logits, dim=1),
        torch.cat(labels),
    )


@dataclass
class ProbeFit:
    """The kept fit (`weight_decay`, its best `epoch` of `epochs_run`, validation metrics) and every candidate's."""

    weight_decay: float
    epoch: int
    epochs_run: int
    val_accuracy: float
    val_loss: float
    candidates: list[dict]
    seconds: float

    def as_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def probe_metrics(model: MCN, part: ExpertOutputs, batch_size: int = 4096) -> dict[str, float]:
    """The global head's accuracy and mean cross-entropy on cached outputs (eval mode)."""
    model.eval()
    correct, loss = 0.0, 0.0
    for index in torch.arange(len(part), device=part.labels.device).split(batch_size):
        features, expert_logits, labels = part.select(index)
        logits = model.fuse(features, expert_logits).float()
        correct += (logits.argmax(-1) == labels).sum().item()
        loss += F.cross_entropy(logits, labels, reduction="sum").item()
    return {"accuracy": correct / len(part), "loss": loss / len(part)}


def _fit_one(
    model: MCN, train: ExpertOutputs, val: ExpertOutputs, weight_decay: float, settings: dict, seed: int
) -> tuple[dict, list[dict]] | None:
    """Fit the fusion side at one weight decay; returns (best validation metrics with its epoch, best weights), or
    None when `settings["should_stop"]()` said so after an epoch."""
    params = [p for module in model.fusion_side() for p in module.parameters()]
    optimizer = torch.optim.AdamW(params, lr=settings["lr"], weight_decay=weight_decay)
    shuffle = torch.Generator(device="cpu").manual_seed(seed)
    torch.manual_seed(seed)  # dropout's stream (the caller's state is restored around the whole probe)
    best, best_state, epoch = {"accuracy": -1.0, "loss": float("inf"), "epoch": 0}, None, 0
    for epoch in range(1, settings["epochs"] + 1):
        model.train()  # dropout in the fusion side; the experts are not called
        order = torch.randperm(len(train), generator=shuffle).to(train.labels.device)
        for index in order.split(settings["batch_size"]):
            features, expert_logits, labels = train.select(index)
            loss = F.cross_entropy(model.fuse(features, expert_logits).float(), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        val_metrics = probe_metrics(model, val)
        if (val_metrics["accuracy"], -val_metrics["loss"]) > (best["accuracy"], -best["loss"]):
            best = {**val_metrics, "epoch": epoch}
            best_state = [copy.deepcopy(m.state_dict()) for m in model.fusion_side()]
        elif epoch - best["epoch"] >= settings["patience"]:
            break
        if settings["should_stop"]():
            return None
    return {**best, "epochs_run": epoch, "weight_decay": weight_decay}, best_state


def fit_probe(
    model: MCN,
    train: ExpertOutputs,
    val: ExpertOutputs,
    *,
    lr: float,
    weight_decays: list[float],
    epochs: int,
    patience: int,
    batch_size: int,
    seed: int,
    should_stop: Callable[[], bool] = lambda: False,
) -> ProbeFit | None:
    """Fit `model`'s fusion side on cached expert outputs (see the module docstring) and leave the kept fit's
    weights in it; None, the fusion side as it came, when `should_stop()` (asked after every epoch) said so. The
    experts are not touched."""
    start = time.time()
    settings = {"lr": lr, "epochs": epochs, "patience": patience, "batch_size": batch_size, "should_stop": should_stop}
    initial = [copy.deepcopy(m.state_dict()) for m in model.fusion_side()]
    devices = [train.labels.device] if train.labels.device.type == "cuda" else []
    candidates, states = [], []
    with torch.random.fork_rng(devices=devices):
        for weight_decay in weight_decays:
            for module, state in zip(model.fusion_side(), initial):
                module.load_state_dict(state)
            fitted = _fit_one(model, train, val, float(weight_decay), settings, seed)
            if fitted is None:
                for module, state in zip(model.fusion_side(), initial):
                    module.load_state_dict(state)
                return None
            candidates.append(fitted[0])
            states.append(fitted[1])
    kept = max(range(len(candidates)), key=lambda i: (candidates[i]["accuracy"], -candidates[i]["loss"]))
    for module, state in zip(model.fusion_side(), states[kept]):
        module.load_state_dict(state)
    best = candidates[kept]
    return ProbeFit(
        weight_decay=best["weight_decay"],
        epoch=best["epoch"],
        epochs_run=best["epochs_run"],
        val_accuracy=round(best["accuracy"], 6),
        val_loss=round(best["loss"], 6),
        candidates=[{k: round(v, 6) if isinstance(v, float) else v for k, v in c.items()} for c in candidates],
        seconds=round(time.time() - start, 2),
    )
