"""``mmeff bench`` (the main job): accuracy against visual tokens for every method on mmeff-mini.

The held-out split of :mod:`mmeff.datasets.scenes` (seed :data:`mmeff.models.mini.HELDOUT_SEED`, never trained
on) is asked of the embedded default model: six image question kinds (colour, shape, count, position,
small object, written word) and three video kinds (what appears after X, motion direction, how many
appear; 4 frames), ``per_kind`` questions each. Accuracy is multiple choice (4 options, chance 25%), read
from the greedy answer by :func:`mmeff.eval.videoqa.extract_option`, with a 95% Wilson score interval
(:func:`wilson_interval`) for every kind and for the image, video and overall means.

Rows: ``none`` (the uncompressed model), ``blank`` (the uncompressed model with every frame replaced by
the scenes' uniform background grey: what the question and options alone are worth), every budget
reducer at every ratio of the sweep below 1, Free Video-LLM (videos only, its fixed paths), ToMe (inside
the vision tower; the LLM still sees every token) and VisToG trained on the training split
(:mod:`mmeff.bench.scenes_vistog`). Latency is the median prefill of one image and one video prompt
(warm-up, repeats) from :func:`mmeff.eval.profile.profile`.
"""

from __future__ import annotations

import json
import math
import platform
import sys
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from mmeff.bench.inputs import load_bench_model
from mmeff.bench.reduction import default_methods
from mmeff.bench.scenes_plot import CHANCE, plot_scenes
from mmeff.bench.scenes_vistog import TrainedVisToG, load_or_train_vistog, model_key
from mmeff.core import TokenReducer
from mmeff.datasets.scenes import BACKGROUND, IMAGE_KINDS, VIDEO_KINDS
from mmeff.eval.answers import format_question
from mmeff.eval.profile import profile
from mmeff.eval.scenes import answer_scenes, heldout_items
from mmeff.methods.freevideo import FreeVideoConfig, FreeVideoLLM
from mmeff.methods.tome import ToMe
from mmeff.models import mini
from mmeff.models.hf import chat_batch, llava_tokens_per_image
from mmeff.models.mini import HELDOUT_SEED

__all__ = [
    "DEFAULT_RATIOS",
    "SceneMethod",
    "SceneRow",
    "wilson_interval",
    "parse_ratios",
    "scene_methods",
    "blank_items",
    "bench_scenes",
    "format_scene_table",
    "format_retained_table",
    "retained",
    "plot_scenes",
    "run_scenes_bench",
]

DEFAULT_RATIOS = (1.0, 0.5, 0.25, 0.125)
DEFAULT_VISTOG_RATIOS = (0.25,)
Z95 = 1.959963984540054  # two-sided 95% normal quantile
#: methods that are not budget reducers; ``none`` and ``blank`` always run
OTHER_METHODS = ("freevideo", "tome", "vistog")


def wilson_interval(correct: int, n: int, z: float = Z95) -> tuple[float, float]:
    """95% (for the default ``z``) Wilson score interval of a proportion ``correct / n``.

    Unlike the normal approximation it stays inside [0, 1] and is not degenerate at 0 or ``n`` correct,
    which matters at 100 questions per kind: 8/10 gives (0.490, 0.943)."""
    if n < 1 or not 0 <= correct <= n:
        raise ValueError(f"need 0 <= correct <= n and n >= 1, got correct={correct}, n={n}")
    z2 = z * z
    if correct in (0, n):  # exact ends (the general form gives them only up to rounding): z^2 / (n + z^2)
        edge = z2 / (n + z2)
        return (0.0, edge) if correct == 0 else (1.0 - edge, 1.0)
    p = correct / n
    denom = 1 + z2 / n
    centre = (p + z2 / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def parse_ratios(ratios: str | Sequence[float]) -> list[float]:
    """Budget ratios from ``"1,0.5,0.25"`` or a sequence: each in (0, 1] (1 is the uncompressed model),
    duplicates dropped, largest first. ``ValueError`` with a one-line message otherwise."""
    if isinstance(ratios, str):
        try:
            values = [float(p) for p in ratios.split(",") if p.strip()]
        except ValueError:
            raise ValueError(f"ratios must be comma-separated numbers in (0, 1], got {ratios!r}") from None
    else:
        values = [float(r) for r in ratios]
    if not values:
        raise ValueError("need at least one ratio in (0, 1]")
    bad = [r for r in values if not 0 < r <= 1]  # also catches nan
    if bad:
        raise ValueError(f"every ratio must be in (0, 1] (a fraction of the visual tokens; 1 = uncompressed), "
                         f"got {bad[0]:g}")
    return sorted(set(values), reverse=True)


@dataclass
class SceneMethod:
    """One row to run: ``family`` (``none``, ``blank``, a reducer name, ``freevideo``, ``tome``,
    ``vistog``), its budget ``ratio`` (``None`` for fixed configurations), the method object (``None``,
    a reducer, ToMe, or a :class:`~mmeff.bench.scenes_vistog.TrainedVisToG`) and a note for the JSON."""

    family: str
    ratio: float | None
    method: Any = None
    blank: bool = False
    note: str = ""

    @property
    def video_only(self) -> bool:
        """Video-level methods (Free Video-LLM) keep every token of a single image: run on videos only."""
        return bool(getattr(self.method, "video_level", False))

    def label(self) -> str:
        """Table label: the method's own description unless it is too long for a column."""
        if self.method is None:
            return self.family
        describe = getattr(self.method, "describe", None)
        text = self.family if describe is None else describe()
        return text if len(text) <= 40 else self.family


@dataclass
class SceneRow:
    """One method on the held-out scenes: accuracy, its 95% Wilson interval ``[lo, hi]`` and the number
    of questions ``n`` per kind (and ``image``/``video``/``all``), mean visual tokens reaching the LLM per
    item and prefill latency per medium, wall seconds, and the per-question answers."""

    method: str
    ratio: float | None
    label: str
    accuracy: dict[str, float]
    interval: dict[str, list[float]]
    n: dict[str, int]
    image_tokens: float | None
    video_tokens: float | None
    image_prefill_ms: float | None
    video_prefill_ms: float | None
    seconds: float
    note: str = ""
    answers: list[dict[str, Any]] = field(default_factory=list, repr=False)


def scene_methods(ratios: Sequence[float] = DEFAULT_RATIOS, methods: Sequence[str] | None = None,
                  tome_r: int = 8) -> list[SceneMethod]:
    """The rows of the sweep (VisToG excepted: it needs the model to train): ``none``, ``blank``, every
    registered budget reducer at each ratio below 1, Free Video-LLM sized for 4 frames of an 8x8 grid (1
    slow + 1 middle frame with the RoI crop, 4 fast frames at 2x2; 72 of 256 tokens) scored by the mini
    dual encoder, and ToMe with ``r=tome_r`` inside the vision tower (un-merged before the projector, so
    the LLM sees every token; it saves vision compute). ``methods`` keeps a subset (``none`` and
    ``blank`` always run); unknown names raise ``ValueError``."""
    ratios = parse_ratios(ratios)
    budget = [name for name in default_methods(0.5) if name != "none"]
    if methods is not None:
        known = ["none", "blank", *budget, *OTHER_METHODS]
        unknown = [m for m in methods if m not in known]
        if unknown:
            raise ValueError(f"unknown method(s) {unknown}; known: {', '.join(known)}")
    keep = set(methods) if methods is not None else set(budget) | set(OTHER_METHODS)
    rows = [SceneMethod("none", 1.0, note="uncompressed"),
            SceneMethod("blank", 1.0, blank=True, note="uncompressed model, every frame a uniform background-grey "
                        "image: what the question and options alone are worth")]
    for ratio in (r for r in ratios if r < 1):
        reducers = default_methods(ratio)  # a fresh reducer per ratio; bad budgets fail here, before loading
        rows += [SceneMethod(name, ratio, reducers[name]) for name in budget if name in keep]
    if "freevideo" in keep:
        cfg = FreeVideoConfig.from_official(mini.FREEVIDEO_SCENES, faithful=False)
        rows.append(SceneMethod("freevideo", None, FreeVideoLLM(cfg, scorer=mini.clip_scorer()),
                                note=f"videos only; fixed paths {mini.FREEVIDEO_SCENES}"))
    if "tome" in keep:
        rows.append(SceneMethod("tome", None, ToMe(r=tome_r),
                                note=f"r={tome_r} inside the vision tower, un-merged before the projector: "
                                "the LLM reads every token"))
    return rows


def blank_items(items: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """``items`` with every frame replaced by a uniform image of the scenes' background grey, same size."""
    grey = np.asarray(BACKGROUND, dtype=np.uint8)
    return [{**it, "frames": [np.broadcast_to(grey, np.shape(f)).copy() for f in it["frames"]]} for it in items]


def _tally(results: Sequence[dict[str, Any]]) -> tuple[dict[str, float], dict[str, list[float]], dict[str, int]]:
    # the groups of mmeff.eval.scenes.accuracy_by_kind, with counts and intervals
    groups = {k: [r for r in results if r["kind"] == k] for k in (*IMAGE_KINDS, *VIDEO_KINDS)}
    groups["image"] = [r for r in results if r["kind"] in IMAGE_KINDS]
    groups["video"] = [r for r in results if r["kind"] in VIDEO_KINDS]
    groups["all"] = list(results)
    acc, interval, n = {}, {}, {}
    for k, rs in groups.items():
        if rs:
            correct = sum(bool(r["correct"]) for r in rs)
            acc[k], n[k] = correct / len(rs), len(rs)
            interval[k] = list(wilson_interval(correct, len(rs)))
    return acc, interval, n


def _prefill(model: nn.Module, tokenizer: Any, item: dict[str, Any], method: Any, repeats: int) -> tuple[float, int]:
    """Median prefill ms of one prompt and the visual tokens that reached the LLM (measured, not assumed)."""
    cfg = model.config
    inputs: dict[str, Any] = chat_batch(tokenizer, [format_question(item["question"], item["options"])],
                                        [np.stack(item["frames"])], cfg)
    if isinstance(method, TokenReducer):
        inputs["mmeff_text"] = [item["question"]]
    rep = profile(model, inputs, method, decode_tokens=1, warmup=1, repeats=repeats)
    return rep.latency.prefill_s * 1e3, int(rep.visual_tokens_per_sample[0])


def bench_scenes(
    model: nn.Module,
    tokenizer: Any,
    methods: Sequence[SceneMethod],
    items: list[dict[str, Any]],
    *,
    batch_size: int = 16,
    repeats: int = 3,
    progress: bool = True,
) -> list[SceneRow]:
    """Answer ``items`` (:func:`mmeff.eval.scenes.heldout_items`) with each method, ``batch_size`` image
    questions per generate call (half as many 4-frame videos); one progress bar over all answers."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    images = [it for it in items if it["kind"] not in VIDEO_KINDS]
    videos = [it for it in items if it["kind"] in VIDEO_KINDS]
    blanks: dict[str, list[dict[str, Any]]] = {}

    def runs(spec: SceneMethod) -> list[tuple[str, list[dict[str, Any]], int]]:
        out = [("image", images, batch_size)] if images and not spec.video_only else []
        return out + ([("video", videos, max(1, batch_size // 2))] if videos else [])

    todo = [spec for spec in methods if runs(spec)]
    bar = tqdm(total=sum(len(its) for spec in todo for _, its, _ in runs(spec)), desc="bench[scenes]",
               unit="q", disable=not progress, dynamic_ncols=True)
    rows = []
    for spec in todo:
        bar.set_postfix_str(spec.label())
        t0 = time.perf_counter()
        vistog = isinstance(spec.method, TrainedVisToG)
        reducer = spec.method.vistog if vistog else spec.method
        results: list[dict[str, Any]] = []
        tokens: dict[str, float | None] = {"image": None, "video": None}
        ms: dict[str, float | None] = {"image": None, "video": None}
        for medium, its, bs in runs(spec):
            if spec.blank:
                its = blanks.setdefault(medium, blank_items(its))
            res: list[dict[str, Any]] = []
            with spec.method.in_place(model) if vistog else nullcontext():
                for i in range(0, len(its), bs):
                    chunk = its[i : i + bs]
                    res += answer_scenes(model, tokenizer, chunk, reducer=reducer, batch_size=len(chunk))
                    bar.update(len(chunk))
                if not spec.blank:  # the blank row costs what `none` costs: not timed twice
                    ms[medium], measured = _prefill(model, tokenizer, its[0], reducer, repeats)
                    if vistog:  # answer_scenes counts only what TokenReducers report; VisToG's M per frame is measured here
                        for r in res:
                            r["visual_tokens"] = measured
            for it, r in zip(its, res):
                r["id"] = it.get("id")
            tokens[medium] = sum(r["visual_tokens"] for r in res) / len(res)
            results += res
        acc, interval, n = _tally(results)
        rows.append(SceneRow(spec.family, spec.ratio, spec.label(), acc, interval, n, tokens["image"],
                             tokens["video"], ms["image"], ms["video"], time.perf_counter() - t0, spec.note, results))
    bar.close()
    return rows


def _pct(v: float | None, digits: int = 0) -> str:
    return "-" if v is None else f"{100 * v:.{digits}f}"


def format_scene_table(rows: Sequence[SceneRow]) -> str:
    """Plain-text table: accuracy (%) per question kind, then image / video / all with their 95% Wilson
    intervals, then visual tokens and prefill ms per medium."""
    kinds = [*IMAGE_KINDS, *VIDEO_KINDS]
    overall = ["image", "video", "all"]
    head = ["method", *kinds, *(f"{k} [95% CI]" for k in overall), "img tok", "img ms", "vid tok", "vid ms"]

    def f(v: float | None, spec: str) -> str:
        return "-" if v is None else format(v, spec)

    def ci(r: SceneRow, k: str) -> str:
        if k not in r.accuracy:
            return "-"
        lo, hi = r.interval[k]
        return f"{_pct(r.accuracy[k], 1)} [{_pct(lo, 1)}, {_pct(hi, 1)}]"

    lines = [[r.label, *(_pct(r.accuracy.get(k)) for k in kinds), *(ci(r, k) for k in overall),
              f(r.image_tokens, ".0f"), f(r.image_prefill_ms, ".0f"), f(r.video_tokens, ".0f"),
              f(r.video_prefill_ms, ".0f")] for r in rows]
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(head)]
    fmt = "  ".join(f"{{:<{w}}}" if i == 0 else f"{{:>{w}}}" for i, w in enumerate(widths))
    return "\n".join([fmt.format(*head), fmt.format(*("-" * w for w in widths)), *(fmt.format(*x) for x in lines)])


def retained(rows: Sequence[SceneRow], key: str = "all") -> dict[str, dict[float, float]]:
    """``{method: {ratio: accuracy / uncompressed accuracy}}`` on ``key`` questions, for every method run at
    a budget ratio below 1 (empty when ``none`` scored 0 or did not run)."""
    base = next((r.accuracy.get(key) for r in rows if r.method == "none"), None)
    out: dict[str, dict[float, float]] = {}
    if not base:
        return out
    for r in rows:
        if r.ratio is not None and r.ratio < 1 and key in r.accuracy:
            out.setdefault(r.method, {})[r.ratio] = r.accuracy[key] / base
    return out


def format_retained_table(rows: Sequence[SceneRow]) -> str:
    """Accuracy retained per method at each ratio of the sweep (overall accuracy / the uncompressed
    model's, in %)."""
    table = retained(rows)
    if not table:
        return "accuracy retained: - (no budget rows, or the uncompressed model scored 0)"
    ratios = sorted({r for v in table.values() for r in v}, reverse=True)
    base = next(r.accuracy["all"] for r in rows if r.method == "none")
    head = ["method", *(f"{100 * r:g}%" for r in ratios)]
    lines = [[m, *(_pct(v.get(r), 1) for r in ratios)] for m, v in table.items()]
    widths = [max(len(h), *(len(x[i]) for x in lines)) for i, h in enumerate(head)]
    fmt = "  ".join(f"{{:<{w}}}" if i == 0 else f"{{:>{w}}}" for i, w in enumerate(widths))
    title = (f"accuracy retained (all questions: accuracy / uncompressed {_pct(base, 1)}%, in %) at each share of "
             "the visual tokens")
    return "\n".join([title, fmt.format(*head), *(fmt.format(*x) for x in lines)])


def _payload(rows: Sequence[SceneRow], meta: dict[str, Any], answers: bool) -> dict[str, Any]:
    out = []
    for r in rows:
        d = asdict(r)
        if not answers:
            d.pop("answers")
        out.append(d)
    table = {m: {f"{k:g}": v for k, v in by.items()} for m, by in retained(rows).items()}
    return {**meta, "retained": table, "rows": out}


def run_scenes_bench(
    model_name: str = "default",
    *,
    per_kind: int = 100,
    ratios: str | Sequence[float] = DEFAULT_RATIOS,
    methods: Sequence[str] | None = None,
    media: str = "both",
    batch_size: int = 16,
    repeats: int = 3,
    vistog_ratios: str | Sequence[float] = DEFAULT_VISTOG_RATIOS,
    vistog_steps: int = 200,
    vistog_batch_size: int = 16,
    out_dir: str | Path | None = "bench_scenes",
    cache_dir: str | Path | None = None,
    json_path: str | Path | None = None,
    progress: bool = True,
) -> list[SceneRow]:
    """The main job: load the model, train (or load from the cache) VisToG at ``vistog_ratios`` that are
    in the sweep, answer the held-out scenes with every row of :func:`scene_methods`, print both tables,
    and write ``scenes.json`` (with every answer) and ``accuracy_vs_tokens.png`` under ``out_dir``
    (``None``: no files). ``json_path`` also writes the summary (no per-question answers) there; ``"-"``
    prints it to stdout and the tables to stderr instead."""
    if per_kind < 1:
        raise ValueError(f"per_kind must be >= 1, got {per_kind}")
    if media not in ("image", "video", "both"):
        raise ValueError(f"media must be image, video or both, got {media!r}")
    if batch_size < 1 or repeats < 1:
        raise ValueError(f"batch_size and repeats must be >= 1, got {batch_size}, {repeats}")
    to_stdout = str(json_path) == "-"
    say: Callable[[str], None] = (lambda s: print(s, file=sys.stderr)) if to_stdout else print
    t0 = time.perf_counter()
    ratios = parse_ratios(ratios)
    specs = scene_methods(ratios, methods)  # bad ratios and names fail here, before the model loads
    no_vistog = not (vistog_ratios.strip() if isinstance(vistog_ratios, str) else len(vistog_ratios))
    wanted = [] if no_vistog else parse_ratios(vistog_ratios)
    vistog_at = [r for r in wanted if r < 1 and r in ratios] if methods is None or "vistog" in methods else []
    if vistog_at and vistog_steps < 1:
        raise ValueError(f"VisToG training steps must be >= 1, got {vistog_steps}")
    skipped = [r for r in wanted if r not in vistog_at]
    model, tokenizer, info = load_bench_model(model_name, cache_dir=cache_dir)
    if tokenizer is None or type(model).__name__ != "LlavaForConditionalGeneration":
        raise ValueError(
            f"the scenes bench runs LLaVA models with a chat tokenizer ('default' or a local LLaVA checkpoint); "
            f"{model_name!r} is {type(model).__name__}{' without a tokenizer' if tokenizer is None else ''} "
            "(`mmeff bench tokens` runs any model)"
        )
    if model.config.vision_config.image_size != 224:
        say(f"note: scenes are rendered at 224 px and resized to {model.config.vision_config.image_size}")
    per_image = llava_tokens_per_image(model.config)
    if skipped and (methods is None or "vistog" in methods):
        say(f"note: VisToG runs only at ratios of the sweep below 1; skipped {', '.join(f'{r:g}' for r in skipped)}")
    trained = []
    for r in vistog_at:
        m = max(1, round(r * per_image))
        say(f"VisToG M={m} ({r:g} of {per_image} tokens per image): stage 1 on training-split scenes "
            f"({vistog_steps} steps of {vistog_batch_size}), cached under the model cache")
        tv = load_or_train_vistog(model, tokenizer, m, key=model_key(model_name, info), steps=vistog_steps,
                                  batch_size=vistog_batch_size, cache_dir=cache_dir, progress=progress)
        rec = tv.record
        say(f"  {'reused the cache' if rec['cached'] else 'trained'}: {rec['steps']} steps, {rec['seconds']:.0f} s "
            f"of training, loss {rec['first_loss']:.3f} -> {rec['final_loss']:.3f} ({rec['path']})")
        trained.append(tv)
        specs.append(SceneMethod("vistog", r, tv, note=f"stage 1, {rec['steps']} steps on training-split images "
                                 f"(projector retrained with it); on videos M={m} per frame"))
    items = heldout_items(per_kind, image=media != "video", video=media != "image")
    rows = bench_scenes(model, tokenizer, specs, items, batch_size=batch_size, repeats=repeats, progress=progress)
    seconds = time.perf_counter() - t0
    n = rows[0].n
    device = {"device": str(next(model.parameters()).device), "torch": torch.__version__,
              "threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine()}
    say(f"\nmodel: {info.get('name', model_name)}; trained on: {info.get('trained_on') or '-'}; held-out split seed "
        f"{HELDOUT_SEED}, {per_kind} questions per kind, 4 options (chance 25%); "
        f"n = {n.get('image', 0)} image + {n.get('video', 0)} video = {n['all']} questions")
    say(f"device: {device['device']}, torch {device['torch']}, threads {device['threads']}, {device['cpu']}; "
        f"budget ratios {', '.join(f'{r:g}' for r in ratios)}; accuracy in %, [95% Wilson interval]")
    say(format_scene_table(rows))
    say("")
    say(format_retained_table(rows))
    say(f"total {seconds:.1f} s")
    meta = {"suite": "scenes", "model": info, "seed": HELDOUT_SEED, "per_kind": per_kind, "media": media, "n": n,
            "chance": CHANCE, "interval": "wilson, 95%", "ratios": ratios, "batch_size": batch_size,
            "repeats": repeats, **device, "seconds": seconds, "vistog": [tv.record for tv in trained]}
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "scenes.json").write_text(json.dumps(_payload(rows, meta, answers=True), indent=1, default=str))
        plot_scenes(rows, out / "accuracy_vs_tokens.png")
        say(f"wrote {out / 'scenes.json'} and {out / 'accuracy_vs_tokens.png'}")
    if json_path is not None:
        text = json.dumps(_payload(rows, meta, answers=False), indent=1, default=str)
        if to_stdout:
            print(text)
        else:
            Path(json_path).write_text(text)
            say(f"wrote {json_path}")
    return rows
