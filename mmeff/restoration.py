"""Training and evaluation of all-in-one restoration models (Instruct-IPT and any ``model(images, task)``).

* :func:`train_restoration`: L1 loss (IPT's), Adam with a linear warm-up and cosine decay, gradient
  clipping, a progress bar, and ``out_dir/last.pt`` every ``save_every`` steps. The data is a
  :class:`~mmeff.datasets.restoration.DegradedImages` (or any dataset whose item ``i`` is a pure function
  of ``i``): step ``s`` reads items ``s * batch * world + rank * batch + j``, so ``resume=True`` continues
  bit-for-bit from the last checkpoint with no data state to save. Under ``torchrun`` it runs DDP (the
  library's :func:`~mmeff.distributed.init_distributed`); rank 0 logs and saves.
* :func:`evaluate_restoration`: PSNR and SSIM per task on RGB and on the Y channel (the literature's two
  conventions), on 8-bit-quantised outputs, with a progress bar.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from mmeff.distributed import init_distributed
from mmeff.metrics import psnr, quantize_8bit, ssim

__all__ = ["RestorationTrainConfig", "evaluate_restoration", "train_restoration"]


@dataclass
class RestorationTrainConfig:
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


def _lr_at(step: int, cfg: RestorationTrainConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    t = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.min_lr + (cfg.lr - cfg.min_lr) * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))


class _StepSampler(torch.utils.data.Sampler[int]):
    """Indices of steps ``[start, stop)`` for one rank: step ``s`` takes ``s*B*world + rank*B + j``."""

    def __init__(self, start: int, stop: int, batch: int, rank: int, world: int) -> None:
        self.start, self.stop, self.batch, self.rank, self.world = start, stop, batch, rank, world

    def __iter__(self) -> Iterator[int]:
        for s in range(self.start, self.stop):
            base = (s * self.world + self.rank) * self.batch
            yield from range(base, base + self.batch)

    def __len__(self) -> int:
        return (self.stop - self.start) * self.batch


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
    """Train ``model(images, task_ids)`` on ``dataset`` items ``(degraded, clean, task)``; checkpoint to
    ``out_dir/last.pt``. ``stop_after``: return after this many steps of this call (the schedule stays
    that of ``cfg.steps``; a later call resumes). The dataset must hold ``steps * batch * world`` items.
    Returns the history ``{"config", "log": [{"step", "loss", "lr", "seconds"}...], "step", "train_seconds"}``
    (``seconds``: since this call started; ``train_seconds``: all calls together)."""
    cfg = cfg or RestorationTrainConfig()
    out = Path(out_dir)
    rank, world, device = init_distributed()
    need = cfg.steps * cfg.batch_size * world
    if len(dataset) < need:
        raise ValueError(f"dataset has {len(dataset)} items; {cfg.steps} steps of {cfg.batch_size} x {world} "
                         f"ranks need {need} (give DegradedImages length={need})")
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    model.to(device)
    net: nn.Module = model
    if world > 1:
        # a batch rarely holds every task, so some heads, tails and biases get no gradient on a rank
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                                  find_unused_parameters=True)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    history: dict[str, Any] = {"config": asdict(cfg), "log": [], "step": 0}
    ckpt = out / "last.pt"
    start = 0
    if resume and ckpt.is_file():
        state = torch.load(ckpt, map_location=device, weights_only=False)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"])
        history, start = state["history"], state["step"]
        log(f"resumed from {ckpt} at step {start}")
    base_seconds = float(history.get("train_seconds", 0.0))  # over all calls, for reports of resumed runs
    stop = cfg.steps if stop_after is None else min(cfg.steps, start + stop_after)
    if start >= stop:
        return history
    loader = torch.utils.data.DataLoader(dataset, batch_size=cfg.batch_size,
                                         sampler=_StepSampler(start, stop, cfg.batch_size, rank, world),
                                         num_workers=cfg.workers)

    def save(step: int) -> None:
        if rank != 0:
            return
        history["step"] = step
        history["train_seconds"] = base_seconds + time.perf_counter() - t0
        torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "step": step,
                    "history": history, "rng": torch.get_rng_state()}, ckpt)
        (out / "history.json").write_text(json.dumps(history, indent=1))

    net.train()
    bar = tqdm(loader, total=stop - start, initial=0, desc=f"train {start}->{stop}/{cfg.steps}",
               disable=not progress or rank != 0, leave=False)
    t0, window, step = time.perf_counter(), [], start
    for lq, clean, task in bar:
        lr = _lr_at(step, cfg)
        for group in opt.param_groups:
            group["lr"] = lr
        lq, clean, task = lq.to(device), clean.to(device), task.to(device)
        loss = F.l1_loss(net(lq, task), clean)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.clip_grad:
            nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad)
        opt.step()
        step += 1
        window.append(float(loss.detach()))
        bar.set_postfix(loss=f"{sum(window[-50:]) / len(window[-50:]):.4f}")
        if step % cfg.save_every == 0 or step == stop:
            history["log"].append({"step": step, "loss": sum(window) / len(window), "lr": lr,
                                   "seconds": time.perf_counter() - t0})
            window = []
            save(step)
    bar.close()
    if rank == 0 and history["log"]:
        e = history["log"][-1]
        log(f"step {e['step']}/{cfg.steps} loss {e['loss']:.4f} ({e['seconds']:.0f} s this call)")
    return history


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
