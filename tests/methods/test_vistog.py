"""VisToG (mmeff.methods.vistog) on the tiny random HF LLaVA (CLIP tower 64 px / patch 8: 64 patches + CLS).

Checked: the isolation mask keeps every hidden state of the class and patch tokens equal to the
unmodified tower's (eager and SDPA, fp32 and fp64) and independent of the semantic tokens; the
assignment is one-hot in the forward pass and differentiable; duplicated patches share a group; the
LLM reads M tokens per image; the two training stages move exactly the parameters they should; the
FLOPs helper agrees with ``torch.utils.flop_counter``; save/load round-trips.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import mmeff
from mmeff.eval.flops import vistog_flops
from mmeff.methods.vistog import GroupingLayer, VisToG, isolation_mask
from mmeff.models import tiny as models
from mmeff.train.vistog import train_vistog

pytestmark = pytest.mark.usefixtures("single_thread")
M = 8


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
    return models.build_tiny("llava", tmp_path_factory.mktemp("llava_vistog"), seed=0)


def fresh(model, m: int = M, seed: int = 0, **kw) -> VisToG:
    torch.manual_seed(seed)
    return VisToG.for_model(model, num_groups=m, **kw).eval()


def pixels(b: int = 2, seed: int = 0, dtype=torch.float32):
    return torch.randn(b, 3, 64, 64, generator=torch.Generator().manual_seed(seed)).to(dtype)


def test_isolation_mask_layout() -> None:
    mask = isolation_mask(3, 2, torch.float32)[0, 0]
    low = torch.finfo(torch.float32).min
    assert mask.shape == (5, 5)
    assert (mask[:3, 3:] == low).all() and (mask[:3, :3] == 0).all() and (mask[3:, :] == 0).all()
    alone = isolation_mask(3, 2, torch.float32, semantic_self_attention=False)[0, 0]
    assert alone[3, 4] == low and alone[4, 3] == low and alone[3, 3] == 0 and (alone[3:, :3] == 0).all()


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_original_tokens_are_exactly_the_unmodified_encoder(llava, attn, dtype) -> None:
    model = copy.deepcopy(llava).to(dtype)
    model.set_attn_implementation(attn)
    tower = model.model.vision_tower
    px = pixels(dtype=dtype)
    vt = fresh(model)
    with torch.no_grad():
        ref = tower(px, output_hidden_states=True).hidden_states
        with mmeff.apply(tower, vt):
            out = tower(px, output_hidden_states=True).hidden_states
            vt.semantic.mul_(-3.0).add_(1.0)  # other semantic tokens: the originals must not notice
            other = tower(px, output_hidden_states=True).hidden_states
    tol = 1e-6 if dtype == torch.float32 else 1e-12
    assert len(out) == len(ref)
    for r, o, o2 in zip(ref, out, other):
        assert o.shape == (2, 65 + M, r.shape[-1])
        torch.testing.assert_close(o[:, :65], r, atol=tol, rtol=0)
        torch.testing.assert_close(o2[:, :65], o[:, :65], atol=tol, rtol=0)
    # the semantic tokens themselves did change, and they read the patches
    assert not torch.allclose(out[-1][:, 65:], other[-1][:, 65:])
    with torch.no_grad(), mmeff.apply(tower, vt):
        moved = tower(pixels(seed=1, dtype=dtype), output_hidden_states=True).hidden_states
    assert not torch.allclose(moved[-1][:, 65:], out[-1][:, 65:])
    with torch.no_grad():  # detached: the tower is its old self
        torch.testing.assert_close(tower(px, output_hidden_states=True).hidden_states[-1], ref[-1], atol=0, rtol=0)


def test_without_the_mask_the_originals_change(llava) -> None:
    # the check above must be able to fail: self-attention to the semantic tokens alters the patches
    tower = llava.model.vision_tower
    vt = fresh(llava)
    px = pixels()
    with torch.no_grad():
        ref = tower(px, output_hidden_states=True).hidden_states[-1]
        with mmeff.apply(tower, vt) as handle:
            for h in handle._hooks[1:]:  # the layers' mask hooks
                h.remove()
            leaked = tower(px, output_hidden_states=True).hidden_states[-1]
    assert (leaked[:, :65] - ref).abs().max() > 1e-3


def test_assignment_is_one_hot_forward_and_differentiable() -> None:
    torch.manual_seed(0)
    layer = GroupingLayer(16)
    sem, patches = torch.randn(2, 4, 16, requires_grad=True), torch.randn(2, 10, 16, requires_grad=True)
    for training in (True, False):  # Gumbel noise while training, plain argmax otherwise
        layer.train(training)
        attn, index = layer.assign(sem, patches)
        assert attn.shape == (2, 4, 10) and index.shape == (2, 10)
        assert torch.equal(attn.detach(), torch.nn.functional.one_hot(index, 4).transpose(1, 2).float())
    layer.eval()
    out, _ = layer(sem, patches)
    out.pow(2).sum().backward()
    # straight-through: the similarity projections get gradients through the hard assignment
    assert layer.q.weight.grad.abs().sum() > 0 and layer.k.weight.grad.abs().sum() > 0
    assert sem.grad.abs().sum() > 0 and patches.grad.abs().sum() > 0
    soft = GroupingLayer(16, hard=False).eval()
    attn, _ = soft.assign(sem, patches)
    torch.testing.assert_close(attn.sum(1), torch.ones(2, 10))
    assert ((attn > 0) & (attn < 1)).all()


def test_grouped_tokens_are_member_means_plus_updates() -> None:
    torch.manual_seed(0)
    layer = GroupingLayer(8).eval()
    sem, patches = torch.randn(1, 3, 8), torch.randn(1, 7, 8)
    with torch.no_grad():
        out, index = layer(sem, patches)
        v = layer.v(layer.norm_x(patches))[0]
        for g in range(3):
            members = v[index[0] == g]
            pooled = members.mean(0) if len(members) else torch.zeros(8)
            x = sem[0, g] + layer.proj(pooled)
            torch.testing.assert_close(out[0, g], x + layer.mlp(layer.norm_out(x)), atol=1e-5, rtol=1e-5)


def test_duplicate_patches_fall_into_the_same_group() -> None:
    torch.manual_seed(0)
    layer = GroupingLayer(32).eval()
    sem = torch.randn(1, 6, 32)
    distinct = torch.randn(1, 12, 32)
    # patches 12.. repeat 0..5 (a constructed input with redundant tokens), in another order
    order = torch.tensor([3, 0, 5, 1, 4, 2])
    patches = torch.cat([distinct, distinct[:, order]], dim=1)
    with torch.no_grad():
        _, index = layer(sem, patches)
    assert torch.equal(index[0, 12:], index[0, order])
    assert len(set(index[0].tolist())) > 1  # not trivially everything in one group


def test_llava_reads_m_tokens_per_image_and_is_restored(llava) -> None:
    inp = models.llava_inputs(llava.config, batch=2, seed=0)
    vt = fresh(llava)
    with torch.no_grad():
        base = llava(**inp).logits
        with mmeff.apply(llava, vt) as handle:
            out = llava(**inp).logits
            stats = handle.stats
            assign = handle.last_assignment
            gen = llava.generate(**inp, max_new_tokens=3, do_sample=False, pad_token_id=0)
        again = llava(**inp).logits
    assert stats["tokens_in"] == 64 and stats["tokens_out"] == M
    assert stats["visual_tokens_in"] == 128 and stats["visual_tokens_out"] == 2 * M
    assert out.shape[1] == inp["input_ids"].shape[1] - (64 - M)
    assert [a.shape for a in assign] == [(1, 64), (1, 64)] and all(int(a.max()) < M for a in assign)
    assert gen.shape == (2, inp["input_ids"].shape[1] + 3)
    torch.testing.assert_close(again, base, atol=0, rtol=0)
    handle = mmeff.patch(llava, vt)
    with pytest.raises(ValueError, match="already attached"):
        mmeff.patch(llava, vt)
    assert mmeff.unpatch(llava)
    assert "_mmeff_adapter" not in llava.__dict__ and "_mmeff_vistog_adapter" not in llava.__dict__
    assert handle.inner is None


def test_sdpa_and_eager_agree_through_the_llm(llava) -> None:
    inp = models.llava_inputs(llava.config, batch=1, seed=2)
    vt = fresh(llava)
    outs = []
    for attn in ("sdpa", "eager"):
        model = copy.deepcopy(llava)
        model.set_attn_implementation(attn)
        with torch.no_grad(), mmeff.apply(model, vt):
            outs.append(model(**inp).logits)
    torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=1e-5)


def test_bad_uses_fail_clearly(llava, tmp_path) -> None:
    with pytest.raises(ValueError, match="exceeds the 64 patch tokens"):
        VisToG.for_model(llava, num_groups=65)
    with pytest.raises(ValueError, match="does not match the vision tower"):
        mmeff.apply(llava, VisToG(16, 4)).__enter__()
    with pytest.raises(ValueError, match="only with a KV-cache press"):
        mmeff.attach(llava, fresh(llava), mmeff.AvgPool(tokens=16))
    with pytest.raises(TypeError, match="does not support Linear"):
        mmeff.attach(torch.nn.Linear(2, 2), VisToG(2, 1))
    model = copy.deepcopy(llava)
    model.model.vision_tower.config._attn_implementation = "flash_attention_2"
    with pytest.raises(ValueError, match="eager or sdpa"):
        mmeff.attach(model, fresh(llava))
    assert "_mmeff_vistog_adapter" not in model.__dict__


def _batches(config, n: int = 2):
    out = []
    for i in range(n):
        inp = models.llava_inputs(config, batch=2, seed=i, left_pad=False)
        labels = inp["input_ids"].clone()
        labels[(labels == config.image_token_id) | (inp["attention_mask"] == 0)] = -100
        out.append({**inp, "labels": labels})
    return out


def test_two_stage_training_moves_the_right_parameters(llava) -> None:
    model = copy.deepcopy(llava)
    vt = fresh(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    sem0 = vt.semantic.detach().clone()
    batches = _batches(model.config)
    log1 = train_vistog(model, vt, batches, stage=1, steps=12, lr=3e-3, progress=False)
    after1 = {k: v.clone() for k, v in model.state_dict().items()}
    changed = {k for k in before if not torch.equal(before[k], after1[k])}
    assert changed and all(k.startswith("model.multi_modal_projector") for k in changed), sorted(changed)[:5]
    assert not torch.equal(vt.semantic, sem0)
    assert log1.steps == 12 and log1.losses[-1] < log1.losses[0]
    log2 = train_vistog(model, vt, batches, stage=2, steps=4, lr=1e-3, lm_lr=1e-3, progress=False)
    after2 = model.state_dict()
    changed2 = {k for k in before if not torch.equal(after1[k], after2[k])}
    assert any(k.startswith("model.language_model") for k in changed2)
    assert not any(k.startswith("model.vision_tower") for k in changed2 | changed)
    assert log2.trainable > log1.trainable
    assert not any(p.requires_grad for p in model.parameters()) and not vt.training
    with pytest.raises(ValueError, match="stage must be 1"):
        train_vistog(model, vt, batches, stage=3, steps=1)


def test_training_noise_is_the_callers_and_batches_may_be_a_generator(llava) -> None:
    batches = _batches(llava.config)

    def losses(seed: int, data) -> list[float]:
        model = copy.deepcopy(llava)
        vt = fresh(model)
        torch.manual_seed(seed)  # the Gumbel noise draws from the caller's global RNG
        return train_vistog(model, vt, data, stage=1, steps=3, lr=3e-3, progress=False).losses

    first = losses(1, batches)
    assert len(first) == 3 and first == losses(1, batches) and first != losses(2, batches)

    def stream():  # an endless generator, as the scene batches are
        while True:
            yield from batches

    assert losses(1, stream()) == first
    with pytest.raises(ValueError, match="batches is empty"):
        losses(1, [])


def test_save_load_round_trip(llava, tmp_path) -> None:
    vt = fresh(llava, tau=0.5, semantic_self_attention=False)
    path = vt.save(tmp_path / "vt.safetensors", extra={"trained": "no"})
    back = VisToG.load(path)
    assert back.config == vt.config and back.num_groups == M
    inp = models.llava_inputs(llava.config, batch=1, seed=3)
    with torch.no_grad():
        with mmeff.apply(llava, vt):
            a = llava(**inp).logits
        with mmeff.apply(llava, back.eval()):
            b = llava(**inp).logits
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    bad = tmp_path / "bad.safetensors"
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(bad))
    with pytest.raises(ValueError, match="not a VisToG file"):
        VisToG.load(bad)


# ------------------------------------------------------------------------------------------- Qwen2-VL


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    return models.build_tiny("qwen2_vl", tmp_path_factory.mktemp("qwen_vistog"), seed=0)


def test_qwen_reads_m_tokens_per_image_and_video(qwen) -> None:
    # 112x84 image: 8x6 patches -> 12 merged tokens; video 4x56x56: 2 temporal x 4x4 -> 2x2x2 = 8 merged
    inp = models.qwen2_vl_inputs(qwen.config, batch=2, image_hw=[(112, 84)], video=[None, (4, 56, 56)], seed=0)
    vt = fresh(qwen, m=4)
    assert (vt.token_dim, vt.dim) == (qwen.config.vision_config.embed_dim, qwen.config.vision_config.hidden_size)
    visual = qwen.model.visual
    with torch.no_grad():
        base = qwen(**inp).logits
        ref = visual(inp["pixel_values"], grid_thw=inp["image_grid_thw"])
        with mmeff.apply(qwen, vt) as handle:
            out = qwen(**inp).logits
            stats = handle.stats
            assign = handle.last_assignment
            gen = qwen.generate(**inp, max_new_tokens=2, do_sample=False)
            hooked = visual(inp["pixel_values"], grid_thw=inp["image_grid_thw"])
        again = qwen(**inp).logits
    assert stats["visual_tokens_in"] == 12 + 12 + 8 and stats["visual_tokens_out"] == 3 * 4
    assert out.shape[1] == inp["input_ids"].shape[1] - (12 - 4) - (8 - 4)
    assert sorted(a.shape[1] for a in assign) == [8, 12, 12]
    assert gen.shape == (2, inp["input_ids"].shape[1] + 2)
    # the host's own patch computation is untouched: bit-identical features with VisToG attached
    assert torch.equal(hooked.last_hidden_state, ref.last_hidden_state)
    assert torch.equal(hooked.pooler_output, ref.pooler_output)
    torch.testing.assert_close(again, base, atol=0, rtol=0)
    with pytest.raises(ValueError, match="exceeds the 12 merged tokens"):
        with torch.no_grad(), mmeff.apply(qwen, fresh(qwen, m=13)):
            qwen(**models.qwen2_vl_inputs(qwen.config, batch=1, image_hw=[(112, 84)], video=None))


def _joint_block(blk, x, n, mask, cos, sin, rotate):
    """One Qwen-VL vision block on the joint sequence ``x`` (``n`` patches, then the semantic tokens) under
    the additive ``mask``, with the block's own modules; rotary on the patches only (the host rounds it
    through float32; the semantic tokens get none)."""
    heads, total = blk.attn.num_heads, x.shape[0]
    q, k, v = blk.attn.qkv(blk.norm1(x)).reshape(total, 3, heads, -1).unbind(1)
    rq, rk = rotate(q[:n], k[:n], cos, sin)
    q, k = torch.cat([rq, q[n:]]), torch.cat([rk, k[n:]])
    w = (torch.einsum("qhd,khd->hqk", q, k) * blk.attn.scaling + mask).softmax(-1)
    x = x + blk.attn.proj(torch.einsum("hqk,khd->qhd", w, v).reshape(total, -1))
    return x + blk.mlp(blk.norm2(x))


@pytest.mark.parametrize("self_attention", [True, False])
def test_qwen_side_stream_equals_the_masked_joint_sequence(qwen, self_attention) -> None:
    """Reference: run one image's patches and the semantic tokens as ONE sequence through each block's
    own modules with the isolation mask (semantic tokens unrotated), then merge; compare."""
    from transformers.models.qwen2_vl.modeling_qwen2_vl import apply_rotary_pos_emb_vision

    model = copy.deepcopy(qwen).double()
    inp = models.qwen2_vl_inputs(model.config, batch=1, image_hw=[(56, 84)], seed=4)
    vt = fresh(model, m=3, semantic_self_attention=self_attention).double()
    visual = model.model.visual
    rope: list = []
    hook = visual.blocks[0].register_forward_pre_hook(
        lambda mod, a, kw: rope.append(kw["position_embeddings"]), with_kwargs=True)
    with torch.no_grad():
        px, grid = inp["pixel_values"].double(), inp["image_grid_thw"]
        host = visual(px, grid_thw=grid)
        hook.remove()
        got: list = []
        with mmeff.apply(model, vt) as handle:
            handle._merged = got  # what the side stream hands the grouping
            visual(px, grid_thw=grid)
        cos, sin = rope[0]
        n, m = cos.shape[0], vt.num_groups
        x = torch.cat([visual.patch_embed(px), vt.semantic.double()])
        mask = isolation_mask(n, m, torch.float64, semantic_self_attention=self_attention)[0, 0]
        for blk in visual.blocks:
            x = _joint_block(blk, x, n, mask, cos, sin, apply_rotary_pos_emb_vision)
        merger = visual.merger
        want = merger.mlp(merger.ln_q(x[n:]).repeat(1, 4))
    torch.testing.assert_close(x[:n], host.last_hidden_state, atol=1e-10, rtol=0)  # the reference is right
    assert len(got) == 1
    torch.testing.assert_close(got[0], want, atol=1e-10, rtol=0)


@pytest.fixture(scope="module")
def qwen25(tmp_path_factory):
    return models.build_tiny("qwen2_5_vl", tmp_path_factory.mktemp("qwen25_vistog"), seed=0,
                             vision_config={"depth": 3})


@pytest.mark.parametrize("self_attention", [True, False])
def test_qwen25_side_stream_equals_the_masked_joint_sequence_with_windows(qwen25, self_attention) -> None:
    """Qwen2.5-VL runs most tower blocks in windows over a window-ordered patch sequence. Reference: the
    patches (as the host orders them) and the semantic tokens as ONE sequence, where patches attend within
    the host's window (or full-attention) segments and semantic tokens to every patch of the image; the
    patches must come out as the host's and the semantic tokens as the side stream's."""
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import apply_rotary_pos_emb_vision

    model = copy.deepcopy(qwen25).double()
    inp = models.qwen2_vl_inputs(model.config, batch=1, image_hw=[(112, 168)], seed=4)
    vt = fresh(model, m=3, semantic_self_attention=self_attention).double()
    visual = model.model.visual
    seen: list = []
    hooks = [blk.register_forward_pre_hook(lambda mod, a, kw: seen.append((a[0] if a else kw["hidden_states"],
                                                                        kw["cu_seqlens"], kw["position_embeddings"])),
                                           with_kwargs=True) for blk in visual.blocks]
    final: list = []
    hooks.append(visual.merger.register_forward_pre_hook(lambda mod, a: final.append(a[0])))
    with torch.no_grad():
        px, grid = inp["pixel_values"].double(), inp["image_grid_thw"]
        visual(px, grid_thw=grid)
        for h in hooks:
            h.remove()
        got: list = []
        with mmeff.apply(model, vt) as handle:
            handle._merged = got
            visual(px, grid_thw=grid)
        x0, _, (cos, sin) = seen[0]
        n, m = x0.shape[0], vt.num_groups
        assert len({tuple(cu.tolist()) for _, cu, _ in seen}) == 2  # windowed and full-attention blocks
        x = torch.cat([x0, vt.semantic.double()])
        for blk, (_, cu, _) in zip(visual.blocks, seen):
            mask = isolation_mask(n, m, torch.float64, semantic_self_attention=self_attention)[0, 0].clone()
            seg = torch.zeros(n, dtype=torch.long)
            for i, (a, b) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
                seg[a:b] = i
            mask[:n, :n] = torch.where(seg[:, None] == seg[None, :], 0.0, float("-inf"))
            x = _joint_block(blk, x, n, mask, cos, sin, apply_rotary_pos_emb_vision)
        merger = visual.merger
        want = merger.mlp(merger.ln_q(x[n:]).repeat(1, 4))
    torch.testing.assert_close(x[:n], final[0], atol=1e-10, rtol=0)  # the reference is the host's
    assert len(got) == 1
    torch.testing.assert_close(got[0], want, atol=1e-10, rtol=0)


def test_qwen25_reads_m_tokens_per_image_and_video(qwen25) -> None:
    inp = models.qwen2_vl_inputs(qwen25.config, batch=2, image_hw=[(112, 84)], video=[None, (4, 56, 56)], seed=0)
    with torch.no_grad():
        base = qwen25(**inp).logits
        ref = qwen25.model.visual(inp["pixel_values"], grid_thw=inp["image_grid_thw"])
        with mmeff.apply(qwen25, fresh(qwen25, m=4)) as handle:
            qwen25(**inp)
            stats = handle.stats
            gen = qwen25.generate(**inp, max_new_tokens=2, do_sample=False)
            hooked = qwen25.model.visual(inp["pixel_values"], grid_thw=inp["image_grid_thw"])
        again = qwen25(**inp).logits
    assert stats["visual_tokens_in"] == 12 + 12 + 8 and stats["visual_tokens_out"] == 3 * 4
    assert gen.shape == (2, inp["input_ids"].shape[1] + 2)
    assert torch.equal(hooked.pooler_output, ref.pooler_output)  # the host's patch computation is untouched
    torch.testing.assert_close(again, base, atol=0, rtol=0)


def test_qwen_training_stage_one_moves_merger_and_vistog_only(qwen) -> None:
    model = copy.deepcopy(qwen)
    vt = fresh(model, m=4)
    inp = models.qwen2_vl_inputs(model.config, batch=2, image_hw=[(56, 84)], left_pad=False, seed=5)
    labels = inp["input_ids"].clone()
    labels[(inp["mm_token_type_ids"] != 0) | (inp["attention_mask"] == 0)] = -100
    before = {k: v.clone() for k, v in model.state_dict().items()}
    sem0 = vt.semantic.detach().clone()
    log = train_vistog(model, vt, [{**inp, "labels": labels}], stage=1, steps=6, lr=3e-3, progress=False)
    changed = {k for k, v in model.state_dict().items() if not torch.equal(before[k], v)}
    assert changed and all(k.startswith("model.visual.merger") for k in changed), sorted(changed)[:5]
    assert not torch.equal(vt.semantic, sem0) and log.losses[-1] < log.losses[0]


def test_flops_match_the_flop_counter(llava) -> None:
    model = copy.deepcopy(llava)
    model.set_attn_implementation("eager")  # the counter sees eager's bmm; it does not count CPU SDPA here
    tower = model.model.vision_tower
    vt = fresh(llava)
    px = pixels(b=1)

    def count(fn) -> int:
        with FlopCounterMode(display=False) as fc, torch.no_grad():
            fn()
        return fc.get_total_flops()

    plain = count(lambda: tower(px))
    with mmeff.apply(tower, vt):
        grown = count(lambda: tower(px))
    patches, sem = torch.randn(1, 64, 32), torch.randn(1, M, 32)
    grouping = count(lambda: vt(patches, sem))
    want = vistog_flops(llava.config, M)
    assert want == {"tower_extra": grown - plain, "grouping": grouping}


def test_bench_vistog_table(llava, tmp_path) -> None:
    from mmeff.bench.vistog import run_vistog_bench
    from mmeff.eval.flops import load_config, prefill_flops

    lines: list[str] = []
    rows = run_vistog_bench(["tiny-llava"], groups={"tiny-llava": (8,)}, config_groups=(64,), repeats=1,
                            decode_tokens=1, out_dir=tmp_path, model_fn=lambda name: llava, print_fn=lines.append)
    plain, grouped, big, big_grouped = rows
    assert (plain.visual_tokens, grouped.visual_tokens, big.visual_tokens, big_grouped.visual_tokens) == (64, 8, 576, 64)
    assert grouped.llm_gflops < plain.llm_gflops and grouped.vision_gflops > plain.vision_gflops
    assert plain.prefill_ms > 0 and grouped.prefill_ms > 0 and big.prefill_ms is None
    cfg = load_config("llava-1.5-7b")
    want = prefill_flops(cfg, text_tokens=64, visual_tokens=64, image_patches=576, projector_tokens=64)
    extra = vistog_flops(cfg, 64)
    assert big_grouped.llm_gflops == pytest.approx(want.llm / 1e9)
    assert big_grouped.vision_gflops == pytest.approx((want.vision + extra["tower_extra"] + extra["grouping"]) / 1e9)
    assert len(lines) == 2 + len(rows) and "vistog M=8" in lines[3]
    assert (tmp_path / "vistog.json").is_file() and (tmp_path / "vistog_cost.png").stat().st_size > 1000


def test_cli_bench_vistog(tmp_path, capsys) -> None:
    from mmeff.cli.main import main

    rc = main(["bench", "vistog", "--vistog-models", "tiny-llava", "--vistog-groups", "4", "--vistog-config-groups",
               "64", "--repeats", "1", "--decode-tokens", "1", "--vistog-out", str(tmp_path)])
    assert rc == 0
    out = capsys.readouterr().out
    assert "vistog M=4" in out and "llava-1.5-7b" in out and (tmp_path / "vistog.json").is_file()


def test_group_positions_are_member_means_and_empty_groups_sit_at_the_centre() -> None:
    from mmeff.methods.vistog import GroupReduction

    red = GroupReduction(tokens=torch.zeros(1, 3, 4), assignment=torch.tensor([[0, 0, 2, 2, 2]]))
    pos = torch.tensor([[0, 2, 4, 6, 11]])
    assert red.positions(pos).tolist() == [[1, 5, 7]]  # group 1 is empty: the mean of all five, 4.6 -> 5
    thw = torch.stack([pos, pos + 100, pos * 2], dim=-1)  # (1, N, 3) M-RoPE-like positions
    assert red.positions(thw).tolist() == [[[1, 101, 2], [5, 105, 9], [7, 107, 14]]]
    assert red.sizes.tolist() == [[2.0, 0.0, 3.0]]
