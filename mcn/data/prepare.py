"""From the `data` / `split` config to tensors, split indices and batch iterators."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from omegaconf import DictConfig

from mcn import distributed
from mcn.data.datasets import ImageSet, LoadedData, load_train_test
from mcn.data.leakage import describe, drop_leaks, find_leaks
from mcn.data.loader import TensorBatches, resize, soft_targets
from mcn.data.splits import Split, SplitSpec, prepare_split
from mcn.errors import ConfigError

if TYPE_CHECKING:  # a type only: the data layer sits below training
    from mcn.training.runtime import Runtime

log = logging.getLogger(__name__)


@dataclass
class InputTransform:
    """What pretrained experts expect of their input: the images resized to `size` (H, W) with `interpolation` and
    normalised with their `mean` / `std` (not the expert pool's). `why` says so in words."""

    size: tuple[int, int]
    mean: list[float]
    std: list[float]
    interpolation: str
    why: str

    def astuple(self) -> tuple[tuple[int, int], str]:
        """(size, interpolation): what the batches' resize takes."""
        return self.size, self.interpolation


def input_transform(experts: list, in_channels: int) -> InputTransform | None:
    """The one input every expert (an ExpertSpec) is fed, when some start from pretrained weights
    (`mcn.models.timm_expert.native_input`).
    The rule for experts pretrained at different resolutions or normalisations: the largest native resolution,
    with the normalisation and interpolation of the (first) expert pretrained at it; experts from scratch follow.
    Grey images take the mean of the three channels' statistics. None: no expert is pretrained."""
    from mcn.models.timm_expert import native_input

    natives = [(spec.label, native_input(spec)) for spec in experts]
    natives = [(label, n) for label, n in natives if n is not None]
    if not natives:
        return None
    label, chosen = max(natives, key=lambda item: item[1]["input_size"][1] * item[1]["input_size"][2])
    mean, std = list(chosen["mean"]), list(chosen["std"])
    if in_channels == 1:
        mean, std = [sum(mean) / len(mean)], [sum(std) / len(std)]
    size = tuple(chosen["input_size"][1:])
    why = f"{label}'s pretrained input: {size[0]}x{size[1]}, {chosen['interpolation']}, mean {mean}, std {std}"
    others = sorted({lbl for lbl, n in natives if n != chosen})
    if others:
        why += f" (also fed to {', '.join(others)}, pretrained otherwise: the largest resolution wins)"
    return InputTransform(size, mean, std, str(chosen["interpolation"]), why)


@dataclass
class PreparedData:
    train: ImageSet  # the whole train set; the split says which indices each stage may use
    test: ImageSet
    split: Split
    mean: list[float]
    std: list[float]
    resize: InputTransform | None = None  # pretrained experts: every batch resized to their input

    def part(self, name: str) -> ImageSet:
        return self.train.subset(self.split[name])

    def input_images(self, images: ImageSet) -> ImageSet:
        """`images` as uint8 at the experts' input size (itself when nothing is resized), for code that feeds the
        model without make_batches (the robustness suite)."""
        if self.resize is None:
            return images
        chunks = [
            resize(images.images[np.arange(start, min(start + 512, len(images)))].float(), *self.resize.astuple())
            .round_()
            .clamp_(0, 255)
            .to(torch.uint8)
            for start in range(0, len(images), 512)
        ]
        return ImageSet(torch.cat(chunks), images.labels, images.num_classes, images.classes)

    @property
    def image_size(self) -> tuple[int, int]:
        """(H, W) of the images as the experts get them."""
        return self.resize.size if self.resize else tuple(self.train.images.shape[-2:])


def split_spec(cfg: DictConfig) -> SplitSpec:
    """The split's recipe: `split/*.yaml` names only the fields its scheme uses; the rest keep SplitSpec's defaults."""
    fields = {f.name for f in dataclasses.fields(SplitSpec)} - {"dataset", "num_experts"}
    given = {k: v for k, v in cfg.split.items() if k in fields}
    return SplitSpec(dataset=cfg.data.name, num_experts=int(cfg.experts.num), **given)


def _load(cfg: DictConfig) -> LoadedData:
    # rank 0 fills the data cache; the others wait for its entry (a file, not a collective: decoding may take
    # longer than a process group's timeout), and every rank checks the files, so all stop on the same line
    return load_train_test(cfg.data, cfg.paths.data_dir, cfg.paths.get("cache_dir"), may_build=distributed.is_main())


def prepare_data(cfg: DictConfig, experts: list = ()) -> PreparedData:
    """The train and test sets, the split (made here the first time) and the normalisation statistics: the expert
    pool's, or where some of `experts` (ExpertSpecs) are pretrained, their input (`input_transform`). For a
    researcher's own data, also the leakage check: exact duplicates across the split's parts and the test set are
    reported, and removed from the training side with split.dedup=true."""
    loaded = _load(cfg)
    train, test = loaded.train, loaded.test
    spec = split_spec(cfg)
    hashes = loaded.hashes
    if spec.dedup and not hashes:
        raise ConfigError(f"split.dedup=true checks a researcher's own data; {cfg.data.name} is built in: drop it")

    def finish(arrays):
        leaks = find_leaks(arrays, *hashes)
        log.info("split.dedup: removed %s from the training side", describe(leaks, loaded.files))
        arrays = drop_leaks(arrays, leaks)
        empty = [name for name, index in arrays.items() if not len(index)]
        if empty:
            raise ConfigError(
                f"split.dedup=true leaves {', '.join(empty)} without images: the data is mostly duplicates; "
                f"remove the duplicate files, or run without split.dedup"
            )
        return arrays

    def load_or_make_split():
        return prepare_split(
            cfg.paths.split_dir,
            train.labels.numpy(),
            train.num_classes,
            spec,
            force=cfg.split.force,
            data_key=loaded.key,
            finish=finish if spec.dedup else None,
        )

    split = load_or_make_split() if distributed.is_main() else None
    distributed.barrier()  # rank 0 writes the split; the others read it
    split = split or load_or_make_split()
    if distributed.is_main() and loaded.key:
        log.info("data: %s", loaded.description)
        if not spec.dedup:
            leaks = find_leaks(split.arrays, *hashes)
            if any(leaks.values()):
                log.warning(
                    "data: %s across the split and the test set: experts may have seen fusion or test images; "
                    "split.dedup=true (with split.force=true) removes the training-side copies",
                    describe(leaks, loaded.files),
                )
    resize = input_transform(list(experts), train.in_channels)
    if resize is not None:
        if distributed.is_main():
            log.info("data: every batch resized to %s", resize.why)
        return PreparedData(train, test, split, resize.mean, resize.std, resize)
    # normalisation statistics from the expert pool, the same for both stages
    mean, std = train.subset(split["expert_train_indices"]).channel_stats()
    return PreparedData(train, test, split, mean, std)


def make_batches(
    images: ImageSet,
    data: PreparedData,
    cfg: DictConfig,
    runtime: Runtime,
    *,
    train: bool,
    seed: int = 0,
    batch_size: int | None = None,
    **augment,
) -> TensorBatches:
    """Training batches (`train=True`: shuffled with `seed`, augmented, this process's share) or evaluation
    batches (in order, plain), of `batch_size` images (default: trainer.batch_size). `augment`: TensorBatches'
    extras (`erasing`, `uint8_transform`)."""
    home = runtime.device if runtime.data_on_device and not images.streamed else "cpu"
    return TensorBatches(
        images.images if images.streamed else images.images.to(home),
        images.labels.to(home),
        int(batch_size or cfg.trainer.batch_size),
        data.mean,
        data.std,
        train=train,
        crop_padding=int(cfg.data.crop_padding),
        flip=bool(cfg.data.flip),
        seed=seed,
        channels_last=runtime.channels_last,
        device=runtime.device,
        shard=(runtime.dist.rank, runtime.dist.world_size) if train else (0, 1),
        loader_workers=loader_workers(cfg.data.get("loader_workers", "auto")) if images.streamed else 0,
        resize=data.resize.astuple() if data.resize else None,
        **augment,
    )


def loader_workers(value) -> int:
    """DataLoader processes for a streamed set: `data.loader_workers`, or auto: the cores less the training
    process, at most 4, at least 1."""
    if value in (None, "auto"):
        cores = distributed.local_cores()
        return max(1, min(4, cores - 1))
    return value


@dataclass
class Augmentation:
    """A stage's training augmentation (`augment` for fusion, `pretrain.augment` for experts): what the
    batches do per image (`batch_extras` for make_batches: random erasing, RandAugment) and what a step
    does to a batch (`make_targets`: label smoothing, CutMix; None when both are off), drawing from its
    own random stream (`generator`, saved with the train state)."""

    batch_extras: dict
    make_targets: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None
    generator: torch.Generator


def training_augmentation(augment, num_classes: int, seed: int) -> Augmentation:
    generator = torch.Generator().manual_seed(seed)
    smoothing, cutmix = float(augment.label_smoothing), float(augment.cutmix)

    def make_targets(x, y):
        return soft_targets(x, y, num_classes, smoothing, cutmix, generator)

    extras = {"erasing": float(augment.random_erasing), "uint8_transform": randaugment(augment.randaugment)}
    return Augmentation(extras, make_targets if smoothing or cutmix else None, generator)


def randaugment(spec) -> Callable | None:
    """torchvision's RandAugment from `[num_ops, magnitude]`; None: off."""
    if spec is None:
        return None
    from torchvision.transforms import v2

    num_ops, magnitude = spec
    return v2.RandAugment(num_ops=int(num_ops), magnitude=int(magnitude))
