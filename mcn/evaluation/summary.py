"""The summary of many fusion runs: one row per run (`collect_runs`), its columns, and the per-run CSV and
Markdown (`write_summary`).

A run is any folder holding a fusion report CSV, results JSON or fusion run status (`mcn.files.find_fusion_runs`);
runs without results are listed as still running or failed, never dropped. A run one of whose files cannot be read
(results JSON, run status, per-epoch report CSV, robustness CSV, the best checkpoint its config comes from: truncated,
foreign, of another fusion type) is listed as `unreadable`, with the file and its fix as the reason, and is in no
mean: one broken run does not stop the report of a sweep, and no number of it is used half-read. A run's baselines
(`mcn.evaluation.baselines`) become flat columns: `{experts}_{baseline}_test_{accuracy|nll|ece}` and what was
chosen, e.g. `pretrained_stacking_C`.
"""

from __future__ import annotations

import math
from pathlib import Path

from mcn.errors import CheckpointError, FileError
from mcn.evaluation.baselines import BASELINES, CALIBRATION_METRICS, FLAG
from mcn.evaluation.robustness.report import headline
from mcn.evaluation.tables import cell, markdown_table
from mcn.files import (
    FusionResults,
    FusionRunFiles,
    find_fusion_runs,
    load_file,
    load_status,
    read_csv,
    write_csv,
    write_text,
)

EXPERT_SETS = ("pretrained", "joint")  # whose baselines: the experts as pretrained, and after joint training
UNREADABLE = "unreadable"  # the status of a run one of whose files cannot be read (collect_runs)


def baseline_column(experts: str, baseline: str, key: str) -> str:
    """A baseline's value as a summary column, e.g. `pretrained_stacking_test_nll` (metrics are on the test set)
    or `pretrained_stacking_C` (what was chosen)."""
    return f"{experts}_{baseline}_test_{key}" if key in CALIBRATION_METRICS else f"{experts}_{baseline}_{key}"


BASELINE_COLUMNS = [
    baseline_column(experts, baseline, key)
    for experts in EXPERT_SETS
    for baseline, choices in BASELINES.items()
    for key in (*CALIBRATION_METRICS, *choices)
]
SUMMARY_COLUMNS = [
    "fusion_type",
    "status",
    "seed",
    "split_seed",
    "best_epoch",
    "val_accuracy",
    "probe_val_accuracy",
    "test_accuracy",
    "test_nll",
    "test_ece",
    "ensemble_test_accuracy",
    "oracle_test_accuracy",
    "oracle_gap_used",
    "expert_test_accuracy",
    "initial_expert_test_accuracy",
    "initial_ensemble_test_accuracy",
    "corruption_accuracy",
    "ood_auroc",
    "pretrained_experts",
    *BASELINE_COLUMNS,
    "parameters",
    "epochs_run",
    "wall_time_s",
    "reason",
    "folder",
]


UNIT_INTERVAL = ("accuracy", "ece", "auroc")  # columns whose name ends so are fractions in [0, 1]
NOT_NEGATIVE = ("nll", "best_epoch", "epochs_run", "wall_time_s", "parameters", "temperature", "_C", "index")
TEXT_COLUMNS = ("fusion_type", "status", "reason", "folder", FLAG)  # (by their name's end) the rest are numbers


def value_range(column: str) -> tuple[float, float]:
    """The values a summary column (or a study quantity named after one) can take: [0, 1] for accuracies, ECE and
    AUROC; [0, inf) for NLL, epochs, counts, temperatures, C and indices; any number otherwise (`oracle_gap_used`, a
    ratio, is negative below the average). The study's intervals are clipped to it; a run holding a value outside
    it is unreadable (a foreign record, or percentages)."""
    if column.endswith(UNIT_INTERVAL):
        return 0.0, 1.0
    if column.endswith(NOT_NEGATIVE):
        return 0.0, math.inf
    return -math.inf, math.inf


def _check_values(row: dict, source: Path) -> dict:
    """`row`, when every number of it is a number inside its column's `value_range`; FileError naming `source`."""
    for column in SUMMARY_COLUMNS:
        values = row.get(column)
        for value in values if isinstance(values, list) else [values]:
            if value is None or isinstance(value, bool) or column.endswith(TEXT_COLUMNS):
                continue
            low, high = value_range(column)
            if not isinstance(value, (int, float)) or not low <= value <= high:
                raise FileError(
                    f"{source} is not an mcn fusion results file ({column} is {value!r:.40}, not a number in "
                    f"[{low:g}, {high:g}]); move it out of the run's folder or run the fusion run again to write it "
                    "anew"
                )
    return row


def _flat_baselines(baselines: dict | None) -> dict:
    """`{experts: {baseline: {key: value} | None}}` as summary columns; an undefined baseline (None) has none."""
    return {
        baseline_column(experts, baseline, key): value
        for experts, per_baseline in (baselines or {}).items()
        for baseline, values in (per_baseline or {}).items()
        for key, value in (values or {}).items()
    }


def _saved_config(run: FusionRunFiles, results: FusionResults) -> dict | None:
    """The run's resolved config: kept in its results, or (runs written before that) in its best checkpoint."""
    if results.config is not None:
        return results.config
    return load_file(run.complete()).get("config") if run.complete().exists() else None


def _val_curve(run: FusionRunFiles) -> dict[int, float]:
    """The global head's validation accuracy per epoch, from the run's per-epoch report CSV (none: no curve)."""
    if not run.report.exists():
        return {}
    fix = "delete it (the validation figure then leaves the run out) or run the fusion run again"
    columns = ("phase", "epoch", "global_accuracy")
    val = [r for r in read_csv(run.report, columns, numbers=columns[1:], fix=fix) if r["phase"] == "val"]
    if any(r["epoch"] is None or r["global_accuracy"] is None for r in val):
        raise FileError(f"{run.report} has a val row without its epoch or global_accuracy; {fix}")
    return {int(r["epoch"]): r["global_accuracy"] for r in val}


def _unfinished_row(run: FusionRunFiles, status: dict) -> dict:
    """Where a run that has not finished stands, and why it stopped."""
    return {
        "fusion_type": run.fusion_type,
        "status": status.get("state", "running"),
        "reason": status.get("error"),
        "epochs_run": status.get("epoch"),
        "folder": str(run.root),
        "val_curve": _val_curve(run),
    }


def _unreadable_row(run: FusionRunFiles, error: Exception) -> dict:
    """A run one of whose files cannot be read: the file and its fix are the reason; in no mean."""
    return {"fusion_type": run.fusion_type, "status": UNREADABLE, "reason": str(error), "folder": str(run.root)}


def _finished_row(run: FusionRunFiles, r: FusionResults) -> dict:
    calibration, config = r.test_calibration or {}, _saved_config(run, r)
    row = {
        "fusion_type": r.fusion_type,
        "status": "done",
        "seed": r.seed if r.seed is not None else (config or {}).get("seed"),
        "split_seed": r.split_seed if r.split_seed is not None else ((config or {}).get("split") or {}).get("seed"),
        "best_epoch": r.best_epoch,
        "val_accuracy": r.best_val_accuracy,
        "probe_val_accuracy": (r.probe or {}).get("val_accuracy"),  # on cached features, epoch 0 (probe.enabled)
        "test_accuracy": r.test_accuracy,
        "test_nll": calibration.get("nll"),
        "test_ece": calibration.get("ece"),
        "ensemble_test_accuracy": r.ensemble_test_accuracy,
        "oracle_test_accuracy": r.oracle_test_accuracy,
        "oracle_gap_used": oracle_gap_used(r),
        "expert_test_accuracy": r.expert_test_accuracy,
        "initial_expert_test_accuracy": r.initial_expert_test_accuracy,
        "initial_ensemble_test_accuracy": r.initial_ensemble_test_accuracy,
        "pretrained_experts": all(r.experts_from),
        **_flat_baselines(r.baselines),
        "parameters": r.parameters.get("total"),
        "epochs_run": r.epochs_run,
        "wall_time_s": r.wall_time_s,
        "folder": str(run.root),
        "config": config,
        "reliability": r.reliability,
        "val_curve": _val_curve(run),
        **(headline(run) or {}),  # mean corruption accuracy and OOD AUROC, once mcn.robustness has run
    }
    return _check_values(row, run.results)


def collect_runs(root: str | Path) -> list[dict]:
    """One row per fusion run under `root`, SUMMARY_COLUMNS plus `config` (the resolved run config, for grouping
    runs that differ only in their seed), `reliability` (for the reliability diagram) and `val_curve` ({epoch:
    validation accuracy}, for the validation figure). A finished run's row comes from its results record
    (`FusionResults`); fields that runs written before them lack are empty. A run with a file that cannot be read
    has status UNREADABLE and the error as its reason."""
    rows = []
    for run in find_fusion_runs(Path(root)):
        try:
            status = load_status(run.status) or {}
            # not finished, or training again since its results were written
            if not run.results.exists() or status.get("state", "done") != "done":
                rows.append(_unfinished_row(run, status))
            else:
                rows.append(_finished_row(run, FusionResults.read(run.results, run.fusion_type)))
        except (FileError, CheckpointError) as e:
            rows.append(_unreadable_row(run, e))
    return rows


def oracle_gap_used(results: FusionResults) -> float | None:
    """How much of its experts' disagreement a fusion turns into accuracy: (fusion - logit average) /
    (oracle - logit average), all on test and for the same (jointly trained) experts; 1 = as good as an oracle
    that always picks a right expert, 0 = no better than the average. Undefined with one expert or no gap."""
    average, oracle = results.ensemble_test_accuracy, results.oracle_test_accuracy
    if average is None or oracle is None or oracle <= average:
        return None
    return (results.test_accuracy - average) / (oracle - average)


# with loss.alpha at 0 (auto's value after the probe) nothing trains the experts' own heads to classify on their own,
# so the "joint" numbers read their pretrained heads on features that moved (docs/results.md §8)
JOINT_HEADS = (
    " (with loss.alpha at 0, auto's value after the probe, the experts' own loss terms are off and nothing trains "
    "their heads to fit the features that moved: compare with the pretrained columns)"
)

# what each per-run column says: written under the tables that show it (here and in mcn.evaluation.study)
COLUMN_LEGEND = {
    "fusion_type": "the fusion module's type",
    "status": "done; running, failed, interrupted or lost (not finished); unreadable (a file of the run cannot be "
    "read: the reason names it)",
    "seed": "the run's seed (its experts' and its fusion training's)",
    "split_seed": "the seed of the data split",
    "best_epoch": "the epoch chosen on validation, whose weights were tested",
    "val_accuracy": "accuracy on the fusion validation part (the fusion: at its best epoch; stacking_cv: its held-out "
    "cross-validation accuracy)",
    "probe_val_accuracy": "the probe's validation accuracy (epoch 0, on frozen experts)",
    "test_accuracy": "the fusion's (global head's) test accuracy",
    "test_nll": "the fusion's test negative log-likelihood (mean cross-entropy)",
    "test_ece": "the fusion's test expected calibration error (15 equal-width confidence bins)",
    "ensemble_test_accuracy": "test accuracy of the logit average of the experts after joint training" + JOINT_HEADS,
    "oracle_test_accuracy": "share of test images that at least one expert (after joint training) gets right"
    + JOINT_HEADS,
    "oracle_gap_used": "(fusion - logit average) / (oracle - logit average) on test, for the experts after joint "
    "training: the share of their disagreement the fusion turns into accuracy (1: as good as always picking a right "
    "expert; 0: no better than their average; below 0: worse)" + JOINT_HEADS,
    "pretrained_logit_average_test_accuracy": "test accuracy of the pretrained experts' logit average",
    "pretrained_best_single_expert_test_accuracy": "test accuracy of the pretrained expert best on validation",
    "epochs_run": "training epochs run",
    "wall_time_s": "training time in seconds (without the final test pass)",
    "corruption_accuracy": "the fusion's mean test accuracy over 9 corruptions x 5 severities (mcn.robustness)",
    "ood_auroc": "the fusion's mean OOD-detection AUROC by max softmax probability (mcn.robustness)",
    "reason": "why the run is in no mean: its error, or the file that cannot be read and its fix",
    "folder": "the run's folder",
}


# the per-run Markdown: the columns a reader scans; the CSV holds every column
RUN_TABLE_COLUMNS = [
    "fusion_type",
    "status",
    "seed",
    "split_seed",
    "best_epoch",
    "val_accuracy",
    "test_accuracy",
    "test_nll",
    "test_ece",
    "pretrained_logit_average_test_accuracy",
    "pretrained_best_single_expert_test_accuracy",
    "ensemble_test_accuracy",
    "epochs_run",
    "reason",
    "folder",
]


def write_summary(rows: list[dict], csv_path: str | Path) -> tuple[Path, Path]:
    """Writes `csv_path` (every summary column) and the main columns as Markdown beside it (`.md`)."""
    csv_path = Path(csv_path)
    write_csv(csv_path, SUMMARY_COLUMNS, [{c: cell(row.get(c)) for c in SUMMARY_COLUMNS} for row in rows])
    md_path = csv_path.with_suffix(".md")
    legend = "; ".join(f"`{c}`: {COLUMN_LEGEND[c]}" for c in RUN_TABLE_COLUMNS if c in COLUMN_LEGEND)
    write_text(md_path, f"{markdown_table(rows, RUN_TABLE_COLUMNS)}\nColumns: {legend}.\n")
    return csv_path, md_path
