"""Deterministic splits of a training set, shared by expert pretraining and fusion training.

The train set is split into an expert pool and a fusion holdout (docs/reference.md §1: seed 42, 20 %),
the pool is shared among K experts by a scheme (`iid`, `classes`, `dirichlet`), and a validation
part is carved from the holdout and from each expert's share. Everything lands in one folder as
`.npy` index files plus `split_meta.json`, whose `hash` covers every index; a split on disk made
differently is never overwritten unless forced.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from mcn.errors import ConfigError
from mcn.files import write_json, write_npy

SCHEMES = ("iid", "classes", "dirichlet")


@dataclass(frozen=True)
class SplitSpec:
    dataset: str
    num_experts: int
    scheme: str = "iid"
    holdout_fraction: float = 0.2  # of the train set, for the fusion stage
    fusion_val_fraction: float = 0.2  # of the holdout, for fusion model selection
    expert_val_fraction: float = 0.1  # of each expert's share, for expert model selection
    shared_fraction: float = 0.4  # iid: of the pool, seen by every expert
    unique_fraction: float = 0.15  # iid: of the pool, each expert's own
    alpha: float = 0.5  # dirichlet: concentration (small = skewed)
    seed: int = 42
    dedup: bool = False  # drop training-side copies of holdout / test images (mcn.data.leakage)

    def check(self, num_classes: int) -> None:
        for name in ("holdout_fraction", "fusion_val_fraction", "expert_val_fraction"):
            if not 0 < getattr(self, name) < 1:
                raise ConfigError(f"split.{name}={getattr(self, name)} must lie strictly between 0 and 1")
        if self.num_experts < 1:
            raise ConfigError(f"experts.num={self.num_experts} must be at least 1")
        if self.scheme not in SCHEMES:
            raise ConfigError(
                f"unknown split scheme {self.scheme!r}; known: {', '.join(SCHEMES)} (set split=<one of them>)"
            )
        if self.scheme == "iid":
            if self.shared_fraction < 0 or self.unique_fraction <= 0:
                raise ConfigError(
                    f"split.shared_fraction={self.shared_fraction} must be >= 0 "
                    f"and split.unique_fraction={self.unique_fraction} > 0"
                )
            used = self.shared_fraction + self.num_experts * self.unique_fraction
            if used > 1 + 1e-9:
                raise ConfigError(
                    f"iid split fractions do not fit: shared {self.shared_fraction} + {self.num_experts} x unique "
                    f"{self.unique_fraction} = {used:.3g} > 1; lower split.unique_fraction or split.shared_fraction"
                )
        if self.scheme == "classes" and self.num_experts > num_classes:
            raise ConfigError(
                f"the classes scheme needs experts.num={self.num_experts} <= "
                f"the {num_classes} classes of {self.dataset}"
            )
        if self.scheme == "dirichlet" and self.alpha <= 0:
            raise ConfigError(f"split.alpha={self.alpha} must be > 0 (the Dirichlet concentration)")


def _carve(indices: np.ndarray, fraction: float, seed: int, what: str) -> tuple[np.ndarray, np.ndarray]:
    """Split sorted `indices` into (train, val) with `fraction` of them in val."""
    n_val = int(round(len(indices) * fraction))
    if n_val < 1 or n_val >= len(indices):
        raise ConfigError(
            f"{what} has {len(indices)} images: too few to carve a {fraction:.0%} validation part; change the fractions"
        )
    order = np.random.default_rng(seed).permutation(len(indices))
    return np.sort(indices[order[n_val:]]), np.sort(indices[order[:n_val]])


def _expert_shares(pool: np.ndarray, labels: np.ndarray, spec: SplitSpec, num_classes: int) -> list[np.ndarray]:
    rng = np.random.default_rng(spec.seed)
    k = spec.num_experts
    if spec.scheme == "iid":
        shuffled = pool[rng.permutation(len(pool))]
        n_shared, n_unique = int(len(pool) * spec.shared_fraction), int(len(pool) * spec.unique_fraction)
        shared = shuffled[:n_shared]
        return [
            np.sort(np.concatenate([shared, shuffled[n_shared + i * n_unique : n_shared + (i + 1) * n_unique]]))
            for i in range(k)
        ]
    if spec.scheme == "classes":
        blocks = np.array_split(np.arange(num_classes), k)
        return [np.sort(pool[np.isin(labels[pool], block)]) for block in blocks]
    shares: list[list[np.ndarray]] = [[] for _ in range(k)]
    for c in range(num_classes):
        members = pool[labels[pool] == c]
        members = members[rng.permutation(len(members))]
        cuts = (np.cumsum(rng.dirichlet(np.full(k, spec.alpha))) * len(members)).astype(int)[:-1]
        for i, part in enumerate(np.split(members, cuts)):
            shares[i].append(part)
    return [np.sort(np.concatenate(parts)) for parts in shares]


def make_split(labels: np.ndarray, num_classes: int, spec: SplitSpec) -> dict[str, np.ndarray]:
    """All index arrays of a split, by file stem."""
    spec.check(num_classes)
    n = len(labels)
    order = np.random.default_rng(spec.seed).permutation(n)
    n_holdout = int(n * spec.holdout_fraction)
    holdout, pool = np.sort(order[:n_holdout]), np.sort(order[n_holdout:])
    arrays = {"expert_train_indices": pool, "fusion_holdout_indices": holdout}
    arrays["fusion_train_indices"], arrays["fusion_val_indices"] = _carve(
        holdout, spec.fusion_val_fraction, spec.seed + 1, "the fusion holdout"
    )
    for i, share in enumerate(_expert_shares(pool, labels, spec, num_classes)):
        arrays[f"expert_{i}_train_indices"], arrays[f"expert_{i}_val_indices"] = _carve(
            share,
            spec.expert_val_fraction,
            spec.seed + 100 + i,
            f"expert {i}'s share ({spec.scheme}, alpha={spec.alpha})",
        )
    return arrays


def split_hash(arrays: dict[str, np.ndarray]) -> str:
    digest = hashlib.sha256()
    for name in sorted(arrays):
        digest.update(name.encode())
        digest.update(np.ascontiguousarray(arrays[name], dtype=np.int64).tobytes())
    return digest.hexdigest()[:16]


@dataclass
class Split:
    directory: Path
    spec: SplitSpec
    arrays: dict[str, np.ndarray]
    hash: str

    def __getitem__(self, name: str) -> np.ndarray:
        return self.arrays[name]


def prepare_split(
    directory: str | Path,
    labels: np.ndarray,
    num_classes: int,
    spec: SplitSpec,
    force: bool = False,
    data_key: str | None = None,
    finish: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]] | None = None,
) -> Split:
    """Load the split in `directory` if it was made from `spec` (and the same data); else make and save it.
    `data_key` names the data (a researcher's own set: its cache entry), so another set under the same
    `data.name` is refused; `finish` edits a new split's arrays before they are hashed (split.dedup)."""
    directory = Path(directory)
    meta_path = directory / "split_meta.json"
    # dedup and data_key only when used: splits made before they existed keep their recipe
    recipe = {k: v for k, v in asdict(spec).items() if k != "dedup" or v} | {"num_train_images": int(len(labels))}
    if data_key is not None:
        recipe["data"] = data_key
    if meta_path.exists() and not force:
        try:
            meta = json.loads(meta_path.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"corrupt {meta_path} ({e}); delete {directory} or set split.force=true") from None
        changed = {
            k: (meta.get("recipe", {}).get(k), v) for k, v in recipe.items() if meta.get("recipe", {}).get(k) != v
        }
        if changed:
            what = ", ".join(f"{k}: {old} on disk vs {new} now" for k, (old, new) in changed.items())
            if "data" in changed:  # other images under the same data.name: its experts are not these images'
                raise ConfigError(
                    f"the split in {directory} was made for other images filed under data.name={spec.dataset} "
                    f"({what}); give this data set its own data.name=<name>"
                )
            raise ConfigError(
                f"the split in {directory} was made differently ({what}); set split.force=true to remake it, "
                f"or point paths.split_dir elsewhere"
            )
        try:
            arrays = {name: np.load(directory / f"{name}.npy") for name in meta["sizes"]}
        except (OSError, ValueError) as e:
            raise ConfigError(
                f"split files in {directory} are missing or corrupt ({e}); set split.force=true to remake them"
            ) from None
        if split_hash(arrays) != meta["hash"]:
            raise ConfigError(
                f"split files in {directory} do not match the hash in split_meta.json; "
                f"set split.force=true to remake them"
            )
        return Split(directory, spec, arrays, meta["hash"])
    arrays = make_split(labels, num_classes, spec)
    if finish is not None:
        arrays = finish(arrays)
    digest = split_hash(arrays)
    for name, array in arrays.items():
        write_npy(directory / f"{name}.npy", array)
    meta = {"recipe": recipe, "sizes": {k: int(len(v)) for k, v in arrays.items()}, "hash": digest}
    write_json(meta_path, meta)  # written last: a split without its meta is not a split
    return Split(directory, spec, arrays, digest)
