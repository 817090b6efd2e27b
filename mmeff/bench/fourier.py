"""Fourier-VLM against the unreduced model and the pooling baseline at the same token count, in one run.

    python -m mmeff.bench.fourier                          # default LLaVA (real SmolLM2 LM), 64 and 144 tokens
    python -m mmeff.bench.fourier --model tiny-qwen2-vl    # Qwen2-VL: axis ratio 2/3, M-RoPE gather vs regrid
    python -m mmeff.bench.fourier --accounting-only        # just the 7B FLOPs tables (no model is run)
    python -m mmeff.bench.fourier --model llava-1.5-7b --repeats 1 --warmup 0 --answer-tokens 2 --decode-tokens 2
        # the real 7B architecture with random bf16 weights (~14 GB RAM): latency only, agreement meaningless

Part 1 is analytic, on the real LLaVA-1.5-7B / Qwen2-VL-7B configs: prefill FLOPs at 64 and 144 visual
tokens, with the filter before the projector (the paper's LLaVA placement) and after it, next to the
paper's "up to 83.8% fewer FLOPs"; the text-prompt length changes that share, so a sweep is printed too.

Part 2 measures on a model (``mmeff bench`` machinery: warm-up, median of repeats, prefill and per-token
decode separately): unreduced, Fourier-VLM as published (no rescale), Fourier-VLM with ``rescale=True``,
and average pooling both before and after the projector, all at the same budget. Agreement columns
compare greedy tokens and next-token KL with the unreduced model; with the default model's random vision
tower they measure how much each method perturbs the LM's input, not answer quality.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn

from mmeff.bench.inputs import load_bench_model, media_inputs
from mmeff.bench.reduction import DEFAULT_QUESTION, BenchRow, bench_reducers, format_table
from mmeff.datasets.media import sample_image
from mmeff.eval.flops import load_config, meta_model, prefill_flops
from mmeff.methods.baselines import AvgPool
from mmeff.methods.fourier import FourierLowPass
from mmeff.models.tiny import llava_inputs
from mmeff.preprocess import llava_pixel_values

PAPER_FLOPS_REDUCTION = 0.838


def accounting() -> list[dict]:
    """7B prefill FLOPs at the paper's budgets; printed as tables, returned as rows."""
    rows = []
    cfg = load_config("llava-1.5-7b")
    print("LLaVA-1.5-7B (CLIP-L/336, 576 visual tokens), 64 text tokens, analytic prefill TFLOPs")
    print(f"{'visual tokens':>13}  {'stage':>5}  {'vision':>7}  {'proj':>6}  {'LLM':>7}  {'total':>7}  {'LLM saved':>9}  {'total saved':>11}")
    full = prefill_flops(cfg, text_tokens=64, visual_tokens=576)
    for m, stage in ((576, "-"), (144, "post"), (144, "pre"), (64, "post"), (64, "pre")):
        f = prefill_flops(cfg, text_tokens=64, visual_tokens=m, projector_tokens=m if stage == "pre" else None)
        row = {"model": "llava-1.5-7b", "visual_tokens": m, "stage": stage, "text_tokens": 64,
               "vision": f.vision, "projector": f.projector, "llm": f.llm, "total": f.total,
               "llm_saved": 1 - f.llm / full.llm, "total_saved": 1 - f.total / full.total}
        rows.append(row)
        print(f"{m:>13}  {stage:>5}  {f.vision / 1e12:7.3f}  {f.projector / 1e12:6.3f}  {f.llm / 1e12:7.3f}  "
              f"{f.total / 1e12:7.3f}  {row['llm_saved']:9.1%}  {row['total_saved']:11.1%}")
    print(f"paper (arXiv 2508.06038): up to {PAPER_FLOPS_REDUCTION:.1%} fewer inference FLOPs than LLaVA-v1.5")
    print("total saved at 64 tokens (pre-projector) by text-prompt length:")
    sweep = []
    for text in (0, 8, 16, 32, 64, 128):
        a = prefill_flops(cfg, text_tokens=text, visual_tokens=576)
        b = prefill_flops(cfg, text_tokens=text, visual_tokens=64, projector_tokens=64)
        sweep.append(f"{text} text: {1 - b.total / a.total:.1%}")
    print("  " + ", ".join(sweep))

    q = load_config("qwen2-vl-7b")
    print("\nQwen2-VL-7B, one 672x672 image (2304 patches -> 576 merged tokens), 64 text tokens")
    qfull = prefill_flops(q, text_tokens=64, visual_tokens=576, image_patches=2304)
    for m, label in ((576, "none"), (256, "axis_ratio=2/3 (16x16)"), (64, "tokens=64 (8x8)")):
        f = prefill_flops(q, text_tokens=64, visual_tokens=m, image_patches=2304)
        rows.append({"model": "qwen2-vl-7b", "visual_tokens": m, "stage": "post", "text_tokens": 64,
                     "vision": f.vision, "projector": f.projector, "llm": f.llm, "total": f.total,
                     "llm_saved": 1 - f.llm / qfull.llm, "total_saved": 1 - f.total / qfull.total})
        print(f"  {label:<24} LLM {f.llm / 1e12:6.3f} TFLOPs ({1 - f.llm / qfull.llm:5.1%} saved), "
              f"total {f.total / 1e12:6.3f} ({1 - f.total / qfull.total:5.1%} saved; the ViT runs unreduced)")
    return rows


def random_7b(name: str = "llava-1.5-7b", dtype: torch.dtype = torch.bfloat16) -> tuple[nn.Module, dict]:
    """The bundled 7B config with random weights (N(0, 0.02)), for latency on the real shapes."""
    model = meta_model(name).to_empty(device="cpu").to(dtype)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for mod in model.modules():
            for pname, p in mod.named_parameters(recurse=False):
                if "norm" in pname or "norm" in type(mod).__name__.lower():
                    p.fill_(1.0 if pname == "weight" else 0.0)
                elif pname == "bias":
                    p.zero_()
                else:
                    p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float32).mul_(0.02))
        for b in model.buffers():
            if b.is_floating_point() and not torch.isfinite(b).all():
                raise RuntimeError("uninitialised buffer in the random 7B model")
    return model.eval(), {"name": f"{name} (random weights, {dtype})"}


def measured(model_name: str, budgets: list[int], repeats: int, decode_tokens: int, answer_tokens: int,
             warmup: int = 1) -> list[BenchRow]:
    """Part 2: bench the unreduced model, Fourier-VLM (with and without rescale) and pooling at each of
    ``budgets`` tokens on one real photo (the real 7B shapes with random weights for ``llava-1.5-7b``);
    prints the table and returns its rows."""
    if model_name == "llava-1.5-7b":
        model, info = random_7b(model_name)
        tok = None
        inputs = llava_inputs(model.config, batch=1, text_lens=[64])
        inputs["pixel_values"] = llava_pixel_values([sample_image("astronaut")], 336).to(torch.bfloat16)
    else:
        model, tok, info = load_bench_model(model_name)
        inputs = media_inputs(model, tok, "image", question=DEFAULT_QUESTION)
    llava = type(model).__name__.startswith("Llava")
    methods: dict = {"none": None}
    if llava:
        for m in budgets:
            methods[f"fourier{m}"] = (FourierLowPass(tokens=m), {"stage": "pre_projector"})
            methods[f"fourier{m}-rescale"] = (FourierLowPass(tokens=m, rescale=True), {"stage": "pre_projector"})
            methods[f"pool{m}-pre"] = (AvgPool(tokens=m), {"stage": "pre_projector"})
            methods[f"pool{m}-post"] = (AvgPool(tokens=m), {"stage": "post_projector"})
    else:
        r = 2 / 3
        methods["fourier-gather"] = (FourierLowPass(axis_ratio=r), {"mrope": "gather"})
        methods["fourier-regrid"] = (FourierLowPass(axis_ratio=r), {"mrope": "regrid"})
        methods["fourier-rescale"] = (FourierLowPass(axis_ratio=r, rescale=True), {"mrope": "gather"})
        methods["pool"] = (AvgPool(axis_ratio=r), {"mrope": "gather"})
    rows = bench_reducers(model, inputs, methods, media="image", tokenizer=tok, answer_tokens=answer_tokens,
                          decode_tokens=decode_tokens, repeats=repeats, warmup=warmup)
    print(f"\nmodel: {info.get('name', model_name)}")
    print(format_table(rows))
    return rows


def main(argv: list[str] | None = None) -> None:
    """Command line: print the 7B accounting, then (unless ``--accounting-only``) the measured table;
    ``--json PATH`` also writes both there."""
    p = argparse.ArgumentParser(prog="python -m mmeff.bench.fourier", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="default", help="default, tiny-llava, tiny-qwen2-vl or a checkpoint folder")
    p.add_argument("--tokens", default="64,144", help="LLaVA budgets to compare (comma-separated)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--decode-tokens", type=int, default=8)
    p.add_argument("--answer-tokens", type=int, default=16)
    p.add_argument("--accounting-only", action="store_true")
    p.add_argument("--json", default=None, help="also write the tables to this JSON file")
    args = p.parse_args(argv)
    out: dict = {"accounting": accounting()}
    if not args.accounting_only:
        budgets = [int(t) for t in args.tokens.split(",")]
        rows = measured(args.model, budgets, args.repeats, args.decode_tokens, args.answer_tokens, args.warmup)
        out["measured"] = [asdict(r) for r in rows]
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
