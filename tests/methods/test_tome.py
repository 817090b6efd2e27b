"""ToMe token merging (mmeff.methods.tome) in timm, open_clip and HF CLIP/SigLIP ViTs and in LLaVA (tiny random models).

Every merged forward is checked against a from-scratch ToMe written here from the paper / ToMe's
``merge.py`` semantics (no mmeff merge code): keys averaged over heads as the metric, A = even / B = odd
bipartite cosine matching with protected prefix tokens, size-weighted averages, proportional attention
(``+ log(size)``), merge between the attention residual and the MLP, ``r`` clamped per block. The
reference runs the host's blocks by hand from their weights.

The row order after a merge decides the next block's A/B split, so the reference uses ToMe's
``class_token=True`` order (protected prefix, unmerged A, B; each in original order), also without a
class token (ToMe itself leaves unmerged A tokens in score order there; mmeff sorts them). Outputs are
compared in a canonical order (by the first original token each row holds) so that only the merge
groups, sizes and values matter, not where a row sits.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import open_clip
import pytest
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import ResPostBlock, VisionTransformer
from torch import Tensor, nn
from transformers import (
    CLIPVisionConfig,
    CLIPVisionModel,
    Qwen2VLForConditionalGeneration,
    SiglipVisionConfig,
    SiglipVisionModel,
)

import mmeff
from mmeff.methods.tome import parse_r
from mmeff.models import tiny as models

IMG, PATCH, DIM, HEADS, DEPTH = 48, 8, 32, 4, 4
N_PATCH = (IMG // PATCH) ** 2  # 36
ATOL = 1e-4


pytestmark = pytest.mark.usefixtures("single_thread")


def images(b: int = 3, size: int = IMG, seed: int = 0) -> Tensor:
    return torch.randn(b, 3, size, size, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------ independent ToMe


def ref_parse_r(depth: int, r: Any) -> list[int]:
    """ToMe's ``parse_r``: int, list (zero padded) or ``(r, inflection)`` linear schedule."""
    if isinstance(r, list):
        return r + [0] * (depth - len(r))
    inflect = 0.0
    if isinstance(r, tuple):
        r, inflect = r
    lo = int(r * (1.0 - inflect))
    hi = 2 * r - lo
    step = (hi - lo) / (depth - 1)
    return [int(lo + step * i) for i in range(depth)]


def ref_bipartite(metric: Tensor, r: int, protected: int, official_order: bool = False) -> Callable[[Tensor], Tensor]:
    """Bipartite soft matching (A = even, B = odd tokens); returns a sum-merge of ``(B, N, D)`` tensors.

    The first ``protected`` tokens are never merged away (A side) and never receive (B side). Output
    order (it decides the next block's A/B split): the protected tokens in their order, then the
    unmerged A tokens in their order, then B. With one protected (class) token this is ToMe's
    ``class_token=True`` order ``[sorted unmerged A, B]``. ``official_order``: as ToMe's code, which sorts
    the unmerged A tokens only with a class token and otherwise keeps them in descending score order.
    """
    m = metric / metric.norm(dim=-1, keepdim=True)
    a, b = m[:, ::2], m[:, 1::2]
    scores = a @ b.transpose(-1, -2)
    a_ids = torch.arange(a.shape[1]) * 2
    b_ids = torch.arange(b.shape[1]) * 2 + 1
    scores[:, a_ids < protected, :] = -torch.inf
    scores[:, :, b_ids < protected] = -torch.inf
    best, best_b = scores.max(dim=-1)
    ranked = best.argsort(dim=-1, descending=True)
    src, keep = ranked[:, :r], ranked[:, r:]
    if protected or not official_order:
        keep = keep.sort(dim=-1).values
    dst = best_b.gather(1, src)
    # current index of each output row; protected ones move to the front
    cur = torch.cat([2 * keep, (2 * torch.arange(b.shape[1]) + 1).expand(keep.shape[0], -1)], dim=1)
    slot = torch.arange(cur.shape[1]).expand_as(cur)
    perm = torch.where(cur < protected, cur - metric.shape[1], slot).argsort(dim=1)

    def merge(t: Tensor) -> Tensor:
        d = t.shape[-1]
        ta, tb = t[:, ::2], t[:, 1::2]
        unmerged = ta.gather(1, keep[..., None].expand(-1, -1, d))
        moved = ta.gather(1, src[..., None].expand(-1, -1, d))
        tb = tb.scatter_reduce(1, dst[..., None].expand(-1, -1, d), moved, reduce="sum")
        return torch.cat([unmerged, tb], dim=1).gather(1, perm[..., None].expand(-1, -1, d))

    return merge


@dataclass
class Parts:
    """One host block, taken apart: the reference runs these pieces by hand."""

    norm1: nn.Module
    qkv: Callable[[Tensor], tuple[Tensor, Tensor, Tensor, float]]  # normed x -> q, k, v (B, H, N, hd), scale
    proj: Callable[[Tensor], Tensor]  # (B, N, H*hd) -> (B, N, D)
    ls1: nn.Module
    norm2: nn.Module
    mlp: nn.Module
    ls2: nn.Module


def _heads(t: Tensor, heads: int) -> Tensor:
    b, n, d = t.shape
    return t.reshape(b, n, heads, d // heads).transpose(1, 2)


def timm_parts(blk: nn.Module) -> Parts:
    a = blk.attn

    def qkv(xn: Tensor):
        b, n, _ = xn.shape
        t = (
            F.linear(xn, a.qkv.weight, a.qkv.bias)
            .reshape(b, n, 3, a.num_heads, a.head_dim)
            .permute(2, 0, 3, 1, 4)
        )
        return a.q_norm(t[0]), a.k_norm(t[1]), t[2], a.head_dim**-0.5

    def proj(o: Tensor) -> Tensor:
        assert isinstance(a.norm, nn.Identity)
        return F.linear(o, a.proj.weight, a.proj.bias)

    return Parts(blk.norm1, qkv, proj, blk.ls1, blk.norm2, blk.mlp, blk.ls2)


def open_clip_parts(blk: nn.Module) -> Parts:
    a = blk.attn
    assert isinstance(a, nn.MultiheadAttention)

    def qkv(xn: Tensor):
        q, k, v = F.linear(xn, a.in_proj_weight, a.in_proj_bias).chunk(3, dim=-1)
        return _heads(q, a.num_heads), _heads(k, a.num_heads), _heads(v, a.num_heads), a.head_dim**-0.5

    return Parts(
        blk.ln_1,
        qkv,
        lambda o: F.linear(o, a.out_proj.weight, a.out_proj.bias),
        blk.ls_1,
        blk.ln_2,
        blk.mlp,
        blk.ls_2,
    )


def hf_parts(layer: nn.Module) -> Parts:
    a = layer.self_attn
    h = a.config.num_attention_heads

    def qkv(xn: Tensor):
        q, k, v = (F.linear(xn, p.weight, p.bias) for p in (a.q_proj, a.k_proj, a.v_proj))
        return _heads(q, h), _heads(k, h), _heads(v, h), (a.embed_dim // h) ** -0.5

    ident = nn.Identity()
    return Parts(
        layer.layer_norm1,
        qkv,
        lambda o: F.linear(o, a.out_proj.weight, a.out_proj.bias),
        ident,
        layer.layer_norm2,
        layer.mlp,
        ident,
    )


PARTS = {"timm": timm_parts, "open_clip": open_clip_parts, "hf": hf_parts}


def layer_scale(ls: nn.Module, x: Tensor) -> Tensor:
    if isinstance(ls, nn.Identity):
        return x
    assert type(ls).__name__ == "LayerScale"
    return x * ls.gamma


@dataclass
class RefOut:
    x: Tensor  # (B, N', D) canonical order
    size: Tensor  # (B, N', 1)
    source: Tensor  # (B, N', N) 0/1


def canonical(source: Tensor) -> Tensor:
    """Row order that sorts rows by the first original token they hold."""
    return (source > 0).float().argmax(dim=-1).argsort(dim=1)


def rows(t: Tensor, order: Tensor) -> Tensor:
    return t.gather(1, order[..., None].expand(-1, -1, t.shape[-1]))


def ref_tome(kind: str, blocks, x: Tensor, r: Any, prefix: int, prop_attn: bool = True,
             official_order: bool = False) -> RefOut:
    """From-scratch ToMe through ``blocks`` (host weights, functional attention)."""
    b, n, _ = x.shape
    size = None
    source = torch.eye(n).repeat(b, 1, 1)
    for blk, r_i in zip(blocks, ref_parse_r(len(blocks), r)):
        p = PARTS[kind](blk)
        q, k, v, scale = p.qkv(p.norm1(x))
        logits = (q @ k.transpose(-2, -1)) * scale
        if prop_attn and size is not None:
            logits = logits + size.log()[:, None, None, :, 0]
        o = (logits.softmax(dim=-1) @ v).transpose(1, 2).reshape(b, x.shape[1], -1)
        x = x + layer_scale(p.ls1, p.proj(o))
        r_i = min(r_i, (x.shape[1] - prefix) // 2)
        if r_i > 0:
            merge = ref_bipartite(k.mean(dim=1), r_i, prefix, official_order)
            size = torch.ones_like(x[..., :1]) if size is None else size
            x = merge(x * size)
            size = merge(size)
            x = x / size
            source = merge(source)
        x = x + layer_scale(p.ls2, p.mlp(p.norm2(x)))
    if size is None:
        size = torch.ones_like(x[..., :1])
    order = canonical(source)
    return RefOut(rows(x, order), rows(size, order), rows(source, order))


def expected_tokens(n: int, r: Any, depth: int, prefix: int) -> int:
    for r_i in ref_parse_r(depth, r):
        n -= max(0, min(r_i, (n - prefix) // 2))
    return n


def handle_source(h) -> Tensor:
    """``(B, N', N)`` one-hot membership from the handle's ``pos`` (independent of ``trace_source``)."""
    n_out = int(h.size.shape[1])
    return F.one_hot(h.pos, n_out).transpose(1, 2).float()


def handle_order(h) -> Tensor:
    return canonical(handle_source(h))


def hook_state(model: nn.Module) -> dict[str, tuple]:
    return {
        name: (
            tuple(m._forward_hooks),
            tuple(m._forward_pre_hooks),
            tuple(m._forward_hooks_with_kwargs),
            tuple(m._forward_pre_hooks_with_kwargs),
            tuple(k for k in m.__dict__ if k == "forward" or k.startswith("_mmeff")),
        )
        for name, m in model.named_modules()
    }


# --------------------------------------------------------------------------------------------- models


def make_vit(**kw) -> VisionTransformer:
    torch.manual_seed(0)
    args = dict(img_size=IMG, patch_size=PATCH, embed_dim=DIM, depth=DEPTH, num_heads=HEADS, num_classes=10)
    args.update(kw)
    return VisionTransformer(**args).eval()


VIT_VARIANTS = {
    "cls": dict(),
    "cls_avg": dict(global_pool="avg"),
    "reg": dict(reg_tokens=4, qk_norm=True, init_values=0.1),
    "reg_nocls": dict(class_token=False, reg_tokens=4, global_pool="avg", qk_norm=True, init_values=0.1),
    "nocls": dict(class_token=False, global_pool="avg"),
}


@pytest.fixture(scope="module")
def vits() -> dict[str, VisionTransformer]:
    return {k: make_vit(**v) for k, v in VIT_VARIANTS.items()}


def make_clip(**vision) -> nn.Module:
    torch.manual_seed(0)
    vcfg = dict(
        image_size=IMG, patch_size=PATCH, width=DIM, layers=DEPTH, head_width=DIM // HEADS, mlp_ratio=2.0
    )
    vcfg.update(vision)
    tcfg = dict(context_length=8, vocab_size=64, width=16, heads=2, layers=1)
    return open_clip.model.CLIP(embed_dim=16, vision_cfg=vcfg, text_cfg=tcfg).eval()


@pytest.fixture(scope="module")
def clips() -> dict[str, nn.Module]:
    return {
        "tok": make_clip(ls_init_value=0.1),
        "avg": make_clip(pool_type="avg", output_tokens=True),
    }


def make_hf(kind: str = "clip", attn: str = "sdpa") -> nn.Module:
    torch.manual_seed(0)
    cfg = dict(
        image_size=IMG,
        patch_size=PATCH,
        hidden_size=DIM,
        intermediate_size=37,
        num_hidden_layers=3,
        num_attention_heads=HEADS,
    )
    if kind == "clip":
        return CLIPVisionModel._from_config(CLIPVisionConfig(**cfg), attn_implementation=attn).eval()
    return SiglipVisionModel._from_config(SiglipVisionConfig(**cfg), attn_implementation=attn).eval()


@pytest.fixture(scope="module")
def hfs() -> dict[str, nn.Module]:
    return {f"{k}-{a}": make_hf(k, a) for k in ("clip", "siglip") for a in ("sdpa", "eager")}


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
    return models.build_tiny("llava", tmp_path_factory.mktemp("llava_tome"), seed=0)


SCHEDULES = {"int": 4, "list": [6, 2, 9, 30], "ramp": (5, 0.5), "ramp_neg": (4, -1.0)}


# ------------------------------------------------------------------------ 1. reference comparisons


def test_parse_r_matches_tome():
    for r in (0, 3, [1, 2], [5, 0, 7, 1], (5, 0.5), (4, -1.0), (8, 1.0), (3, 0.0)):
        assert parse_r(4, r) == ref_parse_r(4, list(r) if isinstance(r, list) else r), r
    assert parse_r(4, (5, 0.5)) == [2, 4, 6, 8] and parse_r(4, (4, -1.0)) == [8, 5, 2, 0]
    for bad in ((4, 2.0), [1, 2, 3, 4, 5], -1, [1, -2]):
        with pytest.raises(ValueError):
            parse_r(4, bad)
    with pytest.raises(TypeError):
        parse_r(4, True)


@pytest.mark.parametrize("variant", list(VIT_VARIANTS))
@pytest.mark.parametrize("sched", list(SCHEDULES))
def test_timm_matches_reference(vits, variant, sched):
    vit, x, r = vits[variant], images(seed=1), SCHEDULES[sched]
    p = vit.num_prefix_tokens
    with torch.no_grad():
        h0 = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(x))))
        ref = ref_tome("timm", vit.blocks, h0, r, p)
        ref_feats = vit.norm(ref.x)
        ref_logits = vit.forward_head(ref_feats)
        plain = vit(x)
        with mmeff.apply(vit, mmeff.ToMe(r=r)) as h:
            logits = vit(x)
            stats, size, order, src = dict(h.stats), h.size, handle_order(h), handle_source(h)
            feats = vit.forward_features(x)
    n_out = expected_tokens(N_PATCH + p, r, DEPTH, p)
    assert stats == {"tokens_in": N_PATCH + p, "tokens_out": n_out, "r": ref_parse_r(DEPTH, r)}
    assert feats.shape == (3, n_out, DIM) and ref.x.shape == feats.shape
    # identical merge decisions: the same groups of original tokens, the same sizes
    assert torch.equal(rows(src, order), ref.source)
    assert torch.equal(rows(size, order), ref.size)
    torch.testing.assert_close(rows(feats, order), ref_feats, atol=ATOL, rtol=ATOL)
    torch.testing.assert_close(logits, ref_logits, atol=ATOL, rtol=ATOL)
    assert not torch.allclose(logits, plain, atol=1e-3)  # merging did change the result
    if p:  # the protected prefix is first, in order, and alone
        assert torch.equal(h.pos[:, :p], torch.arange(p).expand(3, p))
        assert bool((size[:, :p] == 1).all())


@pytest.mark.parametrize("prop_attn", [True, False])
def test_timm_prop_attn_flag_matches_reference(vits, prop_attn):
    vit, x, r = vits["reg"], images(seed=2), [8, 6, 4, 2]
    with torch.no_grad():
        h0 = vit.norm_pre(vit._pos_embed(vit.patch_embed(x)))
        ref = ref_tome("timm", vit.blocks, h0, r, 5, prop_attn=prop_attn)
        with mmeff.apply(vit, mmeff.ToMe(r=r, prop_attn=prop_attn)) as h:
            feats = vit.forward_features(x)
            order = handle_order(h)
    assert torch.equal(rows(handle_source(h), order), ref.source)
    torch.testing.assert_close(rows(feats, order), vit.norm(ref.x), atol=ATOL, rtol=ATOL)


def _oc_reference(visual: nn.Module, x: Tensor, r: Any) -> tuple[Any, RefOut]:
    h0 = visual._embeds(x)
    ref = ref_tome("open_clip", visual.transformer.resblocks, h0, r, 1)
    pooled, tokens = visual._pool(ref.x)
    pooled = pooled @ visual.proj
    return (pooled, tokens) if visual.output_tokens else pooled, ref


@pytest.mark.parametrize("variant", ["tok", "avg"])
@pytest.mark.parametrize("sched", ["int", "list", "ramp"])
@pytest.mark.parametrize("target", ["clip", "visual"])
def test_open_clip_matches_reference(clips, variant, sched, target):
    model, x, r = clips[variant], images(seed=3), SCHEDULES[sched]
    visual = model.visual
    grabbed: list[Tensor] = []
    hook = visual.transformer.register_forward_hook(lambda m, a, out: grabbed.append(out))
    try:
        with torch.no_grad():
            ref_out, ref = _oc_reference(visual, x, r)
            with mmeff.apply(model if target == "clip" else visual, mmeff.ToMe(r=r)) as h:
                out = model.encode_image(x) if target == "clip" else visual(x)
                order = handle_order(h)
    finally:
        hook.remove()
    n_out = expected_tokens(N_PATCH + 1, r, DEPTH, 1)
    assert h.stats["tokens_out"] == n_out and grabbed[-1].shape == (3, n_out, DIM)
    assert torch.equal(rows(handle_source(h), order), ref.source)
    assert torch.equal(rows(h.size, order), ref.size)
    torch.testing.assert_close(rows(grabbed[-1], order), ref.x, atol=ATOL, rtol=ATOL)
    if variant == "avg":
        pooled, tokens = out
        torch.testing.assert_close(pooled, ref_out[0], atol=ATOL, rtol=ATOL)
        # patch tokens: same multiset of rows (canonical order without the class token)
        torch.testing.assert_close(rows(tokens, order[:, 1:] - 1), ref_out[1], atol=ATOL, rtol=ATOL)
    else:
        torch.testing.assert_close(out, ref_out, atol=ATOL, rtol=ATOL)


def _hf_reference(model: nn.Module, x: Tensor, r: Any, prefix: int, official_order: bool = False
                  ) -> tuple[RefOut, Tensor, Tensor | None]:
    h0 = model.embeddings(x)
    if hasattr(model, "pre_layrnorm"):  # CLIP
        ref = ref_tome("hf", model.encoder.layers, model.pre_layrnorm(h0), r, prefix, official_order=official_order)
        return ref, ref.x, model.post_layernorm(ref.x[:, 0])
    # SigLIP: post norm, attention-pool head
    ref = ref_tome("hf", model.encoder.layers, h0, r, prefix, official_order=official_order)
    last = model.post_layernorm(ref.x)
    return ref, last, model.head(last)


@pytest.mark.parametrize("name", ["clip-sdpa", "clip-eager", "siglip-sdpa", "siglip-eager"])
@pytest.mark.parametrize("sched", ["int", "list", "ramp"])
def test_hf_matches_reference(hfs, name, sched):
    model, x = hfs[name], images(seed=4)
    r = {"int": 5, "list": [9, 30, 4], "ramp": (6, -0.5)}[sched]
    prefix = 1 if name.startswith("clip") else 0
    with torch.no_grad():
        ref, ref_last, ref_pool = _hf_reference(model, x, r, prefix)
        with mmeff.apply(model, mmeff.ToMe(r=r, unmerge=False)) as h:
            out = model(pixel_values=x)
            order = handle_order(h)
    n0 = N_PATCH + prefix
    n_out = expected_tokens(n0, r, 3, prefix)
    assert h.stats == {"tokens_in": n0, "tokens_out": n_out, "r": ref_parse_r(3, r)}
    assert out.last_hidden_state.shape == (3, n_out, DIM)
    assert torch.equal(rows(handle_source(h), order), ref.source)
    assert torch.equal(rows(h.size, order), ref.size)
    torch.testing.assert_close(rows(out.last_hidden_state, order), ref_last, atol=ATOL, rtol=ATOL)
    torch.testing.assert_close(out.pooler_output, ref_pool, atol=ATOL, rtol=ATOL)


@pytest.mark.parametrize("name", ["clip-sdpa", "siglip-sdpa", "siglip-eager"])
def test_faithful_order_matches_the_official(hfs, name):
    """faithful=True keeps the official token order on class-token-free towers (the unmerged tokens in score
    order), which changes the later blocks' pairing; with a class token both orders are the same."""
    model, x = hfs[name], images(seed=5)
    r, prefix = [8, 6, 4], 1 if name.startswith("clip") else 0
    with torch.no_grad():
        ref, ref_last, ref_pool = _hf_reference(model, x, r, prefix, official_order=True)
        _, _, ours_pool = _hf_reference(model, x, r, prefix)
        with mmeff.apply(model, mmeff.ToMe(r=r, unmerge=False, faithful=True)) as h:
            out = model(pixel_values=x)
            order = handle_order(h)
    assert torch.equal(rows(handle_source(h), order), ref.source)
    torch.testing.assert_close(rows(out.last_hidden_state, order), ref_last, atol=ATOL, rtol=ATOL)
    torch.testing.assert_close(out.pooler_output, ref_pool, atol=ATOL, rtol=ATOL)
    gap = (ours_pool - ref_pool).abs().max().item()
    assert gap > 1e-3 if prefix == 0 else gap == 0.0  # the option matters exactly where the official differs
    assert "faithful=True" in mmeff.ToMe(faithful=True).describe()


# ------------------------------------------------------------------- 2. r = 0 and unpatch are exact


def _hosts(vits, clips, hfs) -> dict[str, tuple[nn.Module, Callable[[nn.Module, Tensor], Tensor], list]]:
    return {
        "timm": (vits["reg"], lambda m, x: m(x), list(vits["reg"].blocks)),
        "open_clip": (
            clips["tok"],
            lambda m, x: m.encode_image(x),
            list(clips["tok"].visual.transformer.resblocks),
        ),
        "hf": (
            hfs["clip-sdpa"],
            lambda m, x: m(pixel_values=x).last_hidden_state,
            list(hfs["clip-sdpa"].encoder.layers),
        ),
    }


@pytest.mark.parametrize("host", ["timm", "open_clip", "hf"])
def test_r0_and_unpatch_are_bit_identical(vits, clips, hfs, host):
    model, run, blocks = _hosts(vits, clips, hfs)[host]
    x = images(seed=5)
    before = hook_state(model)
    with torch.no_grad():
        plain = run(model, x)
        h = mmeff.tome.patch(model, r=0)
        assert all("forward" in b.__dict__ for b in blocks)
        assert hook_state(model) != before
        assert torch.equal(run(model, x), plain)
        assert h.stats["tokens_out"] == h.stats["tokens_in"]
        with pytest.raises(ValueError, match="already attached"):
            mmeff.tome.patch(model, r=2)
        assert mmeff.tome.unpatch(model) is True
        assert mmeff.tome.unpatch(model) is False
        assert hook_state(model) == before
        assert all("forward" not in b.__dict__ for b in blocks)
        assert "_mmeff_tome_adapter" not in model.__dict__
        assert torch.equal(run(model, x), plain)
        # a merging patch removed through mmeff.unpatch (the generic one) restores the model too
        mmeff.tome.patch(model, r=[3, 3])
        assert not torch.equal(run(model, x), plain)
        assert mmeff.unpatch(model) is True
        assert hook_state(model) == before
        assert torch.equal(run(model, x), plain)
        with mmeff.apply(model, mmeff.ToMe(r=3, trace_source=True)):
            run(model, x)
        assert hook_state(model) == before
        assert torch.equal(run(model, x), plain)


# ------------------------------------------------------------------------------ 3. bookkeeping


@pytest.mark.parametrize("variant", ["cls", "reg", "reg_nocls", "nocls"])
@pytest.mark.parametrize("sched", list(SCHEDULES))
def test_size_pos_source_bookkeeping(vits, variant, sched):
    vit, x, r = vits[variant], images(seed=6), SCHEDULES[sched]
    p, n = vit.num_prefix_tokens, N_PATCH + vit.num_prefix_tokens
    h = mmeff.tome.patch(vit, r=r, trace_source=True)
    try:
        with torch.no_grad():
            vit(x)
    finally:
        mmeff.tome.unpatch(vit)
    n_out = expected_tokens(n, r, DEPTH, p)
    assert h.stats["tokens_out"] == n_out and h.stats["tokens_in"] == n
    assert h.size.shape == (3, n_out, 1) and h.pos.shape == (3, n) and h.pos.dtype == torch.long
    assert torch.equal(h.size.sum(1), torch.full((3, 1), float(n)))
    assert int(h.pos.min()) >= 0 and int(h.pos.max()) < n_out
    assert torch.equal(h.pos[:, :p], torch.arange(p).expand(3, p))
    # every output row holds >= 1 original token and its size is its member count
    counts = torch.stack([torch.bincount(row, minlength=n_out) for row in h.pos])
    assert bool((counts > 0).all())
    assert torch.equal(counts.float(), h.size[..., 0])
    src = h.source
    assert src.shape == (3, n_out, n)
    assert bool(((src == 0) | (src == 1)).all())
    assert torch.equal(src.sum(1), torch.ones(3, n))
    assert torch.equal(src.sum(-1, keepdim=True), h.size)
    assert torch.equal(src, handle_source(h))
    # unmerge maps every original token to its row
    y = torch.randn(3, n_out, 5)
    torch.testing.assert_close(h.unmerge(y), src.transpose(1, 2) @ y)
    with pytest.raises(ValueError):
        h.unmerge(torch.randn(3, n_out + 1, 5))


# -------------------------------------------------------------------------------------- 4. unmerge


def test_timm_unmerge_keeps_full_grid(vits):
    vit, x, r = vits["reg"], images(seed=7), [5, 7, 3, 9]
    n = N_PATCH + 5
    with torch.no_grad():
        with mmeff.apply(vit, mmeff.ToMe(r=r)) as h_m:
            feats_m = vit.forward_features(x)
            logits_m = vit(x)
        with mmeff.apply(vit, mmeff.ToMe(r=r, unmerge=True)) as h_u:
            counts: list[int] = []
            hooks = [
                b.register_forward_hook(lambda m, a, out: counts.append(out.shape[1])) for b in vit.blocks
            ]
            try:
                feats_u = vit.forward_features(x)
            finally:
                for hd in hooks:
                    hd.remove()
            logits_u = vit(x)
    assert feats_u.shape == (3, n, DIM) and counts == [n] * DEPTH
    assert h_u.stats == h_m.stats
    assert torch.equal(h_u.pos, h_m.pos) and torch.equal(h_u.size, h_m.size)
    torch.testing.assert_close(feats_u, h_m.unmerge(feats_m), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits_u, logits_m, atol=1e-5, rtol=1e-5)


def test_open_clip_unmerge_keeps_full_grid(clips):
    model, x, r = clips["avg"], images(seed=8), 5
    with torch.no_grad():
        with mmeff.apply(model, mmeff.ToMe(r=r)) as h_m:
            _, tok_m = model.visual(x)
        with mmeff.apply(model, mmeff.ToMe(r=r, unmerge=True)):
            _, tok_u = model.visual(x)
    cls = torch.zeros(3, 1, tok_m.shape[-1])
    assert tok_u.shape == (3, N_PATCH, tok_m.shape[-1])
    torch.testing.assert_close(tok_u, h_m.unmerge(torch.cat([cls, tok_m], 1))[:, 1:], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["clip-sdpa", "siglip-eager"])
def test_hf_unmerge_hidden_states(hfs, name):
    model, x, r = hfs[name], images(seed=9), [6, 4, 30]
    with torch.no_grad():
        with mmeff.apply(model, mmeff.ToMe(r=r, unmerge=False)) as h_m:
            out_m = model(pixel_values=x, output_hidden_states=True)
        with mmeff.apply(model, mmeff.ToMe(r=r)) as h_u:  # HF default: unmerge
            out_u = model(pixel_values=x, output_hidden_states=True)
    n = N_PATCH + int(name.startswith("clip"))
    assert out_u.last_hidden_state.shape == (3, n, DIM)
    assert [t.shape[1] for t in out_u.hidden_states] == [n] * 4
    assert [t.shape[1] for t in out_m.hidden_states][-1] == h_m.stats["tokens_out"] < n
    assert torch.equal(h_u.pos, h_m.pos)
    torch.testing.assert_close(
        out_u.hidden_states[-1], h_m.unmerge(out_m.hidden_states[-1]), atol=1e-5, rtol=1e-5
    )
    if name.startswith("clip"):
        torch.testing.assert_close(
            out_u.last_hidden_state, h_m.unmerge(out_m.last_hidden_state), atol=1e-5, rtol=1e-5
        )
        torch.testing.assert_close(out_u.pooler_output, out_m.pooler_output, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------- 5. batch invariance


@pytest.mark.parametrize("host", ["timm", "open_clip", "hf"])
def test_batch_equals_rows_alone(vits, clips, hfs, host):
    model, run, _ = _hosts(vits, clips, hfs)[host]
    x, r = images(seed=10), [7, 5, 3]
    with torch.no_grad(), mmeff.apply(model, mmeff.ToMe(r=r, unmerge=False)) as h:
        full = run(model, x)
        pos, size = h.pos, h.size
        for i in range(3):
            one = run(model, x[i : i + 1])
            torch.testing.assert_close(one, full[i : i + 1], atol=1e-5, rtol=1e-5)
            assert torch.equal(h.pos, pos[i : i + 1]) and torch.equal(h.size, size[i : i + 1])
    assert not torch.equal(pos[0], pos[1])  # the rows really merged differently


# --------------------------------------------------------------------------------- 6. prop_attn


def test_timm_eager_equals_fused_and_prop_attn_matters(vits):
    vit, x, r = vits["reg"], images(seed=11), [8, 6, 4, 2]
    with torch.no_grad():
        with mmeff.apply(vit, mmeff.ToMe(r=r)):
            fused = vit(x)
        with mmeff.apply(vit, mmeff.ToMe(r=r, prop_attn=False)):
            no_prop = vit(x)
        try:
            for b in vit.blocks:
                b.attn.fused_attn = False
            with mmeff.apply(vit, mmeff.ToMe(r=r)):
                eager = vit(x)
        finally:
            for b in vit.blocks:
                b.attn.fused_attn = True
    torch.testing.assert_close(eager, fused, atol=1e-5, rtol=1e-5)
    assert (no_prop - fused).abs().max() > 1e-4


# ----------------------------------------------------------------------------------------- 7. VLMs


def test_llava_runs_with_full_image_features(llava):
    inputs = models.llava_inputs(llava.config, batch=2, seed=1)
    pv = inputs["pixel_values"]
    inner = llava.model
    tower = inner.vision_tower
    with torch.no_grad():
        plain_feats = torch.stack(list(inner.get_image_features(pixel_values=pv).pooler_output))
        plain_logits = llava(**inputs).logits
        with mmeff.apply(llava, mmeff.ToMe(r=4)) as h:
            feats = torch.stack(list(inner.get_image_features(pixel_values=pv).pooler_output))
            logits = llava(**inputs).logits
            gen = llava.generate(**inputs, max_new_tokens=3, do_sample=False)
        # reference: the vision_feature_layer=-2 hidden state is the first layer's (un-merged) output
        h0 = tower.pre_layrnorm(tower.embeddings(pv))
        ref = ref_tome("hf", tower.encoder.layers[:1], h0, [4], 1)
        full = ref.source.transpose(1, 2) @ ref.x  # every original token gets its row's value
        ref_feats = inner.multi_modal_projector(full[:, 1:])
    assert feats.shape == plain_feats.shape == (2, 64, 32)
    assert logits.shape == plain_logits.shape and gen.shape[1] == inputs["input_ids"].shape[1] + 3
    assert h.stats == {"tokens_in": 65, "tokens_out": 57, "r": [4, 4]}
    torch.testing.assert_close(feats, ref_feats, atol=ATOL, rtol=ATOL)
    assert [torch.unique(f, dim=0).shape[0] for f in feats] == [60, 60]  # 4 merged pairs -> copies
    assert not torch.allclose(logits, plain_logits)
    with torch.no_grad():  # detached: the plain model is back
        torch.testing.assert_close(llava(**inputs).logits, plain_logits, atol=0, rtol=0)


def test_vlm_and_host_refusals(llava, vits):
    with pytest.raises(ValueError, match="unmerge"):
        with mmeff.apply(llava, mmeff.ToMe(r=4, unmerge=False)):
            pass
    torch.manual_seed(0)
    qwen = Qwen2VLForConditionalGeneration(models.tiny_qwen2_vl_config()).eval()
    with pytest.raises(TypeError, match="Qwen2VLForConditionalGeneration.*PatchMerger"):
        mmeff.apply(qwen, mmeff.ToMe(r=4)).__enter__()
    with pytest.raises(TypeError, match="ToMe does not support"):
        mmeff.tome.patch(nn.Linear(2, 2))
    post = make_vit(block_fn=ResPostBlock, depth=2)
    before = hook_state(post)
    with pytest.raises(TypeError, match="ResPostBlock"):
        mmeff.tome.patch(post, r=2)
    assert hook_state(post) == before
    custom = make_clip(qk_norm=True, layers=2)  # CustomResidualAttentionBlock
    with pytest.raises(TypeError):
        mmeff.tome.patch(custom, r=2)
    vit = vits["cls"]
    before = hook_state(vit)
    with pytest.raises(ValueError, match="reducer"):
        with mmeff.apply(vit, mmeff.ToMe(r=2), mmeff.AvgPool(tokens=4)):
            pass
    assert hook_state(vit) == before
    with pytest.raises(ValueError, match="one ToMe"):
        mmeff.apply(vit, mmeff.ToMe(r=2), mmeff.ToMe(r=3)).__enter__()
    with pytest.raises(TypeError):
        mmeff.apply(vit, mmeff.ToMe(r=2), layer=1).__enter__()
    assert hook_state(vit) == before


def test_gradient_checkpointing_in_training_is_refused():
    vit, x = make_vit(depth=2), images(b=2, seed=12)
    with torch.no_grad(), mmeff.apply(vit, mmeff.ToMe(r=2)):
        expected = vit(x)
    vit.set_grad_checkpointing(True)
    vit.train()
    with mmeff.apply(vit, mmeff.ToMe(r=2)):
        with pytest.raises(ValueError, match="checkpointing"):
            vit(x)
    # timm checkpoints its blocks in eval mode too: a backward would recompute merged blocks
    vit.eval()
    with mmeff.apply(vit, mmeff.ToMe(r=2)):
        with pytest.raises(ValueError, match="checkpointing"):
            vit(x)
        with torch.no_grad():  # nothing is recomputed without autograd
            torch.testing.assert_close(vit(x), expected, atol=0, rtol=0)
    hf = make_hf("clip")
    enable = getattr(hf, "activation_checkpointing_enable", None) or hf.gradient_checkpointing_enable
    enable()
    hf.train()
    with mmeff.apply(hf, mmeff.ToMe(r=2)):
        with pytest.raises(ValueError, match="checkpointing"):
            hf(pixel_values=x)
    clip = make_clip(layers=2)
    clip.set_grad_checkpointing(True)
    for train in (True, False):
        clip.train(train)
        with mmeff.apply(clip, mmeff.ToMe(r=2)):
            with pytest.raises(ValueError, match="checkpointing"):
                clip.encode_image(x)


# -------------------------------------------------------------------------------------- 8. grads


def test_gradients_flow_and_match_reference():
    vit = make_vit(reg_tokens=2, qk_norm=True, init_values=0.1).train()
    x, r = images(b=2, seed=13), [6, 5, 4, 3]
    w = torch.randn(2, 10, generator=torch.Generator().manual_seed(0))
    params = dict(vit.named_parameters())
    with mmeff.apply(vit, mmeff.ToMe(r=r)) as h:
        (vit(x) * w).sum().backward()
    assert h.stats["tokens_out"] == N_PATCH + 3 - 18
    grads = {k: p.grad.clone() for k, p in params.items()}
    vit.zero_grad()
    h0 = vit.norm_pre(vit._pos_embed(vit.patch_embed(x)))
    ref = ref_tome("timm", vit.blocks, h0, r, 3)
    (vit.forward_head(vit.norm(ref.x)) * w).sum().backward()
    for k, p in params.items():
        assert torch.isfinite(grads[k]).all(), k
        torch.testing.assert_close(grads[k], p.grad, atol=1e-5, rtol=1e-4, msg=k)
    assert grads["blocks.0.attn.qkv.weight"].abs().sum() > 0 and grads["cls_token"].abs().sum() > 0
