"""Self-describing checkpoint files, written atomically and loaded without running code.

Every file is one dict: `format`, `component` (expert | fusion | global_head | complete),
`epoch`, `architecture` (what rebuilds the module), `metrics`, `config` (the resolved run
config) and `state_dict`. Files are loaded with `torch.load(weights_only=True)`, so a file that
would need arbitrary unpickling is refused instead of executed.
"""
from __future__ import annotations

import ast
import os
import pickle
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from mcn import distributed
from mcn.errors import CheckpointError

FORMAT = "mcn-checkpoint-v1"


def atomic_save(obj: Any, path: str | Path) -> Path:
    """torch.save to a temporary name, then rename: a kill leaves the previous file intact.
    Only rank 0 of a multi-process job writes."""
    path = Path(path)
    if not distributed.is_main():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)
    return path


def clean_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Strip wrappers' key prefixes (torch.compile's `_orig_mod.`, DDP's `module.`); tensors to CPU copies."""
    out = {}
    for key, value in state_dict.items():
        for prefix in ("_orig_mod.", "module."):
            key = key.replace(prefix, "")
        out[key] = value.detach().to("cpu", copy=True)
    return out


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
            raise CheckpointError(f"refused to load {path}: it needs arbitrary unpickling, which could run code ({needs[0]})") from None
        raise CheckpointError(f"cannot read {path}: truncated or not a PyTorch checkpoint (bad pickle); delete or replace it") from None
    except (RuntimeError, EOFError, OSError, ValueError, KeyError) as e:
        raise CheckpointError(f"cannot read {path}: truncated or not a PyTorch checkpoint ({type(e).__name__}); delete or replace it") from None


def load_checkpoint(path: str | Path, component: str | None = None) -> dict:
    """Load one of our own files and check it is the component it should be."""
    return check_checkpoint(load_file(path), path, component)


def check_checkpoint(ckpt: Any, path: str | Path, component: str | None = None) -> dict:
    """`ckpt` (loaded from `path`) must be one of our files, holding `component` when one is named."""
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not an mcn checkpoint (no format={FORMAT!r} key)")
    if component is not None and ckpt.get("component") != component:
        raise CheckpointError(f"{path} holds a {ckpt.get('component')!r} component, expected {component!r}")
    return ckpt


def make_checkpoint(component: str, module: nn.Module, architecture: dict, epoch: int, **fields: Any) -> dict:
    return {"format": FORMAT, "component": component, "epoch": epoch, "architecture": architecture,
            "state_dict": clean_state_dict(module.state_dict()), **fields}


def extract_state_dict(obj: Any, path: str | Path) -> dict[str, torch.Tensor]:
    """The weights inside an mcn file, a bare state_dict, or `{'model_state_dict'|'state_dict': ...}`."""
    if isinstance(obj, dict) and obj.get("format") == FORMAT:
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
        detail = (f"{len(missing)} missing keys (e.g. {missing[0]})" if missing else
                  f"{len(unexpected)} unexpected keys (e.g. {unexpected[0]})" if unexpected else
                  f"shape of {shapes[0]} is {list(state_dict[shapes[0]].shape)} in the file, {list(own[shapes[0]].shape)} in the model")
        raise CheckpointError(f"{path} does not fit the configured {what}: {detail}; check the expert preset and data set")
    module.load_state_dict(state_dict)


def rng_state(generators: list[torch.Generator]) -> dict:
    """Every random stream a run draws from: torch (CPU and CUDA), numpy, Python, and the loop's own generators."""
    _, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss), "gauss": float(gauss)},
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
