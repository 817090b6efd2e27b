"""VisToG's two-stage training recipe on HF LLaVA or Qwen2-VL (the method is :mod:`mmeff.methods.vistog`),
run by the library's loop (:func:`mmeff.train.loop.train_steps`)."""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from mmeff.api import apply
from mmeff.hosts import inner_model, projector
from mmeff.methods.vistog import VisToG
from mmeff.train.loop import BaseTrainConfig, train_steps

__all__ = ["TrainLog", "VisToGTrainConfig", "train_vistog"]


def _freeze(model: nn.Module, vistog: VisToG, stage: int) -> list[nn.Parameter]:
    """Trainable parameters of ``stage`` (1: VisToG + projector; 2: also the LLM); the rest frozen."""
    for p in model.parameters():
        p.requires_grad_(False)
    inner = inner_model(model)
    # LLaVA's MLP, or Qwen2-VL's PatchMerger (which the semantic tokens also pass)
    groups = [vistog, projector(model)] + ([inner.language_model, model.lm_head] if stage == 2 else [])
    params: dict[int, nn.Parameter] = {}
    for g in groups:
        for p in g.parameters():
            p.requires_grad_(True)
            params[id(p)] = p
    return list(params.values())


@dataclass(kw_only=True)
class VisToGTrainConfig(BaseTrainConfig):
    """One stage of :func:`train_vistog`: ``steps`` AdamW steps (no weight decay, gradients clipped to norm 1),
    ``lr`` for VisToG and the projector and ``lm_lr`` for the LLM (stage 2), both on a linear warm-up over
    ``warmup`` steps times a cosine decay to 0. The batches come ready, so ``batch_size`` and ``workers``
    are not read; the global RNG (the Gumbel noise) is the caller's, so neither is ``seed``."""

    stage: int
    steps: int
    lr: float = 1e-3
    lm_lr: float = 2e-5
    warmup: int = 0

    def __post_init__(self) -> None:
        if self.stage not in (1, 2):
            raise ValueError(f"stage must be 1 (alignment) or 2 (joint tuning), got {self.stage}")
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")

    def rate(self, step: int) -> float:
        """The factor on each group's rate at ``step``: warm-up times cosine."""
        warm = min(1.0, (step + 1) / self.warmup) if self.warmup else 1.0
        return warm * 0.5 * (1 + math.cos(math.pi * step / self.steps))


@dataclass
class TrainLog:
    """What one :func:`train_vistog` stage did."""

    stage: int
    steps: int
    seconds: float
    losses: list[float]
    trainable: int


class _Cycled:
    """``steps`` batches of ``batches``, re-iterated as often as it takes (a sized pass for the loop)."""

    def __init__(self, batches: Iterable[Mapping[str, Tensor]], steps: int) -> None:
        self.batches, self.steps = batches, steps

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[dict[str, Tensor]]:
        return itertools.islice(_cycle(self.batches), self.steps)


def train_vistog(
    model: nn.Module,
    vistog: VisToG,
    batches: Iterable[Mapping[str, Tensor]],
    *,
    stage: int,
    steps: int,
    lr: float = 1e-3,
    lm_lr: float = 2e-5,
    warmup: int = 0,
    progress: bool = True,
) -> TrainLog:
    """One stage of VisToG's two-stage recipe on HF LLaVA or Qwen2-VL (vision tower frozen throughout).

    ``stage=1`` (alignment): semantic tokens, grouping layer and projector (Qwen2-VL: the PatchMerger)
    learn, at ``lr``; the LLM is
    frozen. ``stage=2`` (joint tuning): the LLM (and its head) also learns, at ``lm_lr``. ``batches``
    yields the host's inputs with the *unreduced* image placeholders (LLaVA: ``input_ids``,
    ``attention_mask``, ``labels`` with -100 where no loss, ``pixel_values``; Qwen2-VL adds its grid and
    ``mm_token_type_ids``); VisToG shrinks them to M per image.
    Loss: the model's next-token cross-entropy. Runs ``steps`` batches (cycling ``batches``) on
    :func:`~mmeff.train.loop.train_steps` (:class:`VisToGTrainConfig`; no checkpoints, the model stays
    where it is).
    """
    cfg = VisToGTrainConfig(stage=stage, steps=steps, lr=lr, lm_lr=lm_lr, warmup=warmup)
    params = _freeze(model, vistog, stage)
    lm_ids = {id(p) for p in model.model.language_model.parameters()} | {id(p) for p in model.lm_head.parameters()}
    groups = [{"params": [p for p in params if id(p) not in lm_ids], "lr": lr}]
    if stage == 2:
        groups.append({"params": [p for p in params if id(p) in lm_ids], "lr": lm_lr})
    base = [g["lr"] for g in groups]
    # VisToG first: the trainable parameters in _freeze's order (what the gradient norm sums over)
    both = nn.ModuleDict({"vistog": vistog, "host": model})
    was_training = model.training

    def loss_fn(net: nn.Module, batch: dict[str, Any], step: int, device: torch.device) -> dict[str, Tensor]:
        out = model(**batch)
        if out.loss is None:
            raise ValueError("train_vistog: the batch has no labels, so the model returned no loss")
        return {"loss": out.loss}

    try:
        with apply(model, vistog):
            history = train_steps(
                both, _Cycled(batches, steps), None, cfg, loss_fn, progress=progress, log=lambda _: None,
                ddp_forward=False, steps=steps, save_every=1,
                optimizer=lambda _: torch.optim.AdamW(groups, weight_decay=0.0),
                lr_schedule=lambda step: [b * cfg.rate(step) for b in base], batched=True,
                device=next(model.parameters()).device, reseed=False, desc=f"vistog stage {stage}",
            )
    finally:
        for p in model.parameters():
            p.requires_grad_(False)
        for p in vistog.parameters():
            p.requires_grad_(False)
        model.train(was_training)
        vistog.eval()
    losses = [row["loss"] for row in history["log"]]
    return TrainLog(stage, len(losses), history["train_seconds"], losses, sum(p.numel() for p in params))


def _cycle(batches: Iterable[Mapping[str, Tensor]]) -> Iterator[dict[str, Tensor]]:
    while True:
        empty = True
        for b in batches:
            empty = False
            yield dict(b)
        if empty:
            raise ValueError("train_vistog: batches is empty")
