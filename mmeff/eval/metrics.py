"""Image-quality metrics as the restoration literature reports them: PSNR and SSIM, on RGB or the Y channel.

* Y is ITU-R BT.601 luma as MATLAB's ``rgb2ycbcr`` computes it (the convention of IPT, PromptIR,
  Restormer and BasicSR): ``Y = 16 + 65.481 R + 128.553 G + 24.966 B`` for RGB in [0, 1], on a 0-255
  scale, so Y-channel scores are computed with a data range of 255 whatever the input range.
* SSIM is Wang et al. (2004): an 11x11 Gaussian window with sigma 1.5, K1 = 0.01, K2 = 0.03, averaged
  over the *valid* part of the map (no padded borders), per channel and then over channels. This equals
  ``skimage.metrics.structural_similarity(..., gaussian_weights=True, sigma=1.5,
  use_sample_covariance=False)`` (checked in the tests).
* ``crop_border`` drops that many pixels on every side first (super-resolution protocols use the scale).

Inputs are ``(B, 3, H, W)`` or ``(3, H, W)`` float tensors in ``[0, data_range]``; scores are per image,
computed in float64. Inputs are expected already quantised the way the benchmark stores images (8-bit).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["psnr", "ssim", "rgb_to_y", "quantize_8bit"]

Channel = Literal["rgb", "y"]
_Y_WEIGHTS = (65.481, 128.553, 24.966)


def quantize_8bit(x: Tensor) -> Tensor:
    """Round a ``[0, 1]`` image to the 256 levels an 8-bit file holds (clipped), keeping the dtype."""
    return x.clamp(0, 1).mul(255).round().div(255)


def rgb_to_y(x: Tensor, data_range: float = 1.0) -> Tensor:
    """``(..., 3, H, W)`` RGB in ``[0, data_range]`` -> ``(..., 1, H, W)`` BT.601 luma on the 0-255 scale."""
    if x.shape[-3] != 3:
        raise ValueError(f"rgb_to_y needs 3 channels at dim -3, got shape {tuple(x.shape)}")
    w = torch.tensor(_Y_WEIGHTS, dtype=x.dtype, device=x.device).view(3, 1, 1)
    return (x / data_range * w).sum(-3, keepdim=True) + 16.0


def _prepare(pred: Tensor, target: Tensor, data_range: float, channel: Channel, crop_border: int
             ) -> tuple[Tensor, Tensor, float]:
    if pred.shape != target.shape:
        raise ValueError(f"prediction {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")
    if pred.dim() == 3:
        pred, target = pred[None], target[None]
    if pred.dim() != 4 or pred.shape[1] != 3:
        raise ValueError(f"expected images (B, 3, H, W) or (3, H, W), got {tuple(pred.shape)}")
    if not (pred.is_floating_point() and target.is_floating_point()):
        raise ValueError(f"expected float images in [0, data_range], got {pred.dtype} / {target.dtype}")
    if channel not in ("rgb", "y"):
        raise ValueError(f"channel must be 'rgb' or 'y', got {channel!r}")
    pred, target = pred.double(), target.double()
    if channel == "y":
        pred, target, data_range = rgb_to_y(pred, data_range), rgb_to_y(target, data_range), 255.0
    if crop_border:
        if 2 * crop_border >= min(pred.shape[-2:]):
            raise ValueError(f"crop_border {crop_border} leaves nothing of a {tuple(pred.shape[-2:])} image")
        pred = pred[..., crop_border:-crop_border, crop_border:-crop_border]
        target = target[..., crop_border:-crop_border, crop_border:-crop_border]
    return pred, target, float(data_range)


def psnr(pred: Tensor, target: Tensor, *, data_range: float = 1.0, channel: Channel = "rgb",
         crop_border: int = 0) -> Tensor:
    """Peak signal-to-noise ratio in dB per image, ``(B,)`` (``inf`` for identical images)."""
    p, t, rng = _prepare(pred, target, data_range, channel, crop_border)
    mse = (p - t).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(rng**2 / mse)


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> Tensor:
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    g = g / g.sum()
    return g[:, None] * g[None, :]


def ssim(pred: Tensor, target: Tensor, *, data_range: float = 1.0, channel: Channel = "rgb",
         crop_border: int = 0) -> Tensor:
    """Structural similarity per image, ``(B,)``: Gaussian 11x11 (sigma 1.5) window, valid region,
    mean over channels (module docstring). Images must be at least 11x11 after cropping."""
    p, t, rng = _prepare(pred, target, data_range, channel, crop_border)
    if min(p.shape[-2:]) < 11:
        raise ValueError(f"SSIM needs images of at least 11x11 pixels, got {tuple(p.shape[-2:])}")
    c = p.shape[1]
    win = _gaussian_window().to(p.device).expand(c, 1, 11, 11)

    def filt(x: Tensor) -> Tensor:
        return F.conv2d(x, win, groups=c)

    c1, c2 = (0.01 * rng) ** 2, (0.03 * rng) ** 2
    mu_p, mu_t = filt(p), filt(t)
    var_p = filt(p * p) - mu_p**2
    var_t = filt(t * t) - mu_t**2
    cov = filt(p * t) - mu_p * mu_t
    s = ((2 * mu_p * mu_t + c1) * (2 * cov + c2)) / ((mu_p**2 + mu_t**2 + c1) * (var_p + var_t + c2))
    return s.flatten(2).mean(2).mean(1)
