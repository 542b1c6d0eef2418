"""Corruption robustness and out-of-distribution detection for every model of a fusion run (docs/reference.md §8).

    python -m mcn.robustness FOLDER [--device cuda] [--batch_size 512]

FOLDER is one fusion run or a whole sweep; the suite is `mcn.evaluation.robustness`, which says what it measures.
"""

from __future__ import annotations

from pathlib import Path

from mcn.cli import ArgumentParser, one_line_errors
from mcn.errors import MCNError
from mcn.evaluation.robustness import headline, mean_of, measure_run
from mcn.files import find_fusion_runs


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m mcn.robustness", description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", help="a fusion run's folder, or a sweep (pipeline) folder holding several")
    parser.add_argument("--device", help="cpu, cuda, cuda:1 (default: the run's trainer.device)")
    parser.add_argument("--batch_size", type=int, help="images per forward pass (default: the run's batch size)")
    args = parser.parse_args(argv)
    with one_line_errors():
        root = Path(args.folder)
        if not root.is_dir():
            raise MCNError(f"folder {root} does not exist; point at a fusion run or a sweep folder")
        if args.batch_size is not None and args.batch_size < 1:
            raise MCNError(f"--batch_size {args.batch_size} must be a positive number")
        runs = find_fusion_runs(root)
        finished = [r for r in runs if r.results.is_file() and r.complete().is_file()]
        for run in runs:
            if run not in finished:
                print(f"{run.root}: skipped, {run.fusion_type} has not finished (no {run.results.name})")
        if not finished:
            raise MCNError(f"no finished fusion runs under {root} (no fusion_training_results_*.json)")
        for run in finished:
            out = measure_run(run, args.device, args.batch_size)
            for line in out["notes"] + out["mismatches"]:
                print(f"{run.root}: {line}")
            top = headline(run)
            clean = mean_of(out["rows"], "accuracy", model_type="fusion", test_type="clean")
            print(
                f"{run.fusion_type}: clean {clean:.4f}, corruptions (mean) {top['corruption_accuracy']:.4f}, "
                f"OOD AUROC msp (mean) {top['ood_auroc']:.4f}; {out['context']}; wrote {run.robustness_summary}"
            )
        return 0


if __name__ == "__main__":
    raise SystemExit(main())
