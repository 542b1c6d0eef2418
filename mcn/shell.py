"""The commands mcn prints as next steps (resume, status, retry, cancel, sync), spelled so that they work when pasted:
every word quoted for a POSIX shell (`shlex.quote`), and every value given to Hydra quoted for Hydra's override
grammar too, whatever a path holds (spaces, `=`, `,`, quotes, non-ASCII)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

_PLAIN = re.compile(r"[A-Za-z0-9_./:+@%-]+")  # what Hydra's grammar reads unquoted, as itself


def shell_join(words: list[str | Path]) -> str:
    return shlex.join(map(str, words))


def hydra_value(value: str | Path) -> str:
    """`value` as Hydra's override grammar reads it back: as is when plain, else in single quotes, with a quote
    escaped as `\\'` and the backslashes before a quote or at the end doubled (Hydra halves those)."""
    value = str(value)
    if _PLAIN.fullmatch(value):
        return value
    return "'" + re.sub(r"(\\*)('|$)", lambda m: m[1] * 2 + ("\\'" if m[2] else ""), value) + "'"


def hydra_override(key: str, value: str | Path) -> str:
    return f"{key}={hydra_value(value)}"


def hydra_literal(value: bool | int | float | str | None) -> str:
    """A scalar as Hydra's override grammar reads it back with its type: `true`, `null`, `0.001`, and a string that
    would read as another type (`'1.0'`, `'true'`) quoted."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, int | float):
        return repr(value)
    quoted = hydra_value(value)
    try:
        float(value)
        typed = True
    except ValueError:
        typed = value.lower() in ("true", "false", "null")
    return f"'{value}'" if quoted == value and typed else quoted


def command(module: str, *args: str | Path) -> str:
    """`python -m <module> args...`, each argument quoted for the shell (a Hydra override: quote its value with
    `hydra_override` first)."""
    return shell_join(["python", "-m", module, *args])


def rerun_command() -> str | None:
    """The command that continues this Hydra job in its folder, from the folder it was launched in (`cd <launch
    folder> && ...`, so that it pastes anywhere): the same command line in single-run mode (a run's
    folder is named by its overrides, so it comes back there); for a job of a -m sweep, the job's own overrides with
    `hydra.run.dir` set to its folder. None outside a Hydra job (the library called directly)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return None
    hc = HydraConfig.get()
    module = f"mcn.{hc.job.name}"
    task = list(hc.overrides.task)
    # from the launch folder, where the overrides' relative paths (and the default run folder) are rooted
    cd = f"cd {shlex.quote(str(hc.runtime.cwd))} && "
    if hc.mode == RunMode.MULTIRUN:
        return cd + command(module, *task, hydra_override("hydra.run.dir", Path(hc.runtime.output_dir)))
    return cd + command(module, *task, *(o for o in hc.overrides.hydra if not o.startswith("hydra.mode=")))
