"""torch.distributed glue: one process group per job (NCCL on CUDA, gloo on CPU), set up from torchrun's env."""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist

# A rank that dies or hangs must end the job, not freeze it: collectives give up after this long.
DEFAULT_TIMEOUT_S = float(os.environ.get("TRAINFORGE_DIST_TIMEOUT", 60))


def env_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", 1))


def setup(device: torch.device) -> tuple[int, int]:
    """Joins the job's process group when launched by torchrun; returns (rank, world_size)."""
    world = env_world_size()
    if world <= 1:
        return 0, 1
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=DEFAULT_TIMEOUT_S))
    return dist.get_rank(), dist.get_world_size()


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()
