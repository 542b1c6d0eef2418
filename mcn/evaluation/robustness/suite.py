"""The robustness suite of one fusion run: every model in one forward pass (`Panel`), one row per model x test
(`run_suite`), the clean pass checked against the run's recorded accuracies, and `measure_run`, which writes
the run's CSV, summary and figures."""

from __future__ import annotations

import copy
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn

from mcn.data.datasets import ImageSet
from mcn.data.prepare import prepare_data
from mcn.errors import CheckpointError, FileError
from mcn.evaluation.components import load_complete
from mcn.evaluation.robustness.corruptions import CORRUPTIONS, NOISE_SIGMAS, corrupt, normalised_noise
from mcn.evaluation.robustness.ood import SCORES, detection_metrics, ood_sets
from mcn.evaluation.robustness.report import model_label, plot_corruptions, plot_ood, summary_markdown
from mcn.files import (
    FusionResults,
    FusionRunFiles,
    extract_state_dict,
    load_checkpoint,
    load_expert_file,
    load_weights,
    write_csv,
    write_text,
)
from mcn.models import MCN
from mcn.training.config import expert_specs
from mcn.training.runtime import Runtime
from mcn.training.schema import expert_loss_weight

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


def _accuracy_rows(models: list[dict], logits: torch.Tensor, labels: torch.Tensor, test: dict) -> list[dict]:
    """One row per model of one accuracy test: `logits` [M, N, C] of the M models, `test` the fields naming it."""
    m, n, c = logits.shape
    correct = (logits.argmax(-1) == labels).sum(1).tolist()
    loss = F.cross_entropy(logits.reshape(m * n, c), labels.repeat(m), reduction="none").view(m, n).mean(1)
    return [
        {
            **model,
            **test,
            "accuracy": hits / n,
            "loss": model_loss,
            "correct_predictions": hits,
            "total_predictions": n,
        }
        for model, hits, model_loss in zip(models, correct, loss.tolist())
    ]


def _ood_rows(models: list[dict], id_logits: torch.Tensor, ood_logits: torch.Tensor, test: dict) -> list[dict]:
    """One row per model and score of one OOD set: detection of `ood_logits` against `id_logits` ([M, N, C])."""
    rows = []
    for score_name, score in SCORES.items():
        id_scores, ood_scores = score(id_logits).cpu().numpy(), score(ood_logits).cpu().numpy()
        for j, model in enumerate(models):
            rows.append(
                {
                    **model,
                    **test,
                    "uncertainty_metric": score_name,
                    **detection_metrics(id_scores[j], ood_scores[j]),
                    "ood_score_mean": float(ood_scores[j].mean(dtype=np.float64)),
                    "ood_score_std": float(ood_scores[j].std(dtype=np.float64)),
                    "total_predictions": len(ood_scores[j]),
                }
            )
    return rows


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

    def logits(inputs: torch.Tensor) -> torch.Tensor:
        return _logits(forward, inputs, batch_size, runtime)

    def test(test_type: str, corruption: str | None, level: int, value: float) -> dict:
        return {"test_type": test_type, "corruption_type": corruption, "severity_level": level, "severity_value": value}

    def accuracy(inputs: torch.Tensor, *fields) -> list[dict]:
        return _accuracy_rows(models, logits(inputs), labels, test(*fields))

    clean = logits(normalise(images))
    rows = _accuracy_rows(models, clean, labels, test("clean", None, 0, 0.0))
    for level, sigma in enumerate(NOISE_SIGMAS):
        noisy = normalised_noise(normalise(images), sigma, seed)
        rows += accuracy(noisy, "noise", "gaussian_noise_normalised", level, sigma)
    for i, (name, (_, values)) in enumerate(CORRUPTIONS.items()):
        for level, value in enumerate(values, start=1):
            rows += accuracy(normalise(corrupt(images, name, level, seed + i)), "corruption", name, level, value)
    for set_name, (kind, ood_images) in ood.items():
        test_fields = {"test_type": "ood", "ood_dataset": set_name, "ood_type": kind}
        rows += _ood_rows(models, clean, logits(normalise(ood_images)), test_fields)
    return rows


def _pretrained_experts(results: FusionResults, model: MCN) -> tuple[list[nn.Module], str | None]:
    """The experts the run started from (`experts_from` in its results), or none and why. Files the run was told to
    trust (its `experts.trust_pickle`) are trusted here too."""
    paths = results.experts_from or []
    if not paths or not all(paths):
        return [], None  # trained from scratch: nothing to compare with
    trusted = bool((results.config or {}).get("experts", {}).get("trust_pickle", False))
    experts = []
    try:
        for i, path in enumerate(paths):
            expert = copy.deepcopy(model.experts[i])
            weights = extract_state_dict(load_expert_file(path, trusted), path)
            load_weights(expert, weights, path, f"pretrained expert {i}")
            experts.append(expert.eval())
    except CheckpointError as e:
        return [], f"pretrained experts skipped: {e}"
    return experts, None


# the run's own clean test accuracies, by model label: what the clean pass must reproduce (undefined ones, the
# logit averages of one expert, are null in the JSON and not among the models)
def _recorded(results: FusionResults) -> dict[str, float]:
    out = {"fusion": results.test_accuracy, "logit average": results.ensemble_test_accuracy}
    out |= {f"expert {i}": a for i, a in enumerate(results.expert_test_accuracy)}
    out["pretrained logit average"] = results.initial_ensemble_test_accuracy
    out |= {f"pretrained expert {i}": a for i, a in enumerate(results.initial_expert_test_accuracy)}
    return {label: accuracy for label, accuracy in out.items() if accuracy is not None}


def check_against_record(rows: list[dict], results: FusionResults, source: Path) -> list[str]:
    """Clean accuracies that differ from the run's results JSON (`source`) by one image or more."""
    recorded, notes = _recorded(results), []
    for row in rows:
        if row["test_type"] == "clean":
            label = model_label(row)
            if abs(row["accuracy"] - recorded[label]) * row["total_predictions"] >= 0.5:
                notes.append(
                    f"{label}: clean accuracy {row['accuracy']:.4f} here, {recorded[label]:.4f} in {source.name} "
                    f"(its files were replaced since, or this device or batch size rounds differently)"
                )
    return notes


def measure_run(run: FusionRunFiles, device: str | None = None, batch_size: int | None = None) -> dict:
    """The whole suite on one finished run; writes its CSV, summary and figures (`run.robustness_files`); returns
    what it wrote. FileError or CheckpointError naming the file when one of the run's files cannot be read or is another
    run's."""
    start = time.perf_counter()
    results = FusionResults.read(run.results, run.fusion_type)
    cfg = OmegaConf.create(load_checkpoint(run.complete(), component="complete")["config"])
    cfg.split.force = False  # read the run's split; never remake it
    model = load_complete(run.root, run.fusion_type)
    if len(results.expert_test_accuracy) != len(model.experts):  # the record the clean pass is checked against
        raise FileError(
            f"{run.results} records {len(results.expert_test_accuracy)} experts, but {run.complete()} holds "
            f"{len(model.experts)}: the results are another run's; run the fusion run again to write them anew"
        )
    # the run's device, precision and threads, but no compile: one pass per test does not pay for compiling
    trainer = OmegaConf.merge(cfg.trainer, {"compile": False}, {"device": device} if device else {})
    runtime = Runtime.from_config(trainer)
    data = prepare_data(cfg, expert_specs(cfg))
    test = data.input_images(data.test)  # at the experts' input size, as training fed them
    pretrained, skipped = _pretrained_experts(results, model)
    notes = [skipped] if skipped else []
    panel = Panel(model, pretrained, [spec.label for spec in expert_specs(cfg)], run.fusion_type).eval()
    ood, skipped_sets = ood_sets(cfg.data.name, test, cfg.paths.data_dir, runtime.device)
    notes += skipped_sets
    models = panel.models()
    rows = run_suite(
        runtime.prepare(panel),
        models,
        test,
        data.mean,
        data.std,
        ood,
        runtime,
        batch_size or cfg.trainer.batch_size,
    )
    rows = [{"fusion_type": run.fusion_type, "alpha": expert_loss_weight(cfg), **row} for row in rows]
    mismatches = check_against_record(rows, results, run.results)
    seconds = time.perf_counter() - start
    where = f"cpu, torch threads: {torch.get_num_threads()}" if runtime.device.type == "cpu" else str(runtime.device)
    context = (
        f"{cfg.data.name} test set ({len(test)} images), best epoch {results.best_epoch}, {where}: "
        f"suite wall time {seconds:.1f} s"
    )
    write_csv(run.robustness_csv, COLUMNS, rows)
    plot_corruptions(rows, run.robustness_corruption_png)
    plot_ood(rows, run.robustness_ood_png)
    write_text(run.robustness_summary, summary_markdown(run, rows, context, notes, mismatches))
    return {"rows": rows, "notes": notes, "mismatches": mismatches, "seconds": seconds, "context": context}
