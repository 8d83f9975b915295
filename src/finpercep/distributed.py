"""Data-parallel helpers shared by the reward-model and the RL training loops.

Runs launched by ``torchrun`` (which sets ``WORLD_SIZE`` and ``MASTER_ADDR``) join a process group:
NCCL on CUDA devices, gloo on CPU. Without ``torchrun`` everything is a no-op on one process.
"""

from __future__ import annotations

import os
from typing import Iterable

import torch
import torch.distributed as dist


def dist_info() -> tuple[int, int]:
    """``(rank, world_size)``; ``(0, 1)`` outside a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_distributed(device: str) -> None:
    """Join the process group when launched by ``torchrun``, even with one process, so a 1-GPU
    torchrun goes through the same code path as many."""
    if "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ and not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")


def local_device(device: str) -> str:
    """The device of this process: ``cuda:<LOCAL_RANK>`` for a CUDA run under torchrun."""
    if device.startswith("cuda") and dist.is_available() and dist.is_initialized():
        rank = dist.get_rank()
        return f"cuda:{int(os.environ.get('LOCAL_RANK', rank)) % torch.cuda.device_count()}"
    return device


def barrier() -> None:
    if dist_info()[1] > 1:
        dist.barrier()


def average_gradients(params: Iterable[torch.nn.Parameter]) -> None:
    """All-reduce and average the gradients of ``params`` over the process group (what DDP does,
    done by hand so it works whichever policy method produced the gradients: ``forward``,
    ``sample``, ``step_log_prob``). A parameter without a gradient counts as zero."""
    world = dist_info()[1]
    if world == 1:
        return
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad)
        p.grad /= world


def all_reduce_mean(values: torch.Tensor) -> torch.Tensor:
    """The mean of ``values`` over the process group (for logging)."""
    world = dist_info()[1]
    if world > 1:
        values = values.clone()
        dist.all_reduce(values)
        values /= world
    return values


def destroy(sync: bool = True) -> None:
    """Leave the process group. ``sync``: wait for every process first, so none exits while
    another still talks to it (on an error path, pass False: the others may never arrive)."""
    if dist.is_available() and dist.is_initialized():
        if sync and dist.get_world_size() > 1:
            dist.barrier()
        dist.destroy_process_group()
