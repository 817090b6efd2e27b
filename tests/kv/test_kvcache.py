"""KV-cache presses (SepLLM, StreamingLLM, full) on real HF classes, checked against independent references.

The main reference: the eviction rule re-implemented over Python lists gives, for every query, the set
of earlier tokens it may see; one full forward with that explicit 4-D mask (eager attention, no cache)
must give the same logits as the evicting cache run token by token (SDPA). Streaming mode is checked
against recomputing each step from scratch on [kept tokens + new tokens] with positions 0..n-1.
"""

from __future__ import annotations

import pytest
import torch

import mmeff
from mmeff.adapters.kv_cache import KVCacheAdapter
from mmeff.eval.streaming import offline_text, streaming_perplexity
from mmeff.hfconfig import CACHE_KWARG, output_cache
from mmeff.kv.presses import FLAG_PROTECTED, FLAG_SEP, EvictingCache
from mmeff.models.tiny import build_tiny, llava_inputs, qwen2_vl_inputs

SEPS = (5, 6, 7)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return build_tiny("llama", tmp_path_factory.mktemp("llama"), num_hidden_layers=3)


@pytest.fixture(scope="module")
def qwen2(tmp_path_factory):
    return build_tiny("qwen2", tmp_path_factory.mktemp("qwen2"))


def _stream(n: int, seed: int = 0, sep_every: int = 5) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(8, 128, (n,), generator=g)
    ids[sep_every - 1 :: sep_every] = torch.tensor(SEPS)[torch.randint(0, 3, (len(ids[sep_every - 1 :: sep_every]),), generator=g)]
    # an irregular sprinkle too, so separator counts differ between windows
    ids[torch.randint(0, n, (n // 10,), generator=g)] = SEPS[0]
    return ids


def simulate(ids: list[int], steps: list[tuple[int, int]], a: int, s: int | None, w: int, c: int | None,
             seps: tuple[int, ...] = SEPS, held: list[int] | None = None) -> dict[int, list[int]]:
    """The eviction rule over lists, batch 1, no padding: query position -> visible key positions.
    ``held`` (if given) receives the entries stored after each step's append (room is made first)."""
    cache: list[int] = []
    visible: dict[int, list[int]] = {}
    for st, en in steps:
        q = en - st
        if c is not None and cache and len(cache) + q > c:
            w_old = max(w - q, 0)
            window = cache[len(cache) - w_old :] if w_old else []
            past = cache[: len(cache) - w_old]
            sinks = [t for t in past if t < a]
            sep = [t for t in past if t >= a and ids[t] in seps]
            if s is not None:
                sep = sep[max(len(sep) - s, 0) :] if s > 0 else []
            cache = sorted(sinks + sep) + window
        for i in range(st, en):
            visible[i] = cache + list(range(st, i + 1))
        cache = cache + list(range(st, en))
        if held is not None:
            held.append(len(cache))
    return visible


def official_streaming_sepllm(ids: list[int], a: int, s: int, w: int, c: int,
                              seps: tuple[int, ...] = SEPS) -> dict[int, list[int]]:
    """HKUDS/SepLLM ``Streaming-SepLLM`` at batch 1, token by token, transcribed over positions: the driver
    appends each token, then ``SepLLM_KVCache_Manager.evict_except_for_sep(SEP_ACCUMULATION=True,
    USE_MAX_SEP_CACHE=True)`` compresses once the cache exceeds ``c``: ``[0:a]`` initial, the separators
    already kept ``[a:sep_exrange]`` plus those of the past window ``[sep_exrange:L-w]`` (the newest ``s``
    survive), and the local window ``[L-w:L]``."""
    cache: list[int] = []
    sep_exrange = 0
    visible: dict[int, list[int]] = {}
    for t in range(len(ids)):
        cache = cache + [t]
        visible[t] = list(cache)
        if len(cache) <= c:
            continue
        if sep_exrange <= 0:
            sep_exrange = a
        old_seps = cache[a:sep_exrange] if sep_exrange != a else []
        new_seps = [p for p in cache[sep_exrange : len(cache) - w] if ids[p] in seps]
        kept = (old_seps + new_seps)[-s:] if s else []
        sep_exrange = a + len(kept)
        cache = cache[:a] + kept + cache[len(cache) - w :]
    return visible


def _mask(visible: dict[int, list[int]], n: int) -> torch.Tensor:
    m = torch.full((1, 1, n, n), float("-inf"))
    for i, keys in visible.items():
        m[0, 0, i, keys] = 0.0
    return m


def _masked_forward(model, ids: torch.Tensor, layer_masks: list[torch.Tensor]) -> torch.Tensor:
    """Full forward with an explicit additive mask per layer (eager attention, no cache)."""
    model.set_attn_implementation("eager")
    hooks = []
    for layer, m in zip(model.get_decoder().layers, layer_masks):
        def pre(mod, args, kwargs, m=m):
            kwargs["attention_mask"] = m
            return args, kwargs
        hooks.append(layer.self_attn.register_forward_pre_hook(pre, with_kwargs=True))
    try:
        return model(ids[None], attention_mask=layer_masks[0], use_cache=False).logits[0]
    finally:
        for h in hooks:
            h.remove()
        model.set_attn_implementation("sdpa")


def _press_forward(model, ids: torch.Tensor, steps, press) -> tuple[torch.Tensor, EvictingCache]:
    with mmeff.apply(model, press) as h:
        cache = h.new_cache()
        outs = []
        for st, en in steps:
            out = model(ids[None, st:en], use_cache=True, **{CACHE_KWARG: cache})
            cache = output_cache(out)
            outs.append(out.logits[0])
    return torch.cat(outs), cache


def _steps(n: int, prefill: int, chunk: int = 1) -> list[tuple[int, int]]:
    return [(0, prefill)] + [(t, min(t + chunk, n)) for t in range(prefill, n, chunk)]


@pytest.mark.parametrize(
    "press, sizes",
    [
        (mmeff.SepLLM(separator_ids=SEPS, init_size=3, sep_size=4, local_size=6, cache_size=16), [(3, 4, 6, 16)] * 3),
        (mmeff.SepLLM(separator_ids=SEPS, init_size=2, sep_size=None, local_size=5, cache_size=12), [(2, None, 5, 12)] * 3),
        (mmeff.StreamingLLM(init_size=2, local_size=9), [(2, 0, 9, 11)] * 3),
        # per-layer sizes, and the `ht` variant: first and last layers never evict
        (mmeff.SepLLM(separator_ids=SEPS, init_size=2, sep_size=[3, 2, 3], local_size=[6, 4, 6],
                      cache_size=[14, 10, 14], full_layers=(0, -1)), [(2, 3, 6, None), (2, 2, 4, 10), (2, 3, 6, None)]),
    ],
    ids=["sepllm", "sepllm-uncapped", "streamingllm", "per-layer-ht"],
)
@pytest.mark.parametrize("chunk", [1, 3])
def test_eviction_matches_masked_reference(llama, press, sizes, chunk):
    n, prefill = 60, 9
    ids = _stream(n)
    steps = _steps(n, prefill, chunk)
    got, cache = _press_forward(llama, ids, steps, press)
    masks = [_mask(simulate(ids.tolist(), steps, a, s, w, c), n) for a, s, w, c in sizes]
    with torch.no_grad():
        ref = _masked_forward(llama, ids, masks)
    torch.testing.assert_close(got, ref, atol=2e-5, rtol=1e-4)
    # eviction really happened and memory fell: stored entries per layer match the simulation
    peaks = []
    for layer, (a, s, w, c) in zip(cache.layers, sizes):
        held: list[int] = []
        expect = len(simulate(ids.tolist(), steps, a, s, w, c, held=held)[n - 1])
        assert layer.length == expect
        assert layer.keys.shape[-2] == expect
        # the most it ever held: never over cache_size, since room is made before each append (uncapped
        # separators grow past it, as the official USE_MAX_SEP_CACHE=False does)
        assert layer.peak == max(held) and (s is None or max(held) <= (c if c is not None else n))
        peaks.append(max(held))
    assert cache.stats()["stored_max"] == max(peaks)
    assert cache.get_seq_length() == n  # tokens seen, not stored
    assert cache.bytes == sum(layer.nbytes() for layer in cache.layers) <= cache.peak_bytes
    assert min(cache.stored_lengths()) < n / 2


@pytest.mark.parametrize("a, s, w, c", [(3, 4, 6, 16), (2, 2, 5, 9)])
def test_matches_official_streaming_manager(llama, a, s, w, c):
    """Token by token, the official manager's ``(w, c)`` and mmeff's ``(w + 1, c + 1)`` let every query see
    the same tokens (the official holds the arriving token on top of ``c``; mmeff counts it in), for SepLLM
    and for StreamingLLM (``c = a + w``); and the real cache gives the logits of that official mask."""
    n = 70
    ids = _stream(n, seed=8)
    steps = _steps(n, 1)
    official = official_streaming_sepllm(ids.tolist(), a, s, w, c)
    assert simulate(ids.tolist(), steps, a, s, w + 1, c + 1) == official
    stream_official = official_streaming_sepllm(ids.tolist(), a, 1, w, a + w, seps=())  # no separators: StreamingLLM
    assert simulate(ids.tolist(), steps, a, 0, w + 1, a + w + 1) == stream_official
    press = mmeff.SepLLM(separator_ids=SEPS, init_size=a, sep_size=s, local_size=w + 1, cache_size=c + 1)
    got, cache = _press_forward(llama, ids, steps, press)
    with torch.no_grad():
        ref = _masked_forward(llama, ids, [_mask(official, n)] * 3)
    torch.testing.assert_close(got, ref, atol=2e-5, rtol=1e-4)
    assert cache.stats()["stored_max"] == c + 1


def test_stored_max_is_the_peak_and_bounded_every_step(llama):
    """Token by token the SepLLM window breathes: right after an eviction the cache holds fewer entries than
    at its peak, and ``stored_max`` must report the peak (it reported the current size), which never
    exceeds ``cache_size`` at any step, the first included."""
    n, c = 80, 16
    ids = _stream(n, seed=9)
    press = mmeff.SepLLM(separator_ids=SEPS, init_size=2, sep_size=3, local_size=6, cache_size=c)
    held, after_eviction = [], None
    with torch.no_grad(), mmeff.apply(llama, press) as h:
        cache = h.new_cache()
        for t in range(n):
            before = cache.stats().get("evictions", 0)
            cache = output_cache(llama(ids[None, t : t + 1], use_cache=True, **{CACHE_KWARG: cache}))
            held.append(max(cache.stored_lengths()))
            st = cache.stats()
            assert max(held) == st["stored_max"] <= c and st["stored_now"] == held[-1]
            if st["evictions"] > before and after_eviction is None:
                after_eviction = st
    assert after_eviction is not None and after_eviction["stored_now"] < after_eviction["stored_max"] == c


def test_streaming_positions_match_recompute(tmp_path):
    """One layer: the streaming cache equals recomputing [kept + new] from scratch with positions 0..n-1,
    which checks pre-RoPE storage and re-rotation; the stream runs past max_position_embeddings."""
    model = build_tiny("llama", tmp_path, num_hidden_layers=1, max_position_embeddings=32)
    n = 90
    ids = _stream(n, seed=1)
    press = mmeff.SepLLM(separator_ids=SEPS, init_size=2, sep_size=3, local_size=6, cache_size=14, streaming=True)
    steps = _steps(n, 8, 2)
    got, cache = _press_forward(model, ids, steps, press)
    vis = simulate(ids.tolist(), steps, 2, 3, 6, 14)
    ref = []
    with torch.no_grad():
        for st, en in steps:
            kept = vis[st][:-1]
            x = torch.cat([ids[kept], ids[st:en]])[None]
            ref.append(model(x, use_cache=False).logits[0, -(en - st) :])
    torch.testing.assert_close(got, torch.cat(ref), atol=2e-5, rtol=1e-4)
    assert cache.get_seq_length() == n and max(cache.stored_lengths()) <= 14 + 2


def test_streaming_without_eviction_is_exact(llama):
    ids = _stream(50, seed=2)
    ref = llama(ids[None]).logits[0]
    for press in (mmeff.FullKV(), mmeff.FullKV(streaming=True)):
        got, _ = _press_forward(llama, ids, _steps(50, 10, 4), press)
        torch.testing.assert_close(got, ref, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("which, attn", [("llama", "sdpa"), ("llama", "eager"), ("qwen2", "sdpa")])
def test_generate_batch_rows_match_batch_one(which, attn, llama, qwen2):
    model = llama if which == "llama" else qwen2
    model.set_attn_implementation(attn)
    try:
        _batch_rows_match(model)
    finally:
        model.set_attn_implementation("sdpa")


def _batch_rows_match(model):
    a, b = _stream(31, seed=3), _stream(20, seed=4, sep_every=3)  # different lengths and separator counts
    batch = torch.zeros(2, 31, dtype=torch.long)
    batch[0], batch[1, 11:] = a, b
    press = mmeff.SepLLM(separator_ids=SEPS, init_size=2, sep_size=3, local_size=6, cache_size=14)
    with torch.no_grad(), mmeff.apply(model, press) as h:
        out = model.generate(batch, attention_mask=(batch != 0).long(), max_new_tokens=24, do_sample=False)
        # the 31-token prompt is prefilled densely in one forward (as SepCache's); every later step makes room first
        assert h.stats["kv_ratio"] < 0.5 and h.stats["stored_max"] == 31 and h.stats["stored_now"] <= 14
        solo = [model.generate(x[None], max_new_tokens=24, do_sample=False)[0, len(x):] for x in (a, b)]
    for row, ref in zip(out[:, 31:], solo):  # a row that stopped early is padded in the batch
        assert row[: len(ref)].tolist() == ref.tolist()
        assert (row[len(ref) :] == model.generation_config.pad_token_id).all()


def test_generate_without_eviction_equals_plain(llama):
    ids = _stream(40, seed=5)[None]
    with torch.no_grad():
        ref = llama.generate(ids, max_new_tokens=30, do_sample=False)
        with mmeff.apply(llama, mmeff.SepLLM(separator_ids=SEPS, cache_size=4096)) as h:
            out = llama.generate(ids, max_new_tokens=30, do_sample=False)
    assert torch.equal(ref, out)
    assert h.stats["kv_kept"] == h.stats["kv_seen"] == 69 and h.stats["evictions"] == 0
    # an explicit cache from the handle works as generate's cache argument too
    press = mmeff.StreamingLLM(init_size=2, local_size=10)
    with torch.no_grad(), mmeff.apply(llama, press) as h:
        cache = h.new_cache()
        llama.generate(ids, max_new_tokens=30, min_new_tokens=30, do_sample=False, **{CACHE_KWARG: cache})
    assert cache.get_seq_length() == 69 and max(cache.stored_lengths()) == 12


def test_generate_sampling_and_memory_bound(llama):
    press = mmeff.SepLLM(separator_ids=SEPS, init_size=2, sep_size=4, local_size=8, cache_size=20)
    ids = _stream(16, seed=6)[None].repeat(2, 1)  # a prompt within cache_size: the bound holds from the first step
    with torch.no_grad(), mmeff.apply(llama, press) as h:
        torch.manual_seed(0)
        out = llama.generate(ids, max_new_tokens=80, do_sample=True, top_k=20, num_return_sequences=2)
    assert out.shape == (4, 96)
    st = h.stats
    assert st["stored_max"] == 20 and st["kv_seen"] == 95
    full_bytes = 3 * 2 * 4 * 95 * 2 * 16 * 4  # layers * (k, v) * batch * seen * kv_heads * head_dim * fp32
    assert st["cache_bytes"] < full_bytes / 4
    # detached: the model is back to the plain DynamicCache
    assert "_mmeff_kv_adapter" not in llama.__dict__
    out = llama(ids, use_cache=True)
    assert type(output_cache(out)).__name__ == "DynamicCache"


def test_llava_protects_visual_tokens(tmp_path):
    model = build_tiny("llava", tmp_path)
    inputs = llava_inputs(model.config, batch=1, text_lens=[20])
    n_img = int((inputs["input_ids"] == model.config.image_token_id).sum())
    press = dict(separator_ids=SEPS, init_size=2, sep_size=2, local_size=6, cache_size=12)
    with torch.no_grad():
        with mmeff.apply(model, mmeff.SepLLM(**press)) as h:
            model.generate(**inputs, max_new_tokens=20, do_sample=False, suppress_tokens=[model.config.image_token_id])
        layer = h.cache.layers[0]
        prot = int(((layer.flags & FLAG_PROTECTED) != 0).sum())
        assert prot == n_img and layer.length <= 12 + n_img
        with mmeff.apply(model, mmeff.SepLLM(**press, protect_visual=False)) as h:
            model.generate(**inputs, max_new_tokens=20, do_sample=False)
        assert h.cache.layers[0].length <= 12
        # with a token reducer in the same call: the reduced placeholders are what gets protected
        with mmeff.apply(model, mmeff.AvgPool(tokens=16), mmeff.SepLLM(**press)) as h:
            model.generate(**inputs, max_new_tokens=20, do_sample=False)
        assert h.stats["visual_tokens_out"] == 16
        assert int(((h[1].cache.layers[0].flags & FLAG_PROTECTED) != 0).sum()) == 16


def test_qwen2_vl_evicts_with_3d_positions(tmp_path):
    model = build_tiny("qwen2_vl", tmp_path)
    inputs = qwen2_vl_inputs(model.config, batch=1, image_hw=[(56, 56)], text_lens=[16])
    with torch.no_grad():
        ref = model.generate(**inputs, max_new_tokens=12, do_sample=False)
        with mmeff.apply(model, mmeff.SepLLM(separator_ids=SEPS, cache_size=4096)):
            same = model.generate(**inputs, max_new_tokens=12, do_sample=False)
        assert torch.equal(ref, same)
        press = mmeff.SepLLM(separator_ids=SEPS, init_size=2, sep_size=2, local_size=4, cache_size=8, protect_visual=False)
        with mmeff.apply(model, press) as h:
            model.generate(**inputs, max_new_tokens=12, do_sample=False)
        assert h.stats["stored_now"] <= 8 and h.stats["stored_max"] == inputs["input_ids"].shape[1]  # dense prefill
        flags = h.cache.layers[0].flags
        ends = (inputs["input_ids"] == model.config.vision_end_token_id).sum()
        assert ends == 1 and int(((flags & FLAG_SEP) != 0).sum()) >= 1
    with pytest.raises(ValueError, match="M-RoPE"):
        with mmeff.apply(model, mmeff.SepLLM(separator_ids=SEPS, streaming=True)):
            pass


def test_errors(llama, tmp_path):
    with pytest.raises(ValueError, match="exceeds cache_size"):
        with mmeff.apply(llama, mmeff.SepLLM(separator_ids=SEPS, init_size=4, sep_size=64, local_size=256, cache_size=300)):
            pass
    with pytest.raises(ValueError, match="layers"):
        with mmeff.apply(llama, mmeff.SepLLM(separator_ids=SEPS, cache_size=[512, 512])):
            pass
    with pytest.raises(ValueError, match="inputs_embeds"):
        with mmeff.apply(llama, mmeff.SepLLM(separator_ids=SEPS)):
            llama(inputs_embeds=torch.zeros(1, 4, 32))
    from transformers import DynamicCache

    full = output_cache(llama(_stream(8)[None], use_cache=True, **{CACHE_KWARG: DynamicCache()}))
    with pytest.raises(ValueError, match="already holding 8 tokens"):
        with mmeff.apply(llama, mmeff.StreamingLLM(local_size=8)):
            llama(_stream(2)[None], use_cache=True, **{CACHE_KWARG: full})
    with pytest.raises(ValueError, match="one KV-cache press"):
        mmeff.apply(llama, mmeff.FullKV(), mmeff.StreamingLLM()).__enter__()
    with pytest.raises(ValueError, match="tokenizer"):
        with mmeff.apply(llama, mmeff.SepLLM()):  # a tiny model folder has no tokenizer
            pass
    import timm

    with pytest.raises(TypeError, match="decoder"):
        KVCacheAdapter(timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32), mmeff.FullKV())
    with pytest.raises(TypeError, match="cache_size"):
        mmeff.StreamingLLM(cache_size=10)
    assert mmeff.list_presses() == ["full", "sepllm", "streamingllm"]
    assert mmeff.create_press("sepllm", cache_size=600).cache_size == 600


def test_streaming_perplexity_reference(llama):
    ids = _stream(200, seed=7)
    ref = llama(ids[None], labels=ids[None]).loss.item()
    plain = streaming_perplexity(llama, ids, None, chunk_size=16, progress=False)
    full = streaming_perplexity(llama, ids, mmeff.FullKV(), chunk_size=16, progress=False)
    assert plain.nll == pytest.approx(ref, rel=1e-5) and full.nll == pytest.approx(ref, rel=1e-5)
    assert full.avg_kv == pytest.approx(plain.avg_kv) == pytest.approx(100.5)
    sep = streaming_perplexity(llama, ids, mmeff.SepLLM(separator_ids=SEPS, init_size=2, sep_size=4, local_size=16,
                                                       cache_size=32, streaming=True), chunk_size=16, progress=False)
    assert sep.stored_max == 32 and sep.avg_kv < 40 and sep.peak_cache_bytes < full.peak_cache_bytes / 3
    # streams side by side: each row evicts on its own tokens, so the batch equals the rows run alone
    press = mmeff.SepLLM(separator_ids=SEPS, init_size=2, sep_size=4, local_size=16, cache_size=32, streaming=True)
    rows = torch.stack([ids[:100], _stream(100, seed=10, sep_every=3)])
    both = streaming_perplexity(llama, rows, press, chunk_size=1, progress=False)
    alone = [streaming_perplexity(llama, r, press, chunk_size=1, progress=False) for r in rows]
    assert both.tokens == 198 and both.nll == pytest.approx(sum(a.nll for a in alone) / 2, rel=1e-5)
    assert both.stored_max == max(a.stored_max for a in alone) == 32
    with pytest.raises(ValueError, match="token streams"):
        streaming_perplexity(llama, ids.view(2, 1, 100), None)


@pytest.mark.slow
def test_separator_ids_from_real_tokenizer(smollm2):
    model, tok = smollm2
    ids = mmeff.separator_ids(tok)
    for s in (".", " .", ",", " ,", "\n", " ", "?", ":", ";", "!", "\n\n"):
        (i,) = tok.encode(s, add_special_tokens=False)
        assert i in ids, s
    assert all(tok.decode([i]).strip() in {"", ".", ",", "?", "!", ";", ":"} for i in ids)
    # attached without ids: derived from the tokenizer saved next to the model
    press = mmeff.SepLLM(init_size=4, sep_size=16, local_size=32, cache_size=64)
    text = "Hello. This is a test, of separators; really: yes! " * 6
    x = tok(text, return_tensors="pt")
    with torch.no_grad(), mmeff.apply(model, press) as h:
        model.generate(**x, max_new_tokens=8, do_sample=False)
    assert set(press.separator_ids) == set(ids)
    assert h.stats["stored_now"] <= 64 and h.stats["stored_max"] == x.input_ids.shape[1]  # dense prefill


@pytest.mark.slow
def test_sepllm_bench_table(smollm2, tmp_path):
    from mmeff.bench.kv import run_sepllm_bench, streamingllm_avg_kv
    from mmeff.cli.main import build_parser

    model, tok = smollm2
    lines: list[str] = []
    rows = run_sepllm_bench(model, tok, tokens=320, long_tokens=0, chunk=32, init_size=4, sep_size=8, local_size=48,
                            cache_size=96, json_path=tmp_path / "r.json", plot_path=tmp_path / "r.png",
                            progress=False, print_fn=lines.append)
    full, sep, stream_eq, stream_c = (r.result for r in rows)
    assert [r.result.method.split("(")[0] for r in rows] == ["full", "sepllm", "streamingllm", "streamingllm"]
    # the full-cache row is plain perplexity of the same 320 tokens
    ids = torch.tensor(tok(offline_text(), add_special_tokens=False).input_ids[:320])
    with torch.no_grad():
        ref = model(ids[None], labels=ids[None]).loss.item()
    assert full.nll == pytest.approx(ref, rel=1e-4)
    # StreamingLLM's measured average KV is what the bench's simulation predicted, and close to SepLLM's
    w = int(stream_eq.method.split("local_size=")[1].rstrip(")"))
    assert stream_eq.avg_kv == pytest.approx(streamingllm_avg_kv(4, w, 320, 32))
    assert abs(stream_eq.avg_kv - sep.avg_kv) <= 1.0
    assert sep.stored_max <= 96 and stream_c.stored_max <= 96 and full.stored_max == 320
    assert (tmp_path / "r.png").stat().st_size > 0 and "peak KV MiB" in "\n".join(lines)
    args = build_parser().parse_args(["bench", "sepllm", "--tokens", "512", "--sep-size", "-1"])
    assert args.suite == "sepllm" and args.tokens == 512 and args.sep_size == -1


def test_press_called_on_a_model_is_kvpress_style_context_manager(llama):
    """``with press(model):`` (kvpress's habit) is ``mmeff.apply(model, press)``: same tokens, model restored
    after the block, also when the block raises."""
    ids = torch.randint(5, 100, (1, 40), generator=torch.Generator().manual_seed(0))
    press = mmeff.StreamingLLM(init_size=2, local_size=8)
    with torch.no_grad():
        with mmeff.apply(llama, press):
            ref = llama.generate(ids, max_new_tokens=6, do_sample=False)
        with press(llama) as handle:
            out = llama.generate(ids, max_new_tokens=6, do_sample=False)
        assert handle.stats["evictions"] > 0 and torch.equal(out, ref)
        assert "generate" not in llama.__dict__ and not llama._forward_pre_hooks
        with pytest.raises(RuntimeError, match="boom"), press(llama):
            raise RuntimeError("boom")
        assert "generate" not in llama.__dict__ and not llama._forward_pre_hooks
