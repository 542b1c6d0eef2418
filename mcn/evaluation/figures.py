"""Figures: matplotlib without a display, and PNGs written atomically like every other file."""

from __future__ import annotations

from pathlib import Path

from mcn.files import atomic_write


def pyplot():
    """matplotlib.pyplot on the Agg backend (files only: clusters and CI have no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | Path, dpi: int = 120) -> Path:
    """Write `fig` as a PNG at `path` (temporary name, then rename) and close it."""
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=dpi))
    pyplot().close(fig)
    return Path(path)
