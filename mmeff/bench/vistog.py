"""``mmeff bench vistog``: what VisToG costs and saves, measured on small models and counted on LLaVA-1.5-7B.

Measured (one run, same process): the plain model and the model with VisToG of M groups, on the tiny
random LLaVA (64 patches) and on mmeff-mini (real SmolLM2-135M LM, 64 patches): visual tokens the LLM
reads, prefill and per-token decode latency (:func:`mmeff.eval.profile.profile`: warm-up, median of repeats)
and analytic FLOPs. Counted only (no weights here): the ``llava-1.5-7b`` config with 576 patches per image
and M = 64 / 144 groups. VisToG's FLOPs add the M extra tokens through every CLIP layer and the grouping
layer (:func:`mmeff.eval.flops.vistog_flops`) to what :func:`mmeff.eval.flops.prefill_flops` counts.

Latency here is of untrained VisToG weights: grouping costs the same trained or not, and quality needs
the two-stage training (:func:`mmeff.train.vistog.train_vistog`), which these models do not get here.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mmeff.eval.flops import load_config, prefill_flops, vistog_flops
from mmeff.eval.plotting import pyplot, save_figure
from mmeff.eval.profile import profile
from mmeff.methods.vistog import VisToG
from mmeff.models.embedded import default_model
from mmeff.models.tiny import build_tiny, llava_inputs

__all__ = ["VisToGRow", "run_vistog_bench"]

DEFAULT_TEXT_TOKENS = 64


@dataclass
class VisToGRow:
    """One line of the table: ``model``, ``method`` (``plain`` or ``vistog M=..``), visual tokens per image,
    GFLOPs (vision incl. VisToG, projector, LLM, total), prefill ms and decode ms/token (``None`` when only
    counted)."""

    model: str
    method: str
    visual_tokens: int
    vision_gflops: float
    projector_gflops: float
    llm_gflops: float
    total_gflops: float
    prefill_ms: float | None
    decode_ms: float | None


def _inputs(model: nn.Module, text_tokens: int, seed: int = 0) -> dict[str, torch.Tensor]:
    inp = llava_inputs(model.config, batch=1, text_lens=[text_tokens], seed=seed)
    return inp


def _measured(name: str, model: nn.Module, groups: Sequence[int], text_tokens: int, repeats: int,
              decode_tokens: int) -> list[VisToGRow]:
    inp = _inputs(model, text_tokens)
    rows = []
    for m in (None, *groups):
        method = None
        if m is not None:
            torch.manual_seed(0)
            method = VisToG.for_model(model, num_groups=m).eval()
        rep = profile(model, inp, method, decode_tokens=decode_tokens, warmup=1, repeats=repeats)
        extra = vistog_flops(model.config, m) if m is not None else {"tower_extra": 0, "grouping": 0}
        vision = rep.flops.vision + extra["tower_extra"] + extra["grouping"]
        total = vision + rep.flops.projector + rep.flops.llm
        lat = rep.latency
        rows.append(VisToGRow(name, "plain" if m is None else f"vistog M={m}", rep.visual_tokens,
                              vision / 1e9, rep.flops.projector / 1e9, rep.flops.llm / 1e9, total / 1e9,
                              lat.prefill_s * 1e3,
                              None if lat.decode_s_per_token is None else lat.decode_s_per_token * 1e3))
    return rows


def _counted(config_name: str, groups: Sequence[int], text_tokens: int) -> list[VisToGRow]:
    cfg = load_config(config_name)
    n = (int(cfg.vision_config.image_size) // int(cfg.vision_config.patch_size)) ** 2
    rows = []
    for m in (None, *groups):
        visual = n if m is None else m
        f = prefill_flops(cfg, text_tokens=text_tokens, visual_tokens=visual, image_patches=n,
                          projector_tokens=visual)
        extra = vistog_flops(cfg, m) if m is not None else {"tower_extra": 0, "grouping": 0}
        vision = f.vision + extra["tower_extra"] + extra["grouping"]
        rows.append(VisToGRow(config_name, "plain" if m is None else f"vistog M={m}", visual, vision / 1e9,
                              f.projector / 1e9, f.llm / 1e9, (vision + f.projector + f.llm) / 1e9, None, None))
    return rows


def _fmt(v: float | None, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def _plot(rows: Sequence[VisToGRow], path: Path) -> Path:
    plt = pyplot()
    names = list(dict.fromkeys(r.model for r in rows))
    fig, axes = plt.subplots(1, len(names), figsize=(4.2 * len(names), 3.4), squeeze=False)
    for ax, name in zip(axes[0], names):
        sub = [r for r in rows if r.model == name]
        base = sub[0].total_gflops
        labels = [r.method.replace("vistog ", "") for r in sub]
        ax.bar(labels, [r.total_gflops / base for r in sub], color=["grey", *["tab:blue"] * (len(sub) - 1)])
        if sub[0].prefill_ms is not None:
            ax2 = ax.twinx()
            ax2.plot(labels, [r.prefill_ms / sub[0].prefill_ms for r in sub], "o-", color="tab:red")
            ax2.set_ylim(0, 1.3)
            ax2.set_ylabel("prefill latency / plain", color="tab:red")
        ax.set_ylim(0, 1.3)
        ax.set_ylabel("prefill FLOPs / plain")
        ax.set_title(name, fontsize=9)
    fig.suptitle("VisToG: cost relative to the plain model (one image)")
    return save_figure(fig, path)


def run_vistog_bench(
    models_to_run: Sequence[str] = ("tiny-llava", "mmeff-mini"),
    *,
    groups: dict[str, Sequence[int]] | None = None,
    configs: Sequence[str] = ("llava-1.5-7b",),
    config_groups: Sequence[int] = (64, 144),
    text_tokens: int = DEFAULT_TEXT_TOKENS,
    repeats: int = 5,
    decode_tokens: int = 8,
    cache_dir: str | Path | None = None,
    out_dir: str | Path | None = None,
    model_fn: Callable[[str], nn.Module] | None = None,
    print_fn: Callable[[str], None] = print,
) -> list[VisToGRow]:
    """Run the table (module doc), print it, and write ``vistog.json`` + ``vistog_cost.png`` to ``out_dir``.

    ``groups``: M values per measured model (default 8/16/32 for both 64-patch models); ``model_fn``
    builds a measured model from its name (default: tiny random LLaVA, or mmeff-mini from its wheels).
    """
    groups = dict(groups or {})
    rows: list[VisToGRow] = []
    for name in models_to_run:
        if model_fn is not None:
            model = model_fn(name)
        elif name == "tiny-llava":
            with tempfile.TemporaryDirectory(prefix="mmeff-vistog-") as folder:
                model = build_tiny("llava", folder, seed=0)
        elif name == "mmeff-mini":
            model = default_model(cache_dir=cache_dir)[0]
        else:
            raise ValueError(f"unknown model {name!r}; measured models are 'tiny-llava' and 'mmeff-mini'")
        rows += _measured(name, model, groups.get(name, (8, 16, 32)), text_tokens, repeats, decode_tokens)
        del model
    for cfg in configs:
        rows += _counted(cfg, config_groups, text_tokens)
    device = "cpu"
    print_fn(f"one image + {text_tokens} text tokens per prompt; FLOPs: matmuls, 2 per multiply-add; latency on "
             f"{device}, torch {torch.__version__}, {torch.get_num_threads()} threads; median of {repeats}")
    head = (f"{'model':<14}{'method':<14}{'vis tok':>8}{'vision GF':>11}{'LLM GF':>10}{'total GF':>10}"
            f"{'FLOPs x':>9}{'prefill ms':>12}{'decode ms':>11}{'prefill x':>11}")
    print_fn(head)
    base: dict[str, VisToGRow] = {}
    for r in rows:
        b = base.setdefault(r.model, r)
        speed = None if r.prefill_ms is None or b.prefill_ms is None else r.prefill_ms / b.prefill_ms
        print_fn(f"{r.model:<14}{r.method:<14}{r.visual_tokens:>8}{r.vision_gflops:>11.4g}{r.llm_gflops:>10.4g}"
                 f"{r.total_gflops:>10.4g}{r.total_gflops / b.total_gflops:>9.3f}{_fmt(r.prefill_ms, '.2f'):>12}"
                 f"{_fmt(r.decode_ms, '.2f'):>11}{_fmt(speed, '.3f'):>11}")
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        meta: dict[str, Any] = {"text_tokens": text_tokens, "repeats": repeats, "torch": torch.__version__,
                                "threads": torch.get_num_threads(), "device": device}
        (out / "vistog.json").write_text(json.dumps({"meta": meta, "rows": [asdict(r) for r in rows]}, indent=1))
        _plot(rows, out / "vistog_cost.png")
    return rows
