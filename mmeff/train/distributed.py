"""The one way mmeff's training loops join a ``torchrun`` job (DDP): NCCL on CUDA, Gloo on CPU."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

__all__ = ["init_distributed"]


def init_distributed() -> tuple[int, int, torch.device]:
    """``(rank, world_size, device)``. Without ``torchrun`` (``WORLD_SIZE`` unset or 1): rank 0 of 1 on
    CUDA when available, else the CPU. Under ``torchrun``: joins (or reuses) the process group and binds
    the rank to its ``LOCAL_RANK`` GPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank = dist.get_rank()
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return rank, world, torch.device("cuda", local)
    return rank, world, torch.device("cpu")
