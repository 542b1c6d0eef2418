"""Recipes: a training stage as setup -> train -> cleanup (`run_recipe`).

- `mcn.recipes.expert.ExpertRecipe`: pretrain one expert on its share of the expert pool;
- `mcn.recipes.fusion.FusionRecipe`: train the MCN (experts not frozen + fusion + global head).
"""

from __future__ import annotations

import logging

from mcn import distributed
from mcn.errors import MCNError, RunInterrupted
from mcn.files import RunStatus, move_earlier_run, remove_stale_temp_files

log = logging.getLogger(__name__)


def run_recipe(recipe) -> dict:
    """setup -> train -> cleanup, with the run's state kept in its folder (`mcn.files.run_status`); the tracker is
    closed (as failed) even when training raises."""
    root = recipe.files.root
    if recipe.cfg.trainer.resume == "never":
        moved = move_earlier_run(root)
        if moved:
            log.info("trainer.resume=never: the earlier run in %s was moved to %s", root, moved)
    remove_stale_temp_files(root)
    status = RunStatus(recipe.files.status)
    status.started(**recipe.identity)
    failed = True
    try:
        recipe.setup()
        results = recipe.train()
        failed = False
        status.done()
        return results
    except (SystemExit, RunInterrupted):  # a signal ended the loop, which has recorded it
        raise
    except KeyboardInterrupt:
        status.interrupted("Ctrl-C outside the epoch loop")
        raise
    except Exception as e:
        status.failed(str(e) if isinstance(e, MCNError) else f"{type(e).__name__}: {e}")
        raise
    finally:
        recipe.cleanup(failed=failed)
        distributed.cleanup()
