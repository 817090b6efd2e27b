"""Analytic cost accounting for vision-language models, from a *config* alone: parameters, FLOPs, KV-cache bytes.

Everything analytic here is derived from a model *config* alone, so the numbers for a 7B model come out
on a laptop with no weights: the real ``llava-hf/llava-1.5-7b-hf`` and ``Qwen/Qwen2-VL-7B-Instruct``
architecture configs ship in ``mmeff/configs/`` and :func:`meta_model` builds the real transformers
model on the ``meta`` device (shapes only, no memory). The 7B-class configs of the other hosts ship there
too (with their provenance) for the language-model accounting of :mod:`mmeff.eval.host_costs`.

FLOPs convention (checked against ``torch.utils.flop_counter.FlopCounterMode`` in the tests):

* 1 multiply-add = 2 FLOPs. Only matrix products are counted (linear layers, convolutions, the two
  attention products QK^T and AV), which is exactly what ``FlopCounterMode`` counts. Norms, activations,
  softmax, rotary embeddings, residual adds and bias adds are ignored (they are O(tokens x hidden), a
  fraction of a percent at 7B scale).
* Attention is counted over the **full square** (``attention="full"``, the default): a prefill of S tokens
  costs ``4 * S * S * heads * head_dim`` per layer for QK^T and AV. This is what ``FlopCounterMode``
  reports for SDPA (its formula ignores ``is_causal``) and what a dense SDPA/eager kernel actually
  computes; flash kernels skip the masked half, for which ``attention="causal"`` counts ``S(S+1)/2``
  query-key pairs instead.
* GQA: q/o projections use ``heads * head_dim``, k/v projections ``kv_heads * head_dim``; attention
  products always run over the query heads.
* ``lm_head``: ``logits="last"`` (default, what ``generate`` does via ``logits_to_keep=1``) counts one
  position per sequence; ``logits="all"`` counts every prompt position (a plain HF forward).
* LLaVA's CLIP tower runs **all** its layers even though LLaVA reads layer -2 (HF, like the original
  LLaVA code, runs the whole encoder and picks the hidden state), so all layers are counted, CLS included.
* Qwen2-VL: the ViT attends within each frame of each image (block-diagonal, ``cu_seqlens``); the
  2x2 patch merger (LayerNorm + 2-layer MLP into the LLM width) is reported as the ``projector``.
"""

from __future__ import annotations

import json
import operator
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn
from transformers import LlavaForConditionalGeneration, PretrainedConfig, Qwen2VLForConditionalGeneration
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

__all__ = [
    "AttentionMode",
    "FlopBreakdown",
    "LogitsMode",
    "TextDims",
    "available_configs",
    "check_int",
    "clip_vision_flops",
    "count_parameters",
    "decode_flops",
    "kv_cache_bytes",
    "llm_flops",
    "llm_prefill_reduction",
    "load_config",
    "meta_model",
    "prefill_flops",
    "supported_model_type",
    "text_dims",
    "vision_and_projector_flops",
    "vistog_flops",
]

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"

# Hub ids map onto the bundled copies so callers can use the familiar names without any download.
_ALIASES = {
    "llava-hf/llava-1.5-7b-hf": "llava-1.5-7b",
    "Qwen/Qwen2-VL-7B-Instruct": "qwen2-vl-7b",
}

_SUPPORTED_MODEL_TYPES = ("llava", "qwen2_vl")
# Decoder families whose layers are q/k/v/o attention + gated (gate/up/down) MLP.
_GATED_TEXT_TYPES = ("llama", "mistral", "qwen2", "qwen2_vl_text", "qwen2_5_vl_text", "qwen3", "qwen3_vl_text", "gemma3_text")

LogitsMode = Literal["all", "last"]
AttentionMode = Literal["full", "causal"]


# --------------------------------------------------------------------------------------------------
# Configs and meta models
# --------------------------------------------------------------------------------------------------


def available_configs() -> list[str]:
    """Names of the architecture configs bundled in ``mmeff/configs`` (usable with :func:`load_config`)."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.json"))


def load_config(name_or_path: str | os.PathLike[str]) -> PretrainedConfig:
    """Load a model config without touching the network.

    Args:
        name_or_path: a bundled name (``"llava-1.5-7b"``, ``"qwen2-vl-7b"``, see :func:`available_configs`),
            the matching hub id (``"llava-hf/llava-1.5-7b-hf"``), a local folder holding ``config.json``,
            or a path to a config JSON file.

    Returns:
        The transformers config object (e.g. ``LlavaConfig``), built from the JSON's ``model_type``.
    """
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise TypeError(f"load_config expects a name or a path, got {type(name_or_path).__name__}")
    name = os.fspath(name_or_path)
    name = _ALIASES.get(name, name)
    bundled = CONFIG_DIR / f"{name}.json"
    if bundled.is_file():
        path = bundled
    else:
        path = Path(name)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise ValueError(
                f"no config found for {name!r}: not a bundled name ({', '.join(available_configs())}) "
                "and not an existing folder or JSON file (configs are never downloaded)"
            )
    with open(path, encoding="utf-8") as fh:
        data = json.load(fh)
    model_type = data.get("model_type")
    if not model_type:
        raise ValueError(f"{path} has no 'model_type' field, so the config class is unknown")
    if model_type not in CONFIG_MAPPING:
        raise ValueError(f"{path}: model_type {model_type!r} is unknown to transformers")
    return CONFIG_MAPPING[model_type].from_dict(data)


def _model_class(config: PretrainedConfig) -> type[nn.Module]:
    model_type = supported_model_type(config)
    if model_type == "llava":
        return LlavaForConditionalGeneration
    return Qwen2VLForConditionalGeneration


def meta_model(config: PretrainedConfig | str | os.PathLike[str]) -> nn.Module:
    """Build the real transformers model for ``config`` on the ``meta`` device (no memory, no weights).

    Args:
        config: a ``LlavaConfig`` / ``Qwen2VLConfig``, or anything :func:`load_config` accepts.

    Returns:
        ``LlavaForConditionalGeneration`` or ``Qwen2VLForConditionalGeneration`` whose parameters are meta
        tensors: shapes and counts are exact, and a forward on meta inputs runs shape-only (useful under
        ``FlopCounterMode``).
    """
    if not isinstance(config, PretrainedConfig):
        config = load_config(config)
    cls = _model_class(config)
    with torch.device("meta"):
        return cls(config)


def count_parameters(module: nn.Module) -> int:
    """Number of parameter elements in ``module`` (tied weights counted once)."""
    if not isinstance(module, nn.Module):
        raise TypeError(f"count_parameters expects an nn.Module, got {type(module).__name__}")
    return sum(p.numel() for p in module.parameters())


# --------------------------------------------------------------------------------------------------
# Config access and validation
# --------------------------------------------------------------------------------------------------


def supported_model_type(config: Any) -> str:
    """``config.model_type`` (``"llava"`` or ``"qwen2_vl"``); ``TypeError`` for any other config."""
    if not isinstance(config, PretrainedConfig):
        raise TypeError(f"expected a transformers PretrainedConfig, got {type(config).__name__}")
    model_type = getattr(config, "model_type", None)
    if model_type not in _SUPPORTED_MODEL_TYPES:
        raise TypeError(
            f"unsupported config class {type(config).__name__} (model_type={model_type!r}); "
            f"supported model types: {', '.join(_SUPPORTED_MODEL_TYPES)}"
        )
    return model_type


def _text_config(config: PretrainedConfig) -> PretrainedConfig:
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    if getattr(text, "model_type", None) not in _GATED_TEXT_TYPES:
        raise TypeError(
            f"unsupported language model {getattr(text, 'model_type', None)!r}; the FLOP model covers "
            f"gated-MLP decoders: {', '.join(_GATED_TEXT_TYPES)}"
        )
    return text


@dataclass(frozen=True)
class TextDims:
    """Sizes of a decoder-only language model that its FLOPs and KV cache depend on."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int


def text_dims(config: PretrainedConfig) -> TextDims:
    """:class:`TextDims` of a VLM config's language model (GQA heads and ``head_dim`` resolved)."""
    text = _text_config(config)
    heads = int(text.num_attention_heads)
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    return TextDims(
        hidden=int(text.hidden_size),
        layers=int(text.num_hidden_layers),
        heads=heads,
        kv_heads=int(kv_heads),
        head_dim=int(head_dim),
        intermediate=int(text.intermediate_size),
        vocab=int(text.vocab_size),
    )


def check_int(name: str, value: Any, minimum: int = 0) -> int:
    """``value`` as a Python int >= ``minimum``; ``TypeError`` for floats and bools, ``ValueError`` if too small."""
    # bool is an int subclass; True as a token count is almost certainly a bug.
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got bool")
    try:
        value = operator.index(value)  # accepts numpy / 0-d integer tensors, rejects floats
    except TypeError:
        raise TypeError(f"{name} must be an int, got {type(value).__name__}") from None
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return value


# --------------------------------------------------------------------------------------------------
# Analytic FLOPs
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FlopBreakdown:
    """Prefill FLOPs (1 multiply-add = 2 FLOPs, matmuls only) for a whole batch.

    Attributes:
        vision: vision encoder (patch embedding + transformer blocks).
        projector: vision-to-LLM adapter (LLaVA 2-layer MLP, Qwen2-VL 2x2 patch merger).
        llm: language model prefill, *including* ``llm_attention`` and ``lm_head``.
        llm_attention: the QK^T and AV products inside ``llm``.
        lm_head: the output projection inside ``llm``.
        total: ``vision + projector + llm``.
    """

    vision: int
    projector: int
    llm: int
    llm_attention: int = 0
    lm_head: int = 0
    total: int = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "total", self.vision + self.projector + self.llm)

    @property
    def llm_linear(self) -> int:
        """Decoder-layer projection FLOPs (q/k/v/o + MLP), i.e. ``llm - llm_attention - lm_head``."""
        return self.llm - self.llm_attention - self.lm_head

    def __add__(self, other: FlopBreakdown) -> FlopBreakdown:
        if not isinstance(other, FlopBreakdown):
            return NotImplemented
        return FlopBreakdown(
            vision=self.vision + other.vision,
            projector=self.projector + other.projector,
            llm=self.llm + other.llm,
            llm_attention=self.llm_attention + other.llm_attention,
            lm_head=self.lm_head + other.lm_head,
        )


def _attention_pairs(q_len: int, k_len: int, attention: str) -> int:
    """Query-key pairs scored; causal prefill (q_len == k_len) keeps the lower triangle."""
    if attention == "causal" and q_len == k_len:
        return q_len * (q_len + 1) // 2
    return q_len * k_len


def llm_flops(
    dims: TextDims, *, q_len: int, k_len: int, batch: int, logits_positions: int, attention: str
) -> tuple[int, int, int]:
    """(linear, attention, lm_head) FLOPs for ``q_len`` new tokens attending to ``k_len`` keys.

    ``logits_positions`` positions per sequence go through ``lm_head``; ``attention`` is ``"full"`` or
    ``"causal"`` (the lower triangle, only when ``q_len == k_len``)."""
    q_width = dims.heads * dims.head_dim
    kv_width = dims.kv_heads * dims.head_dim
    per_token = (
        dims.hidden * q_width  # q_proj
        + 2 * dims.hidden * kv_width  # k_proj, v_proj
        + q_width * dims.hidden  # o_proj
        + 3 * dims.hidden * dims.intermediate  # gate, up, down
    )
    linear = 2 * batch * dims.layers * q_len * per_token
    # QK^T and AV each cost 2 * pairs * head_dim per query head.
    attn = 4 * batch * dims.layers * dims.heads * dims.head_dim * _attention_pairs(q_len, k_len, attention)
    lm_head = 2 * batch * logits_positions * dims.hidden * dims.vocab
    return linear, attn, lm_head


def clip_vision_flops(config: PretrainedConfig, patches: Sequence[int]) -> int:
    """CLIP tower over images with ``patches[i]`` patches each (+1 CLS token), all layers."""
    vc = config.vision_config
    if getattr(vc, "model_type", None) != "clip_vision_model":
        raise TypeError(
            f"unsupported LLaVA vision tower {getattr(vc, 'model_type', None)!r}; only clip_vision_model is modelled"
        )
    d, inter, p, c = int(vc.hidden_size), int(vc.intermediate_size), int(vc.patch_size), int(vc.num_channels)
    total = 0
    for n_patch in patches:
        n = n_patch + 1  # CLS token goes through every layer too
        conv = 2 * n_patch * c * p * p * d
        linear = 2 * n * (4 * d * d + 2 * d * inter)
        attn = 4 * d * _attention_pairs(n, n, "full")  # bidirectional: always the full square
        total += conv + int(vc.num_hidden_layers) * (linear + attn)
    return total


def _llava_projector_flops(config: PretrainedConfig, tokens: int) -> int:
    layers = config.vision_feature_layer
    n_feature_layers = 1 if isinstance(layers, int) else len(layers)
    d_in = int(config.vision_config.hidden_size) * n_feature_layers
    d_out = int(config.text_config.hidden_size)
    return 2 * tokens * (d_in * d_out + d_out * d_out)


def _llava_native_projector_tokens(config: PretrainedConfig, patches: Sequence[int]) -> int:
    # "default" drops CLS before the projector, "full" keeps it.
    extra = 0 if config.vision_feature_select_strategy == "default" else 1
    return sum(n + extra for n in patches)


def _qwen_vision_flops(config: PretrainedConfig, segments: Sequence[tuple[int, int]]) -> int:
    """Qwen2-VL ViT over ``(frames, patches_per_frame)`` segments; each frame attends within itself."""
    vc = config.vision_config
    e = int(vc.embed_dim)
    mlp = int(e * vc.mlp_ratio)
    tp = int(vc.temporal_patch_size)
    p = int(vc.patch_size)
    c = int(vc.in_channels)
    total = 0
    for frames, per_frame in segments:
        n = frames * per_frame
        conv = 2 * n * c * tp * p * p * e
        linear = 2 * n * (3 * e * e + e * e + 2 * e * mlp)  # qkv, proj, fc1, fc2
        attn = 4 * e * frames * per_frame * per_frame
        total += conv + int(vc.depth) * (linear + attn)
    return total


def _qwen_projector_flops(config: PretrainedConfig, tokens: int) -> int:
    vc = config.vision_config
    merged_width = int(vc.embed_dim) * int(vc.spatial_merge_size) ** 2
    return 2 * tokens * (merged_width * merged_width + merged_width * int(vc.hidden_size))


def vision_and_projector_flops(
    config: PretrainedConfig,
    segments: Sequence[tuple[int, int]],
    projector_tokens: int | None,
) -> tuple[int, int]:
    """(vision, projector) FLOPs for images given as (frames, patches_per_frame) segments.

    ``projector_tokens`` is how many tokens the projector ran on (``None``: the encoder's native output).
    """
    if supported_model_type(config) == "llava":
        patches = [f * n for f, n in segments]
        vision = clip_vision_flops(config, patches)
        if projector_tokens is None:
            projector_tokens = _llava_native_projector_tokens(config, patches)
        return vision, _llava_projector_flops(config, projector_tokens)
    vision = _qwen_vision_flops(config, segments)
    if projector_tokens is None:
        merge = int(config.vision_config.spatial_merge_size) ** 2
        projector_tokens = sum(f * n for f, n in segments) // merge
    return vision, _qwen_projector_flops(config, projector_tokens)


def _default_patches_per_image(config: PretrainedConfig, visual_tokens: int, images: int) -> int:
    if supported_model_type(config) == "llava":
        vc = config.vision_config
        return (int(vc.image_size) // int(vc.patch_size)) ** 2
    # Qwen2-VL has no fixed resolution: assume the visual tokens are the unreduced merger output.
    merge = int(config.vision_config.spatial_merge_size) ** 2
    if visual_tokens == 0:
        raise ValueError("Qwen2-VL with visual_tokens=0 but images > 0: pass image_patches explicitly")
    if visual_tokens % images:
        raise ValueError(
            f"visual_tokens={visual_tokens} is not divisible by images={images}; pass image_patches explicitly"
        )
    return visual_tokens // images * merge


def prefill_flops(
    config: PretrainedConfig,
    *,
    text_tokens: int,
    visual_tokens: int,
    images: int = 1,
    image_patches: int | Sequence[int] | None = None,
    projector_tokens: int | None = None,
    batch: int = 1,
    logits: LogitsMode = "last",
    attention: AttentionMode = "full",
) -> FlopBreakdown:
    """Analytic prefill FLOPs of a LLaVA or Qwen2-VL model (conventions in the module docstring).

    Every count is *per sequence*; the result covers ``batch`` identical sequences.

    Args:
        config: ``LlavaConfig`` or ``Qwen2VLConfig``.
        text_tokens: non-visual tokens in one prompt (the LLM sequence is ``text_tokens + visual_tokens``).
        visual_tokens: visual tokens reaching the LLM for one prompt (after any reduction).
        images: images per prompt fed to the vision encoder.
        image_patches: patches per image seen by the encoder (an int for all images, or one per image).
            LLaVA: excludes CLS, default ``(image_size / patch_size)**2`` = 576 for 336px/14.
            Qwen2-VL: pre-merge patches of one frame, default ``visual_tokens / images * merge**2``, which
            assumes the visual tokens were *not* reduced -- pass it explicitly when they were.
        projector_tokens: tokens the projector runs on for one prompt; default the encoder's native output
            (LLaVA: patches, +CLS with the "full" strategy; Qwen2-VL: patches / merge**2), since reducers
            usually act on the projector's output.
        batch: number of sequences.
        logits: ``"last"`` (one lm_head position per sequence, as ``generate``) or ``"all"``.
        attention: ``"full"`` (square, what FlopCounterMode reports) or ``"causal"`` (lower triangle).

    Returns:
        :class:`FlopBreakdown` with integer FLOP counts for the batch.
    """
    supported_model_type(config)
    text_tokens = check_int("text_tokens", text_tokens)
    visual_tokens = check_int("visual_tokens", visual_tokens)
    images = check_int("images", images)
    batch = check_int("batch", batch, minimum=1)
    _check_choice("logits", logits, ("all", "last"))
    _check_choice("attention", attention, ("full", "causal"))
    if projector_tokens is not None:
        projector_tokens = check_int("projector_tokens", projector_tokens)
    seq = text_tokens + visual_tokens
    if seq == 0:
        raise ValueError("text_tokens + visual_tokens must be >= 1: the LLM needs at least one token")
    if visual_tokens and not images:
        raise ValueError(f"visual_tokens={visual_tokens} but images=0: visual tokens need an image")

    if images:
        if image_patches is None:
            patches = [_default_patches_per_image(config, visual_tokens, images)] * images
        elif isinstance(image_patches, Sequence) and not isinstance(image_patches, str):
            patches = [check_int("image_patches[i]", n, minimum=1) for n in image_patches]
            if len(patches) != images:
                raise ValueError(f"image_patches has {len(patches)} entries but images={images}")
        else:
            patches = [check_int("image_patches", image_patches, minimum=1)] * images
        vision, projector = vision_and_projector_flops(config, [(1, n) for n in patches], projector_tokens)
    else:
        vision = projector = 0

    dims = text_dims(config)
    linear, attn, lm_head = llm_flops(
        dims,
        q_len=seq,
        k_len=seq,
        batch=batch,
        logits_positions=seq if logits == "all" else 1,
        attention=attention,
    )
    return FlopBreakdown(
        vision=vision * batch,
        projector=projector * batch,
        llm=linear + attn + lm_head,
        llm_attention=attn,
        lm_head=lm_head,
    )


def decode_flops(config: PretrainedConfig, context_len: int, batch: int = 1) -> int:
    """LLM FLOPs to generate one token per sequence with a KV cache of ``context_len`` tokens.

    The new token is projected (q/k/v/o, MLP), attends to ``context_len + 1`` keys (cache + itself) and
    goes through ``lm_head``; multiplied by ``batch``. No vision work happens during decode.
    """
    supported_model_type(config)
    context_len = check_int("context_len", context_len)
    batch = check_int("batch", batch, minimum=1)
    linear, attn, lm_head = llm_flops(
        text_dims(config), q_len=1, k_len=context_len + 1, batch=batch, logits_positions=1, attention="full"
    )
    return linear + attn + lm_head


def llm_prefill_reduction(
    config: PretrainedConfig,
    *,
    text_tokens: int,
    visual_tokens: int,
    reduced_visual_tokens: int,
    logits: LogitsMode = "last",
    attention: AttentionMode = "full",
) -> float:
    """Fraction of LLM prefill FLOPs saved when ``visual_tokens`` drop to ``reduced_visual_tokens``.

    Returns ``1 - llm(reduced) / llm(full)`` for one sequence (vision encoder and projector excluded:
    they run unchanged when tokens are dropped after the projector).

    Reference values from this module (full-square attention, last-position lm_head, 64-token prompt):

    * LLaVA-1.5-7B, 576 -> 64 visual tokens: LLM prefill 8.504 -> 1.667 TFLOPs, **80.4% fewer**
      (whole prefill incl. CLIP-L/336 0.382 + projector 0.024 TFLOPs: 8.910 -> 2.073, 76.7% fewer);
      576 -> 32: 85.3% fewer LLM prefill FLOPs; 576 -> 16: 87.8%. Counting causal attention instead of
      the full square changes 80.4% to 80.2%.
    * Qwen2-VL-7B, 576 -> 64 visual tokens (one 672x672 image, 2304 patches): LLM prefill
      8.518 -> 1.678 TFLOPs, 80.3% fewer; with its 3.78-TFLOP ViT included, 12.345 -> 5.505 (55.4%).

    For comparison only: the Fourier-VLM paper (arXiv 2508.06038) reports "up to 83.8%" fewer inference
    FLOPs vs LLaVA-v1.5; its exact counting convention (prompt length, what is included) is not
    reproduced here, so that figure is not asserted anywhere.
    """
    visual_tokens = check_int("visual_tokens", visual_tokens)
    reduced_visual_tokens = check_int("reduced_visual_tokens", reduced_visual_tokens)
    if reduced_visual_tokens > visual_tokens:
        raise ValueError(
            f"reduced_visual_tokens={reduced_visual_tokens} exceeds visual_tokens={visual_tokens}"
        )
    kw: dict[str, Any] = {"text_tokens": text_tokens, "logits": logits, "attention": attention}
    full = prefill_flops(config, visual_tokens=visual_tokens, **kw).llm
    reduced = prefill_flops(config, visual_tokens=reduced_visual_tokens, **kw).llm
    return 1.0 - reduced / full


# --------------------------------------------------------------------------------------------------
# KV cache
# --------------------------------------------------------------------------------------------------


def kv_cache_bytes(
    config: PretrainedConfig, seq_len: int, batch: int = 1, dtype: torch.dtype = torch.float16
) -> int:
    """Bytes held by a KV cache of ``seq_len`` tokens per sequence.

    ``2 (K and V) * layers * kv_heads * head_dim * seq_len * batch * element_size`` -- the size of the
    ``[batch, kv_heads, seq_len, head_dim]`` key and value tensors of a transformers ``DynamicCache``.
    Layers declared ``"sliding_attention"`` (Qwen2-VL with ``use_sliding_window``) keep only the last
    ``sliding_window - 1`` tokens, as ``DynamicSlidingWindowLayer`` does.
    """
    if not isinstance(config, PretrainedConfig):
        raise TypeError(f"expected a transformers PretrainedConfig, got {type(config).__name__}")
    seq_len = check_int("seq_len", seq_len)
    batch = check_int("batch", batch, minimum=1)
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be a torch.dtype, got {type(dtype).__name__}")
    dims = text_dims(config)
    text = _text_config(config)
    layer_types = list(getattr(text, "layer_types", None) or ["full_attention"] * dims.layers)
    window = getattr(text, "sliding_window", None)
    tokens = 0
    for kind in layer_types:
        if kind == "full_attention":
            tokens += seq_len
        elif kind == "sliding_attention" and window:
            tokens += min(seq_len, int(window) - 1)
        else:
            raise ValueError(f"layer type {kind!r} is not modelled by kv_cache_bytes")
    element = torch.empty((), dtype=dtype).element_size()
    return 2 * dims.kv_heads * dims.head_dim * tokens * batch * element


def vistog_flops(config: Any, num_groups: int, images: int = 1) -> dict[str, int]:
    """What VisToG adds to a LLaVA config's vision side, in FLOPs (2 per multiply-add, matmuls only, as
    the rest of this module): ``tower_extra`` (M more tokens through every CLIP layer, attention over
    N + 1 + M tokens) and ``grouping`` (q/k/v/proj, the M x N assignment and pooling, the MLP)."""
    if getattr(config, "model_type", None) != "llava":
        raise TypeError(f"vistog_flops models LLaVA configs (CLIP towers), got {getattr(config, 'model_type', None)!r}")
    vc = config.vision_config
    n = (int(vc.image_size) // int(vc.patch_size)) ** 2
    d = int(vc.hidden_size)
    base = clip_vision_flops(config, [n] * images)
    # M extra tokens: the formula counts n + 1 rows (CLS), so pass n + M patches and remove the conv part
    c, p = int(vc.num_channels), int(vc.patch_size)
    grown = clip_vision_flops(config, [n + num_groups] * images) - images * 2 * num_groups * c * p * p * d
    m = num_groups
    grouping = images * 2 * (m * d * d + 2 * n * d * d + m * d * d + m * n * d + m * n * d + 2 * m * d * 4 * d)
    return {"tower_extra": grown - base, "grouping": grouping}
