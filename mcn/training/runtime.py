"""Device, precision and speed switches (`trainer.*`), resolved once per job.

`auto` picks the fast path on a GPU (bf16 autocast, channels_last, torch.compile, fused optimiser,
data resident on the device) and plain fp32 eager on CPU, where compile time dwarfs tiny models.
"""

from __future__ import annotations

import contextlib
import os
import random
from dataclasses import dataclass

import numpy as np
import torch

from mcn import distributed
from mcn.errors import ConfigError


def _auto(value, default: bool) -> bool:
    return default if value in (None, "auto") else bool(value)


@dataclass(kw_only=True)
class Runtime:
    device: torch.device
    bf16: bool
    channels_last: bool
    compile: bool
    fused_optimizer: bool
    data_on_device: bool
    dist: distributed.DistInfo = distributed.DistInfo()

    @classmethod
    def from_config(cls, trainer, cuda_available: bool | None = None, bf16_supported: bool | None = None) -> Runtime:
        """`cuda_available` / `bf16_supported` default to what torch sees (tests pass them to check GPU defaults)."""
        cuda_available = torch.cuda.is_available() if cuda_available is None else cuda_available
        want = trainer.device
        if want in (None, "auto"):
            want = "cuda" if cuda_available else "cpu"
        if str(want).startswith("cuda") and not cuda_available:
            raise ConfigError(f"trainer.device={want} but no CUDA device is visible; set trainer.device=cpu")
        device = torch.device(want)
        cuda = device.type == "cuda"
        dist = distributed.setup(cuda)
        if cuda and dist.enabled and device.index is None:  # one GPU per process
            device = torch.device("cuda", dist.local_rank)
            torch.cuda.set_device(device)
        if trainer.precision not in ("auto", "bf16", "fp32"):
            raise ConfigError(f"trainer.precision={trainer.precision!r}; use auto, bf16 or fp32")
        if bf16_supported is None:
            bf16_supported = cuda and torch.cuda.is_bf16_supported()
        bf16 = trainer.precision == "bf16" or (trainer.precision == "auto" and cuda and bf16_supported)
        threads = trainer.get("num_threads") or os.environ.get("SLURM_CPUS_PER_TASK")
        if threads and device.type == "cpu":
            torch.set_num_threads(int(threads))
        if cuda and torch.cuda.is_available():
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
            torch.backends.cudnn.benchmark = not trainer.get("deterministic", False)
        return cls(
            device=device,
            bf16=bf16,
            channels_last=_auto(trainer.channels_last, cuda),
            compile=_auto(trainer.compile, cuda),
            fused_optimizer=_auto(trainer.get("fused_optimizer"), cuda),
            data_on_device=_auto(trainer.get("data_on_device"), True),
            dist=dist,
        )

    def autocast(self):
        if not self.bf16:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    def prepare(self, model: torch.nn.Module, *, frozen: bool = False) -> torch.nn.Module:
        """Move to the device (channels_last if asked); returns the module to call: wrapped in
        DistributedDataParallel when the job has several processes (unless `frozen`: nothing to synchronise),
        compiled if asked."""
        model.to(self.device)
        if self.channels_last:
            model.to(memory_format=torch.channels_last)
        if self.dist.enabled and not frozen:
            from torch.nn.parallel import DistributedDataParallel

            model = DistributedDataParallel(
                model, device_ids=[self.device.index] if self.device.type == "cuda" else None
            )
        return torch.compile(model) if self.compile else model

    def describe(self) -> str:
        return (
            f"device={self.device} bf16={self.bf16} channels_last={self.channels_last} compile={self.compile} "
            f"fused_optimizer={self.fused_optimizer} data_on_device={self.data_on_device} "
            f"threads={torch.get_num_threads()} "
            f"processes={self.dist.world_size}"
        )


def stream_seeds(seed: int, *job: int, streams: int) -> list[int]:
    """Independent seeds for a job's random streams (initialisation, batch order, augmentation), derived from
    the run's `seed` and what identifies the job (stage, expert index): expert i of seed s never shares a stream
    with expert i+1 of seed s-1, as `seed + i` would make it."""
    return [int(s.generate_state(1)[0]) for s in np.random.SeedSequence([seed, *job]).spawn(streams)]


def seed_everything(seed: int, *, deterministic: bool = False) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
