"""Small helpers over HF configs that nest a ``text_config`` (LLaVA, Qwen2-VL) or not (plain LLMs), and the
one shim over the name of the KV-cache keyword, which transformers 5.24 renamed.

transformers < 5.24 passes the cache as ``past_key_values`` (forward keyword, ``ModelOutput`` field,
``create_causal_mask`` argument, attention-module keyword); from 5.24 on it is ``cache`` everywhere. The
old name is still accepted at the public entry points until 5.40, with a ``FutureWarning``, but a hook that
reads a forward's kwargs sees only the name the caller used, and the decoder calls its layers and attention
modules with the new name only. Every mmeff site that passes, reads or filters the cache goes through the
names and helpers here.
"""

from __future__ import annotations

from collections.abc import Mapping, MutableMapping
from typing import Any

from transformers.modeling_outputs import BaseModelOutputWithPast

__all__ = [
    "text_config",
    "pad_token_id",
    "CACHE_KWARG",
    "LEGACY_CACHE_KWARG",
    "CACHE_KWARGS",
    "cache_from_kwargs",
    "set_cache_kwarg",
    "without_cache_kwargs",
    "output_cache",
]

#: the pre-5.24 name of the KV-cache keyword / output field
LEGACY_CACHE_KWARG = "past_key_values"
#: the name the installed transformers uses: ``cache`` (>= 5.24) or ``past_key_values`` (< 5.24). Read off
#: the output dataclass rather than the version string, so a backport or pre-release is judged by what it does.
CACHE_KWARG = "cache" if "cache" in BaseModelOutputWithPast.__dataclass_fields__ else LEGACY_CACHE_KWARG
#: every name a caller of the installed transformers may pass the cache under, the current one first
#: (transformers prefers it when both are given)
CACHE_KWARGS: tuple[str, ...] = tuple(dict.fromkeys((CACHE_KWARG, LEGACY_CACHE_KWARG)))


def text_config(config: Any) -> Any:
    """The language-model config of a VLM config, or the config itself for a text-only model."""
    return getattr(config, "text_config", config)


def pad_token_id(config: Any) -> int:
    """The pad id, looked up on the text config then the outer one (transformers 5 deprecates the outer
    ``pad_token_id`` of VLM configs); 0 when neither defines one inside the vocabulary (Idefics3's outer
    config keeps a default pad id that a smaller text model does not have)."""
    vocab = getattr(text_config(config), "vocab_size", None)
    for cfg in (text_config(config), config):
        pad = getattr(cfg, "pad_token_id", None)
        if pad is not None and (vocab is None or 0 <= int(pad) < int(vocab)):
            return int(pad)
    return 0


def cache_from_kwargs(kwargs: Mapping[str, Any]) -> Any:
    """The KV cache (a transformers ``Cache``) a forward call's kwargs carry under either name; ``None`` when
    they carry none."""
    for name in CACHE_KWARGS:
        cache = kwargs.get(name)
        if cache is not None:
            return cache
    return None


def set_cache_kwarg(kwargs: MutableMapping[str, Any], cache: Any) -> None:
    """Put ``cache`` into a forward call's kwargs, in place: under every cache name the call already uses (so
    the callee cannot pick a stale one), else under :data:`CACHE_KWARG`."""
    present = [name for name in CACHE_KWARGS if name in kwargs]
    for name in present or [CACHE_KWARG]:
        kwargs[name] = cache


def without_cache_kwargs(kwargs: Mapping[str, Any], *also: str) -> dict[str, Any]:
    """A copy of ``kwargs`` without the cache (under either name) and without the keys in ``also``."""
    drop = {*CACHE_KWARGS, *also}
    return {k: v for k, v in kwargs.items() if k not in drop}


def output_cache(output: Any) -> Any:
    """The KV cache a model output (``ModelOutput``) returns, whichever name its class declares, read without
    transformers' deprecation warning; ``None`` when it returned none."""
    declared = getattr(output, "__dataclass_fields__", {})
    name = next((n for n in CACHE_KWARGS if n in declared), CACHE_KWARG)
    return getattr(output, name, None)
