"""Where a process of an mmeff training run stands in a distributed job (``torchrun`` or ``accelerate
launch``): accelerate's ``PartialState`` joins the process group (NCCL on CUDA, Gloo on CPU), the same state
the training loop's ``Accelerator`` (:func:`mmeff.train.loop.train_steps`) then uses. Trainers that need the
rank before the loop starts (to save only on rank 0, to size their data per rank) ask here."""

from __future__ import annotations

import torch

__all__ = ["init_distributed"]


def init_distributed() -> tuple[int, int, torch.device]:
    """``(rank, world_size, device)``. Without ``torchrun`` (``WORLD_SIZE`` unset or 1): rank 0 of 1 on
    CUDA when available, else the CPU. Under ``torchrun`` / ``accelerate launch``: joins (or reuses) the
    process group and binds the rank to its ``LOCAL_RANK`` GPU."""
    from accelerate.state import PartialState

    # cpu=True without CUDA: accelerate only treats a CPU job as distributed (Gloo) when told it runs on CPU
    state = PartialState(cpu=not torch.cuda.is_available())
    if state.num_processes <= 1:
        return 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return state.process_index, state.num_processes, state.device
