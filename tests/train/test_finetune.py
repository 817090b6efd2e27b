"""Fine-tuning with a reducer in place: one real optimisation step, frozen parts, data and the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from mmeff.cli.main import main
from mmeff.datasets.media import sample_image
from mmeff.methods.fourier import FourierLowPass
from mmeff.models import tiny as models
from mmeff.train.finetune import conversation_ids, finetune, llava_sft_batches, load_llava_json, model_parts


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
    return models.build_tiny(
        "llava", tmp_path_factory.mktemp("llava"), seed=0, vision_config={"image_size": 112, "patch_size": 8}
    )


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    return models.build_tiny("qwen2_vl", tmp_path_factory.mktemp("qwen"), seed=0)


def _with_labels(inp: dict, image_ids: tuple[int, ...]) -> dict:
    ids = inp["input_ids"]
    labels = ids.clone()
    labels[inp["attention_mask"] == 0] = -100
    for i in image_ids:
        labels[ids == i] = -100
    return {**inp, "labels": labels}


def _snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters()}


def _changed(module: torch.nn.Module, before: dict[str, torch.Tensor]) -> set[str]:
    return {n for n, p in module.named_parameters() if not torch.equal(p.detach(), before[n])}


def test_one_step_updates_only_the_projector_llava(llava):
    parts = model_parts(llava)
    before = {k: _snapshot(m) for k, m in parts.items()}
    flags = {n: p.requires_grad for n, p in llava.named_parameters()}
    batch = _with_labels(models.llava_inputs(llava.config, batch=2), (llava.config.image_token_id,))
    res = finetune(llava, FourierLowPass(tokens=16), [batch], train=("projector",), lr=1e-3, progress=False)
    assert res.steps == 1 and np.isfinite(res.losses[0]) and res.losses[0] > 0
    assert res.stats["stage"] == "pre_projector" and res.stats["visual_tokens_out"] == 32
    assert _changed(parts["projector"], before["projector"]) == {n for n, _ in parts["projector"].named_parameters()}
    for frozen in ("llm", "vision", "lm_head"):
        assert not _changed(parts[frozen], before[frozen]), frozen
    assert {n: p.requires_grad for n, p in llava.named_parameters()} == flags
    assert not llava.training


def test_loss_goes_down_on_a_repeated_batch(llava):
    batch = _with_labels(models.llava_inputs(llava.config, batch=1, seed=3), (llava.config.image_token_id,))
    res = finetune(llava, FourierLowPass(tokens=16), [batch] * 6, train=("projector", "llm"), lr=3e-3, progress=False)
    assert res.steps == 6 and res.losses[-1] < res.losses[0]


def test_qwen_gradient_flows_through_the_filter_into_the_merger(qwen):
    parts = model_parts(qwen)
    before = _snapshot(parts["vision"])
    inp = models.qwen2_vl_inputs(qwen.config, batch=2, image_hw=[(112, 84)], video=[None, (2, 56, 56)])
    batch = _with_labels(inp, (qwen.config.image_token_id, qwen.config.video_token_id))
    res = finetune(qwen, FourierLowPass(axis_ratio=2 / 3), [batch, batch], train="projector", grad_accum=2,
                   lr=1e-3, progress=False, mrope="regrid")
    assert res.steps == 1
    changed = _changed(parts["vision"], before)
    assert changed and all(n.startswith("merger.") for n in changed)
    assert all(n.startswith("model.visual.merger.") for n in res.trainable)


def test_bad_calls(llava):
    batch = models.llava_inputs(llava.config, batch=1)
    with pytest.raises(ValueError, match="has no labels"):
        finetune(llava, FourierLowPass(tokens=16), [batch], progress=False)
    with pytest.raises(ValueError, match="train must name parts"):
        finetune(llava, None, [batch], train=("adapter",), progress=False)
    with pytest.raises(ValueError, match="ran out before one optimizer step"):
        finetune(llava, None, [], progress=False)
    with pytest.raises(TypeError, match="HF LLaVA / Qwen2-VL"):
        model_parts(torch.nn.Linear(2, 2))


# ------------------------------------------------------------------------------------------------ data


def test_conversation_labels_cover_assistant_turns_only(smollm2):
    _, tok = smollm2
    msgs = [
        {"role": "user", "content": "<image>\nWhat is this?"},
        {"role": "assistant", "content": "A rocket."},
        {"role": "user", "content": "And the colour?"},
        {"role": "assistant", "content": "White."},
    ]
    ids, labels = conversation_ids(tok, msgs, image_token_id=7, tokens_per_image=5)
    assert len(ids) == len(labels) and ids.count(7) == 5
    spans, cur = [], []
    for i, lab in zip(ids, labels, strict=True):
        if lab != -100:
            assert lab == i
            cur.append(i)
        elif cur:
            spans.append(cur)
            cur = []
    if cur:
        spans.append(cur)
    texts = [tok.decode(s) for s in spans]
    assert len(texts) == 2 and texts[0].startswith("A rocket.") and texts[1].startswith("White.")
    assert all("user" not in t for t in texts)
    with pytest.raises(ValueError, match="must end with an assistant turn"):
        conversation_ids(tok, msgs[:1], image_token_id=7, tokens_per_image=5)


def _write_dataset(folder, n=3, missing=False):
    Image.fromarray(sample_image("astronaut")).save(folder / "a.png")
    recs = [
        {"image": "a.png" if not missing else "nope.png",
         "conversations": [{"from": "human", "value": f"<image>\nQuestion {i}?"}, {"from": "gpt", "value": f"Answer {i}."}]}
        for i in range(n)
    ]
    path = folder / "data.json"
    path.write_text(json.dumps(recs))
    return path


def test_load_llava_json_and_batches(tmp_path, llava, smollm2):
    _, tok = smollm2
    recs = load_llava_json(_write_dataset(tmp_path))
    assert len(recs) == 3 and recs[0]["messages"][1] == {"role": "assistant", "content": "Answer 0."}
    cfg = llava.config
    batches = list(llava_sft_batches(llava, tok, recs, batch_size=2))
    assert [b["input_ids"].shape[0] for b in batches] == [2, 1]
    b = batches[0]
    assert b["pixel_values"].shape == (2, 3, 112, 112)
    assert int((b["input_ids"] == cfg.image_token_id).sum()) == 2 * 196
    assert b["labels"].shape == b["input_ids"].shape and int((b["labels"] != -100).sum()) > 0
    assert b["attention_mask"][:, 0].all(), "training batches are right padded"


def test_load_llava_json_errors(tmp_path):
    with pytest.raises(ValueError, match="image file"):
        load_llava_json(_write_dataset(tmp_path, missing=True))
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_llava_json(bad)
    bad.write_text(json.dumps([{"image": "a.png", "conversations": [{"from": "human", "value": "no marker"}]}]))
    with pytest.raises(ValueError, match="0 <image> markers but 1 images"):
        load_llava_json(bad)


def test_cli_finetune_on_default_model(tmp_path, default, model_cache, capsys):
    path = _write_dataset(tmp_path, n=2)
    rc = main(["finetune", "--data", str(path), "--tokens", "16", "--steps", "1", "--batch-size", "2",
               "--cache-dir", str(model_cache)])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "fourier(tokens=16" in out and "for 1 steps" in out and "'visual_tokens_out': 32" in out
