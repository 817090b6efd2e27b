"""Integrity of what mmeff reads back from disk: the model cache is checked against the sha256 recorded when
it was written (and rebuilt when it no longer matches), user weight folders are checked against their
manifest, and the loaders of Instruct-IPT, FlatQuant and the mini CLIP refuse a wrong file with one line
that names it."""

from __future__ import annotations

import hashlib
import json
import shutil
import warnings
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from mmeff.models import cache as cache_module
from mmeff.models import mini
from mmeff.models.cache import atomic_write_cache, cache_complete
from mmeff.models.embedded import default_model
from mmeff.models.instruct_ipt import _FORMAT, InstructIPT, create_model
from mmeff.models.tiny import build_tiny
from mmeff.quant.flatquant import QuantConfig, load_quantized, quantize


def _flip_last_byte(path: Path) -> None:
    # the last byte of a safetensors file is tensor data: the header still parses and the size is unchanged,
    # which is exactly what a size-only check cannot see
    with open(path, "r+b") as f:
        f.seek(-1, 2)
        last = f.read(1)
        f.seek(-1, 2)
        f.write(bytes([last[0] ^ 0x40]))


def _one_line(excinfo: pytest.ExceptionInfo) -> str:
    text = str(excinfo.value)
    assert "\n" not in text, text
    return text


# --------------------------------------------------------------------------------------------------
# the model cache (mmeff.models.embedded.default_model), on a tiny LLaVA standing in for the built model
# --------------------------------------------------------------------------------------------------


def _tiny_tokenizer():
    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "<s>": 1, "</s>": 2, "<image>": 3, **{w: i + 4 for i, w in enumerate("abcdefgh")}}
    tok = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[UNK]", bos_token="<s>",
                                   eos_token="</s>")


def test_cache_with_a_flipped_byte_is_detected_and_rebuilt(tmp_path, monkeypatch) -> None:
    from mmeff.models import mini_vlm

    builds = []

    def fake_build_vlm(*args, **kwargs):
        builds.append(1)
        model = build_tiny("llava", tmp_path / f"src{len(builds)}", seed=0)
        return model, _tiny_tokenizer(), {"name": "tiny stand-in"}

    monkeypatch.setattr(mini_vlm, "build_vlm", fake_build_vlm)
    cache = tmp_path / "cache"
    first, _, info = default_model(cache)
    original = {k: v.clone() for k, v in first.state_dict().items()}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an intact cache is reused without a word
        default_model(cache)
    assert len(builds) == 1

    folder = Path(info["path"])
    weights = folder / "model.safetensors"
    _flip_last_byte(weights)
    with pytest.warns(RuntimeWarning, match=r"model\.safetensors does not match the sha256") as record:
        again, _, _ = default_model(cache)
    assert len(builds) == 2  # rebuilt, not used
    assert all("\n" not in str(w.message) for w in record)
    got = again.state_dict()
    assert set(got) == set(original) and all(torch.equal(got[k], original[k]) for k in original)
    assert cache_complete(folder, warn=False)


def test_cache_without_a_sha256_record_is_rebuilt(tmp_path) -> None:
    final = tmp_path / "thing"
    atomic_write_cache(final, lambda tmp: (tmp / "w.bin").write_bytes(b"y" * 100), {"artefact": "t"})
    marker = final / cache_module._MARKER
    meta = json.loads(marker.read_text())
    assert meta["sha256"] == {"w.bin": hashlib.sha256(b"y" * 100).hexdigest()}
    del meta["sha256"]  # what an older mmeff wrote: sizes only
    marker.write_text(json.dumps(meta))
    with pytest.warns(RuntimeWarning, match=r"w\.bin has no sha256 on record"):
        assert not cache_complete(final, {"artefact": "t"})
    atomic_write_cache(final, lambda tmp: (tmp / "w.bin").write_bytes(b"y" * 100), {"artefact": "t"})
    assert cache_complete(final, {"artefact": "t"})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["thing"]  # no temp folders left behind


# --------------------------------------------------------------------------------------------------
# weights_path(folder=...)
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("with_manifest", [True, False])
def test_weights_path_folder_checks_the_hash(tmp_path, with_manifest) -> None:
    name = mini.WEIGHT_FILES["clip"]
    shutil.copyfile(mini.WEIGHTS_DIR / name, tmp_path / name)
    if with_manifest:  # a folder `mmeff mini train --out` wrote: checked against its own record
        shutil.copyfile(mini.WEIGHTS_DIR / "manifest.json", tmp_path / "manifest.json")
    assert mini.weights_path("clip", tmp_path) == tmp_path / name
    _flip_last_byte(tmp_path / name)
    with pytest.raises(ValueError, match="do not match manifest.json") as e:
        mini.weights_path("clip", tmp_path)
    assert str(tmp_path / name) in _one_line(e)
    assert mini.weights_path("clip", tmp_path, check=False) == tmp_path / name  # opting out still works


# --------------------------------------------------------------------------------------------------
# InstructIPT.load
# --------------------------------------------------------------------------------------------------


def test_instruct_ipt_load_refuses_wrong_files_in_one_line(tmp_path) -> None:
    model = create_model("instruct_ipt_tiny")
    path = model.save(tmp_path / "ipt.safetensors")
    back = InstructIPT.load(path)
    assert all(torch.equal(back.state_dict()[k], v) for k, v in model.state_dict().items())

    with pytest.raises(ValueError, match="is a directory") as e:
        InstructIPT.load(tmp_path)
    assert str(tmp_path) in _one_line(e)
    with pytest.raises(FileNotFoundError, match="no such file"):
        InstructIPT.load(tmp_path / "absent.safetensors")
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(bytes(range(256)) * 8)
    with pytest.raises(ValueError, match="not a safetensors file") as e:
        InstructIPT.load(garbage)
    assert str(garbage) in _one_line(e)

    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    state.pop(sorted(state)[0])
    short = tmp_path / "short.safetensors"
    save_file(state, str(short), metadata={"format": _FORMAT, "config": json.dumps(asdict(model.cfg))})
    with pytest.raises(ValueError, match="missing") as e:
        InstructIPT.load(short)
    assert str(short) in _one_line(e)

    _flip_last_byte(path)
    with pytest.raises(ValueError, match="do not match the sha256") as e:
        InstructIPT.load(path)
    assert str(path) in _one_line(e)


# --------------------------------------------------------------------------------------------------
# flatquant.load_quantized
# --------------------------------------------------------------------------------------------------


def test_load_quantized_refuses_wrong_files_in_one_line(tmp_path) -> None:
    model = build_tiny("llama", tmp_path / "llama", intermediate_size=48)
    ids = torch.randint(4, 128, (2, 8), generator=torch.Generator().manual_seed(0))
    handle = quantize(model, QuantConfig(method="rtn", samples=2, seq_len=8), ids, progress=False)
    out = tmp_path / "q"
    handle.save(out)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "mmeff_quant.json", "model.safetensors"]
    load_quantized(out)  # intact: loads

    # the class is named by the file: only a transformers causal LM may be built from it
    meta_file = out / "mmeff_quant.json"
    good = meta_file.read_text()
    for arch in ("pipeline", "AutoTokenizer", "LlamaModel", "os"):
        meta_file.write_text(json.dumps({**json.loads(good), "architecture": arch}))
        with pytest.raises(ValueError, match=f"architecture '{arch}' is not a transformers \\*ForCausalLM class"):
            load_quantized(out)
    meta_file.write_text(good)

    garbage = tmp_path / "garbage.bin"
    garbage.write_bytes(bytes(range(256)) * 8)
    with pytest.raises(ValueError, match="is a file, not a folder") as e:
        load_quantized(garbage)
    assert str(garbage) in _one_line(e)
    with pytest.raises(FileNotFoundError, match="mmeff_quant.json"):
        load_quantized(tmp_path)  # a directory that is not a saved model

    weights = out / "model.safetensors"
    _flip_last_byte(weights)
    with pytest.raises(ValueError, match="does not match the sha256") as e:
        load_quantized(out)
    assert str(weights) in _one_line(e)

    # garbage weights under an older record (no sha256): the safetensors reader's error, in one line
    meta_file = out / "mmeff_quant.json"
    meta = json.loads(meta_file.read_text())
    del meta["sha256"]
    meta_file.write_text(json.dumps(meta))
    weights.write_bytes(bytes(range(256)) * 8)
    with pytest.raises(ValueError, match="not a safetensors file") as e:
        load_quantized(out)
    assert str(weights) in _one_line(e)
    weights.unlink()
    weights.mkdir()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_quantized(out)
    meta_file.write_text("{not json")
    with pytest.raises(ValueError, match="not the record") as e:
        load_quantized(out)
    assert str(meta_file) in _one_line(e)


# --------------------------------------------------------------------------------------------------
# create_clip(path)
# --------------------------------------------------------------------------------------------------


def test_create_clip_refuses_a_wrong_file_in_one_line(tmp_path) -> None:
    garbage = tmp_path / "garbage.bin"
    garbage.write_bytes(bytes(range(256)) * 8)
    with pytest.raises(ValueError, match="not a safetensors file") as e:
        mini.create_clip(garbage)
    assert str(garbage) in _one_line(e)
    other = tmp_path / "other.safetensors"
    save_file({"w": torch.zeros(2)}, str(other))
    with pytest.raises(ValueError, match="is not an mmeff-mini-clip weights file") as e:
        mini.create_clip(other)
    assert str(other) in _one_line(e)
    with pytest.raises(ValueError, match="is a directory") as e:
        mini.create_clip(tmp_path)
    model = mini.create_clip(None)
    loaded = mini.create_clip(mini.save_clip(model, tmp_path / "clip.safetensors")).state_dict()
    want = model.state_dict()
    assert set(loaded) == set(want)
    assert all(torch.equal(loaded[k], v.half().to(v.dtype)) for k, v in want.items())  # fp16 as stored


def test_llava_weights_file_errors_are_one_line(tmp_path) -> None:
    from mmeff.models.mini import read_llava_file

    with pytest.raises(FileNotFoundError, match="no such file"):
        read_llava_file(tmp_path / "none.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 32)
    with pytest.raises(ValueError, match="junk.safetensors is not a readable safetensors file"):
        read_llava_file(tmp_path / "junk.safetensors")
