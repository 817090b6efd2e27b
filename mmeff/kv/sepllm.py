"""SepLLM: keep attention sinks, separator tokens and a local window in the KV cache; evict the rest.

    import mmeff
    with mmeff.apply(model, mmeff.SepLLM(cache_size=512)) as h:      # separators from model's tokenizer
        model.generate(**inputs, max_new_tokens=256)
    h.stats["kv_ratio"]                                              # kept / seen

Separator ids are tokenizer-specific (the Llama-3 list is wrong for Vicuna, Qwen or SmolLM), so they are
derived from the model's own tokenizer by :func:`separator_ids`, space-prefixed variants included, when
the press is attached. The eviction itself is the shared :class:`~mmeff.kv.presses.EvictingCache` rule;
this press only says which evictable entries are separators and keeps the newest ``sep_size`` of them.

Two masks over a token stream, as ``(N, N)`` booleans (query row, key column):

* :func:`eviction_visible`: what each query attends under the evicting cache fed ``chunk`` tokens at a time
  (original positions). One forward with it equals the cache run step by step, so a token-by-token sweep
  costs one dense forward (``mmeff bench sepllm --sweep``);
* :func:`sepllm_attention_mask`: the paper's training mask (sinks, every separator, a local window), for
  fine-tuning a model to SepLLM's sparsity (``mmeff.train.sepllm``).

Differences from the official code (``HKUDS/SepLLM``, Streaming-SepLLM's cache manager): the kept KV is
the same token for token (``tests/kv``), with these deliberate changes:

* **separators from the model's own tokenizer** (and their space-prefixed variants); the official lists
  Llama-3 ids, which are other characters in Vicuna, Qwen or SmolLM vocabularies;
* **``cache_size`` counts the arriving token** (evict before the forward, so a layer never exceeds it); the
  official evicts after the forward and holds ``c + 1`` entries during a step. Its ``(w, c)`` is this
  rule's ``(w + 1, c + 1)``, tested token for token;
* **per-row decisions in a batch** (left padding skipped), so batching never changes a row's cache; the
  official streaming driver decodes one sequence at a time;
* fine-tuning (``mmeff.train.sepllm``) is a 100-step CPU miniature of the paper's training, not its
  recipe (README, SepLLM section).
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

__all__ = ["DEFAULT_SEPARATORS", "SepLLM", "additive_mask", "eviction_visible", "sepllm_attention_mask",
           "separator_ids"]

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


def _sep_mask(ids: Tensor, separator_ids: Sequence[int]) -> Tensor:
    return torch.isin(ids, torch.as_tensor(list(separator_ids), dtype=ids.dtype, device=ids.device))


def eviction_visible(
    ids: Tensor,
    separator_ids: Sequence[int],
    init_size: int,
    sep_size: int | None,
    local_size: int,
    cache_size: int | None,
    chunk: int = 1,
) -> Tensor:
    """``(N,)`` token ids -> ``(N, N)`` bool: the keys each query attends when the stream is fed ``chunk``
    tokens at a time through an evicting cache of these sizes (the :class:`~mmeff.kv.presses.EvictingCache`
    rule at batch size 1: before ``q`` tokens arrive to ``L`` stored with ``L + q > cache_size``, keep the
    first ``init_size`` tokens, the newest ``sep_size`` separators (``None``: all) and the newest
    ``local_size - q``). ``sep_size=0`` with ``cache_size = init_size + local_size`` is StreamingLLM;
    ``cache_size=None`` never evicts (the causal mask). Row ``t`` holds the entries stored after step ``t``'s
    append, so ``rows.sum(1).max()`` is the cache's peak length.
    """
    if ids.ndim != 1:
        raise ValueError(f"eviction_visible takes one stream (N,), got shape {tuple(ids.shape)}")
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    n = ids.numel()
    is_sep = _sep_mask(ids.cpu(), separator_ids).tolist()
    vis = torch.zeros(n, n, dtype=torch.bool)
    entries: list[int] = []  # stored positions, oldest first
    for st in range(0, n, chunk):
        en = min(st + chunk, n)
        q = en - st
        if cache_size is not None and entries and len(entries) + q > cache_size:
            cut = len(entries) - max(local_size - q, 0)
            past, window = entries[:cut], entries[cut:]
            seps = [p for p in past if p >= init_size and is_sep[p]]
            if sep_size is not None:
                seps = seps[max(len(seps) - sep_size, 0) :] if sep_size > 0 else []
            entries = [p for p in past if p < init_size] + seps + window
        idx = torch.tensor(entries, dtype=torch.long)
        for t in range(st, en):
            vis[t, idx] = True
            vis[t, st : t + 1] = True
        entries.extend(range(st, en))
    return vis


def sepllm_attention_mask(ids: Tensor, separator_ids: Sequence[int], init_size: int, local_size: int) -> Tensor:
    """SepLLM's training mask (``Training-SepLLM`` ``build_prefill_mask``): ``(..., N)`` ids -> ``(..., N, N)``
    bool where query ``i`` attends key ``j <= i`` iff ``j < init_size``, token ``j`` is a separator, or
    ``i - j <= local_size - 1`` (the window includes the query)."""
    n = ids.shape[-1]
    pos = torch.arange(n, device=ids.device)
    i, j = pos[:, None], pos[None, :]
    near = (j <= i) & (i - j <= local_size - 1)
    far = (j <= i) & ((j < init_size) | _sep_mask(ids, separator_ids)[..., None, :])
    return near | far


def additive_mask(visible: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """``(..., N_q, N_k)`` bool (True = attend) -> ``(B, 1, N_q, N_k)`` additive mask (0 / dtype's min) that
    HF attention (eager and sdpa) takes as a ready 4-D ``attention_mask``."""
    if visible.ndim not in (2, 3):
        raise ValueError(f"expected a (N_q, N_k) or (B, N_q, N_k) mask, got shape {tuple(visible.shape)}")
    m = torch.zeros(visible.shape, dtype=dtype, device=visible.device).masked_fill_(~visible, torch.finfo(dtype).min)
    return m[None, None] if m.ndim == 2 else m[:, None]
