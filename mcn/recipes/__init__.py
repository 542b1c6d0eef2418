"""Recipes: a training stage as setup -> train -> cleanup (`run_recipe`).

- `mcn.recipes.expert.ExpertRecipe`: pretrain one expert on its share of the expert pool;
- `mcn.recipes.fusion.FusionRecipe`: train the MCN (experts not frozen + fusion + global head).
"""

from __future__ import annotations

from mcn import distributed


def run_recipe(recipe) -> dict:
    """setup -> train -> cleanup; the tracker is closed (as failed) even when training raises."""
    failed = True
    try:
        recipe.setup()
        results = recipe.train()
        failed = False
        return results
    finally:
        recipe.cleanup(failed=failed)
        distributed.cleanup()
