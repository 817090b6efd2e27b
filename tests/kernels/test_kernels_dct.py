"""Tests for mmeff.kernels.dct: 2-D DCT-II/III, the Fourier-VLM low-pass and its Triton kernel."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.fft as sfft
import torch

from mmeff.kernels.dct import dct2, dct_lowpass, dct_matrix, idct2, lowpass_matrix


@pytest.fixture(scope="module", autouse=True)
def _triton_interpreter():
    """Run Triton kernels in the CPU interpreter for this module only (kernels are jit-wrapped lazily)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRITON_INTERPRET", "1")
        yield


GRIDS = [(5, 7), (24, 24), (1, 6), (6, 1), (3, 2), (9, 16)]


def _rand(*shape: int, dtype: torch.dtype = torch.float64, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)


def _three_step(x: torch.Tensor, out_hw: tuple[int, int], rescale: bool = False) -> torch.Tensor:
    """The literal Fourier-VLM recipe: DCT over H×W, keep the corner, IDCT of size h'×w'."""
    ho, wo = out_hw
    y = dct2(x, method="matrix")[:, :ho, :wo, :]
    out = idct2(y.contiguous(), method="matrix")
    if rescale:
        out = out * ((ho * wo) / (x.shape[1] * x.shape[2])) ** 0.5
    return out


# ------------------------------------------------------------------------------------------ DCT basics


def test_dct_matrix_orthonormal_and_cached() -> None:
    for n in (1, 2, 5, 24):
        c = dct_matrix(n, dtype=torch.float64)
        assert c.shape == (n, n)
        torch.testing.assert_close(c @ c.T, torch.eye(n, dtype=torch.float64), atol=1e-12, rtol=0)
        np.testing.assert_allclose(c.numpy(), sfft.dct(np.eye(n), norm="ortho", axis=0), atol=1e-12)
    assert dct_matrix(7) is dct_matrix(7)
    assert dct_matrix(7).dtype == torch.float32
    assert dct_matrix(7, dtype=torch.float16).dtype == torch.float16


@pytest.mark.parametrize("hw", GRIDS)
@pytest.mark.parametrize("method", ["matrix", "fft", "auto"])
def test_dct2_idct2_match_scipy(hw: tuple[int, int], method: str) -> None:
    x = _rand(2, *hw, 3)
    ref = sfft.dctn(x.numpy(), norm="ortho", axes=(1, 2))
    np.testing.assert_allclose(dct2(x, method=method).numpy(), ref, atol=1e-10)
    ref_inv = sfft.idctn(x.numpy(), norm="ortho", axes=(1, 2))
    np.testing.assert_allclose(idct2(x, method=method).numpy(), ref_inv, atol=1e-10)


@pytest.mark.parametrize("hw", GRIDS + [(65, 3), (70, 70)])
def test_matrix_equals_fft_and_roundtrip(hw: tuple[int, int]) -> None:
    x = _rand(2, *hw, 4, dtype=torch.float32, seed=1)
    y_m, y_f = dct2(x, method="matrix"), dct2(x, method="fft")
    torch.testing.assert_close(y_m, y_f, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(idct2(y_m, method="matrix"), idct2(y_m, method="fft"), atol=1e-4, rtol=1e-4)
    for method in ("matrix", "fft", "auto"):
        torch.testing.assert_close(idct2(dct2(x, method=method), method=method), x, atol=1e-4, rtol=1e-4)


def test_dtype_preserved_and_fp32_compute() -> None:
    """Half inputs are transformed in fp32: the result is the fp64 answer up to one output rounding."""
    x = _rand(1, 8, 8, 16, dtype=torch.float64)
    for dt, tol in ((torch.float16, 1e-3), (torch.bfloat16, 8e-3), (torch.float32, 1e-5)):
        xd = x.to(dt)
        for fn in (dct2, idct2):
            out = fn(xd)
            assert out.dtype == dt
            ref = fn(xd.double())
            torch.testing.assert_close(out.double(), ref, atol=tol, rtol=tol)
        out = dct_lowpass(xd, (4, 4))
        assert out.dtype == dt
        torch.testing.assert_close(out.double(), dct_lowpass(xd.double(), (4, 4)), atol=tol, rtol=tol)


# ------------------------------------------------------------------------------------------ low-pass


@pytest.mark.parametrize(
    "shape,out_hw",
    [((2, 24, 24, 8), (12, 12)), ((1, 5, 7, 3), (2, 5)), ((3, 1, 6, 4), (1, 4)), ((1, 9, 16, 5), (6, 10))],
)
@pytest.mark.parametrize("rescale", [False, True])
def test_fused_equals_three_step(shape: tuple[int, ...], out_hw: tuple[int, int], rescale: bool) -> None:
    x = _rand(*shape, seed=2)
    fused = dct_lowpass(x, out_hw, rescale=rescale)
    assert fused.shape == (shape[0], *out_hw, shape[3])
    torch.testing.assert_close(fused, _three_step(x, out_hw, rescale), atol=1e-10, rtol=1e-10)
    # and against scipy for the literal recipe
    ho, wo = out_hw
    kept = sfft.dctn(x.numpy(), norm="ortho", axes=(1, 2))[:, :ho, :wo]
    ref = sfft.idctn(kept, norm="ortho", axes=(1, 2))
    if rescale:
        ref = ref * np.sqrt(ho * wo / (shape[1] * shape[2]))
    np.testing.assert_allclose(fused.numpy(), ref, atol=1e-10)


def test_lowpass_matrix_identity() -> None:
    """A_h = C_{h'}ᵀ C_H[:h'] reproduces the three-step recipe on a basis, so fused == three-step exactly."""
    n, m = 11, 4
    a = lowpass_matrix(n, m, dtype=torch.float64)
    eye = torch.eye(n, dtype=torch.float64)
    three = dct_matrix(m, dtype=torch.float64).T @ (dct_matrix(n, dtype=torch.float64) @ eye)[:m]
    torch.testing.assert_close(a, three, atol=1e-13, rtol=0)
    assert lowpass_matrix(n, m) is lowpass_matrix(n, m)
    torch.testing.assert_close(lowpass_matrix(n, n, dtype=torch.float64), eye, atol=1e-13, rtol=0)


def test_energy_parseval() -> None:
    x = _rand(2, 24, 24, 6, seed=3)
    out_hw = (12, 8)
    coeffs = dct2(x)[:, : out_hw[0], : out_hw[1]]
    out = dct_lowpass(x, out_hw)
    kept_energy = coeffs.pow(2).sum(dim=(1, 2))
    torch.testing.assert_close(dct2(out).pow(2).sum(dim=(1, 2)), kept_energy, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(out.pow(2).sum(dim=(1, 2)), kept_energy, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(dct2(out), coeffs, atol=1e-10, rtol=0)  # the kept corner survives exactly


@pytest.mark.parametrize("hw", [(24, 24), (5, 7), (1, 6)])
def test_full_grid_is_identity(hw: tuple[int, int]) -> None:
    x = _rand(2, *hw, 5, dtype=torch.float32, seed=4)
    torch.testing.assert_close(dct_lowpass(x, hw), x, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dct_lowpass(x, hw, rescale=True), x, atol=1e-5, rtol=1e-5)


def test_constant_amplitude_pitfall() -> None:
    x = torch.full((1, 24, 24, 4), 3.0)
    torch.testing.assert_close(dct_lowpass(x, (12, 12)), torch.full((1, 12, 12, 4), 6.0))
    torch.testing.assert_close(dct_lowpass(x, (12, 12), rescale=True), torch.full((1, 12, 12, 4), 3.0))


@pytest.mark.parametrize(
    "bad,exc",
    [
        ((torch.zeros(1, 4, 4, 2), (5, 4)), ValueError),
        ((torch.zeros(1, 4, 4, 2), (4, 5)), ValueError),
        ((torch.zeros(1, 4, 4, 2), (0, 2)), ValueError),
        ((torch.zeros(1, 4, 4, 2), (2, -1)), ValueError),
        ((torch.zeros(1, 4, 4, 2), (2,)), ValueError),
        ((torch.zeros(1, 4, 4, 2), (2.0, 2)), TypeError),
        ((torch.zeros(4, 4, 2), (2, 2)), ValueError),
        ((torch.zeros(1, 1, 4, 4, 2), (2, 2)), ValueError),
        ((torch.zeros(1, 4, 4, 2, dtype=torch.int64), (2, 2)), TypeError),
        ((np.zeros((1, 4, 4, 2)), (2, 2)), TypeError),
    ],
)
def test_lowpass_bad_inputs(bad: tuple, exc: type) -> None:
    with pytest.raises(exc):
        dct_lowpass(*bad)


def test_transform_bad_inputs() -> None:
    for fn in (dct2, idct2):
        with pytest.raises(ValueError):
            fn(torch.zeros(4, 4, 2))
        with pytest.raises(TypeError):
            fn(torch.zeros(1, 4, 4, 2, dtype=torch.int32))
        with pytest.raises(ValueError):
            fn(torch.zeros(1, 4, 4, 2), method="dft")
    for n in (0, -3):
        with pytest.raises(ValueError):
            dct_matrix(n)
    with pytest.raises(ValueError):
        lowpass_matrix(4, 5)


# ------------------------------------------------------------------------------------------ Triton


TRITON_CASES = [
    # (B, H, W, D, h', w', rescale)
    (2, 6, 5, 37, 3, 2, False),  # batch > 1, odd grid, D not a power of two
    (1, 24, 24, 20, 12, 12, True),  # LLaVA-1.5 setting, rescaled
    (3, 1, 6, 80, 1, 4, False),  # single-row grid, D spans two d-blocks
    (1, 40, 3, 5, 17, 3, False),  # two K-chunks over H, h' padded to 32, tiny D
    (1, 70, 2, 3, 66, 1, False),  # h' spans two output-row tiles
]
TOLS = {torch.float32: (1e-5, 1e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (2e-2, 2e-2)}


@pytest.fixture
def triton_mode(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("MMEFF_KERNELS", "triton")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", TRITON_CASES)
def test_triton_matches_reference(triton_mode: None, monkeypatch: pytest.MonkeyPatch, dtype, case) -> None:
    b, h, w, d, ho, wo, rescale = case
    x = _rand(b, h, w, d, dtype=dtype, seed=5)
    out = dct_lowpass(x, (ho, wo), rescale=rescale)
    monkeypatch.setenv("MMEFF_KERNELS", "torch")
    ref = dct_lowpass(x, (ho, wo), rescale=rescale)
    assert out.dtype == dtype and out.shape == (b, ho, wo, d)
    atol, rtol = TOLS[dtype]
    torch.testing.assert_close(out.float(), ref.float(), atol=atol, rtol=rtol)
    exact = _three_step(x.double(), (ho, wo), rescale)
    torch.testing.assert_close(out.double(), exact, atol=atol * 4, rtol=rtol * 4)


def test_triton_non_contiguous_input(triton_mode: None) -> None:
    base = _rand(2, 8, 6, 24, dtype=torch.float32, seed=6)
    x = base[:, :, :, ::2]  # strided channels
    out = dct_lowpass(x, (4, 3))
    torch.testing.assert_close(out, _three_step(x.double(), (4, 3)).float(), atol=1e-5, rtol=1e-5)


def test_triton_constant_pitfall(triton_mode: None) -> None:
    x = torch.full((1, 24, 24, 16), 3.0, dtype=torch.float16)
    torch.testing.assert_close(dct_lowpass(x, (12, 12)).float(), torch.full((1, 12, 12, 16), 6.0))
    torch.testing.assert_close(
        dct_lowpass(x, (12, 12), rescale=True).float(), torch.full((1, 12, 12, 16), 3.0)
    )
