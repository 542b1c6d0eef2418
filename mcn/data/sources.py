"""Data sets a researcher brings (`data.source`): `image_folder` (root/train/<class>/..., optional root/test/),
`manifest` (CSVs of `path,label`) and `torchvision` (any classification set of torchvision.datasets by name, from
a local root, offline). Each is decoded once into the data cache (`mcn.data.cache`) at `data.image_size`
and `data.channels`.

Without a test set of its own (no `test/` folder, no `data.test_csv`, a torchvision set without a test split), a
seeded, per-class `data.test_fraction` of the training images is the test set. Which files it holds is recorded
in the cache entry's `meta.json` (`test_carved`), and the split then works on the rest only.
"""

from __future__ import annotations

import hashlib
import inspect
import logging
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
from omegaconf import DictConfig, OmegaConf

from mcn.data.cache import write_part, write_rows
from mcn.data.image_files import (
    BadFiles,
    FileList,
    class_folders,
    decode_into,
    label_order,
    read_manifest,
    scan_tree,
    to_array,
)
from mcn.errors import ConfigError, DataError

log = logging.getLogger(__name__)

CACHE_VERSION = 1  # bump when the decoding changes what a cached array holds


def transform_settings(data: DictConfig) -> dict:
    """The transform (values checked by the schema, mcn.data.schema): image size (H, W), channels, interpolation,
    bad-file policy."""
    size = data.image_size
    size = [size, size] if isinstance(size, int) else list(size)
    return {
        "size": tuple(size),
        "channels": int(data.channels),
        "interpolation": str(data.interpolation),
        "on_bad_file": str(data.on_bad_file),
    }


def carve_test(files: FileList, fraction: float, seed: int) -> tuple[FileList, FileList]:
    """(train, test): per class, a seeded `fraction` of its files (at least one when it has two) is test."""
    labels = np.asarray(files.labels)
    rng = np.random.default_rng(seed)
    test = np.zeros(len(files), dtype=bool)
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        n = min(len(members) - 1, max(1, round(len(members) * fraction))) if len(members) > 1 else 0
        test[rng.permutation(members)[:n]] = True
    return files.keep(~test), files.keep(test)


def _fingerprint(files: FileList) -> str:
    """What the cache key needs of the files: each one's place, label, size and modification time."""
    digest = hashlib.sha256()
    for path, label in zip(files.paths, files.labels):
        st = path.stat()
        digest.update(os.fsencode(path) + f"\0{label}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def _file_parts(
    train: FileList, test: FileList | None, data: DictConfig, bad: BadFiles
) -> tuple[dict, Callable[[Path], dict]]:
    """The recipe and builder of a set of files: decoded by `decode_into`, the test part carved when absent."""
    t = transform_settings(data)
    carved = test is None
    if carved:
        train, test = carve_test(train, float(data.test_fraction), int(data.test_seed))
    for part, files in (("train", train), ("test", test)):
        if not len(files):
            raise DataError(f"the {part} part of {data.name} has no images; check data.root and its layout")
    recipe = {
        "version": CACHE_VERSION,
        "source": data.source,
        "classes": train.classes,
        "train": _fingerprint(train),
        "test": _fingerprint(test),
        **t,
        **({"test_carved": [float(data.test_fraction), int(data.test_seed)]} if carved else {}),
    }

    def build(folder: Path) -> dict:
        counts, names = {}, {}
        for part, files in (("train", train), ("test", test)):

            def fill(new, files=files, part=part):
                channels, size, interpolation = t["channels"], t["size"], t["interpolation"]
                array, kept = decode_into(files, new, channels, size, interpolation, t["on_bad_file"], bad)
                names[part] = files.keep(kept).where
                return array, kept, files.labels

            counts[part] = write_part(folder, part, fill)
        meta = {"classes": train.classes, "counts": counts, "skipped": [list(s) for s in bad.skipped], "files": names}
        if carved:
            meta["test_carved"] = {"fraction": float(data.test_fraction), "seed": int(data.test_seed)}
        return meta

    return recipe, build


def image_folder(data: DictConfig, data_dir: Path) -> tuple[dict, Callable[[Path], dict]]:
    if data.root is None:
        raise ConfigError("data=image_folder needs data.root=<folder with train/<class>/ (and optionally test/)>")
    root = Path(data.root).expanduser().absolute()
    train_dir, test_dir = root / "train", root / "test"
    if not train_dir.is_dir():
        raise DataError(
            f"no folder {train_dir}; data=image_folder reads <data.root>/train/<class>/<image> "
            f"(and <data.root>/test/<class>/<image> when there is a test set)"
        )
    bad = BadFiles()
    classes = class_folders(train_dir)
    if not classes:
        raise DataError(f"{train_dir} has no class folders; put each class's images in {train_dir}/<class name>/")
    train = scan_tree(train_dir, classes, data.on_bad_file, bad)
    used = sorted(set(train.labels))
    if len(used) < len(classes):  # an empty class folder, left out under the skip policy: renumber the rest
        names = [classes[i] for i in used]
        renumber = {old: new for new, old in enumerate(used)}
        train = FileList(train.paths, [renumber[y] for y in train.labels], train.where, names)
    test = scan_tree(test_dir, train.classes, data.on_bad_file, bad) if test_dir.is_dir() else None
    return _file_parts(train, test, data, bad)


def manifest(data: DictConfig, data_dir: Path) -> tuple[dict, Callable[[Path], dict]]:
    if data.train_csv is None:
        raise ConfigError("data=manifest needs data.train_csv=<CSV of path,label rows> (and optionally data.test_csv)")
    bad = BadFiles()
    train_csv = Path(data.train_csv).expanduser().absolute()
    root = Path(data.root).expanduser().absolute() if data.root is not None else train_csv.parent
    paths, names, where = read_manifest(train_csv, root, data.on_bad_file, bad)
    classes = label_order(names)
    number = {name: i for i, name in enumerate(classes)}
    train = FileList(paths, [number[n] for n in names], where, classes)
    test = None
    if data.test_csv is not None:
        paths, names, where = read_manifest(Path(data.test_csv).expanduser().absolute(), root, data.on_bad_file, bad)
        unknown = next((i for i, n in enumerate(names) if n not in number), None)
        if unknown is not None:
            raise DataError(
                f"{where[unknown]}: label {names[unknown]!r} is not among the training labels "
                f"({', '.join(classes[:10])}{', ...' if len(classes) > 10 else ''}); fix the row or remove it"
            )
        test = FileList(paths, [number[n] for n in names], where, classes)
    return _file_parts(train, test, data, bad)


def _torchvision_class(name: str):
    from torchvision import datasets

    cls = getattr(datasets, str(name), None)
    if not (inspect.isclass(cls) and issubclass(cls, datasets.VisionDataset)):
        known = sorted(
            n for n, c in vars(datasets).items() if inspect.isclass(c) and issubclass(c, datasets.VisionDataset)
        )
        raise ConfigError(f"data.dataset={name!r} is not a torchvision data set; known: {', '.join(known)}")
    return cls


def torchvision_set(data: DictConfig, data_dir: Path) -> tuple[dict, Callable[[Path], dict]]:
    """`data.dataset` from torchvision.datasets under `data.root` (default paths.data_dir), never downloaded unless
    data.download=true; `data.options` go to its constructor. Its train/test parts come from its `train=` or
    `split=` argument; a set with neither gets a carved test part."""
    if data.dataset is None:
        raise ConfigError("data=torchvision needs data.dataset=<a torchvision.datasets class, e.g. SVHN>")
    cls = _torchvision_class(data.dataset)
    t = transform_settings(data)
    root = str(Path(data.root or data_dir).expanduser().absolute())
    params = inspect.signature(cls.__init__).parameters
    options = OmegaConf.to_container(data.options, resolve=True) if data.options else {}
    if "download" in params:
        options["download"] = bool(data.download)

    def open_part(part: str | None):
        args = {"train": part == "train"} if "train" in params else {"split": part} if "split" in params else {}
        try:
            return cls(root, **args, **options) if "root" in params else cls(**args, **options)
        except (RuntimeError, FileNotFoundError, OSError) as e:
            raise DataError(
                f"torchvision's {data.dataset} is not in {root} ({e}); put its files there (data.root=<folder>) "
                f"or set data.download=true on a machine with a network"
            ) from None
        except (TypeError, ValueError) as e:
            raise ConfigError(f"torchvision's {data.dataset} refused data.options={options} ({e})") from None

    split_by = "train" if "train" in params else "split" if "split" in params else None
    parts = {p: open_part(p) for p in ("train", "test")} if split_by else {"train": open_part(None)}
    recipe = {
        "version": CACHE_VERSION,
        "source": "torchvision",
        "dataset": str(data.dataset),
        "root": root,
        "options": {k: v for k, v in options.items() if k != "download"},
        "sizes": {p: len(ds) for p, ds in parts.items()},
        **t,
        **({} if split_by else {"test_carved": [float(data.test_fraction), int(data.test_seed)]}),
    }

    def read(ds, new) -> tuple[np.ndarray, np.ndarray, list[int]]:
        array, labels = new((len(ds), t["channels"], *t["size"])), []
        for i in range(len(ds)):
            try:
                img, target = ds[i]
            except (OSError, ValueError) as e:  # a damaged file of the set
                raise DataError(f"torchvision's {data.dataset} cannot read item {i} under {root} ({e})") from None
            if not hasattr(img, "convert") or np.ndim(target) != 0:
                raise DataError(
                    f"torchvision's {data.dataset} gives ({type(img).__name__}, {type(target).__name__}) items, "
                    f"not (image, class index); mcn trains image classifiers"
                )
            array[i] = to_array(img, t["channels"], t["size"], t["interpolation"])
            labels.append(int(target))
        return array, np.ones(len(ds), dtype=bool), labels

    def build(folder: Path) -> dict:
        counts = {part: write_part(folder, part, lambda new, ds=ds: read(ds, new)) for part, ds in parts.items()}
        meta = {}
        if not split_by:  # one part only: carve the test part from it, per class
            images = np.load(folder / "train_images.npy", mmap_mode="r")
            labels = np.load(folder / "train_labels.npy")
            rows = np.arange(len(labels))
            index = FileList([Path()] * len(rows), labels.tolist(), [str(r) for r in rows], [])
            keep, held = carve_test(index, float(data.test_fraction), int(data.test_seed))
            for part, files in (("test", held), ("train_kept", keep)):
                counts[part.split("_")[0]] = write_rows(folder, part, images, labels, np.array(files.where, dtype=int))
            del images
            for kind in ("images", "labels"):
                (folder / f"train_kept_{kind}.npy").replace(folder / f"train_{kind}.npy")
            meta["test_carved"] = {"fraction": float(data.test_fraction), "seed": int(data.test_seed)}
        top = max(int(np.load(folder / f"{p}_labels.npy").max(initial=0)) for p in ("train", "test"))
        names = [str(c) for c in getattr(parts["train"], "classes", None) or range(top + 1)]
        return {"classes": names, "counts": counts, "skipped": [], **meta}

    return recipe, build


BUILDERS = {"image_folder": image_folder, "manifest": manifest, "torchvision": torchvision_set}
