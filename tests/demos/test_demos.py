"""The demos: each tab's function checked against independent references, then the app served on
localhost and driven through gradio_client (and, where Chromium is installed, rendered by it)."""

from __future__ import annotations

import json
import shutil
import socket
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

from mmeff.datasets.media import sample_image
from mmeff.demos import token_maps, video_qa
from mmeff.demos.common import DemoError, draw_box, token_overlay


# ------------------------------------------------------------------------------------------ drawing
def test_token_overlay_dims_dropped_and_outlines_groups():
    img = np.full((8, 8, 3), 200, np.uint8)
    a = np.array([[0, 0], [-1, 1]])
    out = token_overlay(img, a, dim=0.5)
    assert out[6, 1].tolist() == [100, 100, 100]  # dropped cell darkened
    assert out[1, 1].tolist() == [200, 200, 200]  # kept cell untouched
    assert out[1, 4].tolist() == [200, 200, 200]  # two patches of one output: no border between them
    assert out[4, 1].tolist() == [255, 255, 255] == out[6, 4].tolist()  # borders between outputs
    assert out[5, 5].tolist() == [200, 200, 200]
    boxed = draw_box(img, (2, 6, 2, 6), color=(255, 0, 0), width=1)
    assert boxed[2, 4].tolist() == [255, 0, 0] and boxed[4, 4].tolist() == [200, 200, 200]


# ------------------------------------------------------------------------------------- image tokens
def test_fourier_reconstruction_is_the_dct_low_pass():
    from scipy.fft import dctn, idctn

    import mmeff

    x = token_maps.patch_tokens(sample_image("coffee"))  # (1, 576, 588)
    red = mmeff.create_reducer("fourier", tokens=144)(x, mmeff.TokenContext(grid=(24, 24)))
    rec = token_maps.fourier_reconstruct(red.tokens, (12, 12))
    grid = x[0].double().view(24, 24, -1).numpy()
    coef = dctn(grid, axes=(0, 1), norm="ortho")
    coef[12:] = 0
    coef[:, 12:] = 0
    ref = idctn(coef, axes=(0, 1), norm="ortho")
    assert np.abs(rec[0].view(24, 24, -1).numpy() - ref).max() < 1e-4


def test_tome_source_groups_are_member_means():
    x = token_maps.patch_tokens(sample_image("astronaut"))
    merged, group = token_maps.tome_source(x, 100)
    assert merged.shape == (1, 100, x.shape[-1])
    assert sorted(group.unique().tolist()) == list(range(100))
    for g in (0, 17, 99):
        assert torch.allclose(merged[0, g], x[0, group == g].mean(0), atol=1e-5)


def test_token_maps_panels_and_budgets():
    maps = token_maps.run_token_maps(sample_image("astronaut"), 144)
    assert [m.method for m in maps] == ["input", *token_maps.METHODS]
    assert all(m.image.shape == (336, 336, 3) and m.image.dtype == np.uint8 for m in maps)
    assert {m.method: m.tokens for m in maps} == {"input": 576, "random": 144, "uniform": 144, "pool": 144,
                                                  "tome": 144, "fourier": 144}
    # the low-pass keeps the picture recognisable; ToMe's group means more so (it merges similar patches)
    psnr = {m.method: m.psnr for m in maps if m.psnr is not None}
    assert 12 < psnr["fourier"] < psnr["tome"]
    with pytest.raises(DemoError, match="between 1 and 576"):
        token_maps.run_token_maps(sample_image("astronaut"), 600)
    with pytest.raises(DemoError, match="unknown method"):
        token_maps.run_token_maps(sample_image("astronaut"), 144, ["visionzip"])
    with pytest.raises(DemoError, match="RGB uint8"):
        token_maps.run_token_maps(np.zeros((10, 10), np.float32), 144)


# ------------------------------------------------------------------------------------------ video QA
@pytest.fixture(scope="module")
def scene():
    return video_qa.samples()["scene 1"]


def test_video_qa_pool_against_uncompressed(default, scene):
    model, tok, _ = default
    res = video_qa.run_video_qa(scene["video"], scene["question"], "pool", 0.25, 4, scene["options"],
                                reference=scene["answer"], model=model, tokenizer=tok, repeats=1)
    assert [r["visual_tokens"] for r in res.rows] == [256, 64]
    assert all(r["prefill_ms"] > 0 and isinstance(r["answer"], str) for r in res.rows)
    assert len(res.frames) == 4 and all("16 of 64 tokens" in cap for _, cap in res.frames)
    assert [f["tokens"] for f in res.frame_rows] == [16] * 4 and [f["path"] for f in res.frame_rows] == [""] * 4
    assert res.baseline_answer == res.rows[0]["answer"] and res.answer == res.rows[1]["answer"]
    # a 4x4 pool outlines 16 cells of 2x2 patches in every frame: white borders, nothing darkened
    img = res.frames[0][0]
    assert img.shape[0] == img.shape[1] and (img == 255).all(-1).any()


def test_video_qa_freevideo_frames_scores_and_boxes(default, scene):
    model, tok, _ = default
    res = video_qa.run_video_qa(scene["video"], scene["question"], "freevideo", frames=8, model=model,
                                tokenizer=tok, repeats=1)
    assert len(res.scores) == 8 and len(res.frames) == 8
    # the slow path takes the frame most similar to the question
    slow = [i for i, (_, cap) in enumerate(res.frames) if "slow (RoI)" in cap]
    assert slow == [int(np.argmax(res.scores))]
    # its RoI box is drawn in the box colour
    img = res.frames[slow[0]][0]
    assert ((img == np.array([255, 64, 32], np.uint8)).all(-1)).sum() > 100
    assert res.rows[1]["visual_tokens"] < res.rows[0]["visual_tokens"] == 512
    assert any("budget is set by its paths" in n for n in res.notes)
    # every LLM token comes from one frame, so the per-frame counts add up to the run's visual tokens;
    # the slow frame gives its 7x4 RoI crop (plus 2x2 when the fast path takes it too), a fast-only frame 4
    rows = res.frame_rows
    assert sum(f["tokens"] for f in rows) == res.rows[1]["visual_tokens"]
    assert rows[slow[0]]["tokens"] == 28 + (4 if "fast" in rows[slow[0]]["path"] else 0)
    assert all(f["tokens"] == 4 for f in rows if f["path"] == "fast 2x2")
    assert all(f["tokens"] == 0 for f in rows if f["path"] == "not used")
    assert [round(f["score"], 6) for f in rows] == [round(x, 6) for x in res.scores]


def test_video_qa_bad_input(default, tmp_path, scene):
    model, tok, _ = default
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    text = tmp_path / "notes.mp4"
    text.write_text("this is not a video\n" * 50)
    cases = [(str(empty), "what?", "pool", "empty"), (str(text), "what?", "pool", "not a readable video"),
             (None, "what?", "pool", "no video"), (scene["video"], "  ", "pool", "ask a question"),
             (scene["video"], "what?", "visionzip", "unknown method")]
    for video, q, method, msg in cases:
        with pytest.raises(DemoError, match=msg):
            video_qa.run_video_qa(video, q, method, 0.25, 4, model=model, tokenizer=tok)
    with pytest.raises(DemoError, match=r"\(0, 1\]"):
        video_qa.run_video_qa(scene["video"], "what?", "pool", 0.0, 4, model=model, tokenizer=tok)


def test_video_qa_script_writes_png(default, scene, tmp_path, monkeypatch):
    from mmeff.demos import common

    monkeypatch.setattr(common, "default_vlm", lambda: default)
    monkeypatch.setattr(video_qa, "default_vlm", lambda: default)
    out = tmp_path / "vqa.png"
    assert video_qa.main(["--sample", "scene 2", "--method", "uniform", "--frames", "4", "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------------------------------ restoration
def test_restore_by_instruction_beats_the_degraded_input():
    from skimage.metrics import peak_signal_noise_ratio

    from mmeff.demos import restore

    res = restore.run_restore(sample_image("chelsea"), "rain", "please get rid of the rain streaks", seed=3)
    assert res.task == "derain" and res.clean.shape == res.restored.shape == res.degraded.shape
    deg, rest = res.rows
    assert rest["psnr_y"] > deg["psnr_y"] + 2 and rest["ssim_y"] > deg["ssim_y"]
    # RGB PSNR of the 8-bit pictures shown, independently
    assert rest["psnr_rgb"] == pytest.approx(peak_signal_noise_ratio(res.clean, res.restored), abs=1e-3)
    with pytest.raises(DemoError, match="matches no restoration task|cannot"):
        restore.run_restore(sample_image("chelsea"), "rain", "paint it in van gogh style")
    with pytest.raises(DemoError, match="unknown degradation"):
        restore.run_restore(sample_image("chelsea"), "fog", "remove the fog")
    with pytest.raises(DemoError, match="too small"):
        restore.run_restore(np.zeros((8, 8, 3), np.uint8), "rain", "remove the rain")


def test_shipped_ipt_is_checked(tmp_path):
    from mmeff.models.instruct_ipt import SHIPPED_FILE, SHIPPED_RECORD, shipped_model
    from mmeff.models.mini import WEIGHTS_DIR

    rec = json.loads((WEIGHTS_DIR / SHIPPED_RECORD).read_text())
    assert rec["scores"]["average"]["psnr_y"] > rec["scores"]["average"]["input_psnr_y"]
    shutil.copy(WEIGHTS_DIR / SHIPPED_RECORD, tmp_path / SHIPPED_RECORD)
    data = bytearray((WEIGHTS_DIR / SHIPPED_FILE).read_bytes())
    data[-1] ^= 0xFF
    (tmp_path / SHIPPED_FILE).write_bytes(bytes(data))
    with pytest.raises(ValueError, match="does not match"):
        shipped_model(tmp_path)
    (tmp_path / SHIPPED_FILE).unlink()
    with pytest.raises(FileNotFoundError, match="mmeff ipt train"):
        shipped_model(tmp_path)


# ------------------------------------------------------------------------------------------ LLM backbone
def test_kv_occupancy_bounds(smollm2):
    from mmeff.demos import llm

    model, tok = smollm2
    full, sep, stream = llm.run_kv_occupancy(192, chunk=32, cache_size=96, local_size=48, sep_size=16,
                                             model=model, tokenizer=tok, progress=False)
    assert full.kept == [32, 64, 96, 128, 160, 192]
    assert max(sep.kept) <= 96 and max(stream.kept) <= 96
    assert sep.kept[0] == 32 and stream.kept[-1] == 96
    assert [llm.short_name(r.method) for r in (full, sep, stream)] == ["full cache", "SepLLM (cache 96)",
                                                                       "StreamingLLM (cache 96)"]
    assert sep.avg_kv < full.avg_kv and stream.avg_kv < full.avg_kv and all(np.isfinite([full.ppl, sep.ppl, stream.ppl]))
    with pytest.raises(DemoError, match="between"):
        llm.run_kv_occupancy(16, chunk=32, model=model, tokenizer=tok)


def test_quant_rtn_size_and_perplexity(model_cache, smollm2):
    from mmeff.demos import llm

    rows = llm.run_quant("rtn", 4, 16, 16, samples=1, calib_len=64, eval_tokens=256, cache_dir=model_cache,
                         progress=False)
    fp, fp16, q = rows
    assert fp16["bytes"] == pytest.approx(fp["bytes"] / 2, rel=1e-3)
    # int4 codes for every decoder linear; the tied embedding (28M params) stays FP32
    assert 0.15 < q["vs_fp32"] < 0.45
    assert fp["ppl"] < q["ppl"] < 10 * fp["ppl"]


# ------------------------------------------------------------------------------------------ report
def _write_inputs(tmp_path):
    scenes = {"rows": [
        {"method": "none", "accuracy": {"image": 0.25, "video": 0.3}, "image_tokens": 64, "video_tokens": 256,
         "image_prefill_ms": 300.0, "video_prefill_ms": 600.0, "seconds": 1.0, "answers": []},
        {"method": "pool(ratio=0.25)", "accuracy": {"image": 0.2, "video": 0.35}, "image_tokens": 16,
         "video_tokens": 64, "image_prefill_ms": 200.0, "video_prefill_ms": 250.0, "seconds": 1.0, "answers": []}]}
    (tmp_path / "scenes.json").write_text(json.dumps(scenes))
    for m, acc, tok in (("none", 0.4, 256.0), ("uniform(ratio=0.25)", 0.35, 64.0)):
        (tmp_path / f"eval_{m[:4]}.json").write_text(json.dumps(
            {"method": m, "model": "mmeff-mini", "n": 12, "accuracy": acc, "visual_tokens_mean": tok,
             "latency_mean_s": 0.5}))
    (tmp_path / "kv.json").write_text(json.dumps([{"run": "in-context", "method": "sepllm", "ppl": 12.5}]))
    return sorted(tmp_path.glob("*.json"))


def test_report_plots_and_tables(tmp_path):
    from PIL import Image

    from mmeff.eval.report import read_report_file, write_report

    files = _write_inputs(tmp_path)
    parsed = read_report_file(tmp_path / "scenes.json")
    assert parsed.kind == "scenes" and len(parsed.points) == 4
    assert {(p.method, p.medium, p.tokens, p.accuracy) for p in parsed.points} >= {("pool(ratio=0.25)", "video", 64, 0.35)}
    assert read_report_file(tmp_path / "kv.json").kind == "table"
    written = write_report(files, tmp_path / "out")
    assert set(written) == {"accuracy_vs_tokens.png", "latency_vs_tokens.png", "report.md"}
    for name in ("accuracy_vs_tokens.png", "latency_vs_tokens.png"):
        assert Image.open(written[name]).size[0] > 400
    md = written["report.md"].read_text()
    assert "| eval mmeff-mini | uniform(ratio=0.25) | video, per answer | 64 | 0.35 | 500 |" in md
    assert "| in-context | sepllm | 12.5 |" in md and md.count("\n## ") == 5
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="not JSON"):
        read_report_file(bad)


def test_report_plot_shows_coinciding_points(tmp_path):
    from PIL import Image

    from mmeff.eval.report import ReportPoint, plot_points

    # none and ToMe at the same tokens and accuracy (as in scenes.json): both colours must reach the page
    pts = [ReportPoint("scenes", "none", "video", 256, 0.3), ReportPoint("scenes", "ToMe(r=8)", "video", 256, 0.3),
           ReportPoint("scenes", "pool", "video", 16, 0.2)]
    img = np.asarray(Image.open(plot_points(pts, "accuracy", tmp_path / "a.png")).convert("RGB")).astype(int)
    # tab10's first three, one per method; each shows in the legend and in its marker. pool's marker stands
    # alone: a hidden marker would leave only the legend swatch, about half of pool's count
    blue, orange, green = ((np.abs(img - rgb).sum(-1) < 12).sum() for rgb in ((31, 119, 180), (255, 127, 14),
                                                                              (44, 160, 44)))
    assert green > 100 and blue > 0.85 * green and orange > 0.85 * green, (blue, orange, green)
    assert plot_points(pts, "latency_ms", tmp_path / "l.png") is None  # no point has a latency


def test_report_same_file_names_in_two_folders(tmp_path):
    from mmeff.eval.report import write_report

    for run in ("a", "b"):  # two runs of each: the scenes series keep their folders apart ...
        (tmp_path / run).mkdir()
        _write_inputs(tmp_path / run)
    files = sorted(tmp_path.glob("*/scenes.json")) + sorted(tmp_path.glob("*/eval_unif.json"))
    md = write_report(files, tmp_path / "out")["report.md"].read_text()
    assert "| a/scenes | none | image |" in md and "| b/scenes | none | image |" in md
    # ... while an eval file's series is its model's, whatever folder it came from
    assert md.count("| eval mmeff-mini | uniform(ratio=0.25) |") == 2 and "| a/eval_unif |" not in md


def test_report_cli(tmp_path, capsys):
    from mmeff.cli.main import main

    files = _write_inputs(tmp_path)
    assert main(["report", *map(str, files), "--out", str(tmp_path / "r")]) == 0
    assert (tmp_path / "r" / "report.md").is_file() and "wrote" in capsys.readouterr().out
    assert main(["report", str(tmp_path / "missing.json")]) == 2


# ------------------------------------------------------------------------------------------ the app
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(default, tmp_path_factory):
    pytest.importorskip("gradio", reason="the demo extra (pip install 'mmeff[demo]') is not installed")
    from mmeff.demos.app import build_app

    model, tok, _ = default
    app = build_app(vlm=(model, tok), out_dir=tmp_path_factory.mktemp("demo-out"))
    port = _free_port()
    app.queue().launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        yield app, f"http://127.0.0.1:{port}/"
    finally:
        app.close()


def test_app_serves_page_and_answers(served, scene, photo_png):
    from gradio_client import Client, handle_file
    from PIL import Image

    _, url = served
    page = urllib.request.urlopen(url, timeout=30).read().decode()
    assert "<title>mmeff demos</title>" in page or "mmeff demos" in page
    c = Client(url, verbose=False)
    assert {"/video_qa", "/token_maps", "/restore", "/kv_cache", "/quantize", "/report"} <= set(
        c.view_api(return_format="dict")["named_endpoints"])
    clip, q, opts, ref = c.predict("bikes", api_name="/pick_sample")  # a bundled clip, served from a copy
    assert q == video_qa.samples()["bikes"]["question"] and opts == "" and ref == ""
    path = clip["video"] if isinstance(clip, dict) else clip  # gradio_client's Video payload or a path
    assert Path(path).read_bytes()[4:8] == b"ftyp"
    md, gallery, table, frame_table = c.predict(handle_file(scene["video"]), scene["question"], ", ".join(scene["options"]),
                                      scene["answer"], "uniform", 0.25, 4, api_name="/video_qa")
    assert "visual tokens" in md and f"reference answer: {scene['answer']}" in md
    assert [row[1] for row in table["data"]] == [256, 64]
    assert len(gallery) == 4 and "16 of 64 tokens" in gallery[0]["caption"]
    assert frame_table["headers"] == ["frame", "t (s)", "score", "tokens", "path"] and [r[3] for r in frame_table["data"]] == [16] * 4
    assert Image.open(gallery[0]["image"]).size[0] >= 224
    panels, _ = c.predict(handle_file(str(photo_png)), 144, ["pool", "tome"], api_name="/token_maps")
    assert [p["caption"].split(":")[0] for p in panels] == ["input", "pool", "ToMe"]


@pytest.fixture(scope="module")
def photo_png(tmp_path_factory):
    from PIL import Image

    path = tmp_path_factory.mktemp("photo") / "coffee.png"
    Image.fromarray(sample_image("coffee")).save(path)
    return path


def test_app_bad_uploads_show_readable_errors(served, tmp_path, photo_png):
    from gradio_client import Client, handle_file
    from gradio_client.exceptions import AppError

    _, url = served
    c = Client(url, verbose=False)
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    notes = tmp_path / "notes.txt"
    notes.write_text("not a video at all\n")
    for path, msg in ((empty, "video file is empty"), (notes, "not a readable video")):
        with pytest.raises(AppError, match=msg):
            c.predict(handle_file(str(path)), "what is it?", "", "", "pool", 0.25, 4, api_name="/video_qa")
    with pytest.raises(AppError, match="matches no restoration task"):
        c.predict(handle_file(str(photo_png)), "rain", "make it pop", 0, api_name="/restore")


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="Debian chromium is not installed (.ci/run installs it with apt-get)")
def test_app_in_headless_chromium(served, tmp_path):
    """A person's path through the page: the bundled clip is loaded, Answer is clicked, the answer and the
    frames appear; then an empty upload and a text file show the library's message in the page."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright (dev extra) is not installed")
    _, url = served
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    notes = tmp_path / "notes.mp4"
    notes.write_text("not a video at all\n")
    with sync_api.sync_playwright() as pw:
        # no background connections: the CI machine has no network beyond the package registries
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync"])
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1100})
            page.goto(url)
            page.get_by_role("button", name="Answer").wait_for(timeout=60_000)
            page.locator("video").first.wait_for(timeout=60_000)  # app.load put the bundled clip in place
            page.get_by_role("button", name="Answer").click()
            page.get_by_text("visual tokens):").first.wait_for(timeout=300_000)
            page.get_by_text("frame 3 ·").first.wait_for(timeout=30_000)  # 4 frames: what mmeff-mini was trained on
            # the frame table: Free Video-LLM's slow frame is listed with its path
            page.get_by_role("gridcell").filter(has_text="slow (RoI)").first.wait_for(timeout=30_000)
            assert page.get_by_text("reference answer:").count() == 1
            page.screenshot(path=str(tmp_path / "answered.png"), full_page=True)
            for bad, msg in ((empty, "video file is empty"), (notes, "not a readable video")):
                page.get_by_role("button", name="Clear").first.click()
                page.locator("input[type=file]").first.set_input_files(str(bad))
                page.get_by_role("button", name="Answer").click()
                page.get_by_text(msg).first.wait_for(timeout=60_000)
        finally:
            browser.close()


def test_demo_cli_forwards_to_the_app(monkeypatch):
    import mmeff.demos.app as app_module
    from mmeff.cli.main import main

    seen = []
    monkeypatch.setattr(app_module, "main", lambda argv: seen.append(argv) or 0)
    assert main(["demo", "--port", "7999"]) == 0
    assert seen == [["--host", "127.0.0.1", "--port", "7999"]]
