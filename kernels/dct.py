"""2-D DCT-II over token grids and the Fourier-VLM low-pass (PyTorch reference + Triton kernel).

Layout is channels-last: ``x`` has shape ``(B, H, W, D)`` and the transforms act on the ``H`` and ``W``
axes. All transforms are orthonormal (``norm="ortho"``, matching ``scipy.fft.dctn``) and are computed in
fp32 (fp64 inputs stay in fp64); results come back in the input dtype.

Fourier-VLM low-pass: DCT-II of size ``H×W``, keep the ``[:h', :w']`` low-frequency corner, inverse DCT of
size ``h'×w'``. Because each step is linear and separable this is ``A_h @ X @ A_wᵀ`` with
``A_h = C_{h'}ᵀ @ C_H[:h', :]`` (``h'×H``), which is what :func:`dct_lowpass` evaluates (the matrices are
cached). Note the amplitude pitfall: an ortho DCT of size ``N`` followed by an ortho IDCT of size ``n``
scales the signal by ``√(N/n)`` per axis (a constant 3 becomes 6 for 24×24→12×12). The official code does
not correct this; ``rescale=True`` multiplies by ``√(h'w'/(HW))``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch
from torch import Tensor

from mmeff.kernels.dispatch import SUPPORTED_DTYPES, lazy_jit, next_pow2, use_triton

try:  # triton is optional: CPU-only installs use the PyTorch reference
    import triton
    import triton.language as tl

    _HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised only without triton
    _HAS_TRITON = False

__all__ = ["dct_matrix", "dct2", "idct2", "dct_lowpass", "lowpass_matrix", "FFT_THRESHOLD"]

#: ``method="auto"`` uses the FFT path when ``max(H, W)`` exceeds this.
FFT_THRESHOLD = 64

_METHODS = ("matrix", "fft", "auto")


# --------------------------------------------------------------------------------------------- matrices


@functools.lru_cache(maxsize=256)
def _dct_matrix_f64(n: int) -> Tensor:
    """Orthonormal DCT-II basis ``(n, n)`` in fp64 on CPU: ``C[k, i] = s_k cos(π (2i + 1) k / 2n)``."""
    k = torch.arange(n, dtype=torch.float64).unsqueeze(1)
    i = torch.arange(n, dtype=torch.float64).unsqueeze(0)
    c = torch.cos(math.pi * (2 * i + 1) * k / (2 * n)) * math.sqrt(2.0 / n)
    c[0] *= 1.0 / math.sqrt(2.0)
    return c


@functools.lru_cache(maxsize=256)
def _lowpass_matrix_f64(n_in: int, n_out: int, rescale: bool) -> Tensor:
    """``C_{n_out}ᵀ @ C_{n_in}[:n_out, :]`` ``(n_out, n_in)`` in fp64, times ``√(n_out/n_in)`` if rescale."""
    a = _dct_matrix_f64(n_out).T @ _dct_matrix_f64(n_in)[:n_out, :]
    if rescale:
        a = a * math.sqrt(n_out / n_in)
    return a


_DEVICE_CACHE: dict[tuple, Tensor] = {}


def _cached(
    key: tuple, build: Callable[[], Tensor], device: torch.device | str | None, dtype: torch.dtype
) -> Tensor:
    device = torch.device(device) if device is not None else torch.device("cpu")
    full_key = (*key, str(device), dtype)
    out = _DEVICE_CACHE.get(full_key)
    if out is None:
        out = build().to(device=device, dtype=dtype).contiguous()
        _DEVICE_CACHE[full_key] = out
    return out


def dct_matrix(
    n: int, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32
) -> Tensor:
    """Orthonormal DCT-II basis ``C`` of shape ``(n, n)``: ``dct(x) = C @ x``, ``idct(y) = Cᵀ @ y``.

    Built in fp64 and cached per ``(n, device, dtype)``; the returned tensor is shared, do not modify it.
    """
    if not isinstance(n, int) or isinstance(n, bool) or n <= 0:
        raise ValueError(f"n must be a positive int, got {n!r}")
    return _cached(("dct", n), lambda: _dct_matrix_f64(n), device, dtype)


def lowpass_matrix(
    n_in: int,
    n_out: int,
    rescale: bool = False,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Fused 1-D low-pass ``A = C_{n_out}ᵀ @ C_{n_in}[:n_out, :]`` of shape ``(n_out, n_in)`` (cached).

    With ``rescale=True`` ``A`` is multiplied by ``√(n_out / n_in)``. Shared tensor, do not modify it.
    """
    for name, v in (("n_in", n_in), ("n_out", n_out)):
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    if n_out > n_in:
        raise ValueError(f"n_out ({n_out}) must not exceed n_in ({n_in})")
    rescale = bool(rescale)
    return _cached(
        ("lp", n_in, n_out, rescale), lambda: _lowpass_matrix_f64(n_in, n_out, rescale), device, dtype
    )


# --------------------------------------------------------------------------------------------- helpers


def _check_grid(x: Tensor, name: str = "x") -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"{name} must have shape (B, H, W, D), got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}")
    if any(s == 0 for s in x.shape[1:3]):
        raise ValueError(f"{name} has an empty grid: {tuple(x.shape)}")


def _compute_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _apply_hw(x: Tensor, a_h: Tensor, a_w: Tensor) -> Tensor:
    """``out[b, i, j, d] = Σ_{h,w} a_h[i, h] x[b, h, w, d] a_w[j, w]`` (x already in compute dtype)."""
    b, h, w, d = x.shape
    # contract H: (i, h) @ (b, h, w*d) -> (b, i, w*d)
    y = torch.matmul(a_h, x.reshape(b, h, w * d)).reshape(b, a_h.shape[0], w, d)
    # contract W: (j, w) @ (b, i, w, d) -> (b, i, j, d)
    return torch.matmul(a_w, y)


def _check_method(method: str) -> None:
    if method not in _METHODS:
        raise ValueError(f"method must be one of {_METHODS}, got {method!r}")


def _pick_fft(method: str, h: int, w: int) -> bool:
    _check_method(method)
    return method == "fft" or (method == "auto" and max(h, w) > FFT_THRESHOLD)


@functools.lru_cache(maxsize=256)
def _makhoul_perm(n: int) -> Tensor:
    """Index ``[0, 2, 4, …, …, 5, 3, 1]``: even samples, then odd samples reversed."""
    return torch.cat([torch.arange(0, n, 2), torch.arange(1, n, 2).flip(0)])


def _perm(n: int, device: torch.device) -> Tensor:
    return _cached(("perm", n), lambda: _makhoul_perm(n), device, torch.long)


def _inv_perm(n: int, device: torch.device) -> Tensor:
    return _cached(("iperm", n), lambda: torch.argsort(_makhoul_perm(n)), device, torch.long)


def _ortho_scale(n: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    def build() -> Tensor:
        s = torch.full((n,), math.sqrt(2.0 / n), dtype=torch.float64)
        s[0] = math.sqrt(1.0 / n)
        return s

    return _cached(("oscale", n), build, device, dtype)


def _twiddle(n: int, sign: float, dtype: torch.dtype, device: torch.device) -> Tensor:
    cdtype = torch.complex128 if dtype == torch.float64 else torch.complex64

    def build() -> Tensor:
        k = torch.arange(n, dtype=torch.float64)
        return torch.polar(torch.ones(n, dtype=torch.float64), sign * math.pi * k / (2 * n))

    return _cached(("tw", n, sign), build, device, cdtype)


def _bshape(n: int, dim: int, ndim: int) -> list[int]:
    shape = [1] * ndim
    shape[dim] = n
    return shape


def _dct1_fft(x: Tensor, dim: int) -> Tensor:
    """Orthonormal DCT-II along ``dim`` via Makhoul's reorder + one complex FFT of the same length."""
    n = x.shape[dim]
    v = x.index_select(dim, _perm(n, x.device))
    spec = torch.fft.fft(v, dim=dim)
    bs = _bshape(n, dim, x.dim())
    y = (spec * _twiddle(n, -1.0, x.dtype, x.device).reshape(bs)).real
    return y * _ortho_scale(n, x.dtype, x.device).reshape(bs)


def _idct1_fft(y: Tensor, dim: int) -> Tensor:
    """Orthonormal DCT-III (inverse of :func:`_dct1_fft`) along ``dim``."""
    n = y.shape[dim]
    bs = _bshape(n, dim, y.dim())
    z = (y * _ortho_scale(n, y.dtype, y.device).reshape(bs)) * _twiddle(n, 1.0, y.dtype, y.device).reshape(bs)
    v = (torch.fft.ifft(z, dim=dim) * n).real
    return v.index_select(dim, _inv_perm(n, y.device))


# --------------------------------------------------------------------------------------------- transforms


def _separable(x: Tensor, method: str, inverse: bool, name: str) -> Tensor:
    """The 2-D DCT-II (or its inverse, DCT-III) of ``x`` ``(B, H, W, D)`` over H and W, as one code path."""
    _check_grid(x, name)
    _, h, w, _ = x.shape
    cd = _compute_dtype(x)
    xc = x.to(cd)
    if _pick_fft(method, h, w):
        one = _idct1_fft if inverse else _dct1_fft
        out = one(one(xc, 1), 2)
    else:
        c_h, c_w = dct_matrix(h, x.device, cd), dct_matrix(w, x.device, cd)
        out = _apply_hw(xc, c_h.T, c_w.T) if inverse else _apply_hw(xc, c_h, c_w)
    return out.to(x.dtype)


def dct2(x: Tensor, method: str = "auto") -> Tensor:
    """Orthonormal 2-D DCT-II over the grid axes: ``x`` ``(B, H, W, D)`` → ``(B, H, W, D)``.

    ``method="matrix"`` computes ``C_H @ X @ C_Wᵀ``; ``"fft"`` uses Makhoul's reorder + ``torch.fft``;
    ``"auto"`` picks FFT when ``max(H, W) > FFT_THRESHOLD``. Equals
    ``scipy.fft.dctn(x, norm="ortho", axes=(1, 2))``. Computed in fp32, returned in ``x.dtype``.
    """
    return _separable(x, method, inverse=False, name="x")


def idct2(y: Tensor, method: str = "auto") -> Tensor:
    """Inverse of :func:`dct2` (orthonormal DCT-III): ``y`` ``(B, H, W, D)`` → ``(B, H, W, D)``.

    Matrix form ``C_Hᵀ @ Y @ C_W``; same ``method`` choices as :func:`dct2`. Equals
    ``scipy.fft.idctn(y, norm="ortho", axes=(1, 2))``. Computed in fp32, returned in ``y.dtype``.
    """
    return _separable(y, method, inverse=True, name="y")


def _check_out_hw(out_hw: tuple[int, int], h: int, w: int) -> tuple[int, int]:
    try:
        ho, wo = out_hw
    except (TypeError, ValueError):
        raise ValueError(f"out_hw must be a pair (h', w'), got {out_hw!r}") from None
    for v in (ho, wo):
        if isinstance(v, bool) or not isinstance(v, int):
            raise TypeError(f"out_hw entries must be ints, got {out_hw!r}")
    if ho <= 0 or wo <= 0:
        raise ValueError(f"out_hw must be positive, got {out_hw!r}")
    if ho > h or wo > w:
        raise ValueError(f"out_hw {(ho, wo)} must not exceed the input grid {(h, w)}")
    return ho, wo


def dct_lowpass(x: Tensor, out_hw: tuple[int, int], rescale: bool = False) -> Tensor:
    """Fourier-VLM low-pass: ``x`` ``(B, H, W, D)`` → ``(B, h', w', D)`` with ``(h', w') = out_hw``.

    DCT-II of size ``H×W``, keep the ``[:h', :w']`` corner, inverse DCT of size ``h'×w'``, evaluated as
    ``A_h @ X @ A_wᵀ`` with cached ``A_h = C_{h'}ᵀ @ C_H[:h', :]``. The output amplitude is scaled by
    ``√(HW/(h'w'))`` (official behaviour); ``rescale=True`` undoes that. Computed in fp32, returned in
    ``x.dtype``; CUDA tensors use a fused Triton kernel (see :mod:`mmeff.kernels.dispatch`) unless a
    gradient is needed, in which case the PyTorch path runs so autograd works.
    """
    _check_grid(x)
    _, h, w, _ = x.shape
    ho, wo = _check_out_hw(out_hw, h, w)
    cd = _compute_dtype(x)
    a_h = lowpass_matrix(h, ho, rescale, x.device, cd)
    a_w = lowpass_matrix(w, wo, rescale, x.device, cd)
    # the Triton kernel has no backward: fine-tuning through the filter takes the (differentiable) matmuls
    needs_grad = torch.is_grad_enabled() and x.requires_grad
    if x.dtype in SUPPORTED_DTYPES and x.numel() > 0 and not needs_grad and _HAS_TRITON and use_triton(x):
        return _lowpass_triton(x, a_h, a_w)
    return _apply_hw(x.to(cd), a_h, a_w).to(x.dtype)


# --------------------------------------------------------------------------------------------- Triton

if _HAS_TRITON:

    def _lowpass_kernel(
        x_ptr,
        ah_ptr,
        aw_ptr,
        out_ptr,
        H,
        W,
        HO,
        WO,
        D,
        sxb,
        sxh,
        sxw,
        sob,
        soh,
        sow,
        BLOCK_HO: tl.constexpr,
        BLOCK_K: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        """One program = (batch b, output column j) × d-block × output-row tile.

        Contracts W first (``T[h, d] = Σ_w A_w[j, w] X[b, h, w, d]``, fp32 FMAs), then H with a dot
        (``out[i, j, d] = Σ_h A_h[i, h] T[h, d]``) - the cheaper separable order, no recomputation.
        """
        pid_bj = tl.program_id(0)
        pid_d = tl.program_id(1)
        pid_i = tl.program_id(2)
        b = pid_bj // WO
        j = pid_bj % WO

        offs_i = pid_i * BLOCK_HO + tl.arange(0, BLOCK_HO)
        offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
        offs_k = tl.arange(0, BLOCK_K)
        mask_i = offs_i < HO
        mask_d = offs_d < D

        x_base = x_ptr + b.to(tl.int64) * sxb
        # tl.full, not tl.zeros: tl.zeros is a @jit helper that the interpreter cannot run when triton was
        # imported before TRITON_INTERPRET=1 was set (as in a test session)
        acc = tl.full((BLOCK_HO, BLOCK_D), 0.0, dtype=tl.float32)
        for h0 in range(0, H, BLOCK_K):
            hk = h0 + offs_k
            mask_k = hk < H
            t = tl.full((BLOCK_K, BLOCK_D), 0.0, dtype=tl.float32)
            row_ptrs = x_base + hk[:, None] * sxh + offs_d[None, :]
            xmask = mask_k[:, None] & mask_d[None, :]
            for w in range(0, W):
                a = tl.load(aw_ptr + j * W + w)
                xv = tl.load(row_ptrs + w * sxw, mask=xmask, other=0.0).to(tl.float32)
                t += a * xv
            ah = tl.load(
                ah_ptr + offs_i[:, None] * H + hk[None, :],
                mask=mask_i[:, None] & mask_k[None, :],
                other=0.0,
            )
            acc += tl.dot(ah, t, input_precision="ieee")

        out_ptrs = out_ptr + b.to(tl.int64) * sob + offs_i[:, None] * soh + j * sow + offs_d[None, :]
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask_i[:, None] & mask_d[None, :])


def _lowpass_triton(x: Tensor, a_h: Tensor, a_w: Tensor) -> Tensor:
    """Launch :func:`_lowpass_kernel`: ``x`` ``(B, H, W, D)``, ``a_h`` ``(h', H)``, ``a_w`` ``(w', W)`` fp32."""
    x = x.contiguous()
    b, h, w, d = x.shape
    ho, wo = a_h.shape[0], a_w.shape[0]
    a_h = a_h.to(torch.float32).contiguous()
    a_w = a_w.to(torch.float32).contiguous()
    out = torch.empty((b, ho, wo, d), device=x.device, dtype=x.dtype)
    block_ho = min(max(16, next_pow2(ho)), 64)  # tl.dot needs every dim >= 16
    block_k = min(max(16, next_pow2(h)), 32)
    block_d = min(max(16, next_pow2(d)), 64)
    grid = (b * wo, triton.cdiv(d, block_d), triton.cdiv(ho, block_ho))
    lazy_jit(_lowpass_kernel)[grid](
        x,
        a_h,
        a_w,
        out,
        h,
        w,
        ho,
        wo,
        d,
        x.stride(0),
        x.stride(1),
        x.stride(2),
        out.stride(0),
        out.stride(1),
        out.stride(2),
        BLOCK_HO=block_ho,
        BLOCK_K=block_k,
        BLOCK_D=block_d,
        num_warps=4,
    )
    return out
