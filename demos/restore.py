"""Degrade a real photo, restore it by a free-text instruction with the shipped Instruct-IPT miniature.

The degradations are mmeff's seeded ones (noise, blur, rain, haze, snow); the instruction goes through the
bundled MiniLM router to one of the model's five tasks (requests restoration cannot do are refused with
the closest phrasings); PSNR and SSIM are on the Y channel (the literature's convention) and on RGB.
The shipped model (``mmeff/weights/instruct-ipt-mini.safetensors``) never saw the ``chelsea`` and
``coffee`` photos in training.

    python -m mmeff.demos.restore --image chelsea --degradation rain --instruction "remove the rain"
"""

from __future__ import annotations

import argparse
import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mmeff.datasets.degradations import degrade
from mmeff.datasets.media import IMAGE_NAMES, sample_image
from mmeff.datasets.restoration import read_image
from mmeff.demos.common import DemoError
from mmeff.eval.metrics import psnr, quantize_8bit, ssim
from mmeff.eval.plotting import pyplot, save_figure
from mmeff.models.instruct_ipt import shipped_model
from mmeff.models.instructions import UnknownInstruction, default_router

__all__ = ["DEGRADATIONS", "RestoreResult", "default_ipt", "run_restore", "plot_restore", "main"]

#: menu name -> the degradation (mmeff.datasets.degradations) and the instruction offered with it
DEGRADATIONS = {"noise": "please remove the noise", "blur": "make it sharper", "rain": "remove the rain",
                "haze": "clear up the haze", "snow": "get rid of the snow"}
MAX_SIDE = 256


@dataclass
class RestoreResult:
    """Clean, degraded and restored pictures ``(H, W, 3)`` uint8, the task the instruction was routed to,
    and ``rows``: PSNR/SSIM of the degraded and restored pictures against the clean one."""

    clean: np.ndarray
    degraded: np.ndarray
    restored: np.ndarray
    task: str
    instruction: str
    rows: list[dict[str, Any]]

    def table(self) -> list[list[Any]]:
        """``rows`` for a table widget: picture, PSNR-Y, SSIM-Y, PSNR-RGB."""
        return [[r["image"], round(r["psnr_y"], 2), round(r["ssim_y"], 4), round(r["psnr_rgb"], 2)] for r in self.rows]


@functools.lru_cache(maxsize=1)
def default_ipt() -> torch.nn.Module:
    """The shipped Instruct-IPT miniature (:func:`mmeff.models.instruct_ipt.shipped_model`), loaded once."""
    return shipped_model().eval()


def _tensor(image: np.ndarray) -> torch.Tensor:
    if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] not in (3, 4):
        raise DemoError(f"expected an RGB image (H, W, 3), got {getattr(image, 'shape', type(image).__name__)}")
    if image.dtype != np.uint8:
        raise DemoError(f"expected 8-bit pixels, got {image.dtype}")
    if min(image.shape[:2]) < 16:
        raise DemoError(f"the picture is too small to restore ({image.shape[1]}x{image.shape[0]} px)")
    x = torch.from_numpy(np.ascontiguousarray(image[:, :, :3])).permute(2, 0, 1).float() / 255
    scale = MAX_SIDE / max(x.shape[1:])
    if scale < 1:  # the model restores any size (tiled); the demo keeps CPU time to a second or two
        size = [max(16, round(s * scale)) for s in x.shape[1:]]
        x = torch.nn.functional.interpolate(x[None], size=size, mode="bicubic", antialias=True, align_corners=False)[0]
    return x.clamp(0, 1)


def _uint8(x: torch.Tensor) -> np.ndarray:
    return (x.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


@torch.no_grad()
def run_restore(image: np.ndarray, degradation: str, instruction: str, seed: int = 0,
                model: torch.nn.Module | None = None) -> RestoreResult:
    """Degrade ``image`` ``(H, W, 3)`` uint8 (long side resized to at most 256) with ``degradation`` and
    ``seed``, restore it as ``instruction`` asks, and score both against the clean picture. Raises
    :class:`DemoError` for an unknown degradation, an empty or unrelated instruction, or a bad image."""
    if degradation not in DEGRADATIONS:
        raise DemoError(f"unknown degradation {degradation!r}; choose one of {', '.join(DEGRADATIONS)}")
    instruction = (instruction or "").strip()
    if not instruction:
        raise DemoError("write an instruction, e.g. 'remove the rain'")
    clean = _tensor(image)
    model = model or default_ipt()
    try:
        task = default_router(model.tasks).route(instruction)
    except UnknownInstruction as e:
        raise DemoError(str(e)) from None
    lq = degrade(clean, degradation, seed=int(seed))
    out = model(lq[None], task)[0].clamp(0, 1)
    rows = []
    ref = quantize_8bit(clean)[None]
    for name, x in (("degraded", lq), ("restored", out)):
        x = quantize_8bit(x)[None]  # scored as shown and saved: 8-bit pixels
        rows.append({"image": name, "psnr_y": float(psnr(x, ref, channel="y")[0]),
                     "ssim_y": float(ssim(x, ref, channel="y")[0]), "psnr_rgb": float(psnr(x, ref)[0])})
    return RestoreResult(_uint8(clean), _uint8(lq), _uint8(out), task, instruction, rows)


def plot_restore(res: RestoreResult, path: str | Path) -> Path:
    """Degraded, restored and clean side by side with their scores, as a PNG at ``path``."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(10.5, 4))
    d, r = res.rows
    panels = ((res.degraded, f"degraded: {d['psnr_y']:.2f} dB / SSIM {d['ssim_y']:.3f}"),
              (res.restored, f"restored ({res.task}): {r['psnr_y']:.2f} dB / SSIM {r['ssim_y']:.3f}"),
              (res.clean, "clean"))
    for ax, (img, title) in zip(axes, panels):
        ax.imshow(img)
        ax.set_title(title, fontsize=9)
        ax.axis("off")
    fig.suptitle(f"instruction: {res.instruction!r}  (PSNR / SSIM on Y)", fontsize=9)
    return save_figure(fig, path)


def main(argv: list[str] | None = None) -> int:
    """Command line: one photo, one degradation, one instruction; print the scores, write a PNG."""
    p = argparse.ArgumentParser(prog="python -m mmeff.demos.restore", description=__doc__.splitlines()[0])
    p.add_argument("--image", default="chelsea", help=f"a bundled photo ({', '.join(IMAGE_NAMES)}) or a file")
    p.add_argument("--degradation", default="rain", choices=list(DEGRADATIONS))
    p.add_argument("--instruction", default=None, help="default: the degradation's own suggestion")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="restore.png")
    args = p.parse_args(argv)
    if args.image in IMAGE_NAMES:
        img = sample_image(args.image)
    else:
        img = _uint8(read_image(args.image))
    res = run_restore(img, args.degradation, args.instruction or DEGRADATIONS[args.degradation], args.seed)
    print(f"instruction {res.instruction!r} -> task {res.task}")
    for row in res.table():
        print(f"  {row[0]:<9} PSNR-Y {row[1]:6.2f} dB  SSIM-Y {row[2]:.4f}  PSNR-RGB {row[3]:6.2f} dB")
    print(f"wrote {plot_restore(res, args.out)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
