"""Compare every fusion run of a sweep (the guide's `evaluate_fusions.py`, docs/reference.md §4).

    python -m mcn.evaluate outputs/multirun/2026-11-27/10-00-00 [--output_file fusion_performance_summary.csv]

Writes the CSV, the same table as Markdown (`.md`), and two PNG figures beside it:
validation accuracy per epoch for every fusion type, and test accuracy per method (each fusion,
and, when the experts were pretrained, the mean pretrained expert and their logit average).
Runs without results are listed as running or failed.
"""

from __future__ import annotations

from pathlib import Path

from mcn.cli import ArgumentParser, one_line_errors
from mcn.errors import MCNError
from mcn.files import FusionRunFiles, read_csv
from mcn.reports import collect_runs, markdown_table, write_summary


def _val_curves(rows: list[dict]) -> dict[str, tuple[list[int], list[float]]]:
    curves = {}
    for row in rows:
        report = FusionRunFiles(Path(row["folder"]), row["fusion_type"]).report
        if report.exists():
            val = [r for r in read_csv(report) if r["phase"] == "val"]
            label = (
                row["fusion_type"] if row["fusion_type"] not in curves else f"{row['fusion_type']} ({row['folder']})"
            )
            curves[label] = ([int(r["epoch"]) for r in val], [float(r["global_accuracy"]) for r in val])
    return curves


def plot(rows: list[dict], prefix: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves_png, bars_png = (
        prefix.with_name(prefix.name + "_val_accuracy.png"),
        prefix.with_name(prefix.name + "_test_accuracy.png"),
    )
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, (epochs, acc) in _val_curves(rows).items():
        ax.plot(epochs, acc, marker=".", label=label)
    ax.set(xlabel="epoch", ylabel="validation accuracy (global head)", title="Validation accuracy per epoch")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(curves_png, dpi=120)
    plt.close(fig)

    done = [r for r in rows if r["status"] == "done"]
    labels = [r["fusion_type"] for r in done]
    values = [r["test_accuracy"] for r in done]
    baseline = next((r for r in done if r["pretrained_experts"]), None)
    if baseline:  # the honest baselines: the pretrained experts every fusion started from, before fusion training
        initial = baseline["initial_expert_test_accuracy"]
        labels += ["pretrained expert (mean)", "pretrained logit average"]
        values += [sum(initial) / len(initial), baseline["initial_ensemble_test_accuracy"]]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    bars = ax.bar(labels, values, color=["C0"] * len(done) + ["C7", "C2"][: len(labels) - len(done)])
    ax.bar_label(bars, fmt="%.3f")
    ax.set(ylabel="test accuracy", title="Test accuracy per method (best epoch on validation)", ylim=(0, 1.05))
    ax.tick_params(axis="x", rotation=20)
    fig.tight_layout()
    fig.savefig(bars_png, dpi=120)
    plt.close(fig)
    return [curves_png, bars_png]


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m mcn.evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("sweep", help="a sweep (or pipeline) folder holding fusion runs")
    parser.add_argument("--output_file", help="CSV path (default: <sweep>/fusion_performance_summary.csv)")
    args = parser.parse_args(argv)
    with one_line_errors():
        sweep = Path(args.sweep)
        if not sweep.is_dir():
            raise MCNError(f"sweep folder {sweep} does not exist")
        rows = collect_runs(sweep)
        if not rows:
            raise MCNError(
                f"no fusion runs under {sweep} (no fusion_*_report.csv); point at a sweep or pipeline folder"
            )
        output = Path(args.output_file) if args.output_file else sweep / "fusion_performance_summary.csv"
        csv_path, md_path = write_summary(rows, output)
        figures = plot(rows, output.with_suffix(""))
        print(
            markdown_table(
                rows,
                [
                    "fusion_type",
                    "status",
                    "best_epoch",
                    "val_accuracy",
                    "test_accuracy",
                    "ensemble_test_accuracy",
                    "oracle_test_accuracy",
                    "expert_test_accuracy",
                    "reason",
                ],
            )
        )
        print("wrote " + ", ".join(str(p) for p in (csv_path, md_path, *figures)))
        return 0


if __name__ == "__main__":
    raise SystemExit(main())
