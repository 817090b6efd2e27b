"""Measured latency of a HF causal VLM: prefill and per-token greedy decode, timed with CUDA synchronised.

:func:`measure_latency` runs the decode loop by hand (no ``generate``) so every step is timed on its own;
:func:`median_seconds` is the one timing loop the benchmarks share.
"""

from __future__ import annotations

import dataclasses
import inspect
import statistics
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from mmeff.eval.flops import check_int
from mmeff.hfconfig import CACHE_KWARG, cache_from_kwargs, output_cache, without_cache_kwargs
from mmeff.hosts import inner_model

__all__ = [
    "LatencyReport",
    "measure_latency",
    "median_seconds",
    "model_device",
    "sync",
    "to_device",
]


def _cache_nbytes(cache: Any) -> int:
    """Bytes of the key/value tensors actually stored in a transformers cache."""
    layers = getattr(cache, "layers", None)
    total = 0
    if layers is not None:
        for layer in layers:
            for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
                if isinstance(t, torch.Tensor):
                    total += t.numel() * t.element_size()
        return total
    for item in cache:  # legacy tuple-of-tuples caches
        for t in item:
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total


@dataclass
class LatencyReport:
    """Wall-clock timings of prefill and greedy decode (seconds).

    Attributes:
        prefill_s / prefill_min_s / prefill_max_s: median / min / max over ``repeats`` prefills.
        decode_s_per_token / decode_min_s / decode_max_s: median / min / max over every timed decode step
            of every repeat (``None`` when ``decode_tokens == 0``).
        cache_len: KV-cache length after prefill (the returned cache's ``get_seq_length()``), i.e. the sequence
            the LLM actually saw -- shorter than the prompt when a reducer dropped tokens.
        cache_bytes: bytes of the key/value tensors in that cache, measured.
        peak_memory_bytes: CUDA ``max_memory_allocated`` over the timed runs (weights included); ``None``
            on CPU, where no resettable per-run peak exists (``ru_maxrss`` is a process-lifetime mark).
        prefill_samples / decode_samples: raw timings.
        generated_ids: greedy tokens of the last repeat, ``[B][1 + decode_tokens]`` (prefill's argmax first),
            a cheap check that the decode loop is the real computation (matches ``generate``).
    """

    prefill_s: float
    prefill_min_s: float
    prefill_max_s: float
    decode_s_per_token: float | None
    decode_min_s: float | None
    decode_max_s: float | None
    batch: int
    prompt_len: int
    cache_len: int
    cache_bytes: int
    decode_tokens: int
    warmup: int
    repeats: int
    device: str
    peak_memory_bytes: int | None
    prefill_samples: list[float] = field(default_factory=list)
    decode_samples: list[float] = field(default_factory=list)
    generated_ids: list[list[int]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        """Plain-dict view (JSON-serialisable)."""
        return dataclasses.asdict(self)


def model_device(model: nn.Module) -> torch.device:
    """Device of ``model``'s first parameter (CPU for a model without parameters)."""
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def to_device(inputs: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    """A copy of ``inputs`` with every tensor moved to ``device`` (other values as they are)."""
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()}


def _accepts(model: nn.Module, name: str) -> bool:
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False
    return name in params


def _decode_position_ids(model: nn.Module, batch: int, position: int, device: torch.device) -> torch.Tensor | None:
    """Explicit M-RoPE positions for Qwen2-VL-style models during manual decode, else ``None``.

    Qwen2-VL derives decode positions from ``attention_mask.cumsum`` when a mask is passed, which yields one
    position per *mask* entry instead of one per new token, and the step fails on a shape mismatch;
    ``generate`` sidesteps this by passing ``position_ids``. We do the same: the text position plus the
    ``rope_deltas`` the model stored at prefill, on all 3 M-RoPE axes (checked against ``generate``).
    """
    deltas = getattr(inner_model(model), "rope_deltas", None)
    if not isinstance(deltas, torch.Tensor):
        return None
    deltas = deltas.to(device).reshape(-1, 1)
    if batch % deltas.shape[0]:
        return None
    deltas = deltas.repeat_interleave(batch // deltas.shape[0], dim=0)
    pos = torch.full((batch, 1), position, dtype=torch.long, device=device) + deltas
    return pos.unsqueeze(0).expand(3, batch, 1)


def sync(device: torch.device) -> None:
    """Wait for the queued CUDA work on ``device`` (no-op elsewhere), so a timer stops after the work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(fn: Any, *args: Any, repeats: int = 5, device: torch.device | str | None = None) -> float:
    """Median wall time of ``fn(*args)`` over ``repeats`` calls after one untimed warm-up; with a CUDA
    ``device`` each call is synchronised before the clock stops (the benchmarks' one timing loop)."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    dev = torch.device(device) if device is not None else None
    fn(*args)
    if dev is not None:
        sync(dev)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(*args)
        if dev is not None:
            sync(dev)
        times.append(time.perf_counter() - t0)
    return float(statistics.median(times))


@dataclass
class _Run:
    prefill_s: float
    step_s: list[float]
    cache_len: int
    cache_bytes: int
    tokens: torch.Tensor  # [B, 1 + decode_tokens]: the prefill's argmax, then one per decode step


def _run_once(
    model: nn.Module, inputs: dict[str, Any], decode_tokens: int, device: torch.device, extra: dict[str, Any]
) -> _Run:
    """One prefill + ``decode_tokens`` greedy single-token steps, each timed."""
    inner = inner_model(model)
    if inner is not None and hasattr(inner, "rope_deltas"):
        # Stale deltas from an earlier call would be reused for a text-only prompt; generate resets them too.
        inner.rope_deltas = None
    sync(device)
    t0 = time.perf_counter()
    out = model(**inputs, use_cache=True, **extra)
    next_tok = out.logits[:, -1].argmax(-1, keepdim=True)
    sync(device)
    prefill = time.perf_counter() - t0

    cache = output_cache(out)
    if cache is None:
        raise RuntimeError(f"the model returned no KV cache ({CACHE_KWARG}) with use_cache=True; cannot time decode")
    cache_len = int(cache.get_seq_length())
    cache_bytes = _cache_nbytes(cache)
    batch = int(next_tok.shape[0])

    steps: list[float] = []
    tokens = [next_tok]
    for step in range(decode_tokens):
        # Mask length follows the cache the model actually holds (a reducer may have shrunk the prompt);
        # all ones: left padding is irrelevant to timing.
        mask = torch.ones(batch, cache_len + step + 1, dtype=torch.long, device=device)
        kwargs: dict[str, Any] = {
            "input_ids": next_tok,
            "attention_mask": mask,
            CACHE_KWARG: cache,
            "use_cache": True,
        }
        pos = _decode_position_ids(model, batch, cache_len + step, device)
        if pos is not None:
            kwargs["position_ids"] = pos
        sync(device)
        t0 = time.perf_counter()
        out = model(**kwargs)
        next_tok = out.logits[:, -1].argmax(-1, keepdim=True)
        sync(device)
        steps.append(time.perf_counter() - t0)
        tokens.append(next_tok)
        cache = output_cache(out)
    return _Run(prefill, steps, cache_len, cache_bytes, torch.cat(tokens, dim=-1))


def measure_latency(
    model: nn.Module,
    inputs: Mapping[str, Any],
    *,
    decode_tokens: int = 16,
    warmup: int = 1,
    repeats: int = 5,
) -> LatencyReport:
    """Time prefill and per-token greedy decode of a HF causal VLM (no ``generate``).

    Args:
        model: e.g. ``LlavaForConditionalGeneration`` (possibly wrapped by mmeff hooks).
        inputs: processor output: ``input_ids`` ``[B, L]``, ``attention_mask`` ``[B, L]``, ``pixel_values``
            (LLaVA ``[N, 3, H, W]``; Qwen2-VL ``[patches, 3*T*P*P]`` with ``image_grid_thw`` ``[N, 3]`` and
            ``mm_token_type_ids`` ``[B, L]``). Tensors are moved to the model's device.
        decode_tokens: greedy tokens generated and timed after each prefill.
        warmup: untimed prefill+decode runs first.
        repeats: timed prefill+decode runs.

    Prefill is one forward over the whole prompt with ``use_cache=True`` (and ``logits_to_keep=1`` when the
    model accepts it, as ``generate`` does). Each decode step is one forward of the argmax token with the
    cache and an all-ones ``attention_mask`` of length ``cache_len + step + 1``, where ``cache_len`` is the
    cache length measured after prefill. CUDA is synchronised around every timer; everything runs under
    ``torch.inference_mode()`` with the model in eval mode (its previous mode is restored).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(inputs, Mapping):
        raise TypeError(f"inputs must be a mapping of forward kwargs, got {type(inputs).__name__}")
    if "input_ids" not in inputs:
        raise ValueError("inputs must contain 'input_ids'")
    decode_tokens = check_int("decode_tokens", decode_tokens)
    warmup = check_int("warmup", warmup)
    repeats = check_int("repeats", repeats, minimum=1)

    if cache_from_kwargs(inputs) is not None:
        raise ValueError(f"inputs must not carry a KV cache ({CACHE_KWARG}): every prefill starts from an empty cache")
    device = model_device(model)
    feed = to_device(without_cache_kwargs(inputs, "use_cache"), device)
    extra = {"logits_to_keep": 1} if _accepts(model, "logits_to_keep") and "logits_to_keep" not in feed else {}
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for _ in range(warmup):
                _run_once(model, feed, decode_tokens, device, extra)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            prefills: list[float] = []
            decodes: list[float] = []
            for _ in range(repeats):
                run = _run_once(model, feed, decode_tokens, device, extra)
                prefills.append(run.prefill_s)
                decodes.extend(run.step_s)
            peak = int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else None
    finally:
        model.train(was_training)

    return LatencyReport(
        prefill_s=statistics.median(prefills),
        prefill_min_s=min(prefills),
        prefill_max_s=max(prefills),
        decode_s_per_token=statistics.median(decodes) if decodes else None,
        decode_min_s=min(decodes) if decodes else None,
        decode_max_s=max(decodes) if decodes else None,
        batch=int(run.tokens.shape[0]),
        prompt_len=int(feed["input_ids"].shape[-1]),
        cache_len=run.cache_len,
        cache_bytes=run.cache_bytes,
        decode_tokens=decode_tokens,
        warmup=warmup,
        repeats=repeats,
        device=str(device),
        peak_memory_bytes=peak,
        prefill_samples=prefills,
        decode_samples=decodes,
        generated_ids=run.tokens.tolist(),
    )
