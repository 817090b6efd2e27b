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

from mmeff.core import (
    BudgetReducer,
    Grid,
    GridReducer,
    Reduction,
    ScoreTopK,
    TokenContext,
    grid_cells,
    group_mean,
    pool_grid_shape,
    register,
)

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


@register("pool")
@dataclass
class AvgPool(GridReducer):
    """Average-pool the patch grid ``(H, W)`` (or each frame of ``(T, H, W)``) to a smaller grid.

    Budget: ``tokens``/``ratio``/``out_grid``/``axis_ratio`` as in :class:`~mmeff.core.GridReducer`.
    Non-divisible sizes use contiguous, non-overlapping bins (:func:`~mmeff.core.grid_cells`).
    """

    def reduce(self, tokens: Tensor, ctx: TokenContext) -> Reduction:
        grid = ctx.grid
        assert grid is not None
        out_grid = self.out_grid_for(grid)
        if out_grid == tuple(grid):
            return Reduction.identity(tokens, grid)
        cells = grid_cells(grid, out_grid[-2:]).to(tokens.device)
        assignment = cells.expand(tokens.shape[0], -1)
        pooled = group_mean(tokens.float(), assignment, math.prod(out_grid)).to(tokens.dtype)
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
