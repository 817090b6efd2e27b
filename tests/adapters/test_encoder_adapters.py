"""Reducers inside timm ``VisionTransformer`` and open_clip image towers (tiny random models, CPU).

Every reduced forward is checked against a test-only reference that runs the host's own blocks by hand:
blocks ``[:layer + 1]``, the reducer on the patch tokens, the remaining blocks, norm, pooling and head.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import open_clip
import pytest
import timm
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import mmeff
from mmeff.adapters import OpenCLIPAdapter, TimmViTAdapter, find_adapter
from mmeff.core import Reduction, TokenContext, TokenReducer
from mmeff.kernels import topk_indices_sorted
from mmeff.methods.baselines import AvgPool, CLSAttnTopK

IMG = 64  # 4x4 patches of 16 pixels
DEPTH = 4


pytestmark = pytest.mark.usefixtures("single_thread")


# --------------------------------------------------------------------------------------------- helpers


class _Record:
    """Mixin remembering every context a reducer was called with."""

    def reduce(self, tokens: Tensor, ctx: TokenContext) -> Reduction:
        self.seen.append(ctx)
        return super().reduce(tokens, ctx)


@dataclass
class RecordingCLS(_Record, CLSAttnTopK):
    seen: list = field(default_factory=list, repr=False, compare=False)


@dataclass
class RecordingPool(_Record, AvgPool):
    seen: list = field(default_factory=list, repr=False, compare=False)


def images(b: int = 2, h: int = IMG, w: int = IMG, seed: int = 0) -> Tensor:
    return torch.randn(b, 3, h, w, generator=torch.Generator().manual_seed(seed))


def hook_state(model: nn.Module) -> dict[str, tuple]:
    """Every hook id on every submodule (forward, pre-forward and their with-kwargs flags)."""
    return {
        name: (
            tuple(m._forward_hooks),
            tuple(m._forward_pre_hooks),
            tuple(m._forward_hooks_with_kwargs),
            tuple(m._forward_pre_hooks_with_kwargs),
        )
        for name, m in model.named_modules()
    }


def token_counts(blocks: nn.ModuleList | nn.Sequential, batch_first: bool = True) -> tuple[list[int], list]:
    """Register pre-hooks recording the sequence length each block receives; returns (counts, handles)."""
    counts: list[int] = []

    def pre(module: nn.Module, args: tuple) -> None:
        counts.append(int(args[0].shape[1 if batch_first else 0]))

    return counts, [b.register_forward_pre_hook(pre) for b in blocks]


REDUCERS = {
    "uniform": lambda: mmeff.UniformKeep(tokens=5),
    "random": lambda: mmeff.RandomKeep(ratio=0.5, seed=3),
    "pool": lambda: mmeff.AvgPool(tokens=4),
    "cls_attn": lambda: mmeff.CLSAttnTopK(tokens=6),
    "compose": lambda: mmeff.compose(mmeff.UniformKeep(ratio=0.75), mmeff.CLSAttnTopK(tokens=4)),
}


# ------------------------------------------------------------------------------------------------ timm


def make_vit(**kwargs) -> nn.Module:
    torch.manual_seed(0)
    # LayerScale + qk-norm exercise the parts of current timm blocks an adapter must not bypass
    args = dict(pretrained=False, img_size=IMG, depth=DEPTH, num_classes=10, init_values=0.1, qk_norm=True)
    args.update(kwargs)
    return timm.create_model("vit_tiny_patch16_224", **args).eval()


VIT_VARIANTS = {
    "cls": dict(),
    "reg": dict(reg_tokens=4, no_embed_class=True),
    "avg": dict(class_token=False, global_pool="avg"),
    "dyn": dict(dynamic_img_size=True),
}
VIT_IMAGE = {"dyn": (IMG, 96)}  # 4x6 patches


@pytest.fixture(scope="module")
def vits() -> dict[str, nn.Module]:
    return {k: make_vit(**v) for k, v in VIT_VARIANTS.items()}


def vit_images(variant: str, seed: int = 0) -> Tensor:
    return images(2, *VIT_IMAGE.get(variant, (IMG, IMG)), seed=seed)


def timm_eager_cls_attention(block: nn.Module, h: Tensor, prefix: int) -> Tensor:
    """CLS row of softmax(q k^T * scale), mean over heads, patch columns only: (B, N)."""
    attn = block.attn
    xn = block.norm1(h)
    b, n, _ = xn.shape
    qkv = attn.qkv(xn).reshape(b, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k = attn.q_norm(qkv[0]), attn.k_norm(qkv[1])
    probs = (q @ k.transpose(-2, -1) * attn.scale).softmax(-1)
    return probs[:, :, 0, prefix:].mean(1)


def timm_reference(vit: nn.Module, x: Tensor, reducer: TokenReducer, layer: int) -> tuple[Tensor, Reduction]:
    """Run the host blocks by hand with the reduction between block ``layer`` and ``layer + 1``."""
    p = vit.num_prefix_tokens
    layer %= len(vit.blocks)
    grid = vit.patch_embed.dynamic_feat_size(tuple(x.shape[-2:]))
    h = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(x))))
    for blk in vit.blocks[:layer]:
        h = blk(h)
    scores = timm_eager_cls_attention(vit.blocks[layer], h, p) if "scores" in reducer.needs else None
    h = vit.blocks[layer](h)
    red = reducer(h[:, p:], TokenContext(grid=grid, scores=scores))
    h = torch.cat([h[:, :p], red.tokens], dim=1)
    for blk in vit.blocks[layer + 1 :]:
        h = blk(h)
    return vit.forward_head(vit.norm(h)), red


@pytest.mark.parametrize("variant", list(VIT_VARIANTS))
@pytest.mark.parametrize(
    "reducer",
    [
        lambda: mmeff.UniformKeep(ratio=1.0),
        lambda: mmeff.RandomKeep(ratio=1.0, seed=1),
        lambda: mmeff.CLSAttnTopK(ratio=1.0),
        lambda: mmeff.AvgPool(out_grid=None, ratio=1.0),
    ],
    ids=["uniform", "random", "cls_attn", "pool"],
)
@pytest.mark.parametrize("layer", [0, -1])
def test_timm_keep_all_equals_plain_model(vits, variant, reducer, layer):
    vit, x, red = vits[variant], vit_images(variant), reducer()
    if "scores" in red.needs and not vit.has_class_token:
        pytest.skip("no class token")
    with torch.no_grad():
        plain = vit(x)
        with mmeff.apply(vit, red, layer=layer) as handle:
            out = vit(x)
    torch.testing.assert_close(out, plain, rtol=0, atol=0)
    n = 24 if variant == "dyn" else 16
    assert handle.stats == {"tokens_in": n, "tokens_out": n, "layer": layer % DEPTH}


@pytest.mark.parametrize("variant", list(VIT_VARIANTS))
def test_timm_pool_to_full_grid_is_identity(vits, variant):
    vit, x = vits[variant], vit_images(variant)
    grid = (4, 6) if variant == "dyn" else (4, 4)
    with torch.no_grad():
        plain = vit(x)
        with mmeff.apply(vit, mmeff.AvgPool(out_grid=grid), layer=1) as handle:
            out = vit(x)
    torch.testing.assert_close(out, plain, rtol=0, atol=0)
    assert handle.last_reduction.grid == grid


@pytest.mark.parametrize("variant", list(VIT_VARIANTS))
@pytest.mark.parametrize("name", list(REDUCERS))
@pytest.mark.parametrize("layer", [0, 2, -1])
def test_timm_matches_manual_reference(vits, variant, name, layer):
    vit, x = vits[variant], vit_images(variant, seed=1)
    reducer = REDUCERS[name]()
    if "scores" in reducer.needs and not vit.has_class_token:
        pytest.skip("no class token (covered by test_cls_attn_without_class_token_is_rejected)")
    p = vit.num_prefix_tokens
    counts, handles = token_counts(vit.blocks)
    norm_in, norm_handles = token_counts([vit.norm])
    try:
        with torch.no_grad():
            ref, ref_red = timm_reference(vit, x, reducer, layer)
            counts.clear()
            norm_in.clear()
            with mmeff.apply(vit, reducer, layer=layer) as handle:
                out = vit(x)
    finally:
        for hd in handles + norm_handles:
            hd.remove()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    n, m, li = x.shape[-2] // 16 * (x.shape[-1] // 16), ref_red.num_tokens, layer % DEPTH
    assert m < n
    assert handle.stats == {"tokens_in": n, "tokens_out": m, "layer": li}
    assert torch.equal(handle.last_reduction.assignment, ref_red.assignment)
    assert handle.last_reduction.tokens.shape == (2, m, vit.embed_dim)
    # blocks up to `layer` see every token, later blocks and the final norm only prefix + M
    assert counts == [p + n] * (li + 1) + [p + m] * (DEPTH - li - 1)
    assert norm_in == [p + m]


@pytest.mark.parametrize("variant", ["cls", "reg"])
@pytest.mark.parametrize("layer", [0, 1, 3])
def test_timm_cls_attn_scores_match_eager_attention(vits, variant, layer):
    vit, x = vits[variant], vit_images(variant, seed=2)
    p = vit.num_prefix_tokens
    captured: list[Tensor] = []

    def grab_input(module: nn.Module, args: tuple) -> None:
        captured.append(args[0])

    h = vit.blocks[layer].register_forward_pre_hook(grab_input)
    reducer = RecordingCLS(tokens=5)
    try:
        with torch.no_grad(), mmeff.apply(vit, reducer, layer=layer) as handle:
            vit(x)
            eager = timm_eager_cls_attention(vit.blocks[layer], captured[-1], p)
    finally:
        h.remove()
    scores = reducer.seen[-1].scores
    assert scores.shape == (2, 16)
    torch.testing.assert_close(scores, eager, rtol=1e-5, atol=1e-6)
    # raw probabilities over all tokens, prefix columns dropped, not renormalised
    assert bool((scores.sum(-1) < 1).all())
    assert torch.equal(handle.last_reduction.indices, topk_indices_sorted(eager, 5))
    assert reducer.seen[-1].grid == (4, 4)


def test_timm_cls_attn_scores_without_qk_norm():
    vit = make_vit(qk_norm=False, init_values=None)
    x = vit_images("cls", seed=3)
    reducer = RecordingCLS(tokens=3)
    with torch.no_grad():
        h = vit.norm_pre(vit._pos_embed(vit.patch_embed(x)))
        eager = timm_eager_cls_attention(vit.blocks[0], h, 1)
        with mmeff.apply(vit, reducer):
            vit(x)
    torch.testing.assert_close(reducer.seen[-1].scores, eager, rtol=1e-5, atol=1e-6)


def test_timm_register_tokens_are_kept_untouched(vits):
    vit, x = vits["reg"], vit_images("reg", seed=4)
    assert vit.num_prefix_tokens == 5
    before: list[Tensor] = []
    after: list[Tensor] = []
    # registered before attach, so it sees the block output before the adapter's hook reduces it
    h1 = vit.blocks[1].register_forward_hook(lambda m, a, o: before.append(o))
    h2 = vit.blocks[2].register_forward_pre_hook(lambda m, a: after.append(a[0]))
    try:
        with torch.no_grad(), mmeff.apply(vit, mmeff.AvgPool(tokens=4), layer=1) as handle:
            vit(x)
    finally:
        h1.remove()
        h2.remove()
    assert after[0].shape == (2, 5 + 4, vit.embed_dim)
    assert torch.equal(after[0][:, :5], before[0][:, :5])
    pooled = before[0][:, 5:].reshape(2, 2, 2, 2, 2, -1).mean(dim=(2, 4)).reshape(2, 4, -1)
    torch.testing.assert_close(after[0][:, 5:], pooled, rtol=1e-5, atol=1e-6)
    assert handle.stats == {"tokens_in": 16, "tokens_out": 4, "layer": 1}


def test_timm_dynamic_image_size_records_grid_per_call(vits):
    vit = vits["dyn"]
    reducer = RecordingPool(tokens=6)
    with torch.no_grad(), mmeff.apply(vit, reducer, layer=0) as handle:
        vit(images(2, 64, 96))
        assert reducer.seen[-1].grid == (4, 6)
        assert handle.last_reduction.grid == (2, 3)
        vit(images(2, 96, 64))
        assert reducer.seen[-1].grid == (6, 4)
        assert handle.last_reduction.grid == (3, 2)
        assert handle.stats == {"tokens_in": 24, "tokens_out": 6, "layer": 0}


def test_timm_gradients_and_checkpointing_flow_through_reduction():
    vit = make_vit()
    vit.set_grad_checkpointing(True)
    x = vit_images("cls")
    with torch.enable_grad(), mmeff.apply(vit, mmeff.AvgPool(tokens=4), layer=1) as handle:
        vit(x).square().sum().backward()
    assert vit.patch_embed.proj.weight.grad is not None
    assert vit.blocks[-1].attn.qkv.weight.grad is not None
    assert handle.stats["tokens_out"] == 4


def test_timm_detach_removes_every_hook(vits):
    vit = vits["cls"]
    before = hook_state(vit)
    with torch.no_grad(), mmeff.apply(vit, mmeff.CLSAttnTopK(tokens=3), layer=2):
        assert hook_state(vit) != before
        assert vit.__dict__["_mmeff_adapter"] is not None
    assert hook_state(vit) == before
    assert "_mmeff_adapter" not in vit.__dict__

    with pytest.raises(RuntimeError, match="boom"), mmeff.apply(vit, mmeff.CLSAttnTopK(tokens=3), layer=-1):
        raise RuntimeError("boom")
    assert hook_state(vit) == before

    # an error raised by the adapter's own hook mid-forward also leaves the model clean
    mask = torch.ones(17, 17, dtype=torch.bool)
    with pytest.raises(ValueError, match="attention masks"), mmeff.apply(vit, mmeff.UniformKeep(tokens=4)):
        vit(vit_images("cls"), attn_mask=mask)
    assert hook_state(vit) == before

    adapter = mmeff.patch(vit, mmeff.UniformKeep(tokens=4))
    assert hook_state(vit) != before
    assert mmeff.unpatch(vit)
    assert hook_state(vit) == before
    adapter.detach()  # second detach is a no-op
    assert hook_state(vit) == before


def test_timm_bad_options_and_models_give_clear_errors(vits):
    vit = vits["cls"]
    before = hook_state(vit)
    for layer in (DEPTH, -DEPTH - 1, 100):
        with pytest.raises(ValueError, match=rf"layer={layer} is out of range .* {DEPTH} blocks"):
            with mmeff.apply(vit, mmeff.UniformKeep(tokens=4), layer=layer):
                pass
    for layer in ("1", 1.0, True, None):
        with pytest.raises(TypeError, match="layer must be an int"):
            mmeff.attach(vit, mmeff.UniformKeep(tokens=4), layer=layer)
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['layers'\]"):
        mmeff.attach(vit, mmeff.UniformKeep(tokens=4), layers=1)
    with pytest.raises(TypeError, match="unsupported model class Linear"):
        mmeff.attach(nn.Linear(2, 2), mmeff.UniformKeep(tokens=4))
    with mmeff.apply(vit, mmeff.UniformKeep(tokens=4)):
        with pytest.raises(ValueError, match="already has an mmeff method attached"):
            mmeff.attach(vit, mmeff.UniformKeep(tokens=2))
    assert hook_state(vit) == before
    with pytest.raises(ValueError, match="budget tokens=99 exceeds the 16 tokens"), torch.no_grad():
        with mmeff.apply(vit, mmeff.UniformKeep(tokens=99)):
            vit(vit_images("cls"))
    assert hook_state(vit) == before


def test_cls_attn_without_class_token_is_rejected(vits):
    vit = vits["avg"]
    before = hook_state(vit)
    with pytest.raises(ValueError, match="has no class token"):
        mmeff.attach(vit, mmeff.CLSAttnTopK(tokens=4))
    with pytest.raises(ValueError, match="has no class token"):
        mmeff.attach(vit, mmeff.compose(mmeff.UniformKeep(ratio=0.5), mmeff.CLSAttnTopK(tokens=4)))
    assert hook_state(vit) == before


def test_pool_after_patch_dropout_says_why():
    vit = make_vit(patch_drop_rate=0.5).train()
    with pytest.raises(ValueError, match="patch dropout"), torch.no_grad():
        with mmeff.apply(vit, mmeff.AvgPool(tokens=4)):
            vit(vit_images("cls"))
    # selections do not need the grid, so they still run on the surviving tokens
    with torch.no_grad(), mmeff.apply(vit, mmeff.UniformKeep(tokens=3)) as handle:
        vit(vit_images("cls"))
    assert handle.stats == {"tokens_in": 8, "tokens_out": 3, "layer": 0}


# ------------------------------------------------------------------------------------------- open_clip


def make_clip(**vision) -> nn.Module:
    torch.manual_seed(0)
    vcfg = dict(image_size=IMG, patch_size=16, width=64, layers=DEPTH, head_width=16, mlp_ratio=2.0)
    vcfg.update(vision)
    tcfg = dict(context_length=8, vocab_size=64, width=32, heads=2, layers=1)
    return open_clip.model.CLIP(embed_dim=32, vision_cfg=vcfg, text_cfg=tcfg).eval()


CLIP_VARIANTS = {
    "default": dict(),  # ResidualAttentionBlock + nn.MultiheadAttention
    "custom": dict(qk_norm=True, ls_init_value=0.1),  # CustomResidualAttentionBlock + open_clip Attention
    "avg_tokens": dict(pool_type="avg", output_tokens=True),
}


@pytest.fixture(scope="module")
def clips() -> dict[str, nn.Module]:
    return {k: make_clip(**v) for k, v in CLIP_VARIANTS.items()}


def oc_eager_cls_attention(block: nn.Module, h: Tensor) -> Tensor:
    """CLS row of softmax(q k^T * scale), mean over heads, patch columns only: (B, N)."""
    xn = block.ln_1(h)
    attn = block.attn
    if isinstance(attn, nn.MultiheadAttention):
        # PyTorch's own (non-fused) weights path, averaged over heads
        _, w = attn(xn, xn, xn, need_weights=True, average_attn_weights=True)
        return w[:, 0, 1:]
    b, n, d = xn.shape
    q, k, _ = F.linear(xn, attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
    q = attn.ln_q(q.reshape(b, n, attn.num_heads, -1).transpose(1, 2))
    k = attn.ln_k(k.reshape(b, n, attn.num_heads, -1).transpose(1, 2))
    probs = (q @ k.transpose(-2, -1) * attn.scale).softmax(-1)
    return probs[:, :, 0, 1:].mean(1)


def oc_reference(visual: nn.Module, x: Tensor, reducer: TokenReducer, layer: int):
    """Pooled features, tokens and reduction with the reduction after resblock ``layer``, by hand."""
    blocks = visual.transformer.resblocks
    layer %= len(blocks)
    h = visual._embeds(x)
    for blk in blocks[:layer]:
        h = blk(h)
    scores = oc_eager_cls_attention(blocks[layer], h) if "scores" in reducer.needs else None
    h = blocks[layer](h)
    red = reducer(h[:, 1:], TokenContext(grid=tuple(visual.grid_size), scores=scores))
    h = torch.cat([h[:, :1], red.tokens], dim=1)
    for blk in blocks[layer + 1 :]:
        h = blk(h)
    pooled, tokens = visual._pool(h)
    return pooled @ visual.proj, tokens, red


def test_open_clip_internals_are_as_expected(clips):
    # what the adapter relies on in open_clip 3.x
    for name, model in clips.items():
        tr = model.visual.transformer
        assert tr.batch_first
        attn = tr.resblocks[0].attn
        expected = open_clip.transformer.Attention if name == "custom" else nn.MultiheadAttention
        assert type(attn) is expected
        assert attn.in_proj_weight.shape == (3 * 64, 64)


@pytest.mark.parametrize("variant", list(CLIP_VARIANTS))
@pytest.mark.parametrize("target", ["clip", "visual"])
def test_open_clip_keep_all_equals_plain_model(clips, variant, target):
    model = clips[variant]
    host = model if target == "clip" else model.visual
    x = images(seed=5)
    assert find_adapter(host) is OpenCLIPAdapter
    for reducer in (mmeff.UniformKeep(ratio=1.0), mmeff.CLSAttnTopK(ratio=1.0), mmeff.AvgPool(out_grid=(4, 4))):
        with torch.no_grad():
            plain = model.encode_image(x)
            with mmeff.apply(host, reducer, layer=1) as handle:
                out = model.encode_image(x)
        assert type(out) is type(plain)
        for a, b in zip(out if isinstance(out, tuple) else (out,), plain if isinstance(plain, tuple) else (plain,)):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
        assert handle.stats == {"tokens_in": 16, "tokens_out": 16, "layer": 1}


@pytest.mark.parametrize("variant", list(CLIP_VARIANTS))
@pytest.mark.parametrize("name", list(REDUCERS))
@pytest.mark.parametrize("layer", [0, -2])
@pytest.mark.parametrize("target", ["clip", "visual"])
def test_open_clip_matches_manual_reference(clips, variant, name, layer, target):
    model = clips[variant]
    visual = model.visual
    host = model if target == "clip" else visual
    x = images(seed=6)
    reducer = REDUCERS[name]()
    counts, handles = token_counts(visual.transformer.resblocks)
    try:
        with torch.no_grad():
            ref, ref_tokens, ref_red = oc_reference(visual, x, reducer, layer)
            counts.clear()
            with mmeff.apply(host, reducer, layer=layer) as handle:
                out = visual(x) if target == "visual" else model.encode_image(x)
    finally:
        for hd in handles:
            hd.remove()
    m, li = ref_red.num_tokens, layer % DEPTH
    if visual.output_tokens:
        out, tokens = out
        assert tokens.shape == (2, m, 64)
        torch.testing.assert_close(tokens, ref_tokens, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert handle.stats == {"tokens_in": 16, "tokens_out": m, "layer": li}
    assert torch.equal(handle.last_reduction.assignment, ref_red.assignment)
    assert counts == [1 + 16] * (li + 1) + [1 + m] * (DEPTH - li - 1)


@pytest.mark.parametrize("variant", ["default", "custom"])
@pytest.mark.parametrize("layer", [0, 3])
def test_open_clip_cls_attn_scores_match_eager_attention(clips, variant, layer):
    visual = clips[variant].visual
    x = images(seed=7)
    captured: list[Tensor] = []
    h = visual.transformer.resblocks[layer].register_forward_pre_hook(lambda m, a: captured.append(a[0]))
    reducer = RecordingCLS(tokens=5)
    try:
        with torch.no_grad(), mmeff.apply(clips[variant], reducer, layer=layer) as handle:
            clips[variant].encode_image(x)
    finally:
        h.remove()
    with torch.no_grad():
        # after detach: the eager MultiheadAttention call must not trigger the adapter's pre-hook
        eager = oc_eager_cls_attention(visual.transformer.resblocks[layer], captured[-1])
    scores = reducer.seen[-1].scores
    assert scores.shape == (2, 16)
    torch.testing.assert_close(scores, eager, rtol=1e-5, atol=1e-6)
    assert torch.equal(handle.last_reduction.indices, topk_indices_sorted(eager, 5))


def test_open_clip_text_tower_untouched(clips):
    model = clips["default"]
    text = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    x = images(seed=8)
    with torch.no_grad():
        img_plain, txt_plain, _ = model(x, text)
        with mmeff.apply(model, mmeff.UniformKeep(tokens=4), layer=0) as handle:
            img, txt, _ = model(x, text)
    torch.testing.assert_close(txt, txt_plain, rtol=0, atol=0)
    assert not torch.allclose(img, img_plain)
    assert handle.stats == {"tokens_in": 16, "tokens_out": 4, "layer": 0}


def test_open_clip_sequence_first_blocks(clips):
    # releases before 2.24 ran resblocks as (L, B, D); emulate that layout on a copy
    model = make_clip()
    tr = model.visual.transformer
    tr.batch_first = False
    for blk in tr.resblocks:
        blk.attn.batch_first = False
    x = images(seed=9)
    for reducer in (mmeff.AvgPool(tokens=4), RecordingCLS(tokens=6)):
        with torch.no_grad():
            ref, _, ref_red = oc_reference(clips["default"].visual, x, reducer, 1)
            with mmeff.apply(model, reducer, layer=1) as handle:
                out = model.encode_image(x)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
        assert torch.equal(handle.last_reduction.assignment, ref_red.assignment)


def test_open_clip_timm_trunk_is_delegated():
    torch.manual_seed(0)
    vcfg = dict(timm_model_name="vit_tiny_patch16_224", timm_pool="token", timm_proj="linear", image_size=224)
    tcfg = dict(context_length=8, vocab_size=64, width=32, heads=2, layers=1)
    model = open_clip.model.CLIP(embed_dim=32, vision_cfg=vcfg, text_cfg=tcfg).eval()
    trunk = model.visual.trunk
    assert find_adapter(model) is OpenCLIPAdapter
    assert find_adapter(model.visual) is OpenCLIPAdapter
    assert find_adapter(trunk) is TimmViTAdapter
    x = images(2, 224, 224, seed=10)
    before = hook_state(model)
    reducer = mmeff.CLSAttnTopK(tokens=20)
    with torch.no_grad():
        ref, ref_red = timm_reference(trunk, x, reducer, 2)
        with mmeff.apply(model, reducer, layer=2) as handle:
            out = model.encode_image(x)
        with pytest.raises(ValueError, match="already has an mmeff method"), mmeff.apply(model, reducer):
            with mmeff.apply(trunk, reducer):
                pass
    torch.testing.assert_close(out, model.visual.head(ref), rtol=1e-5, atol=1e-5)
    assert handle.stats == {"tokens_in": 196, "tokens_out": 20, "layer": 2}
    assert torch.equal(handle.last_reduction.indices, ref_red.indices)
    assert hook_state(model) == before


def test_open_clip_detach_and_errors(clips):
    model = clips["default"]
    before = hook_state(model)
    with pytest.raises(RuntimeError, match="boom"), mmeff.apply(model, mmeff.CLSAttnTopK(tokens=3), layer=2):
        assert hook_state(model) != before
        raise RuntimeError("boom")
    assert hook_state(model) == before
    assert "_mmeff_adapter" not in model.__dict__ and "_mmeff_adapter" not in model.visual.__dict__
    with pytest.raises(ValueError, match=rf"layer=-{DEPTH + 1} is out of range"):
        mmeff.attach(model, mmeff.UniformKeep(tokens=4), layer=-DEPTH - 1)
    with mmeff.apply(model, mmeff.UniformKeep(tokens=4)):
        with pytest.raises(ValueError, match="already has an mmeff method attached"):
            mmeff.attach(model.visual, mmeff.UniformKeep(tokens=4))
    assert hook_state(model) == before

    # a ResNet image tower is not a ViT: no adapter claims it
    torch.manual_seed(0)
    rn = open_clip.model.CLIP(
        embed_dim=32,
        vision_cfg=dict(image_size=IMG, layers=(1, 1, 1, 1), width=8, head_width=8),
        text_cfg=dict(context_length=8, vocab_size=64, width=32, heads=2, layers=1),
    )
    with pytest.raises(TypeError, match="unsupported model class CLIP"):
        mmeff.attach(rn, mmeff.UniformKeep(tokens=4))
    with pytest.raises(ValueError, match="needs an open_clip model with a ViT image tower"):
        OpenCLIPAdapter(rn, mmeff.UniformKeep(tokens=4)).attach()
    with pytest.raises(ValueError, match="needs a timm VisionTransformer"):
        TimmViTAdapter(model, mmeff.UniformKeep(tokens=4)).attach()


def test_adapter_discovery(vits, clips):
    assert find_adapter(vits["cls"]) is TimmViTAdapter
    assert find_adapter(vits["reg"]) is TimmViTAdapter
    assert find_adapter(clips["default"]) is OpenCLIPAdapter
    assert find_adapter(clips["custom"].visual) is OpenCLIPAdapter
    assert not TimmViTAdapter.matches(clips["default"].visual)
    assert not OpenCLIPAdapter.matches(vits["cls"])
    assert not OpenCLIPAdapter.matches(clips["default"].transformer)  # the text stack
