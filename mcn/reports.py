"""Reports: the per-epoch CSV of a run, the summary rows of many runs, and the table writers (CSV, Markdown,
LaTeX) that the sweep summary and the study report (`mcn.study`) share.

A run is any folder holding a fusion report CSV or results JSON (`mcn.files.find_fusion_runs`);
runs without a results JSON are listed as still running or failed, never dropped. A run's baselines
(`mcn.baselines`) become flat columns: `{experts}_{baseline}_test_{accuracy|nll|ece}` and what was chosen,
e.g. `pretrained_stacking_C`.
"""

from __future__ import annotations

import json
from pathlib import Path

from mcn import distributed
from mcn.baselines import BASELINES, CALIBRATION_METRICS
from mcn.files import FusionRunFiles, find_fusion_runs, load_file, read_csv, write_csv, write_text
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


def _saved_config(run: FusionRunFiles, results: dict) -> dict | None:
    """The run's resolved config: kept in its results JSON, or (runs written before that) in its best checkpoint."""
    if results.get("config") is not None:
        return results["config"]
    return load_file(run.complete()).get("config") if run.complete().exists() else None


def collect_runs(root: str | Path) -> list[dict]:
    """One row per fusion run under `root`, SUMMARY_COLUMNS plus `config` (the resolved run config, for grouping
    runs that differ only in their seed) and `reliability` (for the reliability diagram). A finished run's row
    comes from its results JSON; `seed`, `split_seed`, `test_calibration`, `baselines`, `reliability` and `config`
    are read where present (runs written before they were kept lack them)."""
    from mcn.robustness import headline  # here, not at the top: mcn.robustness imports this module

    rows = []
    for run in find_fusion_runs(Path(root)):
        status = read_status(run.status) or {}
        # not finished (or training again since its results were written): where it stands, and why it stopped
        if not run.results.exists() or status.get("state", "done") != "done":
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
        calibration, config = r.get("test_calibration") or {}, _saved_config(run, r)
        rows.append(
            {
                "fusion_type": r["fusion_type"],
                "status": "done",
                "seed": r.get("seed", (config or {}).get("seed")),
                "split_seed": r.get("split_seed", ((config or {}).get("split") or {}).get("seed")),
                "best_epoch": r["best_epoch"],
                "val_accuracy": r["best_val_accuracy"],
                "test_accuracy": r["test_accuracy"],
                "test_nll": calibration.get("nll"),
                "test_ece": calibration.get("ece"),
                "ensemble_test_accuracy": r["ensemble_test_accuracy"],
                "oracle_test_accuracy": r["oracle_test_accuracy"],
                "oracle_gap_used": oracle_gap_used(r),
                "expert_test_accuracy": r["expert_test_accuracy"],
                "initial_expert_test_accuracy": r["initial_expert_test_accuracy"],
                "initial_ensemble_test_accuracy": r["initial_ensemble_test_accuracy"],
                "pretrained_experts": all(r["experts_from"]),
                **_flat_baselines(r.get("baselines")),
                "parameters": r["parameters"]["total"],
                "epochs_run": r["epochs_run"],
                "wall_time_s": r["wall_time_s"],
                "folder": str(run.root),
                "config": config,
                "reliability": r.get("reliability"),
                **(headline(run) or {}),  # mean corruption accuracy and OOD AUROC, once mcn.robustness has run
            }
        )
    return rows


def oracle_gap_used(results: dict) -> float | None:
    """How much of its experts' disagreement a fusion turns into accuracy: (fusion - logit average) /
    (oracle - logit average), all on test and for the same (jointly trained) experts; 1 = as good as an oracle
    that always picks a right expert, 0 = no better than the average. Undefined with one expert or no gap."""
    average, oracle = results["ensemble_test_accuracy"], results["oracle_test_accuracy"]
    if average is None or oracle is None or oracle <= average:
        return None
    return (results["test_accuracy"] - average) / (oracle - average)


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    if isinstance(value, list):
        return " ".join(_cell(v) for v in value)
    return "" if value is None else str(value)


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


_LATEX_SPECIAL = {c: "\\" + c for c in "&%$#_{}"} | {"\\": r"\textbackslash{}", "~": r"\~{}", "^": r"\^{}"}


def _latex(text: str) -> str:
    return "".join(_LATEX_SPECIAL.get(c, c) for c in text).replace("±", r"$\pm$")


def latex_table(rows: list[dict], columns: list[str], caption: str) -> str:
    """The cells of markdown_table as a booktabs table (needs `\\usepackage{booktabs}`)."""
    lines = [r"\begin{table}[ht]", r"\centering", rf"\caption{{{_latex(caption)}}}"]
    lines += [rf"\begin{{tabular}}{{{'l' * len(columns)}}}", r"\toprule", " & ".join(map(_latex, columns)) + r" \\"]
    lines += [r"\midrule", *(" & ".join(_latex(_cell(row.get(c))) for c in columns) + r" \\" for row in rows)]
    lines += [r"\bottomrule", r"\end{tabular}", r"\end{table}"]
    return "\n".join(lines) + "\n"


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
    write_csv(csv_path, SUMMARY_COLUMNS, [{c: _cell(row.get(c)) for c in SUMMARY_COLUMNS} for row in rows])
    md_path = csv_path.with_suffix(".md")
    write_text(md_path, markdown_table(rows, RUN_TABLE_COLUMNS))
    return csv_path, md_path
