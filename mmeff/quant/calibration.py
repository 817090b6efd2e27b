"""FlatQuant per decoder layer: the configuration, the layer's transforms and hooks, and their calibration.

:class:`QuantConfig` says what to quantize and how to calibrate. :class:`LayerQuant` holds one decoder
layer's transforms and clips and applies them online (forward pre-hooks plus a registered transformers
attention function, :func:`register_attention`). :func:`quantize_layer` runs the layer-wise recipe on
one layer: a full-precision pass over the calibration inputs (:func:`capture_layer_inputs` reads the
first layer's), the SmoothQuant-style diag start, the MSE fit of transforms and clips, and the float64
merge into quantized weights (RTN or GPTQ). :func:`mmeff.quant.flatquant.quantize` loops it over the
decoder.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from mmeff.hfconfig import without_cache_kwargs
from mmeff.kernels.dispatch import use_triton
from mmeff.kernels.quant import kron_transform, kron_transform_quant
from mmeff.quant.gptq import accumulate_hessian, gptq_quantize, quantize_rtn
from mmeff.quant.transforms import (
    LINEARS,
    HeadMatrix,
    KronAffine,
    QuantLinear,
    fake_quant_act,
    fake_quant_kv,
    fake_quant_weight,
    lwc_clamp,
    submodule,
)

__all__ = [
    "BUDGETS",
    "LayerQuant",
    "QuantConfig",
    "capture_layer_inputs",
    "quantize_layer",
    "register_attention",
]

_PRESETS: dict[str, dict[str, Any]] = {
    "w4a4kv4": {"w_bits": 4, "a_bits": 4, "kv_bits": 4},
    "w4a4": {"w_bits": 4, "a_bits": 4, "kv_bits": 16},
    "w4a8": {"w_bits": 4, "a_bits": 8, "kv_bits": 16},
    "w4a16": {"w_bits": 4, "a_bits": 16, "kv_bits": 16},
    "w8a8": {"w_bits": 8, "a_bits": 8, "kv_bits": 16},
}
#: calibration budgets: the official scripts' (WikiText-2, 128 x 2048 tokens, 15 epochs, batch 4) and one
#: that runs on a laptop CPU in minutes for a 135M model (what ``mmeff bench flatquant`` uses by default)
BUDGETS: dict[str, dict[str, Any]] = {
    "paper": {"samples": 128, "seq_len": 2048, "epochs": 15, "batch_size": 4},
    "cpu": {"samples": 16, "seq_len": 256, "epochs": 3, "batch_size": 4},
}
_CLIP_INIT = 4.0  # sigmoid(4) ≈ 0.982, FlatQuant's initial LWC/LAC


@dataclass
class QuantConfig:
    """What to quantize and how to calibrate. ``QuantConfig.preset("w4a4kv4", epochs=5)``.

    ``method``: ``"flatquant"`` (learned Kronecker transforms + diag smoothing + LWC/LAC),
    ``"hadamard"`` (fixed random orthogonal/Hadamard rotations, QuaRot-style, no training, no clipping)
    or ``"rtn"`` (no transform, no clipping: plain round-to-nearest). ``weights``: ``"rtn"`` or
    ``"gptq"`` on the merged weights. The LM head, embeddings, and a VLM's vision tower and projector
    stay in full precision (only decoder layers are quantized). The calibration defaults are the
    official scripts' (:data:`BUDGETS` ``"paper"``); ``preset(..., budget="cpu")`` is the small one.
    """

    w_bits: int = 4
    a_bits: int = 4
    kv_bits: int = 16
    method: str = "flatquant"
    weights: str = "rtn"
    diag: bool = True
    lwc: bool = True
    lac: bool = True
    samples: int = 128
    seq_len: int = 2048
    epochs: int = 15
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
    def preset(cls, name: str, budget: str | None = None, **overrides: Any) -> QuantConfig:
        """Bits ``w4a4kv4``, ``w4a4``, ``w4a8``, ``w4a16`` or ``w8a8``; calibration ``budget`` ``"paper"``
        (the defaults) or ``"cpu"`` (:data:`BUDGETS`); then any field overrides."""
        if name.lower() not in _PRESETS:
            raise ValueError(f"unknown preset {name!r}; known: {sorted(_PRESETS)}")
        if budget is not None and budget not in BUDGETS:
            raise ValueError(f"unknown calibration budget {budget!r}; known: {sorted(BUDGETS)}")
        return cls(**{**_PRESETS[name.lower()], **(BUDGETS[budget] if budget else {}), **overrides})

    @property
    def learns(self) -> bool:
        """Whether calibration trains the transforms and clips (FlatQuant with at least one epoch)."""
        return self.method == "flatquant" and self.epochs > 0


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
        # LWC: per output channel of each linear, two-sided as the official (column 0 shrinks the row's
        # maximum, column 1 its minimum)
        self.lwc = nn.ParameterDict({
            n.replace(".", "__"): nn.Parameter(torch.full((submodule(layer, n).out_features, 2), _CLIP_INIT),
                                               requires_grad=clip_train and cfg.lwc)
            for n in LINEARS
        })
        self.use_lwc = cfg.lwc and cfg.method == "flatquant" and cfg.w_bits < 16
        self.use_lac = cfg.lac and cfg.method == "flatquant"
        self.use_diag = cfg.method == "flatquant" and cfg.diag
        self.merged = False  # after merge: diag folded into norms/up_proj, P_v into weights
        self.real_int4 = True  # use the int4 kernels where Triton runs (see _int4_ready)

    # ------------------------------------------------------------------------------- effective weights
    def effective_weights(self, layer: nn.Module, dtype: torch.dtype = torch.float32,
                          fake_quant: bool = True) -> dict[str, Tensor]:
        """The layer's linear weights (and v bias) with every transform merged and LWC applied, optionally
        fake-quantized; keys are parameter names relative to ``layer``.

        The order is the official ``FlatQuantizedLinear``'s: input-side transform, then the LWC clamp,
        then the output-side transform (only v_proj has one: ``P_v``), then the quantizer's plain
        symmetric range on what results.
        """
        a, m, dn = self.attn_in, self.mlp_in, self.down_in
        hd, nkv = self.head_dim, self.num_kv
        W = {n: submodule(layer, n).weight for n in LINEARS}
        out: dict[str, Tensor] = {}
        use = self.use_diag
        cd = dn.c.to(dtype) if use else None

        def inp(t: KronAffine, n: str) -> Tensor:
            if use:
                w = t.weight(W[n], dtype)
            else:
                p1, p2 = t.p1.to(dtype), t.p2.to(dtype)
                w = kron_transform(W[n].to(dtype), torch.linalg.inv(p1).T, torch.linalg.inv(p2).T)
            return self.clamp(n, w)

        out["self_attn.q_proj.weight"] = inp(a, "self_attn.q_proj")
        out["self_attn.k_proj.weight"] = inp(a, "self_attn.k_proj")
        pv = self.pv.m.to(dtype)
        wv = inp(a, "self_attn.v_proj").view(nkv, hd, -1)
        out["self_attn.v_proj.weight"] = torch.einsum("ji,hjk->hik", pv, wv).reshape(nkv * hd, -1)
        vb = layer.self_attn.v_proj.bias
        if vb is not None:
            out["self_attn.v_proj.bias"] = (vb.to(dtype).view(nkv, hd) @ pv).reshape(-1)
        # o_proj input is x (P_o ⊗ P_v): weight ← Wo (P_o ⊗ P_v)⁻ᵀ
        wo = kron_transform(W["self_attn.o_proj"].to(dtype), self.po.inv_t(dtype), self.pv.inv_t(dtype))
        out["self_attn.o_proj.weight"] = self.clamp("self_attn.o_proj", wo)
        out["mlp.gate_proj.weight"] = inp(m, "mlp.gate_proj")
        # a positive row scale commutes with the row-wise clamp and quantizer, so c may come after LWC
        up = inp(m, "mlp.up_proj")
        out["mlp.up_proj.weight"] = up * cd[:, None] if use else up
        ub = layer.mlp.up_proj.bias
        if ub is not None and use:
            out["mlp.up_proj.bias"] = ub.to(dtype) * cd
        out["mlp.down_proj.weight"] = inp(dn, "mlp.down_proj")
        if fake_quant and self.cfg.w_bits < 16:
            for n in LINEARS:
                out[f"{n}.weight"] = fake_quant_weight(out[f"{n}.weight"], self.cfg.w_bits, None)
        return out

    def clamp(self, name: str, w: Tensor) -> Tensor:
        """LWC of linear ``name`` on its input-transformed weight ``w (N, K)`` (identity without LWC)."""
        if not self.use_lwc:
            return w
        s = _sig(self.lwc[name.replace(".", "__")]).to(w.dtype)
        return lwc_clamp(w, s[:, :1], s[:, 1:])

    # ----------------------------------------------------------------------------------- online hooks
    def act(self, x: Tensor, t: KronAffine, slot: int) -> Tensor:
        """Online transform + per-token activation quantization for quantizer ``slot``."""
        clip = _sig(self.lac[slot]) if self.use_lac else 1.0
        if self._int4_ready(x):
            return self._int4(x, t.p1, t.p2, clip)
        # attn_in/mlp_in scales go into the norms only at the merge, so they run online until then;
        # down_proj's scale is folded into up_proj's rows by effective_weights from the start (the
        # weights calibrated are the weights deployed), so its input already carries it
        diag = self.use_diag and not self.merged and t is not self.down_in
        y = t(x, use_diag=diag)
        return fake_quant_act(y, self.cfg.a_bits, clip)

    def o_act(self, x: Tensor) -> Tensor:
        """Online transform + quantization of the o_proj input ``x (..., heads·head_dim)``."""
        # P_v was merged into v_proj, so only P_o runs online: on the head axis of (…, heads, head_dim).
        clip = _sig(self.lac[1]) if self.use_lac else 1.0
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
        c = _sig(self.kv_lac) if self.use_lac else torch.ones(4, device=k.device)
        return q, fake_quant_kv(k, bits, c[0], c[1]), fake_quant_kv(v, bits, c[2], c[3])


# ------------------------------------------------------------------------------ attention function seam
def _fq_attention(base: str) -> Callable[..., Any]:
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
def register_attention(base: str) -> str:
    """Register the K/V-quantizing wrapper of ``base`` attention (once per base); returns its name."""
    if base not in ("sdpa", "eager"):
        raise ValueError(f"FlatQuant's KV quantization wraps 'sdpa' or 'eager' attention, not {base!r}")
    name = f"mmeff_flatquant_{base}"
    AttentionInterface.register(name, _fq_attention(base))
    AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[base])
    return name


# ------------------------------------------------------------------------------------ calibration
class _Stop(Exception):
    pass


@torch.no_grad()
def capture_layer_inputs(model: nn.Module, dec: nn.Module, ids: Tensor, bs: int) -> list[tuple[Tensor, dict[str, Any]]]:
    """``(hidden_states, kwargs)`` entering the first decoder layer for every calibration batch, read by a
    pre-hook (the Catcher pattern) so no layer signature is assumed: position embeddings, masks and
    Qwen2-VL's 3-D positions come along as the host computed them."""
    caught: list[tuple[Tensor, dict[str, Any]]] = []

    def pre(mod: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        h = kwargs.get("hidden_states", args[0] if args else None)
        rest = without_cache_kwargs(kwargs, "hidden_states", "use_cache")
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
        wmax = torch.cat([submodule(layer, n).weight.detach().abs().float() for n in names], 0).amax(0)
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


def quantize_layer(layer: nn.Module, cfg: QuantConfig, gen: torch.Generator, xs: list[Tensor],
                   kws: list[dict[str, Any]], device: torch.device) -> tuple[LayerQuant, list[Tensor],
                                                                               tuple[float, float] | None]:
    """Quantize one decoder layer in place: build its :class:`LayerQuant` (drawing its initial transforms
    from ``gen``), fit it to the layer's full-precision outputs on ``xs`` (hidden states ``(B, T, d)``,
    with the layer kwargs ``kws``) when ``cfg.learns``, then merge and quantize the weights.

    Returns ``(layer_quant, fp_outputs, (first, last) MSE or None)``; ``fp_outputs`` (empty without
    calibration inputs) are what the next layer is fed (FlatQuant's choice)."""
    lq = LayerQuant(layer, cfg, gen).to(device)
    fp_out: list[Tensor] = []
    if xs:
        fp_out, maxima = _fp_pass(layer, xs, kws)
        if cfg.method == "flatquant" and cfg.diag:
            _smooth_init(lq, layer, maxima, cfg.diag_alpha)
    loss = _calibrate_layer(lq, layer, xs, kws, fp_out, cfg) if cfg.learns else None
    _merge_layer(lq, layer, xs, kws, cfg)
    return lq, fp_out, loss


def _calibrate_layer(lq: LayerQuant, layer: nn.Module, xs: list[Tensor], kws: list[dict[str, Any]],
                     fp_out: list[Tensor], cfg: QuantConfig) -> tuple[float, float]:
    """Fit the layer's transforms and clips to its full-precision output; returns (first, last) MSE."""
    base_attn = layer.self_attn.config._attn_implementation
    trans = [p for n, p in lq.named_parameters() if p.requires_grad and not ("lac" in n or "lwc" in n)]
    clips = [p for n, p in lq.named_parameters() if p.requires_grad and ("lac" in n or "lwc" in n)]
    opt = torch.optim.AdamW([{"params": trans, "lr": cfg.lr}, {"params": clips, "lr": cfg.lr * cfg.clip_lr_mult}])
    steps = cfg.epochs * len(xs)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(steps, 1), eta_min=cfg.lr * 1e-3)
    for p in layer.parameters():
        p.requires_grad_(False)
    layer.self_attn.config._attn_implementation = register_attention(base_attn) if cfg.kv_bits < 16 else base_attn
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
        submodule(layer, k).data.copy_(v.to(submodule(layer, k).dtype))
    lq.merged = True
    hess: dict[str, Tensor] = {}
    if cfg.weights == "gptq" and xs:
        hess = _hessians(lq, layer, xs, kws)
    if cfg.w_bits < 16:
        for n in LINEARS:
            lin = submodule(layer, n)
            w = lin.weight.double()  # LWC is already in it (effective_weights clamps)
            if n in hess:
                q, s = gptq_quantize(w, hess[n], bits=cfg.w_bits)
            else:
                q, s = quantize_rtn(w, bits=cfg.w_bits)
            layer.set_submodule(n, QuantLinear.from_codes(lin, q.to(torch.int8), s, cfg.w_bits))


@torch.no_grad()
def _hessians(lq: LayerQuant, layer: nn.Module, xs: list[Tensor], kws: list[dict[str, Any]]) -> dict[str, Tensor]:
    """GPTQ Hessians ``2XᵀX/n`` of each linear's (transformed, quantized) input on the calibration data."""
    acc: dict[str, tuple[Tensor | None, int]] = {n: (None, 0) for n in LINEARS}

    def rec(n: str) -> Callable[[nn.Module, tuple], None]:
        def hook(mod: nn.Module, args: tuple) -> None:
            h, c = acc[n]
            acc[n] = accumulate_hessian(h, args[0].detach(), c)
        return hook

    base = layer.self_attn.config._attn_implementation
    hs = [submodule(layer, n).register_forward_pre_hook(rec(n)) for n in LINEARS]
    try:
        with _attached(lq, layer):
            if lq.cfg.kv_bits < 16:
                layer.self_attn.config._attn_implementation = register_attention(base)
            for x, k in zip(xs, kws):
                layer(x, **k)
    finally:
        layer.self_attn.config._attn_implementation = base
        for h in hs:
            h.remove()
    return {n: h for n, (h, _) in acc.items() if h is not None}
