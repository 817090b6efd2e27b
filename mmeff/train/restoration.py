"""Training and evaluation of all-in-one restoration models (Instruct-IPT and any ``model(images, task)``).

* :func:`train_restoration`: L1 loss (IPT's) through the library's step loop
  (:func:`mmeff.train.loop.train_steps`: Adam with a linear warm-up and cosine decay, gradient clipping, a
  progress bar, ``out_dir/last.pt`` every ``save_every`` steps, exact resume, DDP under ``torchrun``).
  The data is a :class:`~mmeff.datasets.restoration.DegradedImages` (or any dataset whose item ``i`` is a
  pure function of ``i``).
* :func:`evaluate_restoration`: PSNR and SSIM per task on RGB and on the Y channel (the literature's two
  conventions), on 8-bit-quantised outputs, with a progress bar.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from mmeff.eval.metrics import psnr, quantize_8bit, ssim
from mmeff.train.loop import StepTrainConfig, train_steps

__all__ = ["RestorationTrainConfig", "evaluate_restoration", "train_restoration"]


@dataclass(kw_only=True)
class RestorationTrainConfig(StepTrainConfig):
    """Optimisation settings (IPT fine-tunes with Adam and L1; the schedule here is for training from scratch)."""

    steps: int = 2000
    batch_size: int = 16
    lr: float = 1e-3
    min_lr: float = 1e-5
    warmup_steps: int = 100
    weight_decay: float = 0.0
    clip_grad: float = 1.0
    save_every: int = 250
    workers: int = 0
    seed: int = 0


def train_restoration(
    model: nn.Module,
    dataset: torch.utils.data.Dataset,
    out_dir: str | Path,
    cfg: RestorationTrainConfig | None = None,
    *,
    resume: bool = True,
    stop_after: int | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Train ``model(images, task_ids)`` on ``dataset`` items ``(degraded, clean, task)`` with the L1 loss;
    checkpoint to ``out_dir/last.pt`` (:func:`mmeff.train.loop.train_steps`). ``stop_after``: return after
    this many steps of this call (the schedule stays that of ``cfg.steps``; a later call resumes). The
    dataset must hold ``steps * batch * world`` items. Returns the history ``{"config", "log": [{"step",
    "loss", "lr", "seconds"}...], "step", "train_seconds"}`` (``seconds``: since this call started;
    ``train_seconds``: all calls together)."""

    def loss(net: nn.Module, batch: Any, step: int, device: torch.device) -> dict[str, Tensor]:
        lq, clean, task = (t.to(device) for t in batch)
        return {"loss": F.l1_loss(net(lq, task), clean)}

    # a batch rarely holds every task, so some heads, tails and biases get no gradient on a rank
    return train_steps(model, dataset, out_dir, cfg or RestorationTrainConfig(), loss, resume=resume,
                       stop_after=stop_after, progress=progress, log=log, find_unused_parameters=True,
                       length_hint="DegradedImages length")


@torch.no_grad()
def evaluate_restoration(
    model: nn.Module,
    pairs: Sequence[tuple[Tensor, Tensor, int | str]] | torch.utils.data.Dataset,
    *,
    tasks: Sequence[str] | None = None,
    progress: bool = True,
    device: torch.device | str | None = None,
) -> dict[str, dict[str, float]]:
    """Mean PSNR / SSIM per task over ``pairs`` of ``(degraded (3,H,W), clean (3,H,W), task)``, each
    image restored alone at full size. ``task`` is an index into ``tasks`` (default: ``model.tasks``) or
    a name. Also reports the degraded input's scores (``input_psnr_y``) and an ``average`` row."""
    tasks = list(tasks if tasks is not None else model.tasks)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    was = model.training
    model.eval()
    sums: dict[str, dict[str, float]] = {}
    try:
        for lq, clean, task in tqdm(pairs, desc="evaluate", disable=not progress, leave=False):
            name = task if isinstance(task, str) else tasks[int(task)]
            pred = quantize_8bit(model(lq[None].to(device), name).float().cpu())
            ref, inp = clean[None].float(), lq[None].float()
            row = sums.setdefault(name, {"psnr_y": 0.0, "ssim_y": 0.0, "psnr_rgb": 0.0, "ssim_rgb": 0.0,
                                         "input_psnr_y": 0.0, "images": 0})
            row["psnr_y"] += float(psnr(pred, ref, channel="y")[0])
            row["ssim_y"] += float(ssim(pred, ref, channel="y")[0])
            row["psnr_rgb"] += float(psnr(pred, ref)[0])
            row["ssim_rgb"] += float(ssim(pred, ref)[0])
            row["input_psnr_y"] += float(psnr(inp, ref, channel="y")[0])
            row["images"] += 1
    finally:
        model.train(was)
    if not sums:
        raise ValueError("evaluate_restoration got no pairs")
    out = {t: {k: (v / r["images"] if k != "images" else v) for k, v in r.items()} for t, r in sums.items()}
    keys = [k for k in next(iter(out.values())) if k != "images"]
    out["average"] = {k: sum(r[k] for r in out.values()) / len(out) for k in keys}
    out["average"]["images"] = sum(r["images"] for t, r in out.items() if t != "average")
    return out
