"""Tests for mmeff.eval.flops / latency / profile: configs, analytic FLOPs vs FlopCounterMode, KV bytes vs DynamicCache, timing.

FlopCounterMode counts matrix products only (mm/addmm/bmm/convolution/SDPA), which is the convention of
``prefill_flops``; so the comparisons below are exact. On CPU the fused SDPA kernel
(``_scaled_dot_product_flash_attention_for_cpu``) has no registered formula, so the tests give it the same
QK^T + AV formula torch uses for the CUDA SDPA ops (full square, ``is_causal`` ignored).
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode
from transformers import (
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
)

import mmeff
from mmeff.eval.flops import (
    FlopBreakdown,
    available_configs,
    count_parameters,
    decode_flops,
    kv_cache_bytes,
    llm_prefill_reduction,
    load_config,
    meta_model,
    prefill_flops,
)
from mmeff.eval.latency import measure_latency, median_seconds
from mmeff.eval.profile import profile
from mmeff.hfconfig import CACHE_KWARG, output_cache
from mmeff.models.tiny import (
    build_tiny,
    llava_inputs,
    qwen2_vl_inputs,
    tiny_llava_config,
    tiny_qwen2_vl_config,
)

# One prompt with two images: 56x84 and 56x56 pixels -> grids (1, 4, 6) and (1, 4, 4) -> 6 + 4 visual tokens.
QWEN_TWO_IMAGES = [[(56, 84), (56, 56)]]


def _cpu_sdpa_flops(q, k, v, *args, out_shape=None, **kwargs) -> int:
    b, h, s_q, d = q
    s_k, d_v = k[2], v[3]
    return 2 * b * h * s_q * s_k * d + 2 * b * h * s_q * s_k * d_v


CPU_SDPA = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flops}


def count_flops(fn) -> int:
    with torch.inference_mode(), FlopCounterMode(display=False, custom_mapping=CPU_SDPA) as counter:
        fn()
    return counter.get_total_flops()


# ------------------------------------------------------------------------------------------------
# tiny real models (library factories)
# ------------------------------------------------------------------------------------------------


@pytest.fixture
def llava(tmp_path) -> LlavaForConditionalGeneration:
    return build_tiny("llava", tmp_path / "llava")


@pytest.fixture
def qwen(tmp_path) -> Qwen2VLForConditionalGeneration:
    return build_tiny("qwen2_vl", tmp_path / "qwen")


def tiny_with_attn(kind: str, attn: str):
    """Tiny model built straight from the library config with a chosen attention kernel.

    ``build_tiny`` reloads through ``from_pretrained``, which does not keep ``attn_implementation``.
    """
    if kind == "llava":
        cls, config = LlavaForConditionalGeneration, tiny_llava_config(attn_implementation=attn)
    else:
        cls, config = Qwen2VLForConditionalGeneration, tiny_qwen2_vl_config(attn_implementation=attn)
    torch.manual_seed(0)
    return cls(config).eval()


def llava_batch(config: LlavaConfig, batch: int = 1) -> dict[str, torch.Tensor]:
    """``batch`` equal-length rows (``[bos]`` + 9 text ids around one image's placeholders), so no padding.

    ``measure_latency`` decodes with an all-ones mask, so comparisons with ``generate`` need unpadded rows.
    """
    return llava_inputs(config, batch=batch, text_lens=[9] * batch, seed=1)


def visual_per_row(config, input_ids: torch.Tensor) -> list[int]:
    """Image/video placeholder tokens in each row of ``input_ids``."""
    ids = [i for i in (config.image_token_id, getattr(config, "video_token_id", None)) if i is not None]
    return torch.isin(input_ids, torch.tensor(ids)).sum(-1).tolist()


# ------------------------------------------------------------------------------------------------
# configs and meta models
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def meta_llava():
    return meta_model("llava-1.5-7b")


@pytest.fixture(scope="module")
def meta_qwen():
    return meta_model("qwen2-vl-7b")


def test_bundled_configs_have_the_real_architecture(tmp_path):
    assert {"llava-1.5-7b", "qwen2-vl-7b"} <= set(available_configs())
    llava = load_config("llava-1.5-7b")
    assert isinstance(llava, LlavaConfig)
    v, t = llava.vision_config, llava.text_config
    assert (v.hidden_size, v.num_hidden_layers, v.num_attention_heads, v.intermediate_size) == (1024, 24, 16, 4096)
    assert (v.image_size, v.patch_size) == (336, 14)
    assert (llava.vision_feature_layer, llava.vision_feature_select_strategy) == (-2, "default")
    assert llava.projector_hidden_act == "gelu" and llava.image_token_id == 32000
    assert (t.hidden_size, t.num_hidden_layers, t.num_attention_heads, t.intermediate_size, t.vocab_size) == (
        4096, 32, 32, 11008, 32064,
    )

    qwen = load_config("Qwen/Qwen2-VL-7B-Instruct")  # hub id resolves to the bundled copy, offline
    assert isinstance(qwen, Qwen2VLConfig)
    t, v = qwen.text_config, qwen.vision_config
    assert (t.hidden_size, t.num_hidden_layers, t.num_attention_heads, t.num_key_value_heads) == (3584, 28, 28, 4)
    assert (t.intermediate_size, t.vocab_size) == (18944, 152064)
    assert t.rope_parameters["mrope_section"] == [16, 24, 24]
    assert (v.depth, v.embed_dim, v.num_heads, v.mlp_ratio, v.hidden_size) == (32, 1280, 16, 4, 3584)
    assert (v.patch_size, v.spatial_merge_size, v.temporal_patch_size) == (14, 2, 2)

    # a local folder with config.json, and a bare JSON path
    (tmp_path / "config.json").write_text(json.dumps(llava.to_dict()))
    assert load_config(tmp_path).text_config.hidden_size == 4096
    assert load_config(tmp_path / "config.json").vision_config.patch_size == 14


def test_meta_models_have_the_published_parameter_counts(meta_llava, meta_qwen):
    assert all(p.device.type == "meta" for p in meta_llava.parameters())
    n_llava, n_qwen = count_parameters(meta_llava), count_parameters(meta_qwen)
    # Model cards: llava-1.5-7b-hf 7.06B, Qwen2-VL-7B-Instruct 8.29B (exact: 7,063,427,072 / 8,291,375,616).
    assert abs(n_llava - 7.06e9) / 7.06e9 < 0.01
    assert abs(n_qwen - 8.29e9) / 8.29e9 < 0.01


def _linear_weights(module: nn.Module) -> int:
    return sum(m.weight.numel() for m in module.modules() if isinstance(m, nn.Linear))


@pytest.mark.parametrize("which", ["llava", "qwen"])
def test_7b_linear_flops_are_two_per_weight_per_token(which, meta_llava, meta_qwen):
    model = meta_llava if which == "llava" else meta_qwen
    kw = {"image_patches": 2304} if which == "qwen" else {}
    batch, text, visual = 2, 64, 576
    tokens = batch * (text + visual)
    f = prefill_flops(model.config, text_tokens=text, visual_tokens=visual, batch=batch, logits="all", **kw)
    assert f.llm_linear == 2 * _linear_weights(model.model.language_model) * tokens
    assert f.lm_head == 2 * model.lm_head.weight.numel() * tokens
    last = prefill_flops(model.config, text_tokens=text, visual_tokens=visual, batch=batch, **kw)
    assert last.lm_head == 2 * model.lm_head.weight.numel() * batch
    assert last.llm - last.lm_head == f.llm - f.lm_head


def test_7b_meta_forward_matches_flop_counter(meta_llava, meta_qwen):
    # On meta tensors SDPA decomposes into counted bmm's, so FlopCounterMode sees the full 7B graph.
    cfg = meta_llava.config
    f = prefill_flops(cfg, text_tokens=64, visual_tokens=576)
    px = torch.empty(1, 3, 336, 336, device="meta")
    assert count_flops(lambda: meta_llava.model.get_image_features(pixel_values=px)) == f.vision + f.projector
    emb = torch.empty(1, 640, 4096, device="meta")
    assert count_flops(lambda: meta_llava.model.language_model(inputs_embeds=emb)) == f.llm - f.lm_head

    fq = prefill_flops(meta_qwen.config, text_tokens=64, visual_tokens=576, image_patches=2304)
    emb = torch.empty(1, 640, 3584, device="meta")
    assert count_flops(lambda: meta_qwen.model.language_model(inputs_embeds=emb)) == fq.llm - fq.lm_head


def test_reduction_ratio_for_llava_576_to_64():
    cfg = load_config("llava-1.5-7b")
    saved = llm_prefill_reduction(cfg, text_tokens=64, visual_tokens=576, reduced_visual_tokens=64)
    assert saved == pytest.approx(0.804, abs=1e-3)  # pins the convention documented in the docstring
    fewer = llm_prefill_reduction(cfg, text_tokens=64, visual_tokens=576, reduced_visual_tokens=16)
    assert saved < fewer < 1.0


# ------------------------------------------------------------------------------------------------
# FLOPs vs FlopCounterMode on tiny real models
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_tiny_llava_flops_match_flop_counter(attn):
    model = tiny_with_attn("llava", attn)
    cfg = model.config
    batch, inputs = 2, llava_batch(cfg, batch=2)
    seq = inputs["input_ids"].shape[1]
    visual = visual_per_row(cfg, inputs["input_ids"])[0]
    text = seq - visual
    assert visual == 64

    per_seq = prefill_flops(cfg, text_tokens=text, visual_tokens=visual, logits="last")
    f = prefill_flops(cfg, text_tokens=text, visual_tokens=visual, batch=batch, logits="last")
    assert f.total == batch * per_seq.total

    # vision tower (all CLIP layers, CLS included) + projector, two images
    vision = count_flops(lambda: model.model.get_image_features(pixel_values=inputs["pixel_values"]))
    assert vision == f.vision + f.projector

    # LLM alone over text + visual positions
    emb = torch.randn(batch, text + visual, cfg.text_config.hidden_size)
    assert count_flops(lambda: model.model.language_model(inputs_embeds=emb)) == f.llm - f.lm_head

    # whole model, lm_head on the last position (generate) or on all positions (plain forward)
    assert count_flops(lambda: model(**inputs, logits_to_keep=1)) == f.total
    f_all = prefill_flops(cfg, text_tokens=text, visual_tokens=visual, batch=batch, logits="all")
    assert count_flops(lambda: model(**inputs)) == f_all.total


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_tiny_qwen2vl_flops_match_flop_counter(attn):
    model = tiny_with_attn("qwen2_vl", attn)
    cfg = model.config
    inputs = qwen2_vl_inputs(cfg, image_hw=QWEN_TWO_IMAGES, seed=2)
    patches = inputs["image_grid_thw"].prod(-1).tolist()
    assert patches == [24, 16]  # -> 6 + 4 visual tokens
    seq = inputs["input_ids"].shape[1]
    visual = visual_per_row(cfg, inputs["input_ids"])[0]
    assert visual == 10
    f = prefill_flops(cfg, text_tokens=seq - visual, visual_tokens=visual, images=2, image_patches=patches)

    vision = count_flops(
        lambda: model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])
    )
    assert vision == f.vision + f.projector
    emb = torch.randn(1, seq, cfg.text_config.hidden_size)
    assert count_flops(lambda: model.model.language_model(inputs_embeds=emb)) == f.llm - f.lm_head
    assert count_flops(lambda: model(**inputs, logits_to_keep=1)) == f.total


def test_decode_flops_match_a_cached_step(llava):
    inputs = llava_batch(llava.config, batch=2)
    with torch.inference_mode():
        out = llava(**inputs, use_cache=True)
    cache = output_cache(out)
    ctx = cache.get_seq_length()
    step = {
        "input_ids": torch.full((2, 1), 5),
        "attention_mask": torch.ones(2, ctx + 1, dtype=torch.long),
        CACHE_KWARG: cache,
        "use_cache": True,
    }
    assert count_flops(lambda: llava(**step)) == decode_flops(llava.config, ctx, batch=2)


def test_causal_option_counts_the_lower_triangle():
    cfg = load_config("llava-1.5-7b")
    full = prefill_flops(cfg, text_tokens=64, visual_tokens=576)
    causal = prefill_flops(cfg, text_tokens=64, visual_tokens=576, attention="causal")
    s = 640
    assert causal.llm_attention * 2 * s == full.llm_attention * (s + 1)
    assert causal.llm_linear == full.llm_linear and causal.vision == full.vision


# ------------------------------------------------------------------------------------------------
# KV cache
# ------------------------------------------------------------------------------------------------


def _cache_nbytes(cache) -> int:
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kv_cache_bytes_match_dynamic_cache_llava(dtype, tmp_path):
    model = build_tiny("llava", tmp_path / "llava", dtype=dtype)
    inputs = llava_batch(model.config, batch=2)
    with torch.inference_mode():
        cache = output_cache(model(**inputs, use_cache=True))
    seq = inputs["input_ids"].shape[1]
    assert _cache_nbytes(cache) == kv_cache_bytes(model.config, seq, batch=2, dtype=dtype)


@pytest.mark.parametrize("sliding", [False, True])
def test_kv_cache_bytes_match_dynamic_cache_qwen(sliding, tmp_path):
    overrides = {"text_config": {"use_sliding_window": True, "sliding_window": 8, "max_window_layers": 1}}
    model = build_tiny("qwen2_vl", tmp_path / "qwen", **(overrides if sliding else {}))
    inputs = qwen2_vl_inputs(model.config, image_hw=QWEN_TWO_IMAGES, seed=2)
    seq = inputs["input_ids"].shape[1]
    if sliding:  # the override survived save/reload, and the window is shorter than the prompt
        assert "sliding_attention" in model.config.text_config.layer_types
        assert seq > model.config.text_config.sliding_window
    with torch.inference_mode():
        cache = output_cache(model(**inputs, use_cache=True))
    assert _cache_nbytes(cache) == kv_cache_bytes(model.config, seq, dtype=torch.float32)


def test_kv_cache_bytes_formula_for_7b():
    # 2 * layers * kv_heads * head_dim * 2 bytes per token
    assert kv_cache_bytes(load_config("llava-1.5-7b"), 1) == 2 * 32 * 32 * 128 * 2
    assert kv_cache_bytes(load_config("qwen2-vl-7b"), 640, batch=3) == 2 * 28 * 4 * 128 * 2 * 640 * 3


# ------------------------------------------------------------------------------------------------
# latency and profile
# ------------------------------------------------------------------------------------------------


def _assert_timings(rep, decode_tokens: int) -> None:
    for value in (rep.prefill_s, rep.prefill_min_s, rep.prefill_max_s, rep.decode_s_per_token):
        assert value is not None and math.isfinite(value) and value > 0
    assert rep.prefill_min_s <= rep.prefill_s <= rep.prefill_max_s
    assert len(rep.prefill_samples) == rep.repeats
    assert len(rep.decode_samples) == rep.repeats * decode_tokens
    assert rep.peak_memory_bytes is None  # CPU: documented as not measured


@pytest.mark.parametrize("batch", [1, 2])
def test_measure_latency_llava_matches_generate(batch, llava):
    inputs = llava_batch(llava.config, batch=batch)
    rep = measure_latency(llava, inputs, decode_tokens=3, warmup=1, repeats=2)
    _assert_timings(rep, 3)
    seq = inputs["input_ids"].shape[1]
    assert (rep.batch, rep.prompt_len, rep.cache_len) == (batch, seq, seq)
    assert rep.cache_bytes == kv_cache_bytes(llava.config, seq, batch, torch.float32)
    with torch.inference_mode():
        ref = llava.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert rep.generated_ids == ref[:, seq:].tolist()


def test_measure_latency_qwen2vl_matches_generate(qwen):
    inputs = qwen2_vl_inputs(qwen.config, image_hw=QWEN_TWO_IMAGES, seed=2)
    rep = measure_latency(qwen, inputs, decode_tokens=3, warmup=0, repeats=2)
    _assert_timings(rep, 3)
    seq = inputs["input_ids"].shape[1]
    assert rep.cache_len == seq
    with torch.inference_mode():
        ref = qwen.generate(**inputs, max_new_tokens=4, do_sample=False)
    # decode positions come from the stored rope_deltas, as in generate
    assert rep.generated_ids == ref[:, seq:].tolist()


@pytest.mark.parametrize("batch", [1, 2])
def test_profile_llava_baseline(batch, llava):
    inputs = llava_batch(llava.config, batch=batch)
    rep = profile(llava, inputs, decode_tokens=2, warmup=0, repeats=1)
    seq = inputs["input_ids"].shape[1]
    per_row = visual_per_row(llava.config, inputs["input_ids"])
    n_img = sum(per_row)
    assert rep.method == "baseline"
    assert rep.visual_tokens == n_img == 64 * batch
    assert rep.visual_tokens_per_sample == per_row == [64] * batch
    assert (rep.batch, rep.seq_len, rep.prompt_len, rep.images) == (batch, seq, seq, batch)
    assert rep.text_tokens == batch * seq - n_img
    assert rep.latency.cache_len == rep.seq_len
    assert rep.kv_cache_bytes == rep.latency.cache_bytes
    ref = prefill_flops(llava.config, text_tokens=seq - 64, visual_tokens=64, batch=batch)
    assert rep.flops == ref
    _assert_timings(rep.latency, 2)
    json.dumps(rep.as_dict())
    assert not llava.model._forward_pre_hooks  # observation hook removed


def test_profile_qwen2vl_image_and_video(qwen):
    # a 56x56 image -> grid (1, 4, 4) -> 4 tokens; a 4-frame 56x56 clip -> grid (2, 4, 4) -> 8 tokens
    inputs = qwen2_vl_inputs(qwen.config, image_hw=[(56, 56)], video=(4, 56, 56), seed=2)
    rep = profile(qwen, inputs, decode_tokens=2, warmup=0, repeats=1)
    n_vis = sum(visual_per_row(qwen.config, inputs["input_ids"]))
    assert rep.visual_tokens == n_vis == 12
    assert rep.seq_len == rep.latency.cache_len == inputs["input_ids"].shape[1]
    assert rep.images == 2
    assert rep.kv_cache_bytes == rep.latency.cache_bytes
    # the video attends per frame; check the encoder accounting against the real forward
    image = count_flops(lambda: qwen.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"]))
    video = count_flops(
        lambda: qwen.model.get_video_features(inputs["pixel_values_videos"], inputs["video_grid_thw"])
    )
    assert rep.flops.vision + rep.flops.projector == image + video
    _assert_timings(rep.latency, 2)


def test_profile_with_method_sees_reduced_sequence(llava):
    inputs = llava_batch(llava.config, batch=2)
    seq = inputs["input_ids"].shape[1]
    visual = visual_per_row(llava.config, inputs["input_ids"])
    assert visual == [64, 64]
    base = profile(llava, inputs, decode_tokens=2, warmup=0, repeats=1)
    reducer = mmeff.UniformKeep(tokens=16)
    red = profile(llava, inputs, reducer, decode_tokens=2, warmup=1, repeats=1)
    assert red.method == reducer.name == "uniform"
    assert red.visual_tokens_per_sample == [16, 16]
    assert red.seq_len == red.latency.cache_len == seq - (64 - 16)
    assert red.prompt_len == seq
    assert red.flops.vision == base.flops.vision  # the encoder still ran on the full image
    ref = prefill_flops(llava.config, text_tokens=seq - 64, visual_tokens=16, batch=2)
    assert red.flops.llm == ref.llm
    assert red.kv_cache_bytes == red.latency.cache_bytes < base.kv_cache_bytes
    _assert_timings(red.latency, 2)
    # mmeff.apply restored the model: no hooks, no wrapped generate, no adapter left behind
    assert not llava._forward_pre_hooks and not llava.model._forward_pre_hooks
    assert "generate" not in llava.__dict__ and "_mmeff_adapter" not in llava.__dict__


# ------------------------------------------------------------------------------------------------
# bad input
# ------------------------------------------------------------------------------------------------


def test_bad_input_is_named(llava):
    cfg = load_config("llava-1.5-7b")
    with pytest.raises(ValueError, match="text_tokens"):
        prefill_flops(cfg, text_tokens=-1, visual_tokens=576)
    with pytest.raises(TypeError, match="visual_tokens"):
        prefill_flops(cfg, text_tokens=1, visual_tokens=5.0)
    with pytest.raises(ValueError, match="logits"):
        prefill_flops(cfg, text_tokens=1, visual_tokens=576, logits="first")
    with pytest.raises(ValueError, match="images=0"):
        prefill_flops(cfg, text_tokens=1, visual_tokens=576, images=0)
    with pytest.raises(ValueError, match="image_patches"):
        prefill_flops(cfg, text_tokens=1, visual_tokens=576, images=2, image_patches=[576])
    with pytest.raises(TypeError, match="unsupported config class LlamaConfig"):
        prefill_flops(LlamaConfig(), text_tokens=1, visual_tokens=0)
    with pytest.raises(TypeError, match="PretrainedConfig"):
        kv_cache_bytes({"model_type": "llava"}, 10)
    with pytest.raises(TypeError, match="dtype"):
        kv_cache_bytes(cfg, 10, dtype="float16")
    with pytest.raises(ValueError, match="context_len"):
        decode_flops(cfg, -5)
    with pytest.raises(ValueError, match="no config found"):
        load_config("no-such-model-anywhere")
    with pytest.raises(ValueError, match="repeats"):
        measure_latency(llava, llava_batch(llava.config), repeats=0)
    assert isinstance(prefill_flops(cfg, text_tokens=5, visual_tokens=0, images=0), FlopBreakdown)


def test_median_seconds_warms_up_once_and_checks_repeats() -> None:
    calls: list[int] = []
    t = median_seconds(lambda a, b: calls.append(a + b), 1, 2, repeats=4)
    assert calls == [3] * 5 and t >= 0.0  # one untimed warm-up + 4 timed calls
    with pytest.raises(ValueError, match="repeats must be >= 1"):
        median_seconds(lambda: None, repeats=0)
