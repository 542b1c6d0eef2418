"""The config block of a learning-rate search (`search`, read by mcn.tune)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mcn.schema import COUNT, SEED, WHOLE, key, list_of, one_of


@dataclass
class SearchConfig:
    """mcn.tune (mcn.search): Optuna trials, each a fusion run judged on validation; the workers share the study."""

    name: str = key(
        "${data.name}_${fusion.name}",
        "the search's folder: ${paths.output_root}/search/<name>; launching the same name again continues it",
    )
    params: Any = key(
        None,
        "the space, in Hydra's Optuna sweeper notation (conf/hparams_search/), e.g. "
        "optim.base_lr: tag(log, interval(1e-5, 1e-3))",
    )
    n_trials: int = key(20, "trials in all, each counted once it ends (complete, pruned or failed)", COUNT)
    workers: int = key(2, "processes that take trials at once: Slurm array tasks or local processes", COUNT)
    objective: str = key(
        "val_accuracy",
        "val_accuracy (maximised) | val_nll (minimised): the global head's, on the fusion validation part; the "
        "test set is never evaluated",
        one_of("val_accuracy", "val_nll"),
    )
    sampler: str = key("tpe", "the Optuna sampler", one_of("tpe", "random"))
    seed: int | None = key(
        0, "the sampler's (each worker draws from its own stream of it); null: unseeded", SEED, nullable=True
    )
    pruner: str = key(
        "median",
        "stop a trial whose validation metric lags the others' at the same epoch: median | hyperband | none",
        one_of("median", "hyperband", "none"),
    )
    startup_trials: int = key(4, "trials before TPE models the space and the median pruner prunes", WHOLE)
    warmup_epochs: int = key(1, "epochs of a trial before it may be pruned (epoch 0: the probe)", WHOLE)
    rerun_seeds: list[int] = key(
        [0, 1, 2],
        "the seeds of the printed rerun of the best configuration (mcn.train -m, then mcn.evaluate)",
        list_of(SEED, "whole numbers >= 0"),
    )
