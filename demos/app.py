"""The mmeff Gradio app: one tab per part of the library, all offline on the embedded default models.

    mmeff demo                      # http://127.0.0.1:7860
    python -m mmeff.demos.app --port 7861

Tabs: Video QA (a method and token budget against the uncompressed run), Image tokens (what each method
keeps or merges on a real photo), Restoration (Instruct-IPT by instruction), LLM backbone (SepLLM cache,
FlatQuant) and Report (``mmeff report`` on uploaded JSON). Bad input (an upload that is not a video, an
empty file, an instruction restoration cannot follow) shows the library's message in the page.
"""

from __future__ import annotations

import argparse
import functools
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

# no telemetry calls from a machine that may have no network
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import numpy as np  # noqa: E402

from mmeff.datasets.media import IMAGE_NAMES, sample_image  # noqa: E402
from mmeff.demos import llm, restore, token_maps, video_qa  # noqa: E402
from mmeff.demos.common import DemoError  # noqa: E402
from mmeff.eval.report import write_report  # noqa: E402

__all__ = ["build_app", "main"]

VIDEO_HEADERS = ["run", "visual tokens", "prefill ms", "generate s", "answer"]
FRAME_HEADERS = ["frame", "t (s)", "score", "tokens", "path"]


def _gradio() -> Any:
    try:
        import gradio as gr
    except ImportError as e:  # the app is an optional extra; the scripts beside it need only matplotlib
        raise ImportError("the demo app needs Gradio: pip install 'mmeff[demo]'") from e
    return gr


def _guard(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Run ``fn``; bad input (DemoError, ValueError, FileNotFoundError) becomes a ``gr.Error`` with the
    library's message, which Gradio shows in the page (and gradio_client raises)."""
    gr = _gradio()

    # functools.wraps keeps fn's signature visible: Gradio finds its gr.Progress parameter through it
    @functools.wraps(fn)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (DemoError, ValueError, FileNotFoundError) as e:
            raise gr.Error(str(e), duration=None) from None

    return wrapped


def build_app(vlm: tuple[Any, Any] | None = None, out_dir: str | Path | None = None) -> Any:
    """The app as a ``gr.Blocks`` (not launched). ``vlm``: ``(model, tokenizer)`` for the video tab
    (default: mmeff-mini, loaded at the first question); ``out_dir``: where plots are written (a temp folder)."""
    gr = _gradio()
    out = Path(out_dir or tempfile.mkdtemp(prefix="mmeff-demo-"))
    out.mkdir(parents=True, exist_ok=True)
    model, tokenizer = vlm if vlm is not None else (None, None)
    photos = [n for n in IMAGE_NAMES if n not in ("logo", "colorwheel")]

    # ------------------------------------------------------------------------------------ handlers
    clips = Path(tempfile.mkdtemp(prefix="mmeff-demo-clips-"))

    def pick_sample(name: str) -> tuple[Any, str, str, str]:
        bundled = video_qa.samples()
        if name not in bundled:
            raise DemoError(f"unknown bundled clip {name!r}; choose one of {', '.join(bundled)}")
        s = bundled[name]
        # Gradio serves files only from the temp dir or the working directory: the bundled clips live in
        # site-packages and the mmeff cache, so the page gets a copy
        copy = clips / Path(s["video"]).name
        if not copy.is_file():
            shutil.copy(s["video"], copy)
        return str(copy), s["question"], ", ".join(s["options"]), s["answer"] or ""

    def answer(video: str | None, question: str, options: str, reference: str, method: str, ratio: float,
               frames: float) -> tuple[str, list, list, list]:
        opts = [o.strip() for o in (options or "").split(",") if o.strip()]
        res = video_qa.run_video_qa(video, question, method, ratio, int(frames), opts or None,
                                    reference=reference or None, model=model, tokenizer=tokenizer)
        base, red = res.rows[0], res.rows[-1]
        lines = [f"**{red['run']}** ({red['visual_tokens']} visual tokens): **{res.answer}**",
                 f"uncompressed ({base['visual_tokens']} visual tokens): {res.baseline_answer}"]
        if res.reference:
            lines.append(f"reference answer: {res.reference}")
        if len(res.rows) > 1:
            lines.append(f"prefill {red['prefill_ms']:.0f} ms vs {base['prefill_ms']:.0f} ms "
                         f"({red['prefill_ms'] / base['prefill_ms']:.2f}x), "
                         f"tokens {red['visual_tokens'] / base['visual_tokens']:.2f}x")
        lines += [f"_{n}_" for n in res.notes]
        return "\n\n".join(lines), res.frames, res.table(), res.frame_table()

    def maps(image: np.ndarray | None, tokens: float, methods: list[str]) -> tuple[list, str]:
        if image is None:
            raise DemoError("upload a photo or pick a bundled one")
        if not methods:
            raise DemoError("choose at least one method")
        panels = token_maps.run_token_maps(image, int(tokens), methods)
        return [(m.image, m.caption) for m in panels], "\n".join(f"- {m.caption}" for m in panels)

    def restore_fn(image: np.ndarray | None, degradation: str, instruction: str, seed: float) -> tuple[list, list, str]:
        if image is None:
            raise DemoError("upload a photo or pick a bundled one")
        res = restore.run_restore(image, degradation, instruction, int(seed))
        gallery = [(res.degraded, "degraded"), (res.restored, f"restored ({res.task})"), (res.clean, "clean")]
        return gallery, res.table(), f"instruction routed to **{res.task}**"

    # a gr.Progress default is how Gradio hands a handler its progress bar (tqdm bars are mirrored)
    def kv_fn(tokens: float, cache_size: float,
              progress: Any = gr.Progress(track_tqdm=True)) -> tuple[str, list]:  # noqa: B008
        res = llm.run_kv_occupancy(int(tokens), chunk=32, cache_size=int(cache_size),
                                   local_size=int(cache_size) // 2)
        png = llm.plot_kv_occupancy(res, 32, out / f"kv_{int(tokens)}_{int(cache_size)}.png")
        rows = [[llm.short_name(r.method), round(r.ppl, 3), round(r.avg_kv, 1), round(r.kept[-1], 1),
                 round(r.tokens_per_s, 1)] for r in res]
        return str(png), rows

    def quant_fn(method: str, bits: str, samples: float, epochs: float,
                 progress: Any = gr.Progress(track_tqdm=True)) -> list:  # noqa: B008
        w, a, kv = (int(b) for b in bits.split("/"))
        rows = llm.run_quant(method, w, a, kv, samples=int(samples), epochs=int(epochs))
        return [[r["model"], None if r["ppl"] is None else round(r["ppl"], 3), round(r["bytes"] / 2**20, 1),
                 round(r["vs_fp32"], 3), round(r["calibration_s"], 1)] for r in rows]

    def report_fn(files: list[Any] | None) -> tuple[list, str]:
        if not files:
            raise DemoError("upload one or more JSON files written by mmeff bench / mmeff eval --json")
        paths = [getattr(f, "name", f) for f in files]
        written = write_report(paths, out / "report")
        pngs = [(str(p), n) for n, p in written.items() if n.endswith(".png")]
        # the gallery shows the plots; report.md's relative image links would be broken in the page
        md = "\n".join(line for line in written["report.md"].read_text().splitlines() if not line.startswith("!["))
        return pngs, md

    # ---------------------------------------------------------------------------------------- layout
    # pictures travel as PNG: Gradio's default WebP is lossy, which would move the PSNRs shown
    with gr.Blocks(title="mmeff demos") as app:
        gr.Markdown("# mmeff: cheaper vision-language and video models\nEverything here runs offline on the "
                    "embedded models (mmeff-mini, the shipped Instruct-IPT miniature, SmolLM2-135M).")
        with gr.Tab("Video QA"):
            with gr.Row():
                with gr.Column():
                    sample = gr.Dropdown(list(video_qa.samples()), value="scene 0", label="bundled clip")
                    video = gr.Video(label="video (upload your own or pick a bundled clip)", format=None,
                                     sources=["upload"], height=320)
                    question = gr.Textbox(label="question")
                    options = gr.Textbox(label="options (comma-separated; empty for an open question)")
                    reference = gr.Textbox(label="reference answer (if known)")
                    method = gr.Dropdown(list(video_qa.METHODS), value="freevideo", label="method")
                    ratio = gr.Slider(0.05, 1.0, value=0.25, step=0.05, label="token budget (fraction kept)")
                    frames = gr.Slider(1, video_qa.MAX_FRAMES, value=4, step=1, label="frames sampled (mmeff-mini: 4)")
                    ask = gr.Button("Answer", variant="primary")
                with gr.Column():
                    answer_md = gr.Markdown(label="answer")
                    runs = gr.Dataframe(headers=VIDEO_HEADERS, label="tokens and latency", interactive=False)
                    gallery = gr.Gallery(format="png", label="frames as the model saw them: tokens kept, RoI box",
                                         columns=4, height="auto", object_fit="contain")
                    # gallery captions are cut to one line in the thumbnails: the scores get a table
                    frame_table = gr.Dataframe(headers=FRAME_HEADERS, label="frames: CLIP score to the question, "
                                               "tokens to the LLM, Free Video-LLM path", interactive=False)
            sample.change(_guard(pick_sample), sample, [video, question, options, reference], api_name="pick_sample")
            app.load(_guard(pick_sample), sample, [video, question, options, reference])
            ask.click(_guard(answer), [video, question, options, reference, method, ratio, frames],
                      [answer_md, gallery, runs, frame_table], api_name="video_qa")
        with gr.Tab("Image tokens"):
            with gr.Row():
                with gr.Column():
                    photo_name = gr.Dropdown(photos, value="astronaut", label="bundled photo")
                    photo = gr.Image(type="numpy", label="photo", value=sample_image("astronaut"), format="png")
                    tokens = gr.Slider(16, 576, value=144, step=1, label="tokens kept (of 576)")
                    which = gr.CheckboxGroup(list(token_maps.METHODS), value=list(token_maps.METHODS), label="methods")
                    show = gr.Button("Show", variant="primary")
                with gr.Column():
                    panels = gr.Gallery(format="png", label="what reaches the LLM", columns=3, height="auto",
                                        object_fit="contain")
                    captions = gr.Markdown()
            photo_name.change(lambda n: sample_image(n), photo_name, photo)
            show.click(_guard(maps), [photo, tokens, which], [panels, captions], api_name="token_maps")
        with gr.Tab("Restoration"):
            with gr.Row():
                with gr.Column():
                    r_name = gr.Dropdown(photos, value="chelsea", label="bundled photo (chelsea and coffee are held out)")
                    r_photo = gr.Image(type="numpy", label="clean photo", value=sample_image("chelsea"), format="png")
                    degradation = gr.Radio(list(restore.DEGRADATIONS), value="rain", label="degradation")
                    instruction = gr.Textbox(value=restore.DEGRADATIONS["rain"], label="instruction")
                    seed = gr.Number(value=0, precision=0, label="seed")
                    go = gr.Button("Degrade and restore", variant="primary")
                with gr.Column():
                    r_gallery = gr.Gallery(format="png", label="degraded, restored, clean", columns=3, height="auto",
                                           object_fit="contain")
                    r_table = gr.Dataframe(headers=["picture", "PSNR-Y dB", "SSIM-Y", "PSNR-RGB dB"], interactive=False)
                    r_task = gr.Markdown()
            r_name.change(lambda n: sample_image(n), r_name, r_photo)
            degradation.change(lambda d: restore.DEGRADATIONS[d], degradation, instruction)
            go.click(_guard(restore_fn), [r_photo, degradation, instruction, seed], [r_gallery, r_table, r_task],
                     api_name="restore")
        with gr.Tab("LLM backbone"):
            gr.Markdown("SmolLM2-135M-Instruct on Python's documentation text.")
            with gr.Row():
                with gr.Column():
                    kv_tokens = gr.Slider(128, 2048, value=512, step=64, label="tokens streamed")
                    kv_cache = gr.Slider(64, 512, value=128, step=32, label="cache size (SepLLM and StreamingLLM)")
                    kv_go = gr.Button("Stream", variant="primary")
                with gr.Column():
                    kv_plot = gr.Image(type="filepath", label="cache occupancy")
                    kv_table = gr.Dataframe(headers=["cache", "PPL", "avg KV", "KV held at end", "tokens/s"],
                                            interactive=False)
            kv_go.click(_guard(kv_fn), [kv_tokens, kv_cache], [kv_plot, kv_table], api_name="kv_cache")
            with gr.Row():
                with gr.Column():
                    q_method = gr.Dropdown(list(llm.QUANT_METHODS), value="flatquant", label="quantizer")
                    q_bits = gr.Dropdown(["4/4/16", "4/4/4", "4/16/16", "8/8/16"], value="4/4/16",
                                         label="bits W/A/KV")
                    q_samples = gr.Slider(1, 16, value=4, step=1, label="calibration samples (256 tokens)")
                    q_epochs = gr.Slider(1, 5, value=1, step=1, label="calibration epochs")
                    q_go = gr.Button("Quantize (about a minute)", variant="primary")
                with gr.Column():
                    q_table = gr.Dataframe(headers=["model", "held-out PPL", "MiB", "vs FP32", "calibration s"],
                                           interactive=False)
            q_go.click(_guard(quant_fn), [q_method, q_bits, q_samples, q_epochs], q_table, api_name="quantize")
        with gr.Tab("Report"):
            gr.Markdown("JSON from `mmeff bench` (`bench_scenes/scenes.json`, `--json`) or `mmeff eval videoqa --json`.")
            files = gr.File(file_count="multiple", file_types=[".json"], label="JSON files")
            rep_go = gr.Button("Report", variant="primary")
            rep_plots = gr.Gallery(format="png", label="plots", columns=2, height=460, object_fit="contain")
            rep_md = gr.Markdown()
            rep_go.click(_guard(report_fn), files, [rep_plots, rep_md], api_name="report")
    return app


def main(argv: list[str] | None = None) -> int:
    """Command line: build the app and serve it until interrupted."""
    p = argparse.ArgumentParser(prog="python -m mmeff.demos.app", description=__doc__.splitlines()[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--share", action="store_true")
    args = p.parse_args(argv)
    build_app().queue().launch(server_name=args.host, server_port=args.port, share=args.share)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
