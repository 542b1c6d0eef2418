"""Device, precision, thread and speed switches (`trainer.*`), resolved once per job.

`auto` chooses by the hardware. On a GPU: bf16 autocast where the GPU supports it, channels_last, torch.compile,
the fused optimiser, data resident on the device. On a CPU: bf16 autocast only where the processor computes bf16
natively (the CPU flags list AVX512-BF16 or AMX), since elsewhere it is emulated: ~13x slower than fp32 on an
AVX2 EPYC, 0.72x the fp32 training rate on an AVX-512 Xeon without those flags (where oneDNN still reports bf16);
channels_last (1.4x in fp32 on an AVX2 EPYC); no compile (its start-up time dwarfs small models); threads from the
cores and the processes sharing them (`choose_threads`). The numbers are the manual's (docs/how-to/speed.md). The
start line says what was chosen and why (`Runtime.describe`); an explicit setting always wins.
"""

from __future__ import annotations

import contextlib
import os
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mcn import distributed
from mcn.errors import ConfigError

CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")  # /proc/cpuinfo flags of processors with native bf16 arithmetic


def _auto(value, default: bool) -> bool:
    return default if value in (None, "auto") else bool(value)


def _cpu_flags() -> set[str]:
    try:
        return set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return set()


def cpu_bf16() -> tuple[bool, str]:
    """Whether this processor computes bf16 natively, and how that was learnt: its /proc/cpuinfo flags list
    `avx512_bf16` or `amx_bf16`. oneDNN's own query (`torch.ops.mkldnn._is_mkldnn_bf16_supported`) is not asked:
    it also answers yes on AVX-512 processors without those flags, where bf16 is emulated and training measured
    0.72x the fp32 rate (docs/how-to/speed.md). No flags to read: fp32."""
    flags = _cpu_flags()
    if not flags:
        return False, "no /proc/cpuinfo to read the CPU's bf16 flags from"
    found = [f for f in CPU_BF16_FLAGS if f in flags]
    if found:
        return True, f"the CPU flags list {', '.join(found)}"
    return False, "the CPU flags list no avx512_bf16 or amx_bf16: bf16 would be emulated"


def _cores() -> int:
    return distributed.local_cores()  # a name of its own: tests give the thread rule another machine


def local_processes() -> tuple[int, str]:
    """How many processes of this job or sweep share this machine's cores, and who they are: torchrun's
    LOCAL_WORLD_SIZE processes of one job, or a local sweep's jobs (MCN_LOCAL_JOBS, set by its launcher)."""
    torchrun = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    jobs = int(os.environ.get("MCN_LOCAL_JOBS", "1") or 1)
    who = [f"{torchrun} processes" if torchrun > 1 else "", f"{jobs} local sweep jobs" if jobs > 1 else ""]
    return torchrun * jobs, " x ".join(w for w in who if w) or "1 process"


def choose_threads(num_threads) -> tuple[int, str]:
    """CPU threads per process: `trainer.num_threads` when set; under Slurm the cores it gave the task
    (SLURM_CPUS_PER_TASK); else this machine's cores shared evenly by the processes on it, at least one.
    Threads beyond a process's share of the cores slow every process down (docs/how-to/speed.md)."""
    if num_threads not in (None, "auto"):
        if int(num_threads) < 1:
            raise ConfigError(f"trainer.num_threads={num_threads} must be a positive number (or null: automatic)")
        return int(num_threads), "trainer.num_threads"
    slurm = os.environ.get("SLURM_CPUS_PER_TASK", "")
    if slurm.isdigit() and int(slurm) > 0:
        return int(slurm), "SLURM_CPUS_PER_TASK"
    cores = _cores()
    processes, who = local_processes()
    return max(1, cores // processes), f"{cores} cores / {who}"


@dataclass(kw_only=True)
class Runtime:
    device: torch.device
    bf16: bool
    channels_last: bool
    compile: bool
    fused_optimizer: bool
    data_on_device: bool
    dist: distributed.DistInfo = distributed.DistInfo()
    why: str = ""  # how `auto` chose precision and threads, in words (for the start line)

    @classmethod
    def from_config(cls, trainer, cuda_available: bool | None = None, bf16_supported: bool | None = None) -> Runtime:
        """`cuda_available` / `bf16_supported` (native bf16 on the device used) default to what torch sees; tests
        pass them to check both kinds of hardware."""
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
        if cuda:
            native = torch.cuda.is_bf16_supported() if bf16_supported is None else bf16_supported
            found = f"the GPU {'supports' if native else 'does not support'} bf16"
        else:
            native, found = cpu_bf16() if bf16_supported is None else (bf16_supported, "given")
        bf16 = trainer.precision == "bf16" or (trainer.precision == "auto" and native)
        source = f"auto: {found}" if trainer.precision == "auto" else "trainer.precision"
        why = [f"precision {'bf16' if bf16 else 'fp32'} ({source})"]
        if not cuda:
            threads, source = choose_threads(trainer.get("num_threads"))
            torch.set_num_threads(threads)
            why.append(f"{threads} threads ({source})")
        if cuda and torch.cuda.is_available():
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
            torch.backends.cudnn.benchmark = not trainer.get("deterministic", False)
        return cls(
            device=device,
            bf16=bf16,
            channels_last=_auto(trainer.channels_last, True),  # measured faster on GPU and both kinds of CPU
            compile=_auto(trainer.compile, cuda),
            fused_optimizer=_auto(trainer.get("fused_optimizer"), cuda),
            data_on_device=_auto(trainer.get("data_on_device"), True),
            dist=dist,
            why="; ".join(why),
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
            f"processes={self.dist.world_size}" + (f" ({self.why})" if self.why else "")
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
