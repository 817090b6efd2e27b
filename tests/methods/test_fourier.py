"""Fourier-VLM: the transform against scipy, its invariants, and end to end on HF LLaVA / Qwen2-VL."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.fft
import torch
from transformers.modeling_outputs import BaseModelOutputWithPooling

import mmeff
from mmeff.core import TokenContext
from mmeff.eval.flops import _llava_projector_flops, load_config, prefill_flops
from mmeff.hfconfig import pad_token_id
from mmeff.methods.fourier import FourierLowPass, fourier_compress, lowpass_energy_fraction
from mmeff.models import tiny as models
from mmeff.models.hf import left_pad_batch

GEN = torch.Generator().manual_seed(0)


def official(x: np.ndarray, h: int, w: int, hh: int, ww: int) -> np.ndarray:
    """The paper's algorithm written from its description with scipy: ``(B, H*W, C)`` -> ``(B, hh*ww, C)``."""
    b, _, c = x.shape
    grid = x.astype(np.float64).reshape(b, h, w, c).transpose(0, 3, 1, 2)  # (B, C, H, W)
    coef = scipy.fft.dctn(grid, type=2, norm="ortho", axes=(2, 3))[:, :, :hh, :ww]
    out = scipy.fft.idctn(coef, type=2, norm="ortho", axes=(2, 3))
    return out.transpose(0, 2, 3, 1).reshape(b, hh * ww, c)


# ------------------------------------------------------------------------------------------ transform


@pytest.mark.parametrize(
    ("grid", "out"),
    [((24, 24), (12, 12)), ((24, 24), (8, 8)), ((7, 5), (3, 2)), ((6, 10), (4, 7)), ((5, 5), (1, 1)), ((1, 9), (1, 4))],
)
def test_matches_scipy_reference(grid, out):
    x = torch.randn(2, math.prod(grid), 16, generator=GEN)
    ref = official(x.numpy(), *grid, *out)
    got = fourier_compress(x, grid, out)
    assert got.shape == (2, out[0] * out[1], 16) and got.dtype == x.dtype
    np.testing.assert_allclose(got.numpy(), ref, rtol=1e-4, atol=1e-5)


def test_video_frames_are_compressed_independently():
    x = torch.randn(1, 3 * 4 * 6, 8, generator=GEN)
    got = fourier_compress(x, (3, 4, 6), (2, 3))
    per_frame = [fourier_compress(f.unsqueeze(0), (4, 6), (2, 3)) for f in x[0].split(24)]
    torch.testing.assert_close(got, torch.cat(per_frame, dim=1))


def test_energy_equals_kept_coefficients():
    # orthonormal DCT: the small inverse transform preserves the energy of the kept corner exactly
    x = torch.randn(3, 24 * 24, 32, generator=GEN, dtype=torch.float64)
    out = fourier_compress(x, (24, 24), (8, 8))
    coef = scipy.fft.dctn(x.numpy().reshape(3, 24, 24, 32), norm="ortho", axes=(1, 2))[:, :8, :8]
    np.testing.assert_allclose(out.pow(2).sum(dim=(1, 2)).numpy(), (coef**2).sum(axis=(1, 2, 3)), rtol=1e-10)
    frac = lowpass_energy_fraction(x, (24, 24), (8, 8))
    torch.testing.assert_close(frac, out.pow(2).sum(dim=(1, 2)) / x.pow(2).sum(dim=(1, 2)))
    # white noise spreads energy evenly over frequencies: the corner holds about its share of cells
    assert abs(float(frac.mean()) - 64 / 576) < 0.02


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_full_grid_returns_input(dtype):
    x = torch.randn(2, 35, 8, generator=GEN).to(dtype)
    out = FourierLowPass(out_grid=(5, 7))(x, TokenContext(grid=(5, 7)))
    tol = {torch.float32: 1e-5, torch.float64: 1e-12, torch.float16: 2e-3, torch.bfloat16: 1e-2}[dtype]
    torch.testing.assert_close(out.tokens, x, atol=tol, rtol=tol)
    assert out.tokens.dtype == dtype


def test_amplitude_pitfall_and_rescale():
    # the paper's code doubles a constant on 24x24 -> 12x12 (sqrt(576/144)); rescale=True undoes it
    x = torch.full((1, 576, 4), 3.0)
    torch.testing.assert_close(fourier_compress(x, (24, 24), (12, 12)), torch.full((1, 144, 4), 6.0))
    torch.testing.assert_close(fourier_compress(x, (24, 24), (12, 12), rescale=True), torch.full((1, 144, 4), 3.0))
    red = FourierLowPass(tokens=144, rescale=True)(x, TokenContext(grid=(24, 24)))
    torch.testing.assert_close(red.tokens, torch.full((1, 144, 4), 3.0))


def test_low_frequency_image_survives():
    # a feature map that is already low-frequency is reproduced (resampled) exactly, up to amplitude
    h = w = 24
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    basis = torch.cos(math.pi * (2 * yy + 1) * 2 / (2 * h)) * torch.cos(math.pi * (2 * xx + 1) * 1 / (2 * w))
    out = fourier_compress(basis.reshape(1, -1, 1), (h, w), (8, 8), rescale=True).reshape(8, 8)
    i = torch.arange(8)
    small = torch.cos(math.pi * (2 * i[:, None] + 1) * 2 / 16) * torch.cos(math.pi * (2 * i[None, :] + 1) / 16)
    torch.testing.assert_close(out, small, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------- reducer


def test_budgets_and_grids():
    x = torch.randn(2, 24 * 24, 4, generator=GEN)
    ctx = TokenContext(grid=(24, 24))
    assert FourierLowPass(tokens=64)(x, ctx).grid == (8, 8)
    assert FourierLowPass(tokens=144)(x, ctx).grid == (12, 12)
    assert FourierLowPass(ratio=0.25)(x, ctx).grid == (12, 12)
    assert FourierLowPass(axis_ratio=2 / 3)(x, ctx).grid == (16, 16)
    assert FourierLowPass(out_grid=(3, 10))(x, ctx).grid == (3, 10)
    # non-square and odd grids keep their aspect
    y = torch.randn(1, 9 * 15, 4, generator=GEN)
    assert FourierLowPass(tokens=15)(y, TokenContext(grid=(9, 15))).grid == (3, 5)
    assert FourierLowPass(axis_ratio=2 / 3)(y, TokenContext(grid=(9, 15))).grid == (6, 10)
    v = torch.randn(1, 4 * 6 * 6, 4, generator=GEN)
    assert FourierLowPass(tokens=36)(v, TokenContext(grid=(4, 6, 6))).grid == (4, 3, 3)


def test_bad_budgets_are_clear_errors():
    x = torch.randn(1, 24 * 24, 4, generator=GEN)
    ctx = TokenContext(grid=(24, 24))
    with pytest.raises(ValueError, match="budget tokens=577 exceeds the 576 tokens"):
        FourierLowPass(tokens=577)(x, ctx)
    with pytest.raises(ValueError, match=r"out_grid \(25, 2\) is larger than the 24x24 input grid"):
        FourierLowPass(out_grid=(25, 2))(x, ctx)
    with pytest.raises(ValueError, match="no 29-token grid fits inside a 24x24 grid"):
        FourierLowPass(tokens=29)(x, ctx)
    with pytest.raises(ValueError, match="not a multiple of the 4 frames"):
        FourierLowPass(tokens=10)(torch.randn(1, 4 * 36, 4), TokenContext(grid=(4, 6, 6)))
    with pytest.raises(ValueError, match="exactly one of"):
        FourierLowPass(tokens=4, out_grid=(2, 2))
    with pytest.raises(ValueError, match="exactly one of"):
        FourierLowPass()
    with pytest.raises(ValueError, match="axis_ratio must be in"):
        FourierLowPass(axis_ratio=1.5)
    with pytest.raises(ValueError, match="needs context.grid"):
        FourierLowPass(tokens=4)(x)
    with pytest.raises(ValueError, match="grid must be"):
        fourier_compress(x, (24,), (2, 2))
    with pytest.raises(ValueError, match="has 100 cells but the features have 576"):
        fourier_compress(x, (10, 10), (2, 2))


def test_bookkeeping_places_outputs_at_bin_centres():
    x = torch.randn(2, 6 * 8, 4, generator=GEN)
    red = FourierLowPass(out_grid=(3, 4))(x, TokenContext(grid=(6, 8)))
    assert red.indices is None and red.sizes.sum(1).tolist() == [48.0, 48.0]
    rows, cols = torch.meshgrid(torch.arange(6), torch.arange(8), indexing="ij")
    pos = torch.stack([rows.reshape(-1), cols.reshape(-1)], -1).expand(2, -1, -1)
    got = red.positions(pos)[0]
    # each output covers a 2x2 bin: mean position (2i + 0.5, 2j + 0.5), rounded half to even
    expect = torch.stack(torch.meshgrid(torch.arange(3) * 2 + 0.5, torch.arange(4) * 2 + 0.5, indexing="ij"), -1)
    torch.testing.assert_close(got, expect.reshape(-1, 2).round().long())


def test_gradients_flow_and_skip_the_triton_kernel(monkeypatch):
    # Triton on CPU without the interpreter raises: with a gradient needed the PyTorch path must run
    monkeypatch.setenv("MMEFF_KERNELS", "triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    x = torch.randn(2, 36, 4, generator=GEN, requires_grad=True)
    out = fourier_compress(x, (6, 6), (3, 3))
    out.sum().backward()
    assert x.grad is not None and x.grad.shape == x.shape
    with torch.no_grad(), pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        fourier_compress(x, (6, 6), (3, 3))


# ----------------------------------------------------------------------------------------- LLaVA


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
    # 112 px / patch 8 = a 14x14 grid, enough room for real low-pass budgets
    return models.build_tiny(
        "llava", tmp_path_factory.mktemp("llava"), seed=0, vision_config={"image_size": 112, "patch_size": 8}
    ).eval()


def _strip_placeholders(ids: torch.Tensor, mask: torch.Tensor, image_id: int, m: int) -> list[list[int]]:
    """Unpadded rows where each run of image tokens keeps its first ``m`` (the adapter's shrink, spelled out)."""
    rows = []
    for row, mk in zip(ids.tolist(), mask.tolist(), strict=True):
        out, run = [], 0
        for t, keep in zip(row, mk, strict=True):
            if not keep:
                continue
            run = run + 1 if t == image_id else 0
            if t != image_id or run <= m:
                out.append(t)
        rows.append(out)
    return rows


@torch.no_grad()
@pytest.mark.parametrize("stage", ["pre_projector", "post_projector"])
def test_llava_full_grid_equals_plain_model(llava, stage):
    inp = models.llava_inputs(llava.config, batch=2, images_per_sample=2)
    ref = llava(**inp).logits
    with mmeff.apply(llava, FourierLowPass(ratio=1.0), stage=stage) as h:
        got = llava(**inp).logits
    assert h.stats["stage"] == stage and h.stats["visual_tokens_out"] == h.stats["visual_tokens_in"]
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_llava_pre_projector_matches_manual_pipeline(llava):
    """The paper's LLaVA pipeline written out: tower (layer -2, no CLS) -> low-pass -> projector -> LLM."""
    cfg = llava.config
    inp = models.llava_inputs(cfg, batch=2, images_per_sample=1, text_lens=[5, 11])
    red = FourierLowPass(tokens=16)
    with mmeff.apply(llava, red) as h:
        got = llava(**inp).logits
        gen = llava.generate(**inp, max_new_tokens=4, do_sample=False)
    assert h.stats["stage"] == "pre_projector" and h.stats["visual_tokens_out"] == 32

    inner = llava.model
    hs = inner.vision_tower(inp["pixel_values"], output_hidden_states=True).hidden_states[cfg.vision_feature_layer]
    feats = inner.multi_modal_projector(fourier_compress(hs[:, 1:], (14, 14), (4, 4)))
    rows = _strip_placeholders(inp["input_ids"], inp["attention_mask"], cfg.image_token_id, 16)
    short = left_pad_batch(rows, pad_token_id(cfg))
    enc = {"image": BaseModelOutputWithPooling(pooler_output=list(feats))}
    ref = llava(input_ids=short["input_ids"], attention_mask=short["attention_mask"], mm_encoder_outputs=enc).logits
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    # generate returns the caller's prompt followed by new tokens
    assert torch.equal(gen[:, : inp["input_ids"].shape[1]], inp["input_ids"])
    # the projector is nonlinear, so reducing after it is a different method
    with mmeff.apply(llava, red, stage="post_projector"):
        post = llava(**inp).logits
    assert not torch.allclose(post, got, atol=1e-4)


@torch.no_grad()
def test_llava_pre_projector_refuses_projected_features(llava):
    enc = {"image": BaseModelOutputWithPooling(pooler_output=[torch.randn(196, llava.config.text_config.hidden_size)])}
    inp = models.llava_inputs(llava.config, batch=1)
    inp.pop("pixel_values")
    with mmeff.apply(llava, FourierLowPass(tokens=16)), pytest.raises(ValueError, match="needs pixel_values"):
        llava(**inp, mm_encoder_outputs=enc)
    with pytest.raises(ValueError, match="stage must be one of"):
        mmeff.attach(llava, FourierLowPass(tokens=16), stage="inside")
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['mrope'\]"):
        mmeff.attach(llava, FourierLowPass(tokens=16), mrope="regrid")


@torch.no_grad()
def test_profile_counts_projector_tokens_after_pre_projector_reduction(llava):
    from mmeff.eval.profile import profile

    inp = models.llava_inputs(llava.config, batch=1, images_per_sample=2)
    base = profile(llava, inp, None, decode_tokens=1, repeats=1, warmup=0)
    pre = profile(llava, inp, FourierLowPass(tokens=16), decode_tokens=1, repeats=1, warmup=0)
    post = profile(llava, inp, FourierLowPass(tokens=16), decode_tokens=1, repeats=1, warmup=0,
                   options={"stage": "post_projector"})
    assert base.flops.projector == _llava_projector_flops(llava.config, 2 * 196)
    assert pre.flops.projector == _llava_projector_flops(llava.config, 2 * 16)
    assert post.flops.projector == base.flops.projector
    assert pre.visual_tokens == post.visual_tokens == 32 and pre.flops.llm == post.flops.llm < base.flops.llm


# ----------------------------------------------------------------------------------------- Qwen2-VL


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    return models.build_tiny("qwen2_vl", tmp_path_factory.mktemp("qwen"), seed=0).eval()


def _qwen_inputs(qwen):
    # several images of different sizes and a video in one batch, left padded
    return models.qwen2_vl_inputs(
        qwen.config, batch=2, image_hw=[[(168, 112), (84, 140)], [(112, 112)]], video=[(4, 112, 84), None]
    )


@torch.no_grad()
def test_qwen_full_grid_equals_plain_model(qwen):
    inp = _qwen_inputs(qwen)
    ref = qwen(**inp).logits
    for mrope in ("gather", "regrid"):
        with mmeff.apply(qwen, FourierLowPass(ratio=1.0), mrope=mrope):
            got = qwen(**inp).logits
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_qwen_faithful_fourier_regrids_by_default(qwen):
    inp = _qwen_inputs(qwen)
    with mmeff.apply(qwen, FourierLowPass(axis_ratio=2 / 3), mrope="regrid"):
        regrid = qwen(**inp).logits
    with mmeff.apply(qwen, FourierLowPass(axis_ratio=2 / 3)):
        gathered = qwen(**inp).logits
    assert not torch.allclose(gathered, regrid, atol=1e-4)
    with mmeff.apply(qwen, FourierLowPass(axis_ratio=2 / 3, faithful=True)):
        torch.testing.assert_close(qwen(**inp).logits, regrid, rtol=0, atol=0)
    with mmeff.apply(qwen, FourierLowPass(axis_ratio=2 / 3, faithful=True), mrope="gather"):  # explicit wins
        torch.testing.assert_close(qwen(**inp).logits, gathered, rtol=0, atol=0)


@torch.no_grad()
def test_qwen_regrid_matches_official_grid_thw_rewrite(qwen):
    """Fourier-VLM's Qwen integration: compress after the merger, rewrite grid_thw to (t, 2h', 2w'),
    emit t*h'*w' placeholders and let the host derive M-RoPE. The adapter must give the same logits."""
    cfg = qwen.config
    inp = _qwen_inputs(qwen)
    before = {k: v.clone() for k, v in inp.items()}
    red = FourierLowPass(axis_ratio=2 / 3)
    with mmeff.apply(qwen, red, mrope="regrid") as h:
        got = qwen(**inp).logits
        again = qwen(**inp).logits
        gen = qwen.generate(**inp, max_new_tokens=3, do_sample=False)
    torch.testing.assert_close(again, got)
    assert all(torch.equal(inp[k], before[k]) for k in inp), "inputs must not be mutated"
    assert [r.grid for r in h.last_reductions] == [(4, 2), (2, 3), (2, 2), (2, 2, 2)]
    assert torch.equal(gen[:, : inp["input_ids"].shape[1]], inp["input_ids"])

    inner = qwen.model
    img = inner.get_image_features(inp["pixel_values"], inp["image_grid_thw"], return_dict=True).pooler_output
    vid = inner.get_video_features(inp["pixel_values_videos"], inp["video_grid_thw"], return_dict=True).pooler_output

    def compress(feats, thw):
        out, grids = [], []
        for f, (t, hh, ww) in zip(feats, thw.tolist(), strict=True):
            h2, w2 = hh // 2, ww // 2
            ho, wo = max(int(h2 * 2 / 3), 1), max(int(w2 * 2 / 3), 1)
            out.append(fourier_compress(f.unsqueeze(0), (t, h2, w2), (ho, wo))[0])
            grids.append([t, 2 * ho, 2 * wo])
        return out, torch.tensor(grids)

    img_c, img_thw = compress(img, inp["image_grid_thw"])
    vid_c, vid_thw = compress(vid, inp["video_grid_thw"])
    # rebuild each row with the new placeholder counts, in order of appearance
    counts = {cfg.image_token_id: [f.shape[0] for f in img_c], cfg.video_token_id: [f.shape[0] for f in vid_c]}
    rows = []
    for row, mask in zip(inp["input_ids"].tolist(), inp["attention_mask"].tolist(), strict=True):
        out, prev = [], None
        for t, mk in zip(row, mask, strict=True):
            if not mk:
                continue
            if t in counts:
                if prev != t:
                    out += [t] * counts[t].pop(0)
            else:
                out.append(t)
            prev = t
        rows.append(out)
    short = left_pad_batch(rows, pad_token_id(cfg))
    types = torch.where(short["input_ids"] == cfg.image_token_id, 1, 0)
    types = torch.where(short["input_ids"] == cfg.video_token_id, 2, types)
    enc = {
        "image": BaseModelOutputWithPooling(pooler_output=img_c),
        "video": BaseModelOutputWithPooling(pooler_output=vid_c),
    }
    ref = qwen(
        input_ids=short["input_ids"], attention_mask=short["attention_mask"], mm_token_type_ids=types,
        image_grid_thw=img_thw, video_grid_thw=vid_thw, mm_encoder_outputs=enc,
    ).logits
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_qwen_gather_keeps_original_positions(qwen):
    inp = _qwen_inputs(qwen)
    with mmeff.apply(qwen, FourierLowPass(axis_ratio=2 / 3)) as h:
        gathered = qwen(**inp).logits
        qwen.generate(**inp, max_new_tokens=2, do_sample=False)
    with mmeff.apply(qwen, FourierLowPass(axis_ratio=2 / 3), mrope="regrid"):
        regrid = qwen(**inp).logits
    assert h.stats["visual_tokens_out"] == 8 + 6 + 4 + 8
    assert gathered.shape == regrid.shape and not torch.allclose(gathered, regrid, atol=1e-4)


def test_qwen_refuses_pre_projector_and_regrid_of_selections(qwen):
    with pytest.raises(ValueError, match="PatchMerger needs whole 2x2 patch windows"):
        mmeff.attach(qwen, FourierLowPass(tokens=4), stage="pre_projector")
    with pytest.raises(ValueError, match="mrope must be"):
        mmeff.attach(qwen, FourierLowPass(tokens=4), mrope="compact")
    inp = _qwen_inputs(qwen)
    with torch.no_grad(), mmeff.apply(qwen, mmeff.UniformKeep(ratio=0.5), mrope="regrid"):
        with pytest.raises(ValueError, match="needs reductions that keep a grid"):
            qwen(**inp)
    with torch.no_grad(), mmeff.apply(qwen, FourierLowPass(axis_ratio=0.5), mrope="regrid"):
        no_types = {k: v for k, v in inp.items() if k != "mm_token_type_ids"}
        with pytest.raises(ValueError, match="needs mm_token_type_ids"):
            qwen(**no_types)
        pos = torch.zeros(3, *inp["input_ids"].shape, dtype=torch.long)
        with pytest.raises(ValueError, match="cannot be combined with explicit position_ids"):
            qwen(**inp, position_ids=pos)


# ----------------------------------------------------------------------------------------- accounting


def test_llava_7b_flops_at_64_tokens():
    """The numbers quoted in the closing note of issue 4 (paper: up to 83.8% fewer FLOPs)."""
    cfg = load_config("llava-1.5-7b")
    full = prefill_flops(cfg, text_tokens=64, visual_tokens=576)
    post = prefill_flops(cfg, text_tokens=64, visual_tokens=64)
    pre = prefill_flops(cfg, text_tokens=64, visual_tokens=64, projector_tokens=64)
    assert round(1 - post.llm / full.llm, 3) == 0.804
    assert round(1 - pre.total / full.total, 3) == 0.770
    assert pre.projector * 9 == full.projector
    # the filter itself: two small matmuls, negligible next to the LLM
    assert FourierLowPass(tokens=64).flops((24, 24), 1024) < 1e-5 * pre.total


def test_llava_7b_meta_pipeline_flops_match_the_accounting():
    """Count the real 7B pre-projector pipeline (tower -> low-pass -> projector -> LLM) on meta tensors."""
    from torch.utils.flop_counter import FlopCounterMode

    from mmeff.eval.flops import meta_model

    model = meta_model("llava-1.5-7b")
    cfg = model.config
    red = FourierLowPass(tokens=64)
    px = torch.empty(1, 3, 336, 336, device="meta")

    def pipeline() -> None:
        inner = model.model
        hs = inner.vision_tower(px, output_hidden_states=True).hidden_states[cfg.vision_feature_layer][:, 1:]
        feats = inner.multi_modal_projector(red(hs, TokenContext(grid=(24, 24))).tokens)
        text = torch.empty(1, 64, 4096, device="meta")
        inner.language_model(inputs_embeds=torch.cat([feats, text], dim=1))

    red(torch.empty(1, 576, 1024, device="meta"), TokenContext(grid=(24, 24)))  # builds the cached DCT matrices
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        pipeline()
    expect = prefill_flops(cfg, text_tokens=64, visual_tokens=64, projector_tokens=64)
    assert counter.get_total_flops() == expect.total - expect.lm_head + red.flops((24, 24), 1024)


@torch.no_grad()
def test_bench_compares_stages_in_one_table(llava):
    from mmeff.bench.reduction import bench_reducers

    inp = models.llava_inputs(llava.config, batch=1)
    rows = bench_reducers(
        llava, inp,
        {"none": None, "pre": FourierLowPass(tokens=16), "post": (FourierLowPass(tokens=16), {"stage": "post_projector"})},
        answer_tokens=2, decode_tokens=1, warmup=0, repeats=1,
    )
    none, pre, post = rows
    assert [r.stage for r in rows] == ["", "pre_projector", "post_projector"]
    assert pre.visual_tokens == post.visual_tokens == 16 and pre.llm_prefill_gflops == post.llm_prefill_gflops
    assert pre.prefill_gflops < post.prefill_gflops < none.prefill_gflops
