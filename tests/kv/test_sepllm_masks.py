"""SepLLM's masks over a token stream: the evicting cache's visible sets (one masked forward must equal the
real cache fed token by token) and the paper's training mask (against a brute-force construction)."""

from __future__ import annotations

import pytest
import torch

import mmeff
from mmeff.eval.streaming import MaskedStream, streaming_perplexity
from mmeff.kv.sepllm import additive_mask, eviction_visible, sepllm_attention_mask
from mmeff.models.tiny import build_tiny

SEPS = (5, 6, 7)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return build_tiny("llama", tmp_path_factory.mktemp("llama"), num_hidden_layers=2)


def _ids(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(8, 128, (n,), generator=g)
    ids[torch.rand(n, generator=g) < 0.2] = 6  # separators at irregular places
    return ids


@pytest.mark.parametrize(
    "press, sizes",
    [
        (mmeff.SepLLM(separator_ids=SEPS, init_size=3, sep_size=4, local_size=6, cache_size=16), (3, 4, 6, 16)),
        (mmeff.SepLLM(separator_ids=SEPS, init_size=2, sep_size=None, local_size=5, cache_size=12), (2, None, 5, 12)),
        (mmeff.StreamingLLM(init_size=2, local_size=9), (2, 0, 9, 11)),
        (mmeff.FullKV(), (0, 0, 1, None)),
    ],
    ids=["sepllm", "uncapped", "streamingllm", "full"],
)
@pytest.mark.parametrize("chunk", [1, 3])
def test_masked_forward_equals_the_real_cache(llama, press, sizes, chunk):
    ids = _ids(90, seed=1)
    vis = eviction_visible(ids, SEPS, *sizes, chunk=chunk)
    got = MaskedStream(llama, ids).nll(vis)
    ref = streaming_perplexity(llama, ids, press, chunk_size=chunk, progress=False)
    per_chunk = torch.stack([got[s : s + chunk].mean() for s in range(0, 89, chunk)])
    torch.testing.assert_close(per_chunk, torch.tensor(ref.curve, dtype=per_chunk.dtype), atol=1e-4, rtol=1e-4)
    # row t holds what the cache stored after step t: its longest row is the cache's peak (over the tokens fed:
    # the chunks that hold a token to predict)
    fed = min(90, -(-89 // chunk) * chunk)
    assert int(vis[:fed].sum(1).max()) == ref.stored_max
    if sizes[3] is None:
        assert torch.equal(vis, torch.ones(90, 90, dtype=torch.bool).tril())


def test_masked_stream_rejects_bad_patterns(llama):
    stream = MaskedStream(llama, _ids(20, seed=2))
    with pytest.raises(ValueError, match="later token"):
        stream.nll(torch.ones(20, 20, dtype=torch.bool))
    with pytest.raises(ValueError, match="must be"):
        stream.nll(torch.ones(19, 19, dtype=torch.bool).tril())


def test_training_mask_equals_brute_force():
    ids = torch.stack([_ids(40, seed=3), _ids(40, seed=4)])
    a, n = 3, 5
    got = sepllm_attention_mask(ids, SEPS, a, n)
    ref = torch.zeros(2, 40, 40, dtype=torch.bool)
    for b in range(2):
        for i in range(40):
            for j in range(i + 1):
                ref[b, i, j] = j < a or int(ids[b, j]) in SEPS or i - j <= n - 1
    assert torch.equal(got, ref)
    # far from the window a query sees only sinks and separators
    i = 39
    assert set(got[0, i].nonzero().flatten().tolist()) == (
        set(range(a)) | {j for j in range(40) if int(ids[0, j]) in SEPS} | set(range(i - n + 1, i + 1)))


def test_additive_mask():
    vis = torch.tensor([[True, False], [True, True]])
    m = additive_mask(vis)
    assert m.shape == (1, 1, 2, 2) and m[0, 0, 0, 0] == 0 and m[0, 0, 0, 1] == torch.finfo(torch.float32).min
    assert additive_mask(vis[None].repeat(3, 1, 1), torch.bfloat16).shape == (3, 1, 2, 2)
    with pytest.raises(ValueError, match="mask"):
        additive_mask(vis[None, None])


@pytest.fixture(scope="module")
def tiny_smollm_vocab(smollm2):
    """A tiny random Llama on SmolLM2's tokenizer (the sweep derives separators and text from it)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = smollm2[1]
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512)
    return LlamaForCausalLM(cfg).eval(), tok


@pytest.mark.slow
def test_sweep_matches_kv_and_writes_results(tiny_smollm_vocab, tmp_path):
    from mmeff.bench.kv import load_sweep, run_sepllm_study

    model, tok = tiny_smollm_vocab
    lines: list[str] = []
    (run,) = run_sepllm_study(model, tok, json_path=tmp_path / "s.json", plot_path=tmp_path / "s.png",
                              budgets=(32, 64), rows=2, length=160, check_tokens=80, shift_tokens=48,
                              progress=False, print_fn=lines.append)
    orig = [p for p in run.points if p.positions == "original"]
    seps = [p for p in orig if p.method == "sepllm"]
    streams = [p for p in orig if p.method == "streamingllm"]
    assert len(seps) == 6 and [p.method for p in orig].count("full") == 1
    for p in seps:
        # SepLLM never holds more than its cache; its StreamingLLM sees the same keys per query on average
        assert p.stored_max <= p.cache == p.budget
        match = min((q for q in streams if q.budget == p.budget), key=lambda q: abs(q.avg_kv - p.avg_kv))
        assert abs(match.avg_kv - p.avg_kv) <= 0.5
    assert all(q.avg_kv == q.init + q.local and q.cache == q.init + q.local for q in streams)
    assert run.check_max_abs_diff is not None and run.check_max_abs_diff < 1e-3
    shifted = [p for p in run.points if p.positions == "in-cache"]
    assert [p.method for p in shifted] == ["sepllm", "streamingllm"] and shifted[0].stored_max <= 32
    assert (tmp_path / "s.png").stat().st_size > 0 and "vs StreamingLLM" in "\n".join(lines)
    back = load_sweep(tmp_path / "s.json")
    assert [p.as_dict() for p in back[0].points] == [p.as_dict() for p in run.points]
