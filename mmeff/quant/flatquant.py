"""FlatQuant: learnable affine (Kronecker) transforms + W4A4(KV4) post-training quantization.

    from mmeff.quant.flatquant import QuantConfig, quantize
    handle = quantize(model, QuantConfig.preset("w4a4kv4"), calib_ids)   # in place, returns a handle
    model(**inputs)                                                      # fake-quant (CPU) / int4 (CUDA)
    handle.save("out/")  ;  model2, handle2 = load_quantized("out/")

Per decoder layer (Llama, Qwen2, and the LMs inside LLaVA / Qwen2-VL; spec: shared/methods/llm_backbone.md §2):

=============  ========================  ===========================================================
transform      applied to                 where it lives after calibration
=============  ========================  ===========================================================
``attn_in``    input of q/k/v (shared)    online Kronecker ``P1ᵀ X P2``; diag scale folded into
                                           ``input_layernorm``; ``P⁻ᵀ`` merged into Wq, Wk, Wv
``mlp_in``     input of gate/up (shared)  online; diag folded into ``post_attention_layernorm``
``down_in``    input of down_proj         online; diag folded into the rows of ``up_proj``
``v``          v_proj output (head_dim)   offline: into Wv (output side) and Wo (input side)
``o``          heads of the o_proj input  online on the head axis; Wo ← Wo kron(P_o, P_v)⁻ᵀ
``k``          Q and K after RoPE          online in the attention function: K·P_h, Q·P_h⁻ᵀ
=============  ========================  ===========================================================

Activations are quantized per token (dynamic, symmetric) with a learnable clip (LAC), weights per output
channel (symmetric, RTN or GPTQ) with learnable per-channel clips (LWC), K/V asymmetric per head and
token. Calibration is layer-wise: each layer's quantized output is fit (MSE) to its full-precision
output, and the next layer is fed the full-precision output. Everything attaches by forward pre-hooks
and a registered transformers attention function; no host forward is copied.
"""

from __future__ import annotations

import functools
import json
import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from mmeff.quant.gptq import accumulate_hessian, gptq_quantize, quantize_rtn
from mmeff.kernels.dispatch import use_triton
from mmeff.kernels.quant import (
    int4_matmul,
    kron_factors,
    kron_transform,
    kron_transform_quant,
    pack_int4,
    unpack_int4,
)

__all__ = [
    "FlatQuantHandle",
    "KronAffine",
    "QuantConfig",
    "calibration_batches",
    "fake_quant_act",
    "fake_quant_kv",
    "load_quantized",
    "quantize",
]

_PRESETS: dict[str, dict[str, Any]] = {
    "w4a4kv4": {"w_bits": 4, "a_bits": 4, "kv_bits": 4},
    "w4a4": {"w_bits": 4, "a_bits": 4, "kv_bits": 16},
    "w4a16": {"w_bits": 4, "a_bits": 16, "kv_bits": 16},
    "w8a8": {"w_bits": 8, "a_bits": 8, "kv_bits": 16},
}
_LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
            "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
_CLIP_INIT = 4.0  # sigmoid(4) ≈ 0.982, FlatQuant's initial LWC/LAC


@dataclass
class QuantConfig:
    """What to quantize and how to calibrate. ``QuantConfig.preset("w4a4kv4", epochs=5)``.

    ``method``: ``"flatquant"`` (learned Kronecker transforms + diag smoothing + LWC/LAC),
    ``"hadamard"`` (fixed random orthogonal/Hadamard rotations, QuaRot-style, no training) or ``"rtn"``
    (no transform). ``weights``: ``"rtn"`` or ``"gptq"`` on the merged weights. The LM head, embeddings,
    and a VLM's vision tower and projector stay in full precision (only decoder layers are quantized).
    """

    w_bits: int = 4
    a_bits: int = 4
    kv_bits: int = 16
    method: str = "flatquant"
    weights: str = "rtn"
    diag: bool = True
    lwc: bool = True
    lac: bool = True
    samples: int = 32
    seq_len: int = 256
    epochs: int = 5
    batch_size: int = 4
    lr: float = 5e-3
    clip_lr_mult: float = 10.0
    diag_alpha: float = 0.3
    seed: int = 0
    lm_head: bool = False  # also quantize the LM head's weights (RTN, weight-only; it stays FP by default)

    def __post_init__(self) -> None:
        for name in ("w_bits", "a_bits", "kv_bits"):
            v = getattr(self, name)
            if v not in (2, 3, 4, 8, 16):
                raise ValueError(f"{name} must be one of 2, 3, 4, 8, 16 (16 = not quantized), got {v}")
        if self.method not in ("flatquant", "hadamard", "rtn"):
            raise ValueError(f"method must be 'flatquant', 'hadamard' or 'rtn', got {self.method!r}")
        if self.weights not in ("rtn", "gptq"):
            raise ValueError(f"weights must be 'rtn' or 'gptq', got {self.weights!r}")
        for name in ("samples", "seq_len", "epochs", "batch_size"):
            if getattr(self, name) < (0 if name == "epochs" else 1):
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> QuantConfig:
        """``w4a4kv4``, ``w4a4``, ``w4a16`` or ``w8a8``, plus any field overrides."""
        if name.lower() not in _PRESETS:
            raise ValueError(f"unknown preset {name!r}; known: {sorted(_PRESETS)}")
        return cls(**{**_PRESETS[name.lower()], **overrides})

    @property
    def learns(self) -> bool:
        return self.method == "flatquant" and self.epochs > 0


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


def _fake_quant_weight(w: Tensor, bits: int, clip: Tensor | None) -> Tensor:
    """Per-output-channel symmetric fake quantization of ``w (N, K)`` (STE), ``clip (N, 1)`` in (0, 1]."""
    qmax = 2 ** (bits - 1) - 1
    amax = w.abs().amax(1, keepdim=True)
    if clip is not None:
        amax = amax * clip
    scale = (amax / qmax).clamp_min(1e-8)
    return torch.clamp(_round_ste(w / scale), -qmax - 1, qmax) * scale


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
        packed = getattr(x, "_mmeff_int4", None)
        if packed is not None and self.packed and self.bits == 4:
            xq, xs = packed
            y = int4_matmul(xq, xs, self.qweight, self.wscale, out_dtype=x.dtype)
            y = y.view(*x.shape[:-1], self.out_features)
            return y + self.bias if self.bias is not None else y
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}"


def _sig(t: Tensor) -> Tensor:
    return torch.sigmoid(t)


class LayerQuant(nn.Module):
    """Transforms and clip parameters of one decoder layer, and the hooks that apply them online."""

    def __init__(self, layer: nn.Module, cfg: QuantConfig, gen: torch.Generator) -> None:
        super().__init__()
        attn = layer.self_attn
        acfg = attn.config
        self.cfg = cfg
        self.hidden = layer.self_attn.q_proj.in_features
        self.inter = layer.mlp.down_proj.in_features
        self.head_dim = getattr(attn, "head_dim", None) or acfg.hidden_size // acfg.num_attention_heads
        self.num_heads = layer.self_attn.o_proj.in_features // self.head_dim
        self.num_kv = layer.self_attn.k_proj.out_features // self.head_dim
        kind = cfg.method
        train = cfg.learns
        self.attn_in = KronAffine(self.hidden, kind, gen, train)
        self.mlp_in = KronAffine(self.hidden, kind, gen, train)
        self.down_in = KronAffine(self.inter, kind, gen, train)
        self.pv = HeadMatrix(self.head_dim, kind, gen, train)
        self.po = HeadMatrix(self.num_heads, kind, gen, train)
        self.ph = HeadMatrix(self.head_dim, kind, gen, train and cfg.kv_bits < 16)
        clip_train = train
        # LAC: one clip per activation quantizer (attn_in, o_in, mlp_in, down_in) and K/V max/min
        self.lac = nn.Parameter(torch.full((4,), _CLIP_INIT), requires_grad=clip_train and cfg.lac)
        self.kv_lac = nn.Parameter(torch.full((4,), _CLIP_INIT), requires_grad=clip_train and cfg.lac and cfg.kv_bits < 16)
        # LWC: per output channel of each linear
        self.lwc = nn.ParameterDict({
            n.replace(".", "__"): nn.Parameter(torch.full((_get(layer, n).out_features, 1), _CLIP_INIT),
                                               requires_grad=clip_train and cfg.lwc)
            for n in _LINEARS
        })
        self.use_diag = cfg.method == "flatquant" and cfg.diag
        self.merged = False  # after merge: diag folded into norms/up_proj, P_v into weights
        self.real_int4 = True  # use the int4 kernels where Triton runs (see _int4_ready)

    # ------------------------------------------------------------------------------- effective weights
    def effective_weights(self, layer: nn.Module, dtype: torch.dtype = torch.float32,
                          fake_quant: bool = True) -> dict[str, Tensor]:
        """The layer's linear weights (and v bias) with every transform merged, optionally fake-quantized
        with LWC; keys are parameter names relative to ``layer``."""
        a, m, dn = self.attn_in, self.mlp_in, self.down_in
        hd, nkv = self.head_dim, self.num_kv
        W = {n: _get(layer, n).weight for n in _LINEARS}
        out: dict[str, Tensor] = {}
        use = self.use_diag
        cd = dn.c.to(dtype) if use else None

        def inp(t: KronAffine, w: Tensor) -> Tensor:
            if use:
                return t.weight(w, dtype)
            p1, p2 = t.p1.to(dtype), t.p2.to(dtype)
            return kron_transform(w.to(dtype), torch.linalg.inv(p1).T, torch.linalg.inv(p2).T)

        out["self_attn.q_proj.weight"] = inp(a, W["self_attn.q_proj"])
        out["self_attn.k_proj.weight"] = inp(a, W["self_attn.k_proj"])
        pv = self.pv.m.to(dtype)
        wv = inp(a, W["self_attn.v_proj"]).view(nkv, hd, -1)
        out["self_attn.v_proj.weight"] = torch.einsum("ji,hjk->hik", pv, wv).reshape(nkv * hd, -1)
        vb = layer.self_attn.v_proj.bias
        if vb is not None:
            out["self_attn.v_proj.bias"] = (vb.to(dtype).view(nkv, hd) @ pv).reshape(-1)
        # o_proj input is x (P_o ⊗ P_v): weight ← Wo (P_o ⊗ P_v)⁻ᵀ
        out["self_attn.o_proj.weight"] = kron_transform(W["self_attn.o_proj"].to(dtype), self.po.inv_t(dtype),
                                                        self.pv.inv_t(dtype))
        out["mlp.gate_proj.weight"] = inp(m, W["mlp.gate_proj"])
        up = inp(m, W["mlp.up_proj"])
        out["mlp.up_proj.weight"] = up * cd[:, None] if use else up
        ub = layer.mlp.up_proj.bias
        if ub is not None and use:
            out["mlp.up_proj.bias"] = ub.to(dtype) * cd
        out["mlp.down_proj.weight"] = inp(dn, W["mlp.down_proj"])
        if fake_quant and self.cfg.w_bits < 16:
            for n in _LINEARS:
                key = f"{n}.weight"
                clip = _sig(self.lwc[n.replace(".", "__")]).to(dtype) if self.cfg.lwc else None
                out[key] = _fake_quant_weight(out[key], self.cfg.w_bits, clip)
        return out

    # ----------------------------------------------------------------------------------- online hooks
    def act(self, x: Tensor, t: KronAffine, slot: int) -> Tensor:
        """Online transform + per-token activation quantization for quantizer ``slot``."""
        clip = _sig(self.lac[slot]) if self.cfg.lac else 1.0
        if self._int4_ready(x):
            return self._int4(x, t.p1, t.p2, clip)
        y = t(x, use_diag=self.use_diag and not self.merged)
        return fake_quant_act(y, self.cfg.a_bits, clip)

    def o_act(self, x: Tensor) -> Tensor:
        # P_v was merged into v_proj, so only P_o runs online: on the head axis of (…, heads, head_dim).
        clip = _sig(self.lac[1]) if self.cfg.lac else 1.0
        eye = torch.eye(self.head_dim, device=x.device)
        if self._int4_ready(x):
            return self._int4(x, self.po.m, eye, clip)
        y = kron_transform(x.float(), self.po.m, eye).to(x.dtype)
        return fake_quant_act(y, self.cfg.a_bits, clip)

    def _int4_ready(self, x: Tensor) -> bool:
        # The fused kernel + int4 GEMM run after merging, for W4A4, where Triton runs (CUDA, or forced).
        return self.merged and self.real_int4 and self.cfg.a_bits == 4 and self.cfg.w_bits == 4 and use_triton(x)

    @staticmethod
    def _int4(x: Tensor, p1: Tensor, p2: Tensor, clip: Tensor | float) -> Tensor:
        """Transform → clip → int4 → pack in one kernel; the packed codes ride on a view of ``x`` to the
        :class:`QuantLinear` consumers (q/k/v share one), which run the int4 GEMM."""
        packed, scale = kron_transform_quant(x.reshape(-1, x.shape[-1]), p1, p2, clip_ratio=clip)
        carrier = x.view_as(x)
        carrier._mmeff_int4 = (packed, scale)
        return carrier

    def hooks(self, layer: nn.Module) -> list[Any]:
        """Register the online pre-hooks on ``layer``; returns their handles."""

        def attn_pre(mod: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
            if "hidden_states" in kwargs:
                kwargs["hidden_states"] = self.act(kwargs["hidden_states"], self.attn_in, 0)
            else:
                args = (self.act(args[0], self.attn_in, 0), *args[1:])
            return args, kwargs

        def first_arg(fn: Callable[[Tensor], Tensor]) -> Callable[[nn.Module, tuple], tuple]:
            return lambda mod, args: (fn(args[0]), *args[1:])

        attn = layer.self_attn
        attn.__dict__["_mmeff_fq"] = self  # a plain attribute: not a submodule, so not in the host's state_dict
        return [
            attn.register_forward_pre_hook(attn_pre, with_kwargs=True),
            attn.o_proj.register_forward_pre_hook(first_arg(self.o_act)),
            layer.mlp.register_forward_pre_hook(first_arg(lambda x: self.act(x, self.mlp_in, 2))),
            layer.mlp.down_proj.register_forward_pre_hook(first_arg(lambda x: self.act(x, self.down_in, 3))),
        ]

    def qk_kv(self, q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """In the attention function: ``K·P_h``, ``Q·P_h⁻ᵀ`` (keeps QKᵀ), then K/V fake quantization."""
        bits = self.cfg.kv_bits
        if bits >= 16:
            return q, k, v
        ph = self.ph.m.to(torch.float32)
        k = (k.float() @ ph).to(k.dtype)
        q = (q.float() @ torch.linalg.inv(ph).T).to(q.dtype)
        c = _sig(self.kv_lac) if self.cfg.lac else torch.ones(4, device=k.device)
        return q, fake_quant_kv(k, bits, c[0], c[1]), fake_quant_kv(v, bits, c[2], c[3])


def _get(root: nn.Module, dotted: str) -> nn.Module:
    for part in dotted.split("."):
        root = getattr(root, part)
    return root


# ------------------------------------------------------------------------------ attention function seam
def _fq_attention(base: str) -> Callable[..., Any]:
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    def fn(module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Any, **kwargs: Any) -> Any:
        lq: LayerQuant | None = getattr(module, "_mmeff_fq", None)
        if lq is not None:
            query, key, value = lq.qk_kv(query, key, value)
        if base == "eager":
            mod = __import__(type(module).__module__, fromlist=["eager_attention_forward"])
            return mod.eager_attention_forward(module, query, key, value, attention_mask, **kwargs)
        return ALL_ATTENTION_FUNCTIONS[base](module, query, key, value, attention_mask, **kwargs)

    return fn


@functools.cache
def _register_attention(base: str) -> str:
    """Register the K/V-quantizing wrapper of ``base`` attention (once per base); returns its name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    if base not in ("sdpa", "eager"):
        raise ValueError(f"FlatQuant's KV quantization wraps 'sdpa' or 'eager' attention, not {base!r}")
    name = f"mmeff_flatquant_{base}"
    AttentionInterface.register(name, _fq_attention(base))
    AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[base])
    return name


# ------------------------------------------------------------------------------------------- the model
def decoder_of(model: nn.Module) -> nn.Module:
    """The decoder of an HF causal LM or VLM whose layers FlatQuant can quantize; ``TypeError`` otherwise."""
    dec = model.get_decoder() if hasattr(model, "get_decoder") else None
    layers = getattr(dec, "layers", None)
    ok = isinstance(layers, nn.ModuleList) and len(layers) > 0 and all(
        all(_has(lay, n) for n in _LINEARS) for lay in layers)
    if not ok:
        raise TypeError(
            f"FlatQuant supports Llama/Qwen2-style decoders (q/k/v/o_proj, gate/up/down_proj) and the LMs of "
            f"LLaVA / Qwen2-VL; {type(model).__name__} is not one"
        )
    return dec


def _has(root: nn.Module, dotted: str) -> bool:
    try:
        return isinstance(_get(root, dotted), (nn.Linear, QuantLinear))
    except AttributeError:
        return False


def calibration_batches(tokenizer: Any, text: str, samples: int, seq_len: int, seed: int = 0) -> Tensor:
    """``(samples, seq_len)`` token ids cut at random offsets from ``text`` (like FlatQuant's WikiText-2
    sampling)."""
    ids = torch.tensor(tokenizer(text, add_special_tokens=False).input_ids)
    if ids.numel() <= seq_len:
        raise ValueError(f"calibration text has {ids.numel()} tokens; need more than seq_len={seq_len}")
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seq_len, (samples,), generator=g)
    return torch.stack([ids[s : s + seq_len] for s in starts.tolist()])


class _Stop(Exception):
    pass


@torch.no_grad()
def _capture_layer0(model: nn.Module, dec: nn.Module, ids: Tensor, bs: int) -> list[tuple[Tensor, dict[str, Any]]]:
    """``(hidden_states, kwargs)`` entering the first decoder layer for every calibration batch, read by a
    pre-hook (the Catcher pattern) so no layer signature is assumed: position embeddings, masks and
    Qwen2-VL's 3-D positions come along as the host computed them."""
    caught: list[tuple[Tensor, dict[str, Any]]] = []

    def pre(mod: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        h = kwargs.get("hidden_states", args[0] if args else None)
        rest = {k: v for k, v in kwargs.items() if k not in ("hidden_states", "past_key_values", "use_cache")}
        caught.append((h, rest))
        raise _Stop

    handle = dec.layers[0].register_forward_pre_hook(pre, with_kwargs=True)
    try:
        for i in range(0, ids.shape[0], bs):
            try:
                model(input_ids=ids[i : i + bs], use_cache=False)
            except _Stop:
                pass
    finally:
        handle.remove()
    return caught


@contextmanager
def _attached(lq: LayerQuant, layer: nn.Module) -> Iterator[None]:
    hs = lq.hooks(layer)
    try:
        yield
    finally:
        for h in hs:
            h.remove()


def _smooth_init(lq: LayerQuant, layer: nn.Module, acts: dict[str, Tensor], alpha: float) -> None:
    """SmoothQuant-style start for the diag scales: ``c = max|W|^(1-α) / max|X|^α`` per input channel."""
    pairs = {
        "attn_in": (lq.attn_in, ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]),
        "mlp_in": (lq.mlp_in, ["mlp.gate_proj", "mlp.up_proj"]),
        "down_in": (lq.down_in, ["mlp.down_proj"]),
    }
    for key, (t, names) in pairs.items():
        wmax = torch.cat([_get(layer, n).weight.detach().abs().float() for n in names], 0).amax(0)
        xmax = acts[key].float()
        c = (wmax.clamp_min(1e-5) ** (1 - alpha)) / (xmax.clamp_min(1e-5) ** alpha)
        t.c.data.copy_(c.clamp_min(1e-5))


@torch.no_grad()
def _fp_pass(layer: nn.Module, xs: list[Tensor], kws: list[dict[str, Any]]) -> tuple[list[Tensor], dict[str, Tensor]]:
    """One full-precision pass over the calibration batches: the layer's outputs and the per-channel
    input maxima of q/k/v, gate/up and down_proj (for the diag-scale start)."""
    maxima: dict[str, Tensor] = {}
    outs: list[Tensor] = []

    def rec(key: str) -> Callable[..., None]:
        def hook(mod: nn.Module, args: tuple, kwargs: dict[str, Any] | None = None) -> None:
            x = (kwargs or {}).get("hidden_states", args[0] if args else None)
            m = x.detach().abs().flatten(0, -2).amax(0).float()
            maxima[key] = torch.maximum(maxima[key], m) if key in maxima else m
        return hook

    hs = [layer.self_attn.register_forward_pre_hook(rec("attn_in"), with_kwargs=True),
          layer.mlp.register_forward_pre_hook(rec("mlp_in")),
          layer.mlp.down_proj.register_forward_pre_hook(rec("down_in"))]
    try:
        outs = [_layer_out(layer(x, **k)).detach() for x, k in zip(xs, kws)]
    finally:
        for h in hs:
            h.remove()
    return outs, maxima


def _layer_out(out: Any) -> Tensor:
    return out[0] if isinstance(out, tuple) else out


class FlatQuantHandle:
    """A quantized model's state: per-layer transforms, the attention function, and :meth:`save`."""

    def __init__(self, model: nn.Module, cfg: QuantConfig, layers: list[LayerQuant], base_attn: str,
                 report: dict[str, Any]) -> None:
        self.model = model
        self.cfg = cfg
        self.layers = layers
        self.base_attn = base_attn
        self.report = report
        self._hooks: list[Any] = []

    def attach(self) -> None:
        """Install the online hooks and the K/V attention function (done by :func:`quantize`)."""
        dec = decoder_of(self.model)
        for layer, lq in zip(dec.layers, self.layers):
            self._hooks += lq.hooks(layer)
        if self.cfg.kv_bits < 16:
            dec.config._attn_implementation = _register_attention(self.base_attn)

    def remove(self) -> None:
        """Take the online transforms off (the weights stay merged and quantized, so outputs are wrong
        without them; for debugging and tests)."""
        while self._hooks:
            self._hooks.pop().remove()
        dec = decoder_of(self.model)
        dec.config._attn_implementation = self.base_attn
        for layer in dec.layers:
            layer.self_attn.__dict__.pop("_mmeff_fq", None)

    def quantized(self) -> list[str]:
        """Model-relative names of the :class:`QuantLinear` layers."""
        return [n for n, m in self.model.named_modules() if isinstance(m, QuantLinear)]

    def save(self, path: str | Path) -> None:
        """Write ``model.safetensors`` (int4 codes packed two per byte, scales, transforms, the rest of the
        model in its dtype) and ``mmeff_quant.json``; reload with :func:`load_quantized`."""
        import shutil
        import tempfile

        from safetensors.torch import save_file

        from mmeff.checkpoint import atomic_write, file_sha256

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        sd = {k: v.detach().contiguous() for k, v in self.model.state_dict().items()}
        prefix = _prefix_of(self.model, decoder_of(self.model))
        for i, lq in enumerate(self.layers):
            for k, v in lq.state_dict().items():
                sd[f"mmeff_fq.{i}.{k}"] = v.detach().contiguous()
        # tied embeddings appear twice in state_dict; safetensors refuses shared storage
        seen: dict[int, str] = {}
        for k in list(sd):
            ptr = sd[k].data_ptr()
            if ptr in seen and sd[k].numel():
                sd[k] = sd[k].clone()
            seen[ptr] = k
        # each file is replaced atomically, and mmeff_quant.json (which records the weights' sha256) last:
        # a crash part-way leaves a record that no longer matches, which load_quantized reports
        weights = atomic_write(path / "model.safetensors", lambda t: save_file(sd, str(t)))
        with tempfile.TemporaryDirectory(dir=path, prefix=".config-") as staged:  # save_pretrained's own checks
            self.model.config.save_pretrained(staged)
            atomic_write(path / "config.json", lambda t: shutil.copyfile(Path(staged) / "config.json", t))
        meta = {"quant_config": asdict(self.cfg), "base_attn": self.base_attn, "decoder_prefix": prefix,
                "quantized": self.quantized(), "architecture": type(self.model).__name__, "report": self.report,
                "sha256": {weights.name: file_sha256(weights)}}
        text = json.dumps(meta, indent=2, default=str)
        atomic_write(path / "mmeff_quant.json", lambda t: t.write_text(text))


def _prefix_of(model: nn.Module, dec: nn.Module) -> str:
    for name, mod in model.named_modules():
        if mod is dec:
            return name
    raise ValueError("decoder not found in model")


def quantize(
    model: nn.Module,
    cfg: QuantConfig,
    calib_ids: Tensor | None = None,
    progress: bool = True,
) -> FlatQuantHandle:
    """Calibrate (if ``cfg.method == "flatquant"``), merge in float64, quantize weights, attach online parts.

    ``calib_ids (S, T)`` token ids (``calibration_batches``); needed for FlatQuant training, GPTQ and the
    diag-scale initialisation. The model is changed in place; returns a :class:`FlatQuantHandle`.
    """
    dec = decoder_of(model)
    base_attn = dec.config._attn_implementation
    if base_attn not in ("sdpa", "eager"):
        raise ValueError(f"FlatQuant runs on 'sdpa' or 'eager' attention; the model uses {base_attn!r}")
    needs_data = cfg.learns or cfg.weights == "gptq" or (cfg.method == "flatquant" and cfg.diag)
    if needs_data and calib_ids is None:
        raise ValueError(f"method={cfg.method!r} weights={cfg.weights!r} needs calib_ids (S, T) token ids")
    if calib_ids is not None and (calib_ids.ndim != 2 or calib_ids.dtype != torch.long):
        raise ValueError(f"calib_ids must be (samples, seq_len) int64, got {tuple(calib_ids.shape)} {calib_ids.dtype}")
    model.eval()
    gen = torch.Generator().manual_seed(cfg.seed)
    device = next(model.parameters()).device
    t0 = time.perf_counter()
    xs: list[Tensor] = []
    kws: list[dict[str, Any]] = []
    if calib_ids is not None:
        caught = _capture_layer0(model, dec, calib_ids.to(device), cfg.batch_size)
        xs, kws = [c[0] for c in caught], [c[1] for c in caught]

    layers: list[LayerQuant] = []
    losses: list[tuple[float, float]] = []
    bar = tqdm(dec.layers, desc=f"FlatQuant {cfg.method}", disable=not progress, unit="layer")
    for layer in bar:
        lq = LayerQuant(layer, cfg, gen).to(device)
        fp_out: list[Tensor] = []
        if xs:
            fp_out, maxima = _fp_pass(layer, xs, kws)
            if cfg.method == "flatquant" and cfg.diag:
                _smooth_init(lq, layer, maxima, cfg.diag_alpha)
        if cfg.learns:
            losses.append(_calibrate_layer(lq, layer, xs, kws, fp_out, cfg))
            bar.set_postfix(mse=f"{losses[-1][1]:.3g}")
        _merge_layer(lq, layer, xs, kws, cfg)
        layers.append(lq)
        if xs:
            xs = fp_out  # the next layer sees full-precision outputs (FlatQuant's choice)
    if cfg.lm_head and cfg.w_bits < 16:
        head = model.get_output_embeddings()
        if not isinstance(head, nn.Linear):
            raise ValueError(f"lm_head=True needs an nn.Linear output embedding, got {type(head).__name__}")
        if head.weight is model.get_input_embeddings().weight:
            head = nn.Linear(head.in_features, head.out_features, bias=False).to(head.weight)
            head.weight.data.copy_(model.get_input_embeddings().weight.data)  # untie: embeddings stay FP
            for c in {id(model.config): model.config, id(model.config.get_text_config()): model.config.get_text_config()}.values():
                c.tie_word_embeddings = False
        q, sc = quantize_rtn(head.weight.double(), bits=cfg.w_bits)
        model.set_output_embeddings(QuantLinear.from_codes(head, q.to(torch.int8), sc, cfg.w_bits))
    handle = FlatQuantHandle(model, cfg, layers, base_attn,
                             {"calibration_s": time.perf_counter() - t0, "layer_mse": losses})
    handle.attach()
    return handle


def _calibrate_layer(lq: LayerQuant, layer: nn.Module, xs: list[Tensor], kws: list[dict[str, Any]],
                     fp_out: list[Tensor], cfg: QuantConfig) -> tuple[float, float]:
    """Fit the layer's transforms and clips to its full-precision output; returns (first, last) MSE."""
    from torch.func import functional_call

    base_attn = layer.self_attn.config._attn_implementation
    trans = [p for n, p in lq.named_parameters() if p.requires_grad and not ("lac" in n or "lwc" in n)]
    clips = [p for n, p in lq.named_parameters() if p.requires_grad and ("lac" in n or "lwc" in n)]
    opt = torch.optim.AdamW([{"params": trans, "lr": cfg.lr}, {"params": clips, "lr": cfg.lr * cfg.clip_lr_mult}])
    steps = cfg.epochs * len(xs)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(steps, 1), eta_min=cfg.lr * 1e-3)
    for p in layer.parameters():
        p.requires_grad_(False)
    layer.self_attn.config._attn_implementation = _register_attention(base_attn) if cfg.kv_bits < 16 else base_attn
    first = last = float("nan")
    try:
        with _attached(lq, layer), torch.enable_grad():
            for ep in range(cfg.epochs):
                tot = 0.0
                for x, k, y in zip(xs, kws, fp_out):
                    params = lq.effective_weights(layer)
                    out = _layer_out(functional_call(layer, params, (x,), k, strict=False))
                    loss = F.mse_loss(out.float(), y.float())
                    opt.zero_grad(set_to_none=True)
                    (loss / loss.detach().clamp_min(1e-12)).backward()
                    opt.step()
                    sched.step()
                    tot += loss.item()
                if ep == 0:
                    first = tot / len(xs)
                last = tot / len(xs)
    finally:
        layer.self_attn.config._attn_implementation = base_attn
    return first, last


@torch.no_grad()
def _merge_layer(lq: LayerQuant, layer: nn.Module, xs: list[Tensor], kws: list[dict[str, Any]],
                 cfg: QuantConfig) -> None:
    """Merge transforms into the weights in float64, fold the diag scales, quantize (RTN/GPTQ)."""
    for p in lq.parameters():
        p.requires_grad_(False)
    merged = lq.effective_weights(layer, dtype=torch.float64, fake_quant=False)
    if lq.use_diag:
        layer.input_layernorm.weight.mul_(lq.attn_in.c.to(layer.input_layernorm.weight.dtype))
        layer.post_attention_layernorm.weight.mul_(lq.mlp_in.c.to(layer.post_attention_layernorm.weight.dtype))
    for k, v in merged.items():
        _get(layer, k).data.copy_(v.to(_get(layer, k).dtype))
    lq.merged = True
    hess: dict[str, Tensor] = {}
    if cfg.weights == "gptq" and xs:
        hess = _hessians(lq, layer, xs, kws)
    if cfg.w_bits < 16:
        for n in _LINEARS:
            lin = _get(layer, n)
            w = lin.weight.double()
            clip = _sig(lq.lwc[n.replace(".", "__")]).double() if cfg.lwc else None
            if n in hess:
                q, s = gptq_quantize(w, hess[n], bits=cfg.w_bits, clip=clip)
            else:
                q, s = quantize_rtn(w, bits=cfg.w_bits, clip=clip)
            layer.set_submodule(n, QuantLinear.from_codes(lin, q.to(torch.int8), s, cfg.w_bits))


@torch.no_grad()
def _hessians(lq: LayerQuant, layer: nn.Module, xs: list[Tensor], kws: list[dict[str, Any]]) -> dict[str, Tensor]:
    """GPTQ Hessians ``2XᵀX/n`` of each linear's (transformed, quantized) input on the calibration data."""
    acc: dict[str, tuple[Tensor | None, int]] = {n: (None, 0) for n in _LINEARS}

    def rec(n: str) -> Callable[[nn.Module, tuple], None]:
        def hook(mod: nn.Module, args: tuple) -> None:
            h, c = acc[n]
            acc[n] = accumulate_hessian(h, args[0].detach(), c)
        return hook

    base = layer.self_attn.config._attn_implementation
    hs = [_get(layer, n).register_forward_pre_hook(rec(n)) for n in _LINEARS]
    try:
        with _attached(lq, layer):
            if lq.cfg.kv_bits < 16:
                layer.self_attn.config._attn_implementation = _register_attention(base)
            for x, k in zip(xs, kws):
                layer(x, **k)
    finally:
        layer.self_attn.config._attn_implementation = base
        for h in hs:
            h.remove()
    return {n: h for n, (h, _) in acc.items() if h is not None}


def load_quantized(path: str | Path, dtype: torch.dtype | None = None, device: str | None = None) -> tuple[nn.Module, FlatQuantHandle]:
    """Rebuild a model written by :meth:`FlatQuantHandle.save`: config → model, codes → weights,
    transforms → hooks. Returns ``(model, handle)`` ready for inference.

    ``FileNotFoundError`` / one-line ``ValueError`` naming the file for anything else: not a folder, a
    missing or unreadable ``mmeff_quant.json`` / ``config.json`` / ``model.safetensors``, weights that no
    longer match the sha256 recorded at save time (folders saved before that record load unchecked), or
    tensors that do not fit the recorded model."""
    import transformers
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    from transformers import AutoConfig

    from mmeff.checkpoint import file_sha256

    path = Path(path)
    what = "a folder written by FlatQuantHandle.save"
    if path.is_file():
        raise ValueError(f"{path} is a file, not {what}")
    meta_file, weights = path / "mmeff_quant.json", path / "model.safetensors"
    if not meta_file.is_file():
        raise FileNotFoundError(f"{meta_file} not found: {path} is not {what}")
    try:
        meta = json.loads(meta_file.read_text())
        cfg = QuantConfig(**{f.name: meta["quant_config"][f.name] for f in fields(QuantConfig)})
        arch, quantized, base_attn = meta["architecture"], list(meta["quantized"]), meta["base_attn"]
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"{meta_file} is not the record FlatQuantHandle.save writes ({e!r})") from e
    if not weights.is_file():
        raise FileNotFoundError(f"{weights} not found (or not a file): {path} is an incomplete quantized folder")
    want = (meta.get("sha256") or {}).get(weights.name) if isinstance(meta.get("sha256"), dict) else None
    if want is not None:
        got = file_sha256(weights)
        if got != want:
            raise ValueError(f"{weights} does not match the sha256 in {meta_file.name} (got {got[:16]}..., "
                             f"expected {str(want)[:16]}...): the file is corrupt, altered or from another save")
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise ValueError(f"{path / 'config.json'} is missing or not a transformers config ({e.__class__.__name__})") from e
    # the name comes from a file: only a transformers causal-LM class may be built from it, never any other
    # attribute of the module (e.g. a function that would be called with the config)
    cls = getattr(transformers, arch, None) if isinstance(arch, str) and arch.endswith("ForCausalLM") else None
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        raise ValueError(f"{meta_file}: architecture {arch!r} is not a transformers *ForCausalLM class; "
                         f"a FlatQuant folder holds a causal LM")
    with torch.device("meta"):
        model = cls(config)
    try:
        sd = load_file(str(weights))
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{weights} is not a safetensors file ({' '.join(str(e).split())})") from e
    for name in quantized:
        try:
            lin = model.get_submodule(name)
        except AttributeError as e:
            raise ValueError(f"{meta_file} lists {name!r}, which {arch} does not have") from e
        model.set_submodule(name, QuantLinear(lin.in_features, lin.out_features, cfg.w_bits, lin.bias is not None,
                                              lin.weight.dtype, "meta"))
    lq_state = {k: sd.pop(k) for k in [k for k in sd if k.startswith("mmeff_fq.")]}
    try:
        missing, unexpected = model.load_state_dict(sd, strict=False, assign=True)
    except RuntimeError as e:  # shape mismatches
        raise ValueError(f"{weights} does not fit {arch}: {str(e).splitlines()[-1].strip()}") from e
    missing = [m for m in missing if not m.endswith("rotary_emb.inv_freq")]
    if missing or unexpected:
        raise ValueError(f"{weights} does not match {arch}: missing {missing[:5]}, unexpected {unexpected[:5]}")
    model.tie_weights()
    _rebuild_buffers(model)
    if dtype is not None:
        model = model.to(dtype)
    if device is not None:
        model = model.to(device)
    model.eval()
    dec = decoder_of(model)
    gen = torch.Generator().manual_seed(cfg.seed)
    layers = []
    for i, layer in enumerate(dec.layers):
        lq = LayerQuant(layer, cfg, gen)
        try:
            lq.load_state_dict({k.split(".", 2)[2]: v for k, v in lq_state.items() if k.split(".")[1] == str(i)})
        except RuntimeError as e:
            raise ValueError(f"{weights}: the transforms of layer {i} are missing or do not fit "
                             f"({' '.join(str(e).split())[:200]})") from e
        lq.merged = True
        for p in lq.parameters():
            p.requires_grad_(False)
        layers.append(lq.to(next(model.parameters()).device))
    handle = FlatQuantHandle(model, cfg, layers, base_attn, meta.get("report", {}))
    handle.attach()
    return model, handle


def _rebuild_buffers(model: nn.Module) -> None:
    # Non-persistent buffers (rotary inv_freq) are not in the checkpoint and were created on the meta
    # device; the modules holding them are rebuilt from their own config on the CPU.
    for name, mod in list(model.named_modules()):
        if any(b.is_meta for b in mod.buffers(recurse=False)):
            cfg = getattr(mod, "config", None)
            if cfg is None:
                raise ValueError(f"cannot rebuild the buffers of {name} ({type(mod).__name__}): it has no config")
            parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
            setattr(parent, name.rsplit(".", 1)[-1], type(mod)(config=cfg))
    left = [n for n, b in model.named_buffers() if b.is_meta]
    if left:
        raise ValueError(f"buffers {left[:3]} are still on the meta device after loading")


def linear_names(model: nn.Module) -> list[str]:
    """Model-relative names of the linears FlatQuant quantizes (everything else stays in full precision)."""
    dec = decoder_of(model)
    prefix = _prefix_of(model, dec)
    return [f"{prefix}.layers.{i}.{n}" for i in range(len(dec.layers)) for n in _LINEARS]
