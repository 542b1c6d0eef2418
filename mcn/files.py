"""What mcn keeps on disk: file names, file formats, atomic writes and safe loads.

Every name a run folder holds is spelled here once (`FusionRunFiles`, `ExpertRunFiles`), every
write goes through `atomic_write` (a temporary name, then a rename: a kill leaves the previous file
whole), and every load goes through `load_file` (`torch.load(weights_only=True)`: a file that would
need arbitrary unpickling is refused, not executed).

Two file formats:
- a **checkpoint** is one self-describing dict: `format`, `component` (expert | fusion |
  global_head | complete), `epoch`, `architecture` (what rebuilds the module), `metrics`, `config`
  (the resolved run config) and `state_dict`;
- the **train state** (`train_state.pth`) holds everything a resumed run needs: model, optimiser,
  scheduler, epoch, best so far, every RNG stream, and the config it was written with.
"""

from __future__ import annotations

import ast
import csv
import io
import json
import math
import os
import pickle
import random
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch
from torch import nn

from mcn import distributed
from mcn.errors import CheckpointError, MCNError, StorageError

CHECKPOINT_FORMAT = "mcn-checkpoint-v1"
TRAIN_STATE_FORMAT = "mcn-train-state-v1"


# ---------------------------------------------------------------- names


@dataclass(frozen=True)
class RunFolder:
    """What every training job keeps in its folder, whatever the stage."""

    root: Path

    @property
    def train_state(self) -> Path:
        return self.root / "train_state.pth"

    @property
    def tracker_id(self) -> Path:
        return self.root / "wandb_run_id.txt"

    @property
    def status(self) -> Path:
        return self.root / "run_status.json"


@dataclass(frozen=True)
class FusionRunFiles(RunFolder):
    """The files of one fusion run (docs/reference.md §4 names them)."""

    fusion_type: str

    def expert(self, index: int, epoch: int) -> Path:
        return self.root / "experts" / f"expert_{index}_epoch_{epoch}.pth"

    def fusion(self, epoch: int) -> Path:
        return self.root / "fusion" / f"fusion_{self.fusion_type}_epoch_{epoch}.pth"

    def global_head(self, epoch: int) -> Path:
        return self.root / "global" / f"global_head_epoch_{epoch}.pth"

    def complete(self, epoch: int | None = None) -> Path:
        """One epoch's complete model; without an epoch, the best one."""
        if epoch is None:
            return self.root / f"best_complete_fusion_{self.fusion_type}.pth"
        return self.root / f"complete_fusion_{self.fusion_type}_epoch_{epoch}.pth"

    @property
    def report(self) -> Path:
        return self.root / f"fusion_{self.fusion_type}_report.csv"

    @property
    def results(self) -> Path:
        return self.root / f"fusion_training_results_{self.fusion_type}.json"

    # what `python -m mcn.robustness` writes beside the run
    @property
    def robustness_csv(self) -> Path:
        return self.root / f"robustness_{self.fusion_type}.csv"

    @property
    def robustness_summary(self) -> Path:
        return self.root / f"robustness_{self.fusion_type}.md"

    @property
    def robustness_corruption_png(self) -> Path:
        return self.root / f"robustness_{self.fusion_type}_corruptions.png"

    @property
    def robustness_ood_png(self) -> Path:
        return self.root / f"robustness_{self.fusion_type}_ood.png"


# a fusion run's file names, read back: (component, pattern with the claims the name makes)
COMPONENT_PATTERNS = [
    ("expert", re.compile(r"^experts/expert_(?P<index>\d+)_epoch_(?P<epoch>\d+)\.pth$")),
    ("fusion", re.compile(r"^fusion/fusion_(?P<type>\w+?)_epoch_(?P<epoch>\d+)\.pth$")),
    ("global_head", re.compile(r"^global/global_head_epoch_(?P<epoch>\d+)\.pth$")),
    ("complete", re.compile(r"^complete_fusion_(?P<type>\w+?)_epoch_(?P<epoch>\d+)\.pth$")),
    ("complete", re.compile(r"^best_complete_fusion_(?P<type>\w+)\.pth$")),
]
REPORT_PATTERN = re.compile(r"^fusion_(?P<type>\w+)_report\.csv$")
RESULTS_PATTERN = re.compile(r"^fusion_training_results_(?P<type>\w+)\.json$")


def find_fusion_runs(root: Path) -> list[FusionRunFiles]:
    """Every fusion run under `root`: a folder holding a report CSV, a results JSON, or the run status of a
    fusion run (one that failed before its first epoch has only that)."""
    runs = set()
    for path in root.rglob("fusion_*"):
        match = REPORT_PATTERN.match(path.name) or RESULTS_PATTERN.match(path.name)
        if match and path.is_file() and not _hidden(path.relative_to(root)):
            runs.add(FusionRunFiles(path.parent, match["type"]))
    for path in root.rglob("run_status.json"):
        if _hidden(path.relative_to(root)):
            continue
        try:
            status = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if status.get("stage") == "fusion" and status.get("fusion_type"):
            runs.add(FusionRunFiles(path.parent, status["fusion_type"]))
    return sorted(runs, key=lambda r: (str(r.root), r.fusion_type))


def _hidden(relative: Path) -> bool:
    """Inside a dot-folder (.earlier_runs, .submitit, .hydra): not a run of the sweep."""
    return any(part.startswith(".") for part in relative.parts[:-1])


@dataclass(frozen=True)
class ExpertRunFiles(RunFolder):
    """The files of one expert's pretraining: its job folder (`root`), and what it publishes to the experts folder."""

    experts_dir: Path  # shared by every fusion run that starts from these experts
    filename: str  # the published best file, e.g. best_wrn_expert_{index}.pth
    index: int

    @property
    def best(self) -> Path:
        return self.root / self.filename.format(index=self.index)

    @property
    def published(self) -> Path:
        return self.experts_dir / self.filename.format(index=self.index)

    @property
    def last(self) -> Path:
        return self.root / f"expert_{self.index}_last.pth"

    @property
    def report(self) -> Path:
        return self.root / f"expert_{self.index}_report.csv"

    @property
    def published_report(self) -> Path:
        return self.experts_dir / self.report.name

    @property
    def results(self) -> Path:
        return self.experts_dir / f"expert_{self.index}_results.json"


@dataclass(frozen=True)
class SweepFiles:
    """A -m sweep's own files, beside its job folders: what `mcn.sweep` reads (status, retry, cancel)."""

    root: Path

    @property
    def manifest(self) -> Path:  # every job: number, overrides, folder, Slurm job ids
        return self.root / "sweep.json"

    @property
    def launcher(self) -> Path:  # the launcher that submitted it (Slurm request, Hydra context): retry reuses it
        return self.root / ".submitit" / "launcher.pkl"


def pretrained_expert_path(experts_dir: str | Path, filename: str, index: int) -> Path:
    return Path(experts_dir) / filename.format(index=index)


# ---------------------------------------------------------------- writes


TEMP_PATTERN = re.compile(r"^\..+\.tmp\d+$")  # `.NAME.tmpPID`, what atomic_write writes before the rename


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], None]) -> Path:
    """`write(f)` into a temporary file beside `path`, then rename it into place: a kill, a full disk or
    Ctrl-C leaves the previous file whole and no temporary file behind. Only rank 0 of a multi-process
    job writes. A write that fails raises StorageError naming the path and the cause."""
    path = Path(path)
    if not distributed.is_main():
        return path
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException as e:
        cause = _write_failure(e, path.parent)  # before the partial file is removed: a full disk frees up then
        tmp.unlink(missing_ok=True)
        if not isinstance(e, Exception) or isinstance(e, MCNError):  # Ctrl-C, exit, or already explained
            raise
        raise StorageError(
            f"cannot write {path}: {cause}; free space or fix the folder's permissions "
            f"(or point paths.output_root / hydra.run.dir elsewhere), then run the same command again"
        ) from None
    return path


def _write_failure(error: BaseException, folder: Path) -> str:
    """In words. torch.save reports a full disk as an internal RuntimeError, so the free space is asked."""
    if isinstance(error, OSError) and error.strerror:
        return error.strerror[0].lower() + error.strerror[1:]
    try:
        if shutil.disk_usage(folder).free < 2**20:
            return "no space left on device"
    except OSError:
        pass
    return f"{type(error).__name__}: {error}"


EARLIER_RUNS = ".earlier_runs"  # where starting over (trainer.resume=never) moves a folder's earlier run
# what stays when a run starts over in a folder: Hydra's and submitit's own files, the job's open log
_NOT_A_RUN_FILE = {".hydra", ".submitit", EARLIER_RUNS}


def move_earlier_run(root: Path) -> Path | None:
    """Start over in `root`: every file an earlier run left there moves to `root/.earlier_runs/<time>/`, so
    none of it mixes with the new run's. Returns that folder, or None when there was nothing to move."""
    root = Path(root)
    leftovers = (
        [p for p in sorted(root.iterdir()) if p.name not in _NOT_A_RUN_FILE and p.suffix != ".log"]
        if root.is_dir()
        else []
    )
    if not leftovers or not distributed.is_main():
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S")
    target = root / EARLIER_RUNS / stamp
    for n in range(1, 1000):  # two restarts within one second
        if not target.exists():
            break
        target = root / EARLIER_RUNS / f"{stamp}-{n}"
    target.mkdir(parents=True)
    for path in leftovers:
        os.replace(path, target / path.name)
    return target


def remove_stale_temp_files(root: Path) -> list[Path]:
    """Temporary files that writes cut short (a kill) left in a run folder; a starting run removes them."""
    stale = [p for p in Path(root).rglob(".*.tmp*") if TEMP_PATTERN.match(p.name) and p.is_file()]
    if distributed.is_main():
        for path in stale:
            path.unlink(missing_ok=True)
    return stale


def save_torch(obj: Any, path: str | Path) -> Path:
    return atomic_write(path, lambda f: torch.save(obj, f))


def write_json(path: str | Path, data: Any) -> Path:
    """JSON has no NaN or Infinity: a non-finite number is written as null (undefined)."""
    text = json.dumps(_finite(data), indent=2, allow_nan=False)
    return atomic_write(path, lambda f: f.write(text.encode()))


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda f: f.write(text.encode()))


def write_bytes(path: str | Path, data: bytes) -> Path:
    return atomic_write(path, lambda f: f.write(data))


def write_npy(path: str | Path, array: np.ndarray) -> Path:
    return atomic_write(path, lambda f: np.save(f, array))


def write_csv(path: str | Path, columns: list[str], rows: list[dict]) -> Path:
    def write(f: IO[bytes]) -> None:
        text = io.StringIO(newline="")
        writer = csv.DictWriter(text, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
        f.write(text.getvalue().encode())

    return atomic_write(path, write)


def read_csv(path: str | Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# ---------------------------------------------------------------- loads


def load_file(path: str | Path) -> Any:
    """Load any checkpoint-like file safely; a clear error for missing, truncated or foreign files."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        # mmap: tensors are read only when used, so listing a folder of large checkpoints stays cheap
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as e:
        # torch names the pickle GLOBAL it would have to import ("Unsupported global: GLOBAL posix.system", or
        # "Trying to load unsupported GLOBAL posix.system ..." in newer releases)
        needs = [line.strip() for line in str(e).splitlines() if "GLOBAL" in line]
        if needs:  # an object the safe unpickler will not build: it could run code
            raise CheckpointError(
                f"refused to load {path}: it needs arbitrary unpickling, which could run code ({needs[0]})"
            ) from None
        raise CheckpointError(
            f"cannot read {path}: truncated or not a PyTorch checkpoint (bad pickle); delete or replace it"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError, KeyError) as e:
        raise CheckpointError(
            f"cannot read {path}: truncated or not a PyTorch checkpoint ({type(e).__name__}); delete or replace it"
        ) from None


# ---------------------------------------------------------------- checkpoints


def make_checkpoint(component: str, module: nn.Module, architecture: dict, epoch: int, **fields: Any) -> dict:
    return {
        "format": CHECKPOINT_FORMAT,
        "component": component,
        "epoch": epoch,
        "architecture": architecture,
        "state_dict": clean_state_dict(module.state_dict()),
        **fields,
    }


def check_checkpoint(ckpt: Any, path: str | Path, component: str | None = None) -> dict:
    """`ckpt` (loaded from `path`) must be one of our files, holding `component` when one is named."""
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is not an mcn checkpoint (no format={CHECKPOINT_FORMAT!r} key)")
    if component is not None and ckpt.get("component") != component:
        raise CheckpointError(f"{path} holds a {ckpt.get('component')!r} component, expected {component!r}")
    return ckpt


def load_checkpoint(path: str | Path, component: str | None = None) -> dict:
    """Load one of our own files and check it is the component it should be."""
    return check_checkpoint(load_file(path), path, component)


WRAPPER_PREFIXES = ("_orig_mod.", "module.")  # torch.compile's, DistributedDataParallel's


def clean_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Strip wrappers' key prefixes (torch.compile's `_orig_mod.`, DDP's `module.`); tensors to CPU copies."""
    out = {}
    for key, value in state_dict.items():
        while key.startswith(WRAPPER_PREFIXES):  # compile(DDP(model)) nests them
            key = key.split(".", 1)[1]
        out[key] = value.detach().to("cpu", copy=True)
    return out


def extract_state_dict(obj: Any, path: str | Path) -> dict[str, torch.Tensor]:
    """The weights inside an mcn file, a bare state_dict, or `{'model_state_dict'|'state_dict': ...}`."""
    if isinstance(obj, dict) and obj.get("format") == CHECKPOINT_FORMAT:
        obj = obj["state_dict"]
    elif isinstance(obj, dict):
        for key in ("model_state_dict", "state_dict"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path} holds no state_dict (tensors by name)")
    return clean_state_dict(obj)


def load_weights(module: nn.Module, state_dict: dict[str, torch.Tensor], path: str | Path, what: str) -> None:
    """load_state_dict with a one-line error naming the first mismatch."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    shapes = [k for k in own if k in state_dict and own[k].shape != state_dict[k].shape]
    if missing or unexpected or shapes:
        if missing:
            detail = f"{len(missing)} missing keys (e.g. {missing[0]})"
        elif unexpected:
            detail = f"{len(unexpected)} unexpected keys (e.g. {unexpected[0]})"
        else:
            detail = (
                f"shape of {shapes[0]} is {list(state_dict[shapes[0]].shape)} in the file, "
                f"{list(own[shapes[0]].shape)} in the model"
            )
        raise CheckpointError(
            f"{path} does not fit the configured {what}: {detail}; check the expert preset and data set"
        )
    module.load_state_dict(state_dict)


# ---------------------------------------------------------------- train state


def save_train_state(path: str | Path, **fields: Any) -> Path:
    return save_torch({"format": TRAIN_STATE_FORMAT, **fields}, path)


def load_train_state(path: str | Path) -> dict:
    state = load_file(path)
    if not isinstance(state, dict) or state.get("format") != TRAIN_STATE_FORMAT:
        found = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(
            f"{path} is not an mcn train state (format {found!r}, expected {TRAIN_STATE_FORMAT!r}); "
            f"delete it or set trainer.resume=never to start over"
        )
    return state


def rng_state(generators: list[torch.Generator]) -> dict:
    """Every random stream a run draws from: torch (CPU and CUDA), numpy, Python, and the loop's own generators."""
    _, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "gauss": float(gauss),
        },
        "python": repr(random.getstate()),  # a tuple of ints: kept as text, parsed back without eval
        "generators": [g.get_state() for g in generators],
    }


def restore_rng(state: dict, generators: list[torch.Generator]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    random.setstate(ast.literal_eval(state["python"]))
    for g, s in zip(generators, state["generators"]):
        g.set_state(s)
