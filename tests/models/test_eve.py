"""Eve: text path exactly the base LM's, routing of visual tokens, the expert layer against a per-token
reference, LDP shapes, paper-size counts on ``meta``, save/load/generate, the three training stages."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, CLIPVisionConfig

from mmeff.models.eve import (
    ElasticExperts,
    EveConfig,
    EveForConditionalGeneration,
    LDPProjector,
    build_eve,
    load_official_projector,
    paper_config,
    param_counts,
    sparse_layers,
)
from mmeff.models.tiny import tiny_lm_config
from mmeff.train.eve import EveTrainConfig, train_stage

pytestmark = pytest.mark.usefixtures("single_thread")

VISION = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=32,
              patch_size=8)


def _tiny(layers: int = 4, vocab: int = 128, **kw) -> tuple[EveForConditionalGeneration, nn.Module]:
    torch.manual_seed(0)
    lmc = tiny_lm_config(num_hidden_layers=layers, vocab_size=vocab)
    lm = AutoModelForCausalLM.from_config(lmc).eval()
    m = EveForConditionalGeneration(EveConfig(vision_config=CLIPVisionConfig(**VISION), text_config=lmc,
                                              image_token_id=vocab - 1, **kw)).eval()
    m.language_model.load_state_dict(lm.state_dict())
    return m, lm


def _perturb(module: nn.Module, scale: float = 0.5, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)


def _visual_prompt(m: EveForConditionalGeneration, batch: int = 2, text: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    n = m.config.tokens_per_image
    ids = torch.randint(3, 100, (batch, text), generator=torch.Generator().manual_seed(2))
    ids = torch.cat([ids[:, :2], torch.full((batch, n), m.config.image_token_id), ids[:, 2:]], 1)
    return ids, torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(3))


def test_text_only_logits_are_the_base_lms_real_smollm2(smollm2):
    lm, tok = smollm2
    model, tok2 = build_eve(lm, tok, CLIPVisionConfig(**VISION), experts=True, adapter_layers=[27, 29])
    assert len(tok) == lm.config.vocab_size  # the caller's tokenizer is untouched
    assert model.config.expert_layers == sparse_layers(30) and model.config.adapter_layers == [27, 29]
    _perturb(model.experts)  # as if trained: routers, copies, coefficients
    _perturb(model.adapters)
    ids = tok(["The capital of France is", "Water boils at a temperature of"], return_tensors="pt",
              padding=True)
    with torch.no_grad():
        got = model(**ids).logits
        want = lm(**ids).logits
    assert torch.equal(got[:, :, : lm.config.vocab_size], want)
    gen = model.generate(**ids, max_new_tokens=6, do_sample=False)
    base = lm.generate(**ids, max_new_tokens=6, do_sample=False)
    assert torch.equal(gen, base)
    # visual tokens do take the (perturbed) experts
    n = model.config.tokens_per_image
    img = torch.tensor([[tok2.convert_tokens_to_ids("<image>")] * n + ids["input_ids"][0].tolist()])
    with torch.no_grad():
        model(input_ids=img, pixel_values=torch.randn(1, 3, 32, 32))
    assert sum(sum(c) for c in model.last_routing.values()) == n * len(model.experts)


def test_inserting_experts_changes_nothing_then_visual_tokens_route():
    m, lm = _tiny()
    ids, px = _visual_prompt(m)
    with torch.no_grad():
        before = m(input_ids=ids, pixel_values=px).logits
        m.add_experts(adapter_layers=[3])
        after = m(input_ids=ids, pixel_values=px).logits
    assert m.config.expert_layers == [0, 2]
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)
    # bias every router towards the copied expert: visual tokens go there up to capacity
    with torch.no_grad():
        for e in m.experts.values():
            e.wg.weight.zero_()
            e.wg.weight[1].fill_(0.0)
            e.wg.weight[0].fill_(-1.0)
        x = m(input_ids=ids, pixel_values=px)
    n_vis = int((ids == m.config.image_token_id).sum())
    cap = m.experts["0"].capacity(n_vis, m.config.capacity_factor, m.config.min_capacity)
    for counts in m.last_routing.values():
        assert sum(counts) == n_vis  # text tokens never reach the router
    assert x.aux_loss is not None and torch.isfinite(x.aux_loss)
    text = ids != m.config.image_token_id
    with torch.no_grad():
        _perturb(m.experts)
        y = m(input_ids=ids, pixel_values=px).logits
    assert not torch.allclose(y, before)
    # the first text tokens (before the image) see no visual token: exactly the base LM's
    torch.testing.assert_close(y[:, :2], before[:, :2], rtol=0, atol=0)
    assert cap < n_vis and text.any()


def _reference_experts(layer: ElasticExperts, ffn: nn.Module, x: torch.Tensor, cf: float, min_cap: int) -> torch.Tensor:
    # one token at a time, in sequence order: the routing and capacity rule written out
    n, e_count = x.shape[0], layer.num_experts
    cap = min(n, max(min_cap, math.ceil(cf * n / e_count)))
    taken = [0] * e_count
    rows = []
    for i in range(n):
        xi = x[i : i + 1]
        p = torch.softmax(layer.wg(xi).float(), -1)[0]
        e = int(p.argmax())
        if e > 0 and taken[e] >= cap:
            e = 0
        taken[e] += 1
        moe = ffn(xi) if e == 0 else layer.experts[e - 1](xi)
        c = torch.softmax(layer.coefficient(xi).float(), -1)[0]
        rows.append(c[0] * moe + c[1] * ffn(xi))
    return torch.cat(rows)


@pytest.mark.parametrize("num_experts", [2, 3])
def test_expert_layer_matches_a_per_token_reference(num_experts):
    torch.manual_seed(0)
    ffn = nn.Sequential(nn.Linear(8, 16), nn.SiLU(), nn.Linear(16, 8))
    layer = ElasticExperts(ffn, 8, num_experts)
    _perturb(layer, 1.0)
    x = torch.randn(23, 8)
    with torch.no_grad():
        y, balance, counts = layer(x, ffn(x), 1.0, 2)
        ref = _reference_experts(layer, ffn, x, 1.0, 2)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-6)
    assert int(counts.sum()) == 23
    assert all(int(c) <= layer.capacity(23, 1.0, 2) for c in counts[1:])
    assert 1.0 - 1e-6 <= float(balance) <= num_experts + 1e-6  # Switch balance: 1 when uniform
    # the router gets gradient through the g / g.detach() scaling
    x.requires_grad_(False)
    y, _, _ = layer(x, ffn(x).detach(), 1.0, 2)
    y.sum().backward()
    assert layer.wg.weight.grad is not None and layer.wg.weight.grad.abs().sum() > 0


def _official_ldp(inc: int, ouc: int) -> nn.Module:
    """MobileVLM's ``LDPNetProjector`` (Eve's ``ldpnet``) restated from its published source with the same
    library parts it uses: torchvision's InvertedResidual / SqueezeExcitation and timm's LayerNormAct2d."""
    from functools import partial

    from timm.layers.norm_act import LayerNormAct2d
    from torchvision.models.mobilenetv3 import InvertedResidual, InvertedResidualConfig
    from torchvision.ops.misc import SqueezeExcitation

    class LDPBlock(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            norm = partial(LayerNormAct2d, act_layer=None)
            se = partial(SqueezeExcitation, scale_activation=nn.Hardsigmoid)
            self.mlp = nn.Sequential(nn.Identity(), nn.Linear(inc, ouc), nn.GELU(), nn.Linear(ouc, ouc))
            self.mb_block = nn.Sequential(
                nn.Identity(),
                InvertedResidual(InvertedResidualConfig(ouc, 3, ouc, ouc, True, "HS", 1, 1, 1), norm, se),
                InvertedResidual(InvertedResidualConfig(ouc, 3, ouc, ouc, True, "HS", 2, 1, 1), norm, se))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            b, n, _ = x.shape
            h = int(math.sqrt(n))
            x = self.mlp(x).permute(0, 2, 1).reshape(b, -1, h, h)
            return self.mb_block(x).flatten(2).permute(0, 2, 1)

    class LDPNetProjector(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = LDPBlock()

    return LDPNetProjector()


def test_ldp_projector_is_the_published_one(tmp_path):
    torch.manual_seed(0)
    ref = _official_ldp(64, 96).eval()
    for q in ref.parameters():  # LayerNorms start at 1/0 and SE biases at 0: make every parameter count
        q.data.normal_(0, 0.3)
    ours = LDPProjector(64, 96, 2).eval()
    assert sum(q.numel() for q in ours.parameters()) == sum(q.numel() for q in ref.parameters()) == 45_936
    # Eve's mm_projector.bin: the projector under model.mm_projector.image_spatial_proj, among other keys
    state = {f"model.mm_projector.image_spatial_proj.{k}": v for k, v in ref.state_dict().items()}
    state["model.embed_tokens.weight"] = torch.zeros(3, 4)
    torch.save(state, tmp_path / "mm_projector.bin")
    load_official_projector(ours, tmp_path / "mm_projector.bin")
    x = torch.randn(2, 576, 64)
    with torch.no_grad():
        want = ref.model(x)
        got = ours(x)
    assert got.shape == want.shape == (2, 144, 96)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # MobileVLM's layout and safetensors load too; a wrong width or a foreign file is a one-line error
    from safetensors.torch import save_file

    save_file({f"model.mm_projector.model.{k}": v.contiguous() for k, v in ref.model.state_dict().items()},
              str(tmp_path / "mobilevlm.safetensors"))
    torch.testing.assert_close(LDPProjector(64, 96).load_official(tmp_path / "mobilevlm.safetensors")(x), want,
                               rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"mm_projector\.bin does not fit this LDP projector.*wrong shape"):
        LDPProjector(64, 128).load_official(tmp_path / "mm_projector.bin")
    torch.save({"w": torch.zeros(1)}, tmp_path / "other.bin")
    with pytest.raises(ValueError, match="other.bin: no projector keys"):
        ours.load_official(tmp_path / "other.bin")


def test_ldp_projector_tokens_and_parameters():
    with torch.device("meta"):
        p = LDPProjector(1024, 2048, 2)
        assert p(torch.empty(2, 576, 1024)).shape == (2, 144, 2048)
    small = LDPProjector(12, 20, 2)
    assert small(torch.randn(1, 64, 12)).shape == (1, 16, 20)
    assert LDPProjector(12, 20, 1)(torch.randn(1, 49, 12)).shape == (1, 49, 20)
    with pytest.raises(ValueError, match="square"):
        small(torch.randn(1, 10, 12))
    d, v = 2048, 1024
    mlp = v * d + d + d * d + d
    se = d * (d // 4) + d // 4 + (d // 4) * d + d
    block = 9 * d + d * d + 2 * 2 * d + se  # depthwise, projection, two LayerNorms, SE: no expansion conv
    assert sum(q.numel() for q in p.parameters()) == mlp + 2 * block == 18_936_832


def test_paper_sizes_on_meta():
    with torch.device("meta"):
        m = EveForConditionalGeneration(paper_config())
    c = param_counts(m)
    assert m.config.tokens_per_image == 144
    assert c["vision_tower"] == 303_507_456  # CLIP ViT-L/14-336's vision model
    assert round(c["language_model"] / 1e9, 2) == 1.50
    assert round(c["base"] / 1e9, 1) == 1.8  # the paper's 1.8B
    ffn = 3 * 2048 * 4608
    assert c["experts"] == 15 * (ffn + 2048 * 2 + 2048 * 2 + 2)
    assert c["adapters"] == 10 * 2 * 2048 * 128
    assert c["activated_visual"] == c["total"]  # 2 experts: one copy per layer, and a visual token may use it
    with torch.device("meta"):
        m3 = EveForConditionalGeneration(paper_config(num_experts=3))
    c3 = param_counts(m3)
    assert c3["total"] - c3["activated_visual"] == 15 * ffn


def test_save_load_generate_and_cache(tmp_path):
    m, _ = _tiny(expert_layers=[0, 2], adapter_layers=[3])
    _perturb(m.experts, 0.3)
    _perturb(m.adapters, 0.3)
    ids, px = _visual_prompt(m)
    m.save_pretrained(tmp_path)
    m2 = AutoModelForImageTextToText.from_pretrained(tmp_path).eval()
    assert isinstance(m2, EveForConditionalGeneration) and m2.config.expert_layers == [0, 2]
    with torch.no_grad():
        torch.testing.assert_close(m2(input_ids=ids, pixel_values=px).logits,
                                   m(input_ids=ids, pixel_values=px).logits, rtol=0, atol=0)
    fast = m2.generate(input_ids=ids, pixel_values=px, max_new_tokens=5, do_sample=False)
    slow = m2.generate(input_ids=ids, pixel_values=px, max_new_tokens=5, do_sample=False, use_cache=False)
    assert torch.equal(fast, slow)
    assert not (fast[:, ids.shape[1]:] == m.config.image_token_id).any()
    import mmeff

    assert set(mmeff.list_models("eve")) == {"eve_paper", "eve_smollm2"}
    m3 = mmeff.create_model("eve_smollm2", pretrained=str(tmp_path))  # any saved Eve folder
    assert isinstance(m3, mmeff.EveForConditionalGeneration) and m3.config.adapter_layers == [3]


def test_bad_inputs_raise_clear_errors():
    m, _ = _tiny()
    ids, px = _visual_prompt(m)
    with pytest.raises(ValueError, match="image tokens but"):
        m(input_ids=torch.cat([ids[:, :2], ids[:, 3:]], 1), pixel_values=px)  # one image token short
    with pytest.raises(ValueError, match="no pixel_values"):
        m(input_ids=ids)
    with pytest.raises(ValueError, match="outside"):
        m.add_experts([7])
    with pytest.raises(ValueError, match="no experts yet"):
        m.set_trainable(["experts"])
    with pytest.raises(ValueError, match="unknown parts"):
        m.set_trainable(["lora"])
    with pytest.raises(ValueError, match="num_experts"):
        EveConfig(text_config=tiny_lm_config(), num_experts=1)
    with pytest.raises(TypeError, match="causal LM"):
        build_eve(nn.Linear(2, 2), None, CLIPVisionConfig(**VISION))


def test_three_stages_train_only_their_parts_and_resume_exactly(smollm2, tmp_path):
    _, tok = smollm2
    torch.manual_seed(0)
    lmc = tiny_lm_config(vocab_size=len(tok) + 1, num_hidden_layers=4, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    lm = AutoModelForCausalLM.from_config(lmc)
    model, tok2 = build_eve(lm, tok, CLIPVisionConfig(**VISION))
    lm_state = {k: v.clone() for k, v in model.language_model.state_dict().items()}
    tower = {k: v.clone() for k, v in model.vision_tower.state_dict().items()}
    proj0 = {k: v.clone() for k, v in model.projector.state_dict().items()}
    h1 = train_stage(model, tok2, tmp_path / "s1", EveTrainConfig("align", steps=2, batch_size=2, save_every=1),
                     progress=False, save_model=False)
    assert h1["step"] == 2 and h1["stage"] == "align"
    assert any(not torch.equal(v, model.projector.state_dict()[k]) for k, v in proj0.items())
    train_stage(model, tok2, tmp_path / "s2", EveTrainConfig("instruct", steps=2, batch_size=2), progress=False,
                save_model=False)
    proj2 = {k: v.clone() for k, v in model.projector.state_dict().items()}
    h3 = train_stage(model, tok2, tmp_path / "s3", EveTrainConfig("experts", steps=3, batch_size=2), progress=False)
    assert model.config.expert_layers == [0, 2] and "aux" in h3["log"][-1]
    for k, v in model.language_model.state_dict().items():
        assert torch.equal(v, lm_state[k]), k  # the text path never trains
    for k, v in model.vision_tower.state_dict().items():
        assert torch.equal(v, tower[k]), k
    for k, v in model.projector.state_dict().items():
        assert torch.equal(v, proj2[k]), k  # stage 3 trains only the experts
    ckpt = torch.load(tmp_path / "s3" / "last.pt", weights_only=False)
    assert ckpt["model"] and all(k.startswith("experts.") for k in ckpt["model"])
    assert (tmp_path / "s3" / "model" / "config.json").is_file()
    # resumed (2 steps, then the third from last.pt) equals straight through
    reload = EveForConditionalGeneration.from_pretrained(tmp_path / "s3" / "model")
    straight = {k: v.clone() for k, v in model.experts.state_dict().items()}
    a = _fresh_stage3(lm, tok, proj2)
    train_stage(a, tok2, tmp_path / "r", EveTrainConfig("experts", steps=3, batch_size=2), progress=False,
                save_model=False)
    b = _fresh_stage3(lm, tok, proj2)
    cfg = EveTrainConfig("experts", steps=3, batch_size=2)
    part = train_stage(b, tok2, tmp_path / "r2", cfg, progress=False, save_model=False, stop_after=2)
    assert part["step"] == 2
    b = _fresh_stage3(lm, tok, proj2)  # a new process: only last.pt carries the state
    train_stage(b, tok2, tmp_path / "r2", cfg, progress=False, save_model=False)
    for k, v in a.experts.state_dict().items():
        assert torch.equal(v, b.experts.state_dict()[k]), k
    assert reload.config.expert_layers == [0, 2] and set(straight) == set(a.experts.state_dict())


def _fresh_stage3(lm, tok, proj):
    model, _ = build_eve(lm, tok, CLIPVisionConfig(**VISION))
    model.projector.load_state_dict(proj)
    return model


def test_cli_train_and_eval(smollm2, tmp_path, capsys):
    import json

    from mmeff.cli.main import main

    _save_tiny_eve(smollm2[1], tmp_path / "m")
    out = tmp_path / "s3"
    assert main(["eve", "train", "--model", str(tmp_path / "m"), "--stage", "experts", "--steps", "2",
                 "--batch-size", "2", "--out", str(out)]) == 0
    trained = EveForConditionalGeneration.from_pretrained(out / "model")
    assert trained.config.expert_layers == [0]
    capsys.readouterr()
    assert main(["eve", "eval", "--model", str(out / "model"), "--per-kind", "1", "--text-tokens", "64"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert 0.0 <= report["accuracy"]["all"] <= 1.0 and report["text_perplexity"]["model"] > 1.0


def test_offline_text_perplexity_matches_hf_loss(smollm2):
    from mmeff.bench.eve import offline_text_ids, perplexity

    lm, tok = smollm2
    ids = offline_text_ids(tok, 96)
    assert ids.shape == (96,) and tok.decode(ids).startswith("The \"assert\" statement")
    with torch.no_grad():
        want = float(torch.exp(lm(input_ids=ids[None], labels=ids[None]).loss))
    assert perplexity(lm, ids, window=96) == pytest.approx(want, rel=1e-5)
    with pytest.raises(ValueError, match="only"):
        offline_text_ids(tok, 10**8)


def test_loss_only_equals_the_full_logits_loss():
    m, _ = _tiny(expert_layers=[0, 2])
    _perturb(m.experts, 0.3)
    ids, px = _visual_prompt(m)
    labels = ids.clone()
    labels[:, :6] = -100
    labels[labels == m.config.image_token_id] = -100
    full = m(input_ids=ids, pixel_values=px, labels=labels)
    fast = m(input_ids=ids, pixel_values=px, labels=labels, loss_only=True)
    assert fast.logits is None
    torch.testing.assert_close(fast.loss, full.loss)
    ref = torch.nn.functional.cross_entropy(full.logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())
    torch.testing.assert_close(full.lm_loss, ref)
    torch.testing.assert_close(full.loss, ref + 0.01 * full.aux_loss)


def test_stage3_under_torchrun_ddp(smollm2, tmp_path):
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    _save_tiny_eve(smollm2[1], tmp_path / "m")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29541",
           "-m", "mmeff.cli", "eve", "train", "--model", str(tmp_path / "m"), "--stage", "experts",
           "--steps", "2", "--batch-size", "1", "--save-every", "1", "--out", str(tmp_path / "ddp")]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"},
                         cwd=Path(__file__).resolve().parents[2])
    assert run.returncode == 0, run.stderr[-2000:]
    assert json.loads((tmp_path / "ddp" / "history.json").read_text())["step"] == 2
    assert EveForConditionalGeneration.from_pretrained(tmp_path / "ddp" / "model").config.expert_layers == [0]


def _save_tiny_eve(tok, folder):
    # a 2-layer random LM on SmolLM2's real tokenizer, saved as an Eve folder for the CLI
    torch.manual_seed(0)
    lmc = tiny_lm_config(vocab_size=len(tok) + 1, num_hidden_layers=2, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model, tok2 = build_eve(AutoModelForCausalLM.from_config(lmc), tok, CLIPVisionConfig(**VISION))
    model.save_pretrained(folder)
    tok2.save_pretrained(folder)
