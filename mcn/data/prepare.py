"""From the `data` / `split` config to tensors, split indices and batch iterators."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from omegaconf import DictConfig

from mcn import distributed
from mcn.data.datasets import ImageSet, load_dataset
from mcn.data.loader import TensorBatches, soft_targets
from mcn.data.splits import Split, SplitSpec, prepare_split

if TYPE_CHECKING:  # a type only: the data layer sits below training
    from mcn.training.runtime import Runtime


@dataclass
class PreparedData:
    train: ImageSet  # the whole train set; the split says which indices each stage may use
    test: ImageSet
    split: Split
    mean: list[float]
    std: list[float]

    def part(self, name: str) -> ImageSet:
        return self.train.subset(self.split[name])


def split_spec(cfg: DictConfig) -> SplitSpec:
    """The split's recipe: `split/*.yaml` names only the fields its scheme uses; the rest keep SplitSpec's defaults."""
    fields = {f.name for f in dataclasses.fields(SplitSpec)} - {"dataset", "num_experts"}
    given = {k: v for k, v in cfg.split.items() if k in fields}
    return SplitSpec(dataset=cfg.data.name, num_experts=int(cfg.experts.num), **given)


def prepare_data(cfg: DictConfig) -> PreparedData:
    train = load_dataset(cfg.data.name, cfg.paths.data_dir, train=True, download=cfg.data.download)
    test = load_dataset(cfg.data.name, cfg.paths.data_dir, train=False, download=cfg.data.download)

    def load_or_make_split():
        return prepare_split(
            cfg.paths.split_dir, train.labels.numpy(), train.num_classes, split_spec(cfg), force=cfg.split.force
        )

    split = load_or_make_split() if distributed.is_main() else None
    distributed.barrier()  # rank 0 writes the split; the others read it
    split = split or load_or_make_split()
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
    home = runtime.device if runtime.data_on_device else "cpu"
    return TensorBatches(
        images.images.to(home),
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
        **augment,
    )


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
