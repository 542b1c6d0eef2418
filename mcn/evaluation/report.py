"""The study report of a sweep (`write_report`): the per-run summary (`mcn.evaluation.summary`), the study
(`mcn.evaluation.study`: groups of seeds, estimates, paired comparisons) and its figures: test accuracy per method
and group (mean, 95 % CI clipped to [0, 1] as in the tables, each run), validation accuracy per epoch (each group's
mean and its runs), and, where the runs kept them, reliability diagrams of the fusion and the logit average."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import numpy as np

from mcn.errors import FileError, MCNError
from mcn.evaluation.baselines import expected_calibration_error
from mcn.evaluation.figures import pyplot, save_figure
from mcn.evaluation.study import Study, make_study, pooled_reliability, write_study
from mcn.evaluation.summary import UNREADABLE, collect_runs, write_summary
from mcn.files import check_writable

# the accuracy figure's methods: the column of each run's test accuracy, and its legend. The temperature-scaled
# average is left out: a temperature does not change the argmax, so its accuracy is the logit average's.
FIGURE_METHODS = {
    "test_accuracy": "fusion",
    "pretrained_logit_average_test_accuracy": "logit average (pretrained experts)",
    "pretrained_probability_average_test_accuracy": "probability average (pretrained)",
    "pretrained_stacking_test_accuracy": "stacking (pretrained)",
    "pretrained_stacking_cv_test_accuracy": "stacking on val, CV (pretrained)",
    "pretrained_best_single_expert_test_accuracy": "best expert on val (pretrained)",
    "joint_logit_average_test_accuracy": "logit average (experts after joint training)",
    "joint_stacking_cv_test_accuracy": "stacking on val, CV (experts after joint training)",
}


def _accuracy_figure(study: Study):
    groups = study.groups
    methods = [c for c in FIGURE_METHODS if any(g.values(c) for g in groups)]
    if not methods:
        return None
    width = 0.8 / len(methods)
    fig, ax = pyplot().subplots(figsize=(max(9, 4 + 0.3 * len(groups) * len(methods)), 5))
    for j, column in enumerate(methods):
        x = np.arange(len(groups)) + (j - (len(methods) - 1) / 2) * width
        for xi, g in zip(x, groups):  # every run, faint
            ax.scatter([xi] * len(g.values(column)), g.values(column), s=9, color=f"C{j}", alpha=0.35, linewidths=0)
        estimates = [g.estimate(column) for g in groups]
        means = [np.nan if e.n == 0 else e.mean for e in estimates]
        below = [0 if e.ci_low is None else e.mean - e.ci_low for e in estimates]
        above = [0 if e.ci_high is None else e.ci_high - e.mean for e in estimates]
        ax.errorbar(
            x, means, yerr=[below, above], fmt="o", ms=4, capsize=3, color=f"C{j}", label=FIGURE_METHODS[column]
        )
    ax.set_xticks(range(len(groups)), [f"{g.label}\n(n={len(g.runs)})" for g in groups], rotation=20, ha="right")
    ax.set(ylabel="test accuracy", title="Test accuracy: mean and 95 % CI over seeds (clipped to [0, 1]); dots: runs")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1))  # outside: never over the data
    return fig


def _val_figure(study: Study):
    """Each group's runs (thin) and their mean per epoch (thick); unfinished runs dashed."""
    groups = [(g, [r["val_curve"] for r in g.runs if r.get("val_curve")]) for g in study.groups]
    unfinished = [(row, row.get("val_curve")) for row in study.unfinished]
    if not any(curves for _, curves in groups) and not any(curve for _, curve in unfinished):
        return None
    fig, ax = pyplot().subplots(figsize=(10, 4.5))
    for j, (g, curves) in enumerate(groups):
        for c in curves:
            ax.plot(list(c), list(c.values()), color=f"C{j}", alpha=0.3, lw=0.8)
        if curves:
            epochs = sorted(set().union(*curves))
            mean = [np.mean([c[e] for c in curves if e in c]) for e in epochs]
            ax.plot(epochs, mean, color=f"C{j}", lw=2, label=f"{g.label} (mean of n={len(curves)})")
    for row, c in unfinished:
        if c:
            label = f"{row['fusion_type']} ({row['status']})"
            ax.plot(list(c), list(c.values()), color="grey", ls="--", lw=1, label=label)
    ax.set(xlabel="epoch", ylabel="validation accuracy (global head)", title="Validation accuracy per epoch")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1))
    return fig


def _reliability_figure(study: Study):
    """One panel per group: its runs' test predictions pooled."""
    panels = []
    for g in study.groups:
        kept = [r["reliability"] for r in g.runs if r.get("reliability")]
        curves = {name: pooled_reliability([k.get(name) for k in kept]) for name in ("fusion", "logit_average")}
        if any(curves.values()):
            panels.append((g, curves))
    if not panels:
        return None
    cols, rows = min(3, len(panels)), math.ceil(len(panels) / min(3, len(panels)))
    fig, axes = pyplot().subplots(rows, cols, figsize=(4 * cols, 4 * rows), squeeze=False)
    for ax, (g, curves) in zip(axes.flat, panels):
        ax.plot([0, 1], [0, 1], ls=":", color="grey")
        for (name, bins), colour in zip(curves.items(), ("C0", "C1")):
            if bins:
                kept = [(p, a) for p, a, n in zip(bins["confidence"], bins["accuracy"], bins["count"]) if n]
                label = f"{name.replace('_', ' ')} (ECE {expected_calibration_error(bins):.3f})"
                ax.plot(*zip(*kept), marker="o", ms=3, color=colour, label=label)
        ax.set(xlabel="confidence", ylabel="accuracy", xlim=(-0.02, 1.02), ylim=(-0.02, 1.02))
        ax.set_title(f"{g.label} (n={len(g.runs)})", fontsize="medium")
        ax.legend(fontsize="small", loc="upper left")
    for ax in axes.flat[len(panels) :]:
        ax.set_visible(False)
    fig.suptitle("Reliability on the test set (15 bins, runs of a group pooled)")
    return fig


FIGURES = {
    "_val_accuracy.png": _val_figure,
    "_test_accuracy.png": _accuracy_figure,
    "_reliability.png": _reliability_figure,
}


def plot(study: Study, prefix: Path) -> list[Path]:
    """Every figure the study has data for, as `<prefix><suffix>`."""
    written = []
    for suffix, draw in FIGURES.items():
        fig = draw(study)
        if fig is None:
            continue
        written.append(save_figure(fig, prefix.with_name(prefix.name + suffix)))
    return written


def report_files(output: Path) -> list[Path]:
    """Every file write_report may write for `output` (the per-run CSV): the CSV and its Markdown, the study's CSV,
    Markdown and LaTeX, and each figure."""
    prefix = output.with_suffix("")
    study = [prefix.with_name(f"{prefix.name}_study{suffix}") for suffix in (".csv", ".md", ".tex")]
    return [output, output.with_suffix(".md"), *study, *(prefix.with_name(prefix.name + s) for s in FIGURES)]


def write_report(
    sweep: str | Path, output: str | Path, vary: list[str] = (), warn: Callable[[str], None] | None = None
) -> tuple[str, list[Path]]:
    """Everything this module writes for the fusion runs under `sweep`, beside `output` (the per-run CSV);
    returns the study's Markdown and the paths written. Nothing is written unless every output path can be
    (`report_files`, checked first). A run with an unreadable file (`collect_runs`) is listed in the report and
    in no mean, and `warn` gets one line naming it; when no run can be read, FileError says why instead.
    MCNError for a sweep that is not a folder, an output that is not a `.csv` file, and `vary` keys no run has."""
    sweep, output = Path(sweep), Path(output)
    if sweep.is_file():
        raise MCNError(
            f"{sweep} is a file, not a folder; point at the sweep or pipeline folder that holds the runs' folders"
        )
    if not sweep.is_dir():
        raise MCNError(f"sweep folder {sweep} does not exist")
    if output.is_dir():
        raise MCNError(
            f"--output_file {output} is a folder; name a CSV file, e.g. --output_file {output / 'summary.csv'}"
        )
    if output.suffix != ".csv":
        raise MCNError(
            f"--output_file {output}: the per-run table is a CSV, and the other files are named after it; "
            f"name it e.g. {output.with_suffix('.csv')}"
        )
    check_writable(report_files(output), fix="pass another --output_file")
    rows = collect_runs(sweep)
    if not rows:
        raise MCNError(f"no fusion runs under {sweep} (no fusion_*_report.csv); point at a sweep or pipeline folder")
    unreadable = [r for r in rows if r["status"] == UNREADABLE]
    if len(unreadable) == len(rows):
        first = unreadable[0]["reason"]
        raise FileError(
            first if len(rows) == 1 else f"none of the {len(rows)} runs under {sweep} can be read; the first: {first}"
        )
    study = make_study(rows, vary)  # before the warnings: a bad --vary ends the command in its one line
    for row in unreadable:
        if warn:
            warn(f"skipped {row['folder']} (in no mean): {row['reason']}")
    prefix = output.with_suffix("")
    markdown, study_files = write_study(study, prefix.with_name(prefix.name + "_study"), title=str(sweep))
    return markdown, [*write_summary(rows, output), *study_files, *plot(study, prefix)]
