"""A run's input rule: how an image file becomes the tensor its model was trained on, read from the run, not retyped.

Three steps, the same as training's: Pillow decodes the file to uint8 [C, H, W] at the data's size and channel count
(`mcn.data.image_files.decode`: grey stays grey, RGB stays RGB); the batches resize it to the pretrained experts'
native input when they have one (`mcn.data.loader.resize`); and normalise it with the run's mean and std
(`mcn.data.loader.TensorBatches`, which this module feeds, so that the arithmetic is the evaluation's own).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from mcn.data.image_files import decode
from mcn.data.loader import TensorBatches
from mcn.data.prepare import PreparedData
from mcn.errors import FileError


@dataclass(frozen=True)
class InputRule:
    """`channels` and `size` (H, W) of the decoded image and the `interpolation` Pillow resizes with; `resize`: the
    (H, W) and interpolation the batches then resize to (None: none); `mean` / `std` per channel, in [0, 1] units
    (the model gets `(pixel - 255 * mean) / (255 * std)`); `classes`: the class names in label order."""

    channels: int
    size: tuple[int, int]
    interpolation: str
    resize: tuple[tuple[int, int], str] | None
    mean: list[float]
    std: list[float]
    classes: list[str]

    @classmethod
    def of(cls, data: PreparedData, interpolation: str) -> InputRule:
        """The rule of a run's prepared data; `interpolation`: its `data.interpolation` (built-in data: bilinear)."""
        classes = data.train.classes or [str(c) for c in range(data.train.num_classes)]
        resize = (tuple(data.resize.size), data.resize.interpolation) if data.resize else None
        size = tuple(int(s) for s in data.train.images.shape[-2:])
        return cls(data.train.in_channels, size, interpolation, resize, list(data.mean), list(data.std), classes)

    @property
    def input_size(self) -> tuple[int, int]:
        """(H, W) of what the model takes."""
        return self.resize[0] if self.resize else self.size

    def as_dict(self) -> dict:
        out = asdict(self)
        out["resize"] = None if self.resize is None else {"size": list(self.resize[0]), "interpolation": self.resize[1]}
        out["size"] = list(self.size)
        return out

    @classmethod
    def from_dict(cls, data: dict, where: Path) -> InputRule:
        """The rule `as_dict` wrote, read back from `where`; FileError naming it when a field is missing."""
        try:
            resize = data["resize"]
            return cls(
                int(data["channels"]),
                (int(data["size"][0]), int(data["size"][1])),
                str(data["interpolation"]),
                None if resize is None else ((int(resize["size"][0]), int(resize["size"][1])), resize["interpolation"]),
                [float(v) for v in data["mean"]],
                [float(v) for v in data["std"]],
                [str(c) for c in data["classes"]],
            )
        except (KeyError, TypeError, ValueError, IndexError) as e:
            raise FileError(f"{where} holds no whole input rule ({e!r} is wrong or missing); write it anew") from None

    def decode(self, path: Path) -> torch.Tensor:
        """One image file as uint8 [C, H, W]. Raises OSError / ValueError (Pillow's) for a file it cannot use."""
        return torch.from_numpy(decode(path, self.channels, self.size, self.interpolation).copy())

    def batches(
        self, images: torch.Tensor, batch_size: int, device: torch.device, channels_last: bool = False
    ) -> Iterator[torch.Tensor]:
        """uint8 images [N, C, H, W] as normalised float32 batches [B, C, *input_size] on `device`, in order."""
        batches = TensorBatches(
            images,
            torch.zeros(len(images), dtype=torch.long),
            batch_size,
            self.mean,
            self.std,
            train=False,
            channels_last=channels_last,
            device=device,
            resize=self.resize,
        )
        for x, _ in batches:
            yield x
