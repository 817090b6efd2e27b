"""Order-preserving top-k selection, token gathering and pruning (PyTorch reference + Triton kernel).

:func:`gather_tokens` and :func:`prune` dispatch through :func:`mmeff.kernels.dispatch.use_triton`: CUDA
tensors use the Triton row-gather kernel, everything else the PyTorch reference :func:`gather_tokens_ref`
(``MMEFF_KERNELS=torch|triton`` forces one; on CPU Triton needs ``TRITON_INTERPRET=1``). The Triton path
reads ``x`` through its strides (no copy for non-contiguous views), accepts int32 or int64 indices and is
differentiable (its backward is a scatter-add in PyTorch).
"""

from __future__ import annotations

import torch
from torch import Tensor

from mmeff.kernels.dispatch import lazy_jit, use_triton

try:  # triton is optional: CPU-only installs use the PyTorch reference
    import triton
    import triton.language as tl

    _HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised only without triton
    _HAS_TRITON = False

__all__ = ["topk_indices_sorted", "gather_tokens", "gather_tokens_ref", "prune"]

_INDEX_DTYPES = (torch.int64, torch.int32)
# dtypes the Triton kernel copies (it only loads and stores); anything else (bool, complex) uses the reference
_TRITON_DTYPES = (
    torch.float32,
    torch.float16,
    torch.bfloat16,
    torch.float64,
    torch.int64,
    torch.int32,
    torch.int16,
    torch.int8,
    torch.uint8,
)


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


def _check_gather_args(x: Tensor, indices: Tensor) -> None:
    if not isinstance(x, Tensor) or not isinstance(indices, Tensor):
        raise TypeError(f"x and indices must be tensors, got {type(x).__name__} and {type(indices).__name__}")
    if indices.dtype not in _INDEX_DTYPES:
        raise TypeError(f"indices must be int64 or int32, got {indices.dtype}")
    if x.dim() != 3 or indices.dim() != 2 or indices.shape[0] != x.shape[0]:
        raise ValueError(
            f"expected x (B, N, D) and indices (B, M), got {tuple(x.shape)} and {tuple(indices.shape)}"
        )
    if x.device != indices.device:
        raise ValueError(f"x and indices must be on the same device, got {x.device} and {indices.device}")


def gather_tokens_ref(x: Tensor, indices: Tensor) -> Tensor:
    """PyTorch reference gather: ``x`` ``(B, N, D)`` at ``indices`` ``(B, M)`` int64/int32 → ``(B, M, D)``."""
    _check_gather_args(x, indices)
    return x.gather(1, indices.long().unsqueeze(-1).expand(-1, -1, x.shape[-1]))


if _HAS_TRITON:

    def _gather_rows_kernel(
        x_ptr,
        idx_ptr,
        out_ptr,
        N,
        M,
        D,
        stride_xb,
        stride_xn,
        stride_xd,
        stride_ib,
        stride_im,
        stride_ob,
        stride_om,
        BLOCK_M: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        """One program per (batch ``b``, block of ``BLOCK_M`` output rows); loops over ``D``.

        JIT-wrapped lazily by :func:`mmeff.kernels.dispatch.lazy_jit`.
        """
        pid_b = tl.program_id(0)
        pid_m = tl.program_id(1)
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < M
        b = pid_b.to(tl.int64)
        idx = tl.load(idx_ptr + b * stride_ib + rows.to(tl.int64) * stride_im, mask=row_ok, other=0)
        idx = idx.to(tl.int64)
        # out-of-range indices never touch memory (their rows come out as zeros); the host checks on CPU
        row_ok = row_ok & (idx >= 0) & (idx < N)
        src_row = x_ptr + b * stride_xb + idx * stride_xn  # (BLOCK_M,)
        dst_row = out_ptr + b * stride_ob + rows.to(tl.int64) * stride_om
        cols = tl.arange(0, BLOCK_D)
        for d0 in range(0, D, BLOCK_D):
            c = d0 + cols
            mask = row_ok[:, None] & (c < D)[None, :]
            vals = tl.load(src_row[:, None] + c.to(tl.int64)[None, :] * stride_xd, mask=mask, other=0)
            store_mask = (rows < M)[:, None] & (c < D)[None, :]
            tl.store(dst_row[:, None] + c[None, :], vals, mask=store_mask)


def _gather_triton(x: Tensor, indices: Tensor) -> Tensor:
    b, n, d = x.shape
    m = indices.shape[1]
    out = torch.empty((b, m, d), dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    block_d = min(triton.next_power_of_2(d), 256)
    block_m = max(1, min(triton.next_power_of_2(m), 4096 // block_d, 64))
    grid = (b, triton.cdiv(m, block_m))
    lazy_jit(_gather_rows_kernel)[grid](
        x,
        indices,
        out,
        n,
        m,
        d,
        x.stride(0),
        x.stride(1),
        x.stride(2),
        indices.stride(0),
        indices.stride(1),
        out.stride(0),
        out.stride(1),
        BLOCK_M=block_m,
        BLOCK_D=block_d,
    )
    return out


class _GatherRows(torch.autograd.Function):
    """Triton forward, scatter-add backward (so the CUDA path stays differentiable in ``x``)."""

    @staticmethod
    def forward(ctx, x: Tensor, indices: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(indices)
        ctx.x_shape = x.shape
        return _gather_triton(x, indices)

    @staticmethod
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        (indices,) = ctx.saved_tensors
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_out.new_zeros(ctx.x_shape)
            grad_x.scatter_add_(1, indices.long().unsqueeze(-1).expand(-1, -1, grad_out.shape[-1]), grad_out)
        return grad_x, None


def gather_tokens(x: Tensor, indices: Tensor) -> Tensor:
    """Gather tokens: ``x`` ``(B, N, D)`` at ``indices`` ``(B, M)`` int64/int32 → ``(B, M, D)``.

    Dispatches to the Triton kernel when :func:`~mmeff.kernels.dispatch.use_triton` says so (and the
    dtype is one the kernel copies), else to :func:`gather_tokens_ref`. Indices must lie in ``[0, N)``.
    """
    _check_gather_args(x, indices)
    if not (_HAS_TRITON and use_triton(x, indices)) or x.dtype not in _TRITON_DTYPES:
        return gather_tokens_ref(x, indices)
    if not x.is_cuda and indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= x.shape[1]):
        # skipped on CUDA to avoid a host sync: there the kernel writes zeros for out-of-range rows instead
        raise IndexError(
            f"indices must lie in [0, {x.shape[1]}), got range [{int(indices.min())}, {int(indices.max())}]"
        )
    if x.requires_grad and torch.is_grad_enabled():
        return _GatherRows.apply(x, indices)
    return _gather_triton(x, indices)


def prune(x: Tensor, scores: Tensor, k: int, *side: Tensor) -> tuple[Tensor, ...]:
    """Order-preserving top-k prune: keep the ``k`` highest-``scores`` tokens of every row, in input order.

    ``x`` ``(B, N, D)``, ``scores`` ``(B, N)``, each ``side`` tensor ``(B, N)`` or ``(B, N, C)`` (position
    ids, token sizes, ...) → ``(x_kept (B, k, D), indices (B, k) long, *side_kept (B, k) / (B, k, C))``.
    Ties in ``scores`` break towards the lower index (see :func:`topk_indices_sorted`).
    """
    if not isinstance(x, Tensor) or x.dim() != 3:
        raise ValueError(f"x must be a (B, N, D) tensor, got {getattr(x, 'shape', type(x).__name__)}")
    if not isinstance(scores, Tensor) or tuple(scores.shape) != tuple(x.shape[:2]):
        raise ValueError(
            f"scores must have shape (B, N) = {tuple(x.shape[:2])}, got "
            f"{tuple(scores.shape) if isinstance(scores, Tensor) else type(scores).__name__}"
        )
    for i, s in enumerate(side):
        if not isinstance(s, Tensor) or s.dim() not in (2, 3) or tuple(s.shape[:2]) != tuple(x.shape[:2]):
            raise ValueError(
                f"side tensor {i} must have shape (B, N) or (B, N, C) with (B, N) = {tuple(x.shape[:2])}, "
                f"got {tuple(s.shape) if isinstance(s, Tensor) else type(s).__name__}"
            )
    indices = topk_indices_sorted(scores, k).to(x.device)
    kept = [gather_tokens(x, indices)]
    for s in side:
        idx = indices if s.device == indices.device else indices.to(s.device)
        if s.dim() == 2:
            kept.append(gather_tokens(s.unsqueeze(-1), idx).squeeze(-1))
        else:
            kept.append(gather_tokens(s, idx))
    return (kept[0], indices, *kept[1:])
