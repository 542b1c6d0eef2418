"""How every mcn command ends on bad input or a fault: one line on stderr naming the value or path and
the fix, printed once; no traceback."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from contextlib import contextmanager

from mcn.errors import MCNError

log = logging.getLogger("mcn")


def fail(message: str, status: int = 2) -> None:
    print(f"mcn: error: {message}", file=sys.stderr)
    raise SystemExit(status)


def _to_log_files(message: str) -> None:
    """The job's log files (Hydra's train.log) get the line too; the terminal gets it once, on stderr."""
    record = log.makeRecord(log.name, logging.ERROR, __file__, 0, "error: %s", (message,), None)
    for handler in logging.getLogger().handlers + log.handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


@contextmanager
def one_line_errors():
    """Bad input and faults end the command with one line on stderr and a non-zero status (2 for bad
    input; see MCNError.exit_status), Ctrl-C with one line and 130. Inside a submitit job the error is
    re-raised instead, so that it reaches the launcher, which prints its one line in the submitting terminal."""
    logging.raiseExceptions = False  # a log handler on a full disk must not print a traceback per line
    try:
        yield
    except MCNError as e:
        _to_log_files(str(e))
        if os.environ.get("SUBMITIT_EXECUTOR"):
            raise
        fail(str(e), e.exit_status)
    except KeyboardInterrupt:
        _to_log_files("interrupted (Ctrl-C)")
        fail("interrupted (Ctrl-C); files are written atomically, so what is on disk is whole", 130)


class ArgumentParser(argparse.ArgumentParser):
    """argparse, with a malformed command line answered in one line (not usage + error)."""

    def error(self, message: str) -> None:
        fail(f"{message} (see python -m {self.prog.split()[-1]} --help)")
