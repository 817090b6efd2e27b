"""KV-cache eviction for HF causal LMs and the LMs inside LLaVA / Qwen2-VL: presses and an evicting cache.

A *press* is a small ``@dataclass`` saying which cached tokens survive an eviction; ``mmeff.apply(model,
press)`` attaches it by hooks (``mmeff.adapters.kv_cache``) and every ``forward`` / ``generate`` inside the
block runs on an :class:`EvictingCache`, which really drops keys and values (memory falls, not just a mask).

The shared rule (SepCache's, see ``shared/methods/llm_backbone.md`` §1): prefill appends everything; when a
layer holds ``L`` entries and ``q`` new ones arrive with ``L + q > cache_size`` (plus the protected visual
tokens), the layer first makes room, then appends. It keeps

* the first ``init_size`` real tokens of every row (attention sinks; left padding is skipped),
* protected tokens (visual placeholders of a VLM, unless ``protect_visual=False``),
* whatever the variant's :meth:`KVPress.keep_extra` picks from the rest (SepLLM: separators),
* the local window: the newest ``local_size`` tokens *including* the ``q`` arriving ones,

and evicts the rest. Each row of a batch is decided on its own real tokens, exactly as at batch size 1, so
batching never changes a row's result; shorter rows are padded with masked slots.

So a layer never holds more than ``cache_size`` entries (plus protected ones) at any moment of a step whose
``q`` arriving tokens fit the local window; only a prefill longer than that is held whole for its one
forward (dense, as SepCache's), and ``stats()["stored_max"]`` reports that true peak. ``cache_size`` counts
the arriving token: the official Streaming-SepLLM manager evicts after the forward, so its ``(local_size w,
cache_size c)`` holds ``c + 1`` entries during a step and equals this rule with ``(w + 1, c + 1)`` token for
token (``tests/kv``).

``streaming=True`` is for inputs longer than the model's context: keys are stored before RoPE and every
step re-rotates them to their rank inside the cache (StreamingLLM's position shift), so positions never
exceed ``cache_size + q``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

import torch
from torch import Tensor
from transformers.cache_utils import Cache, CacheLayerMixin

from mmeff.core import C, Registry, attached

__all__ = [
    "FLAG_PROTECTED",
    "FLAG_SEP",
    "FLAG_SINK",
    "EvictingCache",
    "EvictingLayer",
    "FullKV",
    "KVPress",
    "LayerBudget",
    "Rope",
    "StepInfo",
    "StreamingLLM",
    "create_press",
    "get_press_class",
    "list_presses",
    "register_press",
]

FLAG_SINK = 1
FLAG_PROTECTED = 2
FLAG_SEP = 4

SizeSpec = int | Sequence[int | None] | None

PRESSES: Registry[KVPress] = Registry("press", "KV-cache press")


def register_press(name: str) -> Callable[[C], C]:
    """Class decorator: make a :class:`KVPress` subclass available as ``create_press(name, ...)``."""
    return PRESSES.register(name)


def list_presses() -> list[str]:
    """Names of the registered KV-cache presses."""
    return PRESSES.names()


def get_press_class(name: str) -> type[KVPress]:
    """The press class registered as ``name``; ``KeyError`` listing the known names otherwise."""
    return PRESSES.get(name)


def create_press(name: str, **kwargs: Any) -> KVPress:
    """``create_press("sepllm", cache_size=512)`` and friends."""
    return PRESSES.create(name, **kwargs)


def reverse_rank(mask: Tensor) -> Tensor:
    """``(B, L)`` bool -> rank of each True counted from the right (newest = 1); 0 where False."""
    return torch.flip(torch.cumsum(torch.flip(mask.long(), (1,)), 1), (1,)) * mask


@dataclass(frozen=True)
class LayerBudget:
    """Sizes of one layer: ``init`` sinks, at most ``sep`` separators (None = no cap), ``local`` window
    (includes the arriving tokens) and ``cache`` (a row evicts when its real entries + ``q`` exceed
    ``cache`` + its protected entries)."""

    init: int
    sep: int | None
    local: int
    cache: int


@dataclass
class KVPress:
    """Base press: attention sinks + local window (+ protected visual tokens) and nothing else.

    Subclasses override :meth:`keep_extra` (which evictable entries also survive) and, if they need to
    know tokens, :meth:`token_flags`. Sizes may be one int for every layer or a per-layer sequence;
    ``full_layers`` (negative indices allowed) never evict, like SepLLM's ``ht`` variant.
    """

    init_size: int = 4
    local_size: SizeSpec = 256
    cache_size: SizeSpec = 512
    full_layers: tuple[int, ...] = ()
    protect_visual: bool = True
    streaming: bool = False

    name: ClassVar[str] = "press"
    #: whether the press cannot work without token ids (an ``inputs_embeds``-only call is then an error)
    needs_ids: ClassVar[bool] = False

    def __post_init__(self) -> None:
        if not isinstance(self.init_size, int) or self.init_size < 0:
            raise ValueError(f"init_size must be an int >= 0, got {self.init_size!r}")
        self.full_layers = tuple(int(i) for i in self.full_layers)
        self._validate_sizes()

    def _validate_sizes(self) -> None:
        for v in self._as_list(self.local_size):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"local_size entries must be ints >= 1, got {v!r}")
        for v in self._as_list(self.cache_size):
            if v is not None and (not isinstance(v, int) or v < 1):
                raise ValueError(f"cache_size entries must be ints >= 1 (None: that layer never evicts), got {v!r}")

    @staticmethod
    def _as_list(spec: SizeSpec) -> list[int | None]:
        return list(spec) if isinstance(spec, Sequence) and not isinstance(spec, str) else [spec]

    @staticmethod
    def _per_layer(spec: SizeSpec, num_layers: int, name: str) -> list[int | None]:
        if isinstance(spec, Sequence) and not isinstance(spec, str):
            if len(spec) != num_layers:
                raise ValueError(f"{name} has {len(spec)} entries but the model has {num_layers} layers")
            return list(spec)
        return [spec] * num_layers

    def __call__(self, model: Any) -> Any:
        """kvpress's habit: ``with press(model): model.generate(...)`` runs ``generate`` with this press and
        restores the model when the block ends (the same as ``mmeff.apply(model, press)``). Outside a
        ``with`` block the press stays attached until ``.detach()`` on the returned handle.

        Budgets here are token counts (``cache_size`` entries per layer, ``local_size`` window), not
        kvpress's ``compression_ratio`` (a share of the prompt removed once at prefill): a streaming cache
        has no fixed prompt to take a share of.
        """
        return attached(self, model)

    def sep_spec(self) -> SizeSpec:
        """Separator cap per layer; the base press keeps none."""
        return 0

    def budgets(self, num_layers: int) -> list[LayerBudget | None]:
        """Per-layer sizes (``None`` = that layer never evicts).

        Raises ``ValueError`` when a layer's sinks + separators + window do not fit its ``cache_size``.
        """
        full = {i % num_layers for i in self.full_layers if -num_layers <= i < num_layers}
        bad = [i for i in self.full_layers if not -num_layers <= i < num_layers]
        if bad:
            raise ValueError(f"full_layers {bad} out of range for a model with {num_layers} layers")
        local = self._per_layer(self.local_size, num_layers, "local_size")
        cache = self._per_layer(self.cache_size, num_layers, "cache_size")
        sep = self._per_layer(self.sep_spec(), num_layers, "sep_size")
        out: list[LayerBudget | None] = []
        for i in range(num_layers):
            if i in full or cache[i] is None:
                out.append(None)
                continue
            w = local[i]
            need = self.init_size + (sep[i] or 0) + w
            if need > cache[i]:
                raise ValueError(
                    f"layer {i}: init_size {self.init_size} + sep_size {sep[i] or 0} + local_size {w} = {need} "
                    f"exceeds cache_size {cache[i]}; the cache could never hold what it promises to keep"
                )
            out.append(LayerBudget(self.init_size, sep[i], w, cache[i]))
        return out

    def bind(self, model: Any) -> None:
        """Resolve anything model-specific (SepLLM: separator ids from the model's tokenizer)."""

    def token_flags(self, ids: Tensor) -> Tensor:
        """``(B, q)`` token ids -> ``(B, q)`` uint8 flags the press cares about (``FLAG_SEP``); none here."""
        return torch.zeros(ids.shape, dtype=torch.uint8, device=ids.device)

    def keep_extra(self, flags: Tensor, candidates: Tensor, budget: LayerBudget) -> Tensor:
        """Which evictable entries survive besides sinks, protected tokens and the window.

        Args:
            flags: ``(B, L)`` uint8 flags of the stored entries (oldest first).
            candidates: ``(B, L)`` bool, real entries before the local window that are neither sinks nor
                protected (in rows that evict now).
        Returns:
            ``(B, L)`` bool, a subset of ``candidates``.
        """
        return torch.zeros_like(candidates)

    def describe(self) -> str:
        """One line, e.g. ``sepllm(init_size=4, sep_size=64, local_size=256, cache_size=512)``."""
        parts = []
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name.startswith("_") or v == f.default or not f.repr:
                continue
            parts.append(f"{f.name}={v}")
        return f"{self.name}({', '.join(parts)})" if parts else self.name


@register_press("full")
@dataclass
class FullKV(KVPress):
    """No eviction: the full cache, with the same bookkeeping (kept/seen, average KV) as the presses."""

    cache_size: SizeSpec = None

    def budgets(self, num_layers: int) -> list[LayerBudget | None]:
        return [None] * num_layers


@register_press("streamingllm")
@dataclass
class StreamingLLM(KVPress):
    """StreamingLLM: ``init_size`` attention sinks + a window of ``local_size``; ``cache_size`` is their sum."""

    cache_size: SizeSpec = field(default=None, init=False, repr=False)  # init_size + local_size

    def __post_init__(self) -> None:
        super().__post_init__()  # validates local_size first
        local = self._as_list(self.local_size)
        if isinstance(self.local_size, int):
            self.cache_size = self.init_size + self.local_size
        else:
            self.cache_size = [self.init_size + w for w in local]

    def describe(self) -> str:
        extra = ", streaming=True" if self.streaming else ""
        return f"{self.name}(init_size={self.init_size}, local_size={self.local_size}{extra})"


@dataclass
class StepInfo:
    """What the hooks learn about the ``q`` tokens of one forward before the attention layers run."""

    valid: Tensor  # (B, q) bool: real tokens (False = padding)
    flags: Tensor  # (B, q) uint8: FLAG_SEP / FLAG_PROTECTED from the token ids (sinks are per layer)
    ids: Tensor | None  # (B, q) long, or None when only inputs_embeds were given


class Rope:
    """The host's own RoPE, for ``streaming=True``: ``cos_sin(x, positions)`` and ``apply``/``unapply``."""

    def __init__(self, rotary_emb: Any, apply_fn: Callable[..., tuple[Tensor, Tensor]]) -> None:
        self.rotary_emb = rotary_emb
        self.apply_fn = apply_fn
        self.scaling = float(getattr(rotary_emb, "attention_scaling", 1.0) or 1.0)

    def cos_sin(self, x: Tensor, positions: Tensor) -> tuple[Tensor, Tensor]:
        """``positions (B, n)`` -> host ``(cos, sin)`` of shape ``(B, n, head_dim)`` in ``x.dtype``."""
        return self.rotary_emb(x, positions)

    def apply(self, k: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        """Rotate keys ``(B, H, n, D)`` the way the host's attention does."""
        return self.apply_fn(k, k, cos, sin)[1]

    def unapply(self, k: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        """Inverse of :meth:`apply` (rotation by minus the angle; undoes ``attention_scaling`` too)."""
        out = self.apply_fn(k, k, cos, -sin)[1]
        return out / (self.scaling**2) if self.scaling != 1.0 else out


class EvictingLayer(CacheLayerMixin):
    """One layer of an :class:`EvictingCache`: keys/values ``(B, H, L, D)`` plus per-entry bookkeeping.

    ``valid (B, L)`` marks real entries (False = padding or filler), ``flags (B, L)`` sinks/protected/
    separators, ``seen`` counts every column ever appended (what ``get_seq_length`` reports), and
    ``real_seen (B,)`` the real tokens per row (for per-row sinks after left padding).
    """

    is_sliding = False
    is_compileable = False
    is_croppable = False

    def __init__(self, cache: EvictingCache, layer_idx: int, budget: LayerBudget | None) -> None:
        super().__init__()
        self.cache = cache
        self.layer_idx = layer_idx
        self.budget = budget
        self.seen = 0
        self.valid: Tensor | None = None
        self.flags: Tensor | None = None
        self.real_seen: Tensor | None = None
        self.pending_rope: tuple[Tensor, Tensor] | None = None
        self.attended = 0.0  # sum over real queries of real keys they attended
        self.queries = 0
        self.evictions = 0
        self.peak = 0  # most entries held at any moment (right after an append: eviction makes room first)

    # ------------------------------------------------------------------------------------ bookkeeping
    @property
    def length(self) -> int:
        """Entries stored now (``L``)."""
        return 0 if self.keys is None else self.keys.shape[-2]

    def nbytes(self) -> int:
        """Bytes held by keys, values and the per-entry bookkeeping."""
        if self.keys is None:
            return 0
        return sum(t.numel() * t.element_size() for t in (self.keys, self.values, self.valid, self.flags))

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        b, h, _, d = key_states.shape
        dev = key_states.device
        self.dtype, self.device = key_states.dtype, dev
        self.keys = key_states.new_zeros((b, h, 0, d))
        self.values = value_states.new_zeros((b, value_states.shape[1], 0, value_states.shape[-1]))
        self.valid = torch.zeros((b, 0), dtype=torch.bool, device=dev)
        self.flags = torch.zeros((b, 0), dtype=torch.uint8, device=dev)
        self.real_seen = torch.zeros(b, dtype=torch.long, device=dev)
        self.is_initialized = True

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0

    def get_seq_length(self) -> int:
        return self.seen

    def get_max_length(self) -> int:
        return -1

    def real_counts(self) -> Tensor | None:
        """``(B,)`` real entries stored per row."""
        return None if self.valid is None else self.valid.sum(1)

    # --------------------------------------------------------------------------------------- eviction
    def compress(self, q: int | Tensor) -> None:
        """Evict before ``q`` new tokens arrive (an int, or ``(B,)`` real arrivals per row), in every row
        whose real entries + ``q`` exceed the budget.

        Each row is decided on its own real entries exactly as it would be at batch size 1 (so batching
        never changes a row's result); rows that keep fewer entries than the longest are padded with
        masked slots to keep the tensors rectangular.
        """
        b = self.budget
        L = self.length
        if b is None or L == 0:
            return
        valid, flags = self.valid, self.flags
        prot = valid & ((flags & FLAG_PROTECTED) != 0)
        over = valid.sum(1) + q > b.cache + prot.sum(1)  # (B,)
        if not bool(over.any()):
            return
        w_old = (b.local - torch.as_tensor(q, device=valid.device)).clamp_min(0)
        window = valid & (reverse_rank(valid) <= w_old.reshape(-1, 1))
        past = valid & ~window
        core = past & ((flags & (FLAG_SINK | FLAG_PROTECTED)) != 0)
        extra = self.cache.press.keep_extra(flags, past & ~core, b) & past
        keep = valid & (~over[:, None] | window | core | extra)
        counts = keep.sum(1)
        k = int(counts.max())
        if k == L:
            return
        # Masked filler slots for rows keeping fewer than k: the earliest non-kept columns.
        spare = ~keep
        filler = spare & (torch.cumsum(spare.long(), 1) <= (k - counts)[:, None])
        idx = (keep | filler).nonzero()[:, 1].view(keep.shape[0], k)
        self._gather(idx, keep.gather(1, idx))
        self.evictions += 1

    def _gather(self, idx: Tensor, valid: Tensor) -> None:
        before = self.nbytes()
        kv_idx = idx[:, None, :, None]
        self.keys = self.keys.gather(2, kv_idx.expand(-1, self.keys.shape[1], -1, self.keys.shape[-1]))
        self.values = self.values.gather(2, kv_idx.expand(-1, self.values.shape[1], -1, self.values.shape[-1]))
        self.valid = valid
        self.flags = self.flags.gather(1, idx)
        self.cache._account(self.nbytes() - before)

    # ----------------------------------------------------------------------------------------- update
    def update(self, key_states: Tensor, value_states: Tensor, *args: Any, **kwargs: Any) -> tuple[Tensor, Tensor]:
        """Append ``(B, H, q, D)`` keys/values; return what this step's queries attend to."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        step = self.cache.step
        q = key_states.shape[-2]
        if step is None or step.valid.shape != (key_states.shape[0], q):
            raise RuntimeError(
                "EvictingCache.update called without matching step information: the mmeff KV hooks did not run "
                "for this forward (use the cache inside mmeff.apply(model, press))"
            )
        new_valid = step.valid
        init = self.budget.init if self.budget is not None else self.cache.press.init_size
        rank = self.real_seen[:, None] + torch.cumsum(new_valid.long(), 1)
        new_flags = step.flags | ((new_valid & (rank <= init)).to(torch.uint8) * FLAG_SINK)

        # bookkeeping for "average KV": real keys each real query attends (stored real + causal new)
        stored = self.valid.sum(1, keepdim=True)
        span = (stored + torch.cumsum(new_valid.long(), 1)) * new_valid
        self.attended += float(span.sum())
        self.queries += int(new_valid.sum())

        before = self.nbytes()
        rope = self.cache.rope if self.cache.press.streaming else None
        if rope is not None:
            if self.pending_rope is None:
                raise RuntimeError("streaming cache: the attention pre-hook did not set this step's rotary angles")
            cos, sin = self.pending_rope
            new_pre = rope.unapply(key_states, cos, sin)
            old_pre = self.keys
            self.keys = torch.cat([old_pre, new_pre], -2)
        else:
            self.keys = torch.cat([self.keys, key_states], -2)
        self.values = torch.cat([self.values, value_states], -2)
        self.valid = torch.cat([self.valid, new_valid], 1)
        self.flags = torch.cat([self.flags, new_flags], 1)
        self.seen += q
        self.real_seen = self.real_seen + new_valid.sum(1)
        self.peak = max(self.peak, self.length)
        self.cache._account(self.nbytes() - before)
        if rope is None:
            return self.keys, self.values
        # Re-rotate the stored (pre-RoPE) keys to their rank among real entries; the arriving keys already
        # carry exactly those positions (the pre-hook rotated the queries and keys with them).
        self.pending_rope = None
        if old_pre.shape[-2] == 0:
            return key_states, self.values
        pos = (torch.cumsum(self.valid[:, : old_pre.shape[-2]].long(), 1) - 1).clamp_min(0)
        cos_o, sin_o = rope.cos_sin(old_pre, pos)
        return torch.cat([rope.apply(old_pre, cos_o, sin_o), key_states], -2), self.values

    # ------------------------------------------------------------------------- generate() plumbing
    def _select_rows(self, fn: Callable[[Tensor], Tensor]) -> None:
        if not self.is_initialized:
            return
        before = self.nbytes()
        self.keys, self.values = fn(self.keys), fn(self.values)
        self.valid, self.flags, self.real_seen = fn(self.valid), fn(self.flags), fn(self.real_seen)
        self.cache._account(self.nbytes() - before)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._select_rows(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_select_indices(self, indices: Tensor) -> None:
        self._select_rows(lambda t: t[indices])

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._select_rows(lambda t: t.repeat_interleave(repeats, dim=0))

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError(
            "an evicting KV cache cannot be cropped (evicted entries are gone); assisted decoding and "
            "contrastive search are not supported with KV-cache presses"
        )

    def reset(self) -> None:
        before = self.nbytes()
        self.keys = self.values = self.valid = self.flags = self.real_seen = None
        self.is_initialized = False
        self.seen = 0
        self.cache._account(-before)


class EvictingCache(Cache):
    """A transformers ``Cache`` whose layers evict by the rules of ``press`` (see the module doc).

    ``get_seq_length()`` returns the tokens *seen* (so ``generate`` keeps positions right), while
    ``get_query_offset`` and ``get_mask_sizes`` describe the compressed layout the attention runs on.
    Build it through ``mmeff.apply`` (the hooks feed it token ids and rebuild per-layer masks), or with
    ``handle.new_cache()`` to pass it explicitly as the model's cache argument (``cache`` on transformers >= 5.24,
    ``past_key_values`` before; :data:`mmeff.hfconfig.CACHE_KWARG`).
    """

    def __init__(self, press: KVPress, num_layers: int, rope: Rope | None = None) -> None:
        self.press = press
        self.rope = rope
        self.step: StepInfo | None = None
        self.bytes = 0
        self.peak_bytes = 0
        budgets = press.budgets(num_layers)
        super().__init__(layers=[EvictingLayer(self, i, b) for i, b in enumerate(budgets)])

    def _account(self, delta: int) -> None:
        self.bytes += delta
        self.peak_bytes = max(self.peak_bytes, self.bytes)

    def get_query_offset(self, layer_idx: int = 0) -> int:
        return self.layers[layer_idx].length if layer_idx < len(self.layers) else 0

    def stored_lengths(self) -> list[int]:
        """Entries stored per layer (the physical cache length)."""
        return [layer.length for layer in self.layers]

    def stats(self) -> dict[str, Any]:
        """Seen/kept tokens (row 0 and batch means), average KV per query, entries stored by the longest layer
        now (``stored_now``) and at its peak (``stored_max``: the most any layer ever held, the arriving
        tokens of a step included), evictions, bytes now and at peak."""
        live = [lay for lay in self.layers if lay.is_initialized]
        if not live:
            return {"kv_seen": 0, "kv_kept": 0.0, "kv_ratio": 1.0, "avg_kv": 0.0, "stored_now": 0, "stored_max": 0,
                    "cache_bytes": 0, "peak_cache_bytes": self.peak_bytes}
        seen = float(live[0].real_seen.float().mean())
        kept = sum(float(lay.valid.sum(1).float().mean()) for lay in live) / len(live)
        queries = sum(lay.queries for lay in live)
        avg = sum(lay.attended for lay in live) / queries if queries else 0.0
        return {
            "kv_seen": seen,
            "kv_kept": kept,
            "kv_ratio": kept / seen if seen else 1.0,
            "avg_kv": avg,
            "stored_now": max(lay.length for lay in live),
            "stored_max": max(lay.peak for lay in live),
            "evictions": sum(lay.evictions for lay in live),
            "cache_bytes": self.bytes,
            "peak_cache_bytes": self.peak_bytes,
        }

    def reset_stats(self) -> None:
        """Forget the average-KV counters and peaks (not the cache)."""
        for lay in self.layers:
            lay.attended, lay.queries, lay.evictions, lay.peak = 0.0, 0, 0, lay.length
        self.peak_bytes = self.bytes
