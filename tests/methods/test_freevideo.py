"""Free Video-LLM's token builder against a line-by-line reading of the official algorithm."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mmeff.core import TokenContext
from mmeff.methods.freevideo import (
    FreeVideoConfig,
    free_video_tokens,
    middle_indices,
    roi_box,
    spatial_1d_max_pool,
    top_frames,
)

RELEASED = "slow_3frms_spatial_1d_max_pool_roi8-middle_5frms_spatial_1d_max_pool_24x12-fast_50frms_4x4"


def official_roi_box(points, h, w, ratio):
    """The official loop, transcribed: per-frame shifts, left/top edge checked first."""
    x_mean = (points % w).float().mean(dim=-1).to(torch.int32)
    y_mean = (points // w).float().mean(dim=-1).to(torch.int32)
    h_new, w_new = round(h * math.sqrt(ratio)), round(w * math.sqrt(ratio))
    left, right = x_mean - w_new // 2, x_mean + w_new - w_new // 2
    top, bottom = y_mean - h_new // 2, y_mean + h_new - h_new // 2
    for i in range(left.shape[0]):
        if left[i] < 0:
            left[i], right[i] = 0, w_new
        if right[i] > w:
            left[i], right[i] = w - w_new, w
        if top[i] < 0:
            top[i], bottom[i] = 0, h_new
        if bottom[i] > h:
            top[i], bottom[i] = h - h_new, h
    return left, right, top, bottom


def official_tokens(feats, frame_emb, text_emb, patch_emb, slow=3, middle=5, fast=50, ratio=0.8, fast_grid=(4, 4)):
    """Official prepare_visual_aggregation for a square grid, written from the paper's code path."""
    t, n, d = feats.shape
    side = int(math.sqrt(n))
    h, w = side // 2, side

    def pool(x):  # MaxPool1d(2) over the token axis
        return F.max_pool1d(x.transpose(1, 2), 2).transpose(1, 2)

    def guided(k):
        cos = F.cosine_similarity(text_emb[None], frame_emb, dim=-1)
        return sorted(torch.sort(cos)[1][-k:].tolist())

    def crop(idx):
        f = pool(feats[idx])
        p = pool(patch_emb[idx])
        cos = F.cosine_similarity(text_emb[None, None], p, dim=-1)
        top_idx = torch.topk(cos, int(h * w * ratio), dim=1).indices.to(torch.int32).sort(dim=1)[0]
        left, right, top, bottom = official_roi_box(top_idx, h, w, ratio)
        f = f.view(len(idx), h, w, d)
        return torch.cat([f[i, top[i]:bottom[i], left[i]:right[i]].reshape(-1, d) for i in range(len(idx))])

    mid = torch.linspace(0, t, middle + 1).to(torch.int32).tolist()[:-1]
    fast_idx = guided(fast) if fast < t else list(range(t))
    x = feats[fast_idx].view(len(fast_idx), side, side, d).permute(3, 0, 1, 2)
    fast_tok = F.adaptive_avg_pool2d(x, fast_grid).permute(1, 2, 3, 0).reshape(-1, d)
    return torch.cat([crop(guided(slow)), crop(mid), fast_tok])


@pytest.fixture
def video():
    g = torch.Generator().manual_seed(0)
    t, side, d, e = 50, 24, 16, 8
    return (torch.randn(t, side * side, d, generator=g), torch.randn(t, e, generator=g), torch.randn(e, generator=g),
            torch.randn(t, side * side, e, generator=g))


def test_released_configuration_gives_2648_tokens(video):
    cfg = FreeVideoConfig.from_official(RELEASED)
    assert cfg == FreeVideoConfig(faithful=True)
    assert cfg.num_tokens(50) == 2648 == 3 * 231 + 5 * 231 + 50 * 16
    feats, frame_emb, text_emb, patch_emb = video
    out = free_video_tokens(feats, (24, 24), frame_emb, text_emb, patch_emb, cfg)
    assert out.tokens.shape == (2648, 16)
    assert out.counts == {"slow": 693, "middle": 1155, "fast": 800}
    assert out.middle == [0, 10, 20, 30, 40] and out.fast == list(range(50)) and out.slow == sorted(out.slow)


def test_faithful_matches_the_official_code_path(video):
    feats, frame_emb, text_emb, patch_emb = video
    out = free_video_tokens(feats, (24, 24), frame_emb, text_emb, patch_emb, FreeVideoConfig(faithful=True))
    torch.testing.assert_close(out.tokens, official_tokens(feats, frame_emb, text_emb, patch_emb))
    # fewer fast frames than T: the fast path is question-guided too
    cfg = FreeVideoConfig(slow_frames=2, middle_frames=3, fast_frames=20, faithful=True, roi_ratio=0.6)
    out = free_video_tokens(feats, (24, 24), frame_emb, text_emb, patch_emb, cfg)
    ref = official_tokens(feats, frame_emb, text_emb, patch_emb, slow=2, middle=3, fast=20, ratio=0.6)
    torch.testing.assert_close(out.tokens, ref)


def test_corrected_crop_is_a_rectangle_of_the_true_layout():
    # features that encode their own (row, col) after pooling: the crop must be a contiguous block
    side = 8
    rows, cols = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    feats = torch.stack([rows, cols], -1).reshape(1, side * side, 2).float().expand(3, -1, -1).contiguous()
    feats[..., 1] = (feats[..., 1] // 2) * 2 + 1  # max over horizontal pairs keeps the odd column
    g = torch.Generator().manual_seed(1)
    emb = torch.randn(3, 4, generator=g)
    patch = torch.randn(3, side * side, 4, generator=g)
    cfg = FreeVideoConfig(slow_frames=0, middle_frames=3, fast_frames=0, roi_ratio=0.5)
    out = free_video_tokens(feats, (side, side), emb, emb[0], patch, cfg)
    hb, wb = cfg.box_size((side, side))
    assert (hb, wb) == (round(8 * math.sqrt(0.5)), round(4 * math.sqrt(0.5)))
    for i, (top, bottom, left, right) in enumerate(out.boxes):
        block = out.tokens[i * hb * wb:(i + 1) * hb * wb].view(hb, wb, 2)
        assert torch.equal(block[..., 0], torch.arange(top, bottom)[:, None].float().expand(hb, wb))
        assert torch.equal(block[..., 1], (torch.arange(left, right) * 2 + 1)[None].float().expand(hb, wb))
    # the faithful layout mixes pairs of rows: its blocks are not rectangles of the image
    faithful = free_video_tokens(feats, (side, side), emb, emb[0], patch, FreeVideoConfig(
        slow_frames=0, middle_frames=3, fast_frames=0, roi_ratio=0.5, faithful=True))
    assert faithful.tokens.shape[0] == 3 * round(4 * math.sqrt(0.5)) * round(8 * math.sqrt(0.5))


def test_roi_box_matches_official_loop_including_borders():
    g = torch.Generator().manual_seed(2)
    for h, w, r in ((12, 24, 0.8), (24, 12, 0.6), (5, 7, 0.3)):
        k = int(h * w * r)
        idx = torch.stack([torch.randperm(h * w, generator=g)[:k].sort()[0] for _ in range(20)])
        # some frames with all mass in a corner, to exercise the shifts
        idx[0] = torch.arange(k)
        idx[1] = torch.arange(h * w - k, h * w)
        left, right, top, bottom = official_roi_box(idx.to(torch.int32), h, w, r)
        got = roi_box(idx, h, w, r)
        assert got.tolist() == torch.stack([top, bottom, left, right], -1).tolist()
        assert (got[:, 0] >= 0).all() and (got[:, 1] <= h).all() and (got[:, 2] >= 0).all() and (got[:, 3] <= w).all()


def test_helpers_and_errors(video):
    assert middle_indices(50, 5) == [0, 10, 20, 30, 40] and middle_indices(3, 5) == [0, 0, 1, 1, 2]
    x = torch.tensor([[[1.0], [3.0], [2.0], [0.0]]])
    assert spatial_1d_max_pool(x).flatten().tolist() == [3.0, 2.0]
    emb = torch.eye(4)
    assert top_frames(torch.tensor([0.0, 1.0, 0.0, 0.9]), emb, 2) == [1, 3]
    assert top_frames(torch.ones(4), emb, 9) == [0, 1, 2, 3]
    feats, frame_emb, text_emb, patch_emb = video
    with pytest.raises(ValueError, match="needs patch_emb"):
        free_video_tokens(feats, (24, 24), frame_emb, text_emb, None)
    with pytest.raises(ValueError, match="grid width must be even"):
        FreeVideoConfig().crop_layout((5, 5))
    with pytest.raises(ValueError, match="needs a square grid"):
        FreeVideoConfig(faithful=True).crop_layout((4, 8))
    with pytest.raises(ValueError, match="cannot parse"):
        FreeVideoConfig.from_official("slow_3frms")
    with pytest.raises(ValueError, match="roi_ratio must be in"):
        FreeVideoConfig(roi_ratio=0.0)
    with pytest.raises(ValueError, match="at least one"):
        FreeVideoConfig(slow_frames=0, middle_frames=0, fast_frames=0)
    # no crop: pooled frames are kept whole and no CLIP patch features are needed
    out = free_video_tokens(feats, (24, 24), frame_emb, text_emb, None, FreeVideoConfig(roi_ratio=1.0))
    assert out.tokens.shape[0] == 8 * 288 + 800 == FreeVideoConfig(roi_ratio=1.0).num_tokens(50)


class _Tokenizer:
    """open_clip's tokenizer at a 16-token context (it truncates, as the scorer relies on)."""

    context_length = 16

    def __call__(self, texts):
        import open_clip

        return open_clip.tokenize(texts, context_length=self.context_length)


def test_clip_scorer_on_real_frames_with_a_small_open_clip():
    import open_clip

    from mmeff.datasets.media import read_frames, sample_video_path
    from mmeff.methods.freevideo import ClipScorer
    from mmeff.preprocess import llava_pixel_values

    torch.manual_seed(0)
    vcfg = dict(image_size=64, patch_size=16, width=64, layers=2, head_width=16, mlp_ratio=2.0)
    tcfg = dict(context_length=16, vocab_size=49408, width=32, heads=2, layers=1)
    model = open_clip.model.CLIP(embed_dim=32, vision_cfg=vcfg, text_cfg=tcfg).eval()
    scorer = ClipScorer(model, _Tokenizer())
    frames, _ = read_frames(sample_video_path("bikes"), 6)
    long_question = "what is happening in this video " * 40  # far past the 16-token context
    emb = scorer.embed(frames, long_question)
    assert emb.frames.shape == (6, 32) and emb.patches.shape == (6, 16, 32) and emb.grid == (4, 4)
    assert emb.text.shape == (32,) and emb.seconds > 0
    with torch.no_grad():  # the pooled embedding is what open_clip's own encode_image returns
        ref = model.encode_image(llava_pixel_values(list(frames), 64))
        ref_text = model.encode_text(_Tokenizer()([long_question]))[0]
    torch.testing.assert_close(emb.frames, ref.float())
    torch.testing.assert_close(emb.text, ref_text.float())
    assert emb.patches_on((4, 4)) is emb.patches
    assert emb.patches_on((8, 8)).shape == (6, 64, 32)
    cfg = FreeVideoConfig(slow_frames=2, middle_frames=2, fast_frames=6)
    out = free_video_tokens(torch.randn(6, 64, 8), (8, 8), emb.frames, emb.text, emb.patches_on((8, 8)), cfg)
    assert out.tokens.shape[0] == cfg.num_tokens(6, (8, 8))
    with pytest.raises(ValueError, match="non-empty"):
        scorer.embed(frames, "  ")
    with pytest.raises(TypeError, match="ViT image tower"):
        ClipScorer(torch.nn.Linear(2, 2), _Tokenizer())


def test_sources_locate_every_output_token(video):
    from mmeff.core import Reduction

    feats, frame_emb, text_emb, patch_emb = video
    for faithful in (False, True):
        cfg = FreeVideoConfig(faithful=faithful)
        out = free_video_tokens(feats, (24, 24), frame_emb, text_emb, patch_emb, cfg)
        m = out.tokens.shape[0]
        red = Reduction.from_sources(out.tokens[None], out.out_idx[None], out.in_idx[None], num_inputs=50 * 576)
        sizes = red.sizes[0]
        assert (sizes[: 8 * 231] == 2).all() and (sizes[8 * 231:] == 36).all() and sizes.shape[0] == m
        # every output equals the max (high-res) or mean (fast) of the inputs its sources name
        flat = feats.reshape(-1, feats.shape[-1])
        for k in (0, 230, 231 * 5 + 17, 8 * 231, m - 1):
            members = out.in_idx[out.out_idx == k]
            expect = flat[members].amax(0) if k < 8 * 231 else flat[members].mean(0)
            torch.testing.assert_close(out.tokens[k], expect)
        # positions: a slow token sits on its own frame; fast bins land at their centres
        t, r, c = torch.meshgrid(torch.arange(50), torch.arange(24), torch.arange(24), indexing="ij")
        pos = torch.stack([t, r, c], -1).reshape(1, -1, 3)
        p = red.positions(pos)[0]
        assert p[0, 0] == out.slow[0] and p[8 * 231, 0] == out.fast[0]
        assert p[8 * 231, 1:].tolist() == [2, 2]  # rows/cols 0..5 -> mean 2.5, rounded half to even


# ------------------------------------------------------------------------------------------ on LLaVA


@pytest.fixture(scope="module")
def tiny_clip():
    import open_clip

    from mmeff.methods.freevideo import ClipScorer

    torch.manual_seed(0)
    vcfg = dict(image_size=64, patch_size=16, width=64, layers=2, head_width=16, mlp_ratio=2.0)
    tcfg = dict(context_length=16, vocab_size=49408, width=32, heads=2, layers=1)
    return ClipScorer(open_clip.model.CLIP(embed_dim=32, vision_cfg=vcfg, text_cfg=tcfg).eval(), _Tokenizer())


@torch.no_grad()
def test_scorer_pre_ln_patches_are_the_officials(tiny_clip):
    """The official scores patch tokens taken before the tower's post-LayerNorm, then projected; the default
    projects them after it. A faithful reducer asks the scorer for the official's."""
    from mmeff.methods.freevideo import FreeVideoConfig, FreeVideoLLM

    visual = tiny_clip.model.visual
    px = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    x = visual.transformer(visual._embeds(px))
    official = x[:, 1:] @ visual.proj
    after_ln = visual.ln_post(x)[:, 1:] @ visual.proj
    torch.testing.assert_close(tiny_clip.embed_pixels(px, "a dog", pre_ln=True).patches, official)
    torch.testing.assert_close(tiny_clip.embed_pixels(px, "a dog").patches, after_ln)
    assert not torch.allclose(official, after_ln, atol=1e-3)
    calls = []
    orig = tiny_clip.embed_pixels

    def spy(pixels, question, pre_ln=False):
        calls.append(pre_ln)
        return orig(pixels, question, pre_ln=pre_ln)

    tiny_clip.embed_pixels = spy
    try:
        for faithful in (True, False):
            red = FreeVideoLLM(config=FreeVideoConfig(faithful=faithful), scorer=tiny_clip)
            ctx = TokenContext(grid=(8, 24, 24), extras={"text": ["what is it?"], "pixels": [px.repeat(3, 1, 1, 1)[:8]]})
            red.reduce(torch.randn(1, 8 * 24 * 24, 16), ctx)
    finally:
        del tiny_clip.embed_pixels
    assert calls == [True, False]


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
    from mmeff.models.tiny import build_tiny

    return build_tiny(
        "llava", tmp_path_factory.mktemp("llava"), seed=0, vision_config={"image_size": 112, "patch_size": 8}
    ).eval()


def _video_prompt(llava, frames_per_row, text_lens):
    """Rows of ``[bos] text <T*196 image tokens> text``, left padded, with real frames of a real mp4."""
    from mmeff.datasets.media import read_frames, sample_video_path
    from mmeff.hfconfig import pad_token_id
    from mmeff.models.hf import left_pad_batch
    from mmeff.preprocess import llava_pixel_values

    cfg = llava.config
    g = torch.Generator().manual_seed(0)
    rows = []
    for t, n_text in zip(frames_per_row, text_lens, strict=True):
        text = torch.randint(10, 100, (n_text,), generator=g).tolist()
        rows.append([1, *text[: n_text // 2], *[cfg.image_token_id] * (t * 196), *text[n_text // 2:]])
    batch = left_pad_batch(rows, pad_token_id(cfg))
    frames, _ = read_frames(sample_video_path("bikes"), sum(frames_per_row))
    batch["pixel_values"] = llava_pixel_values(list(frames), 112)
    return batch


@torch.no_grad()
def test_freevideo_on_llava_matches_the_manual_pipeline(llava, tiny_clip):
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    import mmeff
    from mmeff.hfconfig import pad_token_id
    from mmeff.methods.freevideo import FreeVideoLLM
    from mmeff.models.hf import left_pad_batch

    red = FreeVideoLLM(FreeVideoConfig(slow_frames=2, middle_frames=2, fast_frames=6, fast_grid=(2, 2), roi_ratio=0.5),
                       scorer=tiny_clip)
    m = red.config.num_tokens(6, (14, 14))
    assert m == 4 * 10 * 5 + 6 * 4
    inp = _video_prompt(llava, [6, 6], [5, 9])
    questions = ["what colour is the bike?", "how many people are riding?"]
    with mmeff.apply(llava, red) as h:
        got = llava(**inp, mmeff_text=questions).logits
        gen = llava.generate(**inp, mmeff_text=questions, max_new_tokens=3, do_sample=False)
    assert h.stats["visual_tokens_in"] == 2 * 6 * 196 and h.stats["visual_tokens_out"] == 2 * m
    assert red.last_scorer_s > 0
    assert torch.equal(gen[:, : inp["input_ids"].shape[1]], inp["input_ids"])

    # the same thing by hand: encode, build each video's tokens, shrink the placeholder runs
    feats = llava.model.get_image_features(pixel_values=inp["pixel_values"]).pooler_output
    videos = []
    for i, q in enumerate(questions):
        emb = tiny_clip.embed_pixels(inp["pixel_values"][6 * i: 6 * i + 6], q)
        out = free_video_tokens(torch.stack(feats[6 * i: 6 * i + 6]), (14, 14), emb.frames, emb.text,
                                emb.patches_on((14, 14)), red.config)
        videos.append(out.tokens)
    rows = []
    for ids, mask in zip(inp["input_ids"].tolist(), inp["attention_mask"].tolist(), strict=True):
        kept, run = [], 0
        for t, keep in zip(ids, mask, strict=True):
            if not keep:
                continue
            run = run + 1 if t == llava.config.image_token_id else 0
            if t != llava.config.image_token_id or run <= m:
                kept.append(t)
        rows.append(kept)
    short = left_pad_batch(rows, pad_token_id(llava.config))
    enc = {"image": BaseModelOutputWithPooling(pooler_output=videos)}
    ref = llava(input_ids=short["input_ids"], attention_mask=short["attention_mask"], mm_encoder_outputs=enc).logits
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_freevideo_on_llava_errors(llava, tiny_clip):
    import mmeff
    from mmeff.methods.freevideo import FreeVideoLLM

    inp = _video_prompt(llava, [4], [6])
    red = FreeVideoLLM(FreeVideoConfig(slow_frames=1, middle_frames=1, fast_frames=4, fast_grid=(2, 2), roi_ratio=0.5),
                       scorer=tiny_clip)
    with mmeff.apply(llava, red):
        with pytest.raises(ValueError, match="needs each video's question"):
            llava(**inp)
        with pytest.raises(ValueError, match="mmeff_text has 2 entries for a batch of 1"):
            llava(**inp, mmeff_text=["a?", "b?"])
        out = llava(**inp, mmeff_text="what happens?").logits  # a bare string for a batch of one
        assert out.shape[1] < inp["input_ids"].shape[1]
    with mmeff.apply(llava, red, stage="pre_projector"), pytest.raises(ValueError, match="post_projector"):
        llava(**inp, mmeff_text="what happens?")


def test_qwen2_vl_unpatchify_round_trip():
    from mmeff.adapters.qwen2_vl import qwen2_vl_patchify, qwen2_vl_unpatchify

    frames = torch.randn(4, 3, 56, 84, generator=torch.Generator().manual_seed(0))
    patches, grid = qwen2_vl_patchify(frames, 14, 2, 2)
    torch.testing.assert_close(qwen2_vl_unpatchify(patches, grid, 14, 2, 2), frames)
    with pytest.raises(ValueError, match="do not match grid"):
        qwen2_vl_unpatchify(patches[1:], grid, 14, 2, 2)


@torch.no_grad()
def _tiny_qwen(family: str, folder):
    from mmeff.models.tiny import build_tiny

    # Qwen2.5-VL: the same seams, its tower runs windowed blocks over a window-ordered patch sequence
    return build_tiny(family, folder, seed=0)


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_freevideo_on_qwen2_vl_videos_and_images(tmp_path, tiny_clip, family):
    import mmeff
    from mmeff.adapters.qwen2_vl import qwen2_vl_unpatchify
    from mmeff.methods.freevideo import FreeVideoLLM
    from mmeff.models.tiny import qwen2_vl_inputs

    qwen = _tiny_qwen(family, tmp_path / "qwen")
    vc = qwen.config.vision_config
    inp = qwen2_vl_inputs(qwen.config, batch=2, image_hw=[[(56, 56)], None], video=[(4, 112, 112), (6, 112, 112)])
    red = FreeVideoLLM(FreeVideoConfig(slow_frames=1, middle_frames=1, fast_frames=2, fast_grid=(2, 2), roi_ratio=0.5),
                       scorer=tiny_clip)
    questions = ["is it raining?", "what is the rider wearing?"]
    with mmeff.apply(qwen, red) as h:
        logits = qwen(**inp, mmeff_text=questions).logits
        gen = qwen.generate(**inp, mmeff_text=questions, max_new_tokens=2, do_sample=False)
    image_red, *video_reds = h.last_reductions
    assert image_red.num_tokens == 4  # the 2x2 image passes through untouched
    assert [r.num_tokens for r in video_reds] == [red.config.num_tokens(2, (4, 4)), red.config.num_tokens(3, (4, 4))]
    assert h.stats["visual_tokens_out"] == 4 + sum(r.num_tokens for r in video_reds)
    assert logits.shape[1] == h.stats["prompt_len_out"] and gen.shape[1] == inp["input_ids"].shape[1] + 2

    # the video tokens are free_video_tokens of the merger output, scored on the recovered frames
    feats = qwen.model.get_video_features(inp["pixel_values_videos"], inp["video_grid_thw"]).pooler_output
    offset = 0
    for i, (thw, q) in enumerate(zip(inp["video_grid_thw"].tolist(), questions, strict=True)):
        n = thw[0] * thw[1] * thw[2]
        frames = qwen2_vl_unpatchify(inp["pixel_values_videos"][offset: offset + n], thw, 14, 2, 2)[::2]
        offset += n
        emb = tiny_clip.embed_pixels(frames, q)
        t, hh, ww = thw[0], thw[1] // 2, thw[2] // 2
        ref = free_video_tokens(feats[i].view(t, hh * ww, -1), (hh, ww), emb.frames, emb.text,
                                emb.patches_on((hh, ww)), red.config)
        torch.testing.assert_close(video_reds[i].tokens[0], ref.tokens)
    assert vc.temporal_patch_size == 2
    # batch 1: the same video alone gets the same tokens
    one = qwen2_vl_inputs(qwen.config, batch=1, image_hw=None, video=[(4, 112, 112)])
    one["pixel_values_videos"] = inp["pixel_values_videos"][: 2 * 8 * 8]
    with mmeff.apply(qwen, red) as h1:
        qwen.generate(**one, mmeff_text=questions[:1], max_new_tokens=2, do_sample=False)
    torch.testing.assert_close(h1.last_reductions[0].tokens, video_reds[0].tokens)


def test_cli_eval_videoqa_with_freevideo_on_the_default_model(tmp_path, default, model_cache, capsys):
    import json

    from mmeff.cli.main import main

    out = tmp_path / "r.jsonl"
    rc = main(["eval", "videoqa", "--method", "freevideo", "--frames", "4", "--limit", "2", "--batch-size", "2",
               "--max-new-tokens", "2", "--out", str(out), "--cache-dir", str(model_cache)])
    text = capsys.readouterr()
    assert rc == 0, text.err
    assert "random weights" not in text.err  # the default scorer is mmeff-mini's trained dual encoder
    assert "data: scenes" in text.out
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    from mmeff.models.mini import FREEVIDEO_SCENES

    # on the 8x8 grid: 1 slow + 1 middle crop of 7x4 (roi 0.8 of the 8x4 pooled layout), 4 fast frames of 2x2
    expect = FreeVideoConfig.from_official(FREEVIDEO_SCENES, faithful=False).num_tokens(4, (8, 8))
    assert len(lines) == 2 and all(r["visual_tokens"] == expect == 2 * 28 + 4 * 4 for r in lines)


def test_cli_eval_videoqa_warns_about_a_random_scorer(tmp_path, default, model_cache, capsys):
    from mmeff.cli.main import main

    out = tmp_path / "r.jsonl"
    rc = main(["eval", "videoqa", "--method", "freevideo", "--clip-model", "ViT-B-32", "--limit", "1",
               "--max-new-tokens", "1", "--out", str(out), "--cache-dir", str(model_cache)])
    text = capsys.readouterr()
    assert rc == 0, text.err
    assert "random weights" in text.err  # no scorer checkpoint offline: said, not hidden


def test_freevideo_is_registered_on_import_of_mmeff():
    import mmeff
    from mmeff.methods.freevideo import FreeVideoLLM

    assert mmeff.get_reducer_class("freevideo") is FreeVideoLLM is mmeff.FreeVideoLLM
    with pytest.raises(TypeError, match="config must be a FreeVideoConfig"):
        FreeVideoLLM(config={"slow_frames": 3})
