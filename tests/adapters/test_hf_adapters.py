"""Reducers attached to real HF LLaVA and Qwen2-VL classes (tiny random configs, saved and reloaded)."""

from __future__ import annotations

import pytest
import torch

import mmeff
from mmeff.adapters import find_adapter
from mmeff.hfconfig import CACHE_KWARGS, output_cache
from mmeff.models import tiny


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
    return tiny.build_tiny("llava", tmp_path_factory.mktemp("llava"), seed=0)


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    return tiny.build_tiny("qwen2_vl", tmp_path_factory.mktemp("qwen"), seed=0)


@pytest.fixture(scope="module")
def qwen25(tmp_path_factory):
    # Qwen2.5-VL shares Qwen2-VL's seams but runs its vision blocks in window order
    return tiny.build_tiny("qwen2_5_vl", tmp_path_factory.mktemp("qwen25"), seed=0)


def llava_batch(model, batch):
    return tiny.llava_inputs(model.config, batch=batch, images_per_sample=2 if batch == 1 else 1, seed=batch)


def qwen_batch(model, batch):
    hw = [(56, 84), (84, 56)][:batch]
    return tiny.qwen2_vl_inputs(model.config, batch=batch, image_hw=hw, video=(4, 56, 56), seed=batch)


MODELS = {"llava": (llava_batch, 64), "qwen": (qwen_batch, None), "qwen25": (qwen_batch, None)}


def keep_all(name: str) -> list[mmeff.TokenReducer]:
    return [
        mmeff.UniformKeep(ratio=1.0),
        mmeff.RandomKeep(ratio=1.0, seed=1),
        mmeff.CLSAttnTopK(ratio=1.0),
    ] + ([mmeff.AvgPool(tokens=64)] if name == "llava" else [])


def reducers(name: str) -> list[mmeff.TokenReducer]:
    pool = mmeff.AvgPool(tokens=16) if name == "llava" else mmeff.AvgPool(ratio=0.5)
    return [
        mmeff.UniformKeep(ratio=0.25),
        mmeff.RandomKeep(ratio=0.3, seed=2),
        mmeff.CLSAttnTopK(ratio=0.25),
        pool,
        mmeff.compose(mmeff.UniformKeep(ratio=0.5), mmeff.CLSAttnTopK(ratio=0.5)),
    ]


@pytest.mark.parametrize("name", ["llava", "qwen", "qwen25"])
@pytest.mark.parametrize("batch", [1, 2])
def test_keep_everything_equals_plain_model(name, batch, request):
    model = request.getfixturevalue(name)
    inputs = MODELS[name][0](model, batch)
    ref = model(**inputs).logits
    ref_gen = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    for red in keep_all(name):
        with mmeff.apply(model, red) as handle:
            out = model(**inputs).logits
            gen = model.generate(**inputs, max_new_tokens=4, do_sample=False)
        assert handle.stats["visual_tokens_in"] == handle.stats["visual_tokens_out"]
        torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)
        assert torch.equal(gen, ref_gen), red.describe()


def masked_reference(model, name, inputs, red):
    """Logits of the unreduced sequence where dropped slots are masked out and kept slots carry the reduced
    features: the same computation as the shortened sequence, built without the adapter's packing code."""
    inner = model.model
    ids, mask = inputs["input_ids"], inputs["attention_mask"].clone()
    emb = inner.get_input_embeddings()(ids)
    if name == "llava":
        feats = [("image", f, g) for f in inner.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output
                 for g in [(8, 8)]]
        pos = None
    else:
        m = model.config.vision_config.spatial_merge_size
        feats = []
        for mod, pk, gk, fn in (("image", "pixel_values", "image_grid_thw", inner.get_image_features),
                                ("video", "pixel_values_videos", "video_grid_thw", inner.get_video_features)):
            for f, (t, h, w) in zip(fn(inputs[pk], inputs[gk]).pooler_output, inputs[gk].tolist()):
                feats.append((mod, f, (h // m, w // m) if mod == "image" and t == 1 else (t, h // m, w // m)))
        pos, _ = inner.get_rope_index(ids, mm_token_type_ids=inputs["mm_token_type_ids"], image_grid_thw=inputs["image_grid_thw"],
                                      video_grid_thw=inputs["video_grid_thw"], attention_mask=inputs["attention_mask"])
    ph = {"image": model.config.image_token_id, "video": getattr(model.config, "video_token_id", -1)}
    slots = {k: (ids == v).nonzero().tolist() for k, v in ph.items()}
    used = {k: 0 for k in ph}
    for mod, f, grid in feats:
        n = f.shape[0]
        cells = slots[mod][used[mod]: used[mod] + n]
        used[mod] += n
        r = red(f[None], mmeff.TokenContext(grid=grid, scores=None if "scores" not in red.needs else _scores(model, name, inputs, mod, feats, f)))
        rows = torch.tensor([c[0] for c in cells])
        cols = torch.tensor([c[1] for c in cells])
        mm = r.num_tokens
        emb[rows[:mm], cols[:mm]] = r.tokens[0]
        mask[rows[mm:], cols[mm:]] = 0
        if pos is not None:
            pos[:, rows[:mm], cols[:mm]] = r.positions(pos[:, rows, cols].T[None])[0].T
    if pos is None:
        pos = (mask.cumsum(1) - 1).clamp(min=0)
    hidden = inner.language_model(inputs_embeds=emb, attention_mask=mask, position_ids=pos).last_hidden_state
    return model.lm_head(hidden), mask


_SCORE_CACHE: dict = {}


def _scores(model, name, inputs, mod, feats, f):
    # the adapter's score capture is tested separately; here reuse it to get the same scores per item
    key = id(f)
    if key not in _SCORE_CACHE:
        adapter = find_adapter(model)(model, mmeff.CLSAttnTopK(ratio=1.0))
        items = adapter.encode(dict(inputs))
        for (_, ff, _), it in zip(feats, items):
            _SCORE_CACHE[id(ff)] = it.scores
    return _SCORE_CACHE[key][None]


@pytest.mark.parametrize("name", ["llava", "qwen", "qwen25"])
@pytest.mark.parametrize("batch", [1, 2])
def test_reduced_pipeline_equals_masked_reference(name, batch, request):
    model = request.getfixturevalue(name)
    inputs = MODELS[name][0](model, batch)
    for red in reducers(name):
        _SCORE_CACHE.clear()
        with mmeff.apply(model, red) as handle:
            out = model(**inputs)
            new_len = handle.stats["prompt_len_out"]
        assert handle.stats["visual_tokens_out"] < handle.stats["visual_tokens_in"]
        ref, ref_mask = masked_reference(model, name, inputs, red)
        assert out.logits.shape[1] == new_len < inputs["input_ids"].shape[1]
        for b in range(batch):
            got = out.logits[b, -int(ref_mask[b].sum()):]  # left-padded: valid tokens sit at the end
            want = ref[b, ref_mask[b].bool()]
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5, msg=f"{red.describe()} row {b}")


def select_sample(inputs: dict, b: int) -> dict:
    """Row ``b`` of a batch with one image (and one video) per sample, its padding removed."""
    keep = inputs["attention_mask"][b].bool()
    out = {k: inputs[k][b : b + 1, keep] for k in ("input_ids", "attention_mask", "mm_token_type_ids") if k in inputs}
    if "image_grid_thw" not in inputs:
        out["pixel_values"] = inputs["pixel_values"][b : b + 1]
        return out
    for pk, gk in (("pixel_values", "image_grid_thw"), ("pixel_values_videos", "video_grid_thw")):
        sizes = inputs[gk].prod(-1).tolist()
        out[pk] = torch.split(inputs[pk], sizes)[b]
        out[gk] = inputs[gk][b : b + 1]
    return out


@pytest.mark.parametrize("name", ["llava", "qwen"])
def test_batch_rows_match_single_runs(name, request):
    model = request.getfixturevalue(name)
    inputs = MODELS[name][0](model, 2)
    red = mmeff.UniformKeep(ratio=0.5)
    with mmeff.apply(model, red):
        both = model(**inputs).logits[:, -1]
        singles = [model(**select_sample(inputs, b)).logits[0, -1] for b in range(2)]
    torch.testing.assert_close(both, torch.stack(singles), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["llava", "qwen"])
def test_generate_returns_caller_prompt_and_manual_decode_agrees(name, request):
    model = request.getfixturevalue(name)
    inputs = MODELS[name][0](model, 2)
    red = mmeff.UniformKeep(ratio=0.25)
    steps = 4
    with mmeff.apply(model, red):
        gen = model.generate(**inputs, max_new_tokens=steps, do_sample=False)
        # a hand-written greedy loop that keeps appending to the caller's *unreduced* mask
        out = model(**inputs, use_cache=True)
        cache, mask = output_cache(out), inputs["attention_mask"]
        tok = out.logits[:, -1].argmax(-1, keepdim=True)
        manual = [tok]
        for i in range(steps - 1):
            mask = torch.cat([mask, torch.ones_like(tok)], dim=1)
            # every cache keyword the installed transformers accepts (cache / past_key_values from 5.24 on)
            # must reach the adapter's decode-mask fix
            name = CACHE_KWARGS[i % len(CACHE_KWARGS)]
            out = model(input_ids=tok, attention_mask=mask, use_cache=True, **{name: cache})
            cache = output_cache(out)
            tok = out.logits[:, -1].argmax(-1, keepdim=True)
            manual.append(tok)
    prompt_len = inputs["input_ids"].shape[1]
    assert torch.equal(gen[:, :prompt_len], inputs["input_ids"])
    assert torch.equal(gen[:, prompt_len:], torch.cat(manual, 1))


@pytest.mark.parametrize("name", ["llava", "qwen"])
def test_detach_restores_model_even_on_error(name, request):
    model = request.getfixturevalue(name)
    before = (dict(model._forward_pre_hooks), "generate" in model.__dict__)
    with pytest.raises(RuntimeError, match="boom"):
        with mmeff.apply(model, mmeff.UniformKeep(ratio=0.5)):
            assert "generate" in model.__dict__
            raise RuntimeError("boom")
    assert (dict(model._forward_pre_hooks), "generate" in model.__dict__) == before
    handle = mmeff.patch(model, mmeff.UniformKeep(ratio=0.5))
    with pytest.raises(ValueError, match="already has an mmeff method attached"):
        mmeff.patch(model, mmeff.UniformKeep(ratio=0.5))
    assert mmeff.unpatch(model) and not mmeff.unpatch(model)
    assert handle.stats == {}
    assert (dict(model._forward_pre_hooks), "generate" in model.__dict__) == before


def test_errors_are_clear(llava):
    inputs = llava_batch(llava, 1)
    with mmeff.apply(llava, mmeff.UniformKeep(tokens=65)):
        with pytest.raises(ValueError, match="budget tokens=65 exceeds the 64 tokens"):
            llava(**inputs)
    emb = llava.model.get_input_embeddings()(inputs["input_ids"])
    with mmeff.apply(llava, mmeff.UniformKeep(tokens=8)):
        with pytest.raises(ValueError, match="needs input_ids"):
            llava(inputs_embeds=emb, pixel_values=inputs["pixel_values"], attention_mask=inputs["attention_mask"])
        bad = dict(inputs, input_ids=inputs["input_ids"][:, 3:], attention_mask=inputs["attention_mask"][:, 3:])
        bad["input_ids"][0, -1] = llava.config.image_token_id
        with pytest.raises(ValueError, match="placeholder tokens and features do not match"):
            llava(**bad)
    with pytest.raises(TypeError, match="unsupported model class Linear"):
        mmeff.apply(torch.nn.Linear(2, 2), mmeff.UniformKeep(tokens=1)).__enter__()
    with pytest.raises(TypeError, match="expected a TokenReducer"):
        mmeff.patch(llava, "pool")


def test_text_only_calls_pass_through(llava):
    inputs = llava_batch(llava, 1)
    text = {"input_ids": inputs["input_ids"][:, :5], "attention_mask": inputs["attention_mask"][:, :5]}
    ref = llava(**text).logits
    with mmeff.apply(llava, mmeff.UniformKeep(ratio=0.5)) as h:
        torch.testing.assert_close(llava(**text).logits, ref, rtol=0, atol=0)
    assert h.stats == {}


def test_qwen_positions_are_gathered_from_unreduced_layout(qwen):
    inputs = qwen_batch(qwen, 1)
    seen = {}
    hook = qwen.model.language_model.register_forward_pre_hook(
        lambda mod, a, kw: seen.update(pos=kw["position_ids"]), with_kwargs=True
    )
    try:
        full, _ = qwen.model.get_rope_index(inputs["input_ids"], mm_token_type_ids=inputs["mm_token_type_ids"],
                                            image_grid_thw=inputs["image_grid_thw"], video_grid_thw=inputs["video_grid_thw"])
        with mmeff.apply(qwen, mmeff.UniformKeep(ratio=0.5)) as handle:
            qwen(**inputs)
    finally:
        hook.remove()
    ids = inputs["input_ids"][0]
    keep = torch.ones_like(ids, dtype=torch.bool)
    for tok, red in zip([qwen.config.image_token_id, qwen.config.video_token_id], handle.last_reductions):
        slots = (ids == tok).nonzero().squeeze(1)
        keep[slots] = False
        keep[slots[red.indices[0]]] = True
    torch.testing.assert_close(seen["pos"][:, 0], full[:, 0, keep])
    # decoding continues right after the largest position
    assert int(qwen.model.rope_deltas[0]) == int(full.max()) + 1 - int(keep.sum())


def test_qwen25_scores_follow_merger_order(qwen25):
    """Qwen2.5-VL runs its blocks in window order; scores must come back in the merger's output order.

    Reference: take the last block's q/k (window order), move them back to the original patch order, and
    compute the received attention there; it must equal the adapter's scores for each merged token.
    """
    from transformers.models.qwen2_vl.modeling_qwen2_vl import apply_rotary_pos_emb_vision
    from transformers.vision_utils import get_vision_window_index

    from mmeff.adapters.qwen2_vl import received_attention

    inputs = tiny.qwen2_vl_inputs(qwen25.config, batch=1, image_hw=[(112, 168)], seed=3)
    visual = qwen25.model.visual
    assert visual.blocks[-1] is visual.blocks[visual.fullatt_block_indexes[-1]]
    seen = {}
    attn = visual.blocks[-1].attn
    hook = attn.register_forward_pre_hook(
        lambda m, a, kw: seen.update(kw, h=a[0] if a else kw["hidden_states"]), with_kwargs=True
    )
    try:
        adapter = find_adapter(qwen25)(qwen25, mmeff.CLSAttnTopK(ratio=1.0))
        items = adapter.encode(dict(inputs))
    finally:
        hook.remove()
    h, (cos, sin) = seen["h"], seen["position_embeddings"]
    n = h.shape[0]
    q, k, _ = attn.qkv(h).reshape(n, 3, attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
    q, k = apply_rotary_pos_emb_vision(q, k, cos, sin)
    window_index, _ = get_vision_window_index(inputs["image_grid_thw"], spatial_merge_size=2,
                                              window_size=visual.window_size, patch_size=14, kwargs={})
    assert not torch.equal(window_index, torch.arange(len(window_index))), "test needs a real window permutation"
    patch_order = (window_index[:, None] * 4 + torch.arange(4)).reshape(-1)
    inv = torch.argsort(patch_order)
    ref = received_attention(q[inv].transpose(0, 1), k[inv].transpose(0, 1)).view(-1, 4).mean(-1)
    torch.testing.assert_close(items[0].scores, ref, rtol=1e-5, atol=1e-7)
