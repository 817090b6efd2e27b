"""Cost of a reduction method on a real model: visual tokens the LLM read, FLOPs, KV cache, memory, latency.

:func:`profile` runs one prefill + greedy decode configuration under :func:`~mmeff.eval.latency.measure_latency`
and counts what the inner model really saw (forward hooks), then prices it with the analytic model of
:mod:`mmeff.eval.flops`; :func:`compare` does so for several methods in turn.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import PretrainedConfig

from mmeff.api import apply
from mmeff.eval.flops import (
    FlopBreakdown,
    kv_cache_bytes,
    llm_flops,
    supported_model_type,
    text_dims,
    vision_and_projector_flops,
)
from mmeff.eval.latency import LatencyReport, measure_latency
from mmeff.hosts import inner_model, projector

__all__ = ["ProfileReport", "compare", "profile"]

@dataclass
class ProfileReport:
    """Cost of one prefill+decode configuration (totals over the batch unless stated).

    Attributes:
        method: label of the reduction method (``"baseline"`` without one).
        batch: sequences in the batch.
        prompt_len: ``input_ids`` length given to the model.
        seq_len: per-sequence length that reached the inner ``model.model`` forward at prefill.
        visual_tokens: image/video placeholder tokens reaching the LLM, summed over the batch.
        visual_tokens_per_sample: the same per sequence.
        text_tokens: the other positions the LLM processed (``batch * seq_len - visual_tokens``, padding
            included since it is computed).
        images: images + video clips given to the vision encoder.
        flops: analytic prefill FLOPs: vision/projector on the inputs' native images, LLM on ``seq_len``.
        kv_cache_bytes: analytic cache size at ``latency.cache_len`` in the model's dtype.
        peak_memory_bytes: see :class:`LatencyReport`.
        latency: measured timings.
    """

    method: str
    batch: int
    prompt_len: int
    seq_len: int
    visual_tokens: int
    visual_tokens_per_sample: list[int]
    text_tokens: int
    images: int
    flops: FlopBreakdown
    kv_cache_bytes: int
    peak_memory_bytes: int | None
    latency: LatencyReport

    def as_dict(self) -> dict[str, Any]:
        """Nested plain-dict view (JSON-serialisable); ``flops`` includes ``total``."""
        return dataclasses.asdict(self)


def _placeholder_ids(config: PretrainedConfig) -> list[int]:
    ids = []
    for name in ("image_token_id", "video_token_id"):
        value = getattr(config, name, None)
        if isinstance(value, int):
            ids.append(value)
    if not ids:
        raise TypeError(f"{type(config).__name__} declares no image_token_id; cannot count visual tokens")
    return ids


def _visual_segments(config: PretrainedConfig, inputs: Mapping[str, Any]) -> list[tuple[int, int]]:
    """(frames, patches_per_frame) for each image/video clip in the inputs given to the model."""
    if supported_model_type(config) == "llava":
        px = inputs.get("pixel_values")
        if not isinstance(px, torch.Tensor):
            return []
        if px.dim() != 4:
            raise ValueError(f"LLaVA pixel_values must be [N, C, H, W], got shape {tuple(px.shape)}")
        p = int(config.vision_config.patch_size)
        per_image = (int(px.shape[-2]) // p) * (int(px.shape[-1]) // p)
        return [(1, per_image)] * int(px.shape[0])
    segments: list[tuple[int, int]] = []
    for pixels, grid in (("pixel_values", "image_grid_thw"), ("pixel_values_videos", "video_grid_thw")):
        if inputs.get(pixels) is None:
            continue
        thw = inputs.get(grid)
        if not isinstance(thw, torch.Tensor):
            raise ValueError(f"Qwen2-VL inputs carry {pixels} but no {grid}")
        segments.extend((int(t), int(h) * int(w)) for t, h, w in thw.tolist())
    return segments


def _count_visual(module: nn.Module, args: tuple, kwargs: dict, ids: list[int]) -> tuple[list[int], int, int]:
    """Per-sample placeholder counts, batch and sequence length of one inner-model call."""
    input_ids = kwargs.get("input_ids", args[0] if args else None)
    if isinstance(input_ids, torch.Tensor):
        mask = torch.zeros_like(input_ids, dtype=torch.bool)
        for i in ids:
            mask |= input_ids == i
        return mask.sum(-1).tolist(), int(input_ids.shape[0]), int(input_ids.shape[-1])
    embeds = kwargs.get("inputs_embeds")
    if not isinstance(embeds, torch.Tensor):
        raise RuntimeError("the inner model was called with neither input_ids nor inputs_embeds")
    # Same test HF uses without input_ids: a position is a placeholder if it equals that token's embedding.
    table = module.get_input_embeddings()
    mask = torch.zeros(embeds.shape[:-1], dtype=torch.bool, device=embeds.device)
    for i in ids:
        ref = table(torch.tensor(i, device=embeds.device)).to(embeds.dtype)
        mask |= (embeds == ref).all(-1)
    return mask.sum(-1).tolist(), int(embeds.shape[0]), int(embeds.shape[1])


def _model_dtype(model: nn.Module) -> torch.dtype:
    # The cache lives in the language model's dtype, which may differ from a vision tower kept in fp32.
    inner = inner_model(model)
    lm = getattr(inner, "language_model", None) if inner is not None else None
    for p in (lm if isinstance(lm, nn.Module) else model).parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.get_default_dtype()


def _method_label(method: Any) -> str:
    if method is None:
        return "baseline"
    if isinstance(method, (list, tuple)):
        return "+".join(_method_label(m) for m in method)
    return getattr(method, "name", None) or type(method).__name__


def profile(
    model: nn.Module,
    inputs: Mapping[str, Any],
    method: Any = None,
    *,
    decode_tokens: int = 16,
    warmup: int = 1,
    repeats: int = 5,
    label: str | None = None,
    options: Mapping[str, Any] | None = None,
) -> ProfileReport:
    """Measure what a reduction ``method`` changes: visual tokens, FLOPs, KV cache, memory, latency.

    Args:
        model: ``LlavaForConditionalGeneration`` or ``Qwen2VLForConditionalGeneration``.
        inputs: processor output (see :func:`measure_latency`); ``input_ids`` ``[B, L]``.
        method: ``None`` for the unmodified model, else a reducer (or a list of reducers) run inside
            ``mmeff.apply(model, *reducers)`` for the duration.
        decode_tokens, warmup, repeats: forwarded to :func:`measure_latency`.
        label: name stored in the report (default ``"baseline"`` or the reducer's class name).
        options: adapter options for ``mmeff.apply`` (e.g. ``{"stage": "pre_projector"}``).

    Visual/text token counts come from a forward pre-hook on the inner ``model.model`` (removed
    afterwards), so they reflect whatever an outer hook passed on; projector FLOPs use the tokens a hook
    on the projector saw, so reductions before it (``stage="pre_projector"``) count. Vision-encoder FLOPs
    assume the encoder runs natively on the given images; methods that prune inside it are not reflected.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    config = getattr(model, "config", None)
    supported_model_type(config)
    inner = inner_model(model)
    if inner is None:
        raise TypeError(f"{type(model).__name__} has no inner `.model` module to observe")
    placeholder_ids = _placeholder_ids(config)
    observed: list[tuple[list[int], int, int]] = []
    projected: list[int] = []
    proj = projector(model)

    def _observe(module: nn.Module, args: tuple, kwargs: dict) -> None:
        if not observed:  # the first call is the (warmup or timed) prefill
            observed.append(_count_visual(module, args, kwargs, placeholder_ids))

    first_done: list[bool] = []

    def _close(module: nn.Module, args: tuple, output: Any) -> None:
        if not first_done:
            first_done.append(True)

    def _observe_projector(module: nn.Module, args: tuple, output: Any) -> None:
        # tokens the projector really ran on, so methods that reduce before it are counted; the window
        # closes when the first inner forward (the first prefill) returns
        if not first_done and isinstance(output, torch.Tensor):
            projected.append(output.numel() // output.shape[-1])

    def _measure() -> LatencyReport:
        handles = [inner.register_forward_pre_hook(_observe, with_kwargs=True), inner.register_forward_hook(_close)]
        if proj is not None:
            handles.append(proj.register_forward_hook(_observe_projector))
        try:
            return measure_latency(model, inputs, decode_tokens=decode_tokens, warmup=warmup, repeats=repeats)
        finally:
            for h in handles:
                h.remove()

    if method is None:
        latency = _measure()
    else:
        reducers = tuple(method) if isinstance(method, (list, tuple)) else (method,)
        with apply(model, *reducers, **dict(options or {})):
            latency = _measure()

    if not observed:
        raise RuntimeError("the inner model.model forward never ran; cannot count visual tokens")
    per_sample, batch, seq_len = observed[0]
    visual = int(sum(per_sample))

    segments = _visual_segments(config, inputs)
    if segments:
        vision, projector_flops = vision_and_projector_flops(config, segments, sum(projected) if projected else None)
    else:
        vision = projector_flops = 0
    linear, attn, lm_head = llm_flops(
        text_dims(config), q_len=seq_len, k_len=seq_len, batch=batch, logits_positions=1, attention="full"
    )
    flops = FlopBreakdown(
        vision=vision, projector=projector_flops, llm=linear + attn + lm_head, llm_attention=attn, lm_head=lm_head
    )
    return ProfileReport(
        method=label if label is not None else _method_label(method),
        batch=batch,
        prompt_len=latency.prompt_len,
        seq_len=seq_len,
        visual_tokens=visual,
        visual_tokens_per_sample=[int(n) for n in per_sample],
        text_tokens=batch * seq_len - visual,
        images=len(segments),
        flops=flops,
        kv_cache_bytes=kv_cache_bytes(config, latency.cache_len, batch, _model_dtype(model)),
        peak_memory_bytes=latency.peak_memory_bytes,
        latency=latency,
    )


def compare(
    model: nn.Module,
    inputs: Mapping[str, Any],
    methods: Mapping[str, Any],
    *,
    decode_tokens: int = 16,
    warmup: int = 1,
    repeats: int = 5,
    progress: bool = True,
) -> list[ProfileReport]:
    """:func:`profile` each ``{label: reducer or None}`` entry in order, with a tqdm progress bar."""
    if not isinstance(methods, Mapping):
        raise TypeError(f"methods must be a mapping of label -> reducer (or None), got {type(methods).__name__}")
    reports = []
    for name, method in tqdm(methods.items(), desc="profile", disable=not progress, total=len(methods)):
        reports.append(
            profile(
                model,
                inputs,
                method,
                decode_tokens=decode_tokens,
                warmup=warmup,
                repeats=repeats,
                label=str(name),
            )
        )
    return reports
