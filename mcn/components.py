"""Load, mix and evaluate the components a fusion run saved (docs/reference.md §4: load_independent_components).

    python -m mcn.components --checkpoint_dir RUN --action list
    python -m mcn.components --checkpoint_dir RUN --action reconstruct --fusion_type multiplicative [--num_experts 1]
    python -m mcn.components --checkpoint_dir RUN --action load_complete --fusion_type TransformerBase [--epoch 20]

From Python (`mcn.evaluation.components`):

    from mcn.evaluation import components
    rows = components.list_components(run_dir)
    model, note = components.reconstruct(run_dir, "multiplicative", expert_epochs=[10, 20, 20, 20])
    model = components.load_complete(run_dir, "multiplicative")
    metrics = components.evaluate_model(model, run_dir, split="test")

Every file is loaded without running code from it, and must be what its name says it is. A file swapped in with
--fusion_file or --global_file must fit the run by the architecture it records (fusion type, number and width of the
experts, classes, data set); one that does not is refused in one line naming it, what it holds and what the run needs.
"""

from __future__ import annotations

import argparse

from mcn.cli import ArgumentParser, one_line_errors
from mcn.evaluation.components import evaluate_model, list_components, load_complete, reconstruct
from mcn.training.loop import UNDEFINED


def _epochs(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a comma-separated list of epochs, e.g. 10,20,20,20"
        ) from None


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m mcn.components", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint_dir", required=True, help="a fusion run's output folder")
    parser.add_argument("--action", required=True, choices=["list", "reconstruct", "load_complete"])
    parser.add_argument("--fusion_type", help="needed when the folder holds several")
    parser.add_argument("--num_experts", type=int, help="reconstruct: use experts 0..N-1 (1: expert 0 alone)")
    parser.add_argument("--epoch", type=int, help="the epoch of every component (default: the best epoch)")
    parser.add_argument("--expert_epochs", type=_epochs, help="reconstruct: one epoch per expert, e.g. 10,20,20,20")
    parser.add_argument("--fusion_epoch", type=int, help="reconstruct: the fusion module's epoch")
    parser.add_argument("--global_epoch", type=int, help="reconstruct: the global head's epoch")
    parser.add_argument("--fusion_file", help="reconstruct: a fusion module file of another run of this fusion type")
    parser.add_argument("--global_file", help="reconstruct: a global head file of another run of this fusion type")
    parser.add_argument("--split", default="test", choices=["test", "val", "train"], help="what to evaluate on")
    args = parser.parse_args(argv)
    with one_line_errors():
        if args.action == "list":
            rows = list_components(args.checkpoint_dir)
            head = f"{'kind':<12} {'index':>5} {'expert':<20} {'fusion type':<24} {'epoch':>5} {'val acc':>8} {'MB':>8}"
            print(f"{head}  file")
            for c in rows:
                acc = "" if c.val_accuracy is None else f"{c.val_accuracy:.4f}"
                print(
                    f"{c.kind:<12} {'' if c.index is None else c.index:>5} {c.preset or '':<20} "
                    f"{c.fusion_type or '':<24} {c.epoch:>5} {acc:>8} {c.size_mb:>8.2f}  "
                    f"{c.path.relative_to(args.checkpoint_dir)}"
                )
            return 0
        if args.action == "reconstruct":
            model, note = reconstruct(
                args.checkpoint_dir,
                args.fusion_type,
                args.num_experts,
                args.epoch,
                args.expert_epochs,
                args.fusion_epoch,
                args.global_epoch,
                args.fusion_file,
                args.global_file,
            )
            print(note)
        else:
            model = load_complete(args.checkpoint_dir, args.fusion_type, args.epoch)
        metrics = evaluate_model(model, args.checkpoint_dir, args.split)
        print(f"{args.split} accuracy: {metrics['global_accuracy']:.4f}")
        print("  experts: " + " ".join(f"{metrics[f'expert_{i}_accuracy']:.4f}" for i in range(len(model.experts))))
        if "ensemble_accuracy" in metrics:
            print(f"  logit average: {metrics['ensemble_accuracy']:.4f}  oracle: {metrics['oracle_accuracy']:.4f}")
        else:
            print(f"  logit average, oracle: {UNDEFINED}")
        return 0


if __name__ == "__main__":
    raise SystemExit(main())
