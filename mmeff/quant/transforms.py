"""FlatQuant's building blocks: the fake quantizers, the invertible transforms and the int-code linear.

* :func:`fake_quant_act` / :func:`fake_quant_kv` / :func:`fake_quant_weight`: straight-through fake
  quantization of activations (per token), keys/values (per head and token) and weights (per output
  channel), the forms calibration differentiates through;
* :class:`KronAffine` (``x ↦ (x ⊙ c)(P1 ⊗ P2)``) and :class:`HeadMatrix` (one learnable ``(n, n)``
  matrix), initialised as identity, random orthogonal or randomised Hadamard;
* :class:`QuantLinear`: packed int4 / int8 weight codes with per-channel scales, running the int4 GEMM
  when its input carries packed int4 activations.

The per-layer wiring of these pieces and their calibration are in :mod:`mmeff.quant.calibration`; the
public entry points (``quantize``, ``load_quantized``) in :mod:`mmeff.quant.flatquant`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmeff.kernels.quant import int4_matmul, kron_factors, kron_transform, pack_int4, unpack_int4

__all__ = [
    "LINEARS",
    "HeadMatrix",
    "KronAffine",
    "QuantLinear",
    "fake_quant_act",
    "fake_quant_kv",
    "fake_quant_weight",
    "submodule",
    "lwc_clamp",
]

#: the linears of a Llama/Qwen2-style decoder layer that FlatQuant quantizes (names relative to the layer)
LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


# ------------------------------------------------------------------------------------------ quantizers
def _round_ste(x: Tensor) -> Tensor:
    return x + (torch.round(x) - x).detach()


def fake_quant_act(x: Tensor, bits: int, clip: Tensor | float = 1.0) -> Tensor:
    """Per-token dynamic symmetric fake quantization of ``x (..., d)`` with clip ratio ``clip``
    (straight-through rounding, so ``clip`` and ``x`` get gradients)."""
    if bits >= 16:
        return x
    qmax = 2 ** (bits - 1) - 1
    xf = x.float()
    scale = (xf.abs().amax(-1, keepdim=True) * clip / qmax).clamp_min(1e-8)
    q = torch.clamp(_round_ste(xf / scale), -qmax - 1, qmax)
    return (q * scale).to(x.dtype)


def fake_quant_kv(x: Tensor, bits: int, clip_max: Tensor | float = 1.0, clip_min: Tensor | float = 1.0) -> Tensor:
    """Asymmetric fake quantization of keys/values ``(B, heads, T, head_dim)``, one group per head and token."""
    if bits >= 16:
        return x
    levels = 2**bits - 1
    xf = x.float()
    hi = xf.amax(-1, keepdim=True).clamp_min(0) * clip_max
    lo = xf.amin(-1, keepdim=True).clamp_max(0) * clip_min
    scale = ((hi - lo) / levels).clamp_min(1e-8)
    zero = torch.round(-lo / scale).detach()
    q = torch.clamp(_round_ste(xf / scale) + zero, 0, levels)
    return ((q - zero) * scale).to(x.dtype)


def fake_quant_weight(w: Tensor, bits: int, clip: Tensor | None) -> Tensor:
    """Per-output-channel symmetric fake quantization of ``w (N, K)`` (STE), ``clip (N, 1)`` in (0, 1]."""
    qmax = 2 ** (bits - 1) - 1
    amax = w.abs().amax(1, keepdim=True)
    if clip is not None:
        amax = amax * clip
    scale = (amax / qmax).clamp_min(1e-8)
    return torch.clamp(_round_ste(w / scale), -qmax - 1, qmax) * scale


def lwc_clamp(w: Tensor, clip_max: Tensor, clip_min: Tensor) -> Tensor:
    """FlatQuant's learnable weight clipping (official ``apply_wclip``): clamp each row of ``w (N, K)`` to
    ``[min(row)·clip_min, max(row)·clip_max]`` with ``clip_max``/``clip_min (N, 1)`` in (0, 1]; the
    quantizer then takes its symmetric range from the clamped weight. Gradients reach both factors."""
    return torch.clamp(w, min=w.amin(1, keepdim=True) * clip_min, max=w.amax(1, keepdim=True) * clip_max)


def _hadamard(n: int) -> Tensor | None:
    if n & (n - 1):
        return None
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / math.sqrt(n)


def _random_orthogonal(n: int, gen: torch.Generator) -> Tensor:
    q, r = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))  # sign fix: Haar-distributed, not biased by QR's convention


def _init_matrix(n: int, kind: str, gen: torch.Generator) -> Tensor:
    if kind == "hadamard":
        h = _hadamard(n)
        # Randomised Hadamard (QuaRot): H·diag(±1); sizes that are not powers of two get a random rotation.
        if h is not None:
            return h * (torch.randint(0, 2, (n,), generator=gen, dtype=torch.float64) * 2 - 1)
        return _random_orthogonal(n, gen)
    if kind == "flatquant":
        return _random_orthogonal(n, gen)
    return torch.eye(n, dtype=torch.float64)


# ------------------------------------------------------------------------------------------ transforms
class KronAffine(nn.Module):
    """``x ↦ (x ⊙ c) (P1 ⊗ P2)`` on the last dim ``d = n1·n2`` (``P1`` ``(n1, n1)``, ``P2`` ``(n2, n2)``).

    ``P1``/``P2`` are plain invertible matrices (FlatQuant's ``direct_inv`` parameterisation), initialised
    orthogonal; ``c`` is the per-channel smoothing scale. :meth:`weight` maps a weight ``W (N, d)`` to
    ``W diag(c)⁻¹ (P1 ⊗ P2)⁻ᵀ`` so ``transform(x) @ weight(W).T == x @ W.T``.
    """

    def __init__(self, d: int, kind: str, gen: torch.Generator, train: bool) -> None:
        super().__init__()
        self.d = d
        self.n1, self.n2 = kron_factors(d)
        self.p1 = nn.Parameter(_init_matrix(self.n1, kind, gen).float(), requires_grad=train)
        self.p2 = nn.Parameter(_init_matrix(self.n2, kind, gen).float(), requires_grad=train)
        self.c = nn.Parameter(torch.ones(d), requires_grad=train)

    def forward(self, x: Tensor, use_diag: bool = True) -> Tensor:
        """``x (..., d)`` → transformed ``(..., d)`` in ``x.dtype`` (computed in float32)."""
        xf = x.float() * self.c if use_diag else x.float()
        return kron_transform(xf, self.p1, self.p2).to(x.dtype)

    def weight(self, w: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
        """``W (N, d)`` → ``W diag(c)⁻¹ P⁻ᵀ`` in ``dtype`` (float64 for the final merge)."""
        p1, p2 = self.p1.to(dtype), self.p2.to(dtype)
        inv1, inv2 = torch.linalg.inv(p1).T, torch.linalg.inv(p2).T
        return kron_transform(w.to(dtype) / self.c.to(dtype), inv1, inv2)


class HeadMatrix(nn.Module):
    """A learnable ``(n, n)`` matrix (P_v over head_dim, P_o over heads, P_h over head_dim)."""

    def __init__(self, n: int, kind: str, gen: torch.Generator, train: bool) -> None:
        super().__init__()
        self.m = nn.Parameter(_init_matrix(n, kind, gen).float(), requires_grad=train)

    def inv_t(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """``(M⁻¹)ᵀ`` in ``dtype``."""
        return torch.linalg.inv(self.m.to(dtype)).T


class QuantLinear(nn.Module):
    """A linear layer holding integer weight codes: packed int4 (two per byte) or int8, with per-output-
    channel scales ``wscale (N, 1)``. ``weight`` is the dequantized matrix (cached), used by the
    fake-quant path; when its input carries packed int4 activations (set by the fused transform+quantize
    kernel on CUDA) it runs the int4 x int4 GEMM instead."""

    def __init__(self, in_features: int, out_features: int, bits: int, bias: bool,
                 dtype: torch.dtype = torch.float32, device: Any = None) -> None:
        super().__init__()
        self.in_features, self.out_features, self.bits = in_features, out_features, bits
        self.packed = bits <= 4 and in_features % 2 == 0  # two codes per byte; odd widths stay int8
        cols = in_features // 2 if self.packed else in_features
        self.register_buffer("qweight", torch.zeros(out_features, cols, dtype=torch.uint8 if self.packed else torch.int8,
                                                    device=device))
        self.register_buffer("wscale", torch.ones(out_features, 1, dtype=torch.float32, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device), requires_grad=False) if bias else None
        self.dtype = dtype
        self._deq: Tensor | None = None

    @classmethod
    def from_codes(cls, lin: nn.Linear, q: Tensor, scale: Tensor, bits: int) -> QuantLinear:
        """Replace ``lin`` by its codes ``q (N, K)`` int8 and ``scale (N, 1)``."""
        new = cls(lin.in_features, lin.out_features, bits, lin.bias is not None, lin.weight.dtype, lin.weight.device)
        new.qweight.copy_(pack_int4(q) if new.packed else q)
        new.wscale.copy_(scale.float())
        if lin.bias is not None:
            new.bias.data.copy_(lin.bias.data)
        return new

    def codes(self) -> Tensor:
        """``(N, K)`` int8 weight codes."""
        return unpack_int4(self.qweight) if self.packed else self.qweight

    @property
    def weight(self) -> Tensor:
        """Dequantized ``(N, K)`` weight in the layer's dtype (computed once)."""
        if self._deq is None or self._deq.device != self.qweight.device:
            self._deq = (self.codes().float() * self.wscale).to(self.dtype)
        return self._deq

    def _apply(self, fn: Callable[..., Any], recurse: bool = True) -> QuantLinear:
        self._deq = None  # device/dtype moves invalidate the cache
        # The codes are integers, so .to(dtype) leaves them alone; follow the float dtype through ``fn``
        # itself (a bias-free layer has no float tensor to read it from).
        self.dtype = fn(torch.empty(0, dtype=self.dtype)).dtype
        return super()._apply(fn, recurse)

    def forward(self, x: Tensor) -> Tensor:
        """``x (..., in_features)`` → ``(..., out_features)``: the int4 GEMM on packed activations, else
        ``F.linear`` with the dequantized weight."""
        packed = getattr(x, "_mmeff_int4", None)
        if packed is not None and self.packed and self.bits == 4:
            xq, xs = packed
            y = int4_matmul(xq, xs, self.qweight, self.wscale, out_dtype=x.dtype)
            y = y.view(*x.shape[:-1], self.out_features)
            return y + self.bias if self.bias is not None else y
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}"


def submodule(root: nn.Module, dotted: str) -> nn.Module:
    """The module at attribute path ``dotted`` (``"self_attn.q_proj"``) under ``root``; ``AttributeError``
    if a part is missing."""
    for part in dotted.split("."):
        root = getattr(root, part)
    return root
