"""Fourier-VLM (arXiv 2508.06038): compress vision features with a 2-D DCT low-pass, no new parameters.

Per frame of the feature grid ``(H, W)``: orthonormal 2-D DCT-II, keep the low-frequency ``[:h', :w']``
corner, inverse DCT of size ``h'×w'``. The result is an ``h'×w'`` grid of tokens, each a smooth summary of
its neighbourhood. Where it runs (as the paper's code does):

- LLaVA-1.5: on the vision tower's output *before* the projector (576 x 1024 -> e.g. 144 or 64 tokens);
  ``mmeff.apply(model, FourierLowPass(tokens=64))`` does this by default (``stage="pre_projector"``).
- Qwen2-VL / Qwen2.5-VL: on the PatchMerger's output (the features the LLM reads), per image on its
  ``(h, w)`` merged grid and per video frame on ``(t, h, w)``; no temporal compression. The paper's rule
  is a per-axis ratio, ``h' = max(int(h * 2/3), 1)``: ``FourierLowPass(axis_ratio=2/3)``.

Amplitude: an ortho DCT of size N followed by an ortho inverse of size n scales the signal by
``sqrt(N / n)`` per axis (x2 for 24x24 -> 12x12). The paper's code does not correct this, and neither does
the default here (``rescale=False``), since the paper fine-tunes with the filter in place
(:mod:`mmeff.train.finetune`). ``rescale=True`` multiplies by ``sqrt(h'w' / HW)`` so the output keeps the input's
scale, which is what a frozen, training-free projector expects.

Differences from the official code: on Qwen2-VL the official hook rewrites ``grid_thw`` to the reduced
grid, so M-RoPE positions are re-gridded; mmeff's default keeps each token's original position (a merged
token at its bin's centre, ``mrope="gather"``), which keeps the image's extent in position space. Both are
tested; ``FourierLowPass(faithful=True)`` (or ``mmeff.apply(..., mrope="regrid")``) gives the official
positions, without mutating the caller's ``grid_thw``. Which is more accurate has not been measured.

Bookkeeping: output token ``(i, j)`` is credited to the input tokens of its spatial bin (the same
contiguous bins as ``pool``), so merged positions (M-RoPE) land at the bin centres; in value it depends on
every input token of the frame.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from mmeff.core import Grid, GridReducer, Reduction, TokenContext, grid_cells, register
from mmeff.kernels import dct2, dct_lowpass

__all__ = ["FourierLowPass", "fourier_compress", "lowpass_energy_fraction"]


def _frames(x: Tensor, grid: Grid) -> tuple[Tensor, int]:
    """``x`` ``(B, T*H*W, D)`` -> ``(B*T, H, W, D)`` and T, after checking the grid."""
    if x.dim() != 3:
        raise ValueError(f"features must have shape (B, N, D), got {tuple(x.shape)}")
    if len(grid) not in (2, 3) or any(int(g) < 1 for g in grid):
        raise ValueError(f"grid must be (H, W) or (T, H, W) of positive ints, got {grid}")
    t, h, w = (1, *grid) if len(grid) == 2 else grid
    if t * h * w != x.shape[1]:
        raise ValueError(f"grid {tuple(grid)} has {t * h * w} cells but the features have {x.shape[1]} tokens")
    return x.reshape(x.shape[0] * t, h, w, x.shape[2]), t


def fourier_compress(x: Tensor, grid: Grid, out_hw: tuple[int, int], rescale: bool = False) -> Tensor:
    """Fourier-VLM low-pass of a feature map, outside any model.

    Args:
        x: features ``(B, N, D)`` laid out row-major on ``grid`` (``(H, W)``, or ``(T, H, W)`` for T frames
            compressed independently); any float dtype, computed in fp32 (fp64 stays fp64).
        grid: the layout of the N tokens.
        out_hw: ``(h', w')`` kept per frame, at most ``(H, W)``.
        rescale: multiply by ``sqrt(h'w' / HW)`` to keep the input's amplitude (the paper does not).
    Returns:
        ``(B, T*h'*w', D)`` in ``x.dtype``.
    """
    frames, t = _frames(x, grid)
    out = dct_lowpass(frames, out_hw, rescale=rescale)
    return out.reshape(x.shape[0], t * out_hw[0] * out_hw[1], x.shape[2])


def lowpass_energy_fraction(x: Tensor, grid: Grid, out_hw: tuple[int, int]) -> Tensor:
    """Share of each sample's feature energy in the kept ``(h', w')`` DCT corner: ``(B, N, D)`` -> ``(B,)``.

    With the orthonormal DCT this is ``||fourier_compress(x)||² / ||x||²`` (``rescale=False``): a quick way
    to see how much of an encoder's signal a budget keeps before running the model.
    """
    frames, t = _frames(x, grid)
    hh, ww = out_hw
    coef = dct2(frames.to(torch.float64 if x.dtype == torch.float64 else torch.float32)).reshape(
        x.shape[0], t, *frames.shape[1:]
    )
    kept = coef[:, :, :hh, :ww].pow(2).sum(dim=(1, 2, 3, 4))
    total = coef.pow(2).sum(dim=(1, 2, 3, 4)).clamp_min(torch.finfo(coef.dtype).tiny)
    return kept / total


@register("fourier")
@dataclass
class FourierLowPass(GridReducer):
    """Fourier-VLM: 2-D DCT low-pass of each frame's feature grid to ``(h', w')`` (no parameters).

    Budget: ``tokens``/``ratio``/``out_grid``/``axis_ratio`` as in :class:`~mmeff.core.GridReducer`
    (``tokens=144`` on LLaVA's 24x24 grid is the paper's ``reserve=12``; ``axis_ratio=2/3`` its Qwen rule).
    ``rescale`` keeps the input amplitude (off by default, as in the paper). On LLaVA it runs before the
    projector by default, elsewhere on the projected features (module docstring). ``faithful=True``: on
    Qwen2-VL the positions are re-gridded as the official hook does (``mrope="regrid"`` unless given).
    """

    rescale: bool = False
    #: placement as the official code where it differs (Qwen2-VL: re-gridded M-RoPE positions, module docstring)
    faithful: bool = field(default=False, metadata={"describe": "if_set"})

    def default_stage(self, host: str) -> str:
        return "pre_projector" if host == "llava" else "post_projector"

    def reduce(self, tokens: Tensor, ctx: TokenContext) -> Reduction:
        grid = ctx.grid
        assert grid is not None
        out_grid = self.out_grid_for(grid)
        # no shortcut at the full grid: A = C^T C is the identity up to float error, and running it keeps
        # the full-grid check an honest test of the transform
        out = fourier_compress(tokens, grid, out_grid[-2:], rescale=self.rescale)
        cells = grid_cells(grid, out_grid[-2:]).to(tokens.device)
        assignment = cells.expand(tokens.shape[0], -1).clone()
        return Reduction(tokens=out, assignment=assignment, grid=out_grid)

    def follow(self, red: Reduction, x: Tensor, ctx: TokenContext) -> Tensor:
        """Low-pass companion features ``x`` ``(B, N, C)`` to the same ``(h', w')`` grid as the tokens."""
        assert ctx.grid is not None
        return fourier_compress(x, ctx.grid, self.out_grid_for(ctx.grid)[-2:], rescale=self.rescale)

    def flops(self, grid: Grid, dim: int) -> int:
        """Multiply-add FLOPs of one sample's low-pass (``2·h'·H·W·D + 2·h'·w'·W·D`` per frame)."""
        t, h, w = (1, *grid) if len(grid) == 2 else grid
        hh, ww = self.target(grid)
        return t * (2 * hh * h * w * dim + 2 * hh * ww * w * dim)

