"""The summary of many fusion runs: one row per run (`collect_runs`), its columns, and the per-run CSV and
Markdown (`write_summary`).

A run is any folder holding a fusion report CSV, results JSON or fusion run status (`mcn.files.find_fusion_runs`);
runs without results are listed as still running or failed, never dropped. A run's baselines
(`mcn.evaluation.baselines`) become flat columns: `{experts}_{baseline}_test_{accuracy|nll|ece}` and what was
chosen, e.g. `pretrained_stacking_C`.
"""

from __future__ import annotations

from pathlib import Path

from mcn.evaluation.baselines import BASELINES, CALIBRATION_METRICS
from mcn.evaluation.robustness.report import headline
from mcn.evaluation.tables import cell, markdown_table
from mcn.files import FusionResults, FusionRunFiles, find_fusion_runs, load_file, read_status, write_csv, write_text

EXPERT_SETS = ("pretrained", "joint")  # whose baselines: the experts as pretrained, and after joint training


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


def _unfinished_row(run: FusionRunFiles, status: dict) -> dict:
    """Where a run that has not finished stands, and why it stopped."""
    return {
        "fusion_type": run.fusion_type,
        "status": status.get("state", "running"),
        "reason": status.get("error"),
        "epochs_run": status.get("epoch"),
        "folder": str(run.root),
    }


def _finished_row(run: FusionRunFiles, r: FusionResults) -> dict:
    calibration, config = r.test_calibration or {}, _saved_config(run, r)
    return {
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
        "parameters": r.parameters["total"],
        "epochs_run": r.epochs_run,
        "wall_time_s": r.wall_time_s,
        "folder": str(run.root),
        "config": config,
        "reliability": r.reliability,
        **(headline(run) or {}),  # mean corruption accuracy and OOD AUROC, once mcn.robustness has run
    }


def collect_runs(root: str | Path) -> list[dict]:
    """One row per fusion run under `root`, SUMMARY_COLUMNS plus `config` (the resolved run config, for grouping
    runs that differ only in their seed) and `reliability` (for the reliability diagram). A finished run's row
    comes from its results record (`FusionResults`); fields that runs written before them lack are empty."""
    rows = []
    for run in find_fusion_runs(Path(root)):
        status = read_status(run.status) or {}
        # not finished, or training again since its results were written
        if not run.results.exists() or status.get("state", "done") != "done":
            rows.append(_unfinished_row(run, status))
        else:
            rows.append(_finished_row(run, FusionResults.read(run.results)))
    return rows


def oracle_gap_used(results: FusionResults) -> float | None:
    """How much of its experts' disagreement a fusion turns into accuracy: (fusion - logit average) /
    (oracle - logit average), all on test and for the same (jointly trained) experts; 1 = as good as an oracle
    that always picks a right expert, 0 = no better than the average. Undefined with one expert or no gap."""
    average, oracle = results.ensemble_test_accuracy, results.oracle_test_accuracy
    if average is None or oracle is None or oracle <= average:
        return None
    return (results.test_accuracy - average) / (oracle - average)


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
    write_text(md_path, markdown_table(rows, RUN_TABLE_COLUMNS))
    return csv_path, md_path
