"""Synthetic degradations for all-in-one restoration: noise, blur, rain, haze and snow.

Every function maps a clean image ``(3, H, W)`` float in ``[0, 1]`` to a degraded one of the same shape,
rounded to 8-bit levels (what a degraded file on disk holds), and draws all its randomness from the
``torch.Generator`` it is given, so ``degrade(img, kind, seed=s)`` is a pure function of ``(img, kind, s)``.

* ``noise``: additive white Gaussian noise, sigma (0-255 scale) drawn from ``sigmas`` (BSD68's 15/25/50).
* ``blur``: motion blur (an anti-aliased line kernel, random length and angle) or Gaussian blur.
* ``rain``: Rain100L-style streaks: sparse seeds smeared by a long, near-vertical line kernel, screen-blended.
* ``haze``: the atmospheric scattering model ``I = J t + A (1 - t)``, ``t = exp(-beta d)``. No depth sensor
  exists for arbitrary photos, so the default depth ``d`` is a proxy (far at the top, plus a smooth random
  field); pass ``depth=`` (``(H, W)`` in ``[0, 1]``) when you have one.
* ``snow``: Snow100K-style flakes in three size layers, smeared along a fall direction, over a light veil.

Randomness is per call: sizes, angles, densities and strengths are drawn inside the documented ranges.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "DEGRADATIONS",
    "TASK_OF",
    "add_haze",
    "add_noise",
    "add_rain",
    "add_snow",
    "blur",
    "degrade",
    "gaussian_kernel",
    "motion_kernel",
    "seed_for",
]


def _uniform(g: torch.Generator, lo: float, hi: float) -> float:
    return lo + (hi - lo) * float(torch.rand((), generator=g))


def _check(img: Tensor) -> None:
    if not isinstance(img, Tensor) or img.dim() != 3 or img.shape[0] != 3 or not img.is_floating_point():
        raise ValueError(f"expected a float image (3, H, W) in [0, 1], got "
                         f"{tuple(img.shape) if isinstance(img, Tensor) else type(img).__name__}")


def _q8(x: Tensor) -> Tensor:
    return x.clamp(0, 1).mul(255).round().div(255)


def _conv(x: Tensor, kernel: Tensor) -> Tensor:
    """``(C, H, W)`` filtered by a 2-D ``kernel`` (odd size), reflect-padded so the size is kept."""
    kh, kw = kernel.shape
    c = x.shape[0]
    pad = (kw // 2, kw // 2, kh // 2, kh // 2)
    mode = "reflect" if min(x.shape[-2:]) > max(kh, kw) // 2 else "replicate"
    xp = F.pad(x[None], pad, mode=mode)
    return F.conv2d(xp, kernel.to(x).expand(c, 1, kh, kw), groups=c)[0]


def gaussian_kernel(sigma: float) -> Tensor:
    """Normalised 2-D Gaussian ``(k, k)``, ``k = 2 ceil(3 sigma) + 1``."""
    r = max(1, math.ceil(3 * sigma))
    x = torch.arange(-r, r + 1, dtype=torch.float32)
    g = torch.exp(-(x**2) / (2 * sigma**2))
    g = g / g.sum()
    return g[:, None] * g[None, :]


def motion_kernel(length: float, angle_deg: float) -> Tensor:
    """A normalised line of ``length`` pixels at ``angle_deg`` (0 = horizontal, 90 = vertical), drawn by
    bilinear splatting of 10 samples per pixel so short and diagonal lines stay smooth; ``(k, k)``, k odd."""
    k = int(math.ceil(length)) | 1
    ker = torch.zeros(k + 2, k + 2)
    c = (k + 1) / 2
    n = max(2, int(length * 10))
    t = torch.linspace(-(length - 1) / 2, (length - 1) / 2, n)
    a = math.radians(angle_deg)
    xs, ys = c + t * math.cos(a), c - t * math.sin(a)
    x0, y0 = xs.floor().long(), ys.floor().long()
    fx, fy = xs - x0, ys - y0
    for dx, dy, w in ((0, 0, (1 - fx) * (1 - fy)), (1, 0, fx * (1 - fy)), (0, 1, (1 - fx) * fy), (1, 1, fx * fy)):
        ker.index_put_((y0 + dy, x0 + dx), w, accumulate=True)
    ker = ker[1:-1, 1:-1]
    return ker / ker.sum()


def add_noise(img: Tensor, g: torch.Generator, *, sigma: float | None = None,
              sigmas: Sequence[float] = (15, 25, 50)) -> Tensor:
    """Additive Gaussian noise of ``sigma`` (0-255 scale; default: one of ``sigmas`` at random)."""
    _check(img)
    if sigma is None:
        sigma = float(sigmas[int(torch.randint(len(sigmas), (), generator=g))])
    noise = torch.randn(img.shape, generator=g, dtype=torch.float32).to(img)
    return _q8(img + noise * (sigma / 255.0))


def blur(img: Tensor, g: torch.Generator, *, mode: str | None = None, length: tuple[float, float] = (7, 17),
         sigma: tuple[float, float] = (1.0, 3.0)) -> Tensor:
    """Motion blur (line of ``length`` px at a random angle) or Gaussian blur (``sigma``); ``mode``
    ``'motion'`` / ``'gaussian'``, default: either with equal odds."""
    _check(img)
    if mode is None:
        mode = "motion" if float(torch.rand((), generator=g)) < 0.5 else "gaussian"
    if mode == "motion":
        kernel = motion_kernel(_uniform(g, *length), _uniform(g, 0, 180))
    elif mode == "gaussian":
        kernel = gaussian_kernel(_uniform(g, *sigma))
    else:
        raise ValueError(f"blur mode must be 'motion' or 'gaussian', got {mode!r}")
    return _q8(_conv(img, kernel))


def add_rain(img: Tensor, g: torch.Generator, *, density: tuple[float, float] = (0.002, 0.006),
             length: tuple[float, float] = (15, 35), tilt: float = 20.0,
             strength: tuple[float, float] = (0.5, 0.9)) -> Tensor:
    """Rain streaks: seeds at ``density`` per pixel, smeared by a line of ``length`` px within ``tilt``
    degrees of vertical, slightly widened, then screen-blended at ``strength``."""
    _check(img)
    h, w = img.shape[-2:]
    p = _uniform(g, *density)
    seeds = (torch.rand(1, h, w, generator=g) < p).float() * (0.5 + 0.5 * torch.rand(1, h, w, generator=g))
    ln = _uniform(g, *length)
    streaks = _conv(seeds, motion_kernel(ln, 90 + _uniform(g, -tilt, tilt))) * ln
    streaks = _conv(streaks, gaussian_kernel(0.6)).clamp(0, 1) * _uniform(g, *strength)
    streaks = streaks.to(img)
    return _q8(1 - (1 - img) * (1 - streaks))


def _smooth_field(g: torch.Generator, h: int, w: int, cells: int) -> Tensor:
    coarse = torch.rand(1, 1, cells, cells, generator=g)
    return F.interpolate(coarse, size=(h, w), mode="bicubic", align_corners=True)[0, 0]


def add_haze(img: Tensor, g: torch.Generator, *, beta: tuple[float, float] = (0.8, 2.0),
             airlight: tuple[float, float] = (0.75, 0.95), depth: Tensor | None = None) -> Tensor:
    """Atmospheric scattering with scattering coefficient ``beta`` and grey airlight ``A`` (a slight tint
    per channel). ``depth``: ``(H, W)`` in [0, 1] (1 = far); default: the proxy in the module docstring."""
    _check(img)
    h, w = img.shape[-2:]
    if depth is None:
        ramp = torch.linspace(1, 0, h)[:, None].expand(h, w)
        d = 0.6 * ramp + 0.4 * _smooth_field(g, h, w, 4)
        depth = (d - d.min()) / (d.max() - d.min()).clamp_min(1e-6)
    elif depth.shape != (h, w):
        raise ValueError(f"depth must be (H, W) = {(h, w)}, got {tuple(depth.shape)}")
    t = torch.exp(-_uniform(g, *beta) * depth.float()).to(img)
    a = _uniform(g, *airlight) + (torch.rand(3, 1, 1, generator=g) - 0.5) * 0.06
    return _q8(img * t + a.to(img) * (1 - t))


def add_snow(img: Tensor, g: torch.Generator, *, density: tuple[float, float] = (0.002, 0.008),
             veil: tuple[float, float] = (0.0, 0.15), tilt: float = 20.0) -> Tensor:
    """Snow: flakes in three size layers (Gaussian blobs of sigma 0.7 / 1.5 / 2.5 px, ever sparser),
    smeared along a fall direction within ``tilt`` degrees of vertical, composited in white over a veil."""
    _check(img)
    h, w = img.shape[-2:]
    p = _uniform(g, *density)
    angle = 90 + _uniform(g, -tilt, tilt)
    mask = torch.zeros(1, h, w)
    for sigma, share in ((0.7, 1.0), (1.5, 0.25), (2.5, 0.06)):
        seeds = (torch.rand(1, h, w, generator=g) < p * share).float()
        layer = _conv(seeds, gaussian_kernel(sigma)) * (2 * math.pi * sigma**2)
        layer = _conv(layer, motion_kernel(_uniform(g, 2, 6), angle))
        mask = mask + layer * _uniform(g, 0.7, 1.0)
    mask = mask.clamp(0, 1).to(img)
    v = _uniform(g, *veil)
    veiled = img * (1 - v) + 0.9 * v
    return _q8(veiled * (1 - mask) + mask)


DEGRADATIONS: dict[str, Callable[..., Tensor]] = {
    "noise": add_noise,
    "blur": blur,
    "rain": add_rain,
    "haze": add_haze,
    "snow": add_snow,
}
# degradation -> the restoration task that undoes it (the names the models and instructions use)
TASK_OF: dict[str, str] = {"noise": "denoise", "blur": "deblur", "rain": "derain", "haze": "dehaze", "snow": "desnow"}


def seed_for(*parts: int) -> int:
    """A 63-bit seed mixed from integers (e.g. ``(seed, index, task)``) with numpy's SeedSequence, so
    neighbouring indices get unrelated streams."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(2, dtype=np.uint64)[0] >> 1)


def degrade(img: Tensor, kind: str, seed: int | torch.Generator = 0, **params: float) -> Tensor:
    """Apply the degradation ``kind`` (a key of :data:`DEGRADATIONS` or its task name, e.g. ``'derain'``)
    to ``img`` ``(3, H, W)`` in [0, 1]; ``seed`` (int or generator) fixes every random choice."""
    kind = {v: k for k, v in TASK_OF.items()}.get(kind, kind)
    if kind not in DEGRADATIONS:
        raise ValueError(f"unknown degradation {kind!r}; known: {', '.join(DEGRADATIONS)} "
                         f"(or the tasks {', '.join(TASK_OF.values())})")
    g = seed if isinstance(seed, torch.Generator) else torch.Generator().manual_seed(int(seed))
    return DEGRADATIONS[kind](img, g, **params)
