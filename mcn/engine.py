"""The parts of a training loop that fusion training and expert pretraining share.

A model's output is viewed as a stack of heads, logits [H, B, C]: the MCN's global head followed by
every expert's own head, or a lone expert's classifier. One weighted cross-entropy over the heads
gives the dual-path loss `CE(global) + alpha * sum_k CE(expert_k)`; one evaluation pass gives every
head's accuracy plus the experts' logit-average ensemble and oracle. Metrics are accumulated on the
device and read once per epoch, so there is no host synchronisation per step.
"""
from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path
from typing import Callable, Iterable

import torch
import torch.nn.functional as F

from mcn import distributed
from mcn.runtime import Runtime


def stacked_logits(output) -> torch.Tensor:
    """MCN output (global [B, C], experts [K, B, C]) or plain logits [B, C] -> [H, B, C]."""
    if isinstance(output, tuple):
        global_logits, expert_logits = output
        return torch.cat([global_logits[None], expert_logits])
    return output[None]


def weighted_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """logits [H, B, C]; targets [B] class ids or [B, C] probabilities; weights [H]."""
    h, b, c = logits.shape
    targets = targets.repeat(h) if targets.dim() == 1 else targets.repeat(h, 1)
    per_sample = F.cross_entropy(logits.reshape(h * b, c).float(), targets, reduction="none")
    return per_sample.view(h, b).mean(dim=1) @ weights


def cosine_schedule(optimizer: torch.optim.Optimizer, total_steps: int, min_lr_ratio: float,
                    warmup_steps: int = 0) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up, then cosine decay from each group's lr to `min_lr_ratio` times it."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class HeadMetrics:
    """Sums of loss and per-head correct counts, kept on the device until `compute()`.
    Head "x" reports `x_accuracy`; a lone unnamed head ("") reports `accuracy`."""

    def __init__(self, head_names: list[str], device: torch.device, ensemble: bool, sharded: bool = False):
        self.head_names, self.ensemble, self.sharded = head_names, ensemble, sharded
        self.loss = torch.zeros((), device=device)
        self.correct = torch.zeros(len(head_names) + 2 * ensemble, device=device)
        self.count = 0

    @torch.no_grad()
    def update(self, logits: torch.Tensor, labels: torch.Tensor, loss: torch.Tensor) -> None:
        hits = logits.argmax(-1) == labels  # [H, B]
        extra = []
        if self.ensemble:  # over the expert heads (all heads after the global one)
            extra = [(logits[1:].float().mean(0).argmax(-1) == labels).sum()[None], hits[1:].any(0).sum()[None]]
        self.correct += torch.cat([hits.sum(1), *extra]).float()
        self.loss += loss.detach().float() * labels.numel()
        self.count += labels.numel()

    def compute(self) -> dict[str, float]:
        sums = torch.cat([self.loss[None], torch.tensor([float(self.count)], device=self.loss.device), self.correct])
        if self.sharded:  # each process saw its own share of the batches
            distributed.all_reduce_sum(sums)
        values = sums.tolist()  # the one host sync of the epoch
        loss, count = values[0], max(1.0, values[1])
        correct = [c / count for c in values[2:]]
        names = self.head_names + (["ensemble", "oracle"] if self.ensemble else [])
        out = {"loss": round(loss / count, 6)}
        out.update({f"{name}_accuracy" if name else "accuracy": round(acc, 6) for name, acc in zip(names, correct)})
        return out


def train_epoch(model: torch.nn.Module, batches: Iterable, loss_weights: torch.Tensor, head_names: list[str],
                optimizer: torch.optim.Optimizer, scheduler, runtime: Runtime, grad_clip: float | None,
                make_targets: Callable | None = None, should_stop: Callable[[], bool] | None = None) -> dict[str, float]:
    """One pass over `batches`; `make_targets(x, y) -> (x, targets)` may mix inputs (CutMix) or soften labels;
    `should_stop()` is asked after every step (a signal arrived) and ends the pass early."""
    model.train()
    metrics = HeadMetrics(head_names, runtime.device, ensemble=False, sharded=runtime.dist.enabled)
    for x, y in batches:
        targets = y
        if make_targets is not None:
            x, targets = make_targets(x, y)
        with runtime.autocast():
            logits = stacked_logits(model(x))
        loss = weighted_cross_entropy(logits, targets, loss_weights)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()
        scheduler.step()
        metrics.update(logits, y, loss)
        if should_stop is not None and should_stop():
            break
    return metrics.compute()


@torch.no_grad()
def evaluate(model: torch.nn.Module, batches: Iterable, loss_weights: torch.Tensor, head_names: list[str],
             runtime: Runtime) -> dict[str, float]:
    """One forward per batch gives every head's accuracy (and, with several experts, ensemble and oracle)."""
    model.eval()
    metrics = HeadMetrics(head_names, runtime.device, ensemble=len(head_names) > 2)
    for x, y in batches:
        with runtime.autocast():
            logits = stacked_logits(model(x))
        metrics.update(logits, y, weighted_cross_entropy(logits, y, loss_weights))
    return metrics.compute()


class CsvReport:
    """Per-epoch rows; a row for a (phase, epoch) already on file replaces it, so a resumed run never holds an epoch twice."""

    def __init__(self, path: str | Path, columns: list[str]):
        self.path, self.columns = Path(path), columns
        self.rows: list[dict] = []
        if self.path.exists():
            with open(self.path, newline="") as f:
                self.rows = list(csv.DictReader(f))

    def add(self, row: dict) -> None:
        if not distributed.is_main():
            return
        self.rows = [r for r in self.rows if (r["phase"], str(r["epoch"])) != (row["phase"], str(row["epoch"]))]
        self.rows.append(row)
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=self.columns, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(self.rows)
        os.replace(tmp, self.path)


def write_json(path: str | Path, data: dict) -> None:
    if not distributed.is_main():
        return
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)
