"""Invariants of every registered reducer, independent of any host model."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import mmeff
from mmeff.core import Reduction, TokenContext, group_mean

GRID = (6, 8)
N = math.prod(GRID)


def make(name: str, **kw) -> mmeff.TokenReducer:
    return mmeff.create_reducer(name, **kw)


def ctx_for(x: torch.Tensor, grid=GRID) -> TokenContext:
    scores = torch.rand(x.shape[:2], generator=torch.Generator().manual_seed(1))
    return TokenContext(grid=grid, scores=scores)


@pytest.fixture
def x() -> torch.Tensor:
    return torch.randn(3, N, 16, generator=torch.Generator().manual_seed(0))


ALL = ["random", "uniform", "pool", "cls_attn", "fourier"]


def test_registry_lists_baselines():
    assert set(ALL) <= set(mmeff.list_reducers())
    with pytest.raises(KeyError, match="unknown reducer 'nope'"):
        mmeff.create_reducer("nope")


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("m", [1, 12, 24, N])
def test_budget_exact_shapes(name, m, x):
    if name == "pool" and m == 1:
        m = 1
    out = make(name, tokens=m)(x, ctx_for(x))
    assert out.tokens.shape == (3, m, 16)
    assert out.assignment.shape == (3, N)
    assert out.sizes.shape == (3, m)
    # every output token stands for at least one input, and no input is counted twice
    assert (out.sizes >= 1).all()
    assert int(out.sizes.sum(1).max()) <= N


@pytest.mark.parametrize("name", ALL)
def test_identity_at_no_reduction(name, x):
    for red in (make(name, tokens=N), make(name, ratio=1.0)):
        out = red(x, ctx_for(x))
        if name == "fourier":  # runs the transform at the full grid: C^T C = I up to float error
            torch.testing.assert_close(out.tokens, x, atol=1e-5, rtol=1e-5)
        else:
            assert torch.equal(out.tokens, x)
        assert torch.equal(out.assignment[0], torch.arange(N))


@pytest.mark.parametrize("name", ["random", "uniform", "cls_attn"])
def test_selection_keeps_order_and_values(name, x):
    out = make(name, tokens=10)(x, ctx_for(x))
    idx = out.indices
    assert idx is not None
    assert (idx[:, 1:] > idx[:, :-1]).all(), "kept tokens must stay in original order"
    assert torch.equal(out.tokens, torch.stack([x[b, idx[b]] for b in range(3)]))
    # assignment and indices agree
    for b in range(3):
        assert torch.equal(out.assignment[b, idx[b]], torch.arange(10))
        assert int((out.assignment[b] >= 0).sum()) == 10


def test_random_is_seeded_and_varies_with_seed(x):
    a = make("random", tokens=10, seed=3)(x).indices
    b = make("random", tokens=10, seed=3)(x).indices
    c = make("random", tokens=10, seed=4)(x).indices
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_uniform_stride():
    x = torch.randn(1, 10, 2)
    assert make("uniform", tokens=5)(x).indices.tolist() == [[1, 3, 5, 7, 9]]
    assert make("uniform", tokens=2)(x).indices.tolist() == [[2, 7]]


def test_uniform_strides_rows_and_columns_on_a_grid():
    x = torch.randn(1, 36, 2)
    idx = make("uniform", tokens=9)(x, TokenContext(grid=(6, 6))).indices[0]
    rows, cols = (idx // 6).tolist(), (idx % 6).tolist()
    assert sorted(set(rows)) == [1, 3, 5] and sorted(set(cols)) == [1, 3, 5]
    # per frame on video grids
    v = make("uniform", tokens=8)(torch.randn(1, 2 * 16, 2), TokenContext(grid=(2, 4, 4))).indices[0]
    assert v.tolist() == [5, 7, 13, 15, 21, 23, 29, 31]
    # budgets that do not form a grid fall back to the flat stride
    odd = make("uniform", tokens=7)(x, TokenContext(grid=(6, 6))).indices[0]
    assert odd.tolist() == [2, 7, 12, 18, 23, 28, 33]


def test_cls_attn_keeps_top_scores(x):
    ctx = ctx_for(x)
    out = make("cls_attn", tokens=7)(x, ctx)
    for b in range(3):
        expected = torch.topk(ctx.scores[b], 7).indices.sort().values
        assert torch.equal(out.indices[b], expected)


def test_cls_attn_requires_scores(x):
    with pytest.raises(ValueError, match="needs context.scores"):
        make("cls_attn", tokens=4)(x, TokenContext(grid=GRID))


def test_pool_matches_avg_pool2d_when_divisible(x):
    out = make("pool", tokens=12)(x, ctx_for(x))  # 6x8 -> 3x4
    assert out.grid == (3, 4)
    img = x.transpose(1, 2).reshape(3, 16, *GRID)
    ref = F.avg_pool2d(img, 2).flatten(2).transpose(1, 2)
    torch.testing.assert_close(out.tokens, ref)
    assert torch.equal(out.sizes, torch.full((3, 12), 4.0))


def test_pool_non_divisible_bins_partition():
    x = torch.randn(2, 5 * 7, 4)
    out = make("pool", out_grid=(2, 3))(x, TokenContext(grid=(5, 7)))
    assert out.tokens.shape == (2, 6, 4)
    assert int(out.sizes.sum(1)[0]) == 35
    torch.testing.assert_close(out.tokens, group_mean(x, out.assignment, 6))


def test_pool_video_grid_per_frame():
    x = torch.randn(1, 4 * 6 * 6, 8)
    out = make("pool", tokens=4 * 9)(x, TokenContext(grid=(4, 6, 6)))
    assert out.grid == (4, 3, 3)
    # no output token mixes frames
    frame_of_input = torch.arange(4).repeat_interleave(36)
    frame_of_output = torch.arange(4).repeat_interleave(9)
    assert torch.equal(frame_of_output[out.assignment[0]], frame_of_input)
    with pytest.raises(ValueError, match="not a multiple of the 4 frames"):
        make("pool", tokens=10)(x, TokenContext(grid=(4, 6, 6)))


def test_pool_budget_that_does_not_fit_a_grid(x):
    with pytest.raises(ValueError, match="no 47-token grid fits"):
        make("pool", tokens=47)(x, ctx_for(x))


@pytest.mark.parametrize("name", ALL)
def test_budget_larger_than_tokens_is_an_error(name, x):
    with pytest.raises(ValueError, match=f"budget tokens={N + 1} exceeds the {N} tokens"):
        make(name, tokens=N + 1)(x, ctx_for(x))


@pytest.mark.parametrize("kw", [{"tokens": 0}, {"tokens": -3}, {"ratio": 0.0}, {"ratio": 1.5}, {}, {"tokens": 4, "ratio": 0.5}])
def test_bad_budgets(kw):
    with pytest.raises(ValueError):
        mmeff.UniformKeep(**kw)


def test_bad_inputs(x):
    red = mmeff.UniformKeep(tokens=4)
    with pytest.raises(ValueError, match=r"shape \(B, N, D\)"):
        red(x[0])
    with pytest.raises(TypeError, match="floating point"):
        red(x.long())
    with pytest.raises(TypeError, match="torch.Tensor"):
        red(x.numpy())
    with pytest.raises(ValueError, match="grid \\(5, 5\\) has 25 cells but there are 48 tokens"):
        red(x, TokenContext(grid=(5, 5)))
    with pytest.raises(ValueError, match="scores must have shape"):
        red(x, TokenContext(scores=torch.rand(3, 7)))
    with pytest.raises(TypeError, match="tokens must be an int"):
        mmeff.UniformKeep(tokens=2.5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_dtypes(dtype, x):
    for name in ALL:
        out = make(name, tokens=12)(x.to(dtype), ctx_for(x))
        assert out.tokens.dtype == dtype


def test_compose_bookkeeping(x):
    comp = mmeff.compose(mmeff.AvgPool(tokens=12), mmeff.UniformKeep(tokens=4))
    assert isinstance(comp, mmeff.Compose)
    out = comp(x, ctx_for(x))
    pooled = mmeff.AvgPool(tokens=12)(x, ctx_for(x))
    kept = mmeff.UniformKeep(tokens=4)(pooled.tokens, TokenContext(grid=pooled.grid))
    torch.testing.assert_close(out.tokens, kept.tokens)
    # inputs of dropped pooled cells are dropped end to end; kept cells keep all 4 members
    assert torch.equal(out.sizes, torch.full((3, 4), 4.0))
    assert int((out.assignment >= 0).sum(1)[0]) == 16
    # scores are carried through a selection for a later score-based step
    sel = mmeff.compose(mmeff.UniformKeep(tokens=24), mmeff.CLSAttnTopK(tokens=6))
    ctx = ctx_for(x)
    out = sel(x, ctx)
    first = mmeff.UniformKeep(tokens=24)(x, ctx).indices
    expected = first.gather(1, torch.topk(ctx.scores.gather(1, first), 6).indices.sort().values)
    assert torch.equal(out.indices, expected)
    assert "uniform" in sel.describe() and "cls_attn" in sel.describe()
    with pytest.raises(ValueError, match="needs context.grid"):
        mmeff.compose(mmeff.UniformKeep(tokens=24), mmeff.AvgPool(tokens=4))(x, ctx)


def test_positions_selected_and_merged():
    x = torch.randn(1, 16, 4)
    pos = torch.stack(torch.meshgrid(torch.arange(4), torch.arange(4), indexing="ij"), -1).reshape(1, 16, 2)
    sel = mmeff.UniformKeep(tokens=4)(x)
    assert torch.equal(sel.positions(pos), pos[:, sel.indices[0]])
    pooled = mmeff.AvgPool(tokens=4)(x, TokenContext(grid=(4, 4)))
    # 2x2 bins centred at 0.5/2.5 round half to even -> 0 and 2
    assert pooled.positions(pos)[0].tolist() == [[0, 0], [0, 2], [2, 0], [2, 2]]
    assert pooled.positions(pos[..., 0]).shape == (1, 4)


def test_reduction_identity_helper(x):
    r = Reduction.identity(x)
    assert torch.equal(r.tokens, x) and torch.equal(r.sizes, torch.ones(3, N))


@settings(max_examples=40, deadline=None)
@given(
    b=st.integers(1, 3),
    h=st.integers(1, 7),
    w=st.integers(1, 7),
    frac=st.floats(0.05, 1.0),
    name=st.sampled_from(["random", "uniform", "cls_attn"]),
    seed=st.integers(0, 5),
)
def test_property_selection(b, h, w, frac, name, seed):
    n = h * w
    m = max(1, int(n * frac))
    x = torch.randn(b, n, 3, generator=torch.Generator().manual_seed(seed))
    out = make(name, tokens=m)(x, TokenContext(grid=(h, w), scores=torch.rand(b, n)))
    assert out.tokens.shape == (b, m, 3)
    assert (out.indices.diff(dim=1) > 0).all()
    assert torch.equal(out.sizes, torch.ones(b, m))


@settings(max_examples=40, deadline=None)
@given(h=st.integers(1, 9), w=st.integers(1, 9), hh=st.integers(1, 9), ww=st.integers(1, 9))
def test_property_pool_partition(h, w, hh, ww):
    hh, ww = min(hh, h), min(ww, w)
    x = torch.randn(2, h * w, 3)
    out = mmeff.AvgPool(out_grid=(hh, ww))(x, TokenContext(grid=(h, w)))
    assert out.tokens.shape == (2, hh * ww, 3)
    assert int(out.sizes.sum(1)[0]) == h * w  # a partition: every token counted once
    # the pooled mean preserves the overall mean when weighted by sizes
    torch.testing.assert_close((out.tokens * out.sizes.unsqueeze(-1)).sum(1) / (h * w), x.mean(1), atol=1e-5, rtol=1e-5)


def test_reduction_with_overlapping_sources():
    # output 0 draws on inputs 0,1; output 1 on inputs 1,2,3 (input 1 is shared); input 4 unused
    toks = torch.zeros(1, 2, 3)
    out_idx = torch.tensor([[0, 0, 1, 1, 1]])
    in_idx = torch.tensor([[0, 1, 1, 2, 3]])
    red = Reduction.from_sources(toks, out_idx, in_idx, num_inputs=5)
    assert red.sizes.tolist() == [[2.0, 3.0]]
    assert red.assignment.tolist() == [[0, 0, 1, 1, -1]]
    pos = torch.tensor([[[0, 0], [0, 2], [4, 4], [8, 6], [9, 9]]])
    # means: ((0,0)+(0,2))/2 = (0,1); ((0,2)+(4,4)+(8,6))/3 = (4,4)
    assert red.positions(pos).tolist() == [[[0, 1], [4, 4]]]
    with pytest.raises(ValueError, match="in_idx must index the 5 inputs"):
        Reduction.from_sources(toks, out_idx, in_idx + 5, num_inputs=5)
    with pytest.raises(ValueError, match="out_idx must index the 2 outputs"):
        Reduction.from_sources(toks, out_idx + 2, in_idx, num_inputs=5)


@pytest.mark.parametrize("name", [n for n in mmeff.list_reducers() if n != "freevideo"])  # no token budget
def test_non_finite_features_are_refused_by_every_reducer(name, monkeypatch) -> None:
    from mmeff import core

    tokens = torch.randn(2, 16, 8)
    tokens[1, 5, 3] = float("nan")
    ctx = mmeff.TokenContext(grid=(4, 4), scores=torch.rand(2, 16), prompt=torch.randn(2, 8))
    reducer = mmeff.create_reducer(name, tokens=4)
    with pytest.raises(ValueError, match=r"tokens \(2, 16, 8\) hold 1 NaN/Inf"):
        reducer(tokens, ctx)
    scores = ctx.scores.clone()
    scores[0, 0] = float("inf")
    with pytest.raises(ValueError, match="context.scores .* hold 1 NaN/Inf"):
        reducer(torch.randn(2, 16, 8), mmeff.TokenContext(grid=(4, 4), scores=scores, prompt=ctx.prompt))
    monkeypatch.setattr(core, "CHECK_FINITE", False)  # MMEFF_CHECK_FINITE=0: the caller's choice
    assert reducer(torch.randn(2, 16, 8), ctx).tokens.shape == (2, 4, 8)


@pytest.mark.parametrize("red", [mmeff.UniformKeep(ratio=0.25), mmeff.RandomKeep(ratio=0.5, seed=3), mmeff.AvgPool(tokens=4),
                                 mmeff.CLSAttnTopK(ratio=0.5), mmeff.create_reducer("fourier", ratio=0.25),
                                 mmeff.compose(mmeff.AvgPool(ratio=0.5), mmeff.UniformKeep(ratio=0.5))],
                         ids=lambda r: r.describe())
def test_follow_reduces_companion_features_the_way_the_tokens_were(red):
    """follow() on the tokens themselves gives the reduced tokens back; on other features it is linear in
    them (DeepStack features must be reduced by the same map, whatever their values)."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(2, 16, 6, generator=g), torch.randn(2, 16, 3, generator=g)
    ctx = mmeff.TokenContext(grid=(4, 4), scores=torch.rand(2, 16, generator=g).softmax(-1))
    red_x = red(x, ctx)
    torch.testing.assert_close(red.follow(red_x, x, ctx), red_x.tokens, rtol=1e-5, atol=1e-6)
    both = red.follow(red_x, torch.cat([x, 2 * y], -1), ctx)
    torch.testing.assert_close(both[..., 6:], 2 * red.follow(red_x, y, ctx), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="does not match|cells but"):
        red.follow(red_x, y[:, :8], ctx)


def test_follow_of_sources_averages_every_source_and_composition_refuses_its_own_rules():
    tokens = torch.arange(12.0).view(1, 4, 3)
    red = mmeff.Reduction.from_sources(tokens[:, :2] * 0, torch.tensor([[0, 0, 1, 1, 1]]), torch.tensor([[0, 1, 1, 2, 3]]), 4)
    out = mmeff.UniformKeep(ratio=1.0).follow(red, tokens, mmeff.TokenContext())
    torch.testing.assert_close(out[0], torch.stack([tokens[0, :2].mean(0), tokens[0, 1:].mean(0)]))
    fourier_then_keep = mmeff.compose(mmeff.create_reducer("fourier", ratio=0.5), mmeff.UniformKeep(ratio=0.5))
    x = torch.randn(1, 16, 4)
    ctx = mmeff.TokenContext(grid=(4, 4))
    with pytest.raises(ValueError, match="apply it alone"):
        fourier_then_keep.follow(fourier_then_keep(x, ctx), x, ctx)


def test_compression_ratio_is_the_share_removed():
    """kvpress's compression_ratio (share removed) is accepted as the complement of ratio (share kept)."""
    assert mmeff.UniformKeep(compression_ratio=0.75) == mmeff.UniformKeep(ratio=0.25)
    assert mmeff.AvgPool(compression_ratio=0.5).describe() == "pool(ratio=0.5)"
    assert make("fourier", compression_ratio=0.75).budget(N) == make("fourier", ratio=0.25).budget(N)
    with pytest.raises(ValueError, match="not both"):
        mmeff.UniformKeep(ratio=0.5, compression_ratio=0.5)
    with pytest.raises(ValueError, match=r"must be in \[0, 1\)"):
        mmeff.UniformKeep(compression_ratio=1.0)
