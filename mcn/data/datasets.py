"""Data sets as whole uint8 tensors ([N, C, H, W] images, int64 labels), so they can live on a GPU.

`digits` ships inside scikit-learn (no download); `fashion_mnist` reads torchvision's IDX files
(or Debian's `dataset-fashion-mnist` package); `cifar10` / `cifar100` use torchvision.
"""

from __future__ import annotations

import gzip
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mcn.errors import DataError

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


@dataclass
class ImageSet:
    images: torch.Tensor  # uint8 [N, C, H, W]
    labels: torch.Tensor  # int64 [N]
    num_classes: int

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def in_channels(self) -> int:
        return self.images.shape[1]

    def subset(self, indices: np.ndarray) -> ImageSet:
        index = torch.as_tensor(indices, dtype=torch.long)
        return ImageSet(self.images[index], self.labels[index], self.num_classes)

    def channel_stats(self) -> tuple[list[float], list[float]]:
        """Per-channel mean and std in [0, 1] units, for normalisation."""
        x = self.images.float().div_(255)
        return x.mean(dim=(0, 2, 3)).tolist(), x.std(dim=(0, 2, 3)).clamp_min(1e-3).tolist()


def _digits(train: bool) -> ImageSet:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = np.round(bunch.images * (255 / 16)).astype(np.uint8)[:, None]  # 0..16 -> 0..255, [N, 1, 8, 8]
    # digits has no official test split: a fixed seeded quarter is the test set
    order = np.random.default_rng(0).permutation(len(images))
    cut = len(images) // 4
    index = np.sort(order[cut:] if train else order[:cut])
    return ImageSet(torch.from_numpy(images[index]), torch.from_numpy(bunch.target[index]).long(), 10)


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
        ndim = data[3]
        shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
        return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)
    except (OSError, ValueError, EOFError, IndexError) as e:
        raise DataError(f"corrupt IDX file {path}: {e}; delete it and fetch it again") from None


def _find_idx(stem: str, folders: list[Path]) -> Path | None:
    for folder in folders:
        for name in (stem, stem + ".gz"):
            if (folder / name).is_file():
                return folder / name
    return None


def _fashion_mnist(root: Path, train: bool, download: bool) -> ImageSet:
    prefix = "train" if train else "t10k"
    folders = [root / "FashionMNIST" / "raw", root / "fashion_mnist", DEBIAN_FASHION_MNIST]
    paths = [_find_idx(f"{prefix}-{kind}", folders) for kind in ("images-idx3-ubyte", "labels-idx1-ubyte")]
    if None in paths and download:
        from torchvision.datasets import FashionMNIST

        try:
            FashionMNIST(str(root), train=train, download=True)
        except Exception as e:  # no network: say where the files go
            raise DataError(
                f"fashion_mnist not found and the download failed ({type(e).__name__}); put the four IDX files in "
                f"{root / 'FashionMNIST' / 'raw'} or `apt-get install dataset-fashion-mnist`"
            ) from None
        paths = [_find_idx(f"{prefix}-{kind}", folders) for kind in ("images-idx3-ubyte", "labels-idx1-ubyte")]
    if None in paths:
        raise DataError(
            f"fashion_mnist not found in {', '.join(map(str, folders))}; put the four IDX files in "
            f"{root / 'FashionMNIST' / 'raw'}, `apt-get install dataset-fashion-mnist`, or set data.download=true"
        )
    images, labels = (_read_idx(p) for p in paths)
    return ImageSet(torch.from_numpy(images.copy())[:, None], torch.from_numpy(labels.astype(np.int64)), 10)


def _cifar(name: str, root: Path, train: bool, download: bool) -> ImageSet:
    from torchvision import datasets

    cls = datasets.CIFAR10 if name == "cifar10" else datasets.CIFAR100
    try:
        ds = cls(str(root), train=train, download=download)
    except RuntimeError as e:  # torchvision: "Dataset not found or corrupted"
        raise DataError(
            f"{name} not found in {root} ({e}); put the extracted '{cls.base_folder}' folder there "
            f"or set data.download=true"
        ) from None
    except Exception as e:  # download attempted without network
        raise DataError(
            f"{name} download to {root} failed ({type(e).__name__}); put the extracted '{cls.base_folder}' folder there"
        ) from None
    images = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()
    return ImageSet(images, torch.as_tensor(ds.targets, dtype=torch.long), len(ds.classes))


DATASETS = ("digits", "fashion_mnist", "cifar10", "cifar100")


def load_dataset(name: str, root: str | Path, train: bool, download: bool = False) -> ImageSet:
    root = Path(root)
    if name == "digits":
        return _digits(train)
    if name == "fashion_mnist":
        return _fashion_mnist(root, train, download)
    if name in ("cifar10", "cifar100"):
        return _cifar(name, root, train, download)
    raise DataError(f"unknown data set {name!r}; known: {', '.join(DATASETS)} (set data=<one of them>)")
