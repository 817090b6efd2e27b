"""``mmeff bench flatquant``: held-out perplexity of FP, RTN, QuaRot-style and FlatQuant W4A4 on SmolLM2.

Calibration samples come from the first half of the offline text (CPython's pydoc topics), evaluation
from the last tokens of the second half, so nothing evaluated was seen in calibration. Each method runs on
a fresh copy of the model. Also reports the online-transform overhead: time of the Kronecker transforms
a layer runs per token, as a fraction of the time of its seven linear layers at the same token count
(FlatQuant's paper reports 0.07×; QuaRot's online Hadamards 0.26×).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mmeff.eval.latency import median_seconds
from mmeff.eval.streaming import offline_text
from mmeff.kernels.quant import kron_transform
from mmeff.models.hf import load_smollm2
from mmeff.quant.calibration import QuantConfig
from mmeff.quant.flatquant import calibration_batches, decoder_of, quantize

__all__ = ["QuantBenchRow", "heldout_ppl", "run_flatquant_bench", "transform_overhead"]


@dataclass
class QuantBenchRow:
    """One line of the table."""

    method: str
    config: str
    ppl: float
    calibration_s: float

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@torch.no_grad()
def heldout_ppl(model: nn.Module, ids: torch.Tensor, seq_len: int = 512) -> float:
    """Perplexity of ``ids (N,)`` in non-overlapping windows of ``seq_len`` (each window starts fresh)."""
    dev = next(model.parameters()).device
    nll, count = 0.0, 0
    for s in range(0, ids.numel() - 1, seq_len):
        x = ids[s : s + seq_len + 1].to(dev)
        if x.numel() < 2:
            break
        logits = model(x[None, :-1], use_cache=False).logits[0].float()
        nll += F.cross_entropy(logits, x[1:], reduction="sum").item()
        count += x.numel() - 1
    return float(torch.exp(torch.tensor(nll / count)))


@torch.no_grad()
def transform_overhead(handle: Any, tokens: int = 2048, repeats: int = 5) -> dict[str, float]:
    """Seconds per layer of the online transforms vs the layer's seven linears on ``tokens`` tokens.

    Measured on the first decoder layer of a quantized model (its real shapes and matrices), in float32
    on the model's device, medians of ``repeats`` after a warm-up.
    """
    layer = decoder_of(handle.model).layers[0]
    lq = handle.layers[0]
    dev = next(handle.model.parameters()).device
    g = torch.Generator(device="cpu").manual_seed(0)
    xh = torch.randn(tokens, lq.hidden, generator=g).to(dev)
    xi = torch.randn(tokens, lq.inter, generator=g).to(dev)
    eye = torch.eye(lq.head_dim, device=dev)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)

    def transforms() -> None:
        kron_transform(xh, lq.attn_in.p1, lq.attn_in.p2)
        kron_transform(xh, lq.mlp_in.p1, lq.mlp_in.p2)
        kron_transform(xi, lq.down_in.p1, lq.down_in.p2)
        kron_transform(xh, lq.po.m, eye)
        sync()

    a, m = layer.self_attn, layer.mlp
    o_in = torch.randn(tokens, a.o_proj.in_features, generator=g).to(dev)

    def linears() -> None:
        for lin in (a.q_proj, a.k_proj, a.v_proj, m.gate_proj, m.up_proj):
            F.linear(xh, lin.weight.float())
        F.linear(o_in, a.o_proj.weight.float())
        F.linear(xi, m.down_proj.weight.float())
        sync()

    t_tr, t_lin = median_seconds(transforms, repeats=repeats), median_seconds(linears, repeats=repeats)
    return {"transform_s": t_tr, "linear_s": t_lin, "ratio": t_tr / t_lin}


def run_flatquant_bench(
    load: Callable[[], tuple[nn.Module, Any]] | None = None,
    eval_tokens: int = 4096,
    seq_len: int = 512,
    samples: int = 16,
    calib_len: int = 256,
    epochs: int = 3,
    weights: str = "rtn",
    json_path: str | Path | None = None,
    cache_dir: str | Path | None = None,
    progress: bool = True,
    print_fn: Callable[[str], None] = print,
) -> tuple[list[QuantBenchRow], dict[str, float]]:
    """Run the table (module doc). ``load()`` returns a fresh ``(model, tokenizer)``; default SmolLM2."""
    if load is None:
        def load() -> tuple[nn.Module, Any]:
            return load_smollm2(cache_dir)

    model, tok = load()
    text = offline_text()
    half = len(text) // 2
    calib = calibration_batches(tok, text[:half], samples, calib_len)
    ev = torch.tensor(tok(text[half:], add_special_tokens=False).input_ids)
    if ev.numel() < eval_tokens + 1:
        raise ValueError(f"only {ev.numel()} held-out tokens; asked for {eval_tokens}")
    ev = ev[-eval_tokens - 1 :]
    base = QuantConfig(samples=samples, seq_len=calib_len, epochs=epochs, weights=weights)
    runs = [
        ("FP32", None),
        ("no transform", replace(base, method="rtn", kv_bits=16)),
        ("QuaRot-style (Hadamard)", replace(base, method="hadamard", kv_bits=16)),
        ("FlatQuant", replace(base, method="flatquant", kv_bits=16)),
        ("FlatQuant", replace(base, method="flatquant", kv_bits=4)),
    ]
    rows: list[QuantBenchRow] = []
    overhead: dict[str, float] = {}
    for name, cfg in runs:
        if cfg is None:
            rows.append(QuantBenchRow(name, "W16A16", heldout_ppl(model, ev, seq_len), 0.0))
            continue
        model, tok = load()
        t0 = time.perf_counter()
        handle = quantize(model, cfg, calib, progress=progress)
        secs = time.perf_counter() - t0
        label = f"W{cfg.w_bits}A{cfg.a_bits}" + (f"KV{cfg.kv_bits}" if cfg.kv_bits < 16 else "") + f" ({cfg.weights.upper()})"
        rows.append(QuantBenchRow(name, label, heldout_ppl(model, ev, seq_len), secs))
        if cfg.method == "flatquant" and not overhead:
            overhead = transform_overhead(handle)
    print_fn(f"model: {type(model).__name__} ({getattr(model.config, '_name_or_path', '')}); held-out: last "
             f"{eval_tokens} tokens of the second half of the pydoc topics, windows of {seq_len}; calibration: "
             f"{samples} x {calib_len} tokens from the first half, {epochs} epochs")
    w = max(len(r.method) for r in rows)
    print_fn(f"{'method':<{w}}  {'config':<14}  {'PPL':>9}  {'calibration s':>13}")
    for r in rows:
        print_fn(f"{r.method:<{w}}  {r.config:<14}  {r.ppl:>9.3f}  {r.calibration_s:>13.1f}")
    if overhead:
        print_fn(f"online transforms: {overhead['transform_s'] * 1e3:.2f} ms vs linears {overhead['linear_s'] * 1e3:.2f} ms "
                 f"per layer at 2048 tokens -> {overhead['ratio']:.3f}x (paper: 0.07x)")
    if json_path:
        Path(json_path).write_text(json.dumps({"rows": [r.as_dict() for r in rows], "overhead": overhead}, indent=2))
        print_fn(f"wrote {json_path}")
    return rows, overhead
