"""The study report of a sweep (the guide's `evaluate_fusions.py`, docs/reference.md §4).

    python -m mcn.evaluate outputs/multirun/2026-11-27/10-00-00 [--output_file fusion_performance_summary.csv]

Beside the CSV (one row per run, every column; the main ones as `.md`) it writes the study (`mcn.evaluation.study`):
`<name>_study.csv` (every statistic), `<name>_study.md` and `<name>_study.tex` (the tables), and PNG figures:
test accuracy per method and group (mean, 95 % CI, each run), validation accuracy per epoch (each group's mean
and its runs), and, where the runs kept them, reliability diagrams of the fusion and the logit average.
Runs that are not finished are listed with their state and reason, and are in no mean. A run with a file that cannot
be read (truncated, foreign) is listed as `unreadable`, in no mean, with one warning line on stderr naming the file;
when no run can be read, the command ends with that line as its error. Every output path is checked before the first
file is written: a folder where a file goes, or a folder that is not writable, ends the command in one line.
"""

from __future__ import annotations

from pathlib import Path

from mcn.cli import ArgumentParser, one_line_errors, warn
from mcn.evaluation.report import write_report


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m mcn.evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("sweep", help="a sweep (or pipeline) folder holding fusion runs")
    parser.add_argument("--output_file", help="CSV path (default: <sweep>/fusion_performance_summary.csv)")
    parser.add_argument(
        "--vary",
        action="append",
        default=[],
        metavar="KEY",
        help="a config key besides seed whose runs are replicates of one group, e.g. split.seed (repeatable)",
    )
    args = parser.parse_args(argv)
    with one_line_errors():
        output = args.output_file or Path(args.sweep) / "fusion_performance_summary.csv"
        markdown, paths = write_report(args.sweep, output, args.vary, warn)
        print(markdown)
        print("wrote " + ", ".join(str(p) for p in paths))
        return 0


if __name__ == "__main__":
    raise SystemExit(main())
