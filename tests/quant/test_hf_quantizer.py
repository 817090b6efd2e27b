"""The HF route of quantized folders: ``FlatQuantHandle.save`` writes a folder that
``AutoModelForCausalLM.from_pretrained`` restores (the registered ``mmeff_flatquant`` quantizer) to the
same logits and generations, ``save_pretrained`` of that model writes one that loads again, a config that
does not belong to its weights is refused in one line, and folders of the old layout still load."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoModelForImageTextToText
from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING

import mmeff.quant  # noqa: F401  (registers the quantizer, as ``import mmeff`` does)
from mmeff.models.tiny import build_tiny, llava_inputs, qwen2_vl_inputs
from mmeff.quant.flatquant import HF_QUANT_METHOD, LoadedLayerQuant, QuantConfig, load_quantized, quantize
from mmeff.quant.hf_quantizer import FlatQuantConfig, FlatQuantHfQuantizer, handle_of, register

CASES = {
    # learned FlatQuant transforms, W4A4 with 4-bit K/V, tied embeddings (save_model writes one name of the two)
    "flatquant-w4a4kv4": ("llama", True, dict(method="flatquant", w_bits=4, a_bits=4, kv_bits=4, epochs=1)),
    # mmeff's GPTQ: weight-only 4-bit GPTQ without transforms, on Qwen2 (q/k/v biases) with the LM head quantized
    "gptq-w4a16": ("qwen2", False, dict(method="rtn", weights="gptq", w_bits=4, a_bits=16, kv_bits=16, lm_head=True)),
}


def _ids(n: int, t: int, seed: int) -> torch.Tensor:
    return torch.randint(4, 128, (n, t), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module", params=list(CASES))
def saved(request, tmp_path_factory):
    """``(folder, in-memory quantized model, its handle, eval ids)`` for each case."""
    kind, tied, fields = CASES[request.param]
    root = tmp_path_factory.mktemp(request.param)
    model = build_tiny(kind, root / "fp", intermediate_size=48)
    if tied:
        model.config.tie_word_embeddings = True
        model.tie_weights()
    handle = quantize(model, QuantConfig(samples=4, seq_len=16, batch_size=4, **fields), _ids(4, 16, 0),
                      progress=False)
    handle.save(root / "q")
    return root / "q", model, handle, _ids(2, 12, 5)


def _logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def test_from_pretrained_gives_the_quantized_model(saved):
    folder, model, handle, ev = saved
    ref = _logits(model, ev)
    m2, info = AutoModelForCausalLM.from_pretrained(folder, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    out = _logits(m2, ev)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    h2 = handle_of(m2)
    assert h2.cfg == handle.cfg and h2.quantized() == handle.quantized() and h2.base_attn == handle.base_attn
    assert isinstance(m2.config.quantization_config, FlatQuantConfig)
    if handle.cfg.kv_bits < 16:
        assert m2.config._attn_implementation.startswith("mmeff_flatquant")
    prompt = ev[:1, :6]
    g_ref = model.generate(prompt, max_new_tokens=6, do_sample=False)
    assert torch.equal(m2.generate(prompt, max_new_tokens=6, do_sample=False), g_ref)


def test_save_pretrained_writes_what_from_pretrained_reads(saved, tmp_path):
    folder, model, _, ev = saved
    m2 = AutoModelForCausalLM.from_pretrained(folder)
    m2.save_pretrained(tmp_path / "again")
    written = json.loads((tmp_path / "again" / "config.json").read_text())["quantization_config"]
    assert written == json.loads((folder / "config.json").read_text())["quantization_config"]
    assert FlatQuantConfig.from_dict(written).to_dict() == written  # the config round-trips through JSON
    m3 = AutoModelForCausalLM.from_pretrained(tmp_path / "again")
    ref = _logits(model, ev)
    torch.testing.assert_close(_logits(m3, ev), ref, atol=1e-5, rtol=0)
    handle_of(m3).save(tmp_path / "handle")  # the handle of a loaded model saves both ways too
    torch.testing.assert_close(_logits(load_quantized(tmp_path / "handle")[0], ev), ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(_logits(AutoModelForCausalLM.from_pretrained(tmp_path / "handle"), ev), ref,
                               atol=1e-5, rtol=0)


def test_transforms_stay_float32_under_dtype_casts(saved):
    folder, _, _, ev = saved
    m = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
    lqs = [lq for lq in m.modules() if isinstance(lq, LoadedLayerQuant)]
    assert len(lqs) == m.config.num_hidden_layers and all(p.dtype == torch.float32 for lq in lqs for p in lq.parameters())
    assert m.get_input_embeddings().weight.dtype == torch.bfloat16
    assert torch.isfinite(_logits(m, ev)).all()
    m2, _ = load_quantized(folder, dtype=torch.bfloat16)
    assert all(p.dtype == torch.float32 for lq in m2.modules() if isinstance(lq, LoadedLayerQuant) for p in lq.parameters())


def _edit_config(folder, tmp_path, edit) -> object:
    out = tmp_path / "edited"
    out.mkdir()
    for f in folder.iterdir():
        (out / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((folder / "config.json").read_text())
    edit(cfg["quantization_config"])
    (out / "config.json").write_text(json.dumps(cfg))
    return out


BAD = {
    "unknown field": (lambda q: q.update(w_bitz=4), "unknown field"),
    "out of range": (lambda q: q.update(w_bits=5), "w_bits must be one of"),
    "wrong type": (lambda q: q.update(kv_bits="4"), "kv_bits must be int"),
    "bool as number": (lambda q: q.update(seed=True), "seed must be int"),
    "attention": (lambda q: q.update(base_attn="flash_attention_2"), "base_attn must be 'sdpa' or 'eager'"),
    "other bits": (lambda q: q.update(w_bits=8), "the config does not belong to these weights"),
    "module missing": (lambda q: q["modules"].pop(), "modules do not match the checkpoint's codes"),
    "module renamed": (lambda q: q["modules"].__setitem__(0, "model.norm"), "modules do not match"),
    "codes not listed": (lambda q: q.update(modules=[]), "not listed"),
    "modules not a list": (lambda q: q.update(modules="model.layers.0.mlp.up_proj"), "modules must be a list"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_a_config_that_does_not_fit_is_one_line(saved, tmp_path, case):
    edit, msg = BAD[case]
    with pytest.raises(ValueError, match=msg) as e:
        AutoModelForCausalLM.from_pretrained(_edit_config(saved[0], tmp_path, edit))
    assert "\n" not in str(e.value).strip()


def test_quantizing_on_load_is_refused(tmp_path):
    build_tiny("llama", tmp_path / "fp", intermediate_size=48)
    with pytest.raises(ValueError, match="pre-quantized"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "fp", quantization_config=FlatQuantConfig())


def test_old_layout_still_loads_with_load_quantized(saved, tmp_path):
    """The layout before the HF route: transforms as top-level ``mmeff_fq.{i}.*``, tied tensors written
    twice, 0.2.0's one-sided LWC, no ``quantization_config``; ``load_quantized`` reads it to the same model."""
    folder, model, _, ev = saved
    old = tmp_path / "old"
    old.mkdir()
    sd = load_file(str(folder / "model.safetensors"))
    out = {}
    for k, v in sd.items():
        if ".mmeff_fq." in k:
            i, rest = k.split(".layers.", 1)[1].split(".mmeff_fq.")
            k = f"mmeff_fq.{i}.{rest}"
            v = v[:, :1].contiguous() if ".lwc." in k else v
        out[k] = v
    for name, p in model.named_parameters(remove_duplicate=False):  # the old save cloned tied tensors
        if name not in out and "mmeff_fq" not in name:
            out[name] = p.detach().clone()
    save_file(out, str(old / "model.safetensors"))
    cfg = json.loads((folder / "config.json").read_text())
    del cfg["quantization_config"]
    (old / "config.json").write_text(json.dumps(cfg))
    meta = json.loads((folder / "mmeff_quant.json").read_text())
    for k in ("sha256", "transforms"):  # folders from before the sha256 record load unchecked
        del meta[k]
    (old / "mmeff_quant.json").write_text(json.dumps(meta))
    m2, h2 = load_quantized(old)
    torch.testing.assert_close(_logits(m2, ev), _logits(model, ev), atol=1e-5, rtol=0)
    assert h2.layers[0].lwc["mlp__up_proj"].shape[1] == 2


@pytest.mark.parametrize("kind", ["llava", "qwen2_vl"])
def test_vlm_folders_load_through_their_auto_class(kind, tmp_path):
    """The LM inside a VLM is quantized the same way; ``AutoModelForImageTextToText`` restores it."""
    model = build_tiny(kind, tmp_path / "fp")
    handle = quantize(model, QuantConfig(method="hadamard", kv_bits=4), progress=False)
    inputs = (llava_inputs if kind == "llava" else qwen2_vl_inputs)(model.config)
    with torch.no_grad():
        ref = model(**inputs).logits
    handle.save(tmp_path / "q")
    m2 = AutoModelForImageTextToText.from_pretrained(tmp_path / "q")
    with torch.no_grad():
        torch.testing.assert_close(m2(**inputs).logits, ref, atol=1e-5, rtol=0)
    assert handle_of(m2).quantized() == handle.quantized()


def test_handle_of_and_registration():
    with pytest.raises(ValueError, match="was not loaded from a mmeff_flatquant folder"):
        handle_of(torch.nn.Linear(2, 2))
    register()  # a second registration is a no-op
    assert AUTO_QUANTIZER_MAPPING[HF_QUANT_METHOD] is FlatQuantHfQuantizer
    assert AUTO_QUANTIZATION_CONFIG_MAPPING[HF_QUANT_METHOD] is FlatQuantConfig
