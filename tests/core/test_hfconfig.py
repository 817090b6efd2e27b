"""The KV-cache keyword shim (``mmeff.hfconfig``) against the installed transformers: it must name what the
decoders take and return (``cache`` from 5.24 on, ``past_key_values`` before), so nothing mmeff passes is
renamed behind its back (with a FutureWarning) or silently dropped into ``**kwargs``."""

from __future__ import annotations

import inspect
import warnings

import pytest
import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM
from transformers.masking_utils import create_causal_mask
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.models.llama.modeling_llama import LlamaAttention, LlamaModel

from mmeff.hfconfig import (
    CACHE_KWARG,
    CACHE_KWARGS,
    LEGACY_CACHE_KWARG,
    cache_from_kwargs,
    output_cache,
    set_cache_kwarg,
    without_cache_kwargs,
)


@pytest.fixture(scope="module")
def llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    return LlamaForCausalLM(cfg).eval()


def _params(fn) -> set[str]:
    # the function as defined, not transformers' deprecation wrapper (which may expose the old name too)
    return set(inspect.signature(inspect.unwrap(fn)).parameters)


def test_cache_kwarg_is_what_the_installed_decoder_takes():
    assert CACHE_KWARGS[0] == CACHE_KWARG and LEGACY_CACHE_KWARG in CACHE_KWARGS
    for fn in (LlamaForCausalLM.forward, LlamaModel.forward, LlamaAttention.forward, create_causal_mask):
        assert CACHE_KWARG in _params(fn), fn.__qualname__
    if CACHE_KWARG != LEGACY_CACHE_KWARG:  # the rename happened: the old name is gone from the definitions
        assert LEGACY_CACHE_KWARG not in _params(LlamaModel.forward)


def test_forward_with_the_shim_name_keeps_the_cache_and_warns_nothing(llama):
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        out = llama(ids[:, :5], use_cache=True, **{CACHE_KWARG: DynamicCache()})
        cache = output_cache(out)
        assert isinstance(cache, DynamicCache) and cache.get_seq_length() == 5
        step = llama(ids[:, 5:], use_cache=True, **{CACHE_KWARG: cache})
    assert output_cache(step) is cache and cache.get_seq_length() == 7
    # the cached step computes what the whole sequence does
    with torch.no_grad():
        full = llama(ids, use_cache=False).logits
    torch.testing.assert_close(step.logits, full[:, 5:], rtol=1e-4, atol=1e-5)


def test_every_accepted_name_reaches_the_model(llama):
    ids = torch.randint(0, 64, (1, 4), generator=torch.Generator().manual_seed(2))
    for name in CACHE_KWARGS:
        cache = DynamicCache()
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # the legacy name is deprecated from 5.24 on
            llama(ids, use_cache=True, **{name: cache})
        assert cache.get_seq_length() == 4, name


def test_kwargs_helpers():
    a, b = object(), object()
    assert cache_from_kwargs({}) is None
    assert cache_from_kwargs({LEGACY_CACHE_KWARG: None, "x": 1}) is None
    assert cache_from_kwargs({LEGACY_CACHE_KWARG: a}) is a
    assert cache_from_kwargs({CACHE_KWARG: a}) is a
    if CACHE_KWARG != LEGACY_CACHE_KWARG:
        # transformers uses the new name when both are given; so do we
        assert cache_from_kwargs({LEGACY_CACHE_KWARG: b, CACHE_KWARG: a}) is a
        assert cache_from_kwargs({LEGACY_CACHE_KWARG: b, CACHE_KWARG: None}) is b
    else:
        assert cache_from_kwargs({"cache": a}) is None  # not a cache keyword before 5.24

    kw: dict = {"input_ids": 1}
    set_cache_kwarg(kw, a)
    assert kw == {"input_ids": 1, CACHE_KWARG: a}
    kw = {LEGACY_CACHE_KWARG: None}
    set_cache_kwarg(kw, a)
    assert kw == {LEGACY_CACHE_KWARG: a}  # the caller's name is kept, no second name added
    kw = dict.fromkeys(CACHE_KWARGS)
    set_cache_kwarg(kw, b)
    assert all(kw[n] is b for n in CACHE_KWARGS)

    kw = {"hidden_states": 0, "use_cache": True, "position_ids": 2, **dict.fromkeys(CACHE_KWARGS, a)}
    assert without_cache_kwargs(kw, "hidden_states", "use_cache") == {"position_ids": 2}
    assert without_cache_kwargs(kw) == {"hidden_states": 0, "use_cache": True, "position_ids": 2}


def test_output_cache_reads_the_declared_field():
    cache = DynamicCache()
    out = CausalLMOutputWithPast(logits=torch.zeros(1), **{CACHE_KWARG: cache})
    assert CACHE_KWARG in CausalLMOutputWithPast.__dataclass_fields__
    assert output_cache(out) is cache
    assert output_cache(CausalLMOutputWithPast(logits=torch.zeros(1))) is None
