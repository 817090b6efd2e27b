"""CLIP image preprocessing shared by the methods, the models and the benches: LLaVA-1.5's pixel pipeline.

It sits with the core modules (no model code) so a method that needs pixels (Free Video-LLM's CLIP
scorer) and the model loaders read the same constants and the same resize/normalise steps.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch
from torchvision.transforms.v2 import functional as TF

__all__ = ["CLIP_MEAN", "CLIP_STD", "llava_pixel_values"]

# OpenAI CLIP normalisation, as used by every LLaVA-1.5 checkpoint.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


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
            # CLIPImageProcessor's centre crop floors an odd margin; torchvision's rounds it (one pixel off)
            top, left = (x.shape[1] - image_size) // 2, (x.shape[2] - image_size) // 2
            x = x[:, top : top + image_size, left : left + image_size]
        else:
            x = TF.resize(x, [image_size, image_size], interpolation=bicubic, antialias=True)
        out.append((x.float() / 255.0 - mean) / std)
    return torch.stack(out)
