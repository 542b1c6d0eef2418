"""The config blocks of the data (`data`, `split`, `augment`): every key, its type, default, rule and meaning. The
presets (`conf/data/*.yaml`, `conf/split/*.yaml`) set values of these."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from omegaconf import MISSING, DictConfig

from mcn.errors import ConfigError
from mcn.schema import FRACTION, NON_NEGATIVE, POSITIVE, SEED, WHOLE, Rule, is_number, is_whole, key, list_of, one_of

OPEN_FRACTION = Rule("a number strictly between 0 and 1", lambda v: is_number(v) and 0 < v < 1)
SIDE = Rule(
    "a side > 0 or [height, width]",
    lambda v: (
        (is_whole(v) and v > 0) or (isinstance(v, list) and len(v) == 2 and all(is_whole(s) and s > 0 for s in v))
    ),
)
RANDAUGMENT = list_of(Rule("", lambda v: is_whole(v) and v >= 0), "[num_ops, magnitude]")


@dataclass
class DataConfig:
    """A built-in data set (mcn.data.datasets), read from paths.data_dir."""

    name: str = key(MISSING, "names the data set's split, expert and cache folders")
    source: str = key(
        MISSING, "where the images come from: a built-in set's name, image_folder, manifest or torchvision"
    )
    download: bool = key(False, "true: fetch with torchvision when the files are not found")
    crop_padding: int = key(4, "random crop after padding by this many pixels (0: no crop)", WHOLE)
    flip: bool = key(True, "random horizontal flip")


@dataclass
class ImageFolderConfig(DataConfig):
    """Your own images in a class-per-folder tree (torchvision's ImageFolder layout): `<root>/train/<class>/<image>`
    and optionally `<root>/test/<class>/<image>`; decoded once into paths.cache_dir and reused by every run."""

    name: str = key("image_folder", "names the split, expert and cache folders: give each data set its own")
    source: str = key("image_folder", "where the images come from")
    root: str | None = key(None, "the folder holding train/ (required)", nullable=True)
    image_size: Any = key(32, "side of the square the images are resized to, or [height, width]", SIDE)
    channels: int = key(
        3, "3: RGB; 1: grey (alpha dropped, palettes through their colours, 16-bit scaled to 8)", one_of(1, 3)
    )
    interpolation: str = key(
        "bilinear", "resizing filter", one_of("nearest", "bilinear", "bicubic", "lanczos"), example="bilinear"
    )
    test_fraction: float = key(
        0.2, "without test/: this seeded fraction of each class of train/ is the test set", OPEN_FRACTION
    )
    test_seed: int = key(0, "the seed of that draw (the files are listed in the cache entry's meta.json)", SEED)
    on_bad_file: str = key(
        "error",
        "error: stop at an unusable file, naming it; skip: leave such files out and count them",
        one_of("error", "skip"),
    )
    in_memory: Any = key(
        "auto",
        "auto: in memory when the images fit memory_budget_gb, else streamed from the cache; true; false",
        one_of("auto", True, False),
    )
    memory_budget_gb: float = key(4, "on the device (or host) for the whole train + test set", NON_NEGATIVE)
    loader_workers: Any = key(
        "auto",
        "streamed: DataLoader processes reading batches from the cache (auto: cores - 1, at most 4; 0: the main "
        "process)",
        Rule("auto or a count >= 0", lambda v: v == "auto" or (is_whole(v) and v >= 0)),
    )
    download: bool = key(False, "nothing to download")


@dataclass
class ManifestConfig(ImageFolderConfig):
    """Your own images listed in CSV files of `path,label` rows (a header row naming the two columns; labels are
    class names or class numbers); decoded once into paths.cache_dir and reused by every run."""

    name: str = key("manifest", "names the split, expert and cache folders: give each data set its own")
    source: str = key("manifest", "where the images come from")
    root: str | None = key(
        None, "the folder the CSV's paths are relative to (null: the train CSV's folder)", nullable=True
    )
    train_csv: str | None = key(None, "the training images (required)", nullable=True)
    test_csv: str | None = key(
        None, "the test images (null: a seeded test_fraction of train_csv's rows)", nullable=True
    )


@dataclass
class TorchvisionConfig(ImageFolderConfig):
    """Any classification data set of torchvision.datasets by its class name (data.dataset=SVHN, STL10, ...), read
    from a local root: nothing is downloaded unless download=true; decoded once into paths.cache_dir."""

    name: str | None = key("${data.dataset}", "names the split, expert and cache folders", nullable=True)
    source: str = key("torchvision", "where the images come from")
    dataset: str | None = key(None, "the class name in torchvision.datasets (required)", nullable=True)
    root: str | None = key(None, "where its files lie (null: paths.data_dir)", nullable=True)
    options: Any = key(None, "more constructor arguments as a dict, e.g. data.options={size:1000} for FakeData")
    download: bool = key(False, "true: fetch with torchvision when the files are not found")


@dataclass
class SplitConfig:
    """How the train set is shared: a fusion holdout (never shown to an expert) and one share per expert
    (mcn.data.splits, docs/reference.md §1)."""

    scheme: str = key(MISSING, "the split scheme", one_of("iid", "classes", "dirichlet"))
    holdout_fraction: float = key(0.2, "of the train set, kept from the experts for fusion training", OPEN_FRACTION)
    fusion_val_fraction: float = key(0.2, "of the holdout, for fusion model selection", OPEN_FRACTION)
    expert_val_fraction: float = key(0.1, "of each expert's share, for expert model selection", OPEN_FRACTION)
    seed: int = key(42, "the split's own seed", SEED)
    force: bool = key(False, "true: remake a split on disk that was made differently")
    dedup: bool = key(False, "your own data: drop training-side copies of fusion-holdout / test images")


@dataclass
class IIDSplitConfig(SplitConfig):
    """IID shares: every expert sees a shared part of the pool plus its own part."""

    scheme: str = key("iid", "the split scheme", one_of("iid", "classes", "dirichlet"))
    shared_fraction: float = key(0.4, "of the pool, seen by every expert", FRACTION)
    unique_fraction: float = key(
        0.15,
        "of the pool, each expert's own (shared + K x unique <= 1)",
        Rule("a number in (0, 1]", lambda v: is_number(v) and 0 < v <= 1),
    )

    @classmethod
    def check(cls, node: DictConfig, cfg: DictConfig) -> None:
        k = cfg.experts.num
        used = node.shared_fraction + k * node.unique_fraction
        if used > 1 + 1e-9:
            raise ConfigError(
                f"iid split fractions do not fit: shared {node.shared_fraction} + {k} x unique "
                f"{node.unique_fraction} = {used:.3g} > 1; lower split.unique_fraction or split.shared_fraction"
            )


@dataclass
class ClassesSplitConfig(SplitConfig):
    """Class partition: expert k gets the k-th contiguous block of classes (needs K <= classes)."""

    scheme: str = key("classes", "the split scheme", one_of("iid", "classes", "dirichlet"))


@dataclass
class DirichletSplitConfig(SplitConfig):
    """Label skew: each class is shared among the experts in Dirichlet(alpha) proportions."""

    scheme: str = key("dirichlet", "the split scheme", one_of("iid", "classes", "dirichlet"))
    alpha: float = key(0.5, "the Dirichlet concentration: small = skewed, large = near iid", POSITIVE)


@dataclass
class AugmentConfig:
    """Fusion-stage training batches (mcn.data.prepare.training_augmentation); the expert stage has
    pretrain.augment."""

    label_smoothing: float = key(0.0, "of the one-hot targets", FRACTION)
    cutmix: float = key(0.0, "probability of CutMix per batch", FRACTION)
    random_erasing: float = key(0.0, "probability of erasing a random rectangle per image", FRACTION)
    randaugment: list[int] | None = key(
        None,
        "[num_ops, magnitude]; null: off (runs per image, costs CPU time)",
        RANDAUGMENT,
        example=[3, 14],
        nullable=True,
    )


@dataclass
class PretrainAugmentConfig:
    """Expert-stage training batches; keys left null take the expert family's value (pretrain.families)."""

    label_smoothing: float | None = key(
        None, "of the one-hot targets; null: the family's", FRACTION, example=0.05, nullable=True
    )
    randaugment: list[int] | None = key(
        None,
        "[num_ops, magnitude], e.g. [3, 14]; null: off (runs per image, costs CPU time)",
        RANDAUGMENT,
        example=[3, 14],
        nullable=True,
    )
    random_erasing: float = key(0.0, "probability of erasing a random rectangle per image", FRACTION)
    cutmix: float = key(0.0, "probability of CutMix per batch (the study: 1.0)", FRACTION)
