"""VisToG's two-stage training recipe on HF LLaVA or Qwen2-VL (the method is :mod:`mmeff.methods.vistog`)."""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from mmeff.api import apply
from mmeff.hosts import inner_model, projector
from mmeff.methods.vistog import VisToG

__all__ = ["TrainLog", "train_vistog"]


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


@dataclass
class TrainLog:
    """What one :func:`train_vistog` stage did."""

    stage: int
    steps: int
    seconds: float
    losses: list[float]
    trainable: int


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
    Loss: the model's next-token cross-entropy. Runs ``steps`` batches (cycling ``batches``).
    """
    if stage not in (1, 2):
        raise ValueError(f"stage must be 1 (alignment) or 2 (joint tuning), got {stage}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    params = _freeze(model, vistog, stage)
    lm_ids = {id(p) for p in model.model.language_model.parameters()} | {id(p) for p in model.lm_head.parameters()}
    groups = [{"params": [p for p in params if id(p) not in lm_ids], "lr": lr}]
    if stage == 2:
        groups.append({"params": [p for p in params if id(p) in lm_ids], "lr": lm_lr})
    opt = torch.optim.AdamW(groups, weight_decay=0.0)
    base = [g["lr"] for g in opt.param_groups]
    was_training = model.training
    model.train()
    vistog.train()
    losses: list[float] = []
    t0 = time.perf_counter()
    it = _cycle(batches)
    try:
        with apply(model, vistog):
            for step in tqdm(range(steps), desc=f"vistog stage {stage}", disable=not progress):
                scale = min(1.0, (step + 1) / warmup) if warmup else 1.0
                for g, b in zip(opt.param_groups, base):
                    g["lr"] = b * scale * 0.5 * (1 + math.cos(math.pi * step / steps))
                batch = next(it)
                out = model(**batch)
                if out.loss is None:
                    raise ValueError("train_vistog: the batch has no labels, so the model returned no loss")
                opt.zero_grad(set_to_none=True)
                out.loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                opt.step()
                losses.append(float(out.loss.detach()))
    finally:
        for p in model.parameters():
            p.requires_grad_(False)
        for p in vistog.parameters():
            p.requires_grad_(False)
        model.train(was_training)
        vistog.eval()
    return TrainLog(stage, len(losses), time.perf_counter() - t0, losses, sum(p.numel() for p in params))


def _cycle(batches: Iterable[Mapping[str, Tensor]]) -> Iterator[dict[str, Tensor]]:
    while True:
        empty = True
        for b in batches:
            empty = False
            yield dict(b)
        if empty:
            raise ValueError("train_vistog: batches is empty")
