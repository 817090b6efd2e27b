"""Tiny random Hugging Face models for tests and benches, and valid random inputs for any LLaVA / Qwen2-VL.

Everything goes through the real Hugging Face classes and the real ``save_pretrained`` /
``from_pretrained`` path, so token-reduction code is exercised against the same modules users load.
Nothing is downloaded: the weights are random, seeded.
"""

from __future__ import annotations

import copy
import numbers
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlamaForCausalLM,
    LlavaConfig,
    LlavaForConditionalGeneration,
    PreTrainedModel,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLImageProcessor,
    Qwen2VLProcessor,
    Qwen2VLVideoProcessor,
)

from mmeff.adapters.qwen2_vl import qwen2_vl_patchify
from mmeff.hfconfig import pad_token_id, text_config
from mmeff.models.hf import left_pad_batch, llava_tokens_per_image

__all__ = [
    "build_tiny",
    "pack_right",
    "saved_and_reloaded",
    "llava_inputs",
    "qwen2_vl_inputs",
    "tiny_llava_config",
    "tiny_lm_config",
    "tiny_qwen2_vl_config",
]

# Special ids of the tiny models, kept low and contiguous: every id above them is ordinary text.
_TINY_VOCAB = 128
_TINY_PAD, _TINY_BOS, _TINY_EOS = 0, 1, 2
_TINY_LLAVA_IMAGE = 3
_TINY_QWEN_VISION_START, _TINY_QWEN_VISION_END, _TINY_QWEN_IMAGE, _TINY_QWEN_VIDEO = 3, 4, 5, 6



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


def tiny_qwen2_5_vl_config(**overrides: Any) -> Qwen2_5_VLConfig:
    """Tiny random Qwen2.5-VL config: :func:`tiny_qwen2_vl_config`'s text model and special ids, and a
    windowed tower (depth 2, window 56 px, block 1 full attention; patch 14, merge 2, temporal patch 2) over a
    window-ordered patch sequence. ``text_config`` / ``vision_config`` overrides are merged as there."""
    base = tiny_qwen2_vl_config()
    vision = {"depth": 2, "hidden_size": 32, "intermediate_size": 37, "num_heads": 4, "out_hidden_size": 32,
              "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2, "window_size": 56,
              "fullatt_block_indexes": [1]}
    overrides = dict(overrides)
    text = _merge(base.text_config.to_dict(), _as_dict(overrides.pop("text_config", None)))
    vision = _merge(vision, _as_dict(overrides.pop("vision_config", None)))
    kwargs = {k: getattr(base, k) for k in ("image_token_id", "video_token_id", "vision_start_token_id",
                                            "vision_end_token_id")}
    kwargs.update(overrides)
    return Qwen2_5_VLConfig(text_config=text, vision_config=vision, **kwargs)


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
    kind: Literal["llava", "qwen2_vl", "qwen2_5_vl", "llama", "qwen2"],
    folder: str | Path,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    **config_overrides: Any,
) -> PreTrainedModel:
    """Instantiate a tiny random model with ``torch.manual_seed(seed)``, save it to ``folder`` and reload it.

    ``kind``: ``"llava"`` / ``"qwen2_vl"`` / ``"qwen2_5_vl"`` (VLMs) or ``"llama"`` / ``"qwen2"`` (causal LMs). Returning the
    reloaded model (eval mode) means callers test the same ``from_pretrained`` path users hit.
    ``config_overrides`` go to the matching ``tiny_*_config``.
    """
    if kind == "llava":
        cls, config = LlavaForConditionalGeneration, tiny_llava_config(**config_overrides)
    elif kind == "qwen2_vl":
        cls, config = Qwen2VLForConditionalGeneration, tiny_qwen2_vl_config(**config_overrides)
    elif kind == "qwen2_5_vl":
        cls, config = Qwen2_5_VLForConditionalGeneration, tiny_qwen2_5_vl_config(**config_overrides)
    elif kind in ("llama", "qwen2"):
        cls, config = (LlamaForCausalLM if kind == "llama" else Qwen2ForCausalLM), tiny_lm_config(kind, **config_overrides)
    else:
        raise ValueError(f"unknown tiny model kind {kind!r}; expected 'llava', 'qwen2_vl', 'qwen2_5_vl', 'llama' or 'qwen2'")
    folder = Path(folder)
    torch.manual_seed(seed)
    model = cls(config).to(dtype)
    model.save_pretrained(folder, safe_serialization=True)
    del model
    return cls.from_pretrained(folder, dtype=dtype).eval()


#: a Qwen-style chat template over multimodal content lists (image and video items), for tiny processors
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{% elif item['type'] == 'video' %}{{ '<|vision_start|><|video_pad|><|vision_end|>' }}"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}{% endif %}"
    "{{ '<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def tiny_qwen2_vl_folder(folder: str | Path, tokenizer: Any) -> Path:
    """A random tiny Qwen2-VL saved with a real ``Qwen2VLProcessor`` (a copy of ``tokenizer`` plus Qwen's
    vision tokens, :data:`QWEN_CHAT_TEMPLATE`, 56-112 px pixel budgets), as a user's checkpoint folder looks."""
    folder = Path(folder)
    tok = copy.deepcopy(tokenizer)
    names = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
    tok.add_special_tokens({"additional_special_tokens": names})
    ids = dict(zip(names, tok.convert_tokens_to_ids(names)))
    pixels = {"min_pixels": 56 * 56, "max_pixels": 112 * 112}
    processor = Qwen2VLProcessor(image_processor=Qwen2VLImageProcessor(**pixels), tokenizer=tok,
                                 video_processor=Qwen2VLVideoProcessor(**pixels), chat_template=QWEN_CHAT_TEMPLATE)
    text = {"vocab_size": len(tok), "pad_token_id": tok.pad_token_id, "eos_token_id": tok.eos_token_id,
            "bos_token_id": tok.bos_token_id}
    build_tiny("qwen2_vl", folder, text_config=text, vision_start_token_id=ids["<|vision_start|>"],
               vision_end_token_id=ids["<|vision_end|>"], image_token_id=ids["<|image_pad|>"],
               video_token_id=ids["<|video_pad|>"])
    processor.save_pretrained(folder)
    return folder


def saved_and_reloaded(model: nn.Module, folder: str | Path, language_model: nn.Module, scale: float = 4.0) -> nn.Module:
    """Scale ``language_model``'s weights by ``scale`` (at the default init a wrong position or mask moves the
    logits by ~1e-5 only), then ``save_pretrained`` / ``from_pretrained`` and return the reloaded model (eval)."""
    with torch.no_grad():
        for p in language_model.parameters():
            p.mul_(scale)
    model.save_pretrained(folder)
    return type(model).from_pretrained(folder).eval()


def pack_right(keep: Tensor, *per_token: Tensor) -> tuple[Tensor, ...]:
    """Each row's kept tokens moved to the right end, zeros on the left (how the adapters left-pad a reduced
    prompt): ``keep`` ``(B, L)`` bool, ``per_token`` tensors ``(B, L, ...)`` → ``(mask, *packed)``, each
    ``(B, W, ...)`` with ``W`` the longest row's kept count and ``mask`` ``(B, W)`` long."""
    width = int(keep.sum(1).max())
    b = keep.shape[0]
    mask = torch.zeros(b, width, dtype=torch.long)
    packed = [t.new_zeros(b, width, *t.shape[2:]) for t in per_token]
    for row in range(b):
        n = int(keep[row].sum())
        mask[row, width - n:] = 1
        for out, t in zip(packed, per_token):
            out[row, width - n:] = t[row, keep[row]]
    return (mask, *packed)


# --------------------------------------------------------------------------------------------------
# Synthetic inputs for the tiny (or any) LLaVA / Qwen2-VL config
# --------------------------------------------------------------------------------------------------


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
