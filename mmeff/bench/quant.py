"""``mmeff bench flatquant``: held-out perplexity of FP and four quantizers at W4A4, W4A4KV4, W4A8, W4A16.

The quantizers: plain per-channel RTN (no transform, no clipping), GPTQ (no transform), QuaRot-style
(fixed randomised Hadamard rotations, RTN weights, no learning, no clipping) and FlatQuant (learned
Kronecker transforms + smoothing + LWC/LAC, RTN weights). Calibration samples come from the first half of
the offline text (CPython's pydoc topics), evaluation from the last tokens of the second half, so nothing
evaluated was seen in calibration. Each run quantizes a fresh copy of the model.

Besides the table and its plot, the bench prints FlatQuant's per-layer calibration error (MSE of the
layer output before/after calibration, and relative to the FP output's mean square) with the kurtosis of
each quantized activation before and after the learned transform, so a layer that does not fit shows,
and the online-transform overhead: time of the Kronecker transforms a layer runs per token as a fraction
of its seven linears (FlatQuant's paper: 0.07×; QuaRot's online Hadamards 0.26×).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from mmeff.checkpoint import write_text_atomic
from mmeff.eval.latency import median_seconds
from mmeff.eval.plotting import pyplot, save_figure
from mmeff.eval.streaming import offline_text
from mmeff.kernels.quant import kron_transform
from mmeff.models.hf import load_smollm2
from mmeff.quant.calibration import BUDGETS, QuantConfig
from mmeff.quant.flatquant import FlatQuantHandle, calibration_batches, decoder_of, quantize

__all__ = ["COLUMNS", "METHODS", "QuantBenchRow", "activation_kurtosis", "heldout_ppl", "layer_table",
           "plot_quant_table", "run_flatquant_bench", "site_inputs", "transform_overhead"]

#: the table's columns: bits (weights, activations, K/V)
COLUMNS: dict[str, tuple[int, int, int]] = {
    "W4A4": (4, 4, 16), "W4A4KV4": (4, 4, 4), "W4A8": (4, 8, 16), "W4A16": (4, 16, 16)}
#: the table's rows: QuantConfig fields of each quantizer
METHODS: dict[str, dict[str, str]] = {
    "RTN": {"method": "rtn", "weights": "rtn"},
    "GPTQ": {"method": "rtn", "weights": "gptq"},
    "QuaRot-style": {"method": "hadamard", "weights": "rtn"},
    "FlatQuant": {"method": "flatquant", "weights": "rtn"},
}
SITES = ("attn_in", "o_in", "mlp_in", "down_in")


@dataclass
class QuantBenchRow:
    """One line of the table."""

    method: str
    config: str
    ppl: float
    calibration_s: float
    weights: str = "rtn"

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


@torch.no_grad()
def site_inputs(model: nn.Module, ids: torch.Tensor) -> dict[tuple[int, str], torch.Tensor]:
    """FP inputs ``(tokens, d)`` of each decoder layer's four activation quantizers (``attn_in``: q/k/v,
    ``o_in``: o_proj, ``mlp_in``: gate/up, ``down_in``: down_proj) on ``ids (B, T)``."""
    out: dict[tuple[int, str], torch.Tensor] = {}

    def rec(i: int, key: str) -> Callable[..., None]:
        def hook(mod: nn.Module, args: tuple, kwargs: dict[str, Any] | None = None) -> None:
            x = (kwargs or {}).get("hidden_states", args[0] if args else None)
            out[(i, key)] = x.detach().float().flatten(0, -2).cpu()
        return hook

    hs = []
    for i, lay in enumerate(decoder_of(model).layers):
        hs += [lay.self_attn.register_forward_pre_hook(rec(i, "attn_in"), with_kwargs=True),
               lay.self_attn.o_proj.register_forward_pre_hook(rec(i, "o_in")),
               lay.mlp.register_forward_pre_hook(rec(i, "mlp_in")),
               lay.mlp.down_proj.register_forward_pre_hook(rec(i, "down_in"))]
    try:
        model(input_ids=ids.to(next(model.parameters()).device), use_cache=False)
    finally:
        for h in hs:
            h.remove()
    return out


def activation_kurtosis(x: torch.Tensor) -> float:
    """Mean over tokens of the kurtosis across channels of ``x (tokens, d)`` (3 for a Gaussian row; large
    when a few channels dominate, which is what hurts per-token quantization)."""
    xc = x.double() - x.double().mean(-1, keepdim=True)
    return float(((xc**4).mean(-1) / (xc**2).mean(-1).clamp_min(1e-30) ** 2).mean())


@torch.no_grad()
def layer_table(handle: FlatQuantHandle, acts: dict[tuple[int, str], torch.Tensor]) -> list[dict[str, Any]]:
    """Per layer: calibration MSE (first/last epoch), the FP output's mean square, their ratio, and the
    kurtosis of each quantizer's input before and after the learned transform (``acts`` from
    :func:`site_inputs` on the FP model)."""
    rows = []
    mse = handle.report.get("layer_mse", [])
    ms = handle.report.get("layer_fp_ms", [])
    for i, lq in enumerate(handle.layers):
        row: dict[str, Any] = {"layer": i}
        if i < len(mse):
            row.update(mse_first=mse[i][0], mse_last=mse[i][1])
        if i < len(ms):
            row.update(fp_ms=ms[i], rel_err=(mse[i][1] / ms[i]) if i < len(mse) and ms[i] else float("nan"))
        for site in SITES:
            x = acts.get((i, site))
            if x is None:
                continue
            x = x.to(lq.attn_in.p1.device)
            if site == "o_in":  # P_v rides in v_proj, P_o online: (P_o ⊗ P_v) on the FP input
                y = kron_transform(x, lq.po.m.float(), lq.pv.m.float())
            else:
                t = {"attn_in": lq.attn_in, "mlp_in": lq.mlp_in, "down_in": lq.down_in}[site]
                y = t(x, use_diag=lq.use_diag)
            row[f"kurt_{site}"] = (activation_kurtosis(x), activation_kurtosis(y))
        rows.append(row)
    return rows


def plot_quant_table(rows: list[QuantBenchRow], path: str | Path, title: str = "") -> Path:
    """Grouped bars: held-out perplexity (log scale) per column, one bar per quantizer, FP as a line."""
    plt = pyplot()
    fp = next(r.ppl for r in rows if r.config == "W16A16")
    cols = [c for c in COLUMNS if any(r.config == c for r in rows)]
    methods = [m for m in METHODS if any(r.method == m for r in rows)]
    fig, ax = plt.subplots(figsize=(8, 4.2))
    width = 0.8 / max(len(methods), 1)
    for j, m in enumerate(methods):
        ys = [next((r.ppl for r in rows if r.method == m and r.config == c), float("nan")) for c in cols]
        xs = [k + (j - (len(methods) - 1) / 2) * width for k in range(len(cols))]
        bars = ax.bar(xs, ys, width, label=m)
        ax.bar_label(bars, labels=[f"{y:.3g}" for y in ys], fontsize=7, rotation=90, padding=2)
    ax.axhline(fp, color="k", ls="--", lw=1, label=f"FP ({fp:.2f})")
    ax.axhline(fp * 1.15, color="gray", ls=":", lw=1, label="FP + 15%")
    ax.set_yscale("log")
    top = max((r.ppl for r in rows if math.isfinite(r.ppl)), default=fp)
    ax.set_ylim(top=top * 12)  # room for the rotated value labels above the tallest bar
    ax.set_xticks(range(len(cols)), cols)
    ax.set_ylabel("held-out perplexity (log)")
    ax.set_title(title or "W4 quantizers on SmolLM2-135M")
    ax.legend(fontsize=8, ncol=2)
    return save_figure(fig, path)


def run_flatquant_bench(
    load: Callable[[], tuple[nn.Module, Any]] | None = None,
    eval_tokens: int = 4096,
    seq_len: int = 512,
    budget: str = "cpu",
    samples: int | None = None,
    calib_len: int | None = None,
    epochs: int | None = None,
    weights: str = "rtn",
    columns: tuple[str, ...] = tuple(COLUMNS),
    methods: tuple[str, ...] = tuple(METHODS),
    json_path: str | Path | None = None,
    plot_path: str | Path | None = None,
    cache_dir: str | Path | None = None,
    progress: bool = True,
    print_fn: Callable[[str], None] = print,
) -> tuple[list[QuantBenchRow], dict[str, Any]]:
    """Run the table (module doc); returns ``(rows, extra)`` with ``extra["overhead"]`` and
    ``extra["layers"]`` (FlatQuant's per-layer table at the first column). ``load()`` returns a fresh
    ``(model, tokenizer)`` (default SmolLM2). ``budget`` picks the calibration size (:data:`BUDGETS`);
    ``samples``/``calib_len``/``epochs`` override it; ``weights`` is FlatQuant's weight quantizer."""
    if budget not in BUDGETS:
        raise ValueError(f"unknown calibration budget {budget!r}; known: {sorted(BUDGETS)}")
    bad = [c for c in columns if c not in COLUMNS] + [m for m in methods if m not in METHODS]
    if bad:
        raise ValueError(f"unknown columns/methods {bad}; columns: {list(COLUMNS)}, methods: {list(METHODS)}")
    if load is None:
        def load() -> tuple[nn.Module, Any]:
            return load_smollm2(cache_dir)

    b = dict(BUDGETS[budget])
    b.update({k: v for k, v in (("samples", samples), ("seq_len", calib_len), ("epochs", epochs)) if v is not None})
    model, tok = load()
    text = offline_text()
    half = len(text) // 2
    calib = calibration_batches(tok, text[:half], b["samples"], b["seq_len"])
    ev = torch.tensor(tok(text[half:], add_special_tokens=False).input_ids)
    if ev.numel() < eval_tokens + 1:
        raise ValueError(f"only {ev.numel()} held-out tokens; asked for {eval_tokens}")
    ev = ev[-eval_tokens - 1 :]
    setup = {"model": str(getattr(model.config, "_name_or_path", "")) or type(model).__name__,
             "budget": {"name": budget, **b}, "eval_tokens": eval_tokens, "seq_len": seq_len, "weights": weights}
    done, extra = _resume(json_path, setup, print_fn)
    acts = site_inputs(model, calib[: b["batch_size"]])
    rows = [done.get(("FP", "W16A16")) or QuantBenchRow("FP", "W16A16", heldout_ppl(model, ev, seq_len), 0.0, "-")]
    runs = [(m, c) for c in columns for m in methods]
    for m, c in tqdm(runs, desc="quantizers", disable=not progress, unit="run"):
        if (m, c) in done:
            rows.append(done[(m, c)])
            continue
        w, a, kv = COLUMNS[c]
        fields = dict(METHODS[m], **({"weights": weights} if m == "FlatQuant" else {}))
        cfg = QuantConfig(w_bits=w, a_bits=a, kv_bits=kv, **fields, **b)
        model, tok = load()
        t0 = time.perf_counter()
        handle = quantize(model, cfg, calib, progress=False)
        secs = time.perf_counter() - t0
        rows.append(QuantBenchRow(m, c, heldout_ppl(model, ev, seq_len), secs, cfg.weights))
        if m == "FlatQuant" and not extra["layers"]:
            extra["overhead"] = transform_overhead(handle)
            extra["layers"] = layer_table(handle, acts)
            extra["layers_config"] = c
        if json_path:  # after every run, so an interrupted bench resumes where it stopped
            _write_json(json_path, setup, rows, extra)
    fp = rows[0].ppl
    print_fn(f"model: {type(model).__name__} ({getattr(model.config, '_name_or_path', '')}); held-out: last "
             f"{eval_tokens} tokens of the second half of the pydoc topics, windows of {seq_len}; calibration "
             f"({budget}): {b['samples']} x {b['seq_len']} tokens from the first half, {b['epochs']} epochs")
    print_fn(f"held-out perplexity (FP {fp:.3f}); in brackets: increase over FP")
    print_fn(f"{'method':<13}" + "".join(f"{c:>20}" for c in columns))
    for m in methods:
        cells = []
        for c in columns:
            r = next(r for r in rows if r.method == m and r.config == c)
            cells.append(f"{r.ppl:>11.3f} ({r.ppl / fp - 1:+7.1%})")
        print_fn(f"{m:<13}" + "".join(f"{x:>20}" for x in cells))
    if extra["layers"]:
        print_fn(f"FlatQuant per layer at {extra['layers_config']}: calibration MSE of the layer output (first -> "
                 "last epoch), FP output mean square, relative error; kurtosis of each quantizer input "
                 "before -> after the transform")
        print_fn(f"{'layer':>5} {'MSE first':>10} {'MSE last':>10} {'FP ms':>9} {'rel':>9}  "
                 + "  ".join(f"{s:>15}" for s in SITES))
        for r in extra["layers"]:
            k = "  ".join(f"{r[f'kurt_{s}'][0]:>6.1f}->{r[f'kurt_{s}'][1]:>6.1f}" for s in SITES if f"kurt_{s}" in r)
            print_fn(f"{r['layer']:>5} {r.get('mse_first', float('nan')):>10.3g} {r.get('mse_last', float('nan')):>10.3g} "
                     f"{r.get('fp_ms', float('nan')):>9.3g} {r.get('rel_err', float('nan')):>9.2e}  {k}")
    ov = extra["overhead"]
    if ov:
        print_fn(f"online transforms: {ov['transform_s'] * 1e3:.2f} ms vs linears {ov['linear_s'] * 1e3:.2f} ms "
                 f"per layer at 2048 tokens -> {ov['ratio']:.3f}x (paper: 0.07x)")
    if plot_path:
        print_fn(f"wrote {plot_quant_table(rows, plot_path)}")
    if json_path:
        _write_json(json_path, setup, rows, extra)
        print_fn(f"wrote {json_path}")
    return rows, extra


def _write_json(path: str | Path, setup: dict[str, Any], rows: list[QuantBenchRow], extra: dict[str, Any]) -> None:
    write_text_atomic(path, json.dumps({"setup": setup, "rows": [r.as_dict() for r in rows], **extra}, indent=2))


def _resume(path: str | Path | None, setup: dict[str, Any],
            print_fn: Callable[[str], None]) -> tuple[dict[tuple[str, str], QuantBenchRow], dict[str, Any]]:
    """Rows (and the per-layer extras) of an earlier run of the same setup saved at ``path``."""
    fresh: dict[str, Any] = {"overhead": {}, "layers": []}
    if not path or not Path(path).is_file():
        return {}, fresh
    try:
        old = json.loads(Path(path).read_text())
        rows = [QuantBenchRow(**r) for r in old["rows"]]
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path} exists but is not a flatquant bench record ({e.__class__.__name__}); "
                         f"move it away or pass another --json") from None
    if old.get("setup") != setup:
        raise ValueError(f"{path} holds results of another setup ({old.get('setup')} vs {setup}); results are "
                         f"only resumed for the same one: move it away or pass another --json")
    print_fn(f"resuming {path}: {len(rows)} rows already measured")
    extra = {k: old[k] for k in ("overhead", "layers", "layers_config") if k in old}
    extra["layers"] = [{k: tuple(v) if k.startswith("kurt_") else v for k, v in r.items()} for r in extra.get("layers", [])]
    return {(r.method, r.config): r for r in rows}, {**fresh, **extra}
