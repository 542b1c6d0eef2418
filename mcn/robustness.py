"""Corruption robustness and out-of-distribution detection for every model of a fusion run (docs/reference.md §8).

    python -m mcn.robustness FOLDER [--device cuda] [--batch_size 512]

FOLDER is one fusion run or a whole sweep; the suite is `mcn.evaluation.robustness`, which says what it measures.
Every file the suite writes beside each run is checked writable before the first run is measured. In a sweep, a run
one of whose files cannot be read (a truncated or foreign results JSON or checkpoint) is skipped with one warning
line naming the file and the fix, and the others are measured; a single run's unreadable file ends the command in
that line.
"""

from __future__ import annotations

from pathlib import Path

from mcn.cli import ArgumentParser, one_line_errors, warn
from mcn.errors import CheckpointError, FileError, MCNError
from mcn.evaluation.robustness import headline, mean_of, measure_run
from mcn.files import check_writable, find_fusion_runs


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m mcn.robustness", description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", help="a fusion run's folder, or a sweep (pipeline) folder holding several")
    parser.add_argument("--device", help="cpu, cuda, cuda:1 (default: the run's trainer.device)")
    parser.add_argument("--batch_size", type=int, help="images per forward pass (default: the run's batch size)")
    args = parser.parse_args(argv)
    with one_line_errors():
        root = Path(args.folder)
        if root.is_file():
            raise MCNError(f"{root} is a file, not a folder; point at a fusion run's folder or a sweep folder")
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
            check_writable(run.robustness_files, fix="copy the run elsewhere and point at the copy")
        measured = 0
        for run in finished:
            try:
                out = measure_run(run, args.device, args.batch_size)
            except (FileError, CheckpointError) as e:  # this run's files; the others may be whole
                if len(finished) == 1:
                    raise
                warn(f"skipped {run.root}: {e}")
                continue
            measured += 1
            for line in out["notes"] + out["mismatches"]:
                print(f"{run.root}: {line}")
            top = headline(run)
            clean = mean_of(out["rows"], "accuracy", model_type="fusion", test_type="clean")
            print(
                f"{run.fusion_type}: clean {clean:.4f}, corruptions (mean) {top['corruption_accuracy']:.4f}, "
                f"OOD AUROC msp (mean) {top['ood_auroc']:.4f}; {out['context']}; wrote {run.robustness_summary}"
            )
        if not measured:
            raise MCNError(f"none of the {len(finished)} finished runs under {root} can be read (each is named above)")
        return 0


if __name__ == "__main__":
    raise SystemExit(main())
