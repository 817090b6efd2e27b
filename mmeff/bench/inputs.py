"""Models and real-media prompts for ``mmeff bench``.

Model names: ``default`` (the embedded LLaVA with SmolLM2-135M-Instruct, see ``mmeff.models``),
``tiny-llava`` / ``tiny-qwen2-vl`` (random tiny configs, for smoke runs), or a local folder / hub id of a
LLaVA or Qwen2-VL checkpoint with its processor (for users with weights; no download happens here unless
the id is not a local folder and the hub is reachable).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers import LlavaForConditionalGeneration

from mmeff.datasets.media import read_frames, sample_image, sample_video_path
from mmeff.eval.videoqa import load_vlm
from mmeff.models.embedded import MINI_MODELS, default_model
from mmeff.models.hf import chat_batch
from mmeff.models.tiny import build_tiny, llava_inputs, qwen2_vl_inputs
from mmeff.preprocess import llava_pixel_values

__all__ = ["load_bench_model", "media_inputs", "BUILTIN_MODELS"]

BUILTIN_MODELS = ("default", "mmeff-mini", "mmeff-mini-smollm", "tiny-llava", "tiny-qwen2-vl")


def load_bench_model(name: str = "default", cache_dir: str | Path | None = None) -> tuple[nn.Module, Any, dict]:
    """Return ``(model.eval(), processor_or_None, info)`` for a bench model name or path: the embedded models'
    and checkpoints' own processors; ``None`` for the tiny random models (no tokenizer)."""
    if name in ("default", *MINI_MODELS):
        return default_model(cache_dir=cache_dir, name="mmeff-mini" if name == "default" else name)
    if name in ("tiny-llava", "tiny-qwen2-vl"):
        kind = "llava" if name == "tiny-llava" else "qwen2_vl"
        folder = Path(tempfile.mkdtemp(prefix="mmeff-tiny-"))
        model = build_tiny(kind, folder, seed=0)
        return model, None, {"name": name, "provenance": "random tiny config, saved and reloaded"}
    try:  # a user checkpoint with its processor
        return load_vlm(name)
    except (ValueError, FileNotFoundError) as e:  # already one line; say what else the name could have been
        raise type(e)(f"{e} (built-in models: {', '.join(BUILTIN_MODELS)})") from None


def _frames(num: int) -> list[np.ndarray]:
    frames, _ = read_frames(sample_video_path("bikes"), num)
    return list(frames)


def media_inputs(
    model: nn.Module, tokenizer: Any, kind: str, *, question: str, frames: int = 4
) -> dict[str, torch.Tensor]:
    """Prompt + pixels for one real image (``skimage`` astronaut) or ``frames`` frames of a real mp4, built
    by the model's processor (``tokenizer``; each frame its own image, as image-LLMs take several images)."""
    if kind not in ("image", "video"):
        raise ValueError(f"kind must be 'image' or 'video', got {kind!r}")
    images = [sample_image("astronaut")] if kind == "image" else _frames(frames)
    cfg = model.config
    if tokenizer is None:  # tiny random models: random text around real pixels
        if isinstance(model, LlavaForConditionalGeneration):
            out = llava_inputs(cfg, batch=1, images_per_sample=len(images))
            out["pixel_values"] = llava_pixel_values(images, cfg.vision_config.image_size)
            return out
        if kind == "image":
            return qwen2_vl_inputs(cfg, batch=1, image_hw=[(56, 84)])
        return qwen2_vl_inputs(cfg, batch=1, image_hw=[], video=(2 * ((frames + 1) // 2), 56, 56))
    # LLaVA takes a clip's frames as separate images here (as image-LLMs take several images); processors
    # with a video pipeline (Qwen2-VL) take them as one video
    media = images if kind == "image" or isinstance(model, LlavaForConditionalGeneration) else np.stack(images)
    batch = chat_batch(tokenizer, [question], [media], cfg)
    if "pixel_values" in batch:
        batch["pixel_values"] = batch["pixel_values"].to(model.dtype)
    return batch
