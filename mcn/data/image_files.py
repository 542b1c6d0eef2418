"""A researcher's own image files: a class-per-folder tree (torchvision's `ImageFolder` layout) or a CSV manifest
of `path,label` rows, decoded with Pillow into uint8 [N, C, H, W] at one size and one channel count.

Pillow decodes everything here: torchvision's own decoders are deprecated since torchvision 0.29. Every image
becomes 8-bit grey (`channels=1`) or RGB (`channels=3`): palette images through their colours, an alpha channel
dropped (the colour under it kept), 16-bit images scaled to 8 bits (value / 257). Images of another size are
resized with `interpolation` (Pillow antialiases when it shrinks).

A file that cannot be used (corrupt, truncated, not an image, missing, floating-point pixels) stops the job with
one line naming it, or with `on_bad_file="skip"` is left out and counted (`BadFiles`): a label is never guessed.
"""

from __future__ import annotations

import csv
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mcn import distributed
from mcn.errors import DataError

IMAGE_EXTENSIONS = (".bmp", ".gif", ".jpeg", ".jpg", ".pbm", ".pgm", ".png", ".ppm", ".tif", ".tiff", ".webp")
ON_BAD_FILE = ("error", "skip")
INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "lanczos")


@dataclass
class FileList:
    """Image files with their labels. `where[i]` says where file i was named, for messages: its path, or
    `<csv>:<line>`."""

    paths: list[Path]
    labels: list[int]
    where: list[str]
    classes: list[str]

    def __len__(self) -> int:
        return len(self.paths)

    def keep(self, mask: np.ndarray) -> FileList:
        pick = np.flatnonzero(mask)
        return FileList(
            [self.paths[i] for i in pick], [self.labels[i] for i in pick], [self.where[i] for i in pick], self.classes
        )


@dataclass
class BadFiles:
    """What `on_bad_file=skip` left out: (where, why) pairs."""

    skipped: list[tuple[str, str]] = field(default_factory=list)

    def add(self, where: str, why: str, on_bad_file: str, fix: str) -> None:
        if on_bad_file != "skip":
            raise DataError(f"{where}: {why}; {fix}, or set data.on_bad_file=skip to leave such files out")
        self.skipped.append((where, why))

    def summary(self) -> str:
        shown = "; ".join(f"{where} ({why})" for where, why in self.skipped[:3])
        more = f"; and {len(self.skipped) - 3} more" if len(self.skipped) > 3 else ""
        n = len(self.skipped)
        return f"left out {n} file{'s' if n != 1 else ''} (data.on_bad_file=skip): {shown}{more}"


def is_image(path: Path) -> bool:
    """A file of an image format mcn decodes, not hidden."""
    return path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def image_files_under(folder: Path) -> list[Path]:
    """Every image file under `folder` (any depth), sorted; hidden files and folders (.ipynb_checkpoints, .git) are
    left out, as they are no part of a data set."""
    return sorted(
        p
        for p in folder.rglob("*")
        if p.is_file() and is_image(p) and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )


def class_folders(folder: Path) -> list[str]:
    """The class names of a tree: its sub-folders, in sorted order (torchvision's convention), hidden ones skipped."""
    try:
        return sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    except OSError as e:
        raise DataError(f"cannot read the image folder {folder} ({e.strerror}); check data.root") from None


def scan_tree(folder: Path, classes: list[str], on_bad_file: str, bad: BadFiles) -> FileList:
    """Every image file under `folder/<class>/` (any depth), labelled by the index of its class in `classes`.
    A class folder of `folder` that `classes` lacks, or one without images, is refused (or, for an empty one, left
    out under the skip policy)."""
    found = class_folders(folder)
    unknown = [c for c in found if c not in classes]
    if unknown:
        raise DataError(
            f"{folder / unknown[0]} is a class the training images do not have (they have {', '.join(classes)}); "
            f"remove it or add a train folder of that name"
        )
    paths, labels, where = [], [], []
    for label, name in enumerate(classes):
        if name not in found:
            continue
        files = image_files_under(folder / name)
        if not files:
            bad.add(
                f"{folder / name}",
                f"class folder without images ({', '.join(IMAGE_EXTENSIONS)})",
                on_bad_file,
                "add images to it or remove it",
            )
            continue
        paths += files
        labels += [label] * len(files)
        where += [str(p) for p in files]
    return FileList(paths, labels, where, classes)


def read_manifest(
    csv_path: Path, root: Path, on_bad_file: str, bad: BadFiles
) -> tuple[list[Path], list[str], list[str]]:
    """The rows of a `path,label` CSV (a header row naming those two columns; paths relative to `root`): paths,
    label names and `<csv>:<line>` of each row. A malformed row or a missing file is refused, or skipped under the
    skip policy."""
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as f:  # -sig: Excel's "CSV UTF-8" starts with a BOM
            rows = list(csv.reader(f))
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read the manifest {csv_path} ({e}); check data.train_csv / data.test_csv") from None
    header = [h.strip().lower() for h in rows[0]] if rows else []
    if "path" not in header or "label" not in header:
        raise DataError(f"{csv_path}:1: the first row must name the columns path and label (got {rows[:1]})")
    ip, il = header.index("path"), header.index("label")
    paths, names, where = [], [], []
    seen: dict[Path, tuple[str, str]] = {}  # path -> (label, where): one file, one label
    for line, row in enumerate(rows[1:], start=2):
        here = f"{csv_path}:{line}"
        if not row or all(not cell.strip() for cell in row):
            continue
        if len(row) != len(header) or not row[ip].strip() or not row[il].strip():
            bad.add(
                here,
                f"malformed row {row!r} (want {len(header)} fields: {', '.join(header)})",
                on_bad_file,
                "fix the row",
            )
            continue
        path = root / row[ip].strip()
        if not path.is_file():
            bad.add(here, f"no file {path}", on_bad_file, "fix the path (relative to data.root) or remove the row")
            continue
        label = row[il].strip()
        if path in seen and seen[path][0] != label:
            raise DataError(
                f"{here}: {path} is labelled {label!r}, but {seen[path][1]} labels it {seen[path][0]!r}; "
                f"keep one of the rows"
            )
        seen[path] = (label, here)
        paths.append(path)
        names.append(label)
        where.append(here)
    if not paths:
        raise DataError(f"{csv_path} names no usable images; check it has path,label rows")
    return paths, names, where


def label_order(names: list[str]) -> list[str]:
    """Class names in label order: numerically when every name is an integer (`0`, `1`, ..., `10`), else sorted."""
    unique = set(names)
    if all(n.lstrip("-").isdecimal() for n in unique):
        return sorted(unique, key=int)
    return sorted(unique)


def _to_8bit(img):
    """16-bit and 32-bit integer images scaled to 8 bits; anything else as Pillow opened it."""
    from PIL import Image

    if img.mode.startswith("I"):  # I, I;16, I;16B, ...: 16-bit range
        return Image.fromarray(np.clip(np.asarray(img, dtype=np.float64) / 257, 0, 255).round().astype(np.uint8))
    if img.mode == "F":
        raise ValueError("floating-point pixels (mode F); save it as 8- or 16-bit")
    if img.mode == "P" and "transparency" in img.info:
        return img.convert("RGBA")  # Pillow's palette-with-transparency path goes through RGBA
    return img


def to_array(img, channels: int, size: tuple[int, int], interpolation: str) -> np.ndarray:
    """A Pillow image as uint8 [channels, H, W], resized to `size` (H, W) when it has another.
    Raises ValueError for floating-point pixels."""
    from PIL import Image

    img = _to_8bit(img).convert("L" if channels == 1 else "RGB")
    if img.size != (size[1], size[0]):
        img = img.resize((size[1], size[0]), Image.Resampling[interpolation.upper()])
    array = np.asarray(img)
    return array[None] if channels == 1 else array.transpose(2, 0, 1)


def decode(path: Path, channels: int, size: tuple[int, int], interpolation: str) -> np.ndarray:
    """One image file as `to_array` gives it. Raises OSError / ValueError (Pillow's) for a file it cannot use."""
    from PIL import Image

    with Image.open(path) as img:
        img.load()  # a truncated file fails here, not later
        return to_array(img, channels, size, interpolation)


def decode_into(
    files: FileList,
    out: Callable[[tuple[int, ...]], np.ndarray],
    channels: int,
    size: tuple[int, int],
    interpolation: str,
    on_bad_file: str,
    bad: BadFiles,
) -> tuple[np.ndarray, np.ndarray]:
    """Decode `files` into the uint8 array `out(shape)` makes (an on-disk memmap: a set larger than memory streams
    through), on threads (Pillow releases the GIL while decoding). Returns (the array, a mask of the files kept);
    a left-out file leaves its row unused (the caller drops it)."""
    from PIL import Image

    array = out((len(files), channels, *size))
    kept = np.ones(len(files), dtype=bool)

    def one(i: int) -> tuple[int, str | None]:
        try:
            array[i] = decode(files.paths[i], channels, size, interpolation)
            return i, None
        except Image.DecompressionBombError as e:
            return i, f"{e}; downscale it (Pillow refuses images this large as a safety measure)"
        except ValueError as e:  # floating-point pixels
            return i, str(e)
        except OSError as e:
            return i, f"cannot decode it: {e}"

    cores = distributed.local_cores()
    pool = ThreadPoolExecutor(max_workers=min(8, cores))
    try:
        for i, why in pool.map(one, range(len(files))):
            if why is not None:
                kept[i] = False
                bad.add(files.where[i], why, on_bad_file, "replace or delete the file")
    finally:  # the first bad file under on_bad_file=error stops the rest
        pool.shutdown(wait=True, cancel_futures=True)
    return array, kept
