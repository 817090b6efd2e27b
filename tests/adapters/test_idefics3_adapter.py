"""Reducers attached to HF Idefics3 and SmolVLM (tiny random configs, saved and reloaded, LM weights scaled up):
keep-all equals the plain model, reduced logits equal a masked reference built from the host's own forward,
every sub-image keeps its marker tokens, rows with different numbers of sub-images equal single runs,
generate with the KV cache, clear refusals, exact restore."""

from __future__ import annotations

import pytest
import torch

import mmeff
from mmeff.adapters import Idefics3Adapter, find_adapter
from mmeff.models.hf import left_pad_batch
from mmeff.models.tiny import pack_right, saved_and_reloaded

IMAGE, FAKE, GLOBAL, ROW = 3, 4, 5, 6  # placeholder, <fake_token_around_image>, <global-img>, <row_1_col_1>...
TOKENS, SIDE = 16, 4  # a 64px sub-image at patch 8 (8x8 patches), pixel-shuffled 2x2: 16 tokens on 4x4


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


def _build(cls_name: str, folder):
    import transformers

    from mmeff.models import tiny

    config_cls = getattr(transformers, cls_name.replace("ForConditionalGeneration", "Config"))
    text = tiny.tiny_llava_config().text_config.to_dict()
    cfg = config_cls(vision_config=dict(image_size=64, patch_size=8, hidden_size=32, intermediate_size=37,
                                        num_hidden_layers=2, num_attention_heads=4),
                     text_config=text, image_token_id=IMAGE, scale_factor=2)
    model_cls = getattr(transformers, cls_name)
    torch.manual_seed(0)
    model = model_cls(cfg)
    return saved_and_reloaded(model, folder, model.model.text_model)


@pytest.fixture(scope="module", params=["Idefics3ForConditionalGeneration", "SmolVLMForConditionalGeneration"])
def host(request, tmp_path_factory):
    return _build(request.param, tmp_path_factory.mktemp(request.param))


def inputs(counts: list[int], seed: int = 0, pixel_mask: bool = True) -> dict[str, torch.Tensor]:
    """Left-padded rows: ``counts[b]`` sub-images (crops then the global image), each run of placeholders
    after its markers as Idefics3's processor lays them out; missing sub-images are all-zero padding."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for b, k in enumerate(counts):
        row = torch.randint(16, 128, (2 + b,), generator=g).tolist()
        for i in range(k - 1):
            row += [FAKE, ROW + i] + [IMAGE] * TOKENS
        row += [FAKE, GLOBAL] + [IMAGE] * TOKENS + [FAKE] + torch.randint(16, 128, (3,), generator=g).tolist()
        rows.append(row)
    pixels = torch.zeros(len(counts), max(counts), 3, 64, 64)
    for b, k in enumerate(counts):
        pixels[b, :k] = torch.randn(k, 3, 64, 64, generator=g)
    out = {**left_pad_batch(rows, 0), "pixel_values": pixels}
    if pixel_mask:
        out["pixel_attention_mask"] = torch.ones(len(counts), max(counts), 64, 64, dtype=torch.bool)
    return out


def masked_reference(model, batch: dict, red) -> tuple[torch.Tensor, torch.Tensor]:
    """The host's own forward on the kept tokens: every sub-image's run holds its reduced tokens in its first
    slots, the rest is masked out; kept tokens are packed to the right as the caller padded."""
    inner = model.model
    ids, mask = batch["input_ids"], batch["attention_mask"].clone()
    feats = torch.cat(list(inner.get_image_features(batch["pixel_values"]).pooler_output))
    emb = inner.get_input_embeddings()(ids)
    slots = (ids == IMAGE).nonzero()
    for i, f in enumerate(feats.split(TOKENS)):
        r = red(f[None], mmeff.TokenContext(grid=(SIDE, SIDE)))
        cells = slots[i * TOKENS:(i + 1) * TOKENS]
        m = r.num_tokens
        emb[cells[:m, 0], cells[:m, 1]] = r.tokens[0]
        mask[cells[m:, 0], cells[m:, 1]] = 0
    p_mask, p_emb = pack_right(mask.bool(), emb)
    return model(inputs_embeds=p_emb, attention_mask=p_mask).logits, p_mask


def test_found_and_listed(host):
    assert find_adapter(host) is Idefics3Adapter
    feats = host.model.get_image_features(inputs([2])["pixel_values"]).pooler_output[0]
    assert float(feats.std()) > 1e-3 and float((feats[:TOKENS] - feats[TOKENS:]).abs().max()) > 1e-3  # images matter (not zero-initialised)


@pytest.mark.parametrize("counts", [[3], [3, 2]])
def test_keep_everything_equals_plain_model(host, counts):
    x = inputs(counts, seed=len(counts))
    ref = host(**x).logits
    ref_gen = host.generate(**x, max_new_tokens=3, do_sample=False)
    for red in (mmeff.UniformKeep(ratio=1.0), mmeff.RandomKeep(ratio=1.0, seed=1), mmeff.AvgPool(tokens=TOKENS)):
        with mmeff.apply(host, red) as handle:
            out = host(**x).logits
            gen = host.generate(**x, max_new_tokens=3, do_sample=False)
        assert handle.stats["visual_tokens_in"] == handle.stats["visual_tokens_out"] == TOKENS * sum(counts)
        torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)
        assert torch.equal(gen, ref_gen), red.describe()


@pytest.mark.parametrize("counts", [[3], [3, 2]])
def test_reduced_pipeline_equals_masked_reference(host, counts):
    x = inputs(counts, seed=len(counts))
    from mmeff.adapters.idefics3 import smolvlm_block_merger

    for red in (mmeff.UniformKeep(ratio=0.25), mmeff.RandomKeep(ratio=0.5, seed=2), mmeff.AvgPool(tokens=4),
                mmeff.create_reducer("fourier", ratio=0.25)):
        if smolvlm_block_merger(host) and any(red.budget(TOKENS) * k % 8 for k in counts):
            with pytest.raises(ValueError, match="in blocks of 8"):  # transformers < 5.21 cannot place them
                with mmeff.apply(host, red):
                    host(**x)
            continue
        with mmeff.apply(host, red) as handle:
            out = host(**x).logits
        assert handle.stats["visual_tokens_out"] == red.budget(TOKENS) * sum(counts)  # a per-sub-image budget
        ref, ref_mask = masked_reference(host, x, red)
        assert out.shape == ref.shape
        for b in range(len(counts)):
            valid = ref_mask[b].bool()
            torch.testing.assert_close(out[b, valid], ref[b, valid], rtol=1e-4, atol=1e-4, msg=f"{red.describe()} row {b}")


def test_markers_are_kept_and_rows_match_single_runs(host):
    x = inputs([3, 2], seed=4)
    with mmeff.apply(host, mmeff.UniformKeep(ratio=0.5)):
        seen = []
        h = host.model.text_model.register_forward_pre_hook(lambda m, a, k: seen.append(k["inputs_embeds"]), with_kwargs=True)
        try:
            both = host(**x).logits[:, -1]
        finally:
            h.remove()
        singles = []
        for b, k in enumerate([3, 2]):
            keep = x["attention_mask"][b].bool()
            singles.append(host(input_ids=x["input_ids"][b:b + 1, keep], attention_mask=x["attention_mask"][b:b + 1, keep],
                                pixel_values=x["pixel_values"][b:b + 1, :k]).logits[0, -1])
        gen = host.generate(**x, max_new_tokens=4, do_sample=False)
        no_cache = host.generate(**x, max_new_tokens=4, do_sample=False, use_cache=False)
    torch.testing.assert_close(both, torch.stack(singles), rtol=1e-4, atol=1e-4)
    fake = host.model.get_input_embeddings()(torch.tensor(FAKE))
    assert int((seen[0] == fake).all(-1).sum()) == (3 + 1) + (2 + 1)  # every marker of both rows still there
    prompt = x["input_ids"].shape[1]
    assert torch.equal(gen[:, :prompt], x["input_ids"]) and gen.shape[1] == prompt + 4
    assert torch.equal(gen, no_cache)


def test_refusals_are_clear_and_restore_is_exact(host):
    from mmeff.methods.freevideo import FreeVideoLLM

    x = inputs([2])
    before = (dict(host._forward_pre_hooks), "generate" in host.__dict__)
    with pytest.raises(ValueError, match="SigLIP tower has none"):
        with mmeff.apply(host, mmeff.CLSAttnTopK(ratio=0.5)):
            host(**x)
    with pytest.raises(ValueError, match="pixel shuffle folds the full patch grid"):
        with mmeff.apply(host, mmeff.UniformKeep(ratio=0.5), stage="pre_projector"):
            pass
    with pytest.raises(ValueError, match="separate images with timestamp text"):
        with mmeff.apply(host, FreeVideoLLM()):
            host(**x)
    with pytest.raises(RuntimeError, match="boom"):
        with mmeff.apply(host, mmeff.UniformKeep(ratio=0.5)):
            host(**x)
            raise RuntimeError("boom")
    assert (dict(host._forward_pre_hooks), "generate" in host.__dict__) == before


def test_in_tower_methods_are_refused_with_the_reason(host):
    from mmeff.methods.tome import ToMe
    from mmeff.methods.vistog import VisToG

    with pytest.raises(TypeError, match="ToMe does not support .*supported: timm VisionTransformer"):
        with mmeff.apply(host, ToMe(r=2)):
            pass
    with pytest.raises(TypeError, match="VisToG does not support"):
        VisToG.for_model(host)
