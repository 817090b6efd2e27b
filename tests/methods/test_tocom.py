"""ToCom token compensator (mmeff.methods.tocom) on tiny random timm, HF CLIP and open_clip ViTs.

Checked against hand-written references: the mask ``1[last t chunks] - 1[last s chunks]``, the model
arithmetic ``ΔW(s→t) = Σ_{i=s}^{t-1} P_i`` built from the raw chunk weights, the q/v projections
``x @ (W + s·B diag(m) A)^T`` of one block, and ``τ²·KL(p_teacher ‖ p_student)``. The plug-in (hooks, or
folded weights on open_clip) must equal a copy with the delta merged into its weights, never touch the
keys (ToMe's merge metric), and leave the model bit-identical when removed. Training must leave the
backbone alone, resume exactly, and lower the KD gap between ToMe degrees.

Every ToCom here gets random non-zero ``up`` weights (``B`` is zero-initialised, which would make most
checks vacuous), and each check that the delta is applied also asserts that it changes the output.
"""

from __future__ import annotations

import copy
import math
import random

import open_clip
import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn
from transformers import CLIPVisionConfig, CLIPVisionModel

import mmeff
from mmeff.methods.tocom import ToCom, kd_loss
from mmeff.train.tocom import Batches, train_tocom

IMG, PATCH, DIM, HEADS, DEPTH = 32, 8, 32, 4, 2  # 16 patches + class token
STEPS, STEP_RANK = 4, 2
HOSTS = ["timm", "hf", "open_clip"]


pytestmark = pytest.mark.usefixtures("single_thread")


def images(b: int = 3, seed: int = 0) -> Tensor:
    return torch.randn(b, 3, IMG, IMG, generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------------------------- models


def make_vit(seed: int = 0, **kw) -> VisionTransformer:
    torch.manual_seed(seed)
    args = dict(img_size=IMG, patch_size=PATCH, embed_dim=DIM, depth=DEPTH, num_heads=HEADS, num_classes=10)
    args.update(kw)
    return VisionTransformer(**args).eval()


def make_hf(seed: int = 0, **kw) -> CLIPVisionModel:
    torch.manual_seed(seed)
    cfg = dict(
        image_size=IMG,
        patch_size=PATCH,
        hidden_size=DIM,
        intermediate_size=37,
        num_hidden_layers=DEPTH,
        num_attention_heads=HEADS,
    )
    cfg.update(kw)
    return CLIPVisionModel._from_config(CLIPVisionConfig(**cfg), attn_implementation="sdpa").eval()


def make_clip(seed: int = 0, **vision) -> nn.Module:
    torch.manual_seed(seed)
    vcfg = dict(
        image_size=IMG, patch_size=PATCH, width=DIM, layers=DEPTH, head_width=DIM // HEADS, mlp_ratio=2.0
    )
    vcfg.update(vision)
    tcfg = dict(context_length=8, vocab_size=64, width=16, heads=2, layers=1)
    return open_clip.model.CLIP(embed_dim=16, vision_cfg=vcfg, text_cfg=tcfg).eval()


def hf_layers(model: CLIPVisionModel) -> nn.ModuleList:
    return (getattr(model, "vision_model", None) or model).encoder.layers  # transformers 4 / 5


def hf_prefix(model: CLIPVisionModel) -> str:
    return "vision_model.encoder.layers" if hasattr(model, "vision_model") else "encoder.layers"


MAKE = {"timm": make_vit, "hf": make_hf, "open_clip": make_clip}


def run(model: nn.Module, x: Tensor) -> Tensor:
    with torch.no_grad():
        if isinstance(model, CLIPVisionModel):
            out = model(pixel_values=x)
            return torch.cat([out.last_hidden_state.flatten(1), out.pooler_output], dim=1)
        if isinstance(model, VisionTransformer):
            return model(x)
        return model.encode_image(x)


def make_tocom(model: nn.Module, std: float = 0.05, scale: float = 1.0, seed: int = 0) -> ToCom:
    torch.manual_seed(seed)
    tocom = ToCom.for_model(model, steps=STEPS, step_rank=STEP_RANK, scale=scale)
    for d in [*tocom.q, *tocom.v]:
        nn.init.normal_(d.up.weight, std=std)
    return tocom.eval()


def hook_state(model: nn.Module) -> dict[str, tuple]:
    return {
        name: (
            tuple(m._forward_hooks),
            tuple(m._forward_pre_hooks),
            tuple(k for k in m.__dict__ if k == "forward" or k.startswith("_mmeff")),
        )
        for name, m in model.named_modules()
    }


def snapshot(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_state_equal(model: nn.Module, ref: dict[str, Tensor], atol: float = 0.0) -> None:
    now = model.state_dict()
    assert now.keys() == ref.keys()
    for k, v in ref.items():
        if atol == 0.0:
            assert torch.equal(now[k], v), k
        else:
            torch.testing.assert_close(now[k], v, atol=atol, rtol=0, msg=k)


def differs(a: Tensor, b: Tensor, by: float = 1e-3) -> bool:
    return (a - b).abs().max().item() > by


# ------------------------------------------------------------------------------------ 1. arithmetic


def test_mask_values():
    tc = ToCom(dim=8, depth=1, steps=STEPS, step_rank=STEP_RANK)
    expected = {  # rank 8 = 4 chunks of 2; chunk i (from the end) holds the step i -> i+1
        (0, 1): [0, 0, 0, 0, 0, 0, 1, 1],
        (0, 4): [1, 1, 1, 1, 1, 1, 1, 1],
        (1, 3): [0, 0, 1, 1, 1, 1, 0, 0],
        (3, 1): [0, 0, -1, -1, -1, -1, 0, 0],
        (2, 2): [0] * 8,
        (4, 0): [-1] * 8,
        (3, 4): [1, 1, 0, 0, 0, 0, 0, 0],
        (0, 0): [0] * 8,
    }
    for (s, t), m in expected.items():
        got = tc.mask(s, t)
        assert got.dtype == torch.float32 and got.shape == (8,)
        assert got.tolist() == [float(v) for v in m], (s, t)
    # another shape: steps=3 x step_rank=1
    assert ToCom(dim=4, depth=1, steps=3, step_rank=1).mask(0, 2).tolist() == [0.0, 1.0, 1.0]


@pytest.mark.parametrize("bad", [-1, STEPS + 1, 1.0, 1.5, True, "2", None])
def test_mask_rejects_bad_degrees(bad):
    tc = ToCom(dim=8, depth=1, steps=STEPS, step_rank=STEP_RANK)
    with pytest.raises(ValueError, match="source degree"):
        tc.mask(bad, 1)
    with pytest.raises(ValueError, match="target degree"):
        tc.mask(1, bad)


def test_constructor_and_which_validation():
    with pytest.raises(ValueError, match="positive"):
        ToCom(dim=8, depth=1, steps=0)
    tc = ToCom(dim=8, depth=1, steps=STEPS, step_rank=STEP_RANK)
    assert tc.rank == 8 and tc.q[0].down.weight.shape == (8, 8) and tc.v[0].up.weight.shape == (8, 8)
    assert torch.count_nonzero(tc.q[0].up.weight) == 0  # B starts at zero: a fresh plug-in is a no-op
    with pytest.raises(ValueError, match="never touches k"):
        tc.delta(0, "k", 0, 1)


def test_delta_model_arithmetic():
    torch.manual_seed(0)
    tc = ToCom(dim=6, depth=2, steps=STEPS, step_rank=STEP_RANK, scale=0.7)
    for d in [*tc.q, *tc.v]:
        nn.init.normal_(d.up.weight, std=0.5)
    rank, zero = tc.rank, torch.zeros(6, 6)
    for layer in range(2):
        for which, deltas in (("q", tc.q), ("v", tc.v)):
            a, b = deltas[layer].down.weight, deltas[layer].up.weight

            def step(i: int, a: Tensor = a, b: Tensor = b) -> Tensor:  # P_{i -> i+1}: chunk i from the end
                cols = slice(rank - STEP_RANK * (i + 1), rank - STEP_RANK * i)
                return 0.7 * b[:, cols] @ a[cols]

            for i in range(STEPS):
                assert step(i).abs().max() > 1e-3
                torch.testing.assert_close(tc.delta(layer, which, i, i + 1), step(i), atol=1e-6, rtol=0)
            for s in range(STEPS + 1):
                assert torch.equal(tc.delta(layer, which, s, s), zero)
                for t in range(STEPS + 1):
                    d_st = tc.delta(layer, which, s, t)
                    torch.testing.assert_close(d_st + tc.delta(layer, which, t, s), zero, atol=1e-6, rtol=0)
                    ref = sum((step(i) for i in range(min(s, t), max(s, t))), zero)
                    torch.testing.assert_close(d_st, ref if t >= s else -ref, atol=1e-6, rtol=0)
                    for u in range(STEPS + 1):
                        torch.testing.assert_close(
                            d_st + tc.delta(layer, which, t, u),
                            tc.delta(layer, which, s, u),
                            atol=1e-6,
                            rtol=0,
                        )
            # the scale knob is linear
            torch.testing.assert_close(
                tc.delta(layer, which, 0, 3, scale=1.4), 2 * tc.delta(layer, which, 0, 3)
            )
    # q and v have their own weights
    assert differs(tc.delta(0, "q", 0, 4), tc.delta(0, "v", 0, 4))


def test_keys_never_touched_timm_hf():
    x = torch.randn(2, 17, DIM)
    vit = make_vit()
    qkv = vit.blocks[0].attn.qkv
    with torch.no_grad():
        plain = qkv(x)
        with make_tocom(vit).compensate(vit, source=0, target=3):
            comp = qkv(x)
    assert torch.equal(comp[..., DIM : 2 * DIM], plain[..., DIM : 2 * DIM])  # k rows bit-identical
    assert differs(comp[..., :DIM], plain[..., :DIM]) and differs(comp[..., 2 * DIM :], plain[..., 2 * DIM :])

    hf = make_hf()
    attn = hf_layers(hf)[0].self_attn
    with torch.no_grad():
        plain = [p(x) for p in (attn.q_proj, attn.k_proj, attn.v_proj)]
        k_hooks = dict(attn.k_proj._forward_hooks)
        with make_tocom(hf).compensate(hf, source=0, target=3):
            assert dict(attn.k_proj._forward_hooks) == k_hooks
            comp = [p(x) for p in (attn.q_proj, attn.k_proj, attn.v_proj)]
    assert torch.equal(comp[1], plain[1])
    assert differs(comp[0], plain[0]) and differs(comp[2], plain[2])


def test_keys_never_touched_open_clip():
    clip = make_clip()
    mha = clip.visual.transformer.resblocks[1].attn
    w0 = mha.in_proj_weight.detach().clone()
    with make_tocom(clip).compensate(clip, source=0, target=3):
        w = mha.in_proj_weight.detach()
        assert torch.equal(w[DIM : 2 * DIM], w0[DIM : 2 * DIM])
        assert differs(w[:DIM], w0[:DIM]) and differs(w[2 * DIM :], w0[2 * DIM :])
    assert torch.equal(mha.in_proj_weight, w0)


def test_tome_merge_decisions_unchanged():
    """Block 0 merges on keys of the (unchanged) input: the same pos with ToCom, different if k moved."""
    vit, x = make_vit(), images(4, seed=1)
    tocom = make_tocom(vit, std=0.2)
    h = mmeff.tome.patch(vit, r=[4, 0])  # only block 0 merges: pos = its decisions
    try:
        plain_out = run(vit, x)
        pos = h.pos.clone()
        with tocom.compensate(vit, source=0, target=4):
            comp_out = run(vit, x)
            assert torch.equal(h.pos, pos)
        assert differs(comp_out, plain_out)
        # the check can fail: the same kind of delta put on the key rows changes the decisions
        qkv = vit.blocks[0].attn.qkv
        with torch.no_grad():
            qkv.weight[DIM : 2 * DIM] += tocom.delta(0, "q", 0, 4) * 4
            run(vit, x)
            qkv.weight[DIM : 2 * DIM] -= tocom.delta(0, "q", 0, 4) * 4
        assert not torch.equal(h.pos, pos)
    finally:
        mmeff.tome.unpatch(vit)


# ----------------------------------------------------------------------------- 2. plug-in == merged


@pytest.mark.parametrize("host", HOSTS)
def test_plugin_equals_merged_weights(host):
    model, x = MAKE[host](), images(3, seed=2)
    tocom = make_tocom(model)
    base = snapshot(model)
    for s, t in [(0, 3), (3, 1), (1, 4), (4, 0)]:
        merged = copy.deepcopy(model)
        tocom.merge_into(merged, s, t)
        with mmeff.apply(model, mmeff.ToMe(r=t)):
            tome_only = run(model, x)
            with tocom.compensate(model, source=s):  # target=None: the attached ToMe's r
                plugged = run(model, x)
            assert torch.equal(run(model, x), tome_only)  # detached
        with mmeff.apply(merged, mmeff.ToMe(r=t)):
            folded = run(merged, x)
        assert differs(plugged, tome_only)
        torch.testing.assert_close(plugged, folded, atol=1e-5, rtol=1e-5)
        # merging back restores the weights
        tocom.merge_into(merged, t, s)
        assert_state_equal(merged, base, atol=1e-6)
    assert_state_equal(model, base)


@pytest.mark.parametrize("host", HOSTS)
def test_merge_into_touches_only_q_and_v(host):
    model = MAKE[host]()
    tocom = make_tocom(model)
    base = snapshot(model)
    tocom.merge_into(model, 1, 3)
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, base[k])}
    if host == "timm":
        expected = {f"blocks.{i}.attn.qkv.weight" for i in range(DEPTH)}
        w = model.blocks[0].attn.qkv.weight
    elif host == "hf":
        pre = hf_prefix(model)
        expected = {f"{pre}.{i}.self_attn.{p}_proj.weight" for i in range(DEPTH) for p in "qv"}
        w = None
    else:
        expected = {f"visual.transformer.resblocks.{i}.attn.in_proj_weight" for i in range(DEPTH)}
        w = model.visual.transformer.resblocks[0].attn.in_proj_weight
    assert changed == expected
    if w is not None:
        key = (
            "blocks.0.attn.qkv.weight"
            if host == "timm"
            else "visual.transformer.resblocks.0.attn.in_proj_weight"
        )
        assert torch.equal(w[DIM : 2 * DIM], base[key][DIM : 2 * DIM])
        torch.testing.assert_close(w[:DIM] - base[key][:DIM], tocom.delta(0, "q", 1, 3), atol=1e-6, rtol=0)
        torch.testing.assert_close(
            w[2 * DIM :] - base[key][2 * DIM :], tocom.delta(0, "v", 1, 3), atol=1e-6, rtol=0
        )
    else:
        attn = hf_layers(model)[1].self_attn
        b = f"{pre}.1.self_attn"
        torch.testing.assert_close(attn.q_proj.weight - base[f"{b}.q_proj.weight"], tocom.delta(1, "q", 1, 3))
        torch.testing.assert_close(attn.v_proj.weight - base[f"{b}.v_proj.weight"], tocom.delta(1, "v", 1, 3))


@pytest.mark.parametrize("host", HOSTS)
def test_identity_cases_and_detach_are_bit_identical(host):
    model, x = MAKE[host](), images(2, seed=3)
    tocom = make_tocom(model)
    before_hooks, base = hook_state(model), snapshot(model)
    plain = run(model, x)
    with mmeff.apply(model, mmeff.ToMe(r=3)):
        tome_only = run(model, x)
        assert differs(tome_only, plain) or host == "hf"  # HF unmerges to the full grid; values still move
        with tocom.compensate(model, source=3):  # s == t
            assert torch.equal(run(model, x), tome_only)
        with tocom.compensate(model, source=1, scale=0.0):
            assert torch.equal(run(model, x), tome_only)
        h = tocom.compensate(model, source=1)
        comp = run(model, x)
        assert differs(comp, tome_only)
        if host != "open_clip":  # hooks read enabled / source per forward
            h.enabled = False
            assert torch.equal(run(model, x), tome_only)
            h.enabled, h.source = True, 3
            assert torch.equal(run(model, x), tome_only)
            h.source = 1
            assert torch.equal(run(model, x), comp)
        h.detach()
        h.detach()  # twice is fine
        assert torch.equal(run(model, x), tome_only)
    assert hook_state(model) == before_hooks
    assert_state_equal(model, base)
    assert torch.equal(run(model, x), plain)
    # without ToMe, with an explicit target
    with tocom.compensate(model, source=0, target=2):
        assert differs(run(model, x), plain)
    assert torch.equal(run(model, x), plain)
    assert hook_state(model) == before_hooks
    assert_state_equal(model, base)


@pytest.mark.parametrize("host", HOSTS)
def test_target_resolution(host):
    model, x = MAKE[host](), images(2, seed=4)
    tocom = make_tocom(model)
    plain, hooks = run(model, x), hook_state(model)
    with mmeff.apply(model, mmeff.ToMe(r=2)):
        with tocom.compensate(model, source=0):
            implicit = run(model, x)
        with tocom.compensate(model, source=0, target=2):
            explicit = run(model, x)
        with tocom.compensate(model, source=0, target=3):
            other = run(model, x)
    assert torch.equal(implicit, explicit)
    assert differs(other, explicit)
    # a per-block schedule has no single r
    with mmeff.apply(model, mmeff.ToMe(r=[2, 1])), pytest.raises(ValueError, match="same r in every block"):
        with tocom.compensate(model, source=0):
            run(model, x)
    # no ToMe and no target
    with pytest.raises(ValueError, match="needs ToMe attached"):
        with tocom.compensate(model, source=0):
            run(model, x)
    assert torch.equal(run(model, x), plain)  # the failed attaches left nothing behind
    assert hook_state(model) == hooks


def test_target_follows_tome_set_r():
    vit, x = make_vit(), images(2, seed=5)
    tocom = make_tocom(vit)
    h = mmeff.tome.patch(vit, r=1)
    try:
        with tocom.compensate(vit, source=0):
            h.set_r(3)
            moved = run(vit, x)
        with tocom.compensate(vit, source=0, target=3):
            ref = run(vit, x)
        assert torch.equal(moved, ref)
    finally:
        mmeff.tome.unpatch(vit)


def test_training_mode_plugin_refused_on_open_clip():
    clip = make_clip()
    tocom = make_tocom(clip).train()
    with pytest.raises(ValueError, match="folded into the weights"):
        tocom.compensate(clip, source=0, target=2)


# ------------------------------------------------------------------------ 3. independent reference


@pytest.mark.parametrize("host", ["timm", "hf"])
def test_hook_matches_hand_computed_projections(host):
    model, x = MAKE[host](), images(2, seed=6)
    tocom = make_tocom(model, scale=0.8)
    s, t, layer = 1, 4, 1
    seen: dict[str, tuple[Tensor, Tensor]] = {}

    def grab(name):
        def hook(module, args, out):
            seen[name] = (args[0].detach().clone(), out.detach().clone())

        return hook

    m = torch.tensor([1.0 if 8 - j <= STEP_RANK * t else 0.0 for j in range(8)]) - torch.tensor(
        [1.0 if 8 - j <= STEP_RANK * s else 0.0 for j in range(8)]
    )  # hand-written m(1 -> 4): chunks 1..3 from the end
    assert m.tolist() == [1, 1, 1, 1, 1, 1, 0, 0]

    def expected(w: Tensor, b: Tensor | None, which: str, xin: Tensor) -> Tensor:
        d = (tocom.q if which == "q" else tocom.v)[layer]
        dw = 0.8 * d.up.weight @ torch.diag(m) @ d.down.weight
        return F.linear(xin, w + dw, b)

    with tocom.compensate(model, source=s, target=t), torch.no_grad():
        if host == "timm":
            qkv = model.blocks[layer].attn.qkv
            handle = qkv.register_forward_hook(grab("qkv"))
            run(model, x)
            xin, out = seen["qkv"]
            w, b = qkv.weight, qkv.bias
            parts = {
                "q": (out[..., :DIM], w[:DIM], b[:DIM]),
                "k": (out[..., DIM : 2 * DIM], w[DIM : 2 * DIM], b[DIM : 2 * DIM]),
                "v": (out[..., 2 * DIM :], w[2 * DIM :], b[2 * DIM :]),
            }
            handle.remove()
        else:
            attn = hf_layers(model)[layer].self_attn
            handles = [getattr(attn, f"{p}_proj").register_forward_hook(grab(p)) for p in "qkv"]
            run(model, x)
            xin = seen["q"][0]
            assert torch.equal(seen["v"][0], xin) and torch.equal(seen["k"][0], xin)
            parts = {
                p: (seen[p][1], getattr(attn, f"{p}_proj").weight, getattr(attn, f"{p}_proj").bias)
                for p in "qkv"
            }
            for hd in handles:
                hd.remove()
    for which in "qv":
        got, w, b = parts[which]
        want = expected(w, b, which, xin)
        assert differs(want, F.linear(xin, w, b))
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    got, w, b = parts["k"]
    torch.testing.assert_close(got, F.linear(xin, w, b), atol=1e-6, rtol=1e-6)


# -------------------------------------------------------------------------------------- 4. checkpoints


def test_save_load_round_trip(tmp_path):
    vit = make_vit()
    tocom = make_tocom(vit, scale=0.3)
    path = tocom.save(tmp_path / "sub" / "tc.safetensors", extra={"note": "x", "epoch": 7})
    assert path.is_file()
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    assert meta["format"] == "mmeff.tocom" and '"epoch": 7' in meta["extra"]
    loaded = ToCom.load(path)
    assert (
        loaded.config()
        == tocom.config()
        == {
            "dim": DIM,
            "depth": DEPTH,
            "steps": STEPS,
            "step_rank": STEP_RANK,
            "dropout": 0.1,
            "scale": 0.3,
            "host": "timm",
        }
    )
    assert loaded.state_dict().keys() == tocom.state_dict().keys()
    for k, v in tocom.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    for layer in range(DEPTH):
        for which in "qv":
            assert torch.equal(loaded.delta(layer, which, 0, 3), tocom.delta(layer, which, 0, 3))
    # ready for inference: eval mode (no dropout in the hooks), deterministic and equal to the original
    assert not loaded.training
    x = images(2, seed=7)
    with mmeff.apply(vit, mmeff.ToMe(r=3)):
        with tocom.compensate(vit, source=0):
            ref = run(vit, x)
        with loaded.compensate(vit, source=0):
            a, b = run(vit, x), run(vit, x)
    assert torch.equal(a, ref) and torch.equal(b, ref)


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        ToCom.load(tmp_path / "missing.safetensors")
    save_file({"w": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not an mmeff ToCom checkpoint"):
        ToCom.load(tmp_path / "other.safetensors")
    save_file({"w": torch.zeros(2)}, str(tmp_path / "meta.safetensors"), metadata={"format": "something"})
    with pytest.raises(ValueError, match="not an mmeff ToCom checkpoint"):
        ToCom.load(tmp_path / "meta.safetensors")


@pytest.mark.parametrize(
    "other",
    [
        lambda: make_vit(depth=3),
        lambda: make_vit(embed_dim=64),
        lambda: make_hf(num_hidden_layers=3),
        lambda: make_clip(width=64, head_width=16),
    ],
    ids=["timm-depth", "timm-width", "hf-depth", "open_clip-width"],
)
def test_architecture_mismatch_refused(other):
    tocom = make_tocom(make_vit())
    model = other()
    base = snapshot(model)
    with pytest.raises(ValueError, match="architecture"):
        tocom.compensate(model, source=0, target=2)
    with pytest.raises(ValueError, match="architecture"):
        tocom.merge_into(model, 0, 2)
    assert_state_equal(model, base)
    assert all(not m._forward_hooks for m in model.modules())


def test_trained_plugin_transfers_to_another_model(tmp_path):
    src = make_vit(seed=0)
    nn.init.normal_(src.head.weight, std=1.0)
    torch.manual_seed(0)
    trained = train_tocom(
        src,
        Batches(images(16, seed=8), 8),
        steps=STEPS,
        step_rank=STEP_RANK,
        epochs=2,
        lr=1e-2,
        progress=False,
    )
    assert all(torch.count_nonzero(d.up.weight) > 0 for d in [*trained.q, *trained.v])
    trained.save(tmp_path / "tc.safetensors")
    tocom = ToCom.load(tmp_path / "tc.safetensors")
    dst, x = make_vit(seed=1), images(3, seed=9)  # same architecture, another init
    assert not torch.equal(dst.blocks[0].attn.qkv.weight, src.blocks[0].attn.qkv.weight)
    merged = copy.deepcopy(dst)
    tocom.merge_into(merged, 0, 4, scale=1.0)
    with mmeff.apply(dst, mmeff.ToMe(r=4)):
        plain = run(dst, x)
        with tocom.compensate(dst, source=0, scale=1.0):
            comp = run(dst, x)
    with mmeff.apply(merged, mmeff.ToMe(r=4)):
        folded = run(merged, x)
    assert differs(comp, plain, by=1e-5)
    torch.testing.assert_close(comp, folded, atol=1e-5, rtol=1e-5)
    # and into an HF CLIP tower of the same width and depth
    hf = make_hf()
    with mmeff.apply(hf, mmeff.ToMe(r=4)):
        plain = run(hf, x)
        with tocom.compensate(hf, source=0, scale=1.0):
            assert differs(run(hf, x), plain, by=1e-5)


# ---------------------------------------------------------------------------------------- 5. training


def train(model: nn.Module, epochs: int, out_dir, data=None, **kw) -> ToCom:
    torch.manual_seed(123)  # dropout inside the plug-in draws from the global generator
    data = Batches(images(16, seed=10), 8, seed=0) if data is None else data
    kw = {"steps": STEPS, "step_rank": STEP_RANK, "lr": 1e-2, "progress": False, **kw}
    return train_tocom(model, data, epochs=epochs, out_dir=out_dir, **kw)


def test_train_tocom_contract(tmp_path):
    vit = make_vit()
    nn.init.normal_(vit.head.weight, std=1.0)
    vit.train()
    vit.patch_embed.requires_grad_(False)  # a mix of flags, restored as they were
    flags = {n: p.requires_grad for n, p in vit.named_parameters()}
    base, hooks = snapshot(vit), hook_state(vit)
    tocom = train(vit, 2, tmp_path / "run")
    assert [h["epoch"] for h in tocom.history] == [0, 1]
    assert all(math.isfinite(h["kd_loss"]) and h["kd_loss"] > 0 for h in tocom.history)
    assert all(torch.isfinite(p).all() for p in tocom.parameters())
    assert all(torch.count_nonzero(d.up.weight) > 0 for d in [*tocom.q, *tocom.v])  # B left zero: trained
    assert not tocom.training
    assert_state_equal(vit, base)
    assert {n: p.requires_grad for n, p in vit.named_parameters()} == flags
    assert all(p.grad is None for p in vit.parameters())
    assert vit.training
    assert hook_state(vit) == hooks
    assert "_mmeff_tome_adapter" not in vit.__dict__
    assert (tmp_path / "run" / "tocom.safetensors").is_file()
    assert (tmp_path / "run" / "train_state.pt").is_file()
    state = torch.load(tmp_path / "run" / "train_state.pt", weights_only=True)  # train_steps' state
    assert state["step"] == 4 and state["history"]["epochs"] == tocom.history  # 2 epochs of 2 batches
    assert state["history"]["config"]["epochs"] == 2 and state["history"]["config"]["lr"] == 1e-2
    for k, v in tocom.state_dict().items():
        assert torch.equal(state["model"][k], v), k
    saved = ToCom.load(tmp_path / "run" / "tocom.safetensors")
    for k, v in tocom.state_dict().items():
        assert torch.equal(saved.state_dict()[k], v), k


def test_resume_equals_uninterrupted(tmp_path):
    vit = make_vit()
    nn.init.normal_(vit.head.weight, std=1.0)
    full = train(vit, 3, tmp_path / "full")
    # a new Batches and a reseeded global RNG each call, as in a fresh process
    part = train(vit, 2, tmp_path / "part")
    assert len(part.history) == 2
    resumed = train(vit, 3, tmp_path / "part")
    assert [h["epoch"] for h in resumed.history] == [0, 1, 2]
    assert resumed.history == full.history
    for k, v in full.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[k], v, atol=1e-6, rtol=0, msg=k)
    assert any(not torch.equal(part.state_dict()[k], v) for k, v in full.state_dict().items())
    # a finished run resumes to itself; resume=False starts over
    again = train(vit, 3, tmp_path / "part")
    for k, v in resumed.state_dict().items():
        assert torch.equal(again.state_dict()[k], v), k
    fresh = train(vit, 2, tmp_path / "part", resume=False)
    for k, v in part.state_dict().items():
        torch.testing.assert_close(fresh.state_dict()[k], v, atol=1e-6, rtol=0, msg=k)


def test_resume_from_a_train_state_of_the_hand_written_loop(tmp_path):
    """mmeff before train_steps saved ``{optimizer, epoch, history: [epochs], rng, torch_rng, cuda_rng}`` and
    the weights only in tocom.safetensors: such a run still resumes exactly."""
    vit = make_vit()
    nn.init.normal_(vit.head.weight, std=1.0)
    full = train(vit, 3, tmp_path / "full")
    train(vit, 2, tmp_path / "old")
    new = torch.load(tmp_path / "old" / "train_state.pt", weights_only=True)
    pairs = random.Random(0)
    for _ in range(4):  # the (r_s, r_t) draws of 2 epochs of 2 batches
        pairs.sample(range(STEPS + 1), 2)
    old = {"optimizer": new["optimizer"], "epoch": 1, "history": new["history"]["epochs"],
           "rng": pairs.getstate(), "torch_rng": new["rng"], "cuda_rng": None}
    torch.save(old, tmp_path / "old" / "train_state.pt")
    (tmp_path / "old" / "history.json").unlink()
    resumed = train(vit, 3, tmp_path / "old")
    assert resumed.history == full.history and [h["epoch"] for h in resumed.history] == [0, 1, 2]
    for k, v in full.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[k], v, atol=1e-6, rtol=0, msg=k)


def test_resume_refuses_other_settings(tmp_path):
    vit = make_vit()
    train(vit, 1, tmp_path / "run")
    with pytest.raises(ValueError, match=r"train_state\.pt holds a run with other settings \(lr 0\.01 -> 0\.02\)"):
        train(vit, 2, tmp_path / "run", lr=2e-2)
    assert len(train(vit, 2, tmp_path / "run").history) == 2  # more epochs: resumes


def test_batches_reshuffle_per_epoch():
    x = torch.arange(10.0)[:, None]
    b = Batches(x, 4, seed=3)
    assert len(b) == 3
    first, second = torch.cat(list(b)), torch.cat(list(b))
    assert sorted(first[:, 0].tolist()) == list(range(10)) and not torch.equal(first, second)
    b.set_epoch(1)
    assert torch.equal(torch.cat(list(b)), second)
    assert torch.equal(torch.cat(list(Batches(x, 4, shuffle=False))), x)


def test_train_tocom_errors():
    vit = make_vit()
    hooks = hook_state(vit)
    x = images(4, seed=11)
    with pytest.raises(TypeError, match="re-iterable"):
        train_tocom(vit, (b for b in [x]), steps=STEPS, step_rank=STEP_RANK, epochs=1, progress=False)
    for r_max in (0, STEPS + 1):
        with pytest.raises(ValueError, match="r_max"):
            train_tocom(vit, [x], steps=STEPS, step_rank=STEP_RANK, r_max=r_max, epochs=1, progress=False)
    with pytest.raises(TypeError, match="image tensors"):
        train_tocom(vit, [{"x": x}], steps=STEPS, step_rank=STEP_RANK, epochs=1, progress=False)

    class Unsized:  # re-iterable, but the loop counts an epoch's steps by len
        def __iter__(self):
            yield x

    with pytest.raises(TypeError, match="must have a len"):
        train_tocom(vit, Unsized(), steps=STEPS, step_rank=STEP_RANK, epochs=1, progress=False)
    assert hook_state(vit) == hooks


def _kd_gap(model: nn.Module, tocom: ToCom | None, x: Tensor, pairs) -> float:
    losses = []
    for s, t in pairs:
        with mmeff.apply(model, mmeff.ToMe(r=s)):
            teacher = run(model, x)
        with mmeff.apply(model, mmeff.ToMe(r=t)):
            if tocom is None:
                student = run(model, x)
            else:
                with tocom.compensate(model, source=s):
                    student = run(model, x)
        losses.append(kd_loss(student, teacher).item())
    return sum(losses) / len(losses)


@pytest.mark.parametrize("recipe", ["official", "mmeff"])
def test_training_lowers_kd_gap(recipe):
    vit = make_vit()
    nn.init.normal_(vit.head.weight, std=1.0)
    x = images(32, seed=12)
    # full batches (one random (r_s, r_t) per step), 40 steps at 3e-3, no weight decay; no drop path: in a
    # 2-block ViT dropping a block outweighs the merge error (the official 0.1 doubles the gap here)
    tocom = train(vit, 40, None, data=Batches(x, 32), lr=3e-3, scale=0.5, weight_decay=0.0, recipe=recipe,
                  drop_path=0.0)
    pairs = [(0, 4), (4, 0), (1, 3), (3, 1), (0, 2), (2, 4)]
    before, after = _kd_gap(vit, None, x, pairs), _kd_gap(vit, tocom, x, pairs)
    assert before > 1e-3
    assert after < 0.75 * before, (before, after)  # 0.38 (mmeff) and 0.49 (official) of it here
    losses = [h["kd_loss"] for h in tocom.history]
    assert sum(losses[-10:]) < sum(losses[:10])


def test_official_recipe_schedule_modes_and_drop_path():
    """The official recipe: cosine by epoch read one epoch late (DeiT steps timm's scheduler after each
    epoch), the student in train mode with timm's linear drop-path rule, the teacher in eval mode; the
    model comes back as it was."""
    from mmeff.train.tocom import ToComTrainConfig

    cfg = ToComTrainConfig(epochs=10)
    lrs = [cfg.lr_at_epoch(e) for e in range(10)]
    assert lrs[0] == lrs[1] == 2e-3 and lrs[-1] == pytest.approx(1e-5 + (2e-3 - 1e-5) * 0.5 * (1 + math.cos(math.pi * 0.8)))
    assert all(a > b for a, b in zip(lrs[1:], lrs[2:]))
    assert ToComTrainConfig(schedule="constant", lr=1e-3).lr_at_epoch(7) == 1e-3
    # a run saved before the recipe fields existed resumes as the recipe it ran (not silently as official)
    old = ToComTrainConfig.from_dict({"epochs": 10, "lr": 3e-3})
    assert (old.schedule, old.train_mode, old.drop_path, old.kd_reduction) == ("constant", False, 0.0, "batchmean")
    assert old.min_lr == old.lr == 3e-3 and old.lr_at_epoch(9) == 3e-3  # what train_tocom(recipe="mmeff") builds
    with pytest.raises(ValueError, match="schedule"):
        ToComTrainConfig(schedule="step")

    vit = make_vit(depth=3)
    seen = []

    def spy(mod, inp, out):
        seen.append((mod.training, [type(b.drop_path1).__name__ for b in vit.blocks],
                     [getattr(b.drop_path1, "drop_prob", 0.0) for b in vit.blocks]))

    h = vit.register_forward_hook(spy)
    try:
        train(vit, 1, None, data=[images(4, seed=1)])
    finally:
        h.remove()
    (t_mode, _, _), (s_mode, kinds, probs) = seen[0], seen[1]
    assert (t_mode, s_mode) == (False, True)  # teacher eval, student train
    assert kinds == ["Identity", "DropPath", "DropPath"] and probs[1:] == pytest.approx([0.05, 0.1])
    assert all(type(b.drop_path1).__name__ == "Identity" for b in vit.blocks) and not vit.training
    with pytest.raises(ValueError, match="recipe"):
        train(vit, 1, None, data=[images(4, seed=1)], recipe="paper")


# -------------------------------------------------------------------------------------- 6. KD loss


@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_kd_loss_matches_hand_written_kl(tau):
    g = torch.Generator().manual_seed(13)
    student, teacher = torch.randn(5, 7, generator=g) * 3, torch.randn(5, 7, generator=g) * 3
    p_t = torch.exp(teacher / tau) / torch.exp(teacher / tau).sum(-1, keepdim=True)
    p_s = torch.exp(student / tau) / torch.exp(student / tau).sum(-1, keepdim=True)
    ref = tau * tau * (p_t * (p_t.log() - p_s.log())).sum(-1).mean()
    got = kd_loss(student, teacher, tau)
    assert got.item() > 0.1
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    assert kd_loss(teacher, teacher, tau).abs().item() < 1e-6
    assert not torch.isclose(kd_loss(student, teacher, tau), kd_loss(teacher, student, tau))
    # ToCom's losses.py (DeiT's legacy reduction): the summed KL over B * C
    torch.testing.assert_close(kd_loss(student, teacher, tau, "mean"), ref / 7, atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="reduction"):
        kd_loss(student, teacher, tau, "sum")


def test_resume_refuses_a_hostile_train_state(tmp_path, hostile_checkpoint):
    vit = make_vit()
    train(vit, 1, tmp_path / "run")
    marker = tmp_path / "pwned"
    hostile_checkpoint(tmp_path / "run" / "train_state.pt", marker)
    with pytest.raises(ValueError, match=r"train_state\.pt pickles Python objects"):
        train(vit, 2, tmp_path / "run")
    assert not marker.exists()


# -------------------------------------------------------------------------------------- 7. official checkpoints


class _OfficialAdapter(nn.Module):
    """ToCom's ``models.Adapter`` (act=False), restated: ``adapter_up(mask(r_tgt) - mask(r_src)) *
    adapter_down(x)``, the mask the last ``r`` of 16 chunks."""

    def __init__(self, width: int, rank: int) -> None:
        super().__init__()
        self.adapter_down = nn.Linear(width, rank, bias=False)
        self.adapter_up = nn.Linear(rank, width, bias=False)
        self.rank = rank

    def forward(self, x: Tensor, r_tgt: int, r_src: int) -> Tensor:
        c = self.rank // 16

        def mask(r: int) -> Tensor:
            return torch.tensor([0.0] * (self.rank - c * r) + [1.0] * (c * r))

        return self.adapter_up(self.adapter_down(x) * (mask(r_tgt) - mask(r_src)))


def test_official_checkpoint_loads_with_the_same_deltas(tmp_path):
    torch.manual_seed(0)
    depth, width, rank = 3, DIM, 32
    blocks = nn.ModuleList()
    for _ in range(depth):
        b = nn.Module()
        b.attn = nn.Module()
        b.attn.q_tocom, b.attn.v_tocom = _OfficialAdapter(width, rank), _OfficialAdapter(width, rank)
        blocks.append(b)
    state = {f"blocks.{k}": v.normal_() for k, v in blocks.state_dict().items()}
    torch.save({"model": state}, tmp_path / "checkpoint.pth")  # what the official main.py writes
    tocom = ToCom.load_official(tmp_path / "checkpoint.pth", scale=0.08)
    assert (tocom.depth, tocom.dim, tocom.steps, tocom.step_rank, tocom.scale) == (depth, width, 16, 2, 0.08)
    assert sum(p.numel() for p in tocom.parameters()) == sum(v.numel() for v in state.values())
    assert not tocom.training
    x = torch.randn(2, 5, width)
    for r_s, r_t in ((0, 4), (4, 0), (3, 16), (7, 7)):
        for i, b in enumerate(blocks):
            for which, ours in (("q", tocom.q[i]), ("v", tocom.v[i])):
                want = getattr(b.attn, f"{which}_tocom")(x, r_t, r_s)
                torch.testing.assert_close(ours(x, tocom.mask(r_s, r_t)), want, rtol=1e-5, atol=1e-5)
    torch.save({"model": {"blocks.0.attn.q_tocom.adapter_down.weight": torch.zeros(32, 8)}}, tmp_path / "part.pth")
    with pytest.raises(ValueError, match="part.pth is not an official ToCom checkpoint"):
        ToCom.load_official(tmp_path / "part.pth")
