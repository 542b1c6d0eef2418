"""One local worker of a search: `python -m mcn.tune_worker <search folder> <index>` (`python -m mcn.tune` starts them
with hydra/launcher=local; on Slurm each worker is a submitit job instead). It takes trials until none is left."""

from __future__ import annotations

import sys

from mcn.cli import ArgumentParser, one_line_errors
from mcn.search.worker import log_to_stderr, work


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m mcn.tune_worker", description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", help="the search's folder")
    parser.add_argument("index", type=int, help="this worker's index")
    args = parser.parse_args(argv)
    log_to_stderr()
    with one_line_errors():
        work(args.folder, args.index)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
