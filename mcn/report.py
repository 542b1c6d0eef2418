"""Sweep summaries: one row per fusion run, as CSV and as a Markdown table.

A run is any folder holding a `fusion_*_report.csv` or a `fusion_training_results_*.json`; runs
without a results JSON are listed as still running or failed, never dropped.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

COLUMNS = ["fusion_type", "status", "best_epoch", "val_accuracy", "test_accuracy", "ensemble_test_accuracy",
           "oracle_test_accuracy", "expert_test_accuracy", "initial_expert_test_accuracy",
           "initial_ensemble_test_accuracy", "pretrained_experts", "parameters", "epochs_run", "wall_time_s", "folder"]


def _status(folder: Path) -> str:
    """'failed' when the job log ends in an error, else 'running' (no results yet)."""
    logs = sorted(folder.glob("*.log"))
    text = logs[-1].read_text(errors="replace") if logs else ""
    return "failed" if ("error" in text.lower().splitlines()[-1] if text.strip() else False) else "running"


def collect_runs(root: str | Path) -> list[dict]:
    root = Path(root)
    folders = sorted({p.parent for pattern in ("fusion_*_report.csv", "fusion_training_results_*.json")
                      for p in root.rglob(pattern)})
    rows = []
    for folder in folders:
        results = sorted(folder.glob("fusion_training_results_*.json"))
        if not results:
            name = next(folder.glob("fusion_*_report.csv")).name[len("fusion_"):-len("_report.csv")]
            rows.append({"fusion_type": name, "status": _status(folder), "folder": str(folder)})
            continue
        r = json.loads(results[0].read_text())
        rows.append({
            "fusion_type": r["fusion_type"], "status": "done", "best_epoch": r["best_epoch"],
            "val_accuracy": r["best_val_accuracy"], "test_accuracy": r["test_accuracy"],
            "ensemble_test_accuracy": r["ensemble_test_accuracy"], "oracle_test_accuracy": r["oracle_test_accuracy"],
            "expert_test_accuracy": r["expert_test_accuracy"],
            "initial_expert_test_accuracy": r["initial_expert_test_accuracy"],
            "initial_ensemble_test_accuracy": r["initial_ensemble_test_accuracy"],
            "pretrained_experts": all(r["experts_from"]),
            "parameters": r["parameters"]["total"], "epochs_run": r["epochs_run"], "wall_time_s": r["wall_time_s"],
            "folder": str(folder),
        })
    return rows


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    if isinstance(value, list):
        return " ".join(_cell(v) for v in value)
    return "" if value is None else str(value)


def markdown_table(rows: list[dict], columns: list[str] = COLUMNS) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def write_summary(rows: list[dict], csv_path: str | Path) -> tuple[Path, Path]:
    """Writes `csv_path` and the same table as Markdown beside it (`.md`)."""
    csv_path = Path(csv_path)
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows({c: _cell(row.get(c)) for c in COLUMNS} for row in rows)
    md_path = csv_path.with_suffix(".md")
    md_path.write_text(markdown_table(rows))
    return csv_path, md_path
