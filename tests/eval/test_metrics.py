"""PSNR / SSIM / Y channel against scikit-image's implementations (an independent reference)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from skimage.color import rgb2ycbcr
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from mmeff.datasets.media import sample_image
from mmeff.eval.metrics import psnr, quantize_8bit, rgb_to_y, ssim


def _pair(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    a = sample_image("astronaut")[100:196, 150:270].astype(np.float64) / 255
    rng = np.random.default_rng(seed)
    b = np.clip(a + rng.normal(0, 0.08, a.shape), 0, 1)
    return a, b


def _t(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(x).permute(2, 0, 1)


def test_psnr_and_ssim_match_skimage_on_rgb() -> None:
    a, b = _pair()
    assert float(psnr(_t(b), _t(a))) == pytest.approx(peak_signal_noise_ratio(a, b, data_range=1.0), abs=1e-9)
    ref = structural_similarity(b, a, channel_axis=2, data_range=1.0, gaussian_weights=True, sigma=1.5,
                                use_sample_covariance=False)
    assert float(ssim(_t(b), _t(a))) == pytest.approx(ref, abs=1e-9)


def test_y_channel_matches_matlab_rgb2ycbcr_and_its_scores() -> None:
    a, b = _pair(1)
    assert torch.allclose(rgb_to_y(_t(a))[0], torch.from_numpy(rgb2ycbcr(a)[..., 0]), atol=1e-9)
    ya, yb = rgb2ycbcr(a)[..., 0], rgb2ycbcr(b)[..., 0]
    assert float(psnr(_t(b), _t(a), channel="y")) == pytest.approx(
        peak_signal_noise_ratio(ya, yb, data_range=255.0), abs=1e-9)
    ref = structural_similarity(yb, ya, data_range=255.0, gaussian_weights=True, sigma=1.5,
                                use_sample_covariance=False)
    assert float(ssim(_t(b), _t(a), channel="y")) == pytest.approx(ref, abs=1e-9)


def test_batches_crop_border_and_identity() -> None:
    a, b = _pair(2)
    x, y = torch.stack([_t(b), _t(a)]), torch.stack([_t(a), _t(a)])
    p = psnr(x, y, crop_border=4)
    assert p.shape == (2,) and torch.isinf(p[1])
    ref = peak_signal_noise_ratio(a[4:-4, 4:-4], b[4:-4, 4:-4], data_range=1.0)
    assert float(p[0]) == pytest.approx(ref, abs=1e-9)
    assert float(ssim(x, y)[1]) == pytest.approx(1.0)
    q = quantize_8bit(torch.tensor([-0.2, 0.5, 0.50001, 1.3]))
    assert torch.equal(q, torch.tensor([0.0, 128 / 255, 128 / 255, 1.0]))


def test_bad_inputs_are_refused() -> None:
    a = torch.rand(3, 20, 20)
    with pytest.raises(ValueError, match="differ in shape"):
        psnr(a, torch.rand(3, 20, 21))
    with pytest.raises(ValueError, match="float"):
        psnr((a * 255).byte(), (a * 255).byte())
    with pytest.raises(ValueError, match="11x11"):
        ssim(torch.rand(3, 8, 8), torch.rand(3, 8, 8))
    with pytest.raises(ValueError, match="channel"):
        psnr(a, a, channel="lab")
    with pytest.raises(ValueError, match="3, H, W"):
        psnr(torch.rand(1, 20, 20), torch.rand(1, 20, 20))
