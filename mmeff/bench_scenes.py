"""``mmeff bench`` (the main job): accuracy, visual tokens and latency of every method on mmeff-mini.

The held-out split of :mod:`mmeff.datasets.scenes` (seed :data:`mmeff.mini.HELDOUT_SEED`, never trained
on) is asked of the embedded default model with each method in place: six image question kinds
(colour, shape, count, position, small object, written word) and three video kinds (what appears
after X, motion direction, how many appear; 4 frames). Accuracy is multiple choice (4 options, chance
25%), read from the greedy answer by :func:`mmeff.evaluate.extract_option`. Latency is the median
prefill of one image and one video prompt (warm-up, repeats) from :func:`mmeff.profile.profile`.
"""

from __future__ import annotations

import json
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["SceneRow", "scene_methods", "bench_scenes", "format_scene_table", "run_scenes_bench"]


@dataclass
class SceneRow:
    """One method on the held-out scenes: accuracy per kind, mean visual tokens, prefill latency."""

    method: str
    accuracy: dict[str, float]
    image_tokens: float | None
    video_tokens: float | None
    image_prefill_ms: float | None
    video_prefill_ms: float | None
    seconds: float
    answers: list[dict[str, Any]] = field(default_factory=list, repr=False)


def scene_methods(ratio: float = 0.25, tome_r: int = 8) -> dict[str, Any]:
    """``{"none": None, ...}``: every registered budget reducer at ``ratio`` of the visual tokens, Free
    Video-LLM sized for 4 frames of an 8x8 grid (1 slow + 1 middle frame with the RoI crop, 4 fast frames
    at 2x2; about 28% of the tokens) scored by the mini dual encoder, and ToMe with ``r=tome_r`` inside the
    vision tower (un-merged before the projector, so the LLM sees every token; it saves vision compute)."""
    from mmeff import mini
    from mmeff.bench import default_methods
    from mmeff.freevideo import FreeVideoConfig, FreeVideoLLM
    from mmeff.tome import ToMe

    methods: dict[str, Any] = dict(default_methods(ratio))
    cfg = FreeVideoConfig.from_official(mini.FREEVIDEO_SCENES, faithful=False)
    methods["freevideo"] = FreeVideoLLM(cfg, scorer=mini.clip_scorer())
    methods[f"tome r={tome_r}"] = ToMe(r=tome_r)
    return methods


def _label(name: str, method: Any) -> str:
    # a reducer's own description, unless it is too long for a table column (Free Video-LLM's config)
    describe = getattr(method, "describe", None)
    text = name if method is None or describe is None else describe()
    return text if len(text) <= 40 else name


def _prefill_ms(model: nn.Module, tokenizer: Any, item: dict[str, Any], method: Any, repeats: int) -> float:
    from mmeff.core import TokenReducer
    from mmeff.evaluate import format_question
    from mmeff.models import build_prompt, left_pad_batch, llava_pixel_values, llava_tokens_per_image
    from mmeff.profile import profile

    cfg = model.config
    ids = build_prompt(tokenizer, format_question(item["question"], item["options"]), 1,
                       len(item["frames"]) * llava_tokens_per_image(cfg), cfg.image_token_id)
    inputs: dict[str, Any] = left_pad_batch([ids], tokenizer.pad_token_id or 0)
    inputs["pixel_values"] = llava_pixel_values(list(item["frames"]), cfg.vision_config.image_size)
    if isinstance(method, TokenReducer):
        inputs["mmeff_text"] = [item["question"]]
    rep = profile(model, inputs, method, decode_tokens=1, warmup=1, repeats=repeats)
    return rep.as_dict()["latency"]["prefill_s"] * 1e3


def bench_scenes(
    model: nn.Module,
    tokenizer: Any,
    methods: dict[str, Any],
    items: list[dict[str, Any]],
    *,
    batch_size: int = 8,
    repeats: int = 3,
) -> list[SceneRow]:
    """Answer ``items`` (:func:`mmeff.mini.heldout_items`) with each method; video-level methods (Free
    Video-LLM) run on the video items only, since on a single image they keep every token."""
    from tqdm.auto import tqdm

    from mmeff.datasets.scenes import VIDEO_KINDS
    from mmeff.mini import accuracy_by_kind, answer_scenes

    images = [it for it in items if it["kind"] not in VIDEO_KINDS]
    videos = [it for it in items if it["kind"] in VIDEO_KINDS]
    rows = []
    bar = tqdm(methods.items(), desc="bench[scenes]", unit="method")
    for name, method in bar:
        bar.set_postfix_str(name)
        t0 = time.perf_counter()
        video_only = bool(getattr(method, "video_level", False))
        results: list[dict[str, Any]] = []
        img_ms = vid_ms = None
        img_tok = vid_tok = None
        if images and not video_only:
            res = answer_scenes(model, tokenizer, images, reducer=method, batch_size=batch_size)
            results += res
            img_tok = sum(r["visual_tokens"] for r in res) / len(res)
            img_ms = _prefill_ms(model, tokenizer, images[0], method, repeats)
        if videos:
            res = answer_scenes(model, tokenizer, videos, reducer=method, batch_size=max(1, batch_size // 2))
            results += res
            vid_tok = sum(r["visual_tokens"] for r in res) / len(res)
            vid_ms = _prefill_ms(model, tokenizer, videos[0], method, repeats)
        rows.append(SceneRow(_label(name, method), accuracy_by_kind(results), img_tok, vid_tok, img_ms, vid_ms,
                             time.perf_counter() - t0, results))
    return rows


def format_scene_table(rows: list[SceneRow]) -> str:
    """Plain-text table: accuracy (%) per question kind, tokens and prefill ms per medium."""
    from mmeff.datasets.scenes import IMAGE_KINDS, VIDEO_KINDS

    kinds = [*IMAGE_KINDS, "image", *VIDEO_KINDS, "video"]
    head = ["method", *kinds, "img tok", "img ms", "vid tok", "vid ms"]

    def f(v: float | None, spec: str) -> str:
        return "-" if v is None else format(v, spec)

    lines = [[r.method, *(f(None if k not in r.accuracy else 100 * r.accuracy[k], ".0f") for k in kinds),
              f(r.image_tokens, ".0f"), f(r.image_prefill_ms, ".0f"), f(r.video_tokens, ".0f"),
              f(r.video_prefill_ms, ".0f")] for r in rows]
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(head)]
    fmt = "  ".join(f"{{:<{w}}}" if i == 0 else f"{{:>{w}}}" for i, w in enumerate(widths))
    return "\n".join([fmt.format(*head), fmt.format(*("-" * w for w in widths)), *(fmt.format(*x) for x in lines)])


def plot_scenes(rows: list[SceneRow], path: str | Path) -> Path:
    """Accuracy against visual tokens reaching the LLM, one point per method and medium."""
    from mmeff.plotting import pyplot, save_figure

    plt = pyplot()

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, medium, tok in ((axes[0], "image", "image_tokens"), (axes[1], "video", "video_tokens")):
        for r in rows:
            x, y = getattr(r, tok), r.accuracy.get(medium)
            if x is not None and y is not None:
                ax.scatter(x, 100 * y)
                ax.annotate(r.method, (x, 100 * y), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.axhline(25, color="grey", ls=":", lw=1)
        ax.set_xlabel(f"visual tokens per {medium} item")
        ax.set_ylabel("accuracy (%)")
        ax.set_title(f"mmeff-mini, held-out {medium} questions")
    return save_figure(fig, path)


def run_scenes_bench(
    model_name: str = "default",
    *,
    per_kind: int = 20,
    ratio: float = 0.25,
    methods: list[str] | None = None,
    media: str = "both",
    batch_size: int = 8,
    repeats: int = 3,
    out_dir: str | Path | None = "bench_scenes",
    cache_dir: str | Path | None = None,
) -> list[SceneRow]:
    """The main job: load the model, answer the held-out scenes with every method, print the table and
    write ``scenes.json`` and ``accuracy_tokens.png`` under ``out_dir`` (``None``: write nothing)."""
    from mmeff.bench_inputs import load_bench_model
    from mmeff.mini import HELDOUT_SEED, heldout_items

    if per_kind < 1:
        raise ValueError(f"per_kind must be >= 1, got {per_kind}")
    if media not in ("image", "video", "both"):
        raise ValueError(f"media must be image, video or both, got {media!r}")
    t0 = time.perf_counter()
    all_methods = scene_methods(ratio)  # bad budgets and names fail here, before the model loads
    if methods:
        unknown = [m for m in methods if m not in all_methods]
        if unknown:
            raise ValueError(f"unknown method(s) {unknown}; known: {', '.join(all_methods)}")
        all_methods = {k: v for k, v in all_methods.items() if k == "none" or k in methods}
    model, tokenizer, info = load_bench_model(model_name, cache_dir=cache_dir)
    if tokenizer is None or type(model).__name__ != "LlavaForConditionalGeneration":
        raise ValueError(
            f"the scenes bench runs LLaVA models with a chat tokenizer ('default' or a local LLaVA checkpoint); "
            f"{model_name!r} is {type(model).__name__}{' without a tokenizer' if tokenizer is None else ''} "
            "(`mmeff bench tokens` runs any model)"
        )
    if model.config.vision_config.image_size != 224:
        print(f"note: scenes are rendered at 224 px and resized to {model.config.vision_config.image_size}")
    items = heldout_items(per_kind, image=media != "video", video=media != "image")
    rows = bench_scenes(model, tokenizer, all_methods, items, batch_size=batch_size, repeats=repeats)
    print(f"\nmodel: {info.get('name', model_name)}; trained on: {info.get('trained_on') or '-'}; "
          f"held-out split seed {HELDOUT_SEED}, {per_kind} questions per kind, 4 options (chance 25%)")
    print(f"device: {next(model.parameters()).device}, torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"{platform.processor() or platform.machine()}; budget {ratio:.0%} of visual tokens; accuracy in %")
    print(format_scene_table(rows))
    print(f"total {time.perf_counter() - t0:.1f} s")
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        payload = {"model": info, "per_kind": per_kind, "ratio": ratio, "seed": HELDOUT_SEED,
                   "rows": [asdict(r) for r in rows]}
        (out / "scenes.json").write_text(json.dumps(payload, indent=1, default=str))
        plot_scenes(rows, out / "accuracy_tokens.png")
        print(f"wrote {out / 'scenes.json'} and {out / 'accuracy_tokens.png'}")
    return rows
