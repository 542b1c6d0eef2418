"""torch.distributed for multi-GPU and multi-node jobs, ranks read from Slurm's environment.

One process per task (`hydra.launcher.tasks_per_node` x `nodes`); NCCL on GPUs, gloo on CPU.
`trainer.batch_size` is per process (the global batch is batch_size x world size) and the
learning rates are used as given. Only rank 0 writes files and logs progress.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def from_environment() -> DistInfo:
    """torchrun's variables, else Slurm's (one task per process), else a single process."""
    if "WORLD_SIZE" in os.environ and "RANK" in os.environ:
        return DistInfo(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0)))
    if int(os.environ.get("SLURM_NTASKS", "1")) > 1 and "SLURM_PROCID" in os.environ:
        return DistInfo(
            int(os.environ["SLURM_PROCID"]), int(os.environ["SLURM_NTASKS"]), int(os.environ.get("SLURM_LOCALID", 0))
        )
    return DistInfo()


def setup(cuda: bool) -> DistInfo:
    """Join the process group when the job has several tasks; idempotent."""
    info = from_environment()
    if not info.enabled or dist.is_initialized():
        return info
    if "MASTER_ADDR" not in os.environ:  # under Slurm: submitit knows the first node and a free-ish port
        import submitit

        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
    dist.init_process_group("nccl" if cuda else "gloo", rank=info.rank, world_size=info.world_size)
    if info.rank != 0:  # progress is logged once, by rank 0
        logging.getLogger("mcn").setLevel(logging.WARNING)
    return info


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(tensor)
    return tensor


def broadcast_module(modules: list[torch.nn.Module]) -> None:
    """Every process takes rank 0's parameters and buffers of `modules` (in place)."""
    if dist.is_initialized():
        for module in modules:
            for tensor in [*module.parameters(), *module.buffers()]:
                dist.broadcast(tensor.data, src=0)


def any_process(flag: bool, device: torch.device) -> bool:
    """True on every process once one of them says so (stopping on a signal must happen at the same step)."""
    if not dist.is_initialized():
        return flag
    return bool(all_reduce_sum(torch.tensor([float(flag)], device=device)).item())


def cleanup() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def local_cores() -> int:
    """The cores this process may run on (its affinity mask: what a container, taskset or Slurm gives it)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
