"""ToCom's training: self-distillation of the plug-in across ToMe degrees, the backbone frozen (ToCom's
recipe), run by the library's loop (:func:`mmeff.train.loop.train_steps`, epochs over the caller's batches);
:class:`Batches` is a re-iterable, resumable image batcher.

The defaults are the official recipe (``JieShibo/ToCom`` ``main.py`` / ``engine.py`` / ``losses.py``, DeiT's
loop): the student forward in train mode with stochastic depth 0.1 (timm's linear rule over the blocks)
and the teacher in eval mode; AdamW at 2e-3 (its 1e-3 scaled by batch 1,024 / 512), weight decay 0.05,
cosine to 1e-5 by epoch (timm's scheduler stepped after each epoch, so epochs 0 and 1 both run at the
peak); the KL summed and divided by ``B · C`` (DeiT's legacy reduction).

Differences from the official code (each measured on ``mmeff bench tocom``; README):

* ``recipe="mmeff"`` is the recipe this library used before issue 35: backbone in eval mode (no drop
  path), AdamW at a constant 1e-3, KL per image (``batchmean``). Kept as an option, not the default: on
  ``mmeff bench tocom`` it averages -0.84 points against ToMe alone over the mismatched degrees, the
  official recipe +0.47 (+0.36 without drop path). The KL's reduction only scales the loss, which AdamW
  undoes (the KD gap of the tests' tiny ViT moves by 3e-7).
* The pair ``(r_s, r_t)`` is drawn from a seeded ``random.Random`` replayed on resume (the official draws
  from Python's global ``random``, unseeded), so a resumed run is exact.
* No mixed precision, EMA or mixup (the official inherits DeiT's defaults: EMA and mixup only touch the
  unused label loss and the discarded EMA copy; with ``alpha=1`` mixup still mixes the images the student
  and teacher both see; mmeff takes the caller's batches as they are).
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable, Iterator, Mapping, Sized
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from mmeff.adapters.tocom import ToComAdapter
from mmeff.adapters.tome import ToMeAdapter
from mmeff.checkpoint import load_state, save_state
from mmeff.hosts import is_timm_vit
from mmeff.methods.tocom import ToCom, kd_loss
from mmeff.methods.tome import ToMe
from mmeff.train.distributed import init_distributed
from mmeff.train.loop import BaseTrainConfig, train_steps

__all__ = ["RECIPES", "Batches", "ToComTrainConfig", "train_tocom"]

STATE = "train_state.pt"  # the loop's resumable state; the weights also go to tocom.safetensors

#: the two recipes :func:`train_tocom` knows (module docstring)
RECIPES: dict[str, dict[str, Any]] = {
    "official": {"lr": 2e-3, "schedule": "cosine", "min_lr": 1e-5, "train_mode": True, "drop_path": 0.1,
                 "kd_reduction": "mean"},
    "mmeff": {"lr": 1e-3, "schedule": "constant", "min_lr": 1e-3, "train_mode": False, "drop_path": 0.0,
              "kd_reduction": "batchmean"},
}


@dataclass(kw_only=True)
class ToComTrainConfig(BaseTrainConfig):
    """The settings of :func:`train_tocom` (defaults: ToCom's official recipe, module docstring).

    ``data`` comes batched, so ``batch_size`` and ``workers`` are not read. ``r_max``: the largest ToMe degree
    sampled; ``scale``: the plug-in's delta scale while training; ``tau``: the distillation temperature;
    ``schedule``: ``"cosine"`` (to ``min_lr``, by epoch) or ``"constant"``; ``train_mode``: the student's
    forward in train mode; ``drop_path``: stochastic depth of a timm ViT's last block while training (0: as
    the model was built); ``kd_reduction``: see :func:`~mmeff.methods.tocom.kd_loss`."""

    epochs: int = 10
    lr: float = 2e-3
    weight_decay: float = 0.05
    clip_grad: float = 0.0
    tau: float = 1.0
    r_max: int = 16
    scale: float = 0.1
    schedule: str = "cosine"
    min_lr: float = 1e-5
    train_mode: bool = True
    drop_path: float = 0.1
    kd_reduction: str = "mean"

    # more epochs lengthen the run without changing what was done; a resumed run may set them
    resume_may_change = BaseTrainConfig.resume_may_change | {"epochs"}
    def __post_init__(self) -> None:
        if self.schedule not in ("cosine", "constant"):
            raise ValueError(f"schedule must be 'cosine' or 'constant', got {self.schedule!r}")
        if not 0.0 <= self.drop_path < 1.0:
            raise ValueError(f"drop_path must be in [0, 1), got {self.drop_path}")

    @classmethod
    def saved_before(cls, data: Mapping[str, Any]) -> dict[str, Any]:
        """Runs saved before the recipe fields trained with the mmeff recipe at their saved, constant lr."""
        if "schedule" in data:
            return {}
        mmeff = RECIPES["mmeff"]
        return {**{k: v for k, v in mmeff.items() if k != "lr"}, "min_lr": data.get("lr", mmeff["lr"])}

    def lr_at_epoch(self, epoch: int) -> float:
        """The learning rate of epoch ``epoch``: cosine from ``lr`` to ``min_lr`` over ``epochs``, read at
        ``epoch - 1`` from the second epoch on (DeiT steps timm's scheduler after each epoch)."""
        if self.schedule == "constant":
            return self.lr
        t = max(epoch - 1, 0) / max(self.epochs, 1)
        return self.min_lr + (self.lr - self.min_lr) * 0.5 * (1 + math.cos(math.pi * t))


@contextmanager
def _stochastic_depth(model: nn.Module, rate: float) -> Iterator[None]:
    """Give a timm ViT's blocks drop path ``linspace(0, rate, depth)`` (timm's rule, DeiT's 0.1 at the
    last block) where they were built without, for the ``with`` block; other hosts are left as they are."""
    swapped: list[tuple[nn.Module, str, nn.Module]] = []
    if rate > 0 and is_timm_vit(model):
        blocks = model.blocks
        from timm.layers import DropPath  # a timm host: timm is installed

        for i, blk in enumerate(blocks):
            p = rate * i / max(len(blocks) - 1, 1)
            for name in ("drop_path1", "drop_path2"):
                cur = getattr(blk, name, None)
                if p > 0 and isinstance(cur, nn.Identity):
                    swapped.append((blk, name, cur))
                    setattr(blk, name, DropPath(p))
    try:
        yield
    finally:
        for blk, name, cur in swapped:
            setattr(blk, name, cur)


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
    lr: float | None = None,
    weight_decay: float = 0.05,
    scale: float = 0.1,
    tau: float = 1.0,
    recipe: str = "official",
    drop_path: float | None = None,
    out_dir: str | Path | None = None,
    resume: bool = True,
    seed: int = 0,
    progress: bool = True,
) -> ToCom:
    """Train a ToCom for ``model`` by self-distillation (ToCom's recipe; backbone frozen).

    Each step samples ``(r_s, r_t)`` in ``[0, r_max]²`` with ``r_s ≠ r_t`` (the same in every block);
    the student is ``model`` at ToMe(r_t) with ToCom(s→t), the teacher ``model`` at ToMe(r_s) without
    it; loss :func:`kd_loss`. ``recipe``: ``"official"`` (ToCom's: student in train mode with drop path
    0.1, cosine from ``lr`` = 2e-3 to 1e-5, per-logit KL) or ``"mmeff"`` (eval mode, constant ``lr`` =
    1e-3, per-image KL); ``lr=None`` and ``drop_path=None`` take the recipe's (a timm ViT of a few blocks
    may want less drop path than DeiT-B's 0.1). ``data`` is a sized re-iterable of image batches ``(B, 3, H, W)`` (a
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
    if recipe not in RECIPES:
        raise ValueError(f"recipe must be one of {sorted(RECIPES)}, got {recipe!r}")
    settings = {**RECIPES[recipe], **{k: v for k, v in (("lr", lr), ("drop_path", drop_path)) if v is not None}}
    if settings["schedule"] == "constant":
        settings["min_lr"] = settings["lr"]
    cfg = ToComTrainConfig(epochs=epochs, weight_decay=weight_decay, tau=tau, r_max=r_max, scale=tocom.scale,
                           seed=seed, **settings)
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
        model.eval()  # the teacher: ToMe(r_s), no plug-in, no drop path
        with torch.no_grad():
            teacher = _logits(model, images)
        tome.set_r(r_t)
        handle.enabled, handle.source, handle.target = True, r_s, r_t
        model.train(cfg.train_mode)
        loss = kd_loss(_logits(model, images).float(), teacher.float(), cfg.tau, cfg.kd_reduction)
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
        with _stochastic_depth(model, cfg.drop_path if cfg.train_mode else 0.0):
            history = train_steps(
                tocom, data, out, cfg, loss_fn, resume=resume, progress=progress, log=lambda _: None,
                ddp_forward=False, history_extra={"epochs": []}, steps=epochs * per_epoch, save_every=per_epoch,
                optimizer=lambda m: torch.optim.AdamW(m.parameters(), lr=cfg.lr, weight_decay=weight_decay),
                lr_schedule=lambda step: cfg.lr_at_epoch(step // per_epoch), on_log=end_epoch, batched=True,
                device=param.device, reseed=False, checkpoint=STATE, desc="ToCom",
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
