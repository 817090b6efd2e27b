"""Baseline reducers. Published benchmarks find these hard to beat, so they are first-class methods.

- ``random``: keep a seeded random subset, in order.
- ``uniform``: keep tokens at a uniform stride over the sequence, in order.
- ``pool``: average-pool the patch grid to a smaller grid (per frame for ``(T, H, W)`` grids).
- ``cls_attn``: keep the tokens the encoder's CLS query attends to most (FastV/VisionZip-style score),
  with the score computed from q/k in a hook so SDPA and flash attention keep working.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from mmeff.core import BudgetReducer, Grid, Reduction, ScoreTopK, TokenContext, group_mean, register

__all__ = ["RandomKeep", "UniformKeep", "AvgPool", "CLSAttnTopK", "pool_grid_shape"]


@register("random")
@dataclass
class RandomKeep(ScoreTopK):
    """Keep a random subset of M tokens in their original order.

    The subset depends only on ``(seed, N)``: every row of a batch gets the same one, so results do not
    change with batch composition, and a CPU generator makes it identical on every device.
    """

    seed: int = 0

    def score(self, tokens: Tensor, ctx: TokenContext) -> Tensor:
        g = torch.Generator().manual_seed(self.seed)
        return torch.rand(tokens.shape[1], generator=g).to(tokens.device).expand(tokens.shape[0], -1)


@register("uniform")
@dataclass
class UniformKeep(BudgetReducer):
    """Keep M tokens at a uniform stride, in order.

    With a patch grid whose per-frame budget factors as ``h' * w'`` (the same rule as ``pool``), rows and
    columns are strided separately, so kept tokens cover the image evenly; a flat stride over a row-major
    grid would keep the same columns in every row. Otherwise token ``floor((i + 0.5) * N / M)`` is kept.
    """

    def reduce(self, tokens: Tensor, ctx: TokenContext) -> Reduction:
        b, n = tokens.shape[:2]
        m = self.budget(n)
        if m == n:
            return Reduction.identity(tokens, ctx.grid)
        idx = _grid_stride(ctx.grid, m) if ctx.grid is not None else None
        if idx is None:
            idx = _centers(n, m)
        return Reduction.from_indices(tokens, idx.to(tokens.device).expand(b, m).clone())


def _centers(size: int, out: int) -> Tensor:
    return ((torch.arange(out, dtype=torch.float64) + 0.5) * size / out).floor().long()


def _grid_stride(grid: Grid, m: int) -> Tensor | None:
    t, h, w = (1, *grid) if len(grid) == 2 else grid
    if m % t:
        return None
    try:
        hh, ww = pool_grid_shape(h, w, m // t)
    except ValueError:
        return None
    cell = (_centers(h, hh)[:, None] * w + _centers(w, ww)[None, :]).reshape(-1)
    return (torch.arange(t)[:, None] * (h * w) + cell[None, :]).reshape(-1)


def pool_grid_shape(h: int, w: int, m: int) -> tuple[int, int]:
    """The ``(h', w')`` with ``h' * w' == m``, ``h' <= h``, ``w' <= w`` whose aspect is closest to ``h / w``."""
    best: tuple[float, tuple[int, int]] | None = None
    for hh in range(1, min(h, m) + 1):
        if m % hh:
            continue
        ww = m // hh
        if ww > w:
            continue
        err = abs(math.log((hh / ww) / (h / w)))
        if best is None or err < best[0]:
            best = (err, (hh, ww))
    if best is None:
        raise ValueError(f"no {m}-token grid fits inside a {h}x{w} grid; pick a budget of the form h'*w' with h'<={h}, w'<={w}")
    return best[1]


def _bins(size: int, out: int) -> Tensor:
    # non-overlapping bins (unlike adaptive_avg_pool2d's overlapping windows), so every input token
    # belongs to exactly one output token and positions/sizes stay well defined
    return torch.div(torch.arange(size) * out, size, rounding_mode="floor")


@register("pool")
@dataclass
class AvgPool(BudgetReducer):
    """Average-pool the patch grid ``(H, W)`` (or each frame of ``(T, H, W)``) to a smaller grid.

    The budget is total tokens: for video grids it must be a multiple of T. ``out_grid`` may fix
    ``(h', w')`` directly instead of a budget. Non-divisible sizes use contiguous, non-overlapping bins.
    """

    out_grid: tuple[int, int] | None = None
    needs = frozenset({"grid"})

    def __post_init__(self) -> None:
        if self.out_grid is not None:
            if self.tokens is not None or self.ratio is not None:
                raise ValueError("AvgPool: give out_grid= or a budget (tokens=/ratio=), not both")
            if len(self.out_grid) != 2 or min(self.out_grid) < 1:
                raise ValueError(f"out_grid must be (h, w) of positive ints, got {self.out_grid}")
            return
        super().__post_init__()

    def target(self, grid: Grid) -> tuple[int, int]:
        """Output grid ``(h', w')`` per frame for an input ``grid``."""
        t, h, w = (1, *grid) if len(grid) == 2 else grid
        if self.out_grid is not None:
            hh, ww = self.out_grid
            if hh > h or ww > w:
                raise ValueError(f"out_grid {self.out_grid} is larger than the {h}x{w} input grid")
            return hh, ww
        m = self.budget(t * h * w)
        if m % t:
            raise ValueError(f"AvgPool: budget {m} is not a multiple of the {t} frames")
        return pool_grid_shape(h, w, m // t)

    def reduce(self, tokens: Tensor, ctx: TokenContext) -> Reduction:
        grid = ctx.grid
        assert grid is not None
        t, h, w = (1, *grid) if len(grid) == 2 else grid
        hh, ww = self.target(grid)
        if (hh, ww) == (h, w):
            return Reduction.identity(tokens, grid)
        cell = (_bins(h, hh)[:, None] * ww + _bins(w, ww)[None, :]).reshape(-1)
        frame = torch.arange(t)[:, None] * (hh * ww)
        assignment = (frame + cell[None, :]).reshape(-1).to(tokens.device).expand(tokens.shape[0], -1)
        m = t * hh * ww
        pooled = group_mean(tokens.float(), assignment, m).to(tokens.dtype)
        out_grid: Grid = (hh, ww) if len(grid) == 2 else (t, hh, ww)
        return Reduction(tokens=pooled, assignment=assignment.clone(), grid=out_grid)


@register("cls_attn")
@dataclass
class CLSAttnTopK(ScoreTopK):
    """Keep the M tokens with the highest attention from the encoder's CLS query (``context.scores``).

    Adapters fill ``scores`` from q/k captured at the feature layer; for encoders without a CLS token
    (Qwen2-VL) the adapter supplies the mean attention each token receives instead.
    """

    needs = frozenset({"scores"})

    def score(self, tokens: Tensor, ctx: TokenContext) -> Tensor:
        assert ctx.scores is not None
        return ctx.scores
