"""SepLLM: keep attention sinks, separator tokens and a local window in the KV cache; evict the rest.

    import mmeff
    with mmeff.apply(model, mmeff.SepLLM(cache_size=512)) as h:      # separators from model's tokenizer
        model.generate(**inputs, max_new_tokens=256)
    h.stats["kv_ratio"]                                              # kept / seen

Separator ids are tokenizer-specific (the Llama-3 list is wrong for Vicuna, Qwen or SmolLM), so they are
derived from the model's own tokenizer by :func:`separator_ids`, space-prefixed variants included, when
the press is attached. The eviction itself is the shared :class:`~mmeff.kv.presses.EvictingCache` rule;
this press only says which evictable entries are separators and keeps the newest ``sep_size`` of them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from transformers import AutoTokenizer

from mmeff.checkpoint import local_or_hub
from mmeff.kv.presses import FLAG_SEP, KVPress, LayerBudget, SizeSpec, register_press, reverse_rank

__all__ = ["DEFAULT_SEPARATORS", "SepLLM", "separator_ids"]

#: the paper's separators: ". , ? ! ; : <space> <tab> <newline>"
DEFAULT_SEPARATORS: tuple[str, ...] = (".", ",", "?", "!", ";", ":", " ", "\t", "\n")


def _tokenizer_of(obj: Any) -> Any:
    return getattr(obj, "tokenizer", obj)  # processors carry their tokenizer


def separator_ids(tokenizer: Any, separators: Sequence[str] = DEFAULT_SEPARATORS) -> list[int]:
    """Token ids of ``separators`` for this tokenizer: each string, its space-prefixed form and ``"\\n\\n"``.

    A variant counts only if the tokenizer encodes it as exactly one token (what SepLLM's
    ``get_separator_ids.py`` does by hand). ``tokenizer`` may be an HF tokenizer or a processor.
    Raises ``ValueError`` if none of the separators is a single token.
    """
    tok = _tokenizer_of(tokenizer)
    if not hasattr(tok, "encode"):
        raise TypeError(f"expected an HF tokenizer or processor, got {type(tokenizer).__name__}")
    variants: list[str] = []
    for s in separators:
        variants += [s, " " + s]
    if "\n" in separators:
        variants.append("\n\n")
    special = set(getattr(tok, "all_special_ids", []) or [])
    out: set[int] = set()
    for v in variants:
        ids = tok.encode(v, add_special_tokens=False)
        # Sentencepiece tokenizers prepend a word-boundary piece ("▁"); drop it if it is alone.
        if len(ids) == 2 and tok.convert_ids_to_tokens(ids[0]) == "▁":
            ids = ids[1:]
        if len(ids) == 1 and ids[0] not in special:
            out.add(int(ids[0]))
    if not out:
        raise ValueError(f"none of the separators {list(separators)!r} is a single token for {type(tok).__name__}")
    return sorted(out)


def _load_tokenizer(model: Any) -> Any:
    path = getattr(getattr(model, "config", None), "_name_or_path", None) or getattr(model, "name_or_path", None)
    if not path:
        raise ValueError("model has no name_or_path to load its tokenizer from")
    ref = local_or_hub(str(path), "model's tokenizer")  # a moved or mistyped folder fails now, not after the hub
    return AutoTokenizer.from_pretrained(ref, local_files_only=Path(ref).is_dir())


@register_press("sepllm")
@dataclass
class SepLLM(KVPress):
    """SepLLM (Chen et al., 2024) with real eviction, as SepCache does.

    Keeps the first ``init_size`` real tokens, the newest ``sep_size`` separators (``None`` = all, the
    repo default ``USE_MAX_SEP_CACHE=False``; the paper's runs cap them) and the newest ``local_size``
    tokens; evicts when a layer would exceed ``cache_size``. Defaults follow the HF SepCache example
    (a=4, s=128, w=256, c=512). ``separator_ids=None`` derives them from the model's tokenizer (or from
    ``tokenizer``, a tokenizer/processor or a path) when attached. With ``protect_visual`` (default) a
    VLM's image/video placeholders are never evicted; without it they are, and Qwen2-VL's
    ``<|vision_end|>`` counts as a separator. ``full_layers=(0, -1)`` is the paper's ``ht`` variant.
    """

    init_size: int = 4
    sep_size: SizeSpec = 128
    local_size: SizeSpec = 256
    cache_size: SizeSpec = 512
    separator_ids: tuple[int, ...] | None = None
    separators: tuple[str, ...] = DEFAULT_SEPARATORS
    tokenizer: Any = field(default=None, repr=False, compare=False)

    needs_ids = True

    def __post_init__(self) -> None:
        for v in self._as_list(self.sep_size):
            if v is not None and (not isinstance(v, int) or v < 0):
                raise ValueError(f"sep_size entries must be ints >= 0 or None, got {v!r}")
        # ids derived at attach time are re-derived on every attach (the next model may tokenize differently)
        self._given_ids = self.separator_ids is not None
        if self.separator_ids is not None:
            self.separator_ids = tuple(int(i) for i in self.separator_ids)
            if not self.separator_ids:
                raise ValueError("separator_ids is empty; pass None to derive them from the tokenizer")
        self._sep_tensor: Tensor | None = None
        super().__post_init__()

    def sep_spec(self) -> SizeSpec:
        return self.sep_size

    def bind(self, model: Any) -> None:
        if not self._given_ids:
            tok = self.tokenizer
            try:
                if tok is None:
                    tok = _load_tokenizer(model)
                elif isinstance(tok, (str, Path)):
                    tok = _load_tokenizer(type("M", (), {"name_or_path": str(tok)})())
            except (OSError, ValueError) as e:
                raise ValueError(
                    "SepLLM needs the model's separator token ids: pass tokenizer=<its tokenizer or processor> or "
                    f"separator_ids=mmeff.separator_ids(tokenizer) (could not load one from the model: {e})"
                ) from e
            self.separator_ids = tuple(separator_ids(tok, self.separators))
        self._sep_tensor = None

    def token_flags(self, ids: Tensor) -> Tensor:
        if self.separator_ids is None:
            raise RuntimeError("SepLLM.separator_ids is unset: attach the press with mmeff.apply (or call bind)")
        if self._sep_tensor is None or self._sep_tensor.device != ids.device:
            self._sep_tensor = torch.tensor(self.separator_ids, dtype=ids.dtype, device=ids.device)
        return torch.isin(ids, self._sep_tensor).to(torch.uint8) * FLAG_SEP

    def keep_extra(self, flags: Tensor, candidates: Tensor, budget: LayerBudget) -> Tensor:
        seps = candidates & ((flags & FLAG_SEP) != 0)
        if budget.sep is None:
            return seps
        return seps & (reverse_rank(seps) <= budget.sep)

    def describe(self) -> str:
        return (
            f"{self.name}(init_size={self.init_size}, sep_size={self.sep_size}, local_size={self.local_size}, "
            f"cache_size={self.cache_size}" + (f", full_layers={self.full_layers}" if self.full_layers else "")
            + (", streaming=True" if self.streaming else "") + ")"
        )
