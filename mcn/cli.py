"""How every mcn command ends on bad input: one line on stderr naming the value and the fix, no traceback."""

from __future__ import annotations

import logging
import os
import sys
from contextlib import contextmanager

from mcn.errors import MCNError

log = logging.getLogger("mcn")


def fail(message: str, status: int = 2) -> None:
    print(f"mcn: error: {message}", file=sys.stderr)
    raise SystemExit(status)


@contextmanager
def one_line_errors():
    """Bad input ends the job with one line on stderr and exit status 2, not a traceback.
    Inside a submitit job the error is re-raised instead, so that it reaches the launcher, which
    prints its one line in the submitting terminal."""
    try:
        yield
    except MCNError as e:
        if log.hasHandlers():  # the job log, under Hydra; a plain CLI gets the stderr line below only
            log.error("error: %s", e)
        if os.environ.get("SUBMITIT_EXECUTOR"):
            raise
        fail(str(e))
