"""Reducers attached to HF ``Gemma3ForConditionalGeneration`` (tiny random config, saved and reloaded):
no-reduction equality, the reduced pipeline against a masked reference built from the host's own parts,
token_type_ids kept consistent, batch rows equal to single runs, generate with the KV cache, clear
refusals, exact restore."""

from __future__ import annotations

import pytest
import torch

import mmeff
from mmeff.adapters import Gemma3Adapter, find_adapter
from mmeff.models.hf import left_pad_batch
from mmeff.models.tiny import pack_right, saved_and_reloaded

IMAGE, BOI, EOI = 5, 3, 4  # special ids of the tiny model; text ids are >= 8
TOKENS, SIDE = 16, 4  # soft tokens per image on a 4x4 grid (an 8x8 patch grid pooled 2x2)


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


@pytest.fixture(scope="module")
def gemma3(tmp_path_factory):
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    cfg = Gemma3Config(
        text_config=dict(vocab_size=128, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=512,
                         sliding_window=8, pad_token_id=0, eos_token_id=1, bos_token_id=2,
                         query_pre_attn_scalar=8),
        vision_config=dict(image_size=64, patch_size=8, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                           num_attention_heads=4, num_channels=3),
        mm_tokens_per_image=TOKENS, boi_token_index=BOI, eoi_token_index=EOI, image_token_index=IMAGE,
    )
    torch.manual_seed(0)
    model = Gemma3ForConditionalGeneration(cfg)
    with torch.no_grad():  # Gemma 3 initialises its input projection to zeros: every image would be the same zero tokens
        model.model.multi_modal_projector.mm_input_projection_weight.normal_(std=0.5)
    return saved_and_reloaded(model, tmp_path_factory.mktemp("gemma3"), model.model.language_model)


def inputs(batch: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Left-padded rows ``text <boi> image*16 <eoi> text`` of different lengths, one image each (row 0 of a
    batch of one: two images), with the token_type_ids Gemma 3's processor writes."""
    g = torch.Generator().manual_seed(seed)
    rows, images = [], 0
    for b in range(batch):
        row: list[int] = torch.randint(8, 128, (3 + b,), generator=g).tolist()
        for _ in range(2 if batch == 1 else 1):
            row += [BOI] + [IMAGE] * TOKENS + [EOI] + torch.randint(8, 128, (2,), generator=g).tolist()
            images += 1
        rows.append(row)
    out = left_pad_batch(rows, 0)
    return {**out, "token_type_ids": (out["input_ids"] == IMAGE).long(),
            "pixel_values": torch.randn(images, 3, 64, 64, generator=g)}


def masked_reference(model, batch: dict, red) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits of the unreduced sequence with the dropped image slots masked out and the kept ones holding
    the reduced tokens; each image's kept slots stay one bidirectional block (their token type stays 1,
    dropped slots get 0 and a zero attention mask)."""
    inner = model.model
    ids, mask, types = batch["input_ids"], batch["attention_mask"].clone(), batch["token_type_ids"].clone()
    feats = inner.get_image_features(pixel_values=batch["pixel_values"]).pooler_output
    emb = inner.get_input_embeddings()(torch.where(ids == IMAGE, 0, ids))
    slots = (ids == IMAGE).nonzero().tolist()
    for i, f in enumerate(feats):
        r = red(f[None], mmeff.TokenContext(grid=(SIDE, SIDE)))
        cells = slots[i * TOKENS:(i + 1) * TOKENS]
        rows, cols = torch.tensor([c[0] for c in cells]), torch.tensor([c[1] for c in cells])
        m = r.num_tokens
        emb[rows[:m], cols[:m]] = r.tokens[0]
        mask[rows[m:], cols[m:]] = 0
        types[rows[m:], cols[m:]] = 0
    # the kept tokens, packed to the right as the adapter does, run through the host's own forward
    p_mask, p_emb, p_types = pack_right(mask.bool(), emb, types)
    return model(inputs_embeds=p_emb, attention_mask=p_mask, token_type_ids=p_types).logits, p_mask


def test_found_and_listed(gemma3):
    assert find_adapter(gemma3) is Gemma3Adapter
    feats = gemma3.model.get_image_features(pixel_values=inputs(1)["pixel_values"]).pooler_output
    assert float(feats.std()) > 1e-3 and float((feats[0] - feats[1]).abs().max()) > 1e-3  # images matter (not zero-initialised)
    assert "gemma3" in {n for n, _ in mmeff.adapters.list_adapters()}


@pytest.mark.parametrize("batch", [1, 2])
def test_keep_everything_equals_plain_model(gemma3, batch):
    x = inputs(batch, seed=batch)
    ref = gemma3(**x).logits
    ref_gen = gemma3.generate(**x, max_new_tokens=4, do_sample=False)
    for red in (mmeff.UniformKeep(ratio=1.0), mmeff.RandomKeep(ratio=1.0, seed=1), mmeff.AvgPool(tokens=TOKENS)):
        with mmeff.apply(gemma3, red) as handle:
            out = gemma3(**x).logits
            gen = gemma3.generate(**x, max_new_tokens=4, do_sample=False)
        assert handle.stats["visual_tokens_in"] == handle.stats["visual_tokens_out"] == TOKENS * x["pixel_values"].shape[0]
        torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)
        assert torch.equal(gen, ref_gen), red.describe()


@pytest.mark.parametrize("batch", [1, 2])
def test_reduced_pipeline_equals_masked_reference(gemma3, batch):
    x = inputs(batch, seed=batch)
    for red in (mmeff.UniformKeep(ratio=0.25), mmeff.RandomKeep(ratio=0.5, seed=2), mmeff.AvgPool(tokens=4),
                mmeff.create_reducer("fourier", ratio=0.25)):
        with mmeff.apply(gemma3, red) as handle:
            out = gemma3(**x).logits
        assert handle.stats["visual_tokens_out"] < handle.stats["visual_tokens_in"]
        ref, ref_mask = masked_reference(gemma3, x, red)
        assert out.shape == ref.shape
        for b in range(batch):
            valid = ref_mask[b].bool()
            torch.testing.assert_close(out[b, valid], ref[b, valid], rtol=1e-4, atol=1e-4, msg=f"{red.describe()} row {b}")


def test_token_types_that_ignore_the_blocks_would_differ(gemma3):
    """The check above has teeth: without token_type_ids (causal attention over the image) the logits move."""
    x = inputs(1)
    with mmeff.apply(gemma3, mmeff.UniformKeep(ratio=0.5)):
        with_types = gemma3(**x).logits
        without = gemma3(**{k: v for k, v in x.items() if k != "token_type_ids"}).logits
    assert (with_types - without).abs().max() > 1e-3


def test_batch_rows_match_single_runs_and_generate_decodes_with_the_cache(gemma3):
    x = inputs(2, seed=5)
    red = mmeff.UniformKeep(ratio=0.5)
    with mmeff.apply(gemma3, red):
        both = gemma3(**x).logits[:, -1]
        singles = []
        for b in range(2):
            keep = x["attention_mask"][b].bool()
            one = {k: x[k][b:b + 1, keep] for k in ("input_ids", "attention_mask", "token_type_ids")}
            singles.append(gemma3(**one, pixel_values=x["pixel_values"][b:b + 1]).logits[0, -1])
        gen = gemma3.generate(**x, max_new_tokens=4, do_sample=False)
        no_cache = gemma3.generate(**x, max_new_tokens=4, do_sample=False, use_cache=False)
    torch.testing.assert_close(both, torch.stack(singles), rtol=1e-4, atol=1e-4)
    prompt = x["input_ids"].shape[1]
    assert torch.equal(gen[:, :prompt], x["input_ids"]) and gen.shape[1] == prompt + 4
    assert torch.equal(gen, no_cache)  # decoding through the reduced KV cache = recomputing each step


def test_refusals_are_clear_and_restore_is_exact(gemma3):
    x = inputs(1)
    before = (dict(gemma3._forward_pre_hooks), "generate" in gemma3.__dict__)
    with pytest.raises(ValueError, match="no class token|has none"):
        with mmeff.apply(gemma3, mmeff.CLSAttnTopK(ratio=0.5)):
            gemma3(**x)
    with pytest.raises(ValueError, match="pools the full patch grid"):
        with mmeff.apply(gemma3, mmeff.UniformKeep(ratio=0.5), stage="pre_projector"):
            pass
    with pytest.raises(RuntimeError, match="boom"):
        with mmeff.apply(gemma3, mmeff.UniformKeep(ratio=0.5)):
            raise RuntimeError("boom")
    assert (dict(gemma3._forward_pre_hooks), "generate" in gemma3.__dict__) == before


def test_tome_runs_in_the_tower_and_vistog_is_refused_with_the_reason(gemma3):
    """ToMe merges inside the SigLIP tower and un-merges at its output (the projector pools the full grid);
    VisToG groups before the projector, which Gemma 3 refuses."""
    from mmeff.methods.tome import ToMe
    from mmeff.methods.vistog import VisToG

    x = inputs(2)
    ref = gemma3(**x).logits
    with mmeff.apply(gemma3, ToMe(r=0)):
        torch.testing.assert_close(gemma3(**x).logits, ref, rtol=0, atol=1e-6)
    with mmeff.apply(gemma3, ToMe(r=8)) as handle:
        out = gemma3(**x).logits
    assert handle.stats["tokens_out"] < handle.stats["tokens_in"] and float((out - ref).abs().max()) > 1e-4
    with pytest.raises(ValueError, match="pools the full patch grid"):
        with mmeff.apply(gemma3, VisToG.for_model(gemma3, num_groups=4)):
            gemma3(**x)
