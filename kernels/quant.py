"""FlatQuant-style W4A4 primitives: Kronecker transform, per-token int4 quantisation, packing, int4 GEMM.

FlatQuant replaces a ``d×d`` transform by a Kronecker product ``P1 ⊗ P2`` with ``d = n1·n2``
(:func:`kron_factors`), so an activation row ``x`` becomes ``vec(P1ᵀ X P2)`` with ``X = x.view(n1, n2)``
(:func:`kron_transform`, equal to ``x @ kron(P1, P2)``). The transformed row is then clipped by a learned
ratio (LAC), quantised symmetrically per token and two int4 codes are packed per byte.
:func:`kron_transform_quant` fuses all of that into one Triton kernel (one program per token);
:func:`int4_matmul` multiplies packed activations by packed weights with exact integer accumulation.

Numerics shared by the PyTorch reference and the Triton kernels, so that both give the same codes:

- everything after the input load is fp32; ``scale = max((clip · amax|y|) / qmax, 1e-8)`` with
  ``qmax = 2**(bits-1) - 1``, each step one correctly-rounded fp32 operation;
- codes are ``clamp(round_half_even(y / scale), -qmax-1, qmax)``: ``torch.round`` in the reference; the
  Triton kernel clamps first (same result: the bounds are integers) and rounds with the fp32
  ``(v + 1.5·2²³) - 1.5·2²³`` trick, because libdevice ``rint`` is an extern call that the Triton interpreter
  cannot run;
- packing: element ``2j`` goes to the low nibble of byte ``j``, element ``2j+1`` to the high nibble, both as
  two's-complement nibbles.
"""

from __future__ import annotations

import math

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
    "kron_factors",
    "kron_transform",
    "quantize_sym_per_token_ref",
    "pack_int4",
    "unpack_int4",
    "kron_transform_quant",
    "int4_matmul",
]

#: Lower bound on a per-token scale, so an all-zero token quantises to zeros instead of dividing by 0.
SCALE_EPS = 1e-8

# 1.5 * 2**23: adding it puts any |v| < 2**22 in the fp32 binade whose spacing is 1, so the hardware's
# round-to-nearest-even does the rounding and subtracting it back is exact
_RNE_MAGIC = 12582912.0


# --------------------------------------------------------------------------------------------- helpers


def kron_factors(d: int) -> tuple[int, int]:
    """FlatQuant's split ``d = n1 · n2`` (official ``get_decompose_dim``), ``n1 <= n2``.

    The official code writes ``d = (a - b)(a + b)`` with the smallest ``a >= ⌈√d⌉`` for which ``a² - d`` is
    a perfect square ``b²``: the most nearly square pair whose factors have the same parity
    (4096 → (64, 64), 11008 → (86, 128), 12 → (2, 6) where the nearest pair would be (3, 4)).
    ``d ≡ 2 (mod 4)`` has no such pair and the official loop never ends; there the most nearly square
    pair of any parity is used (6 → (2, 3)).
    """
    if not isinstance(d, int) or isinstance(d, bool) or d <= 0:
        raise ValueError(f"d must be a positive int, got {d!r}")
    same_parity = d % 4 != 2
    for n1 in range(math.isqrt(d), 0, -1):
        if d % n1 == 0 and (not same_parity or (n1 + d // n1) % 2 == 0):
            return n1, d // n1
    raise AssertionError("unreachable: (1, d) has equal parity for odd d, (2, d/2) for d % 4 == 0")  # pragma: no cover


def _check_kron_args(x: Tensor, p1: Tensor, p2: Tensor) -> tuple[int, int]:
    for name, t in (("x", x), ("p1", p1), ("p2", p2)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if p1.dim() != 2 or p1.shape[0] != p1.shape[1] or p2.dim() != 2 or p2.shape[0] != p2.shape[1]:
        raise ValueError(f"p1 and p2 must be square matrices, got {tuple(p1.shape)} and {tuple(p2.shape)}")
    n1, n2 = p1.shape[0], p2.shape[0]
    if x.dim() < 1 or x.shape[-1] != n1 * n2:
        raise ValueError(
            f"x must have last dim n1*n2 = {n1}*{n2} = {n1 * n2} to match p1 {tuple(p1.shape)} and "
            f"p2 {tuple(p2.shape)}, got x of shape {tuple(x.shape)}"
        )
    return n1, n2


def _check_bits(bits: int) -> None:
    if not isinstance(bits, int) or isinstance(bits, bool) or not 2 <= bits <= 8:
        raise ValueError(f"bits must be an int in [2, 8], got {bits!r}")


def _clip_tensor(clip_ratio: float | Tensor, device: torch.device) -> Tensor:
    """``clip_ratio`` as a 0-d fp32 tensor (a python float is rounded to fp32, as a Triton fp32 arg is)."""
    if isinstance(clip_ratio, Tensor):
        if clip_ratio.numel() != 1:
            raise ValueError(f"clip_ratio must be a scalar, got a tensor of shape {tuple(clip_ratio.shape)}")
        return clip_ratio.reshape(()).to(device=device, dtype=torch.float32)
    return torch.tensor(float(clip_ratio), dtype=torch.float32, device=device)


# --------------------------------------------------------------------------------------------- reference


def kron_transform(x: Tensor, p1: Tensor, p2: Tensor) -> Tensor:
    """``vec(P1ᵀ X P2)`` with ``X = x.view(..., n1, n2)`` (row-major): ``x`` ``(..., n1·n2)`` → same shape.

    ``p1`` is ``(n1, n1)``, ``p2`` is ``(n2, n2)``; equals ``x @ torch.kron(p1, p2)`` without building the
    ``d×d`` matrix. Computed in ``x.dtype`` (the matrices are cast to it); differentiable.
    """
    n1, n2 = _check_kron_args(x, p1, p2)
    xm = x.reshape(*x.shape[:-1], n1, n2)
    y = torch.matmul(torch.matmul(p1.to(x.dtype).T, xm), p2.to(x.dtype))
    return y.reshape(x.shape)


def quantize_sym_per_token_ref(
    y: Tensor, bits: int = 4, clip_ratio: float | Tensor = 1.0
) -> tuple[Tensor, Tensor]:
    """Dynamic symmetric per-token quantisation over the last dim: ``y`` ``(..., d)`` → ``(q, scale)``.

    ``q`` is int8 ``(..., d)`` in ``[-2**(bits-1), 2**(bits-1) - 1]`` (round half to even, as
    ``torch.round``), ``scale`` is fp32 ``(..., 1)`` with ``y ≈ q · scale``; ``clip_ratio`` (float or scalar
    tensor) shrinks the range before the max code. Computed in fp32.
    """
    _check_bits(bits)
    if not isinstance(y, Tensor) or not y.is_floating_point():
        raise TypeError("y must be a floating-point torch.Tensor")
    qmax = 2 ** (bits - 1) - 1
    yf = y.to(torch.float32)
    amax = yf.abs().amax(dim=-1, keepdim=True)
    # divide by a same-device tensor: CUDA turns division by a python scalar into a multiply by its
    # reciprocal, which would not round like the kernel's division
    qmax_t = torch.tensor(float(qmax), dtype=torch.float32, device=y.device)
    scale = ((_clip_tensor(clip_ratio, y.device) * amax) / qmax_t).clamp_min(SCALE_EPS)
    q = torch.round(yf / scale).clamp_(-qmax - 1, qmax).to(torch.int8)
    return q, scale


def pack_int4(q: Tensor) -> Tensor:
    """Pack int4 codes: int8 ``(..., d)`` in ``[-8, 7]``, ``d`` even → uint8 ``(..., d/2)``.

    Byte ``j`` holds element ``2j`` in its low nibble and ``2j+1`` in its high nibble (two's complement).
    """
    if not isinstance(q, Tensor) or q.dtype != torch.int8:
        raise TypeError(f"q must be an int8 tensor, got {getattr(q, 'dtype', type(q).__name__)}")
    if q.dim() < 1 or q.shape[-1] % 2:
        raise ValueError(f"q must have an even last dim to pack two codes per byte, got {tuple(q.shape)}")
    u = q.to(torch.int16) & 0xF  # two's-complement nibble of each code
    return (u[..., 0::2] | (u[..., 1::2] << 4)).to(torch.uint8)


def unpack_int4(p: Tensor) -> Tensor:
    """Inverse of :func:`pack_int4`: uint8 ``(..., d/2)`` → int8 ``(..., d)`` in ``[-8, 7]``."""
    if not isinstance(p, Tensor) or p.dtype != torch.uint8:
        raise TypeError(f"p must be a uint8 tensor, got {getattr(p, 'dtype', type(p).__name__)}")
    v = p.to(torch.int16)
    lo, hi = v & 0xF, v >> 4
    # sign-extend a nibble: codes 8..15 stand for -8..-1
    lo = lo - ((lo & 8) << 1)
    hi = hi - ((hi & 8) << 1)
    return torch.stack((lo, hi), dim=-1).reshape(*p.shape[:-1], 2 * p.shape[-1]).to(torch.int8)


# --------------------------------------------------------------------------------------------- fused op


def kron_transform_quant(
    x: Tensor,
    p1: Tensor,
    p2: Tensor,
    clip_ratio: float | Tensor = 1.0,
    bits: int = 4,
    pack: bool = True,
) -> tuple[Tensor, Tensor]:
    """Fused FlatQuant activation path: Kronecker transform → clip → symmetric per-token quantise → pack.

    ``x`` ``(..., n1·n2)`` fp32/fp16/bf16, ``p1`` ``(n1, n1)``, ``p2`` ``(n2, n2)``, ``clip_ratio`` a float
    or scalar tensor. Returns ``(q, scale)``: with ``bits == 4`` and ``pack`` ``q`` is uint8
    ``(..., n1·n2/2)`` (see :func:`pack_int4`; needs ``n2`` even), otherwise int8 ``(..., n1·n2)``;
    ``scale`` is fp32 ``(..., 1)``. Same codes as :func:`kron_transform` (in fp32) followed by
    :func:`quantize_sym_per_token_ref` up to fp32 summation order in the transform. CUDA tensors use one
    Triton kernel (see :mod:`mmeff.kernels.dispatch`); no autograd.
    """
    n1, n2 = _check_kron_args(x, p1, p2)
    _check_bits(bits)
    do_pack = bool(pack) and bits == 4
    if do_pack and n2 % 2:
        raise ValueError(
            f"packing int4 needs an even n2 (so byte pairs never straddle rows of X), got n2={n2}; "
            "pass pack=False for unpacked int8 codes"
        )
    clip = _clip_tensor(clip_ratio, x.device) if isinstance(clip_ratio, Tensor) else float(clip_ratio)
    if x.dtype in SUPPORTED_DTYPES and x.numel() > 0 and _HAS_TRITON and use_triton(x, p1, p2):
        return _kron_quant_triton(x, p1, p2, clip, bits, do_pack)
    y = kron_transform(x.to(torch.float32), p1.to(torch.float32), p2.to(torch.float32))
    q, scale = quantize_sym_per_token_ref(y, bits=bits, clip_ratio=clip)
    return (pack_int4(q) if do_pack else q), scale


# --------------------------------------------------------------------------------------------- int4 GEMM


def _check_gemm_args(xq: Tensor, xs: Tensor, wq: Tensor, ws: Tensor) -> tuple[int, int, int]:
    for name, t in (("xq", xq), ("wq", wq)):
        if not isinstance(t, Tensor) or t.dtype != torch.uint8 or t.dim() != 2:
            raise TypeError(f"{name} must be a 2-D uint8 tensor of packed int4 codes")
    m, kh = xq.shape
    n, kh_w = wq.shape
    if kh != kh_w:
        raise ValueError(f"xq {tuple(xq.shape)} and wq {tuple(wq.shape)} must have the same packed K")
    for name, t, rows in (("xs", xs, m), ("ws", ws, n)):
        if not isinstance(t, Tensor) or not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor")
        if t.numel() != rows or (t.dim() == 2 and t.shape[1] != 1) or t.dim() > 2:
            raise ValueError(f"{name} must have shape ({rows}, 1) or ({rows},), got {tuple(t.shape)}")
    return m, n, 2 * kh


def int4_matmul(
    xq: Tensor, xs: Tensor, wq: Tensor, ws: Tensor, out_dtype: torch.dtype = torch.float32
) -> Tensor:
    """W4A4 GEMM: ``(unpack(xq) @ unpack(wq)ᵀ) · xs · wsᵀ`` → ``(M, N)`` in ``out_dtype``.

    ``xq`` uint8 ``(M, K/2)`` packed activations with per-token scales ``xs`` fp32 ``(M, 1)``; ``wq`` uint8
    ``(N, K/2)`` packed weights with per-output-channel scales ``ws`` fp32 ``(N, 1)``. The integer product
    is exact (int32); the scales are applied in fp32 as ``(acc · xs) · ws``, then cast to ``out_dtype``.
    """
    m, n, _ = _check_gemm_args(xq, xs, wq, ws)
    xs = xs.reshape(m, 1).to(torch.float32)
    ws = ws.reshape(n, 1).to(torch.float32)
    if m * n > 0 and _HAS_TRITON and use_triton(xq, xs, wq, ws):
        return _int4_matmul_triton(xq, xs, wq, ws, out_dtype)
    # fp64 holds every partial sum exactly (|sum| <= 64·K << 2**53) and works on every device
    acc = unpack_int4(xq).double() @ unpack_int4(wq).double().T
    return ((acc.to(torch.int32).to(torch.float32) * xs) * ws.T).to(out_dtype)


# --------------------------------------------------------------------------------------------- Triton

if _HAS_TRITON:
    # tl.max is itself a @jit helper, which the interpreter cannot call when triton was imported before
    # TRITON_INTERPRET=1 was set (as in a test session); tl.reduce with triton's own max combiner runs in
    # both modes (the interpreter maps that combiner onto numpy)
    _max_combine = tl.standard._elementwise_max

    def _kron_quant_kernel(
        x_ptr,
        p1_ptr,
        p2_ptr,
        q_ptr,
        s_ptr,
        clip_ptr,
        clip_val,
        N1,
        N2,
        sxt,
        QMAX: tl.constexpr,
        BLOCK_N1: tl.constexpr,
        BLOCK_N2: tl.constexpr,
        CLIP_FROM_PTR: tl.constexpr,
        PACK: tl.constexpr,
    ):
        """One program = one token: ``Y = P1ᵀ X P2`` on a zero-padded tile, then scale, codes and packing.

        The padded rows/columns of ``Y`` are exactly zero (the padded parts of ``P1``/``P2`` are), but the
        max is still masked so the valid region alone defines the scale.
        """
        t = tl.program_id(0)
        r1 = tl.arange(0, BLOCK_N1)
        r2 = tl.arange(0, BLOCK_N2)
        m1 = r1 < N1
        m2 = r2 < N2
        valid = m1[:, None] & m2[None, :]

        xv = tl.load(x_ptr + t.to(tl.int64) * sxt + r1[:, None] * N2 + r2[None, :], mask=valid, other=0.0)
        # P1ᵀ read straight from P1: element (k, i) of the tile is p1[i, k]
        p1t = tl.load(p1_ptr + r1[None, :] * N1 + r1[:, None], mask=m1[:, None] & m1[None, :], other=0.0)
        p2 = tl.load(p2_ptr + r2[:, None] * N2 + r2[None, :], mask=m2[:, None] & m2[None, :], other=0.0)
        # ieee: tf32 would change the codes relative to the fp32 reference
        y = tl.dot(p1t.to(tl.float32), xv.to(tl.float32), input_precision="ieee")
        y = tl.dot(y, p2.to(tl.float32), input_precision="ieee")

        a = tl.where(valid, tl.abs(y), 0.0)
        amax = tl.reduce(tl.reduce(a, 1, _max_combine), 0, _max_combine)
        if CLIP_FROM_PTR:
            clip = tl.load(clip_ptr)
        else:
            clip = clip_val
        qmax_f = tl.full((), QMAX, tl.float32)
        # div_rn: plain "/" on fp32 lowers to an approximate division on NVIDIA GPUs
        scale = tl.maximum(tl.math.div_rn(clip * amax, qmax_f), 1e-8)
        tl.store(s_ptr + t, scale)

        v = tl.math.div_rn(y, tl.full((BLOCK_N1, BLOCK_N2), 0.0, tl.float32) + scale)
        v = tl.minimum(tl.maximum(v, -QMAX - 1.0), QMAX * 1.0)
        # round half to even, like torch.round (see _RNE_MAGIC); exact because |v| <= 128 after the clamp
        v = (v + 12582912.0) - 12582912.0
        q = v.to(tl.int32)

        if PACK:
            half: tl.constexpr = BLOCK_N2 // 2
            # codes (2j, 2j+1) of a row are neighbours in memory and both valid iff 2j < N2 (N2 is even)
            lo, hi = tl.split(tl.reshape(q & 15, (BLOCK_N1, half, 2)))
            packed = (lo | (hi << 4)).to(tl.uint8)
            c = tl.arange(0, half)
            n2h = N2 // 2
            out = q_ptr + t.to(tl.int64) * (N1 * n2h) + r1[:, None] * n2h + c[None, :]
            tl.store(out, packed, mask=m1[:, None] & (c < n2h)[None, :])
        else:
            out = q_ptr + t.to(tl.int64) * (N1 * N2) + r1[:, None] * N2 + r2[None, :]
            tl.store(out, q.to(tl.int8), mask=valid)

    def _int4_matmul_kernel(
        xq_ptr,
        xs_ptr,
        wq_ptr,
        ws_ptr,
        out_ptr,
        M,
        N,
        KH,
        sxm,
        swn,
        som,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_KH: tl.constexpr,
    ):
        """One program = one ``(BLOCK_M, BLOCK_N)`` output tile, looping over K in ``2·BLOCK_KH`` steps.

        ``Σ_k x_k w_k`` splits into low-nibble and high-nibble halves (both operands use the same K order),
        so each packed tile feeds two int8 dots and the nibbles never have to be interleaved.
        """
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_KH)
        mask_m = offs_m < M
        mask_n = offs_n < N

        # int32 accumulation is exact: |x·w| <= 64, so it cannot overflow before K ~ 2**25
        acc = tl.full((BLOCK_M, BLOCK_N), 0, dtype=tl.int32)
        for k0 in range(0, KH, BLOCK_KH):
            kk = k0 + offs_k
            mask_k = kk < KH
            # padded bytes load as 0, i.e. two zero codes, which add nothing
            xb = tl.load(
                xq_ptr + offs_m[:, None].to(tl.int64) * sxm + kk[None, :],
                mask=mask_m[:, None] & mask_k[None, :],
                other=0,
            ).to(tl.int32)
            # W tile loaded transposed, (BLOCK_KH, BLOCK_N), so it is the right-hand operand of the dot
            wb = tl.load(
                wq_ptr + offs_n[None, :].to(tl.int64) * swn + kk[:, None],
                mask=mask_k[:, None] & mask_n[None, :],
                other=0,
            ).to(tl.int32)
            x_lo = xb & 15
            x_hi = xb >> 4
            w_lo = wb & 15
            w_hi = wb >> 4
            # sign-extend the nibbles: 8..15 stand for -8..-1
            x_lo = (x_lo - ((x_lo & 8) << 1)).to(tl.int8)
            x_hi = (x_hi - ((x_hi & 8) << 1)).to(tl.int8)
            w_lo = (w_lo - ((w_lo & 8) << 1)).to(tl.int8)
            w_hi = (w_hi - ((w_hi & 8) << 1)).to(tl.int8)
            acc = tl.dot(x_lo, w_lo, acc, out_dtype=tl.int32)
            acc = tl.dot(x_hi, w_hi, acc, out_dtype=tl.int32)

        xs = tl.load(xs_ptr + offs_m, mask=mask_m, other=0.0)
        ws = tl.load(ws_ptr + offs_n, mask=mask_n, other=0.0)
        # same operation order as the reference, so the result is bit-identical to it
        res = (acc.to(tl.float32) * xs[:, None]) * ws[None, :]
        out = out_ptr + offs_m[:, None].to(tl.int64) * som + offs_n[None, :]
        tl.store(out, res.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


def _kron_quant_triton(
    x: Tensor, p1: Tensor, p2: Tensor, clip: float | Tensor, bits: int, pack: bool
) -> tuple[Tensor, Tensor]:
    """Launch :func:`_kron_quant_kernel`: one program per token of ``x`` flattened to ``(T, n1·n2)``."""
    n1, n2 = p1.shape[0], p2.shape[0]
    d = n1 * n2
    lead = x.shape[:-1]
    x2 = x.reshape(-1, d)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    t = x2.shape[0]
    p1 = p1.to(torch.float32).contiguous()
    p2 = p2.to(torch.float32).contiguous()
    if pack:
        q = torch.empty((*lead, d // 2), device=x.device, dtype=torch.uint8)
    else:
        q = torch.empty((*lead, d), device=x.device, dtype=torch.int8)
    scale = torch.empty((*lead, 1), device=x.device, dtype=torch.float32)
    from_ptr = isinstance(clip, Tensor)
    clip_ptr = clip.reshape(1).contiguous() if from_ptr else scale  # unused pointer when clip is a float
    clip_val = 1.0 if from_ptr else clip
    # tl.dot needs every dim >= 16 and power-of-2 blocks: pad each factor up, masked loads fill with 0
    block_n1 = max(16, next_pow2(n1))
    block_n2 = max(16, next_pow2(n2))
    lazy_jit(_kron_quant_kernel)[(t,)](
        x2,
        p1,
        p2,
        q,
        scale,
        clip_ptr,
        clip_val,
        n1,
        n2,
        x2.stride(0),
        QMAX=2 ** (bits - 1) - 1,
        BLOCK_N1=block_n1,
        BLOCK_N2=block_n2,
        CLIP_FROM_PTR=from_ptr,
        PACK=pack,
        num_warps=4,
    )
    return q, scale


def _int4_matmul_triton(xq: Tensor, xs: Tensor, wq: Tensor, ws: Tensor, out_dtype: torch.dtype) -> Tensor:
    """Launch :func:`_int4_matmul_kernel`: ``xq`` ``(M, K/2)``, ``wq`` ``(N, K/2)`` uint8; scales fp32."""
    if xq.stride(-1) != 1:
        xq = xq.contiguous()
    if wq.stride(-1) != 1:
        wq = wq.contiguous()
    xs = xs.reshape(-1).contiguous()
    ws = ws.reshape(-1).contiguous()
    m, kh = xq.shape
    n = wq.shape[0]
    out = torch.empty((m, n), device=xq.device, dtype=out_dtype)
    block_m = min(max(16, next_pow2(m)), 64)
    block_n = min(max(16, next_pow2(n)), 64)
    # int8 tl.dot needs K >= 32 on NVIDIA (and every dim >= 16 on older triton); 64 bytes = 128 codes a step
    block_kh = min(max(32, next_pow2(kh)), 64)
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
    lazy_jit(_int4_matmul_kernel)[grid](
        xq,
        xs,
        wq,
        ws,
        out,
        m,
        n,
        kh,
        xq.stride(0),
        wq.stride(0),
        out.stride(0),
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_KH=block_kh,
        num_warps=4,
    )
    return out
