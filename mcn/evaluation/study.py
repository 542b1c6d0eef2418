"""A study report: fusion runs grouped by everything but their seed; per group the mean, spread and 95 %
confidence interval of every metric, and the seed-paired difference to the same runs' baselines, with a verdict.

Groups. Two finished runs (rows of `mcn.evaluation.summary.collect_runs`) are in one group when they have the
same fusion type and their resolved configs agree on every key except `seed`, the keys in `REPLICATE_IGNORES`
(where files live, how a run is shown, orchestration: nothing that changes what is computed) and the keys passed as
`vary` (e.g. `split.seed`, to pool several splits as replicates too). A group that shares its fusion type with
another is labelled by the keys in which they differ.

Statistics (scipy.stats) over the n finished runs of a group:
- mean ± sample standard deviation (ddof = 1), and the 95 % confidence interval of the mean from the t
  distribution with n - 1 degrees of freedom;
- for each reference baseline (`REFERENCES`, on test accuracy), the per-run differences d = fusion - baseline,
  paired because both come from the same run (same seed, same experts, same test set): mean, 95 % CI of the
  mean difference, and the two-sided paired t-test p-value (scipy.stats.ttest_rel);
- the verdict: "better" when the CI of d lies entirely above 0, "worse" when entirely below 0, otherwise
  "no detectable difference" (the same as p < 0.05, with the sign of the mean); "n too small" with fewer
  than 2 pairs. Identical differences in every run (no spread) give the point itself as interval.
- Every interval stays inside the values its quantity can take (`value_range`): the t interval is clipped there,
  to [0, 1] for an accuracy, ECE or AUROC and to [-1, 1] for a difference of accuracies (a t interval of a few
  seeds near 100 % reaches past 1 otherwise). Clipping keeps the verdict: it never moves an end across 0.
Fitted baselines whose fit ended at the edge of its search carry a `flag` (`mcn.evaluation.baselines`: a temperature
at its bound falls back to T = 1, a C at its grid's edge is kept): their rows are marked † in the tables, each
marked row is explained under its table with its count of runs, and the CSV counts them (`flagged`).
Each table of the Markdown report is followed by a legend of its columns (`COLUMN_LEGEND`, `legend`).
Runs that are not finished, or have a file that cannot be read, are in no mean; the report lists each with its state
and reason.
"""

from __future__ import annotations

import difflib
import json
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import stats

from mcn.errors import MCNError
from mcn.evaluation.baselines import BASELINES, CALIBRATION_METRICS, FLAG
from mcn.evaluation.summary import COLUMN_LEGEND, EXPERT_SETS, JOINT_HEADS, baseline_column, value_range
from mcn.evaluation.tables import latex_table, markdown_table
from mcn.files import write_csv, write_text
from mcn.training.config import REPLICATE_IGNORES, with_added_keys

CONFIDENCE = 0.95
# the fusion's own per-run metric columns; each one a study's rows hold gets mean ± std per group
FUSION_METRICS = (
    "test_accuracy",
    "test_nll",
    "test_ece",
    "val_accuracy",
    "best_epoch",
    "epochs_run",
    "oracle_gap_used",
    "wall_time_s",
    "corruption_accuracy",
    "ood_auroc",
)
# what each fusion is paired with (test accuracy): the experts' logit average, a stacker fitted on their frozen
# logits (on the fusion training part, and on the validation part by cross-validation) and the expert chosen on
# val, first for the experts as pretrained ("what the same experts give for free"), then after joint training
REFERENCES = tuple(
    baseline_column(experts, baseline, "accuracy")
    for experts in EXPERT_SETS
    for baseline in ("logit_average", "stacking", "stacking_cv", "best_single_expert")
)
# every method of a run with its calibration columns: the fusion, then each baseline of each expert set
METHODS = {"fusion": {m: f"test_{m}" for m in CALIBRATION_METRICS} | {"val_accuracy": "val_accuracy"}} | {
    f"{experts} {baseline}": {m: baseline_column(experts, baseline, m) for m in (*CALIBRATION_METRICS, *choices)}
    for experts in EXPERT_SETS
    for baseline, choices in BASELINES.items()
}
METHOD_METRICS = (*CALIBRATION_METRICS, "val_accuracy")  # the method table's columns of mean ± std; others: chosen
# each column of a flagged baseline (one whose fit may end at the edge of its search), and that baseline's flag column
FLAG_COLUMNS = {column: cols[FLAG] for cols in METHODS.values() if FLAG in cols for column in cols.values()}
MARK = "†"  # a table row whose baseline was fitted at the edge of its search in some run
VERDICT_RULE = (
    "verdict: the 95 % CI of the seed-paired difference (fusion - baseline, test accuracy) lies entirely above 0: "
    "better; entirely below 0: worse; otherwise: no detectable difference; fewer than 2 pairs: n too small"
)


# ---------------------------------------------------------------- statistics


@dataclass(frozen=True)
class Estimate:
    """n values: their mean, sample std and the CONFIDENCE interval of the mean (t distribution); std and the
    interval are None for n < 2, everything for n = 0."""

    n: int
    mean: float | None = None
    std: float | None = None
    ci_low: float | None = None
    ci_high: float | None = None


def estimate(values: Sequence[float], bounds: tuple[float, float] = (-math.inf, math.inf)) -> Estimate:
    """The Estimate of `values`, its interval clipped to `bounds` (what the quantity can take: `value_range`)."""
    x = np.asarray(values, dtype=float)
    if len(x) < 2:
        return Estimate(len(x), float(x[0]) if len(x) else None)
    mean, std = float(x.mean()), float(x.std(ddof=1))
    if std == 0:  # no spread: the interval is the point (the t interval would be nan)
        return Estimate(len(x), mean, 0.0, mean, mean)
    low, high = stats.t.interval(CONFIDENCE, len(x) - 1, loc=mean, scale=std / math.sqrt(len(x)))
    return Estimate(len(x), mean, std, max(float(low), bounds[0]), min(float(high), bounds[1]))


@dataclass(frozen=True)
class Comparison:
    """The fusion against one baseline over the runs holding both."""

    reference: str  # the baseline's column
    fusion: Estimate
    baseline: Estimate
    difference: Estimate  # of fusion - baseline, run by run
    p_value: float | None
    verdict: str


def compare(fusion: Sequence[float], baseline: Sequence[float], reference: str) -> Comparison:
    """Paired: `fusion[i]` and `baseline[i]` come from the same run (test accuracies, like `reference`'s); the
    difference's interval is clipped to what a difference can take, [-1, 1] for accuracies."""
    low, high = value_range(reference)
    d = estimate(np.subtract(fusion, baseline), (low - high, high - low))
    if d.n < 2:
        p, verdict = None, "n too small"
    else:
        if d.std == 0:  # the same difference in every run: t is 0/0 (no difference) or infinite
            p = 1.0 if d.mean == 0 else 0.0
        else:
            p = float(stats.ttest_rel(fusion, baseline).pvalue)
        verdict = "better" if d.ci_low > 0 else "worse" if d.ci_high < 0 else "no detectable difference"
    return Comparison(reference, estimate(fusion, (low, high)), estimate(baseline, (low, high)), d, p, verdict)


# ---------------------------------------------------------------- groups


@dataclass(frozen=True)
class Group:
    label: str
    fusion_type: str
    runs: list[dict]  # its finished runs, in folder order

    def values(self, column: str) -> list[float]:
        return [r[column] for r in self.runs if r.get(column) is not None]

    def estimate(self, column: str) -> Estimate:
        return estimate(self.values(column), value_range(column))

    def flags(self, column: str) -> list[str]:
        """The flags of the runs holding `column` whose baseline was fitted at the edge of its search."""
        flag = FLAG_COLUMNS.get(column)
        return [r[flag] for r in self.runs if flag and r.get(column) is not None and r.get(flag)]

    def compare(self, column: str, reference: str) -> Comparison:
        pairs = [
            (r[column], r[reference]) for r in self.runs if r.get(column) is not None and r.get(reference) is not None
        ]
        return compare([a for a, _ in pairs], [b for _, b in pairs], reference)


def _leaves(tree: dict, prefix: str = ""):
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from _leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def _identity(config: dict | None, vary: Sequence[str]) -> dict | None:
    """The config leaves (dotted keys) that make a run what it is: all but the seed, ignored and varied keys."""
    if config is None:
        return None
    skipped = (*REPLICATE_IGNORES, *vary)
    return {
        k: v for k, v in _leaves(with_added_keys(config)) if not any(k == s or k.startswith(s + ".") for s in skipped)
    }


def _label(fusion_type: str, identity: dict | None, siblings: list[dict | None]) -> str:
    """The fusion type, and where several groups share it, the keys in which this group differs: each key whose
    value here is not the one most of its siblings share (so in an options study, the baseline is the bare fusion
    type and every other group names its option)."""
    if len(siblings) == 1:
        return fusion_type
    if identity is None:
        return f"{fusion_type} [config unknown]"
    known = [s for s in siblings if s is not None]

    def value(config: dict, key: str) -> str:
        return json.dumps(config.get(key), default=str)

    keys = []
    for key in sorted({k for s in known for k in s}):
        counts = Counter(value(s, key) for s in known)
        top = max(counts.values())
        modal = counts[value(identity, key)] == top and list(counts.values()).count(top) == 1
        if len(counts) > 1 and not modal:
            keys.append(key)
    return f"{fusion_type} [{', '.join(f'{k}={identity.get(k)}' for k in keys)}]" if keys else fusion_type


def group_runs(rows: list[dict], vary: Sequence[str] = ()) -> list[Group]:
    """The finished runs grouped by fusion type and config apart from the seed (and `vary`), sorted by label."""
    members: dict[tuple[str, str], list[dict]] = {}
    identities: dict[tuple[str, str], dict | None] = {}
    for row in rows:
        if row["status"] != "done":
            continue
        identity = _identity(row.get("config"), vary)
        key = (row["fusion_type"], json.dumps(identity, sort_keys=True, default=str))
        members.setdefault(key, []).append(row)
        identities[key] = identity
    groups = []
    for key, runs in members.items():
        siblings = [identities[k] for k in members if k[0] == key[0]]
        groups.append(Group(_label(key[0], identities[key], siblings), key[0], runs))
    return sorted(groups, key=lambda g: g.label)


def pooled_reliability(diagrams: list[dict | None]) -> dict | None:
    """Several runs' reliability bins (`mcn.baselines.reliability`) as one: counts add, means weigh by count."""
    diagrams = [d for d in diagrams if d]
    if not diagrams:
        return None
    count = np.sum([d["count"] for d in diagrams], axis=0)

    def pooled(key: str) -> list[float | None]:
        sums = np.sum([[(v or 0.0) * c for v, c in zip(d[key], d["count"])] for d in diagrams], axis=0)
        return [float(s / n) if n else None for s, n in zip(sums, count)]

    return {"confidence": pooled("confidence"), "accuracy": pooled("accuracy"), "count": count.tolist()}


# ---------------------------------------------------------------- tables


def _mean_std(e: Estimate) -> str:
    if e.n == 0:
        return ""
    return f"{e.mean:.4f}" if e.std is None else f"{e.mean:.4f} ± {e.std:.4f}"


def _interval(e: Estimate, sign: str = "") -> str:
    return "" if e.ci_low is None else f"[{e.ci_low:{sign}.4f}, {e.ci_high:{sign}.4f}]"


def _present(groups: list[Group], columns: Sequence[str]) -> list[str]:
    return [c for c in columns if any(g.values(c) for g in groups)]


def fusion_table(groups: list[Group]) -> tuple[list[str], list[dict]]:
    metrics = _present(groups, FUSION_METRICS)
    columns = ["group", "n", "seeds"]
    for m in metrics:
        columns += [m, f"{m} 95 % CI"] if m == "test_accuracy" else [m]
    rows = []
    for g in groups:
        row = {"group": g.label, "n": len(g.runs), "seeds": " ".join(str(r.get("seed")) for r in g.runs)}
        for m in metrics:
            row[m] = _mean_std(g.estimate(m))
        row["test_accuracy 95 % CI"] = _interval(g.estimate("test_accuracy"))
        rows.append(row)
    return columns, rows


def comparison_table(groups: list[Group]) -> tuple[list[str], list[dict]]:
    columns = ["group", "baseline", "n", "fusion", "baseline mean", "difference", "95 % CI", "p", "verdict"]
    rows = []
    for g in groups:
        for reference in _present([g], REFERENCES):
            c = g.compare("test_accuracy", reference)
            rows.append(
                {
                    "group": g.label,
                    "baseline": reference.removesuffix("_test_accuracy").replace("_", " ", 1)
                    + (f" {MARK}" if g.flags(reference) else ""),
                    "n": c.difference.n,
                    "fusion": _mean_std(c.fusion),
                    "baseline mean": _mean_std(c.baseline),
                    "difference": f"{c.difference.mean:+.4f}",
                    "95 % CI": _interval(c.difference, "+"),
                    "p": "" if c.p_value is None else f"{c.p_value:.3g}",
                    "verdict": c.verdict,
                }
            )
    return columns, rows


def methods_table(groups: list[Group]) -> tuple[list[str], list[dict]]:
    columns = ["group", "method", "n", *METHOD_METRICS, "chosen"]
    rows = []
    for g in groups:
        for method, metric_columns in METHODS.items():
            if not g.values(metric_columns["accuracy"]):
                continue
            flagged = f" {MARK}" if g.flags(metric_columns["accuracy"]) else ""
            row = {"group": g.label, "method": method + flagged, "n": g.estimate(metric_columns["accuracy"]).n}
            row |= {m: _mean_std(g.estimate(metric_columns[m])) for m in METHOD_METRICS}
            choices = [k for k in metric_columns if k not in (*METHOD_METRICS, FLAG) and g.values(metric_columns[k])]
            row["chosen"] = " ".join(
                f"{k}: " + " ".join(f"{v:.3g}" for v in g.values(metric_columns[k])) for k in choices
            )
            rows.append(row)
    return columns, rows


UNFINISHED_COLUMNS = ["fusion_type", "status", "epochs_run", "reason", "folder"]

# what each column of the study's tables says (the per-run columns are summary.COLUMN_LEGEND's); `legend` writes them
# under each table
STUDY_LEGEND = COLUMN_LEGEND | {
    "group": "the fusion type; where several groups share it, the config keys in which this group differs",
    "n": "runs in the mean (for a comparison: runs holding both the fusion's and the baseline's accuracy)",
    "seeds": "the seeds of the group's runs",
    "test_accuracy 95 % CI": "95 % confidence interval of the mean test accuracy (t distribution, n - 1 degrees of "
    "freedom), clipped to [0, 1], the values an accuracy can take",
    "baseline": "whose experts (pretrained: as they came in; joint: after joint training) and which baseline, "
    "computed in the same run on the same test set; joint" + JOINT_HEADS,
    "fusion": "the fusion's test accuracy over these runs, mean ± std",
    "baseline mean": "the baseline's test accuracy over these runs, mean ± std",
    "difference": "mean over the runs of fusion - baseline (test accuracy), run by run",
    "95 % CI": "95 % confidence interval of that mean difference (t distribution, n - 1 degrees of freedom), clipped "
    "to [-1, 1], the values a difference of accuracies can take",
    "p": "two-sided paired t-test p-value of the difference",
    "verdict": "from the 95 % CI, as the rule above says",
    "method": "the fusion, or a baseline: its experts (pretrained or joint) and its kind",
    "accuracy": "test accuracy, mean ± std over the runs",
    "nll": "test negative log-likelihood (mean cross-entropy), mean ± std",
    "ece": "test expected calibration error (15 equal-width confidence bins), mean ± std",
    "chosen": "what each run fitted or picked on validation, run by run: temperature, C, expert index",
}
METRIC_CELLS = "Metric cells: mean ± sample std over the group's runs (one run: its value)"
FLAG_RULE = (
    f"{MARK}: fitted at the edge of its search in some runs (counted below); a temperature at its bound is replaced "
    "by T = 1, the plain logit average, so the mean holds no degenerate fit; a stacking C at its grid's edge is kept, "
    "as validation chose it"
)


def legend(columns: Sequence[str]) -> str:
    """One line saying what each column means (the columns without an entry are left out)."""
    return "Columns: " + "; ".join(f"`{c}`: {STUDY_LEGEND[c]}" for c in columns if c in STUDY_LEGEND) + "."


def _flag_notes(groups: list[Group], columns: Sequence[str]) -> list[str]:
    """One line per group and flagged baseline of `columns`: how many of its runs, and why."""
    notes = []
    for g in groups:
        for column in columns:
            flags = g.flags(column)
            if flags:
                label = column.removesuffix("_test_accuracy").replace("_", " ", 1)
                why = "; ".join(sorted(set(flags)))
                notes.append(f"{MARK} {g.label}, {label}: {len(flags)} of {len(g.values(column))} runs: {why}.")
    return notes


def tables(groups: list[Group], unfinished: list[dict]) -> list[tuple[str, list[str], list[dict], str | None, str]]:
    """(title, columns, rows, what Markdown says instead when there are no rows, the note under it: the legend of
    its columns and what its marks mean) of every table of the report, rendered alike as Markdown and LaTeX."""
    no_baselines = "No finished run holds baselines (`baselines` in its results JSON): nothing to pair with."
    fusion, comparison, methods = fusion_table(groups), comparison_table(groups), methods_table(groups)
    method_accuracies = [cols["accuracy"] for cols in METHODS.values()]

    def note(columns: list[str], *extra: str) -> str:
        return "\n".join([legend(columns), *extra])

    def flagged(columns: Sequence[str]) -> list[str]:
        notes = _flag_notes(groups, columns)
        return ["", FLAG_RULE + ":", *(f"- {n}" for n in notes)] if notes else []

    return [
        (
            "Fusion per group: mean ± std over seeds",
            *fusion,
            "No finished run.",
            note(fusion[0], "", METRIC_CELLS + "."),
        ),
        (
            "Fusion vs. baselines: seed-paired difference in test accuracy",
            *comparison,
            no_baselines,
            note(comparison[0], *flagged(REFERENCES)),
        ),
        (
            "Every method on the test set: mean ± std over seeds",
            *methods,
            None,
            note(methods[0], *flagged(method_accuracies)),
        ),
        (
            "Runs not in any mean (not finished, or unreadable)",
            UNFINISHED_COLUMNS,
            unfinished,
            None,
            legend(UNFINISHED_COLUMNS),
        ),
    ]


def study_rows(groups: list[Group]) -> list[dict]:
    """The statistics as one long table: a row per group and quantity (a metric, or a paired difference)."""
    out = []
    quantities = [*FUSION_METRICS, *(m[metric] for m in METHODS.values() for metric in CALIBRATION_METRICS)]
    for g in groups:
        for quantity in dict.fromkeys(_present([g], quantities)):  # the fusion's accuracy is in both lists
            e = g.estimate(quantity)
            row = {"group": g.label, "fusion_type": g.fusion_type, "quantity": quantity, **vars(e)}
            out.append(row | {"flagged": len(g.flags(quantity))})
        for reference in _present([g], REFERENCES):
            c = g.compare("test_accuracy", reference)
            quantity = f"test_accuracy - {reference}"
            row = {"group": g.label, "fusion_type": g.fusion_type, "quantity": quantity, **vars(c.difference)}
            out.append(row | {"p_value": c.p_value, "verdict": c.verdict, "flagged": len(g.flags(reference))})
    return out


@dataclass(frozen=True)
class Study:
    groups: list[Group]
    unfinished: list[dict]  # rows of the runs in no mean
    vary: tuple[str, ...]  # config keys besides `seed` whose runs count as replicates


def make_study(rows: list[dict], vary: Sequence[str] = ()) -> Study:
    """The study of collect_runs' `rows`; MCNError for a `vary` key that no finished run's config holds (it would
    pool nothing, silently)."""
    _check_vary(rows, vary)
    return Study(group_runs(rows, vary), [r for r in rows if r["status"] != "done"], tuple(vary))


def _check_vary(rows: list[dict], vary: Sequence[str]) -> None:
    configs = [dict(_leaves(r["config"])) for r in rows if r["status"] == "done" and r.get("config")]
    if not configs:  # no config known (runs written before configs were kept): grouped by fusion type alone
        return
    keys = sorted({k for c in configs for k in c})
    for key in vary:
        if any(k == key or k.startswith(key + ".") for k in keys):
            continue
        close = difflib.get_close_matches(key, keys, n=3)
        differ = [k for k in keys if len({json.dumps(c.get(k), default=str) for c in configs}) > 1]
        differ = [k for k in differ if not any(k == s or k.startswith(s + ".") for s in REPLICATE_IGNORES)]
        shown = ", ".join(differ[:12]) + (f" and {len(differ) - 12} more" if len(differ) > 12 else "")
        raise MCNError(
            f"--vary {key}: no run's config has this key"
            + (f" (did you mean {' or '.join(close)}?)" if close else "")
            + f"; keys whose values differ between these runs: {shown or 'none'}; the configs' sections: "
            + ", ".join(sorted({k.split(".")[0] for k in keys}))
        )


# flagged: how many of the n runs fitted this quantity's baseline at the edge of its search (see the module docstring)
STUDY_COLUMNS = [
    "group",
    "fusion_type",
    "quantity",
    "n",
    "mean",
    "std",
    "ci_low",
    "ci_high",
    "p_value",
    "verdict",
    "flagged",
]


def write_study(study: Study, prefix: str | Path, title: str) -> tuple[str, list[Path]]:
    """`<prefix>.csv` (the statistics, full precision: study_rows), `<prefix>.md` and `<prefix>.tex` (the tables);
    returns the Markdown and the paths."""
    prefix = Path(prefix)
    finished = sum(len(g.runs) for g in study.groups)
    unfinished = Counter(r["status"] for r in study.unfinished)
    replicates = ", ".join(f"`{k}`" for k in ("seed", *study.vary))
    lines = [
        f"# Study report: {title}",
        "",
        f"{finished} finished runs in {len(study.groups)} groups (runs that differ only in {replicates}); "
        + (
            f"{len(study.unfinished)} runs not in any mean ({', '.join(f'{n} {s}' for s, n in unfinished.items())}), "
            "listed at the end."
            if unfinished
            else "every run finished."
        ),
        "",
        VERDICT_RULE + ".",
    ]
    all_tables = tables(study.groups, study.unfinished)
    for name, columns, rows, instead, note in all_tables:
        if rows:
            lines += ["", f"## {name}", "", markdown_table(rows, columns), note]
        elif instead:
            lines += ["", f"## {name}", "", instead]
    markdown = "\n".join(lines)
    latex = "% needs \\usepackage{booktabs}\n" + "\n".join(
        latex_table(rows, columns, name, note) for name, columns, rows, _, note in all_tables if rows
    )
    paths = [
        write_csv(prefix.with_name(prefix.name + ".csv"), STUDY_COLUMNS, study_rows(study.groups)),
        write_text(prefix.with_name(prefix.name + ".md"), markdown),
        write_text(prefix.with_name(prefix.name + ".tex"), latex),
    ]
    return markdown, paths
