"""What the terminal shows of a command's log lines. The log files (Hydra's `<job>.log` in the run folder, e.g.
`train.log`, `pipeline.log`) always get every line.

`trainer.terminal`:
- `all`: every line, each epoch's included;
- `runs`: one line per finished run (the lines logged with `extra=HEADLINE`: a run's outcome, the study report), and
  every warning and error; a tqdm bar per epoch when the terminal is interactive (`trainer.progress_bar`);
- `auto`: `all` for one run (`mcn.train`, `mcn.experts`, a sweep's job), `runs` for the many runs of `mcn.pipeline`.
"""

from __future__ import annotations

import logging

from mcn.errors import ConfigError

HEADLINE = {"headline": True}  # `extra=` of a line that `runs` shows: a run's outcome, or the study's
MODES = ("auto", "all", "runs")


class _RunsOnly(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or getattr(record, "headline", False)


def show_on_terminal(mode: str, many_runs: bool) -> None:
    """Apply `trainer.terminal=mode` to the root logger's terminal handlers (its stream handlers that are not log
    files); `many_runs`: the command runs many (auto means runs). ConfigError for a mode not in MODES."""
    if mode not in MODES:
        raise ConfigError(f"trainer.terminal={mode!r} must be one of {', '.join(MODES)}; e.g. trainer.terminal=runs")
    if mode == "all" or (mode == "auto" and not many_runs):
        return
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
            handler.addFilter(_RunsOnly())
