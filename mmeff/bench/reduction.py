"""``mmeff bench``: every registered reducer on one model and real media, in one table.

For each method it reports visual tokens reaching the LLM, analytic prefill FLOPs, KV-cache bytes,
measured prefill and per-token decode latency (warm-up, repeats, median), and agreement with the
unreduced model: first greedy token, the share of greedy tokens that match, and the KL divergence of
the next-token distribution. FLOPs are never the only speed figure.
"""

from __future__ import annotations

import json
import math
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

# the reducers register themselves when their modules load: these imports make the registry complete
import mmeff.methods.baselines  # noqa: F401
import mmeff.methods.fourier  # noqa: F401
import mmeff.methods.freevideo  # noqa: F401
from mmeff.api import apply
from mmeff.bench.inputs import load_bench_model, media_inputs
from mmeff.core import BudgetReducer, TokenReducer, get_reducer_class, list_reducers
from mmeff.eval.profile import profile

__all__ = ["BenchRow", "MethodSpec", "bench_reducers", "token_agreement", "default_methods", "format_table", "run_bench"]

DEFAULT_QUESTION = "Describe what you see in one sentence."


@dataclass
class BenchRow:
    """One line of the bench table (all numbers per batch of one prompt)."""

    media: str
    method: str
    visual_tokens: int
    prompt_tokens: int
    prefill_gflops: float
    llm_prefill_gflops: float
    kv_cache_mib: float
    prefill_ms: float
    decode_ms_per_token: float
    first_token_agree: bool | None = None
    token_agreement: float | None = None
    kl_next_token: float | None = None
    answer: str = ""
    stage: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def default_methods(budget_ratio: float = 0.25) -> dict[str, TokenReducer | None]:
    """``{"none": None, name: reducer}`` for every registered budget reducer at ``budget_ratio`` of the tokens."""
    methods: dict[str, TokenReducer | None] = {"none": None}
    for name in list_reducers():
        cls = get_reducer_class(name)
        if issubclass(cls, BudgetReducer):
            methods[name] = cls(ratio=budget_ratio)
    return methods


def _greedy(model: nn.Module, inputs: dict[str, Any], steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy continuation ``(B, steps)`` and the next-token log-probs ``(B, V)`` at the prompt's end."""
    out = model.generate(
        **inputs, max_new_tokens=steps, do_sample=False, output_logits=True, return_dict_in_generate=True
    )
    prompt_len = inputs["input_ids"].shape[1]
    # raw logits: processed scores carry -inf for suppressed tokens, which makes the KL undefined
    return out.sequences[:, prompt_len:], out.logits[0].float().log_softmax(-1)


MethodSpec = TokenReducer | tuple[TokenReducer, dict[str, Any]] | None


def token_agreement(tokens: torch.Tensor, ref: torch.Tensor) -> float:
    """Share of greedy tokens ``(B, T)`` equal to the reference ``(B, T')``, averaged over the batch.

    Generation may stop early at EOS, so lengths can differ: positions past the shorter answer count as
    disagreements (two answers of different length never agree fully).
    """
    k, n = min(tokens.shape[1], ref.shape[1]), max(tokens.shape[1], ref.shape[1])
    if n == 0:
        return 1.0
    return float((tokens[:, :k] == ref[:, :k]).float().sum(1).div(n).mean())


def bench_reducers(
    model: nn.Module,
    inputs: dict[str, Any],
    methods: dict[str, MethodSpec],
    *,
    media: str = "image",
    tokenizer: Any = None,
    answer_tokens: int = 16,
    decode_tokens: int = 8,
    warmup: int = 1,
    repeats: int = 3,
    options: dict[str, Any] | None = None,
) -> list[BenchRow]:
    """Profile and compare each method against the unreduced model (``methods["none"]`` must be ``None``).

    ``options`` are adapter options applied to every method (e.g. ``{"stage": "pre_projector"}``); a method
    given as ``(reducer, options)`` adds its own on top (e.g. the same reducer at two stages in one table).
    """
    rows: list[BenchRow] = []
    ref_tokens = ref_logp = None
    bar = tqdm(methods.items(), desc=f"bench[{media}]", unit="method")
    for name, spec in bar:
        bar.set_postfix_str(name)
        method, own = spec if isinstance(spec, tuple) else (spec, {})
        opts = {**(options or {}), **own}
        rep = profile(model, inputs, method, decode_tokens=decode_tokens, warmup=warmup, repeats=repeats, options=opts)
        with torch.inference_mode():
            if method is None:
                tokens, logp = _greedy(model, inputs, answer_tokens)
            else:
                with apply(model, method, **opts) as handle:
                    tokens, logp = _greedy(model, inputs, answer_tokens)
        if method is None:
            ref_tokens, ref_logp = tokens, logp
        agree = first = kl = None
        if ref_tokens is not None and ref_logp is not None:
            agree = token_agreement(tokens, ref_tokens)
            first = bool((tokens[:, 0] == ref_tokens[:, 0]).all())
            kl = float((ref_logp.exp() * (ref_logp - logp)).sum(-1).mean())
        stage = handle.stats.get("stage") if method is not None else None
        answer = tokenizer.decode(tokens[0], skip_special_tokens=True).strip() if tokenizer is not None else ""
        d = rep.as_dict()
        rows.append(
            BenchRow(
                media=media,
                method=name if method is None else method.describe() + _option_suffix(own),
                stage=stage or "",
                visual_tokens=int(d["visual_tokens"]),
                prompt_tokens=int(d["visual_tokens"] + d["text_tokens"]),
                prefill_gflops=d["flops"]["total"] / 1e9,
                llm_prefill_gflops=d["flops"]["llm"] / 1e9,
                kv_cache_mib=d["kv_cache_bytes"] / 2**20,
                prefill_ms=d["latency"]["prefill_s"] * 1e3,
                decode_ms_per_token=d["latency"]["decode_s_per_token"] * 1e3,
                first_token_agree=first,
                token_agreement=agree,
                kl_next_token=kl,
                answer=answer,
            )
        )
    return rows


def _option_suffix(options: dict[str, Any]) -> str:
    # the stage has its own column; other per-method adapter options are part of the method's label
    rest = {k: v for k, v in options.items() if k != "stage"}
    return " [" + ", ".join(f"{k}={v}" for k, v in rest.items()) + "]" if rest else ""


def format_table(rows: list[BenchRow]) -> str:
    """Plain-text table; ratios are against the ``none`` row of the same media."""
    head = ["media", "method", "stage", "vis tok", "GFLOPs", "LLM GFLOPs", "KV MiB", "prefill ms", "x", "decode ms/tok",
            "1st tok", "tok agree", "KL"]
    base = {r.media: r for r in rows if r.method == "none"}
    lines = []
    for r in rows:
        b = base.get(r.media)
        speed = b.prefill_ms / r.prefill_ms if b and r.prefill_ms > 0 else math.nan
        lines.append([
            r.media, r.method, r.stage.replace("_projector", "") or "-", str(r.visual_tokens), f"{r.prefill_gflops:.2f}", f"{r.llm_prefill_gflops:.2f}",
            f"{r.kv_cache_mib:.2f}", f"{r.prefill_ms:.1f}", f"{speed:.2f}", f"{r.decode_ms_per_token:.1f}",
            "-" if r.first_token_agree is None else ("yes" if r.first_token_agree else "no"),
            "-" if r.token_agreement is None else f"{r.token_agreement:.2f}",
            "-" if r.kl_next_token is None else f"{r.kl_next_token:.3f}",
        ])
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(head)]
    fmt = "  ".join(f"{{:<{w}}}" if i < 3 else f"{{:>{w}}}" for i, w in enumerate(widths))
    out = [fmt.format(*head), fmt.format(*("-" * w for w in widths))]
    out += [fmt.format(*line) for line in lines]
    return "\n".join(out)


def _provenance(info: dict[str, Any]) -> str:
    if "provenance" in info:
        return str(info["provenance"])
    parts = [f"{k.replace('_', ' ')}: {v.get('weights')}" for k, v in info.items() if isinstance(v, dict) and "weights" in v]
    return "; ".join(parts)


def run_bench(
    model_name: str = "default",
    *,
    media: str = "both",
    budget_ratio: float = 0.25,
    methods: list[str] | None = None,
    question: str = DEFAULT_QUESTION,
    frames: int = 4,
    decode_tokens: int = 8,
    answer_tokens: int = 16,
    repeats: int = 3,
    json_path: str | Path | None = None,
    cache_dir: str | Path | None = None,
    stage: str | None = None,
) -> list[BenchRow]:
    """The main job: load the model, build real image/video prompts, bench every method, print the table."""
    if media not in ("image", "video", "both"):
        raise ValueError(f"media must be image, video or both, got {media!r}")
    t0 = time.perf_counter()
    model, tokenizer, info = load_bench_model(model_name, cache_dir=cache_dir)
    all_methods = default_methods(budget_ratio)
    if methods:
        unknown = [m for m in methods if m not in all_methods]
        if unknown:
            raise ValueError(f"unknown method(s) {unknown}; known: {', '.join(all_methods)}")
        all_methods = {k: v for k, v in all_methods.items() if k == "none" or k in methods}
    rows: list[BenchRow] = []
    for kind in (["image", "video"] if media == "both" else [media]):
        inputs = media_inputs(model, tokenizer, kind, question=question, frames=frames)
        rows += bench_reducers(
            model, inputs, all_methods, media=kind, tokenizer=tokenizer, answer_tokens=answer_tokens,
            decode_tokens=decode_tokens, repeats=repeats, options={"stage": stage} if stage else None,
        )
    print(f"\nmodel: {info.get('name', model_name)} ({_provenance(info)})")
    print(f"device: {next(model.parameters()).device}, torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"{platform.processor() or platform.machine()}; budget {budget_ratio:.0%} of visual tokens; "
          f"stage: {stage or 'each method where its paper runs it'} (pre/post: before/after the projector)")
    print(format_table(rows))
    for r in rows:
        print(f"  [{r.media}] {r.method}: {r.answer!r}")
    print(f"total {time.perf_counter() - t0:.1f} s")
    if json_path is not None:
        payload = {"model": info, "question": question, "budget_ratio": budget_ratio, "rows": [asdict(r) for r in rows]}
        Path(json_path).write_text(json.dumps(payload, indent=2))
        print(f"wrote {json_path}")
    return rows
