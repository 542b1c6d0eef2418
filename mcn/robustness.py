"""Corruption robustness and out-of-distribution detection for every model of a fusion run (docs/reference.md §8).

    python -m mcn.robustness FOLDER [--device cuda] [--batch_size 512]

FOLDER is one fusion run or a whole sweep. For every finished run, on the run's own test set and
normalisation (read from the config saved in its best complete model), one forward pass per test
gives every model at once (`Panel`): the fusion model, its experts after joint training, their logit
average, and, when the run started from pretrained experts, those experts as they came in and their
logit average. The tests:

- `clean`: the test set as it is;
- `noise`: the reference's Gaussian noise, added after normalisation, sigma in `NOISE_SIGMAS`, clamped to [-3, 3];
- `corruption`: CIFAR-C style corruptions (`CORRUPTIONS`) at severities 1-5 of the [0, 1] images, batched on
  the data's device (torchvision's v2 functional ops where they exist), then normalised as in training;
- `ood`: out-of-distribution detection of every other data set mcn knows that is found offline (resized to the
  test set's size and channels) and of two synthetic sets (uniform noise, blurred noise), by three scores
  (`SCORES`); in-distribution is the positive class: AUROC, AUPR, FPR at 95 % TPR, detection accuracy.

The clean pass must give the accuracies the run recorded in its results JSON; where it does not (the files
were replaced since), the summary says so. Beside each run (names in `mcn.files.FusionRunFiles`): a tidy CSV
(one row per model x test), a Markdown summary with the suite's wall time, and two figures (accuracy vs
severity; OOD AUROC per model). `headline(run)` gives the fusion model's two headline numbers to the sweep
summary (`mcn.reports`).
"""

from __future__ import annotations

import copy
import json
import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve
from torch import nn
from torchvision.transforms.v2 import functional as TF

from mcn.cli import ArgumentParser, one_line_errors
from mcn.components import load_complete
from mcn.config import expert_specs
from mcn.data.datasets import DATASETS, ImageSet, load_dataset
from mcn.data.prepare import prepare_data
from mcn.errors import CheckpointError, DataError, MCNError
from mcn.figures import pyplot, save_figure
from mcn.files import (
    FusionRunFiles,
    extract_state_dict,
    find_fusion_runs,
    load_checkpoint,
    load_file,
    load_weights,
    read_csv,
    write_csv,
    write_text,
)
from mcn.models import MCN
from mcn.reports import markdown_table
from mcn.runtime import Runtime

COLUMNS = [
    "model_type",
    "fusion_type",
    "alpha",
    "expert_id",
    "model_architecture",
    "test_type",
    "corruption_type",
    "severity_level",
    "severity_value",
    "accuracy",
    "loss",
    "correct_predictions",
    "total_predictions",
    "ood_dataset",
    "ood_type",
    "uncertainty_metric",
    "auroc",
    "aupr",
    "fpr95",
    "detection_accuracy",
    "ood_score_mean",
    "ood_score_std",
]

# ---------------------------------------------------------------- corruptions (images in [0, 1], [N, C, H, W])


def _kernel(sigma: float) -> list[int]:
    size = 2 * math.ceil(3 * sigma) + 1
    return [size, size]


def _blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    return TF.gaussian_blur(x, _kernel(sigma), [sigma, sigma])


def _shot_noise(x: torch.Tensor, photons: float) -> torch.Tensor:
    return torch.poisson(x * photons) / photons


def _impulse_noise(x: torch.Tensor, amount: float) -> torch.Tensor:
    """Salt and pepper: a fraction `amount` of the values set to 0 or 1 (half each)."""
    u = torch.rand_like(x)
    return torch.where(u < amount / 2, 0.0, torch.where(u < amount, 1.0, x))


def _brightness(x: torch.Tensor, shift: float) -> torch.Tensor:
    """CIFAR-C's brightness: `shift` added to the HSV value (the largest channel) with hue and saturation kept,
    i.e. every channel scaled by V'/V; torchvision's adjust_brightness scales instead, leaving black black."""
    value = x.amax(dim=1, keepdim=True)
    brighter = (value + shift).clamp(max=1)
    return torch.where(value > 0, x * brighter / value.clamp_min(1e-12), brighter)


def _jpeg(x: torch.Tensor, quality: float) -> torch.Tensor:
    # the codec (libjpeg) runs on the host, one image at a time inside torchvision
    encoded = TF.jpeg(x.mul(255).round().to(torch.uint8).cpu(), int(quality))
    return encoded.to(x.device).float() / 255


def _pixelate(x: torch.Tensor, scale: float) -> torch.Tensor:
    """Down to `scale` of the size and back, filtered both ways as CIFAR-C's box resampling is; nearest-neighbour
    upsampling at these ratios (e.g. 30 -> 32) would alias, and its levels would not order by lost resolution."""
    h, w = x.shape[-2:]
    return TF.resize(TF.resize(x, [int(h * scale), int(w * scale)], antialias=True), [h, w], antialias=True)


def _elastic(x: torch.Tensor, rms_pixels: float) -> torch.Tensor:
    """A smooth random displacement field per image (uniform noise blurred with sigma 1.5 px), scaled to an RMS
    displacement of `rms_pixels`. torchvision's elastic_transform takes one field for the whole batch."""
    n, _, h, w = x.shape
    field = _blur(torch.rand(n, 2, h, w, device=x.device) * 2 - 1, 1.5)
    field = field / field.square().mean(dim=(1, 2, 3), keepdim=True).sqrt() * rms_pixels
    identity = F.affine_grid(torch.eye(2, 3, device=x.device).expand(n, 2, 3), [n, 1, h, w], align_corners=False)
    to_grid_units = torch.tensor([2 / w, 2 / h], device=x.device)  # grid_sample's [-1, 1] per side
    grid = identity + field.permute(0, 2, 3, 1) * to_grid_units
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


# name -> (op(images, value), the values of severities 1..5); severity 0 is no corruption. The values are
# CIFAR-10-C's (docs/reference.md §8) except elastic (mcn's own); spatial ones are in pixels.
CORRUPTIONS: dict[str, tuple[Callable[[torch.Tensor, float], torch.Tensor], tuple[float, ...]]] = {
    "gaussian_noise": (lambda x, sigma: TF.gaussian_noise(x, sigma=sigma), (0.04, 0.06, 0.08, 0.09, 0.10)),
    "shot_noise": (_shot_noise, (500, 250, 100, 75, 50)),
    "impulse_noise": (_impulse_noise, (0.01, 0.02, 0.03, 0.05, 0.07)),
    "gaussian_blur": (_blur, (0.4, 0.6, 0.7, 0.8, 1.0)),
    "contrast": (TF.adjust_contrast, (0.75, 0.5, 0.4, 0.3, 0.15)),
    "brightness": (_brightness, (0.05, 0.1, 0.15, 0.2, 0.3)),
    "jpeg": (_jpeg, (80, 65, 58, 50, 40)),
    "pixelate": (_pixelate, (0.95, 0.9, 0.85, 0.75, 0.65)),
    "elastic": (_elastic, (0.25, 0.5, 0.75, 1.0, 1.5)),
}
NOISE_SIGMAS = (0.0, 0.05, 0.1, 0.2, 0.3)  # the reference's Gaussian noise, in normalised units


@contextmanager
def _seeded(device: torch.device, seed: int) -> Iterator[None]:
    """Draw from a fixed seed without disturbing the caller's random streams."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield


def corrupt(images: torch.Tensor, name: str, severity: int, seed: int = 0) -> torch.Tensor:
    """Corruption `name` at `severity` (0: none; 1-5: `CORRUPTIONS`' values) of float images in [0, 1].
    Every severity draws the same random numbers, so the levels differ by their strength only."""
    if name not in CORRUPTIONS:
        raise MCNError(f"unknown corruption {name!r}; known: {', '.join(CORRUPTIONS)}")
    op, values = CORRUPTIONS[name]
    if not 0 <= severity <= len(values):
        raise MCNError(f"severity {severity} of {name}: choose 0 (none) to {len(values)}")
    if severity == 0:
        return images
    with _seeded(images.device, seed):
        return op(images, values[severity - 1]).clamp(0, 1)  # noise leaves the range; resampling rounds past it


def normalised_noise(inputs: torch.Tensor, sigma: float, seed: int = 0) -> torch.Tensor:
    """The reference's test: Gaussian noise on the normalised inputs, clamped to [-3, 3]."""
    with _seeded(inputs.device, seed):
        return (inputs + sigma * torch.randn_like(inputs)).clamp(-3, 3)


# ---------------------------------------------------------------- out-of-distribution detection

# score name -> score of logits [..., C]; higher means "more in-distribution"
SCORES: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "msp": lambda logits: logits.softmax(-1).amax(-1),  # maximum softmax probability
    "max_logit": lambda logits: logits.amax(-1),
    "energy": lambda logits: logits.logsumexp(-1),  # the negative free energy at temperature 1
}


def detection_metrics(id_scores: np.ndarray, ood_scores: np.ndarray) -> dict[str, float]:
    """In-distribution is the positive class. FPR@95: the share of OOD images accepted at the threshold that keeps
    95 % of the in-distribution ones; detection accuracy: the best 0.5 * (TPR + TNR) over thresholds."""
    labels = np.concatenate([np.ones(len(id_scores)), np.zeros(len(ood_scores))])
    scores = np.concatenate([id_scores, ood_scores])
    fpr, tpr, _ = roc_curve(labels, scores, drop_intermediate=False)
    return {
        "auroc": float(roc_auc_score(labels, scores)),
        "aupr": float(average_precision_score(labels, scores)),
        "fpr95": float(fpr[np.searchsorted(tpr, 0.95)]),
        "detection_accuracy": float(np.max(0.5 * (tpr + 1 - fpr))),
    }


def _conform(images: torch.Tensor, channels: int, size: tuple[int, int]) -> torch.Tensor:
    """uint8 images of another data set -> float [0, 1] images with the in-distribution's channels and size."""
    if images.shape[1] != channels:
        images = TF.rgb_to_grayscale(images) if channels == 1 else images.expand(-1, channels, -1, -1)
    return TF.resize(images, list(size), antialias=True).float() / 255


def ood_sets(
    in_distribution: str, test: ImageSet, data_dir: str | Path, device: torch.device, seed: int = 0
) -> tuple[dict[str, tuple[str, torch.Tensor]], list[str]]:
    """name -> (kind, float images in [0, 1] on `device`), as many images as the test set at most; and one line
    per data set skipped because it is not found offline."""
    n, channels, height, width = test.images.shape
    sets, skipped = {}, []
    for name in DATASETS:
        if name == in_distribution:
            continue
        try:
            other = load_dataset(name, data_dir, train=False)
        except DataError as e:
            skipped.append(f"OOD set {name} skipped: {e}")
            continue
        pick = torch.randperm(len(other), generator=torch.Generator().manual_seed(seed))[:n]
        sets[name] = ("dataset", _conform(other.images[pick].to(device), channels, (height, width)))
    with _seeded(device, seed):
        sets["uniform_noise"] = ("synthetic", torch.rand(n, channels, height, width, device=device))
        blobs = _blur(torch.rand(n, channels, height, width, device=device), max(1.0, height / 16))
        sets["blurred_noise"] = ("synthetic", blobs)
    return sets, skipped


# ---------------------------------------------------------------- the suite


class Panel(nn.Module):
    """Every model of a fusion run in one forward pass: logits [M, B, C], in `models()`' order. The logit
    averages are there only with two experts or more (with one they are undefined)."""

    def __init__(self, model: MCN, pretrained: list[nn.Module], expert_labels: list[str], fusion_type: str):
        super().__init__()
        self.model, self.pretrained = model, nn.ModuleList(pretrained)
        self.expert_labels, self.fusion_type = expert_labels, fusion_type
        self.averages = model.num_experts > 1

    def models(self) -> list[dict]:
        labels = self.expert_labels
        group = f"{len(labels)}x {labels[0]}" if len(set(labels)) == 1 else " + ".join(labels)
        out = [{"model_type": "fusion", "model_architecture": f"{self.fusion_type} over {group}"}]
        for kind in ("", "pretrained_") if len(self.pretrained) else ("",):
            out += [
                {"model_type": f"{kind}expert", "expert_id": i, "model_architecture": label}
                for i, label in enumerate(labels)
            ]
            out += [{"model_type": f"{kind}logit_average", "model_architecture": group}] if self.averages else []
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        global_logits, expert_logits = self.model(x)
        sets = [expert_logits] + ([torch.stack([e(x) for e in self.pretrained])] if len(self.pretrained) else [])
        heads = [global_logits[None]]
        for logits in sets:
            heads += [logits] + ([logits.float().mean(0, keepdim=True)] if self.averages else [])
        return torch.cat([h.float() for h in heads])


@torch.no_grad()
def _logits(forward: nn.Module, inputs: torch.Tensor, batch_size: int, runtime: Runtime) -> torch.Tensor:
    out = []
    for chunk in inputs.split(batch_size):
        if runtime.channels_last:
            chunk = chunk.contiguous(memory_format=torch.channels_last)
        with runtime.autocast():
            out.append(forward(chunk).float())
    return torch.cat(out, dim=1)


def run_suite(
    forward: nn.Module,
    models: list[dict],
    test: ImageSet,
    mean: list[float],
    std: list[float],
    ood: dict[str, tuple[str, torch.Tensor]],
    runtime: Runtime,
    batch_size: int,
    seed: int = 0,
) -> list[dict]:
    """One row per model x test. `forward(inputs) -> logits [len(models), B, C]`; the test set is moved to the
    device once and every test is one pass over it."""
    device = runtime.device
    images = test.images.to(device).float() / 255
    labels = test.labels.to(device)
    mean_, std_ = (torch.tensor(v, device=device).view(1, -1, 1, 1) for v in (mean, std))

    def normalise(x: torch.Tensor) -> torch.Tensor:
        return (x - mean_) / std_

    rows: list[dict] = []

    def accuracy(test_type: str, corruption: str | None, level: int, value: float, inputs: torch.Tensor):
        logits = _logits(forward, inputs, batch_size, runtime)
        m, n, c = logits.shape
        correct = (logits.argmax(-1) == labels).sum(1).tolist()
        loss = F.cross_entropy(logits.reshape(m * n, c), labels.repeat(m), reduction="none").view(m, n).mean(1)
        fields = {"test_type": test_type, "corruption_type": corruption, "severity_level": level}
        for model, hits, model_loss in zip(models, correct, loss.tolist()):
            rows.append(
                {
                    **model,
                    **fields,
                    "severity_value": value,
                    "accuracy": hits / n,
                    "loss": model_loss,
                    "correct_predictions": hits,
                    "total_predictions": n,
                }
            )
        return logits

    clean = accuracy("clean", None, 0, 0.0, normalise(images))
    for level, sigma in enumerate(NOISE_SIGMAS):
        accuracy("noise", "gaussian_noise_normalised", level, sigma, normalised_noise(normalise(images), sigma, seed))
    for i, (name, (_, values)) in enumerate(CORRUPTIONS.items()):
        for level, value in enumerate(values, start=1):
            accuracy("corruption", name, level, value, normalise(corrupt(images, name, level, seed + i)))

    id_scores = {name: score(clean).cpu().numpy() for name, score in SCORES.items()}
    for set_name, (kind, ood_images) in ood.items():
        logits = _logits(forward, normalise(ood_images), batch_size, runtime)
        for score_name, score in SCORES.items():
            ood_scores = score(logits).cpu().numpy()
            for j, model in enumerate(models):
                rows.append(
                    {
                        **model,
                        "test_type": "ood",
                        "ood_dataset": set_name,
                        "ood_type": kind,
                        "uncertainty_metric": score_name,
                        **detection_metrics(id_scores[score_name][j], ood_scores[j]),
                        "ood_score_mean": float(ood_scores[j].mean(dtype=np.float64)),
                        "ood_score_std": float(ood_scores[j].std(dtype=np.float64)),
                        "total_predictions": len(ood_scores[j]),
                    }
                )
    return rows


def _pretrained_experts(results: dict, model: MCN) -> tuple[list[nn.Module], str | None]:
    """The experts the run started from (`experts_from` in its results), or none and why."""
    paths = results.get("experts_from") or []
    if not paths or not all(paths):
        return [], None  # trained from scratch: nothing to compare with
    experts = []
    try:
        for i, path in enumerate(paths):
            expert = copy.deepcopy(model.experts[i])
            load_weights(expert, extract_state_dict(load_file(path), path), path, f"pretrained expert {i}")
            experts.append(expert.eval())
    except CheckpointError as e:
        return [], f"pretrained experts skipped: {e}"
    return experts, None


def _label(row: dict) -> str:
    name = row["model_type"].replace("_", " ")
    return name if row.get("expert_id") in (None, "") else f"{name} {row['expert_id']}"


# the run's own clean test accuracies, by model label: what the clean pass must reproduce (undefined ones, the
# logit averages of one expert, are null in the JSON and not among the models)
def _recorded(results: dict) -> dict[str, float]:
    out = {"fusion": results["test_accuracy"], "logit average": results["ensemble_test_accuracy"]}
    out |= {f"expert {i}": a for i, a in enumerate(results["expert_test_accuracy"])}
    out["pretrained logit average"] = results["initial_ensemble_test_accuracy"]
    out |= {f"pretrained expert {i}": a for i, a in enumerate(results["initial_expert_test_accuracy"])}
    return {label: accuracy for label, accuracy in out.items() if accuracy is not None}


def check_against_record(rows: list[dict], results: dict, source: Path) -> list[str]:
    """Clean accuracies that differ from the run's results JSON (`source`) by one image or more."""
    recorded, notes = _recorded(results), []
    for row in rows:
        if row["test_type"] == "clean":
            label = _label(row)
            if abs(row["accuracy"] - recorded[label]) * row["total_predictions"] >= 0.5:
                notes.append(
                    f"{label}: clean accuracy {row['accuracy']:.4f} here, {recorded[label]:.4f} in {source.name} "
                    f"(its files were replaced since, or this device or batch size rounds differently)"
                )
    return notes


def evaluate_run(run: FusionRunFiles, device: str | None = None, batch_size: int | None = None) -> dict:
    """The whole suite on one finished run; writes its CSV, summary and figures; returns what it wrote."""
    start = time.perf_counter()
    results = json.loads(run.results.read_text())
    cfg = OmegaConf.create(load_checkpoint(run.complete(), component="complete")["config"])
    cfg.split.force = False  # read the run's split; never remake it
    model = load_complete(run.root, run.fusion_type)
    # the run's device, precision and threads, but no compile: one pass per test does not pay for compiling
    trainer = OmegaConf.merge(cfg.trainer, {"compile": False}, {"device": device} if device else {})
    runtime = Runtime.from_config(trainer)
    data = prepare_data(cfg)
    pretrained, skipped = _pretrained_experts(results, model)
    notes = [skipped] if skipped else []
    panel = Panel(model, pretrained, [spec.label for spec in expert_specs(cfg)], run.fusion_type).eval()
    ood, skipped_sets = ood_sets(cfg.data.name, data.test, cfg.paths.data_dir, runtime.device)
    notes += skipped_sets
    models = panel.models()
    rows = run_suite(
        runtime.prepare(panel),
        models,
        data.test,
        data.mean,
        data.std,
        ood,
        runtime,
        batch_size or cfg.trainer.batch_size,
    )
    rows = [{"fusion_type": run.fusion_type, "alpha": cfg.loss.alpha, **row} for row in rows]
    mismatches = check_against_record(rows, results, run.results)
    seconds = time.perf_counter() - start
    where = f"cpu, torch threads: {torch.get_num_threads()}" if runtime.device.type == "cpu" else str(runtime.device)
    context = (
        f"{cfg.data.name} test set ({len(data.test)} images), best epoch {results['best_epoch']}, {where}: "
        f"suite wall time {seconds:.1f} s"
    )
    write_csv(run.robustness_csv, COLUMNS, rows)
    plot_corruptions(rows, run.robustness_corruption_png)
    plot_ood(rows, run.robustness_ood_png)
    write_text(run.robustness_summary, summary_markdown(run, rows, context, notes, mismatches))
    return {"rows": rows, "notes": notes, "mismatches": mismatches, "seconds": seconds, "context": context}


# ---------------------------------------------------------------- summaries


def _text(value) -> str:
    return "" if value is None else str(value)


def _mean(rows: list[dict], key: str, **match) -> float | None:
    """The mean of `key` over the rows matching every `match` (CSV text or numbers alike)."""
    values = [float(r[key]) for r in rows if all(_text(r.get(k)) == _text(v) for k, v in match.items())]
    return sum(values) / len(values) if values else None


def headline(run: FusionRunFiles) -> dict | None:
    """The fusion model's mean accuracy over all corruptions and severities and its mean OOD AUROC (max softmax
    probability, over the OOD sets), from the run's robustness CSV; None when there is none for the current
    best model."""
    path, best = run.robustness_csv, run.complete()
    if not path.is_file() or (best.is_file() and path.stat().st_mtime < best.stat().st_mtime):
        return None
    rows = read_csv(path)
    return {
        "corruption_accuracy": _mean(rows, "accuracy", model_type="fusion", test_type="corruption"),
        "ood_auroc": _mean(rows, "auroc", model_type="fusion", test_type="ood", uncertainty_metric="msp"),
    }


def _models(rows: list[dict]) -> list[dict]:
    seen = {}
    for row in rows:
        seen.setdefault(_label(row), row)
    return list(seen.values())


def summary_markdown(
    run: FusionRunFiles, rows: list[dict], context: str, notes: list[str], mismatches: list[str]
) -> str:
    models = _models(rows)
    ood_names = list(dict.fromkeys(r["ood_dataset"] for r in rows if r["test_type"] == "ood"))
    accuracy_rows, ood_rows = [], []
    for m in models:
        same = {"model_type": m["model_type"], "expert_id": m.get("expert_id")}
        row = {"model": _label(m), "clean": _mean(rows, "accuracy", **same, test_type="clean")}
        for sigma in NOISE_SIGMAS[1:]:
            row[f"noise σ={sigma}"] = _mean(rows, "accuracy", **same, test_type="noise", severity_value=sigma)
        row["corruptions (mean)"] = _mean(rows, "accuracy", **same, test_type="corruption")
        for name in CORRUPTIONS:
            row[name] = _mean(rows, "accuracy", **same, corruption_type=name)
        accuracy_rows.append(row)
        ood_row = {"model": _label(m)}
        for score in SCORES:
            ood_row[f"AUROC {score} (mean)"] = _mean(rows, "auroc", **same, test_type="ood", uncertainty_metric=score)
        ood_row["FPR@95 msp (mean)"] = _mean(rows, "fpr95", **same, test_type="ood", uncertainty_metric="msp")
        for name in ood_names:
            ood_row[name] = _mean(rows, "auroc", **same, ood_dataset=name, uncertainty_metric="msp")
        ood_rows.append(ood_row)
    lines = [
        f"# Robustness of the {run.fusion_type} run",
        "",
        f"`{run.root}`: {context}.",
        "",
        "## Accuracy under noise and corruptions",
        "",
        "Gaussian noise σ in normalised units; each corruption is the mean over its severities 1-5.",
        "",
        markdown_table(accuracy_rows, list(accuracy_rows[0])),
        "## Out-of-distribution detection",
        "",
        "AUROC with in-distribution positive; one column per OOD set (max softmax probability score).",
        "",
        markdown_table(ood_rows, list(ood_rows[0])),
    ]
    checks = mismatches or ["clean accuracies equal the run's recorded test accuracies"]
    lines += ["## Notes", "", *(f"- {line}" for line in [*checks, *notes]), ""]
    return "\n".join(lines)


# ---------------------------------------------------------------- figures


def _style(model_type: str) -> dict:
    return {
        "fusion": {"color": "C0", "lw": 2.2},
        "logit_average": {"color": "C2", "lw": 1.8},
        "pretrained_logit_average": {"color": "C2", "lw": 1.8, "ls": "--"},
        "expert": {"color": "0.55", "lw": 0.8},
        "pretrained_expert": {"color": "0.55", "lw": 0.8, "ls": "--"},
    }[model_type]


def plot_corruptions(rows: list[dict], path: Path) -> None:
    """Accuracy vs severity, one panel per corruption, the reference's noise, and the mean; one line per model."""
    plt = pyplot()
    panels = [*CORRUPTIONS, "gaussian_noise_normalised", "mean over corruptions"]
    cols = 4
    fig, axes = plt.subplots(math.ceil(len(panels) / cols), cols, figsize=(13, 8.5), sharey=True)
    for ax, panel in zip(axes.flat, panels):
        for m in _models(rows):
            same = {"model_type": m["model_type"], "expert_id": m.get("expert_id")}
            clean = _mean(rows, "accuracy", **same, test_type="clean")
            if panel == "gaussian_noise_normalised":
                xs = list(NOISE_SIGMAS)
                ys = [_mean(rows, "accuracy", **same, test_type="noise", severity_level=i) for i in range(len(xs))]
            else:
                xs = list(range(6))
                match = {"test_type": "corruption"} if panel.startswith("mean") else {"corruption_type": panel}
                ys = [clean] + [_mean(rows, "accuracy", **same, **match, severity_level=s) for s in xs[1:]]
            ax.plot(xs, ys, label=_label(m), **_style(m["model_type"]))
        ax.set_title(panel, fontsize=10)
        ax.set_xlabel("σ (normalised)" if panel == "gaussian_noise_normalised" else "severity")
        ax.grid(alpha=0.3)
    for ax in axes.flat[len(panels) :]:
        ax.axis("off")
    for ax in axes[:, 0]:
        ax.set_ylabel("test accuracy")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower right", fontsize=8, ncol=2)
    save_figure(fig, path, dpi=110)


def plot_ood(rows: list[dict], path: Path) -> None:
    """OOD AUROC per model, one panel per score, one bar per OOD set."""
    plt = pyplot()
    models = _models(rows)
    sets = list(dict.fromkeys(r["ood_dataset"] for r in rows if r["test_type"] == "ood"))
    fig, axes = plt.subplots(1, len(SCORES), figsize=(15, 4.5), sharey=True)
    width = 0.8 / len(sets)
    for ax, score in zip(axes, SCORES):
        for j, name in enumerate(sets):
            values = [
                _mean(
                    rows,
                    "auroc",
                    model_type=m["model_type"],
                    expert_id=m.get("expert_id"),
                    ood_dataset=name,
                    uncertainty_metric=score,
                )
                for m in models
            ]
            ax.bar(np.arange(len(models)) + (j - (len(sets) - 1) / 2) * width, values, width, label=name)
        ax.axhline(0.5, color="0.3", lw=0.8, ls=":")
        ax.set_xticks(np.arange(len(models)), [_label(m) for m in models], rotation=60, ha="right", fontsize=8)
        ax.set(title=f"OOD AUROC, score: {score}", ylim=(0, 1.15))
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_ylabel("AUROC (in-distribution positive)")
    axes[0].legend(loc="upper center", ncol=len(sets), fontsize=8)
    save_figure(fig, path, dpi=110)


# ---------------------------------------------------------------- command line


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m mcn.robustness", description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", help="a fusion run's folder, or a sweep (pipeline) folder holding several")
    parser.add_argument("--device", help="cpu, cuda, cuda:1 (default: the run's trainer.device)")
    parser.add_argument("--batch_size", type=int, help="images per forward pass (default: the run's batch size)")
    args = parser.parse_args(argv)
    with one_line_errors():
        root = Path(args.folder)
        if not root.is_dir():
            raise MCNError(f"folder {root} does not exist; point at a fusion run or a sweep folder")
        if args.batch_size is not None and args.batch_size < 1:
            raise MCNError(f"--batch_size {args.batch_size} must be a positive number")
        runs = find_fusion_runs(root)
        finished = [r for r in runs if r.results.is_file() and r.complete().is_file()]
        for run in runs:
            if run not in finished:
                print(f"{run.root}: skipped, {run.fusion_type} has not finished (no {run.results.name})")
        if not finished:
            raise MCNError(f"no finished fusion runs under {root} (no fusion_training_results_*.json)")
        for run in finished:
            out = evaluate_run(run, args.device, args.batch_size)
            for line in out["notes"] + out["mismatches"]:
                print(f"{run.root}: {line}")
            top = headline(run)
            clean = _mean(out["rows"], "accuracy", model_type="fusion", test_type="clean")
            print(
                f"{run.fusion_type}: clean {clean:.4f}, corruptions (mean) {top['corruption_accuracy']:.4f}, "
                f"OOD AUROC msp (mean) {top['ood_auroc']:.4f}; {out['context']}; wrote {run.robustness_summary}"
            )
        return 0


if __name__ == "__main__":
    raise SystemExit(main())
