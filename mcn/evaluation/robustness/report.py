"""What the robustness suite writes beside a run: the Markdown summary, the two figures, and `headline(run)`, the
fusion model's two headline numbers for the sweep summary."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from mcn.errors import FileError
from mcn.evaluation.figures import pyplot, save_figure
from mcn.evaluation.robustness.corruptions import CORRUPTIONS, NOISE_SIGMAS
from mcn.evaluation.robustness.ood import SCORES
from mcn.evaluation.tables import markdown_table
from mcn.files import FusionRunFiles, read_csv


def model_label(row: dict) -> str:
    name = row["model_type"].replace("_", " ")
    return name if row.get("expert_id") in (None, "") else f"{name} {row['expert_id']}"


def _text(value) -> str:
    return "" if value is None else str(value)


def mean_of(rows: list[dict], key: str, **match) -> float | None:
    """The mean of `key` over the rows matching every `match` (CSV text or numbers alike)."""
    values = [float(r[key]) for r in rows if all(_text(r.get(k)) == _text(v) for k, v in match.items())]
    return sum(values) / len(values) if values else None


def headline(run: FusionRunFiles) -> dict | None:
    """The fusion model's mean accuracy over all corruptions and severities and its mean OOD AUROC (max softmax
    probability, over the OOD sets), from the run's robustness CSV; None when there is none for the current
    best model. FileError naming the CSV when it is unreadable, foreign or holds a value outside [0, 1]."""
    path, best = run.robustness_csv, run.complete()
    if not path.is_file() or (best.is_file() and path.stat().st_mtime < best.stat().st_mtime):
        return None
    fix = f"run python -m mcn.robustness {run.root} again to write it anew, or delete it"
    columns = ("model_type", "test_type", "uncertainty_metric", "accuracy", "auroc")
    rows = read_csv(path, columns, numbers=("accuracy", "auroc"), fix=fix)
    out = {}
    for name, key, match in (
        ("corruption_accuracy", "accuracy", {"test_type": "corruption"}),
        ("ood_auroc", "auroc", {"test_type": "ood", "uncertainty_metric": "msp"}),
    ):
        values = [r[key] for r in rows if all(r[k] == v for k, v in (match | {"model_type": "fusion"}).items())]
        for value in values:
            if value is None or not 0 <= value <= 1:
                raise FileError(f"{path}: a fusion {match['test_type']} row's {key} is {value}, not in [0, 1]; {fix}")
        out[name] = sum(values) / len(values) if values else None
    return out


def _models(rows: list[dict]) -> list[dict]:
    seen = {}
    for row in rows:
        seen.setdefault(model_label(row), row)
    return list(seen.values())


def summary_markdown(
    run: FusionRunFiles, rows: list[dict], context: str, notes: list[str], mismatches: list[str]
) -> str:
    models = _models(rows)
    ood_names = list(dict.fromkeys(r["ood_dataset"] for r in rows if r["test_type"] == "ood"))
    accuracy_rows, ood_rows = [], []
    for m in models:
        same = {"model_type": m["model_type"], "expert_id": m.get("expert_id")}
        row = {"model": model_label(m), "clean": mean_of(rows, "accuracy", **same, test_type="clean")}
        for sigma in NOISE_SIGMAS[1:]:
            row[f"noise σ={sigma}"] = mean_of(rows, "accuracy", **same, test_type="noise", severity_value=sigma)
        row["corruptions (mean)"] = mean_of(rows, "accuracy", **same, test_type="corruption")
        for name in CORRUPTIONS:
            row[name] = mean_of(rows, "accuracy", **same, corruption_type=name)
        accuracy_rows.append(row)
        ood_row = {"model": model_label(m)}
        for score in SCORES:
            ood_row[f"AUROC {score} (mean)"] = mean_of(rows, "auroc", **same, test_type="ood", uncertainty_metric=score)
        ood_row["FPR@95 msp (mean)"] = mean_of(rows, "fpr95", **same, test_type="ood", uncertainty_metric="msp")
        for name in ood_names:
            ood_row[name] = mean_of(rows, "auroc", **same, ood_dataset=name, uncertainty_metric="msp")
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
            clean = mean_of(rows, "accuracy", **same, test_type="clean")
            if panel == "gaussian_noise_normalised":
                xs = list(NOISE_SIGMAS)
                ys = [mean_of(rows, "accuracy", **same, test_type="noise", severity_level=i) for i in range(len(xs))]
            else:
                xs = list(range(6))
                match = {"test_type": "corruption"} if panel.startswith("mean") else {"corruption_type": panel}
                ys = [clean] + [mean_of(rows, "accuracy", **same, **match, severity_level=s) for s in xs[1:]]
            ax.plot(xs, ys, label=model_label(m), **_style(m["model_type"]))
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
                mean_of(
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
        ax.set_xticks(np.arange(len(models)), [model_label(m) for m in models], rotation=60, ha="right", fontsize=8)
        ax.set(title=f"OOD AUROC, score: {score}", ylim=(0, 1.15))
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_ylabel("AUROC (in-distribution positive)")
    axes[0].legend(loc="upper center", ncol=len(sets), fontsize=8)
    save_figure(fig, path, dpi=110)
