"""Reports: the per-epoch CSV of a run, and the summary of many runs as CSV and Markdown.

A run is any folder holding a fusion report CSV or results JSON (`mcn.files.find_fusion_runs`);
runs without a results JSON are listed as still running or failed, never dropped.
"""

from __future__ import annotations

import json
from pathlib import Path

from mcn import distributed
from mcn.files import find_fusion_runs, read_csv, write_csv, write_text
from mcn.status import read_status


class CsvReport:
    """Per-epoch rows; a row for a (phase, epoch) already on file replaces it, so a resumed run never holds an
    epoch twice."""

    def __init__(self, path: str | Path, columns: list[str]):
        self.path, self.columns = Path(path), columns
        self.rows: list[dict] = read_csv(self.path) if self.path.exists() else []

    def keep_until(self, epoch: int) -> None:
        """A run continuing after `epoch` (0: starting afresh) keeps only the rows of the epochs it has behind it."""
        kept = [r for r in self.rows if r["phase"] != "test" and int(r["epoch"]) <= epoch]
        if kept != self.rows and distributed.is_main():
            self.rows = kept
            write_csv(self.path, self.columns, self.rows)

    def add(self, row: dict) -> None:
        if not distributed.is_main():
            return
        self.rows = [r for r in self.rows if (r["phase"], str(r["epoch"])) != (row["phase"], str(row["epoch"]))]
        self.rows.append(row)
        write_csv(self.path, self.columns, self.rows)


SUMMARY_COLUMNS = [
    "fusion_type",
    "status",
    "best_epoch",
    "val_accuracy",
    "test_accuracy",
    "ensemble_test_accuracy",
    "oracle_test_accuracy",
    "expert_test_accuracy",
    "initial_expert_test_accuracy",
    "initial_ensemble_test_accuracy",
    "corruption_accuracy",
    "ood_auroc",
    "pretrained_experts",
    "parameters",
    "epochs_run",
    "wall_time_s",
    "reason",
    "folder",
]


def collect_runs(root: str | Path) -> list[dict]:
    from mcn.robustness import headline  # here, not at the top: mcn.robustness imports this module

    rows = []
    for run in find_fusion_runs(Path(root)):
        if not run.results.exists():  # not finished: say where it stands, and why it stopped
            status = read_status(run.status) or {}
            rows.append(
                {
                    "fusion_type": run.fusion_type,
                    "status": status.get("state", "running"),
                    "reason": status.get("error"),
                    "epochs_run": status.get("epoch"),
                    "folder": str(run.root),
                }
            )
            continue
        r = json.loads(run.results.read_text())
        rows.append(
            {
                "fusion_type": r["fusion_type"],
                "status": "done",
                "best_epoch": r["best_epoch"],
                "val_accuracy": r["best_val_accuracy"],
                "test_accuracy": r["test_accuracy"],
                "ensemble_test_accuracy": r["ensemble_test_accuracy"],
                "oracle_test_accuracy": r["oracle_test_accuracy"],
                "expert_test_accuracy": r["expert_test_accuracy"],
                "initial_expert_test_accuracy": r["initial_expert_test_accuracy"],
                "initial_ensemble_test_accuracy": r["initial_ensemble_test_accuracy"],
                "pretrained_experts": all(r["experts_from"]),
                "parameters": r["parameters"]["total"],
                "epochs_run": r["epochs_run"],
                "wall_time_s": r["wall_time_s"],
                "folder": str(run.root),
                **(headline(run) or {}),  # mean corruption accuracy and OOD AUROC, once mcn.robustness has run
            }
        )
    return rows


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    if isinstance(value, list):
        return " ".join(_cell(v) for v in value)
    return "" if value is None else str(value)


def markdown_table(rows: list[dict], columns: list[str] = SUMMARY_COLUMNS) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def write_summary(rows: list[dict], csv_path: str | Path) -> tuple[Path, Path]:
    """Writes `csv_path` and the same table as Markdown beside it (`.md`)."""
    csv_path = Path(csv_path)
    write_csv(csv_path, SUMMARY_COLUMNS, [{c: _cell(row.get(c)) for c in SUMMARY_COLUMNS} for row in rows])
    md_path = csv_path.with_suffix(".md")
    write_text(md_path, markdown_table(rows))
    return csv_path, md_path
