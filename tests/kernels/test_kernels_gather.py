"""Triton row-gather kernel vs its PyTorch reference, and the one-call top-k ``prune``.

The Triton path runs on CPU under ``TRITON_INTERPRET=1``. ``kernels/gather.py`` wraps its kernel with
``triton.jit`` lazily on first launch (``triton.jit`` reads ``TRITON_INTERPRET`` when it wraps), so setting
the variable with ``monkeypatch.setenv`` inside a test is enough; nothing has to be set before import.
"""

from __future__ import annotations

import pytest
import torch

import mmeff.kernels.gather as G
from mmeff.kernels import gather_tokens, gather_tokens_ref, prune, topk_indices_sorted

pytest.importorskip("triton")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.fixture
def triton_mode(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("MMEFF_KERNELS", "triton")


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32])
@pytest.mark.parametrize(
    "b,n,m,d",
    [(1, 1, 1, 1), (2, 7, 3, 3), (3, 5, 5, 77), (2, 9, 1, 130), (1, 4, 11, 2)],  # m > n: repeats
)
def test_triton_matches_reference(triton_mode, b, n, m, d, dtype, index_dtype):
    x = torch.randn(b, n, d, generator=_gen()).to(dtype)
    idx = torch.randint(0, n, (b, m), generator=_gen(1)).to(index_dtype)
    out = gather_tokens(x, idx)
    assert out.shape == (b, m, d) and out.dtype == dtype and out.is_contiguous()
    assert torch.equal(out, gather_tokens_ref(x, idx))
    assert torch.equal(out, x[torch.arange(b)[:, None], idx.long()])


@pytest.mark.parametrize("dtype", DTYPES)
def test_triton_non_contiguous_inputs(triton_mode, dtype):
    base = torch.randn(2, 77, 13, generator=_gen()).to(dtype)
    x = base.transpose(1, 2)  # (2, 13, 77) with stride_d = 13
    assert not x.is_contiguous()
    idx = torch.randint(0, 13, (2, 10), generator=_gen(1))[:, ::2]  # non-contiguous indices too
    assert torch.equal(gather_tokens(x, idx), gather_tokens_ref(x.contiguous(), idx.contiguous()))
    # a strided batch/row view
    y = torch.randn(4, 9, 6, generator=_gen(2)).to(dtype)[::2, 1:]
    idx2 = torch.tensor([[7, 0, 3], [1, 1, 5]])
    assert torch.equal(gather_tokens(y, idx2), gather_tokens_ref(y, idx2))


def test_triton_integer_side_tensors_and_empty(triton_mode):
    pos = torch.arange(30).view(3, 10, 1) * 1000003  # int64 values that fp32 could not hold
    idx = torch.tensor([[9, 0], [4, 4], [1, 8]], dtype=torch.int32)
    assert torch.equal(gather_tokens(pos, idx), gather_tokens_ref(pos, idx))
    empty = gather_tokens(torch.randn(2, 5, 3), torch.empty(2, 0, dtype=torch.long))
    assert empty.shape == (2, 0, 3)


def test_triton_path_is_differentiable(triton_mode):
    x = torch.randn(2, 6, 5, generator=_gen(), requires_grad=True)
    idx = torch.tensor([[0, 0, 3], [5, 1, 2]])
    w = torch.randn(2, 3, 5, generator=_gen(1))
    (gather_tokens(x, idx) * w).sum().backward()
    g_triton, x.grad = x.grad.clone(), None
    (gather_tokens_ref(x, idx) * w).sum().backward()
    assert torch.allclose(g_triton, x.grad)


def test_cpu_auto_uses_reference(monkeypatch):
    monkeypatch.delenv("MMEFF_KERNELS", raising=False)

    def boom(*a, **k):
        raise AssertionError("Triton path must not run for CPU tensors in auto mode")

    monkeypatch.setattr(G, "_gather_triton", boom)
    x = torch.randn(2, 5, 3)
    idx = torch.tensor([[4, 0], [2, 2]])
    assert torch.equal(gather_tokens(x, idx), x[torch.arange(2)[:, None], idx])


@pytest.mark.parametrize("mode", ["triton", "torch"])
@pytest.mark.parametrize("b,n,k,d", [(1, 1, 1, 3), (2, 7, 3, 77), (3, 5, 5, 130), (2, 9, 1, 1)])
def test_prune_keeps_order_and_matches_reference(monkeypatch, mode, b, n, k, d):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("MMEFF_KERNELS", mode)
    x = torch.randn(b, n, d, generator=_gen())
    scores = torch.rand(b, n, generator=_gen(1))
    pos = torch.arange(n).expand(b, n).clone()
    sizes = torch.rand(b, n, 2, generator=_gen(2)).half()
    x_kept, idx, pos_kept, sizes_kept = prune(x, scores, k, pos, sizes)
    assert idx.shape == (b, k) and idx.dtype == torch.long
    assert (idx.diff(dim=1) > 0).all()  # ascending: original token order is kept
    assert torch.equal(idx, topk_indices_sorted(scores, k))
    # the kept tokens are exactly the k best
    kth = scores.topk(k, dim=1).values[:, -1:]
    assert (scores.gather(1, idx) >= kth).all()
    assert torch.equal(x_kept, gather_tokens_ref(x, idx))
    assert torch.equal(pos_kept, idx)  # position ids follow the kept tokens
    assert pos_kept.shape == (b, k) and sizes_kept.shape == (b, k, 2)
    assert torch.equal(sizes_kept, gather_tokens_ref(sizes, idx))
    if k == n:
        assert torch.equal(x_kept, x)


def test_prune_ties_prefer_lower_index_and_no_side(triton_mode):
    x = torch.arange(6.0).view(1, 6, 1)
    scores = torch.tensor([[1.0, 2.0, 2.0, 0.0, 2.0, 2.0]])
    out = prune(x, scores, 3)
    assert len(out) == 2
    x_kept, idx = out
    assert idx.tolist() == [[1, 2, 4]]
    assert x_kept.flatten().tolist() == [1.0, 2.0, 4.0]


def test_gather_bad_inputs_raise():
    x = torch.randn(2, 5, 3)
    idx = torch.tensor([[0, 1], [2, 3]])
    with pytest.raises(TypeError, match="int64 or int32"):
        gather_tokens(x, idx.float())
    with pytest.raises(TypeError, match="int64 or int32"):
        gather_tokens(x, idx.to(torch.int16))
    with pytest.raises(TypeError, match="must be tensors"):
        gather_tokens(x, [[0, 1], [2, 3]])
    with pytest.raises(ValueError, match=r"\(B, N, D\)"):
        gather_tokens(x[0], idx)
    with pytest.raises(ValueError, match=r"\(B, M\)"):
        gather_tokens(x, idx[0])
    with pytest.raises(ValueError, match=r"\(B, M\)"):
        gather_tokens(x, idx[:1])  # batch mismatch
    with pytest.raises(ValueError, match="same device"):
        gather_tokens(x, idx.to("meta"))
    with pytest.raises(TypeError, match="int64 or int32"):
        gather_tokens_ref(x, idx.float())


def test_triton_out_of_range_indices_raise(triton_mode):
    x = torch.randn(2, 5, 3)
    with pytest.raises(IndexError, match=r"\[0, 5\)"):
        gather_tokens(x, torch.tensor([[0, 5], [1, 2]]))
    with pytest.raises(IndexError, match=r"\[0, 5\)"):
        gather_tokens(x, torch.tensor([[0, -1], [1, 2]]))


def test_prune_bad_inputs_raise():
    x = torch.randn(2, 5, 3)
    scores = torch.rand(2, 5)
    with pytest.raises(ValueError, match=r"\(B, N, D\)"):
        prune(x[0], scores, 2)
    with pytest.raises(ValueError, match="scores must have shape"):
        prune(x, scores[:, :4], 2)
    with pytest.raises(ValueError, match="k must be in"):
        prune(x, scores, 0)
    with pytest.raises(ValueError, match="k must be in"):
        prune(x, scores, 6)
    with pytest.raises(ValueError, match="side tensor 0"):
        prune(x, scores, 2, torch.zeros(2, 4))
    with pytest.raises(ValueError, match="side tensor 1"):
        prune(x, scores, 2, torch.zeros(2, 5), torch.zeros(2, 5, 1, 1))


def test_bogus_kernel_mode_raises(monkeypatch):
    monkeypatch.setenv("MMEFF_KERNELS", "bogus")
    x = torch.randn(1, 3, 2)
    idx = torch.tensor([[0, 2]])
    with pytest.raises(ValueError, match="MMEFF_KERNELS"):
        gather_tokens(x, idx)
    with pytest.raises(ValueError, match="MMEFF_KERNELS"):
        prune(x, torch.rand(1, 3), 2)
