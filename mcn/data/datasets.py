"""Data sets as uint8 images ([N, C, H, W]) and int64 labels: whole tensors that can live on a GPU, or rows of a
memory-mapped cache file read batch by batch (`MappedImages`, the streaming path).

Built in: `digits` ships inside scikit-learn (no download); `fashion_mnist` reads torchvision's IDX files (or
Debian's `dataset-fashion-mnist` package); `cifar10` / `cifar100` use torchvision. A researcher's own data
(`image_folder`, `manifest`, `torchvision`: `mcn.data.sources`) is decoded once into the data cache
(`mcn.data.cache`) and opened from there.
"""

from __future__ import annotations

import gzip
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig

from mcn.data.cache import PARTS, open_arrays, open_hashes, open_or_build
from mcn.data.image_files import BadFiles
from mcn.data.sources import BUILDERS
from mcn.errors import ConfigError, DataError

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"
]  # fmt: skip


class MappedImages:
    """Rows `rows` of a uint8 [N, C, H, W] .npy file, memory-mapped: indexing reads just those images. Pickles as
    its path (each DataLoader worker maps the file itself)."""

    device = torch.device("cpu")

    def __init__(self, path: Path, rows: np.ndarray | None = None):
        self.path = Path(path)
        self._array = np.load(self.path, mmap_mode="r")
        self.rows = np.arange(len(self._array)) if rows is None else np.asarray(rows, dtype=np.int64)

    def __getstate__(self) -> dict:
        return {"path": self.path, "rows": self.rows}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["path"], state["rows"])

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self.rows), *self._array.shape[1:])

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index) -> torch.Tensor:
        rows = self.rows[np.asarray(index, dtype=np.int64)]
        order = np.argsort(rows, kind="stable")  # read the file forwards; put the images back in asked order
        batch = np.empty((len(rows), *self._array.shape[1:]), dtype=np.uint8)
        batch[order] = self._array[rows[order]]
        return torch.from_numpy(batch)

    def subset(self, indices: np.ndarray) -> MappedImages:
        return MappedImages(self.path, self.rows[np.asarray(indices, dtype=np.int64)])

    def to(self, device) -> torch.Tensor:
        """All rows, read into memory (on `device`)."""
        return self[np.arange(len(self.rows))].to(device)


@dataclass
class ImageSet:
    images: torch.Tensor | MappedImages  # uint8 [N, C, H, W]
    labels: torch.Tensor  # int64 [N]
    num_classes: int
    classes: list[str] | None = None  # class names in label order, where the data set has them

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def in_channels(self) -> int:
        return self.images.shape[1]

    @property
    def streamed(self) -> bool:
        return isinstance(self.images, MappedImages)

    def subset(self, indices: np.ndarray) -> ImageSet:
        if self.streamed:
            return ImageSet(self.images.subset(indices), self.labels[indices], self.num_classes, self.classes)
        index = torch.as_tensor(indices, dtype=torch.long)
        return ImageSet(self.images[index], self.labels[index], self.num_classes, self.classes)

    def channel_stats(self) -> tuple[list[float], list[float]]:
        """Per-channel mean and std in [0, 1] units, for normalisation (in chunks: a streamed set need not fit)."""
        total = torch.zeros(self.in_channels, dtype=torch.float64)
        squares = torch.zeros_like(total)
        chunk = max(1, 2**24 // int(np.prod(self.images.shape[1:])))  # ~16 MB of uint8 (128 MB as float64)
        for start in range(0, len(self), chunk):
            x = self.images[np.arange(start, min(start + chunk, len(self)))].to(torch.float64).div_(255)
            total += x.sum(dim=(0, 2, 3))
            squares += x.square().sum(dim=(0, 2, 3))
        count = len(self) * self.images.shape[2] * self.images.shape[3]
        mean = total / count
        std = ((squares - count * mean.square()) / max(count - 1, 1)).clamp_min(0).sqrt().clamp_min(1e-3)
        return mean.tolist(), std.tolist()


def _digits(train: bool) -> ImageSet:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = np.round(bunch.images * (255 / 16)).astype(np.uint8)[:, None]  # 0..16 -> 0..255, [N, 1, 8, 8]
    # digits has no official test split: a fixed seeded quarter is the test set
    order = np.random.default_rng(0).permutation(len(images))
    cut = len(images) // 4
    index = np.sort(order[cut:] if train else order[:cut])
    labels = torch.from_numpy(bunch.target[index]).long()
    return ImageSet(torch.from_numpy(images[index]), labels, 10, [str(c) for c in range(10)])


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
    labels = torch.from_numpy(labels.astype(np.int64))
    return ImageSet(torch.from_numpy(images.copy())[:, None], labels, 10, FASHION_MNIST_CLASSES)


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
    return ImageSet(images, torch.as_tensor(ds.targets, dtype=torch.long), len(ds.classes), list(ds.classes))


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


def _open_cached(folder: Path, part: str, num_classes: int, classes: list[str], in_memory: bool) -> ImageSet:
    images, labels = open_arrays(folder, part)
    kept = torch.from_numpy(np.array(images)) if in_memory else MappedImages(folder / f"{part}_images.npy")
    return ImageSet(kept, torch.from_numpy(labels), num_classes, classes)


@dataclass
class LoadedData:
    train: ImageSet
    test: ImageSet
    description: str  # what was loaded and how it is kept, for the log
    key: str | None = None  # a researcher's own set: its content (classes, labels, image hashes), for the split
    files: list[str] | None = None  # ... where each training image came from, for messages
    hashes: tuple[np.ndarray, np.ndarray] | None = None  # ... each train and test image's SHA-1
    folder: Path | None = None  # ... its cache entry


def load_train_test(
    data: DictConfig, data_dir: str | Path, cache_dir: str | Path, may_build: bool = True
) -> LoadedData:
    """The train and test sets `data` names, with a line saying what they are and where they are kept.

    A built-in set is loaded whole. A researcher's own set is opened from the data cache (decoded into it first if
    needed) and kept in memory, or streamed from the cache when its images exceed `data.memory_budget_gb`
    (`data.in_memory`: auto, true, false). `may_build=False` (a job's other ranks) waits for the cache entry rank
    0 builds. Raises ConfigError / DataError naming the value or file and the fix."""
    source = data.get("source", data.name)
    if source in DATASETS:
        train, test = (load_dataset(source, data_dir, train=t, download=data.download) for t in (True, False))
        return LoadedData(train, test, f"{source}: {len(train):,} train / {len(test):,} test images")
    if source not in BUILDERS:
        known = ", ".join((*DATASETS, *BUILDERS))
        raise ConfigError(f"data.source={source!r}; known: {known} (set data=<one of them>)")
    in_memory = data.get("in_memory", "auto")
    recipe, build = BUILDERS[source](data, Path(data_dir))
    folder, meta, built = open_or_build(Path(cache_dir), str(data.name), recipe, build, may_build)
    classes = list(meta["classes"])
    nbytes = sum(open_arrays(folder, p)[0].nbytes for p in PARTS)
    budget = float(data.memory_budget_gb) * 2**30
    fits = nbytes <= budget
    keep = fits if in_memory == "auto" else in_memory
    train, test = (_open_cached(folder, p, len(classes), classes, keep) for p in PARTS)
    size = "x".join(map(str, train.images.shape[1:]))
    why = f"{nbytes / 2**30:.2f} GiB {'<=' if fits else '>'} data.memory_budget_gb={data.memory_budget_gb}"
    how = (
        f"in memory ({why if in_memory == 'auto' else 'data.in_memory=true'})"
        if keep
        else f"streamed from the cache ({why if in_memory == 'auto' else 'data.in_memory=false'})"
    )
    lines = [
        f"{data.name}: {len(train):,} train / {len(test):,} test images {size}, {len(classes)} classes, "
        f"{'decoded into' if built else 'from'} the cache {folder}; {how}"
    ]
    if meta.get("test_carved"):
        carved = meta["test_carved"]
        lines.append(
            f"no test set of its own: a seeded {carved['fraction']:.0%} of each class (data.test_fraction, "
            f"data.test_seed={carved['seed']}) is the test set, its files listed in {folder / 'meta.json'}"
        )
    if meta.get("skipped"):
        lines.append(BadFiles([tuple(s) for s in meta["skipped"]]).summary() + f"; listed in {folder / 'meta.json'}")
    hashes = tuple(open_hashes(folder, p) for p in PARTS)
    content = hashlib.sha256(json.dumps(classes).encode() + train.labels.numpy().tobytes() + hashes[0].tobytes())
    files = meta.get("files", {}).get("train")
    return LoadedData(train, test, "\n".join(lines), content.hexdigest()[:16], files, hashes, folder)
