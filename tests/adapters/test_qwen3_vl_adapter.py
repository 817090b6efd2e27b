"""Reducers attached to HF Qwen3-VL (tiny random config with DeepStack layers, saved and reloaded, LM weights
scaled up): keep-all equals the plain model; reduced logits equal a reference that runs the host's own
language model on the kept tokens, with the DeepStack features reduced independently (indices for
selections, the reducer itself for pooling/Fourier) and the host's M-RoPE positions gathered; the
reference moves when DeepStack is left unreduced-aligned (teeth); video time steps stay in their
timestamped blocks; batch rows equal single runs; generate with the KV cache; refusals; exact restore."""

from __future__ import annotations

import pytest
import torch

import mmeff
from mmeff.adapters import Qwen3VLAdapter, find_adapter
from mmeff.models.hf import left_pad_batch
from mmeff.models.tiny import qwen2_vl_patchify

IMAGE, VIDEO, VS, VE = 3, 4, 5, 6  # image/video pad, vision_start, vision_end; text ids are >= 8
PATCH, MERGE = 8, 2


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory):
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    cfg = Qwen3VLConfig(
        text_config=dict(vocab_size=128, hidden_size=32, intermediate_size=37, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=512,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1],
                                          "mrope_interleaved": True}, pad_token_id=0),
        vision_config=dict(depth=3, hidden_size=32, intermediate_size=37, num_heads=4, out_hidden_size=32,
                           patch_size=PATCH, spatial_merge_size=MERGE, temporal_patch_size=2,
                           num_position_embeddings=64, deepstack_visual_indexes=[0, 1]),
        image_token_id=IMAGE, video_token_id=VIDEO, vision_start_token_id=VS, vision_end_token_id=VE,
    )
    torch.manual_seed(0)
    model = Qwen3VLForConditionalGeneration(cfg)
    with torch.no_grad():
        for p in model.model.language_model.parameters():
            p.mul_(4.0)
    folder = tmp_path_factory.mktemp("qwen3_vl")
    model.save_pretrained(folder)
    return Qwen3VLForConditionalGeneration.from_pretrained(folder).eval()


def inputs(images: list[list[tuple[int, int]]], video: tuple[int, int, int] | None = None, seed: int = 0) -> dict:
    """Left-padded rows as Qwen3-VL's processor lays them out: ``<vs> image*n <ve>`` per image and, for a
    video of T frames, one ``<timestamp> <vs> frame <ve>`` block per merged time step (2 frames each)."""
    g = torch.Generator().manual_seed(seed)
    rows, types, pix, grids, vpix, vgrids = [], [], [], [], [], []
    for b, sizes in enumerate(images):
        ids = torch.randint(8, 128, (2 + b,), generator=g).tolist()
        for h, w in sizes:
            patches, grid = qwen2_vl_patchify(torch.randn(1, 3, h, w, generator=g), PATCH, MERGE, 2)
            pix.append(patches)
            grids.append(grid)
            ids += [VS] + [IMAGE] * (grid[1] * grid[2] // MERGE**2) + [VE] + torch.randint(8, 128, (2,), generator=g).tolist()
        if video is not None:
            t, h, w = video
            patches, grid = qwen2_vl_patchify(torch.randn(t, 3, h, w, generator=g), PATCH, MERGE, 2)
            vpix.append(patches)
            vgrids.append(grid)
            for step in range(grid[0]):
                ids += [100 + step] + [VS] + [VIDEO] * (grid[1] * grid[2] // MERGE**2) + [VE]
            ids += [9, 10]
        rows.append(ids)
        types.append([1 if i == IMAGE else 2 if i == VIDEO else 0 for i in ids])
    out = {**left_pad_batch(rows, 0), "mm_token_type_ids": left_pad_batch(types, 0)["input_ids"]}
    if pix:
        out["pixel_values"], out["image_grid_thw"] = torch.cat(pix), torch.tensor(grids)
    if vpix:
        out["pixel_values_videos"], out["video_grid_thw"] = torch.cat(vpix), torch.tensor(vgrids)
    return out


def reference(model, x: dict, red, deepstack_follow: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """The host's language model on the kept tokens, built without the adapter: per image and per video time
    step, the reducer's tokens in the run's first slots; DeepStack features reduced on their own (gather
    for selections, the reducer on them for pooling/Fourier); M-RoPE positions from the host, gathered."""
    inner = model.model
    ids, mask = x["input_ids"], x["attention_mask"].clone()
    emb = inner.get_input_embeddings()(ids)
    pos, _ = inner.get_rope_index(ids, mm_token_type_ids=x["mm_token_type_ids"], image_grid_thw=x.get("image_grid_thw"),
                                  video_grid_thw=x.get("video_grid_thw"), attention_mask=x["attention_mask"])
    deep_full = torch.zeros(len(inner.visual.deepstack_visual_indexes), *ids.shape, emb.shape[-1])
    pieces = []  # (modality, features, deepstack (layers, n, D), grid)
    for mod, pk, gk, fn in (("image", "pixel_values", "image_grid_thw", inner.get_image_features),
                            ("video", "pixel_values_videos", "video_grid_thw", inner.get_video_features)):
        if pk not in x:
            continue
        out = fn(x[pk], x[gk])
        for i, (f, (t, h, w)) in enumerate(zip(out.pooler_output, x[gk].tolist())):
            d = torch.stack([layer[i] for layer in out.deepstack_features])
            n = (h // MERGE) * (w // MERGE)
            for s in range(t):
                pieces.append((mod, f[s * n:(s + 1) * n], d[:, s * n:(s + 1) * n], (h // MERGE, w // MERGE)))
    slots = {m: (ids == v).nonzero() for m, v in (("image", IMAGE), ("video", VIDEO))}
    used = {"image": 0, "video": 0}
    for mod, f, d, grid in pieces:
        n = f.shape[0]
        cells = slots[mod][used[mod]:used[mod] + n]
        used[mod] += n
        ctx = mmeff.TokenContext(grid=grid)
        r = red(f[None], ctx)
        m = r.num_tokens
        if r.indices is not None:
            dr = d[:, r.indices[0]]
        else:
            dr = torch.stack([red(layer[None], ctx).tokens[0] for layer in d])
        if not deepstack_follow:
            dr = d[:, :m]  # what an adapter that ignored DeepStack would line up
        rows, cols = cells[:, 0], cells[:, 1]
        emb[rows[:m], cols[:m]] = r.tokens[0]
        deep_full[:, rows[:m], cols[:m]] = dr
        mask[rows[m:], cols[m:]] = 0
        pos[:, rows[:m], cols[:m]] = r.positions(pos[:, rows, cols].T[None])[0].T
    keep = mask.bool()
    width = int(keep.sum(1).max())
    b = ids.shape[0]
    p_emb, p_mask = emb.new_zeros(b, width, emb.shape[-1]), torch.zeros(b, width, dtype=torch.long)
    p_pos = torch.ones(3, b, width, dtype=torch.long)
    p_deep = deep_full.new_zeros(deep_full.shape[0], b, width, emb.shape[-1])
    visual = torch.zeros(b, width, dtype=torch.bool)
    for i in range(b):
        n = int(keep[i].sum())
        p_emb[i, width - n:], p_mask[i, width - n:] = emb[i, keep[i]], 1
        p_pos[:, i, width - n:] = pos[:, i, keep[i]]
        p_deep[:, i, width - n:] = deep_full[:, i, keep[i]]
        visual[i, width - n:] = ((ids[i] == IMAGE) | (ids[i] == VIDEO))[keep[i]]
    hidden = inner.language_model(inputs_embeds=p_emb, attention_mask=p_mask, position_ids=p_pos,
                                  visual_pos_masks=visual, deepstack_visual_embeds=list(p_deep[:, visual])).last_hidden_state
    return model.lm_head(hidden), p_mask


def test_found_and_listed(qwen3):
    assert find_adapter(qwen3) is Qwen3VLAdapter
    x = inputs([[(32, 32), (32, 32)]])
    out = qwen3.model.get_image_features(x["pixel_values"], x["image_grid_thw"])
    a, b = out.pooler_output
    assert float(a.std()) > 1e-3 and float((a - b).abs().max()) > 1e-3  # images matter (not zero-initialised)
    assert all(float((d[0] - d[1]).abs().max()) > 1e-3 for d in out.deepstack_features)  # and so does DeepStack


@pytest.mark.parametrize("batch", [1, 2])
def test_keep_everything_equals_plain_model(qwen3, batch):
    x = inputs([[(32, 48)], [(48, 32)]][:batch], video=(4, 32, 32), seed=batch)
    ref = qwen3(**x).logits
    ref_gen = qwen3.generate(**x, max_new_tokens=3, do_sample=False)
    for red in (mmeff.UniformKeep(ratio=1.0), mmeff.RandomKeep(ratio=1.0, seed=1), mmeff.CLSAttnTopK(ratio=1.0),
                mmeff.AvgPool(ratio=1.0)):
        with mmeff.apply(qwen3, red) as handle:
            out = qwen3(**x).logits
            gen = qwen3.generate(**x, max_new_tokens=3, do_sample=False)
        assert handle.stats["visual_tokens_in"] == handle.stats["visual_tokens_out"]
        torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)
        assert torch.equal(gen, ref_gen), red.describe()


@pytest.mark.parametrize("batch", [1, 2])
def test_reduced_pipeline_equals_reference_with_deepstack_reduced_alike(qwen3, batch):
    x = inputs([[(32, 48)], [(48, 32)]][:batch], video=(4, 32, 32), seed=batch)
    for red in (mmeff.UniformKeep(ratio=0.5), mmeff.RandomKeep(ratio=0.5, seed=2), mmeff.AvgPool(tokens=2),
                mmeff.create_reducer("fourier", tokens=2)):
        with mmeff.apply(qwen3, red) as handle:
            out = qwen3(**x).logits
        assert handle.stats["visual_tokens_out"] < handle.stats["visual_tokens_in"]
        ref, ref_mask = reference(qwen3, x, red)
        for b in range(batch):
            got = out[b, -int(ref_mask[b].sum()):]
            torch.testing.assert_close(got, ref[b, ref_mask[b].bool()], rtol=1e-4, atol=1e-4, msg=f"{red.describe()} row {b}")
        # teeth: DeepStack features left in their unreduced order give other logits
        wrong, _ = reference(qwen3, x, red, deepstack_follow=False)
        assert (wrong[0, ref_mask[0].bool()] - out[0, -int(ref_mask[0].sum()):]).abs().max() > 1e-3, red.describe()


def test_video_steps_keep_their_timestamped_blocks(qwen3):
    x = inputs([[]], video=(6, 32, 32))
    seen = []
    with mmeff.apply(qwen3, mmeff.UniformKeep(ratio=0.5)) as handle:
        h = qwen3.model.language_model.register_forward_pre_hook(lambda m, a, k: seen.append(k), with_kwargs=True)
        try:
            qwen3(**x)
        finally:
            h.remove()
    # 3 merged time steps of 2x2 tokens, 2 kept each: every <vs> ... <ve> block still holds 2 video tokens
    assert handle.stats["visual_tokens_in"] == 12 and handle.stats["visual_tokens_out"] == 6
    assert int(seen[0]["visual_pos_masks"].sum()) == 6
    assert [len(d) for d in seen[0]["deepstack_visual_embeds"]] == [6, 6]


def test_rows_match_single_runs_and_generate_uses_the_cache(qwen3):
    x = inputs([[(32, 48)], [(48, 32)]], seed=3)
    with mmeff.apply(qwen3, mmeff.UniformKeep(ratio=0.5)):
        both = qwen3(**x).logits[:, -1]
        singles, first = [], 0
        for b in range(2):
            keep = x["attention_mask"][b].bool()
            n = int(x["image_grid_thw"][b].prod())
            one = {k: x[k][b:b + 1, keep] for k in ("input_ids", "attention_mask", "mm_token_type_ids")}
            singles.append(qwen3(**one, pixel_values=x["pixel_values"][first:first + n],
                                 image_grid_thw=x["image_grid_thw"][b:b + 1]).logits[0, -1])
            first += n
        gen = qwen3.generate(**x, max_new_tokens=4, do_sample=False)
        no_cache = qwen3.generate(**x, max_new_tokens=4, do_sample=False, use_cache=False)
    torch.testing.assert_close(both, torch.stack(singles), rtol=1e-4, atol=1e-4)
    prompt = x["input_ids"].shape[1]
    assert torch.equal(gen[:, :prompt], x["input_ids"]) and gen.shape[1] == prompt + 4
    assert torch.equal(gen, no_cache)


def test_refusals_are_clear_and_restore_is_exact(qwen3):
    from mmeff.methods.freevideo import FreeVideoLLM

    x = inputs([[]], video=(4, 32, 32))
    before = (dict(qwen3._forward_pre_hooks), "generate" in qwen3.__dict__)
    with pytest.raises(ValueError, match="timestamped block"):
        with mmeff.apply(qwen3, FreeVideoLLM()):
            qwen3(**x)
    with pytest.raises(ValueError, match="PatchMerger needs whole 2x2"):
        with mmeff.apply(qwen3, mmeff.UniformKeep(ratio=0.5), stage="pre_projector"):
            pass
    with pytest.raises(RuntimeError, match="boom"):
        with mmeff.apply(qwen3, mmeff.UniformKeep(ratio=0.5)):
            qwen3(**x)
            raise RuntimeError("boom")
    assert (dict(qwen3._forward_pre_hooks), "generate" in qwen3.__dict__) == before


def test_in_tower_methods_are_refused_with_the_reason(qwen3):
    from mmeff.methods.tome import ToMe
    from mmeff.methods.vistog import VisToG

    with pytest.raises(TypeError, match="ToMe does not support .*supported: timm VisionTransformer"):
        with mmeff.apply(qwen3, ToMe(r=2)):
            pass
    with pytest.raises(TypeError, match="VisToG does not support"):
        VisToG.for_model(qwen3)


def test_regridded_positions_follow_each_reduced_time_step(qwen3):
    """mrope='regrid' lays every image and time step out on its reduced grid through the host's own
    get_rope_index (per-frame grids, as Qwen3-VL splits videos)."""
    x = inputs([[(32, 48)]], video=(4, 32, 32))
    seen = []
    with mmeff.apply(qwen3, mmeff.AvgPool(tokens=2), mrope="regrid") as handle:
        h = qwen3.model.language_model.register_forward_pre_hook(lambda m, a, k: seen.append(k["position_ids"]),
                                                                 with_kwargs=True)
        try:
            qwen3(**x)
            gen = qwen3.generate(**x, max_new_tokens=2, do_sample=False)
        finally:
            h.remove()
    assert handle.stats["visual_tokens_out"] == 2 + 2 * 2 and gen.shape[1] == x["input_ids"].shape[1] + 2
    pos = seen[0]
    # positions stay a valid M-RoPE layout: the text after the media continues one past the largest position
    assert int(pos[:, 0, -1].min()) == int(pos[:, 0, :-1].max()) + 1
