"""Tests for mmeff.kernels.quant: Kronecker transform, int4 quantisation/packing and their Triton kernels."""

from __future__ import annotations

import math

import pytest
import torch

from mmeff.kernels.quant import (
    int4_matmul,
    kron_factors,
    kron_transform,
    kron_transform_quant,
    pack_int4,
    quantize_sym_per_token_ref,
    unpack_int4,
)


@pytest.fixture(scope="module", autouse=True)
def _triton_interpreter():
    """Run Triton kernels in the CPU interpreter for this module only (kernels are jit-wrapped lazily)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRITON_INTERPRET", "1")
        yield


@pytest.fixture
def triton_mode(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("MMEFF_KERNELS", "triton")


def _rand(*shape: int, dtype: torch.dtype = torch.float32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)


def _randint(lo: int, hi: int, *shape: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(lo, hi, shape, generator=g)


def _signed_perm(n: int, seed: int) -> torch.Tensor:
    """A random signed permutation matrix: the transform stays exact in any summation order."""
    g = torch.Generator().manual_seed(seed)
    p = torch.eye(n)[torch.randperm(n, generator=g)]
    signs = torch.randint(0, 2, (n, 1), generator=g).float() * 2 - 1
    return p * signs


def _reference(monkeypatch: pytest.MonkeyPatch, fn, *args, **kwargs):
    """Call ``fn`` on the PyTorch path, then switch back to the Triton one."""
    monkeypatch.setenv("MMEFF_KERNELS", "torch")
    try:
        return fn(*args, **kwargs)
    finally:
        monkeypatch.setenv("MMEFF_KERNELS", "triton")


# ------------------------------------------------------------------------------------------ factors


@pytest.mark.parametrize(
    "d,expected",
    [
        (4096, (64, 64)),
        (11008, (86, 128)),
        (5120, (64, 80)),
        (576, (24, 24)),
        (1536, (32, 48)),
        (18944, (128, 148)),
        (8960, (80, 112)),
        (3584, (56, 64)),
        (14336, (112, 128)),
        (1, (1, 1)),
        (13, (1, 13)),
    ],
)
def test_kron_factors(d: int, expected: tuple[int, int]) -> None:
    n1, n2 = kron_factors(d)
    assert (n1, n2) == expected
    assert n1 * n2 == d and n1 <= n2


def _official_decompose(n: int) -> tuple[int, int]:
    # ruikangliu/FlatQuant's get_decompose_dim, transcribed (it loops forever when n % 4 == 2)
    a = int(math.sqrt(n))
    if a * a < n:
        a += 1
    while True:
        tmp = a * a - n
        b = int(math.sqrt(tmp))
        if b * b == tmp:
            return a - b, a + b
        a += 1


def test_kron_factors_equal_the_official_split() -> None:
    # every size the official loop terminates on, including those where the most nearly square pair has
    # mixed parity (12: official (2, 6), not (3, 4)); the real widths of the spec's models too
    sizes = [d for d in range(1, 3000) if d % 4 != 2] + [4096, 11008, 14336, 5120, 13824, 3584, 18944, 8960, 29568, 4864]
    diffs = 0
    for d in sizes:
        assert kron_factors(d) == _official_decompose(d), d
        diffs += kron_factors(d) != next((k, d // k) for k in range(math.isqrt(d), 0, -1) if d % k == 0)
    assert diffs > 100  # the rule really differs from "largest divisor <= sqrt(d)"


@pytest.mark.parametrize("d, expected", [(6, (2, 3)), (18, (3, 6)), (150, (10, 15))])
def test_kron_factors_without_an_official_split(d: int, expected: tuple[int, int]) -> None:
    assert kron_factors(d) == expected  # d % 4 == 2: the most nearly square pair


@pytest.mark.parametrize("bad", [0, -4, 4.0, True, "16"])
def test_kron_factors_bad(bad) -> None:
    with pytest.raises(ValueError):
        kron_factors(bad)


# ------------------------------------------------------------------------------------------ transform


@pytest.mark.parametrize("n1,n2", [(4, 6), (5, 6), (3, 5), (8, 8)])
def test_kron_transform_equals_kron_matmul(n1: int, n2: int) -> None:
    x = _rand(2, 3, n1 * n2, dtype=torch.float64, seed=1)
    p1, p2 = _rand(n1, n1, dtype=torch.float64, seed=2), _rand(n2, n2, dtype=torch.float64, seed=3)
    torch.testing.assert_close(kron_transform(x, p1, p2), x @ torch.kron(p1, p2), atol=1e-12, rtol=1e-12)
    assert kron_transform(x[0, 0], p1, p2).shape == (n1 * n2,)


def test_kron_transform_dtype_and_grad() -> None:
    x = _rand(4, 24, dtype=torch.float16, seed=4)
    p1, p2 = _rand(4, 4, seed=5), _rand(6, 6, seed=6)
    y = kron_transform(x, p1, p2)
    assert y.dtype == torch.float16
    ref = x.double() @ torch.kron(p1.half().double(), p2.half().double())
    torch.testing.assert_close(y.double(), ref, atol=5e-2, rtol=1e-2)
    xg = _rand(2, 24, seed=7).requires_grad_()
    kron_transform(xg, p1, p2).sum().backward()
    torch.testing.assert_close(xg.grad, torch.kron(p1, p2).sum(1).expand(2, 24))


def test_kron_transform_bad_shapes() -> None:
    x = torch.zeros(2, 24)
    with pytest.raises(ValueError):
        kron_transform(x, torch.zeros(4, 4), torch.zeros(5, 5))
    with pytest.raises(ValueError):
        kron_transform(x, torch.zeros(4, 6), torch.zeros(6, 6))
    with pytest.raises(TypeError):
        kron_transform(x.long(), torch.zeros(4, 4), torch.zeros(6, 6))


# ------------------------------------------------------------------------------------------ quantise / pack


def test_pack_unpack_roundtrip_all_bytes() -> None:
    every_byte = torch.arange(256, dtype=torch.uint8)
    codes = unpack_int4(every_byte)
    assert codes.dtype == torch.int8 and codes.shape == (512,)
    assert int(codes.min()) == -8 and int(codes.max()) == 7
    assert torch.equal(pack_int4(codes), every_byte)
    # every (low, high) pair of codes survives, in the documented nibble order
    lo, hi = torch.meshgrid(torch.arange(-8, 8), torch.arange(-8, 8), indexing="ij")
    pairs = torch.stack((lo.reshape(-1), hi.reshape(-1)), dim=-1).to(torch.int8)
    packed = pack_int4(pairs)
    assert packed.shape == (256, 1)
    assert torch.equal(unpack_int4(packed), pairs)
    assert torch.equal(packed[:, 0].long(), (lo.reshape(-1) & 15) + 16 * (hi.reshape(-1) & 15))


def test_pack_layout_and_batch() -> None:
    q = torch.tensor([[1, -1, -8, 7], [0, 3, -2, -3]], dtype=torch.int8)
    assert pack_int4(q).tolist() == [[0xF1, 0x78], [0x30, 0xDE]]
    q3 = _randint(-8, 8, 2, 3, 10, seed=8).to(torch.int8)
    assert torch.equal(unpack_int4(pack_int4(q3)), q3)


def test_pack_bad_inputs() -> None:
    with pytest.raises(ValueError):
        pack_int4(torch.zeros(3, 5, dtype=torch.int8))
    with pytest.raises(TypeError):
        pack_int4(torch.zeros(4, dtype=torch.int32))
    with pytest.raises(TypeError):
        unpack_int4(torch.zeros(4, dtype=torch.int8))


def test_quantize_ref_range_and_error() -> None:
    y = _rand(3, 5, 64, seed=9) * 4
    for bits in (4, 8):
        q, scale = quantize_sym_per_token_ref(y, bits=bits)
        qmax = 2 ** (bits - 1) - 1
        assert q.dtype == torch.int8 and q.shape == y.shape
        assert scale.dtype == torch.float32 and scale.shape == (3, 5, 1)
        assert int(q.min()) >= -qmax - 1 and int(q.max()) <= qmax
        torch.testing.assert_close(scale, y.abs().amax(-1, keepdim=True) / qmax)
        assert ((q.float() * scale - y).abs() <= scale / 2 + 1e-6).all()
    # clipping saturates the largest entries at the extreme codes
    q, scale = quantize_sym_per_token_ref(y, clip_ratio=0.5)
    torch.testing.assert_close(scale, 0.5 * y.abs().amax(-1, keepdim=True) / 7)
    assert int(q.max()) == 7 and int(q.min()) == -8
    q_t, scale_t = quantize_sym_per_token_ref(y, clip_ratio=torch.tensor(0.5))
    assert torch.equal(q_t, q) and torch.equal(scale_t, scale)


def test_quantize_ref_zero_token_and_ties() -> None:
    q, scale = quantize_sym_per_token_ref(torch.zeros(2, 8))
    assert torch.equal(q, torch.zeros(2, 8, dtype=torch.int8))
    assert torch.all(scale == torch.tensor(1e-8, dtype=torch.float32))
    # amax 14 -> scale exactly 2, so odd entries sit on .5 ties: half to even
    y = torch.tensor([[1.0, 3.0, 5.0, -1.0, -3.0, -5.0, 7.0, 14.0]])
    q, scale = quantize_sym_per_token_ref(y)
    assert scale.item() == 2.0
    assert q.tolist() == [[0, 2, 2, 0, -2, -2, 4, 7]]


# ------------------------------------------------------------------------------------------ fused op


def test_kron_transform_quant_reference_path() -> None:
    x = _rand(2, 3, 24, dtype=torch.float16, seed=10)
    p1, p2 = _rand(4, 4, seed=11), _rand(6, 6, seed=12)
    q, scale = kron_transform_quant(x, p1, p2, clip_ratio=0.9)
    q_ref, s_ref = quantize_sym_per_token_ref(x.float() @ torch.kron(p1, p2), clip_ratio=0.9)
    assert q.shape == (2, 3, 12) and q.dtype == torch.uint8 and scale.shape == (2, 3, 1)
    torch.testing.assert_close(scale, s_ref, rtol=1e-6, atol=0)
    assert (unpack_int4(q).int() - q_ref.int()).abs().max() <= 1  # fp32 summation order only
    q8, _ = kron_transform_quant(x, p1, p2, bits=8)
    assert q8.dtype == torch.int8 and q8.shape == (2, 3, 24)
    q4, _ = kron_transform_quant(x, p1, p2, clip_ratio=0.9, pack=False)
    assert torch.equal(pack_int4(q4), q)


def test_kron_transform_quant_bad_inputs() -> None:
    x = torch.zeros(2, 15)
    with pytest.raises(ValueError, match="even n2"):
        kron_transform_quant(x, torch.eye(3), torch.eye(5))
    q, _ = kron_transform_quant(x, torch.eye(3), torch.eye(5), pack=False)  # unpacked is fine
    assert q.shape == (2, 15)
    with pytest.raises(ValueError):
        kron_transform_quant(torch.zeros(2, 24), torch.eye(4), torch.eye(8))
    with pytest.raises(ValueError):
        kron_transform_quant(torch.zeros(2, 24), torch.eye(4), torch.eye(6), bits=9)
    with pytest.raises(ValueError):
        kron_transform_quant(torch.zeros(2, 24), torch.eye(4), torch.eye(6), clip_ratio=torch.ones(2))


# (n1, n2): power-of-2, square non-power-of-2, rectangular, tiny odd n1, padded n1 < 16 < n2
KRON_CASES = [(4, 8), (24, 24), (32, 48), (5, 6), (3, 20)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n1,n2", KRON_CASES)
def test_triton_kron_quant_matches_reference(
    triton_mode: None, monkeypatch: pytest.MonkeyPatch, n1: int, n2: int, dtype: torch.dtype
) -> None:
    x = (_rand(2, 3, n1 * n2, seed=13) * 3).to(dtype)
    p1, p2 = _rand(n1, n1, seed=14), _rand(n2, n2, seed=15)
    q, scale = kron_transform_quant(x, p1, p2, clip_ratio=0.85)
    q_ref, s_ref = _reference(monkeypatch, kron_transform_quant, x, p1, p2, clip_ratio=0.85)
    assert q.dtype == torch.uint8 and q.shape == (2, 3, n1 * n2 // 2)
    assert scale.dtype == torch.float32 and scale.shape == (2, 3, 1)
    torch.testing.assert_close(scale, s_ref, rtol=1e-6, atol=0)
    # the transform's fp32 sums may be ordered differently, which could move a code across a .5 tie
    diff = (unpack_int4(q).int() - unpack_int4(q_ref).int()).abs()
    assert int(diff.max()) <= 1 and int((diff > 0).sum()) <= max(1, diff.numel() // 1000)


@pytest.mark.parametrize("n1,n2", [(24, 24), (5, 6), (3, 20)])
def test_triton_kron_quant_exact_with_ties(
    triton_mode: None, monkeypatch: pytest.MonkeyPatch, n1: int, n2: int
) -> None:
    """Signed permutations and integer inputs make every sum exact; amax 14 puts odd values on .5 ties."""
    x = _randint(-13, 14, 2, n1 * n2, seed=16).float()
    x[:, 0] = 14.0
    p1, p2 = _signed_perm(n1, 17), _signed_perm(n2, 18)
    q, scale = kron_transform_quant(x, p1, p2)
    q_ref, s_ref = _reference(monkeypatch, kron_transform_quant, x, p1, p2)
    assert torch.all(scale == 2.0) and torch.equal(scale, s_ref)
    assert torch.equal(q, q_ref)
    y = x @ torch.kron(p1, p2)
    assert torch.equal(unpack_int4(q), torch.round(y / 2).to(torch.int8))  # half to even, as torch.round


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_triton_kron_quant_tensor_clip_bits8_unpacked(
    triton_mode: None, monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype
) -> None:
    x = (_rand(3, 32 * 48, seed=19) * 5).to(dtype)
    p1, p2 = _rand(32, 32, seed=20), _rand(48, 48, seed=21)
    clip = torch.tensor(0.7)
    for kwargs in ({"bits": 8}, {"pack": False}, {"bits": 3}):
        q, scale = kron_transform_quant(x, p1, p2, clip_ratio=clip, **kwargs)
        q_ref, s_ref = _reference(monkeypatch, kron_transform_quant, x, p1, p2, clip_ratio=clip, **kwargs)
        assert q.dtype == torch.int8 and q.shape == x.shape
        torch.testing.assert_close(scale, s_ref, rtol=1e-6, atol=0)
        diff = (q.int() - q_ref.int()).abs()
        assert int(diff.max()) <= 1 and int((diff > 0).sum()) <= max(1, diff.numel() // 1000)
    # a python float and a 0-d tensor take different kernel arguments but must give the same result
    q_f, s_f = kron_transform_quant(x, p1, p2, clip_ratio=0.7)
    q_t, s_t = kron_transform_quant(x, p1, p2, clip_ratio=clip)
    assert torch.equal(q_f, q_t) and torch.equal(s_f, s_t)


def test_triton_kron_quant_odd_n2_unpacked_and_zero_token(
    triton_mode: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    x = _rand(4, 15, seed=22)
    x[1] = 0.0
    p1, p2 = _rand(3, 3, seed=23), _rand(5, 5, seed=24)
    q, scale = kron_transform_quant(x, p1, p2, pack=False)
    q_ref, s_ref = _reference(monkeypatch, kron_transform_quant, x, p1, p2, pack=False)
    assert torch.equal(q, q_ref)
    torch.testing.assert_close(scale, s_ref, rtol=1e-6, atol=0)
    assert torch.all(q[1] == 0) and scale[1].item() == pytest.approx(1e-8)


def test_triton_kron_quant_non_contiguous(triton_mode: None, monkeypatch: pytest.MonkeyPatch) -> None:
    base = _rand(6, 2 * 24, seed=25)
    x = base[:, ::2]
    p1, p2 = _signed_perm(4, 26), _rand(6, 6, seed=27)
    q, scale = kron_transform_quant(x, p1, p2)
    q_ref, s_ref = _reference(monkeypatch, kron_transform_quant, x.contiguous(), p1, p2)
    assert torch.equal(q, q_ref)
    torch.testing.assert_close(scale, s_ref, rtol=1e-6, atol=0)


# ------------------------------------------------------------------------------------------ int4 GEMM


def _quantize_packed(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    q, s = quantize_sym_per_token_ref(t)
    return pack_int4(q), s


def test_int4_matmul_reference_exact() -> None:
    m, n, k = 6, 5, 40
    x, w = _rand(m, k, seed=28), _rand(n, k, seed=29)
    xq, xs = _quantize_packed(x)
    wq, ws = _quantize_packed(w)
    out = int4_matmul(xq, xs, wq, ws)
    acc = unpack_int4(xq).long() @ unpack_int4(wq).long().T
    assert out.dtype == torch.float32 and out.shape == (m, n)
    assert torch.equal(out, (acc.float() * xs) * ws.T)
    deq = (unpack_int4(xq).double() * xs.double()) @ (unpack_int4(wq).double() * ws.double()).T
    torch.testing.assert_close(out.double(), deq, rtol=1e-5, atol=1e-5)
    # per-channel 4-bit quantisation still tracks the float product
    err = (out - x @ w.T).norm() / (x @ w.T).norm()
    assert err < 0.25
    assert int4_matmul(xq, xs, wq, ws, out_dtype=torch.bfloat16).dtype == torch.bfloat16


def test_int4_matmul_bad_inputs() -> None:
    xq, xs = torch.zeros(3, 8, dtype=torch.uint8), torch.ones(3, 1)
    wq, ws = torch.zeros(4, 8, dtype=torch.uint8), torch.ones(4, 1)
    with pytest.raises(ValueError):
        int4_matmul(xq, xs, torch.zeros(4, 6, dtype=torch.uint8), ws)
    with pytest.raises(ValueError):
        int4_matmul(xq, torch.ones(4, 1), wq, ws)
    with pytest.raises(ValueError):
        int4_matmul(xq, xs, wq, torch.ones(4, 2))
    with pytest.raises(TypeError):
        int4_matmul(xq.to(torch.int8), xs, wq, ws)
    assert int4_matmul(xq, xs.reshape(3), wq, ws.reshape(4)).shape == (3, 4)


# ragged M/N/K: one masked tile; a partial K step; two M tiles and two K steps (64 bytes each); K = 2
@pytest.mark.parametrize("m,n,k", [(5, 7, 64), (33, 20, 96), (70, 40, 160), (1, 16, 2)])
def test_triton_int4_matmul_exact(
    triton_mode: None, monkeypatch: pytest.MonkeyPatch, m: int, n: int, k: int
) -> None:
    xq = _randint(0, 256, m, k // 2, seed=30).to(torch.uint8)
    wq = _randint(0, 256, n, k // 2, seed=31).to(torch.uint8)
    xs = _rand(m, 1, seed=32).abs() + 0.01
    ws = _rand(n, 1, seed=33).abs() + 0.01
    out = int4_matmul(xq, xs, wq, ws)
    ref = _reference(monkeypatch, int4_matmul, xq, xs, wq, ws)
    assert out.shape == (m, n) and out.dtype == torch.float32
    assert torch.equal(out, ref)
    deq = (unpack_int4(xq).double() * xs.double()) @ (unpack_int4(wq).double() * ws.double()).T
    torch.testing.assert_close(out.double(), deq, rtol=1e-5, atol=1e-5)
    out16 = int4_matmul(xq, xs, wq, ws, out_dtype=torch.float16)
    assert out16.dtype == torch.float16 and torch.equal(out16, ref.half())


def test_triton_end_to_end_w4a4(triton_mode: None) -> None:
    """FlatQuant identity: (x P)(W P⁻ᵀ)ᵀ = x Wᵀ, with both sides quantised to int4."""
    n1, n2, n = 4, 8, 24
    x, w = _rand(10, n1 * n2, seed=34), _rand(n, n1 * n2, seed=35)
    p1 = torch.linalg.qr(_rand(n1, n1, seed=36))[0] + 0.1 * torch.eye(n1)
    p2 = torch.linalg.qr(_rand(n2, n2, seed=37))[0] + 0.1 * torch.eye(n2)
    xq, xs = kron_transform_quant(x, p1, p2)
    wq, ws = _quantize_packed(kron_transform(w, torch.linalg.inv(p1).T, torch.linalg.inv(p2).T))
    out = int4_matmul(xq, xs, wq, ws)
    exact = x @ w.T
    assert (out - exact).norm() / exact.norm() < 0.25
