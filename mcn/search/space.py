"""A search space written in the notation of Hydra's Optuna sweeper (the one lightning-hydra-template's
`hparams_search=` presets use), read with Hydra's own override parser and turned into Optuna distributions:

    optim.base_lr: tag(log, interval(1e-5, 1e-3))   float, log-uniform
    loss.alpha: interval(0.0, 2.0)                  float, uniform
    trainer.batch_size: choice(64, 128, 256)        categorical
    fusion.num_heads: range(2, 8, 2)                integers 2, 4, 6, 8 (both ends included, as the sweeper reads it)
    fusion.width: tag(int, interval(32, 128))       integers, both ends included
"""

from __future__ import annotations

from collections.abc import Mapping

import optuna
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, RangeSweep
from hydra.errors import HydraException
from omegaconf import OmegaConf

from mcn import shell
from mcn.errors import ConfigError

EXAMPLE = "e.g. optim.base_lr: tag(log, interval(1e-5, 1e-3))"
TAGS = {"log", "int"}


def search_space(params: Mapping) -> dict[str, optuna.distributions.BaseDistribution]:
    """{config key: its distribution} from `search.params`. ConfigError naming the key and the fix for an empty
    space, a value that is not a range or choice, or a range that is empty."""
    if not params:
        raise ConfigError(
            "search.params is empty: nothing to search; pick a preset (hparams_search=concatenation, or another "
            "fusion type) or write your own in conf/hparams_search/"
        )
    parser = OverridesParser.create()
    space = {}
    for key, text in params.items():
        where = f"search.params.{key}={text}"
        try:
            override = parser.parse_override(f"{key}={text}")
        except HydraException as e:
            raise ConfigError(f"{where} does not parse ({str(e).splitlines()[0]}); {EXAMPLE}") from None
        if not override.is_sweep_override():
            raise ConfigError(
                f"{where} is one value, not a range to search; set it as an override instead, or {EXAMPLE}"
            )
        space[str(key)] = _distribution(override.value(), where)
    return space


def _distribution(sweep, where: str) -> optuna.distributions.BaseDistribution:
    tags = set(sweep.tags or ())
    if tags - TAGS:
        raise ConfigError(f"{where}: unknown tag {', '.join(sorted(tags - TAGS))} (known: log, int); {EXAMPLE}")
    log = "log" in tags
    if isinstance(sweep, ChoiceSweep):
        if any(OmegaConf.is_config(c) or isinstance(c, (list, dict)) for c in sweep.list):
            raise ConfigError(f"{where}: a choice is one number, word, true/false or null each; e.g. choice(64, 128)")
        return optuna.distributions.CategoricalDistribution(list(sweep.list))
    if isinstance(sweep, RangeSweep):
        start, stop, step = sweep.start, sweep.stop, 1 if sweep.step is None else sweep.step
        if not step > 0 or stop < start:
            raise ConfigError(f"{where} holds no value (range(start, end, step): start <= end, step > 0); {EXAMPLE}")
        high = start + step * int((stop - start) / step + 1e-9)  # the last value of the grid not beyond the end
        if all(isinstance(v, int) for v in (start, stop, step)):
            return optuna.distributions.IntDistribution(start, high, step=step)
        return optuna.distributions.FloatDistribution(start, high, step=step)
    if isinstance(sweep, IntervalSweep):
        low, high = sweep.start, sweep.end
        if not low < high or (log and low <= 0):
            raise ConfigError(f"{where} must have start < end{' and start > 0 (log scale)' if log else ''}; {EXAMPLE}")
        if "int" in tags:
            return optuna.distributions.IntDistribution(int(low), int(high), log=log)
        return optuna.distributions.FloatDistribution(float(low), float(high), log=log)
    raise ConfigError(f"{where}: only interval(), range() and choice(), tagged log or int, are searched; {EXAMPLE}")


def as_overrides(params: Mapping) -> list[str]:
    """A trial's parameters as Hydra overrides (`key=value`), quoted for Hydra's grammar where they need it."""
    return [shell.hydra_override(key, _text(value)) for key, value in sorted(params.items())]


def _text(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value) if isinstance(value, float) else str(value)  # repr: the exact float the study holds
