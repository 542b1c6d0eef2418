"""Two sweeps of the same fusion types and seeds, run against each other: for each fusion type, the seed-paired
difference B - A in test and validation accuracy (points), its 95 % t interval and verdict (mcn.evaluation.study).
docs/results.md §6 compares a search's best rates (B) with the table's (A) so:

    python scripts/paired_sweeps.py outputs/multirun/table_rates outputs/multirun/searched_rates
"""

import sys
from collections import defaultdict

from mcn.evaluation.study import compare
from mcn.evaluation.summary import collect_runs


def by_type_and_seed(folder: str) -> dict[str, dict[int, dict]]:
    runs = defaultdict(dict)
    for row in collect_runs(folder):
        if row.get("status") == "done":
            runs[row["fusion_type"]][int(row["seed"])] = row
    return runs


def main(a: str, b: str) -> None:
    first, second = by_type_and_seed(a), by_type_and_seed(b)
    print("| fusion | n | A test % | B test % | B - A test (points, 95 % CI) | B - A val (points, 95 % CI) |")
    print("|---|---|---|---|---|---|")
    for fusion in sorted(set(first) & set(second)):
        seeds = sorted(set(first[fusion]) & set(second[fusion]))
        test, val = (
            compare([second[fusion][s][m] for s in seeds], [first[fusion][s][m] for s in seeds], m)
            for m in ("test_accuracy", "val_accuracy")
        )
        diffs = [
            f"{pts(c.difference.mean)} [{pts(c.difference.ci_low)}, {pts(c.difference.ci_high)}] {c.verdict}"
            for c in (test, val)
        ]
        print(
            f"| {fusion} | {len(seeds)} | {100 * test.baseline.mean:.2f} ± {100 * test.baseline.std:.2f} "
            f"| {100 * test.fusion.mean:.2f} ± {100 * test.fusion.std:.2f} | {diffs[0]} | {diffs[1]} |"
        )


def pts(x: float) -> str:
    return f"{100 * x:+.2f}"


if __name__ == "__main__":
    main(*sys.argv[1:3])
