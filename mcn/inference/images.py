"""What `mcn.predict` and `FusedModel.predict` are given to look at: folder trees, CSV manifests, image files and glob
patterns, resolved to image paths (with a label name where one is known), then decoded by the run's input rule.

- a folder: every image file under it, at any depth (hidden files and folders skipped); its label, for `--labels
  folder`, is the name of the first folder under the given one (the `ImageFolder` layout training reads);
- a `.csv` file: a manifest with a `path` column (relative to the CSV's folder, or absolute) and, for `--labels
  COLUMN`, that column;
- an image file, or a glob pattern (`**` reaches any depth) matching image files.
"""

from __future__ import annotations

import csv
import glob
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mcn.data.image_files import IMAGE_EXTENSIONS, BadFiles, FileList, decode_into, image_files_under, is_image
from mcn.errors import DataError
from mcn.inference.rule import InputRule

FOLDER_LABELS = "folder"  # --labels folder: an image's class is the folder it lies in under the given one
DECODE_CHUNK = 512  # images decoded at a time: memory stays bounded on a large folder


@dataclass
class Inputs:
    """Image files in the order given, each with its label name (None: unlabelled)."""

    paths: list[Path]
    labels: list[str | None]

    def __len__(self) -> int:
        return len(self.paths)


def _folder(folder: Path, labels: str | None) -> Inputs:
    files = image_files_under(folder)
    if not files:
        raise DataError(f"{folder} holds no image files ({', '.join(IMAGE_EXTENSIONS)}); point at a folder of images")
    if labels == FOLDER_LABELS:
        flat = [p for p in files if len(p.relative_to(folder).parts) < 2]
        if flat:
            raise DataError(
                f"--labels folder: {flat[0]} lies in {folder} itself, not in a class folder under it; put each "
                f"image in a folder named after its class"
            )
        return Inputs(files, [p.relative_to(folder).parts[0] for p in files])
    return Inputs(files, [None] * len(files))


def _manifest(path: Path, labels: str | None) -> Inputs:
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            rows, header = list(reader), list(reader.fieldnames or [])
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"cannot read the manifest {path} ({e}); pass a CSV with a path column") from None
    if "path" not in header:
        raise DataError(f"{path}: the first row must name a path column (it names {header}); add one")
    if labels not in (None, FOLDER_LABELS) and labels not in header:
        raise DataError(f"--labels {labels}: {path} has no such column (it has {', '.join(header)}); name one of them")
    paths, names = [], []
    for row in rows:
        cell = (row["path"] or "").strip()
        if not cell:
            continue
        file = Path(cell) if Path(cell).is_absolute() else path.parent / cell
        paths.append(file)
        if labels == FOLDER_LABELS:
            names.append(file.parent.name)
        else:
            names.append((row[labels] or "").strip() if labels else None)
    if not paths:
        raise DataError(f"{path} names no images; add rows with a path")
    return Inputs(paths, names)


def gather(items: list[str | Path], labels: str | None = None) -> Inputs:
    """The images `items` name (see the module docstring), in order; `labels`: None, `folder`, or a manifest's
    column. DataError naming an item that names nothing."""
    out = Inputs([], [])
    for item in items:
        path = Path(item)
        if path.is_dir():
            found = _folder(path, labels)
        elif path.is_file() and path.suffix.lower() == ".csv":
            found = _manifest(path, labels)
        elif path.is_file():
            found = Inputs([path], [path.parent.name if labels == FOLDER_LABELS else None])
        elif glob.has_magic(str(item)):
            matches = sorted(Path(p) for p in glob.glob(str(item), recursive=True) if is_image(Path(p)))
            if not matches:
                raise DataError(f"{item} matches no image files; check the pattern (quote it so the shell passes it)")
            found = Inputs(matches, [p.parent.name if labels == FOLDER_LABELS else None for p in matches])
        else:
            raise DataError(f"{item} does not exist; pass a folder of images, a CSV manifest, image files or a glob")
        if labels not in (None, FOLDER_LABELS) and not (path.is_file() and path.suffix.lower() == ".csv"):
            raise DataError(f"--labels {labels} names a manifest column, but {item} is not a CSV manifest")
        out.paths += found.paths
        out.labels += found.labels
    return out


def decoded(
    inputs: Inputs, rule: InputRule, on_bad_file: str = "error"
) -> Iterator[tuple[np.ndarray, torch.Tensor, list[tuple[str, str]]]]:
    """The images decoded by `rule`, DECODE_CHUNK at a time: (the positions in `inputs` kept, uint8 [n, C, H, W], the
    files left out as (path, why)). A file that cannot be used raises DataError naming it, or with `on_bad_file`
    "skip" is left out and reported."""
    for start in range(0, len(inputs), DECODE_CHUNK):
        stop = min(start + DECODE_CHUNK, len(inputs))
        files = FileList(inputs.paths[start:stop], [0] * (stop - start), [str(p) for p in inputs.paths[start:stop]], [])
        bad = BadFiles()
        array, kept = decode_into(
            files,
            lambda shape: np.empty(shape, dtype=np.uint8),
            rule.channels,
            rule.size,
            rule.interpolation,
            "skip",
            bad,
        )
        if bad.skipped and on_bad_file != "skip":
            where, why = bad.skipped[0]
            raise DataError(f"{where}: {why}; replace or delete the file, or pass --on-bad-file skip to leave it out")
        yield np.arange(start, stop)[kept], torch.from_numpy(array[kept]), bad.skipped
