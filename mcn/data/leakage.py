"""Exact duplicate images across the parts of a split, found by content hash (SHA-1 of the decoded uint8 pixels).

A researcher's own data often holds the same photo twice (a copy in two class folders, a re-export). When one
copy is in an expert's share and the other in the fusion holdout or the test set, the experts have seen a fusion
or test image and the fusion's gain is measured on leaked data. `find_leaks` counts such pairs; with
`split.dedup=true` (`drop_leaks`) the training side loses its copy: the experts' shares drop images that are also
in the fusion holdout or the test set, the holdout drops images that are also in the test set. The test set
never changes.
"""

from __future__ import annotations

import hashlib

import numpy as np

EXPERT_PARTS = "expert_"  # every expert_<i>_{train,val}_indices, and the pool they come from (expert_train_indices)
POOL = "expert_train_indices"  # images of the pool no expert's share holds are seen by no expert
HOLDOUT_PARTS = ("fusion_holdout_indices", "fusion_train_indices", "fusion_val_indices")


def content_hashes(images) -> np.ndarray:
    """One 20-byte SHA-1 per image of a uint8 [N, C, H, W] tensor or MappedImages, as an [N] bytes array."""
    out = []
    for start in range(0, len(images), 4096):
        batch = np.ascontiguousarray(np.asarray(images[np.arange(start, min(start + 4096, len(images)))]))
        out += [hashlib.sha1(row.tobytes()).digest() for row in batch]
    return np.array(out, dtype="S20")


def _pool(arrays: dict[str, np.ndarray], names) -> np.ndarray:
    return np.unique(np.concatenate([arrays[n] for n in names])) if names else np.array([], dtype=np.int64)


def find_leaks(arrays: dict[str, np.ndarray], train_hashes: np.ndarray, test_hashes: np.ndarray) -> dict[str, list]:
    """For each pair (`experts/holdout`, `experts/test`, `holdout/test`): the train-set indices on the training
    side (an expert's share; the fusion holdout) whose image also lies on the other side."""
    experts = _pool(arrays, [n for n in arrays if n.startswith(EXPERT_PARTS) and n != POOL])
    holdout = _pool(arrays, [n for n in HOLDOUT_PARTS if n in arrays])
    test = set(test_hashes.tolist())
    holdout_hashes = set(train_hashes[holdout].tolist())
    return {
        "experts/holdout": [int(i) for i in experts if train_hashes[i] in holdout_hashes],
        "experts/test": [int(i) for i in experts if train_hashes[i] in test],
        "holdout/test": [int(i) for i in holdout if train_hashes[i] in test],
    }


def drop_leaks(arrays: dict[str, np.ndarray], leaks: dict[str, list]) -> dict[str, np.ndarray]:
    """The split without the training-side copies `find_leaks` found (the test set is not in the split)."""
    from_experts = np.array(sorted(set(leaks["experts/holdout"]) | set(leaks["experts/test"])), dtype=np.int64)
    from_holdout = np.array(leaks["holdout/test"], dtype=np.int64)
    out = {}
    for name, index in arrays.items():
        drop = from_experts if name.startswith(EXPERT_PARTS) else from_holdout
        out[name] = index[~np.isin(index, drop)]
    return out


def describe(leaks: dict[str, list], where: list[str] | None = None) -> str:
    """`3 experts/holdout, 1 experts/test, 0 holdout/test duplicate images (e.g. train index 12, 40)`."""
    counts = ", ".join(f"{len(v)} {k}" for k, v in leaks.items())
    examples = sorted({i for v in leaks.values() for i in v})[:3]
    named = ", ".join(where[i] if where else f"train image {i}" for i in examples)
    return f"{counts} exact duplicate images" + (f" (e.g. {named})" if examples else "")
