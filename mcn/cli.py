"""How every mcn command ends on bad input or a fault: one line on stderr naming the value or path and
the fix, printed once; no traceback."""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

from hydra.errors import HydraException, MissingConfigException
from hydra.experimental.callback import Callback
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

from mcn import configs, distributed  # noqa: F401  (configs: registers the config schema with Hydra)
from mcn.errors import ConfigError, MCNError, StorageError
from mcn.files import HydraRecord, holds_no_run, lock
from mcn.schema import check_config, composition_error
from mcn.training.config import refuse_unknown_keys

log = logging.getLogger("mcn")


def fail(message: str, status: int = 2) -> None:
    print(f"mcn: error: {message}", file=sys.stderr)
    raise SystemExit(status)


def warn(message: str) -> None:
    """One line on stderr for what a command skipped and went on without (a broken run among a sweep's)."""
    print(f"mcn: warning: {message}", file=sys.stderr)


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
    except (MCNError, OmegaConfBaseException) as e:  # the latter: a config value that does not resolve
        if isinstance(e, MCNError):
            message, status = str(e), e.exit_status
        else:
            message, status = f"the config does not resolve: {config_error(e)}; check the overrides", 2
        _to_log_files(message)
        if os.environ.get("SUBMITIT_EXECUTOR"):
            raise
        _remove_unstarted_run()
        for record in _record:  # a refused command leaves an earlier run's record as it was
            record.restore_unless_started()
        fail(message, status)
    except KeyboardInterrupt:
        _to_log_files("interrupted (Ctrl-C)")
        fail("interrupted (Ctrl-C); files are written atomically, so what is on disk is whole", 130)


class ArgumentParser(argparse.ArgumentParser):
    """argparse, with a malformed command line answered in one line (not usage + error)."""

    def error(self, message: str) -> None:
        fail(f"{message} (see python -m {self.prog.split()[-1]} --help)")


def hydra_command(main: Callable[[], None]) -> None:
    """Run a `@hydra.main` entrypoint so that a mistake on its command line (an option its config group lacks, a key
    the config lacks, an override that does not parse) ends in one line too; Hydra's own report spans a dozen."""
    os.environ.setdefault("HYDRA_FULL_ERROR", "1")  # Hydra raises what it would otherwise report
    try:
        main()
    except MissingConfigException as e:
        known = f"; known: {', '.join(e.options)}" if e.options else ""
        fail(f"{str(e).splitlines()[0]}{known}")
    except (HydraException, OmegaConfBaseException) as e:
        fail(composition_error(e) or config_error(e))
    except ValueError as e:  # Hydra's check of its own flags (-m with --cfg or --info) is a plain ValueError
        if not str(e).startswith("Only one of --run"):
            raise
        fail(
            f"{e}: -m (a sweep) and --cfg / --info (show the config) do not go together; drop -m to see the config "
            f"each job of the sweep composes, e.g. python -m {Path(sys.argv[0]).parent.name}.{Path(sys.argv[0]).stem} "
            f"--cfg job <one job's overrides>"
        )


def config_error(e: BaseException) -> str:
    """Hydra's or OmegaConf's message on one line: its own lines, then its cause's, without the indented details
    (full_key, object_type)."""

    def lines(error: BaseException) -> list[str]:
        return [line.strip().rstrip(".") for line in str(error).splitlines() if line and not line[0].isspace()]

    return "; ".join(lines(e)) + (f" ({'; '.join(lines(e.__cause__))})" if e.__cause__ else "")


class RunFolderCheck(Callback):
    """Hydra calls this before it writes anything in the run folder (its .hydra/ files, train.log): a folder that
    cannot be written, or that a live run holds (mcn.files.lock), ends the command in one line there, with every
    file as it was. The lock taken here is the run's for the life of the process."""

    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        _or_exit(lambda: refuse_unknown_keys(config))
        _or_exit(lambda: check_config(config))
        _or_exit(lambda: _refuse_chdir(config))
        if distributed.from_environment().rank == 0:  # several processes (torchrun, Slurm tasks): rank 0 holds it
            folder = Path(str(config.hydra.run.dir)).absolute()
            created = [p for p in (folder, *folder.parents) if not p.exists()]
            _or_exit(lambda: lock.acquire(_writable(folder)))
            _created[:] = created
            _record[:] = [HydraRecord.keep(folder)]  # Hydra rewrites it next, before a refused resume can say no

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        _or_exit(lambda: refuse_unknown_keys(config))
        _or_exit(lambda: _refuse_chdir(config))
        _or_exit(lambda: _writable(Path(str(config.hydra.sweep.dir))))


def _refuse_chdir(config: DictConfig) -> None:
    """mcn roots every relative path (paths.*, data.root, the run folders) in the launch folder; Hydra's chdir would
    root some of them in the run folder instead, so it is refused rather than half-followed."""
    if config.hydra.job.get("chdir"):
        raise ConfigError(
            "hydra.job.chdir=true is not supported: mcn resolves every relative path (paths.*, data.root, "
            "data.train_csv) against the folder you launch from, and the job's own files already go to its run "
            "folder; drop hydra.job.chdir=true (give absolute paths to place files elsewhere)"
        )


_created: list[Path] = []  # the run folder this process created for its run, then each parent it created
_record: list[HydraRecord] = []  # the run folder's .hydra/ as it was before this command


def _remove_unstarted_run() -> None:
    """A command refused before its run started (a value out of range) leaves no folder behind: the run folder this
    process created goes, with its parents that it created, while it holds only Hydra's record, logs and the lock."""
    if not _created or not _created[0].is_dir() or not holds_no_run(_created[0]):
        return
    folder = _created[0]
    lock.release(folder)
    shutil.rmtree(folder, ignore_errors=True)
    for parent in _created[1:]:
        try:
            parent.rmdir()
        except OSError:  # something else lives there now
            break


def _or_exit(check: Callable[[], object]) -> None:
    """Hydra turns a callback's exception into a warning and goes on: the command ends here instead."""
    try:
        check()
    except MCNError as e:
        fail(str(e), e.exit_status)
    except OmegaConfBaseException:  # an override that does not resolve: Hydra reports it next, in its own words
        pass


def _writable(folder: Path) -> Path:
    """`folder`, created; StorageError naming it when it cannot be created or written in."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise StorageError(
            f"cannot create {folder}: {(e.strerror or str(e)).lower()}; fix the permissions of its parent or point "
            f"paths.output_root (or hydra.run.dir / hydra.sweep.dir) elsewhere"
        ) from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise StorageError(
            f"cannot write in {folder}: permission denied (read-only); fix its permissions (chmod u+w) or point "
            f"paths.output_root (or hydra.run.dir / hydra.sweep.dir) elsewhere"
        )
    return folder
