"""Order-preserving top-k selection and token gathering (PyTorch reference)."""

from __future__ import annotations

import torch
from torch import Tensor


def topk_indices_sorted(scores: Tensor, k: int) -> Tensor:
    """Indices of the ``k`` highest ``scores`` ``(B, N)`` per row, ascending → ``(B, k)`` long.

    Ties break towards the lower index so results are deterministic across devices.
    """
    if scores.dim() != 2:
        raise ValueError(f"scores must have shape (B, N), got {tuple(scores.shape)}")
    n = scores.shape[1]
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, {n}], got {k}")
    if k == n:
        return torch.arange(n, device=scores.device).expand(scores.shape[0], n).clone()
    # a stable descending sort gives the lowest-index-wins tie rule that topk does not promise
    order = torch.sort(scores.float(), dim=1, descending=True, stable=True).indices[:, :k]
    return order.sort(dim=1).values


def gather_tokens(x: Tensor, indices: Tensor) -> Tensor:
    """Gather tokens: ``x`` ``(B, N, D)`` at ``indices`` ``(B, M)`` → ``(B, M, D)``."""
    if x.dim() != 3 or indices.dim() != 2 or indices.shape[0] != x.shape[0]:
        raise ValueError(f"expected x (B, N, D) and indices (B, M), got {tuple(x.shape)} and {tuple(indices.shape)}")
    return x.gather(1, indices.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
