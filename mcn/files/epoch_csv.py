"""The per-epoch CSV of a run (`fusion_<type>_report.csv`, `expert_<i>_report.csv`): one row per (phase, epoch)."""

from __future__ import annotations

from pathlib import Path

from mcn import distributed
from mcn.files.io import read_csv, write_csv


class EpochCsv:
    """Per-epoch rows; a row for a (phase, epoch) already on file replaces it, so a resumed run never holds an
    epoch twice."""

    def __init__(self, path: str | Path, columns: list[str]):
        self.path, self.columns = Path(path), columns
        self.rows: list[dict] = read_csv(self.path) if self.path.exists() else []

    def keep_until(self, epoch: int) -> None:
        """A run continuing after `epoch` (-1: starting afresh) keeps only the rows of the epochs it has behind it."""
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
