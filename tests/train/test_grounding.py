"""The grounded mmeff-mini recipe (mmeff.train.grounding, its data in mmeff.train.grounding_data): dense
labels, the cached-feature training path against the model's own forward, conversations, weights round trip,
and `mmeff mini train` end to end at toy size."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from transformers import CLIPVisionModel

from mmeff.checkpoint import file_sha256
from mmeff.datasets.scenes import COLOURS, SHAPES, SceneObject, label_map, scene_sample
from mmeff.models import mini, mini_vlm
from mmeff.train import grounding, grounding_data
from mmeff.train.mini import scene_questions


@pytest.fixture(scope="module")
def tok():
    return mini_vlm.mini_tokenizer()


@pytest.fixture(scope="module")
def tiny_vlm(tok):
    return mini_vlm.new_vlm(tok, hidden=32, layers=2, heads=2, seed=0)


def test_label_map_marks_exactly_the_drawn_pixels() -> None:
    for i in range(6):
        s = scene_sample(3, i)  # flat background: every non-grey pixel is an object or the word
        lab = label_map(s.objects, 224, s.text)
        for k, o in enumerate(s.objects):
            drawn = (s.image == np.array(COLOURS[o.colour])).all(-1)
            assert ((lab == k + 1) == (drawn & (lab != 255))).all()
        grey = (s.image == np.array([90, 90, 90])).all(-1)
        assert (grey == (lab == 0)).mean() > 0.99  # the word's anti-aliased rim is the only disagreement


def test_patch_targets_of_a_hand_placed_scene() -> None:
    # a square filling patch rows 2-3, cols 2-3 exactly (56 px wide at 224 px) and a small circle
    sq = SceneObject("square", "blue", 3 / 8, 3 / 8, 0.25)
    small = SceneObject("circle", "red", (6 + 0.5) / 8, (1 + 0.5) / 8, 0.085)
    t = grounding_data.patch_targets([sq, small], "cat")
    grid = lambda k: t[k].reshape(8, 8)  # noqa: E731
    want = np.zeros((8, 8), int)
    want[2:4, 2:4] = 1 + list(COLOURS).index("blue")
    want[1, 6] = 1 + list(COLOURS).index("red")
    assert (grid("colour") == want).all()
    assert grid("shape")[2, 2] == 1 + SHAPES.index("square") and grid("shape")[1, 6] == 1 + SHAPES.index("circle")
    assert grid("size")[2, 2] == 2 and grid("size")[1, 6] == 1
    assert grid("centre").sum() == 2 and grid("centre")[3, 3] == 1 and grid("centre")[1, 6] == 1
    assert grid("cell")[2, 2] == 1 + 4  # centre (0.375, 0.375) -> "center"
    assert (t["n_all"] == 2).all() and (t["n_circle"] == 1).all() and (t["n_triangle"] == 0).all()
    assert grid("word")[7].sum() > 0 and grid("word")[:6].sum() == 0
    np.testing.assert_allclose(t["xy"][2 * 8 + 2], [0.375, 0.375])


def test_tower_features_are_what_llava_feeds_its_projector(tiny_vlm) -> None:
    from mmeff.models.hf import llava_visual_features

    px = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        ours = grounding.tower_features(tiny_vlm.model.vision_tower, px)
        torch.testing.assert_close(ours, llava_visual_features(tiny_vlm, px))


def _pool(tower: torch.nn.Module, n: int = 4) -> grounding_data.FeaturePool:
    return grounding.build_pool(tower, n, video=False, seed=5, batch=4, workers=0, progress=False)


def test_cached_feature_loss_equals_the_models_own_forward(tok, tiny_vlm) -> None:
    pool = _pool(tiny_vlm.model.vision_tower)
    ds = grounding_data.LMData(pool, None, tok, 8, batch=2, seed=1)
    batch = grounding_data.collate_lm([ds[0], ds[1]], tok.pad_token_id)
    vocab = grounding_data.scene_vocabulary(ds, 8)
    readout = grounding.Readout(vocab, len(tok))
    with torch.no_grad():
        ours = grounding.vlm_answer_loss(tiny_vlm, batch, readout)
        # the same rows through LLaVA's forward from pixels (the pool's images re-rendered)
        from mmeff.preprocess import llava_pixel_values

        idx = [int(np.random.default_rng([1, i, 9]).integers(0, 4)) for i in (0, 1)]
        px = llava_pixel_values([scene_sample(5, j, photo_background=(j % 5 == 0)).image for j in idx], 224)
        out = tiny_vlm.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], pixel_values=px)
        labels = batch["labels"][:, 1:]
        keep = labels != -100
        ref = readout.loss(tiny_vlm, out.last_hidden_state[:, :-1][keep], labels[keep])
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)


def test_conversations_start_with_the_evaluation_prompt_and_label_only_answers(tok, tiny_vlm) -> None:
    from mmeff.eval.answers import format_question
    from mmeff.models.hf import build_prompt

    pool = _pool(tiny_vlm.model.vision_tower)
    ds = grounding_data.LMData(pool, None, tok, 64, batch=8, seed=2)
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    seen_mc = False
    for i in range(64):
        ids, labels, feats, looks = ds[i]
        assert looks == []  # looks=False
        assert feats.shape == (1, 64, 192) and ids.count(tok.convert_tokens_to_ids("<image>")) == 64
        answers = [t for t, lab in zip(ids, labels) if lab != -100]
        assert answers and answers[-1] == eos and all(lab in (-100, t) for t, lab in zip(ids, labels))
        first_answer = labels.index(next(lab for lab in labels if lab != -100))
        text = tok.decode(ids[:first_answer])
        if "Options:" in text.split("<|im_start|>assistant")[0]:
            seen_mc = True
            q = [line for line in text.splitlines() if line.endswith("?")][0]
            opts = [line[4:] for line in text.splitlines() if line.startswith("(")][:4]
            assert ids[:first_answer] == build_prompt(tok, format_question(q, opts), 1, 64, ds.image_id)
    assert seen_mc
    # a step is all images or all videos, and every row of a step asks the same number of turns
    turns = {sum(1 for lab, nxt in zip(ds[i][1], ds[i][1][1:]) if lab == eos and nxt == -100) for i in range(8)}
    assert len(turns) == 1


def test_question_patches_are_the_asked_objects_pixels() -> None:
    sq = SceneObject("square", "blue", 3 / 8, 3 / 8, 0.25)  # patch rows/cols 2-3 exactly
    small = SceneObject("circle", "red", (6 + 0.5) / 8, (1 + 0.5) / 8, 0.085)  # inside patch (1, 6)
    objs = [sq, small]
    square = np.zeros((8, 8), bool)
    square[2:4, 2:4] = True
    circle = np.zeros((8, 8), bool)
    circle[1, 6] = True
    ask = lambda q: grounding_data.question_patches(q, objs, "cat")  # noqa: E731
    assert (ask("What colour is the square?").reshape(8, 8) == square).all()
    assert (ask("What colour is the small circle?").reshape(8, 8) == circle).all()
    assert (ask("What shape is the red object?").reshape(8, 8) == circle).all()
    assert (ask("Where is the blue square?").reshape(8, 8) == square).all()
    assert (ask("How many squares are there?").reshape(8, 8) == square).all()
    word = ask("What word is written in the image?").reshape(8, 8)
    assert word[7].any() and not word[:6].any()
    assert ask("What colour is the triangle?") is None and ask("Is it raining?") is None
    # every wording the training conversations use is known, on real generated scenes
    rng = np.random.default_rng(0)
    for i in range(30):
        s = scene_sample(4, i)
        for q, _, _ in scene_questions(s, rng):
            assert grounding_data.question_patches(q, s.objects, s.text) is not None, q


def test_look_targets_point_at_the_answer_and_the_loss_reads_attention(tok, tiny_vlm) -> None:
    pool = _pool(tiny_vlm.model.vision_tower, 8)
    ds = grounding_data.LMData(pool, None, tok, 16, batch=4, seed=3, looks=True)
    image_id = tok.convert_tokens_to_ids("<image>")
    rows = [ds[i] for i in range(8)]
    assert any(looks for *_, looks in rows)
    for ids, labels, _, looks in rows:
        for pos, mask in looks:
            assert labels[pos] == -100 and labels[pos + 1] != -100  # the token whose output is the answer
            assert mask.shape == (ids.count(image_id),) and mask.any()
    batch = grounding_data.collate_lm(rows[:4], tok.pad_token_id)
    cfg = grounding.LMTrainConfig(look_weight=1.0, look_layers=(0, 1), look_heads=1)
    readout = grounding.Readout(grounding_data.scene_vocabulary(ds, 8), len(tok))
    before = tiny_vlm.model.language_model.config._attn_implementation
    with torch.no_grad():
        parts = grounding.vlm_losses(tiny_vlm, batch, readout, cfg)
    assert tiny_vlm.model.language_model.config._attn_implementation == before  # restored
    torch.testing.assert_close(parts["answer"], grounding.vlm_answer_loss(tiny_vlm, batch, readout), rtol=1e-4, atol=1e-5)
    # the look term from attention maps built by hand: all mass on the targets -> 0, uniform -> -log(share)
    n = batch["input_ids"].shape[1]
    uniform = [torch.full((4, 2, n, n), 1.0 / n) for _ in range(2)]
    looks = batch["looks"]
    share = [float(m.sum()) / n for row in looks for _, m in row]
    want = float(np.mean([-np.log(x + 1e-6) for x in share]))
    got = grounding.look_loss(uniform, batch["input_ids"], image_id, looks, (0, 1), 1)
    assert abs(float(got) - want) < 1e-4
    exact = [torch.zeros(4, 2, n, n) for _ in range(2)]
    for r, row in enumerate(looks):
        visual = torch.nonzero(batch["input_ids"][r] == image_id).squeeze(1)
        for pos, mask in row:
            for a in exact:
                a[r, 0, pos, visual[mask]] = 1.0 / int(mask.sum())
    assert float(grounding.look_loss(exact, batch["input_ids"], image_id, looks, (0, 1), 1)) < 1e-5
    assert torch.isfinite(parts["look"]) and float(parts["look"]) > 0


def test_vlm_weights_round_trip_and_refuse_foreign_files(tmp_path, tok) -> None:
    model = mini_vlm.new_vlm(tok, hidden=32, layers=2, heads=2, seed=3)
    vocab = [10, 20, 30, tok.convert_tokens_to_ids("<|im_end|>")]
    with torch.no_grad():
        emb = model.get_input_embeddings().weight
        keep = torch.zeros(len(emb), dtype=torch.bool)
        keep[vocab] = True
        emb[~keep] = 0
    path = mini_vlm.save_vlm(model.half().float(), vocab, tmp_path / "vlm.safetensors")
    back = mini_vlm.load_vlm(path, tok)
    ids = torch.tensor([[1, 10, 20, 30]])
    with torch.no_grad():
        torch.testing.assert_close(back(input_ids=ids).logits, model(input_ids=ids).logits)
    assert not (tmp_path / "vlm.safetensors.tmp").exists()
    mini.save_clip(mini.create_clip(None), tmp_path / "clip.safetensors")
    with pytest.raises(ValueError, match="clip.safetensors is not an mmeff-mini VLM"):
        mini_vlm.load_vlm(tmp_path / "clip.safetensors", tok)
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 20)
    with pytest.raises(ValueError, match="junk.safetensors is not a readable safetensors file"):
        mini_vlm.load_vlm(tmp_path / "junk.safetensors", tok)
    with torch.no_grad():
        model.get_input_embeddings().weight[5] = 1.0
    with pytest.raises(ValueError, match="outside the vocabulary"):
        mini_vlm.save_vlm(model, vocab, tmp_path / "bad.safetensors")


def test_dense_loss_falls_on_a_few_steps(tmp_path) -> None:
    tower = CLIPVisionModel(mini.hf_vision_config())
    cfg = grounding.TowerTrainConfig(steps=6, batch_size=4, lr=2e-3, warmup_steps=1, save_every=3)
    hist = grounding.train_tower(tower, tmp_path / "t", cfg, progress=False)
    assert hist["log"][-1]["loss"] < hist["log"][0]["loss"]
    assert (tmp_path / "t" / "last.pt").is_file() and hist["step"] == 6


def test_mini_train_cli_end_to_end_at_toy_size_and_resumes(tmp_path, capsys) -> None:
    from mmeff.cli.main import main

    out = tmp_path / "run"
    args = ["mini", "train", "--out", str(out), "--tower-steps", "2", "2", "1", "--pool", "8", "3", "--lm-steps", "4",
            "--eval-per-kind", "1"]
    assert main([*args, "--lm-stop-at", "2"]) == 0, capsys.readouterr().err
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["vlm"]["complete"] is False and manifest["vlm"]["lm_step"] == 2  # paused, weights written
    assert main(args) == 0, capsys.readouterr().err
    manifest = json.loads((out / "manifest.json").read_text())
    v = manifest["vlm"]
    assert v["complete"] is True and v["lm_step"] == 4 and v["lm"]["log"][-1]["step"] == 4
    assert [c["step"] for c in v["lm"]["heldout_curve"]] == [2, 4]
    assert v["heldout_accuracy"]["n_per_kind"] == 1 and "all" in v["heldout_accuracy_blank"]
    assert [len(t["log"]) > 0 for t in v["tower"]] == [True, True, True]
    for name, entry in manifest["files"].items():
        assert entry["sha256"] == file_sha256(out / name)
    model, _, info = mini_vlm.build_vlm(out / mini.WEIGHT_FILES["vlm"])
    assert info["name"] == "mmeff-mini" and not model.training
    # going on from a weights file on another machine: no tower phases, the file's weights as the start
    first = out / mini.WEIGHT_FILES["vlm"]
    again = tmp_path / "again"
    assert main(["mini", "train", "--out", str(again), "--init-from", str(first), "--pool", "8", "3",
                 "--lm-steps", "1", "--eval-per-kind", "1"]) == 0, capsys.readouterr().err
    v2 = json.loads((again / "manifest.json").read_text())["vlm"]
    assert v2["tower"] == [] and v2["init_from"]["sha256"] == file_sha256(first) and v2["lm_step"] == 1
    assert json.loads((again / "lm" / "vocab.json").read_text()) == json.loads((out / "lm" / "vocab.json").read_text())
