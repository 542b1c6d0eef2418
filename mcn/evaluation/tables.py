"""Table writers shared by the sweep summary, the study report and the robustness report: Markdown and LaTeX."""

from __future__ import annotations


def cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    if isinstance(value, list):
        return " ".join(cell(v) for v in value)
    return "" if value is None else str(value)


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


_LATEX_SPECIAL = {c: "\\" + c for c in "&%$#_{}"} | {"\\": r"\textbackslash{}", "~": r"\~{}", "^": r"\^{}"}


def _latex(text: str) -> str:
    return "".join(_LATEX_SPECIAL.get(c, c) for c in text).replace("±", r"$\pm$").replace("†", r"\textdagger{}")


def latex_table(rows: list[dict], columns: list[str], caption: str, note: str | None = None) -> str:
    """The cells of markdown_table as a booktabs table (needs `\\usepackage{booktabs}`), with `note` (its legend)
    in small print under it."""
    lines = [r"\begin{table}[ht]", r"\centering", rf"\caption{{{_latex(caption)}}}"]
    lines += [rf"\begin{{tabular}}{{{'l' * len(columns)}}}", r"\toprule", " & ".join(map(_latex, columns)) + r" \\"]
    lines += [r"\midrule", *(" & ".join(_latex(cell(row.get(c))) for c in columns) + r" \\" for row in rows)]
    lines += [r"\bottomrule", r"\end{tabular}"]
    lines += [rf"\par\footnotesize {_latex(note.replace('`', ''))}"] if note else []
    lines += [r"\end{table}"]
    return "\n".join(lines) + "\n"
