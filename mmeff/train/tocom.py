"""ToCom's training: self-distillation of the plug-in across ToMe degrees, the backbone frozen (ToCom's
recipe); :class:`Batches` is a re-iterable, resumable image batcher."""

from __future__ import annotations

import math
import random
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from mmeff.adapters.tocom import ToComAdapter
from mmeff.adapters.tome import ToMeAdapter
from mmeff.checkpoint import load_state, save_state
from mmeff.methods.tocom import ToCom, kd_loss
from mmeff.methods.tome import ToMe

__all__ = ["Batches", "train_tocom"]


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
    it; loss :func:`kd_loss`. ``data`` yields image batches ``(B, 3, H, W)`` (labels, if any, are
    ignored). With ``out_dir``, ``tocom.safetensors`` and ``train_state.pt`` (optimizer, epoch, RNG,
    history) are written after every epoch and a later call with ``resume=True`` continues from them.
    Returns the trained plug-in (in eval mode).
    """
    if iter(data) is data:  # type: ignore[comparison-overlap]
        raise TypeError(
            "data must be re-iterable (a DataLoader or a list of batches), not a one-shot iterator"
        )
    tocom = tocom if tocom is not None else ToCom.for_model(model, steps, step_rank, scale=scale)
    r_max = tocom.steps if r_max is None else int(r_max)
    if not 1 <= r_max <= tocom.steps:
        raise ValueError(f"r_max must be in [1, {tocom.steps}] (the plug-in's steps), got {r_max}")
    param = next(model.parameters())
    tocom.to(param.device)
    opt = torch.optim.AdamW(tocom.parameters(), lr=lr, weight_decay=weight_decay)
    start, history = 0, []
    out = Path(out_dir) if out_dir is not None else None
    rng = random.Random(seed)
    if (
        out is not None
        and resume
        and (out / "train_state.pt").is_file()
        and (out / "tocom.safetensors").is_file()
    ):
        tocom.load_state_dict(ToCom.load(out / "tocom.safetensors", device=param.device).state_dict())
        state = load_state(out / "train_state.pt", map_location=param.device)
        opt.load_state_dict(state["optimizer"])
        start, history = int(state["epoch"]) + 1, list(state["history"])
        rng.setstate(state["rng"])
        torch.set_rng_state(state["torch_rng"].cpu())
        if param.is_cuda and state.get("cuda_rng") is not None:
            torch.cuda.set_rng_state(state["cuda_rng"].cpu(), param.device)
    requires = {n: p.requires_grad for n, p in model.named_parameters()}
    was_training = model.training
    model.requires_grad_(False).eval()
    tome = ToMeAdapter(model, ToMe(r=0))
    tome.attach()
    handle = ToComAdapter(model, tocom.at(source=0, target=0, scale=tocom.scale))
    handle.attach()
    try:
        for epoch in range(start, epochs):
            tocom.train()
            if callable(getattr(data, "set_epoch", None)):
                data.set_epoch(epoch)  # type: ignore[attr-defined]
            total, count = 0.0, 0
            bar = tqdm(data, desc=f"ToCom epoch {epoch + 1}/{epochs}", disable=not progress, leave=False)
            for batch in bar:
                images = _images(batch).to(param.device, param.dtype)
                r_s, r_t = rng.sample(range(r_max + 1), 2)
                tome.set_r(r_s)
                handle.enabled = False
                with torch.no_grad():
                    teacher = _logits(model, images)
                tome.set_r(r_t)
                handle.enabled, handle.source, handle.target = True, r_s, r_t
                loss = kd_loss(_logits(model, images).float(), teacher.float(), tau)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += loss.item() * images.shape[0]
                count += images.shape[0]
                bar.set_postfix(loss=f"{total / count:.4f}")
            history.append({"epoch": epoch, "kd_loss": total / max(count, 1)})
            if out is not None:
                tocom.save(
                    out / "tocom.safetensors", extra={"epoch": epoch, "kd_loss": history[-1]["kd_loss"]}
                )
                save_state(
                    {
                        "optimizer": opt.state_dict(),
                        "epoch": epoch,
                        "history": history,
                        "rng": rng.getstate(),
                        "torch_rng": torch.get_rng_state(),
                        "cuda_rng": torch.cuda.get_rng_state(param.device) if param.is_cuda else None,
                    },
                    out / "train_state.pt",
                )
    finally:
        handle.detach()
        tome.detach()
        for n, p in model.named_parameters():
            p.requires_grad_(requires[n])
        model.train(was_training)
    tocom.history = history  # type: ignore[assignment]
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
