"""The step-based training loop that restoration (Instruct-IPT) and video tokenizers (CDT) share.

:func:`train_steps` runs ``cfg.steps`` optimiser steps of a loss function over a dataset whose item ``i``
is a pure function of ``i``: step ``s`` reads items ``s * batch * world + rank * batch + j``
(:class:`StepSampler`), so ``resume=True`` continues bit-for-bit from ``out_dir/last.pt`` with no data
state to save. Adam with a linear warm-up and cosine decay (:func:`lr_at`), gradient clipping, a progress
bar, ``last.pt`` + ``history.json`` every ``save_every`` steps, and DDP under ``torchrun`` (the library's
:func:`~mmeff.distributed.init_distributed`); rank 0 logs and saves.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from mmeff.checkpoint import load_state, save_state, write_text_atomic
from mmeff.train.distributed import init_distributed

__all__ = ["StepSampler", "StepTrainConfig", "lr_at", "train_steps"]


class StepTrainConfig(Protocol):
    """The fields :func:`train_steps` reads (``RestorationTrainConfig``, ``TokenizerTrainConfig``)."""

    steps: int
    batch_size: int
    lr: float
    min_lr: float
    warmup_steps: int
    weight_decay: float
    clip_grad: float
    save_every: int
    workers: int
    seed: int


def lr_at(step: int, cfg: StepTrainConfig) -> float:
    """Learning rate at ``step``: linear warm-up over ``warmup_steps``, then cosine to ``min_lr``."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    t = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.min_lr + (cfg.lr - cfg.min_lr) * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))


class StepSampler(torch.utils.data.Sampler[int]):
    """Indices of steps ``[start, stop)`` for one rank: step ``s`` takes ``s*B*world + rank*B + j``."""

    def __init__(self, start: int, stop: int, batch: int, rank: int, world: int) -> None:
        self.start, self.stop, self.batch, self.rank, self.world = start, stop, batch, rank, world

    def __iter__(self) -> Iterator[int]:
        for s in range(self.start, self.stop):
            base = (s * self.world + self.rank) * self.batch
            yield from range(base, base + self.batch)

    def __len__(self) -> int:
        return (self.stop - self.start) * self.batch


def train_steps(
    model: nn.Module,
    dataset: torch.utils.data.Dataset,
    out_dir: str | Path,
    cfg: StepTrainConfig,
    loss_fn: Callable[[nn.Module, Any, int, torch.device], dict[str, Tensor]],
    *,
    resume: bool = True,
    stop_after: int | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
    ddp_forward: bool = True,
    find_unused_parameters: bool = False,
    history_extra: dict[str, Any] | None = None,
    length_hint: str = "length",
    collate_fn: Callable[[list[Any]], Any] | None = None,
    trainable_only: bool = False,
) -> dict[str, Any]:
    """Run ``cfg.steps`` steps of ``loss_fn(net, batch, step, device) -> {"loss": ..., other parts}``.

    ``net`` is the DDP-wrapped model under ``torchrun`` when ``ddp_forward`` (the loss calls its forward,
    so DDP averages the gradients); otherwise the bare model, and the gradients are averaged here.
    ``stop_after``: return after that many steps of this call (the schedule stays that of ``cfg.steps``;
    a later call resumes). Returns the history ``{"config", "log": [{"step", <part means>, "lr",
    "seconds"}], "step", "train_seconds", **history_extra}`` (``seconds``: since this call started;
    ``train_seconds``: all calls together). The dataset must hold ``steps * batch * world`` items.
    Only parameters with ``requires_grad`` train; ``trainable_only`` saves only those in ``last.pt`` (a
    model with a large frozen part, e.g. a VLM's language model)."""
    out = Path(out_dir)
    rank, world, device = init_distributed()
    need = cfg.steps * cfg.batch_size * world
    if len(dataset) < need:
        raise ValueError(f"dataset has {len(dataset)} items; {cfg.steps} steps of {cfg.batch_size} x {world} "
                         f"ranks need {need} (give the dataset {length_hint}={need})")
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    model.to(device)
    net: nn.Module = model
    if world > 1:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                                  find_unused_parameters=find_unused_parameters)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters (every requires_grad is False)")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    opt = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    history: dict[str, Any] = {"config": asdict(cfg), "log": [], "step": 0, **(history_extra or {})}  # type: ignore[call-overload]
    ckpt = out / "last.pt"
    start = 0
    if resume and ckpt.is_file():
        state = load_state(ckpt, map_location=device)
        try:
            if trainable_only:
                missing = trainable - set(state["model"])
                if missing:
                    raise RuntimeError(f"trainable parameters missing from the checkpoint: {sorted(missing)[:4]}")
                model.load_state_dict(state["model"], strict=False)
            else:
                model.load_state_dict(state["model"])
        except RuntimeError as e:
            raise ValueError(f"{ckpt} holds another model configuration; train into another folder or start "
                             f"over without resuming ({str(e).splitlines()[0]})") from e
        opt.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"])
        history, start = state["history"], state["step"]
        log(f"resumed from {ckpt} at step {start}")
    base_seconds = float(history.get("train_seconds", 0.0))  # over all calls, for reports of resumed runs
    stop = cfg.steps if stop_after is None else min(cfg.steps, start + stop_after)
    if start >= stop:
        return history
    # the loader gets its own generator: drawing its base seed from the global RNG would shift every
    # later random draw of a resumed run
    loader = torch.utils.data.DataLoader(dataset, batch_size=cfg.batch_size,
                                         sampler=StepSampler(start, stop, cfg.batch_size, rank, world),
                                         num_workers=cfg.workers, generator=torch.Generator().manual_seed(cfg.seed),
                                         collate_fn=collate_fn)
    use = net if ddp_forward else model

    def save(step: int) -> None:
        if rank != 0:
            return
        history["step"] = step
        history["train_seconds"] = base_seconds + time.perf_counter() - t0
        sd = model.state_dict()
        if trainable_only:
            sd = {k: v for k, v in sd.items() if k in trainable}
        save_state({"model": sd, "optimizer": opt.state_dict(), "step": step,
                    "history": history, "rng": torch.get_rng_state()}, ckpt)
        write_text_atomic(out / "history.json", json.dumps(history, indent=1))

    net.train()
    bar = tqdm(loader, total=stop - start, desc=f"train {start}->{stop}/{cfg.steps}",
               disable=not progress or rank != 0, leave=False)
    t0, window, step = time.perf_counter(), [], start
    for batch in bar:
        lr = lr_at(step, cfg)
        for group in opt.param_groups:
            group["lr"] = lr
        parts = loss_fn(use, batch, step, device)
        opt.zero_grad(set_to_none=True)
        parts["loss"].backward()
        if world > 1 and not ddp_forward:
            for p in params:
                if p.grad is not None:
                    torch.distributed.all_reduce(p.grad)
                    p.grad /= world
        if cfg.clip_grad:
            nn.utils.clip_grad_norm_(params, cfg.clip_grad)
        opt.step()
        step += 1
        window.append({k: float(v.detach()) for k, v in parts.items()})
        bar.set_postfix(loss=f"{np.mean([w['loss'] for w in window[-50:]]):.4f}")
        if step % cfg.save_every == 0 or step == stop:
            row = {k: float(np.mean([w[k] for w in window])) for k in window[0]}
            history["log"].append({"step": step, **row, "lr": lr, "seconds": time.perf_counter() - t0})
            window = []
            save(step)
    bar.close()
    if rank == 0 and history["log"]:
        e = history["log"][-1]
        parts_text = " ".join(f"{k} {e[k]:.4f}" for k in e if k not in ("step", "lr", "seconds"))
        log(f"step {e['step']}/{cfg.steps} {parts_text} ({e['seconds']:.0f} s this call)")
    return history
