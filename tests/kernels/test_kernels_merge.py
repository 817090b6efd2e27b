"""Tests for mmeff.kernels.merge: ToMe bipartite soft matching, its helpers and the Triton merge kernel."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mmeff.kernels.dispatch import forced_backend
from mmeff.kernels.merge import (
    bipartite_soft_matching,
    merge_source,
    merge_wavg,
    proportional_attention_bias,
)

HYP = settings(max_examples=20, deadline=None)


@pytest.fixture(scope="module", autouse=True)
def _triton_interpreter():
    """Run Triton kernels in the CPU interpreter for this module only (kernels are jit-wrapped lazily)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRITON_INTERPRET", "1")
        yield




def _rand(*shape: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(dtype)


def _brute_force(
    metric: torch.Tensor, x: torch.Tensor, r: int, class_token: bool, distill_token: bool
) -> torch.Tensor:
    """Independent ToMe in plain Python loops: returns the mean-merged ``x`` ``(B, N - r, D)``."""
    bsz, n, _ = metric.shape
    r = min(r, (n - int(class_token) - int(distill_token)) // 2)
    outs = []
    for bi in range(bsz):
        a_ids = list(range(0, n, 2))
        b_ids = list(range(1, n, 2))
        if r <= 0:
            outs.append(x[bi])
            continue
        unit = [metric[bi, t].float() / metric[bi, t].float().norm() for t in range(n)]
        best = {}  # a token -> (score, b token)
        for ia, ta in enumerate(a_ids):
            cands = []
            for ib, tb in enumerate(b_ids):
                s = float(torch.dot(unit[ta], unit[tb]))
                if (class_token and ia == 0) or (distill_token and ib == 0):
                    s = float("-inf")
                cands.append((s, tb))
            best_s = max(c[0] for c in cands)
            best[ta] = next(c for c in cands if c[0] == best_s)
        ranked = sorted(a_ids, key=lambda ta: (-best[ta][0], ta))
        merged = set(ranked[:r])
        rows = [x[bi, ta] for ta in a_ids if ta not in merged]
        for tb in b_ids:
            group = [tb] + [ta for ta in merged if best[ta][1] == tb]
            rows.append(torch.stack([x[bi, t].double() for t in group]).mean(0).to(x.dtype))
        outs.append(torch.stack(rows))
    return torch.stack(outs)


# ------------------------------------------------------------------------------ Triton vs reference

CASES = [
    # (B, N, D, r, class_token)
    (1, 1, 5, 3, False),  # N = 1: nothing to merge
    (2, 9, 7, 0, True),  # r = 0
    (2, 9, 7, 4, False),  # odd N, r = N // 2
    (3, 10, 33, 5, False),  # r = N // 2, batch > 1, D non-power-of-two
    (2, 11, 20, 3, True),  # odd N with CLS
    (2, 8, 300, 8, True),  # r clamped, D > block
]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mode", ["mean", "sum"])
def test_triton_matches_reference(
    case: tuple[int, int, int, int, bool], dtype: torch.dtype, mode: str
) -> None:
    bsz, n, d, r, cls = case
    metric = _rand(bsz, n, 6, seed=1, dtype=dtype)
    x = _rand(bsz, n, d, seed=2, dtype=dtype)
    merge, unmerge = bipartite_soft_matching(metric, r, class_token=cls)
    r_eff = min(r, (n - int(cls)) // 2)
    with forced_backend("torch"):
        ref = merge(x, mode=mode)
        ref32 = merge(x.float(), mode=mode)
    with forced_backend("triton"):
        out = merge(x, mode=mode)
    assert out.shape == (bsz, n - r_eff, d) and out.dtype == dtype
    if dtype == torch.float32:
        torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-6)
    tol = {torch.float32: 1e-6, torch.float16: 2e-3, torch.bfloat16: 2e-2}[dtype]
    torch.testing.assert_close(out.float(), ref32, atol=tol, rtol=tol)
    torch.testing.assert_close(out.float(), ref.float(), atol=4 * tol, rtol=4 * tol)
    assert unmerge(out).shape == (bsz, n, d)


def test_triton_many_sources_into_one_destination() -> None:
    """Every A token matches B token 1, so one row reduces many sources (the kernel's dynamic loop)."""
    n, d = 12, 9
    metric = torch.zeros(2, n, 4)
    metric[:, :, 0] = 1.0
    metric[:, 1::2, 1] = 0.5  # B tokens differ, token 1 is the closest to every A token
    metric[:, 1, 1] = 0.0
    x = _rand(2, n, d, seed=3)
    merge, _ = bipartite_soft_matching(metric, 6)
    with forced_backend("triton"):
        out = merge(x)
    with forced_backend("torch"):
        ref = merge(x)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-6)
    expected = torch.cat([x[:, 0::2], x[:, 1:2]], dim=1).mean(1)
    torch.testing.assert_close(out[:, 0], expected, atol=1e-6, rtol=1e-6)
    assert out.shape == (2, n - 6, d)


def test_identity_and_errors() -> None:
    x = _rand(2, 6, 3)
    merge, unmerge = bipartite_soft_matching(x, 0)
    assert merge(x) is x and unmerge(x) is x
    y = x[:, :1]
    merge, unmerge = bipartite_soft_matching(y, 5)
    assert merge(y) is y and unmerge(y) is y
    merge, _ = bipartite_soft_matching(x, 5, class_token=True)  # clamped to (6 - 1) // 2 = 2
    assert merge(x).shape == (2, 4, 3)
    merge, unmerge = bipartite_soft_matching(x, 2)
    with pytest.raises(ValueError):
        merge(x, mode="prod")
    with pytest.raises(ValueError):
        merge(x[:, :5])
    with pytest.raises(ValueError):
        unmerge(x)
    with pytest.raises(ValueError):
        bipartite_soft_matching(x[0], 2)


def test_distill_token_never_receives() -> None:
    x = _rand(3, 10, 5, seed=4)
    x[:, 2::2] = x[:, 1:2]  # every A token would love to merge into the distill token
    merge, _ = bipartite_soft_matching(x, 4, class_token=True, distill_token=True)
    src = merge_source(merge, x)
    n_unm = src.shape[1] - 5
    assert torch.equal(src[:, n_unm], torch.nn.functional.one_hot(torch.tensor(1), 10).float().expand(3, 10))
    assert torch.equal(src[:, 0], torch.nn.functional.one_hot(torch.tensor(0), 10).float().expand(3, 10))


def test_gradient_flows_through_reference() -> None:
    x = _rand(2, 7, 4, seed=5).requires_grad_()
    merge, _ = bipartite_soft_matching(x.detach(), 3)
    with forced_backend("triton"):  # requires_grad falls back to the differentiable reference
        merge(x, mode="sum").sum().backward()
    torch.testing.assert_close(x.grad, torch.ones_like(x))  # every token contributes once


def test_proportional_attention_bias() -> None:
    size = torch.tensor([[[1.0], [2.0], [4.0]]]).expand(2, 3, 1)
    bias = proportional_attention_bias(size)
    assert bias.shape == (2, 1, 1, 3)
    torch.testing.assert_close(bias[1, 0, 0], torch.log(torch.tensor([1.0, 2.0, 4.0])))
    with pytest.raises(ValueError):
        proportional_attention_bias(size[..., 0])


# ------------------------------------------------------------------------------ property tests

shapes = st.tuples(
    st.integers(1, 3),  # B
    st.integers(1, 13),  # N
    st.integers(1, 6),  # D
    st.integers(0, 8),  # r
    st.booleans(),  # class_token
    st.integers(0, 2**16),  # seed
)


@HYP
@given(shapes)
def test_properties(spec: tuple[int, int, int, int, bool, int]) -> None:
    bsz, n, d, r, cls, seed = spec
    x = _rand(bsz, n, d, seed=seed)
    r_eff = max(0, min(r, (n - int(cls)) // 2))
    merge, unmerge = bipartite_soft_matching(x, r, class_token=cls)
    with forced_backend("triton"):
        merged, size = merge_wavg(merge, x)
        source = merge_source(merge, x)
        const = merge_wavg(merge, torch.full((bsz, n, 3), 1.75))[0]
    assert merged.shape == (bsz, n - r_eff, d) and size.shape == (bsz, n - r_eff, 1)
    torch.testing.assert_close(size.sum(1), torch.full((bsz, 1), float(n)))
    assert unmerge(merged).shape == (bsz, n, d)
    torch.testing.assert_close(const, torch.full_like(const, 1.75))
    # source rows: one-hot bookkeeping, every original token in exactly one row, row sums = sizes
    assert source.shape == (bsz, n - r_eff, n)
    torch.testing.assert_close(source.sum(-1, keepdim=True), size)
    torch.testing.assert_close(source.sum(1), torch.ones(bsz, n))
    # merge_wavg of x with unit sizes = mean of the source groups
    torch.testing.assert_close(merged, (source @ x) / size, atol=1e-5, rtol=1e-5)
    # unmerge gives every original token its group's value
    torch.testing.assert_close(unmerge(merged), source.transpose(1, 2) @ merged, atol=1e-5, rtol=1e-5)
    if cls:
        assert torch.all(source[:, 0, 0] == 1) and torch.all(source[:, 0].sum(-1) == 1)
        torch.testing.assert_close(merged[:, 0], x[:, 0])


@HYP
@given(shapes, st.booleans(), st.sampled_from(["torch", "triton"]))
def test_matches_brute_force(spec: tuple[int, int, int, int, bool, int], distill: bool, backend: str) -> None:
    bsz, n, d, r, cls, seed = spec
    metric = _rand(bsz, n, 4, seed=seed)
    x = _rand(bsz, n, d, seed=seed + 1)
    merge, _ = bipartite_soft_matching(metric, r, class_token=cls, distill_token=distill)
    with forced_backend(backend):
        out = merge(x)
    torch.testing.assert_close(out, _brute_force(metric, x, r, cls, distill), atol=1e-5, rtol=1e-5)


@settings(max_examples=10, deadline=None)
@given(shapes, st.sampled_from([torch.float16, torch.bfloat16]))
def test_wavg_sizes_low_precision(spec: tuple[int, int, int, int, bool, int], dtype: torch.dtype) -> None:
    bsz, n, d, r, cls, seed = spec
    x = _rand(bsz, n, d, seed=seed, dtype=dtype)
    merge, _ = bipartite_soft_matching(x, r, class_token=cls)
    with forced_backend("triton"):
        merged, size = merge_wavg(merge, x)
        _, size_ref = merge_wavg(merge, x.float())
    assert merged.dtype == dtype and size.dtype == dtype
    torch.testing.assert_close(size.float(), size_ref)
    assert float(size.float().sum()) == bsz * n


def test_triton_path_is_used(monkeypatch: pytest.MonkeyPatch) -> None:
    """Under ``MMEFF_KERNELS=triton`` the merge really launches the kernel, not the reference."""
    import mmeff.kernels.merge as mod

    def boom(*args: object, **kwargs: object) -> torch.Tensor:
        raise AssertionError("reference path used")

    monkeypatch.setattr(mod, "_merge_reference", boom)
    x = _rand(2, 9, 5, seed=6)
    merge, _ = bipartite_soft_matching(x, 3)
    with forced_backend("triton"):
        assert merge(x).shape == (2, 6, 5)
    with forced_backend("torch"), pytest.raises(AssertionError):
        merge(x)


# ------------------------------------------------------------------------------ protected prefix


def _brute_force_prefix(metric: torch.Tensor, x: torch.Tensor, r: int, prefix: int) -> torch.Tensor:
    """Independent prefix-protected ToMe (Python loops), mean-merged ``x``.

    Rows: the ``prefix`` tokens in order, then the unmerged A tokens, then the B tokens (both in order).
    """
    bsz, n, _ = metric.shape
    r = min(r, (n - prefix) // 2)
    outs = []
    for bi in range(bsz):
        if r <= 0:
            outs.append(x[bi])
            continue
        unit = [metric[bi, t].float() / metric[bi, t].float().norm() for t in range(n)]
        a_ids = [t for t in range(0, n, 2) if t >= prefix]
        b_ids = [t for t in range(1, n, 2) if t >= prefix]
        best = {}
        for ta in a_ids:
            cands = [(float(torch.dot(unit[ta], unit[tb])), tb) for tb in b_ids]
            best_s = max(c[0] for c in cands)
            best[ta] = next(c for c in cands if c[0] == best_s)
        merged = set(sorted(a_ids, key=lambda ta: (-best[ta][0], ta))[:r])
        out = [x[bi, t] for t in range(prefix)]
        out += [x[bi, ta] for ta in a_ids if ta not in merged]
        for tb in b_ids:
            group = [tb] + [ta for ta in merged if best[ta][1] == tb]
            out.append(torch.stack([x[bi, t].double() for t in group]).mean(0).to(x.dtype))
        outs.append(torch.stack(out))
    return torch.stack(outs)


PREFIXES = [0, 1, 2, 3, 5]


@pytest.mark.parametrize("prefix", PREFIXES)
@pytest.mark.parametrize("n,r", [(17, 7), (13, 100), (10, 3)])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_prefix_matches_brute_force(prefix: int, n: int, r: int, backend: str) -> None:
    bsz, d = 3, 6
    metric = _rand(bsz, n, 5, seed=10 + prefix)
    x = _rand(bsz, n, d, seed=20 + n)
    merge, unmerge = bipartite_soft_matching(metric, r, prefix=prefix)
    r_eff = min(r, (n - prefix) // 2)
    with forced_backend(backend):
        out = merge(x)
        source = merge_source(merge, x)
        merged, size = merge_wavg(merge, x)
    assert out.shape == (bsz, n - r_eff, d)
    torch.testing.assert_close(out, _brute_force_prefix(metric, x, r, prefix), atol=1e-5, rtol=1e-5)
    # protected tokens: first, in order, alone (never merged away, nothing merged into them)
    eye = torch.eye(n)[:prefix].expand(bsz, prefix, n)
    assert torch.equal(source[:, :prefix], eye)
    assert torch.equal(out[:, :prefix], x[:, :prefix])
    assert torch.equal(size[:, :prefix], torch.ones(bsz, prefix, 1))
    # bookkeeping: each original token in exactly one row; unmerge follows the same plan
    assert torch.equal(source.sum(1), torch.ones(bsz, n))
    torch.testing.assert_close(source.sum(-1, keepdim=True), size)
    back = unmerge(merged)
    assert back.shape == (bsz, n, d)
    torch.testing.assert_close(back, source.transpose(1, 2) @ merged, atol=1e-6, rtol=1e-6)
    assert torch.equal(back[:, :prefix], x[:, :prefix])
    torch.testing.assert_close(merge(back), merged, atol=1e-5, rtol=1e-5)  # merge(unmerge(y)) = y


@pytest.mark.parametrize("prefix", PREFIXES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mode", ["mean", "sum"])
def test_prefix_triton_matches_reference(prefix: int, dtype: torch.dtype, mode: str) -> None:
    metric = _rand(2, 19, 6, seed=30 + prefix, dtype=dtype)
    x = _rand(2, 19, 40, seed=31, dtype=dtype)
    merge, _ = bipartite_soft_matching(metric, 6, prefix=prefix)
    with forced_backend("torch"):
        ref = merge(x, mode=mode)
        ref32 = merge(x.float(), mode=mode)
    with forced_backend("triton"):
        out = merge(x, mode=mode)
    assert out.shape == (2, 13, 40) and out.dtype == dtype
    tol = {torch.float32: 1e-6, torch.float16: 2e-3, torch.bfloat16: 2e-2}[dtype]
    torch.testing.assert_close(out.float(), ref32, atol=tol, rtol=tol)
    torch.testing.assert_close(out.float(), ref.float(), atol=4 * tol, rtol=4 * tol)


def test_prefix_all_tokens_want_a_protected_destination() -> None:
    """Every token is a copy of protected token 1 (in B): it must still receive nothing."""
    x = _rand(2, 12, 4, seed=40)
    x[:, 2:] = x[:, 1:2] + 1e-3 * _rand(2, 10, 4, seed=41)
    for backend in ("torch", "triton"):
        merge, _ = bipartite_soft_matching(x, 5, prefix=3)
        with forced_backend(backend):
            src = merge_source(merge, x)
        assert src.shape == (2, 12 - 4, 12)
        assert torch.equal(src[:, :3], torch.eye(12)[:3].expand(2, 3, 12))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_prefix_one_equals_class_token(backend: str) -> None:
    for seed, (n, r) in enumerate([(11, 3), (16, 7), (9, 9), (5, 1)]):
        metric = _rand(3, n, 4, seed=50 + seed)
        x = _rand(3, n, 7, seed=60 + seed)
        m_p, u_p = bipartite_soft_matching(metric, r, prefix=1)
        m_c, u_c = bipartite_soft_matching(metric, r, class_token=True)
        with forced_backend(backend):
            out = m_p(x)
            assert torch.equal(out, m_c(x))
            assert torch.equal(m_p(x, mode="sum"), m_c(x, mode="sum"))
        assert torch.equal(u_p(out), u_c(out))


def test_prefix_errors_and_identity() -> None:
    x = _rand(2, 8, 3, seed=70)
    with pytest.raises(ValueError):
        bipartite_soft_matching(x, 2, prefix=-1)
    merge, unmerge = bipartite_soft_matching(x, 3, prefix=7)  # (8 - 7) // 2 = 0: nothing to merge
    assert merge(x) is x and unmerge(x) is x
    merge, _ = bipartite_soft_matching(x, 3, prefix=6)  # clamped to 1
    assert merge(x).shape == (2, 7, 3)


@settings(max_examples=12, deadline=None)
@given(shapes, st.integers(0, 6), st.sampled_from(["torch", "triton"]))
def test_prefix_properties(spec: tuple[int, int, int, int, bool, int], prefix: int, backend: str) -> None:
    bsz, n, d, r, _, seed = spec
    metric = _rand(bsz, n, 4, seed=seed)
    x = _rand(bsz, n, d, seed=seed + 1)
    merge, unmerge = bipartite_soft_matching(metric, r, prefix=prefix)
    with forced_backend(backend):
        out = merge(x)
        source = merge_source(merge, x)
    torch.testing.assert_close(out, _brute_force_prefix(metric, x, r, prefix), atol=1e-5, rtol=1e-5)
    p = min(prefix, n)
    assert torch.equal(source[:, :p], torch.eye(n)[:p].expand(bsz, p, n))
    assert torch.equal(source.sum(1), torch.ones(bsz, n))
    torch.testing.assert_close(unmerge(out), source.transpose(1, 2) @ out, atol=1e-6, rtol=1e-6)
