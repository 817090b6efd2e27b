"""Which tokens of a real photo each method keeps or merges.

Each 14x14 patch of a 336x336 photo is one token (its pixels, D = 588; LLaVA-1.5's 24x24 grid). Every
method runs on those tokens with the library's own code, and the panel draws the result back on the grid:

* pruning (``random``, ``uniform``): kept patches as they are, dropped ones dark;
* pooling (``pool``): each output token's cell outlined and filled with its mean;
* ToMe (``tome``): bipartite soft matching over several rounds (:mod:`mmeff.kernels.merge`), each merged
  group filled with its size-weighted mean and outlined (ToMe's source map);
* Fourier-VLM (``fourier``): the ``h' x w'`` DCT low-pass tokens mapped back to the full grid by the
  transpose of the low-pass operator (the projection onto the kept frequencies), with its PSNR.

    python -m mmeff.demos.token_maps --image astronaut --tokens 144 --out token_maps.png
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

# the reducers register themselves when their modules load: the registry must hold random ... fourier
import mmeff.methods.baselines  # noqa: F401
import mmeff.methods.fourier  # noqa: F401
from mmeff.core import TokenContext, create_reducer
from mmeff.datasets.media import IMAGE_NAMES, sample_image
from mmeff.datasets.restoration import read_image
from mmeff.demos.common import DemoError, token_overlay
from mmeff.eval.plotting import pyplot, save_figure
from mmeff.kernels.dct import lowpass_matrix
from mmeff.kernels.merge import bipartite_soft_matching, merge_source, merge_wavg
from mmeff.preprocess import CLIP_MEAN, CLIP_STD, llava_pixel_values

__all__ = ["METHODS", "TokenMap", "patch_tokens", "tome_source", "fourier_reconstruct", "run_token_maps",
           "plot_token_maps", "main"]

PATCH, SIZE = 14, 336
GRID = SIZE // PATCH
METHODS = ("random", "uniform", "pool", "tome", "fourier")


@dataclass
class TokenMap:
    """One method's panel: ``image`` ``(SIZE, SIZE, 3)`` uint8, its ``tokens`` count and a ``caption``."""

    method: str
    image: np.ndarray
    tokens: int
    caption: str
    psnr: float | None = None


def patch_tokens(image: np.ndarray) -> Tensor:
    """An RGB uint8 photo ``(H, W, 3)`` as patch tokens ``(1, 576, 588)`` with values in [0, 1] (the same
    short-side resize and centre crop as LLaVA's processor)."""
    if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        got = f"{type(image).__name__} {getattr(image, 'shape', '')} {getattr(image, 'dtype', '')}"
        raise DemoError(f"expected an RGB uint8 image (H, W, 3), got {got}")
    x = llava_pixel_values([image], SIZE)
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    x = (x * std + mean).clamp(0, 1)
    return x.unfold(2, PATCH, PATCH).unfold(3, PATCH, PATCH).permute(0, 2, 3, 1, 4, 5).reshape(1, GRID * GRID, -1)


def _image(tokens: Tensor) -> np.ndarray:
    """Patch tokens ``(576, 588)`` back to a uint8 ``(SIZE, SIZE, 3)`` picture."""
    img = tokens.float().view(GRID, GRID, 3, PATCH, PATCH).permute(0, 3, 1, 4, 2).reshape(SIZE, SIZE, 3)
    return (img.clamp(0, 1).numpy() * 255).round().astype(np.uint8)


def _psnr(a: Tensor, b: Tensor) -> float:
    mse = float(((a.float() - b.float()) ** 2).mean())
    return float("inf") if mse == 0 else 10 * float(np.log10(1.0 / mse))


def tome_source(tokens: Tensor, keep: int, rounds: int = 8) -> tuple[Tensor, Tensor]:
    """ToMe on ``tokens`` ``(1, N, D)`` down to ``keep`` tokens in ``rounds`` rounds of bipartite soft
    matching (metric: the tokens minus their mean, so cosine compares content, not brightness alone).

    Returns ``(merged (1, keep, D), group (N,))``: the size-weighted mean of each group and the output
    group each input token ended in."""
    n = tokens.shape[1]
    if not 1 <= keep <= n:
        raise DemoError(f"ToMe keeps between 1 and {n} tokens, got {keep}")
    x, size, source = tokens.float(), None, None
    remaining = n - keep
    for i in range(rounds):
        r = min(remaining // (rounds - i), x.shape[1] // 2)
        if r <= 0:
            continue
        merge, _ = bipartite_soft_matching(x - x.mean(dim=1, keepdim=True), r)
        source = merge_source(merge, x, source)
        x, size = merge_wavg(merge, x, size)
        remaining -= r
    # bipartite matching merges at most half the tokens per round: finish with single-token rounds
    while x.shape[1] > keep:
        merge, _ = bipartite_soft_matching(x - x.mean(dim=1, keepdim=True), min(x.shape[1] - keep, x.shape[1] // 2))
        source = merge_source(merge, x, source)
        x, size = merge_wavg(merge, x, size)
    group = torch.arange(n) if source is None else source[0].argmax(dim=0)
    return x, group


def fourier_reconstruct(reduced: Tensor, out_grid: tuple[int, int], grid: tuple[int, int] = (GRID, GRID)) -> Tensor:
    """Map Fourier-VLM tokens ``(1, h'*w', D)`` back to the full ``grid``: ``A_hᵀ Y A_w`` with the low-pass
    matrices ``A`` ``(h', H)`` of :func:`mmeff.kernels.dct.lowpass_matrix`, i.e. the input with every
    frequency above ``(h', w')`` removed. Returns ``(1, H*W, D)``."""
    (h, w), (hh, ww) = grid, out_grid
    y = reduced.float().view(hh, ww, -1)
    a_h = lowpass_matrix(h, hh, dtype=torch.float64).float()
    a_w = lowpass_matrix(w, ww, dtype=torch.float64).float()
    return torch.einsum("pi,pqd,qj->ijd", a_h, y, a_w).reshape(1, h * w, -1)


def run_token_maps(image: np.ndarray, tokens: int = 144, methods: tuple[str, ...] | list[str] = METHODS,
                   seed: int = 0) -> list[TokenMap]:
    """The input and one :class:`TokenMap` per method, each keeping ``tokens`` of the 576 patch tokens
    (Fourier-VLM rounds to the nearest grid it can keep; its caption says how many)."""
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise DemoError(f"unknown method(s) {unknown}; choose from {', '.join(METHODS)}")
    n = GRID * GRID
    if not 1 <= int(tokens) <= n:
        raise DemoError(f"the budget must be between 1 and {n} tokens (a 24x24 grid), got {tokens}")
    tokens = int(tokens)
    x = patch_tokens(image)
    ctx = TokenContext(grid=(GRID, GRID))
    maps = [TokenMap("input", _image(x[0]), n, f"input: {n} tokens (24x24 patches of 14 px)")]
    for name in methods:
        if name == "tome":
            merged, group = tome_source(x, tokens)
            filled = merged[0, group]
            img = token_overlay(_image(filled), group.view(GRID, GRID).numpy(), dim=1.0)
            maps.append(TokenMap(name, img, merged.shape[1], f"ToMe: {merged.shape[1]} merged tokens "
                                 f"(source map, PSNR {_psnr(filled, x[0]):.1f} dB)", _psnr(filled, x[0])))
            continue
        torch.manual_seed(seed)
        red = create_reducer(name, tokens=tokens)(x, ctx)
        if name == "fourier":
            assert red.grid is not None
            rec = fourier_reconstruct(red.tokens, tuple(red.grid[-2:]))[0]
            p = _psnr(rec, x[0])
            maps.append(TokenMap(name, _image(rec), red.num_tokens,
                                 f"Fourier-VLM: {red.num_tokens} tokens ({red.grid[-2]}x{red.grid[-1]} DCT), "
                                 f"low-pass PSNR {p:.1f} dB", p))
            continue
        a = red.assignment[0]
        filled = torch.zeros_like(x[0])
        filled[a >= 0] = red.tokens[0, a[a >= 0]].float()
        img = token_overlay(_image(filled), a.view(GRID, GRID).numpy(), dim=0.35)
        kind = "kept" if name != "pool" else "pooled"
        maps.append(TokenMap(name, img, red.num_tokens, f"{name}: {red.num_tokens} tokens {kind}"))
    return maps


def plot_token_maps(maps: list[TokenMap], path: str | Path) -> Path:
    """One panel per map side by side, as a PNG at ``path``."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(maps), figsize=(3.3 * len(maps), 3.7), squeeze=False)
    for ax, m in zip(axes[0], maps):
        ax.imshow(m.image)
        ax.set_title(m.caption.replace(" (", "\n("), fontsize=8)
        ax.axis("off")
    return save_figure(fig, path)


def main(argv: list[str] | None = None) -> int:
    """Command line: every method on one bundled photo (or a file), written as one PNG."""
    p = argparse.ArgumentParser(prog="python -m mmeff.demos.token_maps", description=__doc__.splitlines()[0])
    p.add_argument("--image", default="astronaut", help=f"a bundled photo ({', '.join(IMAGE_NAMES)}) or a file")
    p.add_argument("--tokens", type=int, default=144)
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--out", default="token_maps.png")
    args = p.parse_args(argv)
    if args.image in IMAGE_NAMES:
        img = sample_image(args.image)
    else:
        img = (read_image(args.image).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    maps = run_token_maps(img, args.tokens, [m for m in args.methods.split(",") if m])
    for m in maps:
        print(m.caption)
    print(f"wrote {plot_token_maps(maps, args.out)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
