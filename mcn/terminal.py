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

HEADLINE = {"headline": True}  # `extra=` of a line that `runs` shows: a run's outcome, or the study's


# library warnings that say nothing a user can act on mid-run (a probe's solver that stopped at its iteration cap,
# a palette image converted on load): the log files keep them, the terminal does not show them
_QUIET_WARNINGS = ("ConvergenceWarning", "Palette images with Transparency")


class _NoLibraryNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.name != "py.warnings" or not any(w in record.getMessage() for w in _QUIET_WARNINGS)


class _RunsOnly(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or getattr(record, "headline", False)


def show_on_terminal(mode: str, many_runs: bool) -> None:
    """Apply `trainer.terminal=mode` to the root logger's terminal handlers (its stream handlers that are not log
    files); `many_runs`: the command runs many (auto means runs). Library warnings go to the log files; those in
    _QUIET_WARNINGS are kept off the terminal."""
    logging.captureWarnings(True)  # Python's warnings become log records, which reach the log files
    every_line = mode == "all" or (mode == "auto" and not many_runs)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
            handler.addFilter(_NoLibraryNoise())
            if not every_line:
                handler.addFilter(_RunsOnly())
