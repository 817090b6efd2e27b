"""What every demo shares: the default models (loaded once per process) and the drawing of token maps."""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import torch
from torch import Tensor

from mmeff.models import mini
from mmeff.models.embedded import default_model
from mmeff.preprocess import CLIP_MEAN, CLIP_STD

__all__ = ["default_vlm", "default_scorer", "model_view", "token_overlay", "draw_box", "upscale", "DemoError"]


class DemoError(ValueError):
    """Bad input to a demo (not a video, empty file, unknown method, budget out of range): the message is
    meant for the person using it, and the app shows it as is."""


@functools.lru_cache(maxsize=1)
def default_vlm() -> tuple[torch.nn.Module, Any, dict[str, Any]]:
    """mmeff-mini ``(model, processor, info)``, built once per process (:func:`mmeff.models.default_model`)."""
    return default_model()


@functools.lru_cache(maxsize=1)
def default_scorer() -> Any:
    """Free Video-LLM's prompt scorer for mmeff-mini (the mini dual encoder), built once per process."""
    return mini.clip_scorer()


def model_view(pixel_values: Tensor) -> list[np.ndarray]:
    """CLIP-normalised ``(N, 3, S, S)`` pixels back to what the model saw: ``N`` uint8 ``(S, S, 3)`` images."""
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    x = (pixel_values.float().cpu() * std + mean).clamp(0, 1)
    return [np.ascontiguousarray((f.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)) for f in x]


def upscale(img: np.ndarray, factor: int) -> np.ndarray:
    """Nearest-neighbour enlargement of ``(H, W, 3)`` by an integer ``factor`` (small model inputs stay crisp)."""
    return np.ascontiguousarray(img.repeat(factor, axis=0).repeat(factor, axis=1)) if factor > 1 else img


def token_overlay(img: np.ndarray, assignment: np.ndarray, dim: float = 0.25) -> np.ndarray:
    """Draw a token map on ``img`` ``(S, S, 3)`` uint8.

    ``assignment`` ``(h, w)`` holds, per input patch, the output token it went to (-1: dropped). Dropped
    patches are darkened to ``dim`` of their brightness and the borders between patches that went to
    different outputs are drawn in white, so merged regions read as one cell and kept patches as a grid.
    """
    h, w = assignment.shape
    s_h, s_w = img.shape[0] // h, img.shape[1] // w
    if s_h < 1 or s_w < 1:
        raise ValueError(f"image {img.shape[:2]} is smaller than the token grid {(h, w)}")
    out = img[: h * s_h, : w * s_w].astype(np.float32).copy()
    cell = np.kron(assignment, np.ones((s_h, s_w), dtype=assignment.dtype))
    out[cell < 0] *= dim
    edge = np.zeros(cell.shape, dtype=bool)
    edge[:, 1:] |= cell[:, 1:] != cell[:, :-1]
    edge[1:, :] |= cell[1:, :] != cell[:-1, :]
    out[edge] = 255.0
    return out.round().astype(np.uint8)


def draw_box(img: np.ndarray, box: tuple[int, int, int, int], color: tuple[int, int, int] = (255, 64, 32),
             width: int = 3) -> np.ndarray:
    """A rectangle ``(top, bottom, left, right)`` in pixels (bottom/right exclusive) drawn on a copy of ``img``."""
    out = img.copy()
    t, b, lo, r = (int(v) for v in box)
    t, lo = max(t, 0), max(lo, 0)
    b, r = min(b, out.shape[0]), min(r, out.shape[1])
    out[t : t + width, lo:r] = color
    out[max(b - width, t) : b, lo:r] = color
    out[t:b, lo : lo + width] = color
    out[t:b, max(r - width, lo) : r] = color
    return out
