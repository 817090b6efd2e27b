"""Reducers attached to HF InternVL (tiny random config with q/k-norm, saved and reloaded, LM weights scaled
up): keep-all equals the plain model, reduced logits equal a masked reference built from the host's own
forward, cls_attn scores equal the class token's attention read from the tower's own attention weights and
summed over each token's 2x2 patches, rows with different tile counts equal single runs, generate with the
KV cache, clear refusals, exact restore."""

from __future__ import annotations

import pytest
import torch

import mmeff
from mmeff.adapters import InternVLAdapter, find_adapter
from mmeff.models.hf import left_pad_batch
from mmeff.models.tiny import pack_right

IMAGE, IMG_START, IMG_END = 3, 4, 5  # <IMG_CONTEXT>, <img>, </img>
TOKENS, SIDE = 16, 4  # a 64px tile at patch 8 (8x8 patches), pixel-shuffled 2x2: 16 tokens on 4x4


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


@pytest.fixture(scope="module")
def internvl(tmp_path_factory):
    from transformers import InternVLConfig, InternVLForConditionalGeneration

    from mmeff.models import tiny

    cfg = InternVLConfig(
        vision_config=dict(image_size=64, patch_size=8, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                           num_attention_heads=4, use_qk_norm=True),
        text_config=tiny.tiny_lm_config("qwen2").to_dict(), image_token_id=IMAGE, downsample_ratio=0.5,
        vision_feature_layer=-1, vision_feature_select_strategy="default",
    )
    torch.manual_seed(0)
    model = InternVLForConditionalGeneration(cfg)
    with torch.no_grad():
        for p in model.model.language_model.parameters():
            p.mul_(4.0)
        for p in model.model.vision_tower.parameters():  # so the class token's attention is far from uniform
            p.mul_(3.0)
    folder = tmp_path_factory.mktemp("internvl")
    model.save_pretrained(folder)
    return InternVLForConditionalGeneration.from_pretrained(folder, attn_implementation="eager").eval()


def inputs(counts: list[int], seed: int = 0) -> dict[str, torch.Tensor]:
    """Left-padded rows ``text <img> tiles*16 </img> text``; ``counts[b]`` tiles (with the thumbnail) in row b."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for b, k in enumerate(counts):
        row = torch.randint(8, 128, (2 + b,), generator=g).tolist()
        row += [IMG_START] + [IMAGE] * (TOKENS * k) + [IMG_END] + torch.randint(8, 128, (3,), generator=g).tolist()
        rows.append(row)
    return {**left_pad_batch(rows, 0), "pixel_values": torch.randn(sum(counts), 3, 64, 64, generator=g)}


def reference_scores(model, pixels: torch.Tensor) -> torch.Tensor:
    """Class-token attention of the last tower layer from the tower's own (eager) attention weights, averaged
    over heads, summed over the 2x2 patch block each LLM token covers."""
    att = model.model.vision_tower(pixel_values=pixels, output_attentions=True).attentions[-1]
    cls = att[:, :, 0, 1:].mean(1).view(-1, 8, 8)
    return cls.view(-1, 4, 2, 4, 2).sum((2, 4)).reshape(-1, TOKENS)


def masked_reference(model, batch: dict, red) -> tuple[torch.Tensor, torch.Tensor]:
    """The host's own forward on the kept tokens: each tile's 16 slots hold its reduced tokens first, the rest
    is masked out; kept tokens are packed to the right as the caller padded."""
    inner = model.model
    ids, mask = batch["input_ids"], batch["attention_mask"].clone()
    feats = inner.get_image_features(pixel_values=batch["pixel_values"]).pooler_output
    scores = reference_scores(model, batch["pixel_values"]) if "scores" in red.needs else None
    emb = inner.get_input_embeddings()(ids)
    slots = (ids == IMAGE).nonzero()
    for i, f in enumerate(feats):
        r = red(f[None], mmeff.TokenContext(grid=(SIDE, SIDE), scores=None if scores is None else scores[i:i + 1]))
        cells = slots[i * TOKENS:(i + 1) * TOKENS]
        m = r.num_tokens
        emb[cells[:m, 0], cells[:m, 1]] = r.tokens[0]
        mask[cells[m:, 0], cells[m:, 1]] = 0
    p_mask, p_emb = pack_right(mask.bool(), emb)
    return model(inputs_embeds=p_emb, attention_mask=p_mask).logits, p_mask


def test_found_and_listed(internvl):
    assert find_adapter(internvl) is InternVLAdapter
    feats = internvl.model.get_image_features(pixel_values=inputs([2])["pixel_values"]).pooler_output
    assert float(feats.std()) > 1e-3 and float((feats[0] - feats[1]).abs().max()) > 1e-3  # images matter (not zero-initialised)


@pytest.mark.parametrize("counts", [[3], [3, 2]])
def test_keep_everything_equals_plain_model(internvl, counts):
    x = inputs(counts, seed=len(counts))
    ref = internvl(**x).logits
    ref_gen = internvl.generate(**x, max_new_tokens=3, do_sample=False)
    for red in (mmeff.UniformKeep(ratio=1.0), mmeff.RandomKeep(ratio=1.0, seed=1), mmeff.CLSAttnTopK(ratio=1.0),
                mmeff.AvgPool(tokens=TOKENS)):
        with mmeff.apply(internvl, red) as handle:
            out = internvl(**x).logits
            gen = internvl.generate(**x, max_new_tokens=3, do_sample=False)
        assert handle.stats["visual_tokens_in"] == handle.stats["visual_tokens_out"] == TOKENS * sum(counts)
        torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)
        assert torch.equal(gen, ref_gen), red.describe()


def test_cls_scores_are_the_class_tokens_attention_per_token(internvl):
    x = inputs([3])
    adapter = InternVLAdapter(internvl, mmeff.CLSAttnTopK(ratio=0.5))
    got = torch.stack([it.scores for it in adapter.encode(dict(x))])
    want = reference_scores(internvl, x["pixel_values"])
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    assert float(want.std(1).min()) > 1e-3  # not uniform: a wrong grouping would change the selection


@pytest.mark.parametrize("counts", [[3], [3, 2]])
def test_reduced_pipeline_equals_masked_reference(internvl, counts):
    x = inputs(counts, seed=len(counts))
    for red in (mmeff.UniformKeep(ratio=0.25), mmeff.RandomKeep(ratio=0.5, seed=2), mmeff.AvgPool(tokens=4),
                mmeff.CLSAttnTopK(ratio=0.25), mmeff.create_reducer("fourier", ratio=0.25)):
        with mmeff.apply(internvl, red) as handle:
            out = internvl(**x).logits
        assert handle.stats["visual_tokens_out"] == red.budget(TOKENS) * sum(counts)  # a per-tile budget
        ref, ref_mask = masked_reference(internvl, x, red)
        assert out.shape == ref.shape
        for b in range(len(counts)):
            valid = ref_mask[b].bool()
            torch.testing.assert_close(out[b, valid], ref[b, valid], rtol=1e-4, atol=1e-4, msg=f"{red.describe()} row {b}")


def test_rows_match_single_runs_and_generate_uses_the_cache(internvl):
    x = inputs([3, 2], seed=4)
    with mmeff.apply(internvl, mmeff.UniformKeep(ratio=0.5)):
        both = internvl(**x).logits[:, -1]
        singles, first = [], 0
        for b, k in enumerate([3, 2]):
            keep = x["attention_mask"][b].bool()
            singles.append(internvl(input_ids=x["input_ids"][b:b + 1, keep], attention_mask=x["attention_mask"][b:b + 1, keep],
                                    pixel_values=x["pixel_values"][first:first + k]).logits[0, -1])
            first += k
        # (suppress the placeholder id: without a cache every step re-reads the prompt's image tokens)
        gen = internvl.generate(**x, max_new_tokens=4, do_sample=False, suppress_tokens=[IMAGE])
        no_cache = internvl.generate(**x, max_new_tokens=4, do_sample=False, use_cache=False, suppress_tokens=[IMAGE])
    torch.testing.assert_close(both, torch.stack(singles), rtol=1e-4, atol=1e-4)
    prompt = x["input_ids"].shape[1]
    assert torch.equal(gen[:, :prompt], x["input_ids"]) and gen.shape[1] == prompt + 4
    assert torch.equal(gen, no_cache)


def test_refusals_are_clear_and_restore_is_exact(internvl):
    from mmeff.methods.freevideo import FreeVideoLLM

    x = inputs([2])
    before = (dict(internvl._forward_pre_hooks), "generate" in internvl.__dict__)
    with pytest.raises(ValueError, match="pixel shuffle folds the full patch grid"):
        with mmeff.apply(internvl, mmeff.UniformKeep(ratio=0.5), stage="pre_projector"):
            pass
    with pytest.raises(ValueError, match="frames as separate images"):
        with mmeff.apply(internvl, FreeVideoLLM()):
            internvl(**x)
    with pytest.raises(RuntimeError, match="boom"):
        with mmeff.apply(internvl, mmeff.CLSAttnTopK(ratio=0.5)):
            internvl(**x)
            raise RuntimeError("boom")
    assert (dict(internvl._forward_pre_hooks), "generate" in internvl.__dict__) == before
    layer = internvl.model.vision_tower.encoder.layer[-1].attention
    assert not layer._forward_pre_hooks  # the score hook is gone too


def test_in_tower_methods_are_refused_with_the_reason(internvl):
    from mmeff.methods.tome import ToMe
    from mmeff.methods.vistog import VisToG

    with pytest.raises(TypeError, match="ToMe does not support .*supported: timm VisionTransformer"):
        with mmeff.apply(internvl, ToMe(r=2)):
            pass
    with pytest.raises(TypeError, match="VisToG does not support"):
        VisToG.for_model(internvl)
