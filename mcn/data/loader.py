"""Batches straight from a uint8 tensor, augmented on whatever device the tensor lives on.

No DataLoader workers and no host synchronisation: random crops (pad + per-sample offset, one
gather) and flips are batched tensor ops, so the same code runs on CPU and on a GPU-resident set.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F


def random_crop_flip(x: torch.Tensor, padding: int, flip: bool, generator: torch.Generator) -> torch.Tensor:
    """x: [B, C, H, W] float. Zero-pads by `padding` and takes a random HxW window per sample."""
    b, c, h, w = x.shape
    if padding > 0:
        padded = F.pad(x, (padding,) * 4)
        dy = torch.randint(0, 2 * padding + 1, (b, 1, 1), device=x.device, generator=generator)
        dx = torch.randint(0, 2 * padding + 1, (b, 1, 1), device=x.device, generator=generator)
        rows = (torch.arange(h, device=x.device).view(1, h, 1) + dy).expand(b, h, w)
        cols = (torch.arange(w, device=x.device).view(1, 1, w) + dx).expand(b, h, w)
        flat = (rows * (w + 2 * padding) + cols).view(b, 1, h * w).expand(b, c, h * w)
        x = padded.flatten(2).gather(2, flat).view(b, c, h, w)
    if flip:
        mask = torch.rand(b, 1, 1, 1, device=x.device, generator=generator) < 0.5
        x = torch.where(mask, x.flip(3), x)
    return x


def resize(x: torch.Tensor, size: tuple[int, int], interpolation: str) -> torch.Tensor:
    """x: [B, C, H, W] float, resized to `size` (H, W): nearest, or bilinear / bicubic with antialiasing (as
    Pillow shrinks); timm's other names (e.g. `random`) take bilinear."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    if interpolation == "nearest":
        return F.interpolate(x, size=size, mode="nearest")
    mode = interpolation if interpolation in ("bilinear", "bicubic") else "bilinear"
    return F.interpolate(x, size=size, mode=mode, antialias=True, align_corners=False)


def random_erasing(
    x: torch.Tensor, p: float, generator: torch.Generator, scale=(0.02, 0.33), ratio=(0.3, 3.3)
) -> torch.Tensor:
    """Per image, with probability p, zero (the normalised mean) one random rectangle; batched."""
    b, _, h, w = x.shape
    dev = x.device
    area = h * w * torch.empty(b, device=dev).uniform_(*scale, generator=generator)
    log_ratio = torch.empty(b, device=dev).uniform_(math.log(ratio[0]), math.log(ratio[1]), generator=generator)
    eh = (area * log_ratio.exp()).sqrt().round().clamp(1, h)
    ew = (area / log_ratio.exp()).sqrt().round().clamp(1, w)
    top = (torch.rand(b, device=dev, generator=generator) * (h - eh + 1)).floor()
    left = (torch.rand(b, device=dev, generator=generator) * (w - ew + 1)).floor()
    rows = torch.arange(h, device=dev).view(1, h, 1)
    cols = torch.arange(w, device=dev).view(1, 1, w)
    inside = (
        (rows >= top.view(b, 1, 1))
        & (rows < (top + eh).view(b, 1, 1))
        & (cols >= left.view(b, 1, 1))
        & (cols < (left + ew).view(b, 1, 1))
    )
    chosen = torch.rand(b, 1, 1, device=dev, generator=generator) < p
    return x.masked_fill((inside & chosen).unsqueeze(1), 0.0)


def soft_targets(
    x: torch.Tensor, y: torch.Tensor, num_classes: int, smoothing: float, cutmix: float, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Label smoothing, and with probability `cutmix` one CutMix of the batch with a shuffled copy of itself."""
    targets = F.one_hot(y, num_classes).float() * (1 - smoothing) + smoothing / num_classes
    if cutmix <= 0 or torch.rand((), generator=generator).item() >= cutmix:
        return x, targets
    b, _, h, w = x.shape
    lam = torch.distributions.Beta(1.0, 1.0).sample().item()
    ch, cw = int(h * math.sqrt(1 - lam)), int(w * math.sqrt(1 - lam))
    cy, cx = (torch.randint(0, n, (1,), generator=generator).item() for n in (h, w))
    y0, y1, x0, x1 = max(cy - ch // 2, 0), min(cy + ch // 2, h), max(cx - cw // 2, 0), min(cx + cw // 2, w)
    perm = torch.randperm(b, generator=generator).to(x.device)
    x = x.clone()
    x[:, :, y0:y1, x0:x1] = x[perm, :, y0:y1, x0:x1]
    kept = 1 - (y1 - y0) * (x1 - x0) / (h * w)
    return x, targets * kept + targets[perm] * (1 - kept)


class TensorBatches:
    """Iterates (inputs, labels) over an uint8 image tensor: shuffled and augmented for training,
    in order and plain for evaluation. Inputs come out normalised float32 on `device` (default:
    where the set lives); shuffling and augmentation run there too."""

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        batch_size: int,
        mean: list[float],
        std: list[float],
        train: bool,
        crop_padding: int = 0,
        flip: bool = False,
        seed: int = 0,
        channels_last: bool = False,
        device: torch.device | str | None = None,
        erasing: float = 0.0,
        uint8_transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
        shard: tuple[int, int] = (0, 1),
        loader_workers: int = 0,
        resize: tuple[tuple[int, int], str] | None = None,
    ):
        self.loader_workers, self.resize = loader_workers, resize
        self.erasing, self.uint8_transform = erasing, uint8_transform
        self.rank, self.world_size = shard  # training batches: this process's share of each shuffled epoch
        self.images, self.labels, self.batch_size, self.train = images, labels, batch_size, train
        self.crop_padding, self.flip, self.channels_last = crop_padding, flip, channels_last
        self.device = torch.device(device) if device is not None else images.device
        self.mean = torch.tensor(mean, device=self.device).view(1, -1, 1, 1) * 255
        self.std = torch.tensor(std, device=self.device).view(1, -1, 1, 1) * 255
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(seed)

    def _size(self) -> int:
        # every process gets the same number of images (DistributedDataParallel steps in lockstep)
        return len(self.labels) // self.world_size if self.train else len(self.labels)

    def __len__(self) -> int:
        return -(-self._size() // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n = self._size()
        if self.train:  # the same permutation on every process (same seed), each taking its own slice
            order = torch.randperm(len(self.labels), device=self.device, generator=self.generator)
            order = order[self.rank :: self.world_size][:n]
        else:
            order = torch.arange(n, device=self.device)
        home = self.images.device
        batches = [order[start : start + self.batch_size].to(home) for start in range(0, n, self.batch_size)]
        for index, x in zip(batches, self._uint8_batches(batches)):
            if self.train and self.uint8_transform is not None:
                x = torch.stack([self.uint8_transform(image) for image in x])
            x = x.float()
            if self.resize is not None:
                x = resize(x, *self.resize)
            y = self.labels[index].to(self.device, non_blocking=True)
            x = (x - self.mean) / self.std
            if self.train:
                x = random_crop_flip(x, self.crop_padding, self.flip, self.generator)
                if self.erasing > 0:
                    x = random_erasing(x, self.erasing, self.generator)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            yield x, y

    def _uint8_batches(self, batches: list[torch.Tensor]) -> Iterator[torch.Tensor]:
        """The uint8 images of each batch of indices, on the device. A tensor is indexed in place (a host-resident
        one copies just the batch); a memory-mapped set is read ahead by DataLoader workers into pinned memory."""
        if isinstance(self.images, torch.Tensor):
            for index in batches:
                yield self.images[index].to(self.device, non_blocking=True)
            return
        from torch.utils.data import DataLoader

        loader = DataLoader(
            _Rows(self.images, batches),
            batch_size=None,  # each item is a whole batch: one read of sorted rows per batch
            num_workers=self.loader_workers,
            pin_memory=self.device.type == "cuda",
            prefetch_factor=4 if self.loader_workers else None,
            generator=torch.Generator(),  # its workers' seeds would otherwise come from the global stream (dropout)
        )
        for x in loader:
            yield x.to(self.device, non_blocking=True)


class _Rows:
    """Batch i of a memory-mapped set (a map-style data set of whole batches)."""

    def __init__(self, images, batches: list[torch.Tensor]):
        self.images, self.batches = images, [b.numpy() for b in batches]

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.images[self.batches[i]]
