"""Streaming perplexity: feed a long token stream through a causal LM chunk by chunk with a KV-cache press.

    from mmeff.eval.streaming import streaming_perplexity, offline_text
    ids = tokenizer(offline_text()).input_ids
    r = streaming_perplexity(model, ids, mmeff.SepLLM(streaming=True), chunk_size=64)
    r.ppl, r.avg_kv, r.peak_cache_bytes

Each chunk attends to the cache plus the chunk's earlier tokens, then the press may evict; with a press,
memory stays bounded however long the stream (``streaming=True`` also keeps positions inside the cache,
so the stream may be longer than the model's context). ``chunk_size=1`` is the papers' token-by-token
protocol; larger chunks are much faster on CPU and let the local window breathe by up to a chunk. A batch
of equally long streams runs as one (each row evicts on its own tokens), which is what makes token by
token affordable on a CPU.

:class:`MaskedStream` gets the same per-token losses for original positions from dense forwards with a
4-D mask (:func:`mmeff.kv.sepllm.eviction_visible`): one forward per method instead of one per token.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm
from transformers import DynamicCache

from mmeff.api import apply
from mmeff.hfconfig import CACHE_KWARG, output_cache
from mmeff.kv.presses import KVPress
from mmeff.kv.sepllm import additive_mask

try:
    from pydoc_data.topics import topics as _PYDOC_TOPICS
except ImportError:  # some distributions strip pydoc_data; offline_text() says so when called
    _PYDOC_TOPICS = None

__all__ = ["MaskedStream", "StreamResult", "offline_split", "offline_text", "streaming_perplexity"]


def offline_text() -> str:
    """Long real English text that ships with every CPython: the ``pydoc`` topic help (~465k characters)."""
    if _PYDOC_TOPICS is None:
        raise ImportError("this Python has no pydoc_data.topics; pass your own text")
    return "\n\n".join(_PYDOC_TOPICS[k] for k in sorted(_PYDOC_TOPICS))


def offline_split(tokenizer: Any) -> tuple[list[int], list[int]]:
    """:func:`offline_text` tokenized (no special tokens) and cut in half: ``(first, second)``. Fine-tuning
    reads the first half and evaluations the held-out second (``mmeff.train.sepllm``, ``bench sepllm``)."""
    ids = tokenizer(offline_text(), add_special_tokens=False).input_ids
    return ids[: len(ids) // 2], ids[len(ids) // 2 :]


@dataclass
class StreamResult:
    """Outcome of :func:`streaming_perplexity`."""

    method: str
    tokens: int  # predicted tokens
    nll: float  # mean negative log-likelihood (nats)
    ppl: float
    avg_kv: float  # mean real keys each query attended (over layers)
    kv_kept: float  # real entries held at the end (mean over layers)
    stored_max: int  # longest cache ever held by a layer (entries)
    peak_cache_bytes: int
    seconds: float
    peak_cuda_bytes: int | None = None
    curve: list[float] = field(default_factory=list, repr=False)  # mean NLL per chunk
    kept: list[float] = field(default_factory=list, repr=False)  # real KV entries held after each chunk (layer mean)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else float("nan")

    def as_dict(self) -> dict[str, Any]:
        """Plain dict (for JSON), without the per-chunk curve."""
        d = asdict(self)
        d.pop("curve")
        d.pop("kept")
        d["tokens_per_s"] = self.tokens_per_s
        return d


def _kv_bytes(cache: DynamicCache) -> int:
    return sum(
        lay.keys.numel() * lay.keys.element_size() + lay.values.numel() * lay.values.element_size()
        for lay in cache.layers
        if getattr(lay, "keys", None) is not None
    )


@torch.no_grad()
def streaming_perplexity(
    model: nn.Module,
    input_ids: Tensor | Sequence[int],
    press: KVPress | None = None,
    chunk_size: int = 64,
    progress: bool = True,
    desc: str | None = None,
) -> StreamResult:
    """Perplexity of ``input_ids`` (``(N,)``, or ``(B, N)``: ``B`` streams side by side) under ``model`` fed
    ``chunk_size`` tokens at a time.

    ``press=None`` runs the plain HF ``DynamicCache`` (the reference); a press runs inside
    ``mmeff.apply``. Returns NLL/PPL over the ``B * (N - 1)`` predicted tokens, the average KV each query
    attended, the longest cache held and the peak cache bytes (and peak CUDA memory on GPU).
    """
    ids = torch.as_tensor(input_ids, dtype=torch.long)
    if ids.ndim == 1:
        ids = ids[None]
    if ids.ndim != 2 or ids.shape[1] < 2:
        raise ValueError(f"need (N,) or (B, N) token streams of at least 2 tokens, got shape {tuple(ids.shape)}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    device = next(model.parameters()).device
    ids = ids.to(device)
    n = ids.shape[1]
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    model.eval()
    name = press.describe() if press is not None else "dynamic_cache"
    nll_sum, count, processed, curve, held = 0.0, 0, 0, [], []
    peak_plain, stored_max = 0, 0
    ctx = apply(model, press) if press is not None else nullcontext()
    t0 = time.perf_counter()
    with ctx as handle:
        cache = handle.new_cache() if press is not None else DynamicCache()
        for s in tqdm(range(0, n - 1, chunk_size), desc=desc or name, disable=not progress, unit="chunk"):
            x = ids[:, s : s + chunk_size]
            out = model(input_ids=x, use_cache=True, **{CACHE_KWARG: cache})
            cache = output_cache(out)
            processed += x.shape[1]
            targets = ids[:, s + 1 : s + 1 + x.shape[1]]
            logits = out.logits[:, : targets.shape[1]].float()
            nll = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum").item()
            nll_sum += nll
            count += targets.numel()
            curve.append(nll / targets.numel())
            if press is None:
                peak_plain = max(peak_plain, _kv_bytes(cache))
                stored_max = cache.get_seq_length()
                held.append(float(stored_max))
            else:
                held.append(float(cache.stats()["kv_kept"]))
    if cuda:
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - t0
    if press is not None:
        st = cache.stats()
        avg_kv, kept, stored_max, peak = st["avg_kv"], st["kv_kept"], st["stored_max"], st["peak_cache_bytes"]
    else:
        # Query i attends i + 1 keys, so the mean over the processed tokens is (processed + 1) / 2.
        avg_kv = (processed + 1) / 2
        kept, peak = float(stored_max), peak_plain
    return StreamResult(
        method=name,
        tokens=count,
        nll=nll_sum / count,
        ppl=math.exp(nll_sum / count),
        avg_kv=avg_kv,
        kv_kept=kept,
        stored_max=int(stored_max),
        peak_cache_bytes=int(peak),
        seconds=seconds,
        peak_cuda_bytes=torch.cuda.max_memory_allocated(device) if cuda else None,
        curve=curve,
        kept=held,
    )


class MaskedStream:
    """Per-token losses of one stream under any attention pattern, a dense forward each, for original
    positions (no eviction happens; the mask decides what each query sees).

    The full causal forward runs once (:attr:`full_nll`) and its cache is reused: a pattern whose first
    ``k`` rows are causal (an evicting cache before its first eviction) only runs ``ids[k:]``. With
    :func:`mmeff.kv.sepllm.eviction_visible` this gives, to float rounding, what
    :func:`streaming_perplexity` gets token by token with ``streaming=False`` presses.
    """

    def __init__(self, model: nn.Module, ids: Tensor | Sequence[int]) -> None:
        self.model = model
        self.ids = torch.as_tensor(ids, dtype=torch.long)
        if self.ids.ndim != 1 or self.ids.numel() < 2:
            raise ValueError(f"MaskedStream takes one stream (N,) of at least 2 tokens, got shape {tuple(self.ids.shape)}")
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        model.eval()
        with torch.no_grad():
            out = model(input_ids=self.ids[None].to(self.device), use_cache=True)
        self.cache = output_cache(out)
        self.full_nll = self._nll(out.logits[0, :-1], self.ids[1:])

    def _nll(self, logits: Tensor, targets: Tensor) -> Tensor:
        return F.cross_entropy(logits.float(), targets.to(logits.device), reduction="none").cpu()

    @torch.no_grad()
    def nll(self, visible: Tensor) -> Tensor:
        """``(N, N)`` bool (query row, key column; causal) -> ``(N - 1,)`` NLL of ``ids[1:]``."""
        n = self.ids.numel()
        if visible.shape != (n, n):
            raise ValueError(f"visible must be ({n}, {n}), got {tuple(visible.shape)}")
        causal = torch.ones(n, n, dtype=torch.bool).tril()
        if bool((visible & ~causal).any()):
            raise ValueError("visible lets a query see a later token; the pattern must be causal")
        differs = (visible != causal).any(1).nonzero()
        if differs.numel() == 0:
            return self.full_nll.clone()
        k = int(differs[0])
        past = DynamicCache()
        for i, layer in enumerate(self.cache.layers):
            past.update(layer.keys[:, :, :k], layer.values[:, :, :k], i)
        mask = additive_mask(visible[k:].to(self.device), self.dtype)
        out = self.model(input_ids=self.ids[None, k:].to(self.device), attention_mask=mask, use_cache=True,
                         **{CACHE_KWARG: past})
        return torch.cat([self.full_nll[:k], self._nll(out.logits[0, :-1], self.ids[k + 1 :])])
