"""ToMe-compatible token merging (bipartite soft matching) with a Triton merge kernel.

:func:`bipartite_soft_matching` decides, from a metric ``(B, N, C)``, which ``r`` tokens of the
alternate set A (even indices) are merged into their most similar token of set B (odd indices), and
returns ``merge`` / ``unmerge`` closures. The output order is ``[unmerged A (original order), B]``, so a
CLS token at index 0 stays first; with ``prefix=P`` all P protected tokens (class, registers,
distillation) come first in their original order.

The reduction inside ``merge`` (each output row = its base token, plus the A tokens merged into it,
summed or averaged) runs as a Triton kernel for CUDA tensors and as the PyTorch ``scatter_reduce``
reference elsewhere (see :mod:`mmeff.kernels.dispatch`). The kernel is gather-based (one program per
output row, sources in a CSR list), so it needs no atomics and is deterministic.

Differences from ToMe's reference code: the matching scores are computed in fp32 (metrics in fp16/bf16
are upcast), the metric norm is clamped away from zero, and ties in the top-r selection break towards
the lower A index (stable sort), so results are deterministic; the unmerged A tokens always keep their
original order by default (ToMe sorts them only when there is a class token and otherwise leaves them in
score order), so on models without a class token later blocks pair tokens differently from the official
code: mmeff keeps the alternating A/B split spatial instead of reshuffling it by similarity.
``faithful=True`` reproduces the official order.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from mmeff.kernels.dispatch import SUPPORTED_DTYPES, lazy_jit, next_pow2, use_triton

try:  # triton is optional: CPU-only installs use the PyTorch reference
    import triton
    import triton.language as tl

    _HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised only without triton
    _HAS_TRITON = False

__all__ = [
    "bipartite_soft_matching",
    "merge_wavg",
    "merge_source",
    "proportional_attention_bias",
    "MergeFn",
    "UnmergeFn",
]

MergeFn = Callable[..., Tensor]
UnmergeFn = Callable[[Tensor], Tensor]

_MODES = ("sum", "mean")


def _identity_merge(x: Tensor, mode: str = "mean") -> Tensor:
    if mode not in _MODES:
        raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")
    return x


def _identity_unmerge(x: Tensor) -> Tensor:
    return x


@dataclass(frozen=True)
class _MergePlan:
    """Index bookkeeping shared by every ``merge`` / ``unmerge`` call of one matching.

    All index tensors are int64 on the metric's device. ``n`` original tokens, ``n_out = n - r`` outputs.
    """

    n: int
    r: int
    unm_a: Tensor  # (B, nA - r) A-local indices of unmerged A tokens (ascending unless faithful, unprotected)
    src_a: Tensor  # (B, r) A-local indices of merged A tokens
    dst_b: Tensor  # (B, r) B-local destination of each merged A token
    base: Tensor  # (B, n_out) original token index that each output row starts from
    offsets: Tensor  # (B, n_out + 1) CSR offsets into ``extra`` per output row
    extra: Tensor  # (B, r) original token indices of merged A tokens, grouped by output row
    inverse: Tensor  # (B, n) output row that holds each original token
    perm: Tensor | None  # (B, n_out) rows of ``[unm A, B]`` in output order (prefix first), None = as is


def _build_plan(unm_a: Tensor, src_a: Tensor, dst_b: Tensor, n: int, prefix: int = 0) -> _MergePlan:
    bsz, r = src_a.shape
    n_unm = unm_a.shape[1]
    n_b = n // 2
    dev = unm_a.device
    n_out = n_unm + n_b
    b_orig = (2 * torch.arange(n_b, device=dev) + 1).expand(bsz, n_b)
    base = torch.cat([2 * unm_a, b_orig], dim=1)
    out_rows = torch.arange(n_out, device=dev).expand(bsz, n_out)
    perm = None
    dst_row = n_unm + dst_b
    if prefix > 1:
        # protected tokens 1, 3, .. sit in B: move every protected token to the front, in original order
        key = torch.where(base < prefix, base - n, out_rows)
        perm = key.argsort(dim=1)
        base = base.gather(1, perm)
        new_row = torch.empty_like(perm).scatter_(1, perm, out_rows)
        dst_row = new_row.gather(1, dst_row)
    # CSR: sources grouped by destination row (stable, so each group keeps ascending score rank order)
    order = torch.sort(dst_row, dim=1, stable=True).indices
    extra = (2 * src_a).gather(1, order)
    counts = torch.zeros(bsz, n_out, dtype=torch.long, device=dev)
    counts.scatter_add_(1, dst_row, torch.ones_like(dst_row))
    offsets = torch.cat([torch.zeros(bsz, 1, dtype=torch.long, device=dev), counts.cumsum(1)], dim=1)
    inverse = torch.empty(bsz, n, dtype=torch.long, device=dev)
    inverse.scatter_(1, base, out_rows)
    inverse.scatter_(1, 2 * src_a, dst_row)
    return _MergePlan(n, r, unm_a, src_a, dst_b, base, offsets.contiguous(), extra.contiguous(), inverse, perm)


def bipartite_soft_matching(
    metric: Tensor,
    r: int,
    class_token: bool = False,
    distill_token: bool = False,
    prefix: int = 0,
    faithful: bool = False,
) -> tuple[MergeFn, UnmergeFn]:
    """ToMe bipartite soft matching on ``metric`` ``(B, N, C)``; merges ``r`` tokens.

    A = even token indices, B = odd. Each A token picks its most cosine-similar B token; the ``r`` A
    tokens with the highest similarity are merged into their match. A CLS token (index 0, in A) is never
    merged away; nothing is merged into a distillation token (index 1, in B). ``prefix=P`` protects
    the first P tokens both ways (class, register and distillation tokens of current ViTs): none of
    them is merged away and nothing is merged into them. ``r`` is clamped to ``(N - protected) // 2``.

    Returns ``(merge, unmerge)``:

    * ``merge(x (B, N, D), mode="mean"|"sum") -> (B, N - r, D)``, rows ``[unmerged A in original order, B]``
      (with ``prefix > 1`` the protected tokens come first, in their original order, then the rest so);
    * ``unmerge(x (B, N - r, D)) -> (B, N, D)``: every original token gets the value of the row it went to.

    ``faithful=True`` orders the unmerged A tokens as ToMe's official code does: ascending only when a token
    is protected (its ``class_token``), otherwise in descending score order, which changes how the next
    block splits A and B on class-token-free towers (SigLIP-style).

    With ``r <= 0`` (after clamping) both are identities.
    """
    if metric.dim() != 3:
        raise ValueError(f"metric must have shape (B, N, C), got {tuple(metric.shape)}")
    n = metric.shape[1]
    if prefix < 0:
        raise ValueError(f"prefix must be >= 0, got {prefix}")
    protected = max(int(class_token) + int(distill_token), int(prefix))
    r = min(int(r), (n - protected) // 2)
    if r <= 0:
        return _identity_merge, _identity_unmerge

    with torch.no_grad():
        m = metric.float()
        m = m / m.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        a, b = m[:, ::2, :], m[:, 1::2, :]
        scores = a @ b.transpose(-1, -2)  # (B, nA, nB)
        if class_token:
            scores[:, 0, :] = -torch.inf
        if distill_token:
            scores[:, :, 0] = -torch.inf
        if prefix:
            scores[:, : (prefix + 1) // 2, :] = -torch.inf  # A tokens 0, 2, .. below prefix
            scores[:, :, : prefix // 2] = -torch.inf  # B tokens 1, 3, .. below prefix
        node_max, node_idx = scores.max(dim=-1)  # (B, nA)
        edge_idx = torch.sort(node_max, dim=-1, descending=True, stable=True).indices
        src_a = edge_idx[:, :r]
        unm_a = edge_idx[:, r:]
        if not faithful or protected:
            unm_a = unm_a.sort(dim=-1).values
        dst_b = node_idx.gather(1, src_a)
        plan = _build_plan(unm_a, src_a, dst_b, n, prefix)

    def merge(x: Tensor, mode: str = "mean") -> Tensor:
        """``(B, N, D)`` → ``(B, N - r, D)``; ``mode`` "mean" or "sum" over each merged group."""
        return _merge_apply(x, plan, mode)

    def unmerge(x: Tensor) -> Tensor:
        """``(B, N - r, D)`` → ``(B, N, D)``; merged tokens copy their destination's value."""
        if x.dim() != 3 or x.shape[1] != plan.n - plan.r:
            raise ValueError(f"unmerge expects (B, {plan.n - plan.r}, D), got {tuple(x.shape)}")
        return x.gather(1, plan.inverse.unsqueeze(-1).expand(-1, -1, x.shape[-1]))

    return merge, unmerge


def _merge_apply(x: Tensor, plan: _MergePlan, mode: str) -> Tensor:
    if mode not in _MODES:
        raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")
    if x.dim() != 3 or x.shape[1] != plan.n or x.shape[0] != plan.base.shape[0]:
        raise ValueError(f"merge expects (B={plan.base.shape[0]}, N={plan.n}, D), got {tuple(x.shape)}")
    needs_grad = torch.is_grad_enabled() and x.requires_grad
    if (
        _HAS_TRITON
        and not needs_grad
        and x.dtype in SUPPORTED_DTYPES
        and x.numel() > 0
        and use_triton(x, plan.base)
    ):
        return _merge_triton(x, plan, mode)
    return _merge_reference(x, plan, mode)


def _merge_reference(x: Tensor, plan: _MergePlan, mode: str) -> Tensor:
    """ToMe's gather + ``scatter_reduce`` formulation (PyTorch reference)."""
    d = x.shape[-1]
    a, b = x[:, ::2, :], x[:, 1::2, :]
    unm = a.gather(1, plan.unm_a.unsqueeze(-1).expand(-1, -1, d))
    src = a.gather(1, plan.src_a.unsqueeze(-1).expand(-1, -1, d))
    dst = b.scatter_reduce(1, plan.dst_b.unsqueeze(-1).expand(-1, -1, d), src, reduce=mode, include_self=True)
    out = torch.cat([unm, dst], dim=1)
    if plan.perm is not None:
        out = out.gather(1, plan.perm.unsqueeze(-1).expand(-1, -1, d))
    return out


# --------------------------------------------------------------------------------------------- Triton

if _HAS_TRITON:

    def _merge_kernel(
        x_ptr,
        base_ptr,
        off_ptr,
        extra_ptr,
        out_ptr,
        N_OUT,
        R,
        D,
        sxb,
        sxn,
        sob,
        son,
        MEAN: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        """One program = (batch b, output row j) × d-block.

        ``out[b, j] = x[b, base[b, j]] + Σ_{t ∈ [off[b, j], off[b, j+1])} x[b, extra[b, t]]``
        (divided by the group size when ``MEAN``), accumulated in fp32.
        """
        pid = tl.program_id(0)
        pid_d = tl.program_id(1)
        b = pid // N_OUT
        j = pid % N_OUT
        offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
        mask_d = offs_d < D

        x_base = x_ptr + b.to(tl.int64) * sxb
        row = tl.load(base_ptr + b * N_OUT + j)
        acc = tl.load(x_base + row * sxn + offs_d, mask=mask_d, other=0.0).to(tl.float32)
        start = tl.load(off_ptr + b * (N_OUT + 1) + j)
        end = tl.load(off_ptr + b * (N_OUT + 1) + j + 1)
        for t in range(start, end):
            src = tl.load(extra_ptr + b * R + t)
            acc += tl.load(x_base + src * sxn + offs_d, mask=mask_d, other=0.0).to(tl.float32)
        if MEAN:
            acc = acc / (end - start + 1).to(tl.float32)
        out_ptrs = out_ptr + b.to(tl.int64) * sob + j * son + offs_d
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask_d)


def _merge_triton(x: Tensor, plan: _MergePlan, mode: str) -> Tensor:
    """Launch :func:`_merge_kernel` for ``x`` ``(B, N, D)`` → ``(B, N - r, D)``."""
    x = x.contiguous()
    bsz, _, d = x.shape
    n_out = plan.base.shape[1]
    out = torch.empty((bsz, n_out, d), device=x.device, dtype=x.dtype)
    block_d = min(max(16, next_pow2(d)), 256)
    grid = (bsz * n_out, triton.cdiv(d, block_d))
    lazy_jit(_merge_kernel)[grid](
        x,
        plan.base.contiguous(),
        plan.offsets,
        plan.extra,
        out,
        n_out,
        plan.r,
        d,
        x.stride(0),
        x.stride(1),
        out.stride(0),
        out.stride(1),
        MEAN=mode == "mean",
        BLOCK_D=block_d,
        num_warps=4 if block_d >= 128 else 1,
    )
    return out


# --------------------------------------------------------------------------------------------- helpers


def merge_wavg(merge: MergeFn, x: Tensor, size: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Size-weighted average merge: ``x`` ``(B, N, D)``, ``size`` ``(B, N, 1)`` (default ones).

    Returns ``(x (B, N - r, D), size (B, N - r, 1))`` with ``x = merge(x·size, "sum") / merge(size, "sum")``.
    """
    if size is None:
        size = torch.ones_like(x[..., :1])
    x = merge(x * size, mode="sum")
    size = merge(size, mode="sum")
    return x / size, size


def merge_source(merge: MergeFn, x: Tensor, source: Tensor | None = None) -> Tensor:
    """Track which original tokens each merged token holds (ToMe's ``trace_source``).

    ``source`` ``(B, N, N_orig)`` one-hot rows (default: identity ``(B, N, N)`` built from ``x`` ``(B, N, D)``);
    returns ``(B, N - r, N_orig)`` where row ``j`` marks every original token merged into output ``j``.
    """
    if source is None:
        bsz, n = x.shape[0], x.shape[1]
        source = torch.eye(n, device=x.device, dtype=x.dtype).unsqueeze(0).expand(bsz, n, n)
    return merge(source, mode="sum")


def proportional_attention_bias(size: Tensor) -> Tensor:
    """``log(size)`` of ``size`` ``(B, N, 1)`` as ``(B, 1, 1, N)``, added to attention logits ``(B, H, N, N)``."""
    if size.dim() != 3 or size.shape[-1] != 1:
        raise ValueError(f"size must have shape (B, N, 1), got {tuple(size.shape)}")
    return size.log()[:, None, None, :, 0]
