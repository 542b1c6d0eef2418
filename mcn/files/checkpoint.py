"""The two file formats a training run writes.

- a **checkpoint** is one self-describing dict: `format`, `component` (expert | fusion | global_head |
  complete), `epoch`, `architecture` (what rebuilds the module: the module's own `architecture`, recorded by
  its builder), `metrics`, `config` (the resolved run config) and `state_dict`;
- the **train state** (`train_state.pth`) holds everything a resumed run needs: model, optimiser,
  scheduler, epoch, best so far, every RNG stream, and the config it was written with.
"""

from __future__ import annotations

import ast
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from mcn.errors import CheckpointError
from mcn.files.io import load_file, save_torch

CHECKPOINT_FORMAT = "mcn-checkpoint-v1"
TRAIN_STATE_FORMAT = "mcn-train-state-v1"


def make_checkpoint(component: str, module: nn.Module, epoch: int, **fields: Any) -> dict:
    """The checkpoint dict of `module`, whose builder recorded its `architecture` (what rebuilds it)."""
    return {
        "format": CHECKPOINT_FORMAT,
        "component": component,
        "epoch": epoch,
        "architecture": module.architecture,
        "state_dict": clean_state_dict(module.state_dict()),
        **fields,
    }


def save_component(path: str | Path, component: str, module: nn.Module, epoch: int, **fields: Any) -> Path:
    """Save one component (expert | fusion | global_head | complete) as a self-describing checkpoint, atomically."""
    return save_torch(make_checkpoint(component, module, epoch, **fields), path)


def check_checkpoint(ckpt: Any, path: str | Path, component: str | None = None) -> dict:
    """`ckpt` (loaded from `path`) must be one of our files, holding `component` when one is named."""
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is not an mcn checkpoint (no format={CHECKPOINT_FORMAT!r} key)")
    if component is not None and ckpt.get("component") != component:
        raise CheckpointError(
            f"{path} holds a {ckpt.get('component')!r} component, expected {component!r}; pass a file of that "
            f"component instead"
        )
    return ckpt


def load_checkpoint(path: str | Path, component: str | None = None) -> dict:
    """Load one of our own files and check it is the component it should be."""
    return check_checkpoint(load_file(path), path, component)


def load_expert_file(path: str | Path, trust_pickle: bool) -> Any:
    """A pretrained expert's file as it is, mcn's or other code's (checked by the caller). `trust_pickle` is the
    config's `experts.trust_pickle`: a file holding objects the safe loader does not build is refused with one line
    naming that key, or, when true, unpickled in full (`load_file`)."""
    return load_file(path, trusted=trust_pickle, refused_fix="if you trust the file, set experts.trust_pickle=true")


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
    """The weights inside an mcn file, a bare state_dict, `{'model_state_dict'|'state_dict': ...}`, or a whole module
    (`torch.save(model)`, which only a trusted full unpickling builds)."""
    if isinstance(obj, nn.Module):
        obj = obj.state_dict()
    elif isinstance(obj, dict) and obj.get("format") == CHECKPOINT_FORMAT:
        obj = obj["state_dict"]
    elif isinstance(obj, dict):
        for key in ("model_state_dict", "state_dict"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path} holds no state_dict (tensors by name)")
    return clean_state_dict(obj)


def upgrade_state_dict(module: nn.Module, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state_dict` with keys saved under an earlier name renamed to today's: a submodule lists its renames in
    `renamed_keys` ({old: new}), so files written before a rename still load."""
    out = dict(state_dict)
    for prefix, sub in module.named_modules():
        for old, new in getattr(sub, "renamed_keys", {}).items():
            key = f"{prefix}.{old}" if prefix else old
            if key in out:
                out[f"{prefix}.{new}" if prefix else new] = out.pop(key)
    return out


def load_weights(module: nn.Module, state_dict: dict[str, torch.Tensor], path: str | Path, what: str) -> None:
    """load_state_dict with a one-line error naming the first mismatch."""
    state_dict = upgrade_state_dict(module, state_dict)
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
