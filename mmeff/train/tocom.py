"""ToCom's training: self-distillation of the plug-in across ToMe degrees, the backbone frozen (ToCom's
recipe), run by the library's loop (:func:`mmeff.train.loop.train_steps`, epochs over the caller's batches);
:class:`Batches` is a re-iterable, resumable image batcher."""

from __future__ import annotations

import math
import random
from collections.abc import Iterable, Iterator, Sized
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from mmeff.adapters.tocom import ToComAdapter
from mmeff.adapters.tome import ToMeAdapter
from mmeff.checkpoint import load_state, save_state
from mmeff.methods.tocom import ToCom, kd_loss
from mmeff.methods.tome import ToMe
from mmeff.train.distributed import init_distributed
from mmeff.train.loop import BaseTrainConfig, train_steps

__all__ = ["Batches", "ToComTrainConfig", "train_tocom"]

STATE = "train_state.pt"  # the loop's resumable state; the weights also go to tocom.safetensors


@dataclass(kw_only=True)
class ToComTrainConfig(BaseTrainConfig):
    """The settings of :func:`train_tocom` (ToCom's recipe: AdamW at a constant rate, no gradient clipping).

    ``data`` comes batched, so ``batch_size`` and ``workers`` are not read. ``r_max``: the largest ToMe degree
    sampled; ``scale``: the plug-in's delta scale while training; ``tau``: the distillation temperature."""

    epochs: int = 10
    lr: float = 1e-3
    weight_decay: float = 0.05
    clip_grad: float = 0.0
    tau: float = 1.0
    r_max: int = 16
    scale: float = 0.1

    # more epochs lengthen the run without changing what was done; a resumed run may set them
    resume_may_change = BaseTrainConfig.resume_may_change | {"epochs"}


def _images(batch: Any) -> Tensor:
    if isinstance(batch, Tensor):
        return batch
    if isinstance(batch, (list, tuple)) and batch and isinstance(batch[0], Tensor):
        return batch[0]
    if isinstance(batch, dict) and isinstance(batch.get("pixel_values"), Tensor):
        return batch["pixel_values"]
    raise TypeError(
        f"batches must be image tensors, (images, labels) or dicts with pixel_values, got {type(batch).__name__}"
    )


def _logits(model: nn.Module, images: Tensor) -> Tensor:
    out = model(images)
    if isinstance(out, Tensor):
        return out
    for key in ("logits", "image_embeds", "pooler_output"):
        v = getattr(out, key, None)
        if isinstance(v, Tensor):
            return v
    raise TypeError(f"cannot find logits in the model output {type(out).__name__}")


class _DegreePairs:
    """``(r_s, r_t)`` of each step: the successive draws of one ``random.Random(seed)``, replayed up to any
    step, so a resumed run draws what an uninterrupted one would with no state saved."""

    def __init__(self, seed: int, r_max: int) -> None:
        self.seed, self.r_max = seed, r_max
        self.rng, self.next = random.Random(seed), 0

    def __call__(self, step: int) -> tuple[int, int]:
        if step < self.next:
            self.rng, self.next = random.Random(self.seed), 0
        while self.next <= step:
            r_s, r_t = self.rng.sample(range(self.r_max + 1), 2)
            self.next += 1
        return r_s, r_t


def _upgrade_state(out: Path, per_epoch: int) -> None:
    """Rewrite a ``train_state.pt`` of an mmeff before :func:`train_steps` (``optimizer``, ``epoch``, an epoch
    list as ``history``, RNG states; the weights in ``tocom.safetensors``) in the loop's format, so the run
    resumes exactly. Anything else is left for the loop to read (or refuse)."""
    path, weights = out / STATE, out / "tocom.safetensors"
    if not (path.is_file() and weights.is_file()):
        return
    state = load_state(path)
    if "model" in state or not {"optimizer", "epoch", "history", "torch_rng"} <= set(state):
        return
    step = (int(state["epoch"]) + 1) * per_epoch
    history = {"config": None, "log": [], "step": step, "epochs": list(state["history"])}
    save_state({"model": ToCom.load(weights).state_dict(), "optimizer": state["optimizer"], "step": step,
                "history": history, "rng": state["torch_rng"], "cuda_rng": state.get("cuda_rng")}, path)


def train_tocom(
    model: nn.Module,
    data: Iterable[Any],
    *,
    tocom: ToCom | None = None,
    steps: int = 16,
    step_rank: int = 2,
    r_max: int | None = None,
    epochs: int = 10,
    lr: float = 1e-3,
    weight_decay: float = 0.05,
    scale: float = 0.1,
    tau: float = 1.0,
    out_dir: str | Path | None = None,
    resume: bool = True,
    seed: int = 0,
    progress: bool = True,
) -> ToCom:
    """Train a ToCom for ``model`` by self-distillation (ToCom's recipe; backbone frozen).

    Each step samples ``(r_s, r_t)`` in ``[0, r_max]²`` with ``r_s ≠ r_t`` (the same in every block);
    the student is ``model`` at ToMe(r_t) with ToCom(s→t), the teacher ``model`` at ToMe(r_s) without
    it; loss :func:`kd_loss`. ``data`` is a sized re-iterable of image batches ``(B, 3, H, W)`` (a
    ``DataLoader``, a list, :class:`Batches`; labels, if any, are ignored; ``data.set_epoch(epoch)`` is
    called before each pass when it has one). Runs on :func:`~mmeff.train.loop.train_steps` with
    :class:`ToComTrainConfig`; the global RNG (the plug-in's dropout) is the caller's. With ``out_dir``,
    ``tocom.safetensors`` and ``train_state.pt`` (the loop's state: weights, optimizer, step, RNG, history)
    are written after every epoch and a later call with ``resume=True`` continues from them exactly (a
    run with other settings than ``epochs`` is refused). Returns the trained plug-in (in eval mode), its
    ``history`` a list of ``{"epoch", "kd_loss"}`` (the epoch's mean loss per image).
    """
    if iter(data) is data:  # type: ignore[comparison-overlap]
        raise TypeError(
            "data must be re-iterable (a DataLoader or a list of batches), not a one-shot iterator"
        )
    if not isinstance(data, Sized):
        raise TypeError(f"data must have a len (its batches per epoch), got {type(data).__name__}")
    tocom = tocom if tocom is not None else ToCom.for_model(model, steps, step_rank, scale=scale)
    r_max = tocom.steps if r_max is None else int(r_max)
    if not 1 <= r_max <= tocom.steps:
        raise ValueError(f"r_max must be in [1, {tocom.steps}] (the plug-in's steps), got {r_max}")
    cfg = ToComTrainConfig(epochs=epochs, lr=lr, weight_decay=weight_decay, tau=tau, r_max=r_max,
                           scale=tocom.scale, seed=seed)
    param = next(model.parameters())
    tocom.to(param.device)
    out = Path(out_dir) if out_dir is not None else None
    per_epoch = len(data)
    if out is not None and resume:
        _upgrade_state(out, per_epoch)
    rank = init_distributed()[0]
    pairs = _DegreePairs(seed, r_max)
    seen = {"total": 0.0, "count": 0}  # this epoch's loss sum over images, and the images

    requires = {n: p.requires_grad for n, p in model.named_parameters()}
    was_training = model.training
    model.requires_grad_(False).eval()
    tome = ToMeAdapter(model, ToMe(r=0))
    tome.attach()
    handle = ToComAdapter(model, tocom.at(source=0, target=0, scale=tocom.scale))
    handle.attach()

    def loss_fn(net: nn.Module, batch: Any, step: int, device: torch.device) -> dict[str, Tensor]:
        images = _images(batch).to(device, param.dtype)
        r_s, r_t = pairs(step)
        tome.set_r(r_s)
        handle.enabled = False
        with torch.no_grad():
            teacher = _logits(model, images)
        tome.set_r(r_t)
        handle.enabled, handle.source, handle.target = True, r_s, r_t
        loss = kd_loss(_logits(model, images).float(), teacher.float(), cfg.tau)
        seen["total"] += loss.item() * images.shape[0]
        seen["count"] += images.shape[0]
        return {"loss": loss}

    def end_epoch(step: int, row: dict[str, float], history: dict[str, Any]) -> None:
        entry = {"epoch": step // per_epoch - 1, "kd_loss": seen["total"] / max(seen["count"], 1)}
        seen.update(total=0.0, count=0)
        history["epochs"].append(entry)
        if out is not None and rank == 0:
            tocom.save(out / "tocom.safetensors", extra=entry)

    try:
        history = train_steps(
            tocom, data, out, cfg, loss_fn, resume=resume, progress=progress, log=lambda _: None,
            ddp_forward=False, history_extra={"epochs": []}, steps=epochs * per_epoch, save_every=per_epoch,
            optimizer=lambda m: torch.optim.AdamW(m.parameters(), lr=lr, weight_decay=weight_decay),
            lr_schedule=lambda _: lr, on_log=end_epoch, batched=True, device=param.device, reseed=False,
            checkpoint=STATE, desc="ToCom",
        )
    finally:
        handle.detach()
        tome.detach()
        for n, p in model.named_parameters():
            p.requires_grad_(requires[n])
        model.train(was_training)
    tocom.history = history["epochs"]  # type: ignore[assignment]
    return tocom.eval()


class Batches:
    """Re-iterable batches of a tensor ``x`` ``(N, ...)``, reshuffled on every pass when ``shuffle``.

    Pass ``e`` is shuffled with seed ``seed + e`` (as ``DistributedSampler``); :func:`train_tocom` calls
    :meth:`set_epoch`, so a resumed run sees the same batches as an uninterrupted one.
    """

    def __init__(self, x: Tensor, batch_size: int, shuffle: bool = True, seed: int = 0) -> None:
        self.x, self.batch_size, self.shuffle = x, int(batch_size), shuffle
        self.seed, self.epoch = int(seed), 0

    def set_epoch(self, epoch: int) -> None:
        """Shuffle the next pass as pass ``epoch`` (later passes continue from there)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return math.ceil(len(self.x) / self.batch_size)

    def __iter__(self) -> Iterator[Tensor]:
        n = len(self.x)
        gen = torch.Generator().manual_seed(self.seed + self.epoch)
        self.epoch += 1
        idx = torch.randperm(n, generator=gen) if self.shuffle else torch.arange(n)
        for i in range(0, n, self.batch_size):
            yield self.x[idx[i : i + self.batch_size]]
