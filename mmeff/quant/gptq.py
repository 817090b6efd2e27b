"""Weight quantizers for W4-style post-training quantization of ``nn.Linear`` weights.

Weights are ``(N, K)``: rows are output channels, columns are input features. Every quantizer here uses
the same per-output-channel symmetric grid ``scale * {-qmax-1, ..., qmax}`` with ``qmax = 2**(bits-1) - 1``,
so codes from round-to-nearest (RTN) and from GPTQ are interchangeable and ``dequantize`` serves both.

- ``quantize_rtn`` / ``fake_quant_rtn``: round each weight to the nearest grid point.
- ``gptq_quantize``: GPTQ (Frantar et al., 2022). Columns are quantized one at a time and the rounding
  error of each is pushed onto the not-yet-quantized columns through the inverse Hessian of the layer's
  reconstruction loss, which lowers the layer-output error ``||X W^T - X Wq^T||`` for correlated inputs.
- ``accumulate_hessian``: the running ``H = 2 X^T X / n`` that GPTQ needs, fed chunk by chunk.

Rounding is ``torch.round`` (half to even) everywhere, on ``w / scale`` computed in float64 so that RTN and
GPTQ see bit-identical quotients for untouched columns.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mmeff.core import QUANTIZERS

__all__ = [
    "accumulate_hessian",
    "dequantize",
    "fake_quant_rtn",
    "gptq_quantize",
    "quantize_rtn",
    "sym_scale",
]

SUPPORTED_BITS = (2, 3, 4, 8)
_SCALE_FLOOR = 1e-8


def _check_bits(bits: int) -> int:
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits!r}")
    return bits


def _check_weight(w: Tensor) -> None:
    if not isinstance(w, Tensor) or w.dim() != 2:
        shape = tuple(w.shape) if isinstance(w, Tensor) else type(w).__name__
        raise ValueError(f"w must be a 2-D (out_features, in_features) tensor, got {shape}")
    if not w.is_floating_point():
        raise ValueError(f"w must be a floating-point tensor, got {w.dtype}")
    if not bool(torch.isfinite(w).all()):
        raise ValueError("w contains NaN or inf")


def _check_clip(clip: Tensor | float | None, rows: int) -> Tensor | float | None:
    """Return ``clip`` as a python float or an ``(N, 1)`` tensor, after checking it lies in ``(0, 1]``."""
    if clip is None:
        return None
    if isinstance(clip, Tensor):
        if clip.numel() == 1:
            clip = clip.reshape(1, 1)
        elif clip.shape in ((rows, 1), (rows,)):
            clip = clip.reshape(rows, 1)
        else:
            raise ValueError(
                f"clip tensor must have shape ({rows}, 1), ({rows},) or be a scalar, got {tuple(clip.shape)}"
            )
        # The negated comparison also rejects NaN.
        if not bool(((clip > 0) & (clip <= 1)).all()):
            raise ValueError("clip factors must lie in (0, 1]")
        return clip
    if isinstance(clip, bool) or not isinstance(clip, (int, float)):
        raise ValueError(f"clip must be a tensor, a float or None, got {type(clip).__name__}")
    if not 0 < clip <= 1:
        raise ValueError(f"clip must lie in (0, 1], got {clip}")
    return float(clip)


def _qmax(bits: int) -> int:
    return 2 ** (bits - 1) - 1


def _round_to_grid(w: Tensor, scale: Tensor, qmax: int) -> Tensor:
    """Codes ``clamp(round(w / scale), -qmax-1, qmax)`` as float64; ``w``: ``(N, *)``, ``scale``: ``(N, 1)``."""
    return torch.round(w.double() / scale.double()).clamp_(-qmax - 1, qmax)


def sym_scale(w: Tensor, bits: int, clip: Tensor | float | None = None) -> Tensor:
    """Per-output-channel symmetric scale ``amax * clip / qmax``.

    Args:
        w: ``(N, K)`` weight.
        bits: code width, one of ``SUPPORTED_BITS``.
        clip: per-row ``(N, 1)`` factors in ``(0, 1]``, a scalar factor, or ``None`` (no clipping).

    Returns:
        ``(N, 1)`` scale in ``w``'s dtype, at least ``1e-8`` (or the dtype's smallest normal number when
        ``1e-8`` underflows, as in float16) so that all-zero rows do not divide by zero.
    """
    _check_weight(w)
    qmax = _qmax(_check_bits(bits))
    clip = _check_clip(clip, w.shape[0])
    compute = torch.promote_types(w.dtype, torch.float32)
    amax = w.to(compute).abs().amax(dim=1, keepdim=True)
    if isinstance(clip, Tensor):
        amax = amax * clip.to(device=w.device, dtype=compute)
    elif clip is not None:
        amax = amax * clip
    floor = max(_SCALE_FLOOR, torch.finfo(w.dtype).tiny)
    return (amax / qmax).clamp_min(floor).to(w.dtype).clamp_min(floor)


def quantize_rtn(w: Tensor, bits: int = 4, clip: Tensor | float | None = None) -> tuple[Tensor, Tensor]:
    """Round-to-nearest (half to even) onto the ``sym_scale`` grid.

    Args:
        w: ``(N, K)`` weight.
        bits: code width, one of ``SUPPORTED_BITS``.
        clip: see ``sym_scale``; weights beyond the clipped range saturate at ``-qmax-1`` / ``qmax``.

    Returns:
        ``(q, scale)``: int8 codes ``(N, K)`` in ``[-qmax-1, qmax]`` and the ``(N, 1)`` scale in ``w``'s dtype.
    """
    scale = sym_scale(w, bits, clip)
    q = _round_to_grid(w, scale, _qmax(bits))
    return q.to(torch.int8), scale


def dequantize(q: Tensor, scale: Tensor) -> Tensor:
    """``q * scale``: codes ``(N, K)`` times scale ``(N, 1)``, returned as ``(N, K)`` in ``scale``'s dtype."""
    return q.to(scale.dtype) * scale


def fake_quant_rtn(w: Tensor, bits: int = 4, clip: Tensor | float | None = None) -> Tensor:
    """RTN quantize then dequantize: ``(N, K)`` -> ``(N, K)`` in ``w``'s dtype."""
    q, scale = quantize_rtn(w, bits, clip)
    return dequantize(q, scale).to(w.dtype)


def accumulate_hessian(h: Tensor | None, x: Tensor, count: int) -> tuple[Tensor, int]:
    """Fold a chunk of calibration inputs into the running mean ``H = 2 X^T X / n``.

    Args:
        h: the running ``(K, K)`` Hessian from earlier chunks, or ``None`` before the first one.
        x: inputs to the layer, ``(..., K)``; every leading index is one row (token) of ``X``.
        count: rows already folded into ``h`` (0 with ``h=None``).

    Returns:
        ``(H, new_count)``: the float64 ``(K, K)`` Hessian over all rows seen, on ``x``'s device, and the total
        row count.
    """
    if not isinstance(x, Tensor) or x.dim() < 1:
        raise ValueError("x must be a tensor of shape (..., K)")
    if isinstance(count, bool) or not isinstance(count, int) or count < 0:
        raise ValueError(f"count must be a non-negative int, got {count!r}")
    k = x.shape[-1]
    rows = x.reshape(-1, k).to(torch.float64)
    if h is None:
        if count != 0:
            raise ValueError("count must be 0 when h is None")
        h = torch.zeros(k, k, dtype=torch.float64, device=x.device)
    elif h.shape != (k, k):
        raise ValueError(f"h must have shape ({k}, {k}) to match x's last dim, got {tuple(h.shape)}")
    h = h.to(device=x.device, dtype=torch.float64)
    m = rows.shape[0]
    if m == 0:
        return h, count
    new_count = count + m
    # Rescaling the old mean instead of keeping a raw sum keeps magnitudes independent of how many
    # calibration tokens were seen.
    h = h * (count / new_count) + rows.T @ rows * (2.0 / new_count)
    return h, new_count


def gptq_quantize(
    w: Tensor,
    hessian: Tensor,
    bits: int = 4,
    clip: Tensor | float | None = None,
    block_size: int = 128,
    percdamp: float = 0.01,
    act_order: bool = False,
) -> tuple[Tensor, Tensor]:
    """GPTQ onto the fixed per-output-channel symmetric grid of ``sym_scale(w, bits, clip)``.

    Args:
        w: ``(N, K)`` weight.
        hessian: ``(K, K)`` ``H = 2 X^T X / n`` of the layer's calibration inputs (see ``accumulate_hessian``).
        bits: code width, one of ``SUPPORTED_BITS``.
        clip: see ``sym_scale``.
        block_size: columns per lazy-update block; only changes the order of floating-point work.
        percdamp: ``percdamp * mean(diag(H))`` is added to the diagonal before inversion.
        act_order: quantize columns in order of descending ``diag(H)``.

    Returns:
        ``(q, scale)``: int8 codes ``(N, K)`` and the ``(N, 1)`` scale in ``w``'s dtype, the same grid as
        ``quantize_rtn``, so ``dequantize(q, scale)`` gives the quantized weight.
    """
    _check_weight(w)
    _check_bits(bits)
    k = w.shape[1]
    if not isinstance(hessian, Tensor) or hessian.shape != (k, k):
        shape = tuple(hessian.shape) if isinstance(hessian, Tensor) else type(hessian).__name__
        raise ValueError(
            f"hessian must have shape ({k}, {k}) for a weight with {k} input features, got {shape}"
        )
    if not bool(torch.isfinite(hessian).all()):
        raise ValueError("hessian contains NaN or inf")
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be a positive int, got {block_size!r}")
    if not percdamp >= 0:
        raise ValueError(f"percdamp must be >= 0, got {percdamp!r}")

    qmax = _qmax(bits)
    # The grid comes from the original weight, before dead columns are zeroed or errors are propagated,
    # so GPTQ and RTN codes share one scale and compare like for like.
    scale = sym_scale(w, bits, clip)
    scale64 = scale.double()

    weight = w.detach().to(torch.float64).clone()
    h = hessian.detach().to(device=w.device, dtype=torch.float64).clone()

    # An input that never fires carries no information: its weights cannot affect the output on the
    # calibration set, so they are set to zero and a unit diagonal keeps H invertible.
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    weight[:, dead] = 0.0

    perm = None
    if act_order:
        perm = torch.argsort(torch.diagonal(h), descending=True, stable=True)
        weight = weight[:, perm]
        h = h[perm][:, perm]

    damp = percdamp * torch.diagonal(h).mean()
    h.diagonal().add_(damp)

    chol, info = torch.linalg.cholesky_ex(h)
    if int(info) != 0:
        raise ValueError("hessian is not positive definite after dampening; increase percdamp")
    hinv = torch.cholesky_inverse(chol)
    # Row i of the upper Cholesky factor of H^-1, divided by its diagonal, equals the OBS update row of the
    # inverse Hessian restricted to columns i.. — without re-inverting after each column.
    hinv, info = torch.linalg.cholesky_ex(hinv, upper=True)
    if int(info) != 0:
        raise ValueError("inverse hessian is not positive definite; increase percdamp")

    codes = torch.zeros_like(weight)
    for i1 in range(0, k, block_size):
        i2 = min(i1 + block_size, k)
        block = weight[:, i1:i2].clone()
        err = torch.zeros_like(block)
        hinv_block = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = block[:, i : i + 1]
            q = _round_to_grid(col, scale64, qmax)
            codes[:, i1 + i : i1 + i + 1] = q
            e = (col - q * scale64) / hinv_block[i, i]
            # Only the columns inside the block are updated eagerly; the rest of the matrix receives the
            # accumulated block error in one matmul below, which is the point of the lazy batching.
            block[:, i:] -= e * hinv_block[i : i + 1, i:]
            err[:, i : i + 1] = e
        weight[:, i2:] -= err @ hinv[i1:i2, i2:]

    if perm is not None:
        codes = codes[:, torch.argsort(perm)]
    return codes.to(torch.int8), scale


QUANTIZERS.add("gptq", gptq_quantize,
               summary="GPTQ: column-wise weight rounding with inverse-Hessian error feedback (Frantar et al., 2022)")
QUANTIZERS.add("rtn", quantize_rtn, summary="RTN: round each weight to the nearest point of a per-channel symmetric grid")
