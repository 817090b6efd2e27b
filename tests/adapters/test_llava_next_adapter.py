"""Reducers attached to HF LLaVA-NeXT, LLaVA-NeXT-Video and LLaVA-OneVision (tiny random configs, saved and
reloaded, LM weights scaled up so a wrong order, mask or position shows): keep-all equals the plain model,
selections equal a masked reference found by matching feature vectors (not by the adapter's layout code),
every mosaic row keeps its newline, per-tile budgets, batch rows equal single runs, generate with the KV
cache, videos per frame and as a whole, clear refusals, exact restore."""

from __future__ import annotations

import pytest
import torch

import mmeff
from mmeff.adapters import LlavaNextAdapter, find_adapter
from mmeff.models import tiny
from mmeff.models.hf import left_pad_batch
from mmeff.models.tiny import pack_right, saved_and_reloaded

IMAGE, VIDEO = 3, 4  # placeholder ids; text ids are >= 5
SIDE = 4  # a 32px tile at patch 8: 4x4 patch tokens
PINPOINTS = [[32, 64], [64, 32], [64, 64]]


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


def _build(cls_name: str, folder, **extra):
    import transformers

    base = tiny.tiny_llava_config(vision_config={"image_size": 32})
    config_cls = getattr(transformers, cls_name.replace("ForConditionalGeneration", "Config"))
    cfg = config_cls(vision_config={**base.vision_config.to_dict(), "model_type": "clip_vision_model"},
                     text_config=base.text_config.to_dict(), image_token_index=IMAGE,
                     image_grid_pinpoints=PINPOINTS, vision_feature_layer=-2,
                     vision_feature_select_strategy="default", **extra)
    model_cls = getattr(transformers, cls_name)
    torch.manual_seed(0)
    model = model_cls(cfg)
    return saved_and_reloaded(model, folder, model.model.language_model)


@pytest.fixture(scope="module")
def next_(tmp_path_factory):
    return _build("LlavaNextForConditionalGeneration", tmp_path_factory.mktemp("llava_next"))


@pytest.fixture(scope="module")
def next_video(tmp_path_factory):
    return _build("LlavaNextVideoForConditionalGeneration", tmp_path_factory.mktemp("llava_next_video"),
                  video_token_index=VIDEO)


@pytest.fixture(scope="module")
def onevision(tmp_path_factory):
    return _build("LlavaOnevisionForConditionalGeneration", tmp_path_factory.mktemp("onevision"),
                  video_token_index=VIDEO)


def image_inputs(model, sizes: list[list[tuple[int, int]]], seed: int = 0) -> dict[str, torch.Tensor]:
    """Left-padded rows ``text image-run text`` per image; ``sizes[b]`` the (H, W) of row b's images. The
    number of placeholders per image is the host's packed length (what its processor writes)."""
    g = torch.Generator().manual_seed(seed)
    flat = [hw for row in sizes for hw in row]
    pixels = torch.randn(len(flat), 5, 3, 32, 32, generator=g)
    image_sizes = torch.tensor(flat)
    feats = model.model.get_image_features(pixel_values=pixels, image_sizes=image_sizes).pooler_output
    rows, k = [], 0
    for b, row in enumerate(sizes):
        ids = torch.randint(5, 128, (2 + b,), generator=g).tolist()
        for _ in row:
            ids += [IMAGE] * int(feats[k].shape[0]) + torch.randint(5, 128, (3,), generator=g).tolist()
            k += 1
        rows.append(ids)
    return {**left_pad_batch(rows, 0), "pixel_values": pixels, "image_sizes": image_sizes}


def video_inputs(model, batch: int, frames: int = 4, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    video = torch.randn(batch, frames, 3, 32, 32, generator=g)
    n = int(model.model.get_video_features(pixel_values_videos=video[:1]).pooler_output.shape[1])
    rows = [torch.randint(5, 128, (2 + b,), generator=g).tolist() + [VIDEO] * n + [9, 10] for b in range(batch)]
    return {**left_pad_batch(rows, 0), "pixel_values_videos": video}


class Probe(mmeff.UniformKeep):
    """UniformKeep that records what it was given and what it kept."""

    log: list

    def reduce(self, tokens, ctx):
        red = super().reduce(tokens, ctx)
        self.log.append((tokens, ctx.grid, red))
        return red


def llm_inputs(model, fn):
    """Run ``fn`` and return the ``inputs_embeds`` the language model received."""
    seen = []
    h = model.model.language_model.register_forward_pre_hook(lambda m, a, k: seen.append(k["inputs_embeds"]),
                                                             with_kwargs=True)
    try:
        out = fn()
    finally:
        h.remove()
    return out, seen[0]


SIZES = {1: [[(40, 90), (60, 50)]], 2: [[(40, 90)], [(60, 50)]]}


def test_found_and_listed(next_, next_video, onevision):
    for m in (next_, next_video, onevision):
        assert find_adapter(m) is LlavaNextAdapter
    assert "llava_next" in {n for n, _ in mmeff.adapters.list_adapters()}
    x = image_inputs(next_, SIZES[2])
    a, b = next_.model.get_image_features(pixel_values=x["pixel_values"], image_sizes=x["image_sizes"]).pooler_output
    assert float(a.std()) > 1e-3 and float((a[:16] - b[:16]).abs().max()) > 1e-3  # images matter (not zero-initialised)


@pytest.mark.parametrize("name", ["next_", "onevision"])
@pytest.mark.parametrize("batch", [1, 2])
def test_images_keep_everything_equals_plain_model(name, batch, request):
    model = request.getfixturevalue(name)
    x = image_inputs(model, SIZES[batch], seed=batch)
    ref = model(**x).logits
    ref_gen = model.generate(**x, max_new_tokens=3, do_sample=False)
    for red in (mmeff.UniformKeep(ratio=1.0), mmeff.RandomKeep(ratio=1.0, seed=1), mmeff.CLSAttnTopK(ratio=1.0),
                mmeff.AvgPool(ratio=1.0)):
        with mmeff.apply(model, red) as handle:
            out = model(**x).logits
            gen = model.generate(**x, max_new_tokens=3, do_sample=False)
        assert handle.stats["visual_tokens_in"] == handle.stats["visual_tokens_out"] == int((x["input_ids"] == IMAGE).sum())
        torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)
        assert torch.equal(gen, ref_gen), red.describe()


@pytest.mark.parametrize("name", ["next_", "onevision"])
@pytest.mark.parametrize("batch", [1, 2])
def test_selection_equals_masked_reference(name, batch, request):
    """Kept slots found by matching the probe's kept feature vectors against the host's packed features; the
    reference is the host's own forward on the unreduced packed sequence with the other image slots masked."""
    model = request.getfixturevalue(name)
    x = image_inputs(model, SIZES[batch], seed=batch)
    probe = Probe(ratio=0.25)
    probe.log = []
    with mmeff.apply(model, probe) as handle:
        out = model(**x).logits
    packed = torch.cat(model.model.get_image_features(pixel_values=x["pixel_values"], image_sizes=x["image_sizes"]).pooler_output)
    newline = model.model.image_newline
    is_newline = (packed == newline).all(-1)
    kept = is_newline.clone()
    tiles = 0
    for tokens, grid, red in probe.log:
        for b in range(tokens.shape[0]):
            tiles += 1
            assert red.num_tokens == max(1, round(0.25 * grid[0] * grid[1]))  # a per-tile budget
            for t in red.tokens[b]:
                match = (packed == t).all(-1).nonzero()[:, 0]
                assert match.numel() == 1
                kept[match] = True
    assert handle.stats["visual_tokens_out"] == int(kept.sum()) < packed.shape[0]
    assert tiles > len(x["image_sizes"])  # base images and their tiles were reduced separately
    emb = model.model.get_input_embeddings()(x["input_ids"])
    slots = (x["input_ids"] == IMAGE).nonzero()
    emb[slots[:, 0], slots[:, 1]] = packed
    mask = x["attention_mask"].clone()
    mask[slots[~kept, 0], slots[~kept, 1]] = 0
    p_mask, p_emb = pack_right(mask.bool(), emb)
    ref = model(inputs_embeds=p_emb, attention_mask=p_mask).logits
    assert out.shape == ref.shape
    for b in range(emb.shape[0]):
        valid = p_mask[b].bool()
        torch.testing.assert_close(out[b, valid], ref[b, valid], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("red", [mmeff.AvgPool(ratio=0.25), mmeff.create_reducer("fourier", ratio=0.25),
                                 mmeff.CLSAttnTopK(ratio=0.3)], ids=lambda r: r.name)
def test_every_mosaic_row_keeps_its_newline(next_, red):
    x = image_inputs(next_, SIZES[1])
    packed = next_.model.get_image_features(pixel_values=x["pixel_values"], image_sizes=x["image_sizes"]).pooler_output
    newline = next_.model.image_newline
    want = [int((p == newline).all(-1).sum()) for p in packed]
    with mmeff.apply(next_, red) as handle:
        _, emb = llm_inputs(next_, lambda: next_(**x))
    got = (emb[0] == newline).all(-1)
    assert int(got.sum()) == sum(want) > 0
    # each image's visual run ends in a newline: the token after the last newline of image 0 is not visual
    ends = got.nonzero()[:, 0]
    assert handle.stats["visual_tokens_out"] < handle.stats["visual_tokens_in"]
    assert int(ends[want[0] - 1]) + 1 < int(ends[want[0]])


def test_resampled_mosaic_is_reduced_as_one_grid(tmp_path):
    """OneVision's anyres_max rule resamples a large mosaic; it is then one grid (cls_attn refused)."""
    model = _build("LlavaOnevisionForConditionalGeneration", tmp_path, video_token_index=VIDEO,
                   vision_aspect_ratio="anyres_max_1")
    x = image_inputs(model, [[(64, 64)]])
    probe = Probe(ratio=0.5)
    probe.log = []
    with mmeff.apply(model, probe):
        model(**x)
    # base image + the 8x8 mosaic resampled to 4x4 as one item (its four tiles would be five items)
    assert sum(t.shape[0] for t, _, _ in probe.log) == 2
    assert {g for _, g, _ in probe.log} == {(SIDE, SIDE)}
    with pytest.raises(ValueError, match="resampled"):
        with mmeff.apply(model, mmeff.CLSAttnTopK(ratio=0.5)):
            model(**x)


@pytest.mark.parametrize("name", ["next_", "onevision"])
def test_batch_rows_match_single_runs_and_generate_uses_the_cache(name, request):
    model = request.getfixturevalue(name)
    x = image_inputs(model, SIZES[2], seed=3)
    with mmeff.apply(model, mmeff.UniformKeep(ratio=0.5)):
        both = model(**x).logits[:, -1]
        singles = []
        for b in range(2):
            keep = x["attention_mask"][b].bool()
            one = {k: x[k][b:b + 1, keep] for k in ("input_ids", "attention_mask")}
            singles.append(model(**one, pixel_values=x["pixel_values"][b:b + 1],
                                 image_sizes=x["image_sizes"][b:b + 1]).logits[0, -1])
        gen = model.generate(**x, max_new_tokens=4, do_sample=False)
        no_cache = model.generate(**x, max_new_tokens=4, do_sample=False, use_cache=False)
    torch.testing.assert_close(both, torch.stack(singles), rtol=1e-4, atol=1e-4)
    prompt = x["input_ids"].shape[1]
    assert torch.equal(gen[:, :prompt], x["input_ids"]) and gen.shape[1] == prompt + 4
    assert torch.equal(gen, no_cache)


@pytest.mark.parametrize("name", ["next_video", "onevision"])
def test_videos_per_frame_and_whole(name, request):
    model = request.getfixturevalue(name)
    x = video_inputs(model, batch=2)
    n = int((x["input_ids"][0] == VIDEO).sum())
    ref = model(**x).logits
    with mmeff.apply(model, mmeff.UniformKeep(ratio=1.0)):
        torch.testing.assert_close(model(**x).logits, ref, rtol=0, atol=1e-5)
    probe = Probe(ratio=0.5)
    probe.log = []
    with mmeff.apply(model, probe) as handle:
        _, emb = llm_inputs(model, lambda: model(**x))
        log = list(probe.log)
        gen = model.generate(**x, max_new_tokens=3, do_sample=False)
        no_cache = model.generate(**x, max_new_tokens=3, do_sample=False, use_cache=False)
    assert torch.equal(gen, no_cache)
    grids = {g for _, g, _ in log}
    assert grids == {(2, 2)}  # each 4x4 frame pooled 2x2, reduced on its own grid
    assert sum(t.shape[0] for t, _, _ in log) == 2 * 4  # 4 frames in each of 2 videos
    has_newline = name == "onevision"
    assert handle.stats["visual_tokens_out"] == 2 * (4 * 2 + int(has_newline))
    if has_newline:  # the one newline after each video is kept, last in its run
        nl = (emb == model.model.image_newline).all(-1)
        assert int(nl.sum()) == 2
    # a video-level method sees each video whole, on its (frames, 2, 2) grid (+ OneVision's newline)
    from mmeff.methods.freevideo import FreeVideoConfig, FreeVideoLLM

    red = FreeVideoLLM(FreeVideoConfig(slow_frames=1, middle_frames=1, fast_frames=4, fast_grid=(1, 1), roi_ratio=1.0),
                       scorer=_tiny_clip_scorer())
    questions = ["what moves?", "what colour is it?"]
    with mmeff.apply(model, red) as handle:
        _, emb = llm_inputs(model, lambda: model(**x, mmeff_text=questions))
        gen = model.generate(**x, mmeff_text=questions, max_new_tokens=3, do_sample=False)
    assert handle.stats["visual_tokens_out"] == 2 * (red.config.num_tokens(4, (2, 2)) + int(has_newline)) < 2 * n
    assert int((emb == model.model.image_newline).all(-1).sum()) == 2 * int(has_newline)
    assert gen.shape[1] == x["input_ids"].shape[1] + 3


def _tiny_clip_scorer():
    import open_clip

    from mmeff.methods.freevideo import ClipScorer

    class Tokenizer:
        context_length = 16

        def __call__(self, texts):
            return open_clip.tokenize(texts, context_length=16)

    torch.manual_seed(0)
    vcfg = dict(image_size=32, patch_size=16, width=64, layers=1, head_width=16, mlp_ratio=2.0)
    tcfg = dict(context_length=16, vocab_size=49408, width=32, heads=2, layers=1)
    return ClipScorer(open_clip.model.CLIP(embed_dim=32, vision_cfg=vcfg, text_cfg=tcfg).eval(), Tokenizer())


def test_refusals_are_clear_and_restore_is_exact(next_, next_video, tmp_path):
    x = image_inputs(next_, [[(40, 90)]])
    before = (dict(next_._forward_pre_hooks), "generate" in next_.__dict__, "pack_image_features" in next_.model.__dict__)
    with pytest.raises(ValueError, match="unpacked batch of tiles"):
        with mmeff.apply(next_, mmeff.UniformKeep(ratio=0.5), stage="pre_projector"):
            pass
    with pytest.raises(ValueError, match="pixel_values_videos"):
        with mmeff.apply(next_, mmeff.create_reducer("freevideo")):
            next_(**x)
    with pytest.raises(ValueError, match="not mm_encoder_outputs"):
        feats = next_.model.get_image_features(pixel_values=x["pixel_values"], image_sizes=x["image_sizes"])
        with mmeff.apply(next_, mmeff.UniformKeep(ratio=0.5)):
            next_(input_ids=x["input_ids"], attention_mask=x["attention_mask"], mm_encoder_outputs={"image": feats})
    with pytest.raises(ValueError, match="pools each video frame"):
        with mmeff.apply(next_video, mmeff.CLSAttnTopK(ratio=0.5)):
            next_video(**video_inputs(next_video, 1))
    with pytest.raises(RuntimeError, match="boom"):
        with mmeff.apply(next_, mmeff.UniformKeep(ratio=0.5)):
            next_(**x)
            raise RuntimeError("boom")
    after = (dict(next_._forward_pre_hooks), "generate" in next_.__dict__, "pack_image_features" in next_.model.__dict__)
    assert after == before


@pytest.mark.parametrize("name", ["next_", "onevision"])
def test_tome_runs_in_the_tower_and_vistog_is_refused_with_the_reason(name, request):
    """ToMe merges inside the CLIP tower of every tile and un-merges at its output (the packing needs the
    full grid): r=0 is the plain model, r>0 changes the features at the same token count. VisToG groups
    before the projector, where the tiles are not packed yet: refused with that reason."""
    from mmeff.methods.tome import ToMe
    from mmeff.methods.vistog import VisToG

    model = request.getfixturevalue(name)
    x = image_inputs(model, SIZES[2])
    ref = model(**x).logits
    with mmeff.apply(model, ToMe(r=0)):
        torch.testing.assert_close(model(**x).logits, ref, rtol=0, atol=1e-6)
    with mmeff.apply(model, ToMe(r=4)) as handle:
        out = model(**x).logits
        gen = model.generate(**x, max_new_tokens=2, do_sample=False)
    assert handle.stats["tokens_out"] < handle.stats["tokens_in"] and out.shape == ref.shape
    assert float((out - ref).abs().max()) > 1e-4 and gen.shape[1] == x["input_ids"].shape[1] + 2
    with pytest.raises(ValueError, match="unpacked batch of tiles"):
        with mmeff.apply(model, VisToG.for_model(model, num_groups=4)):
            model(**x)
