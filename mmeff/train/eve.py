"""Training Eve (:mod:`mmeff.models.eve`): the paper's three stages on rendered scenes, with the library's
step loop (resumable, DDP under ``torchrun``).

1 ``align``: the projector alone on scene captions (lr 1e-3); 2 ``instruct``: image question conversations
(the paper tunes the LM too; here the projector by default, so the text path stays the base LM's; ``train=``
adds more); 3 ``experts``: inserts the experts when missing and trains the copied experts, routers, mixing
coefficients and adapters, everything else frozen. :func:`answer_loss` scores held-out conversations.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmeff.datasets.scenes import scene_sample
from mmeff.models.eve import STAGES, EveForConditionalGeneration
from mmeff.models.hf import build_prompt
from mmeff.preprocess import llava_pixel_values
from mmeff.train.distributed import init_distributed
from mmeff.train.loop import StepTrainConfig, train_steps
from mmeff.train.mini import VLMData, collate_conversations, scene_caption

__all__ = ["EveTrainConfig", "SceneCaptions", "stage_dataset", "train_stage", "answer_loss"]

_STAGE_PARTS = {"align": ("projector",), "instruct": ("projector",), "experts": ("experts", "adapters")}
_STAGE_LR = {"align": 1e-3, "instruct": 1e-3, "experts": 1e-4}


@dataclass(kw_only=True)
class EveTrainConfig(StepTrainConfig):
    """One training stage (``align``, ``instruct`` or ``experts``; the one positional field). ``lr`` and
    ``train`` (the parts that train, see :meth:`EveForConditionalGeneration.set_trainable`) default per
    stage: projector at 1e-3 for stages 1-2, experts and adapters at 1e-4 for stage 3."""

    stage: str = field(default="instruct", kw_only=False)
    steps: int = 100
    lr: float | None = None  # type: ignore[assignment]  # None: the stage's default
    min_lr: float = 0.0
    warmup_steps: int = 5
    save_every: int = 50
    seed: int = 1234
    train: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.stage not in STAGES:
            raise ValueError(f"stage must be one of {STAGES}, got {self.stage!r}")
        if self.lr is None:
            self.lr = _STAGE_LR[self.stage]
        self.train = tuple(self.train) if self.train is not None else _STAGE_PARTS[self.stage]
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError(f"need steps >= 1 and batch_size >= 1, got {self.steps}, {self.batch_size}")


class SceneCaptions(torch.utils.data.Dataset):
    """Stage-1 data: item ``i`` is a rendered scene (:mod:`mmeff.datasets.scenes`, seed ``seed``) with the
    prompt "Describe the image." and its generated description as the answer: ``(ids, labels, pixels)``."""

    def __init__(self, seed: int, n: int, tokenizer: Any, image_token_id: int, tokens_per_image: int, eos_id: int,
                 image_size: int) -> None:
        self.seed, self.n, self.tok = seed, n, tokenizer
        self.image_token_id, self.per_image, self.eos_id, self.image_size = (image_token_id, tokens_per_image, eos_id,
                                                                             image_size)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[list[int], list[int], Tensor]:
        s = scene_sample(self.seed, i, photo_background=(i % 5 == 0))
        caption = scene_caption(s.objects, s.text, np.random.default_rng([self.seed, i, 3]))
        prompt = build_prompt(self.tok, "Describe the image.", 1, self.per_image, self.image_token_id)
        answer = self.tok(caption, add_special_tokens=False)["input_ids"] + [self.eos_id]
        return prompt + answer, [-100] * len(prompt) + answer, llava_pixel_values([s.image], self.image_size)


class _Items(torch.utils.data.Dataset):
    # the mini VLM's scene conversations at this model's image size (VLMData renders 224 px)
    def __init__(self, base: torch.utils.data.Dataset, image_size: int) -> None:
        self.base, self.image_size = base, image_size

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> Any:
        ids, labels, px = self.base[i]
        if px.shape[-1] != self.image_size:
            px = F.interpolate(px, size=(self.image_size, self.image_size), mode="bicubic", align_corners=False)
        return ids, labels, px


def stage_dataset(model: EveForConditionalGeneration, tokenizer: Any, stage: str, n: int, seed: int
                  ) -> torch.utils.data.Dataset:
    """The rendered-scene data of ``stage``: captions (``align``) or image question conversations."""
    cfg = model.config
    eos = model.generation_config.eos_token_id
    eos = int(eos[0] if isinstance(eos, (list, tuple)) else eos)
    size = cfg.vision_config.image_size
    if stage == "align":
        return SceneCaptions(seed, n, tokenizer, cfg.image_token_id, cfg.tokens_per_image, eos, size)
    return _Items(VLMData(seed, n, tokenizer, cfg.image_token_id, cfg.tokens_per_image, eos, video=False), size)


def train_stage(
    model: EveForConditionalGeneration,
    tokenizer: Any,
    out_dir: str | Path,
    cfg: EveTrainConfig,
    *,
    dataset: torch.utils.data.Dataset | None = None,
    resume: bool = True,
    progress: bool = True,
    save_model: bool = True,
    stop_after: int | None = None,
) -> dict[str, Any]:
    """Run one stage (:class:`EveTrainConfig`) with the library's step loop (resumable from
    ``out_dir/last.pt``, which holds only the trainable parameters; DDP under ``torchrun``). Stage
    ``experts`` inserts the experts first when the model has none. ``dataset`` items are ``(ids, labels,
    pixels)`` (default: :func:`stage_dataset`, ``steps * batch`` items). Writes ``out_dir/model``
    (``save_pretrained`` with the tokenizer) unless ``save_model=False``; ``stop_after`` returns after that
    many steps of this call (a later call resumes). Returns the history."""
    if cfg.stage == "experts" and not model.experts:
        model.add_experts()
    parts = tuple(cfg.train or ())
    if parts == _STAGE_PARTS[cfg.stage] and not model.adapters:
        parts = tuple(p for p in parts if p != "adapters")  # the stage default, on a model without adapters
    names = model.set_trainable(parts)
    _, world, _ = init_distributed()
    data = dataset if dataset is not None else stage_dataset(model, tokenizer, cfg.stage,
                                                             cfg.steps * cfg.batch_size * world, cfg.seed)
    pad = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else model.config.text_config.pad_token_id)

    def collate(batch: list[Any]) -> dict[str, Tensor]:
        return collate_conversations(batch, pad)

    def loss_fn(net: nn.Module, batch: dict[str, Tensor], step: int, device: torch.device) -> dict[str, Tensor]:
        batch = {k: v.to(device) for k, v in batch.items()}
        out = net(**batch, loss_only=True)
        parts = {"loss": out.loss, "lm": out.lm_loss.detach()}
        if out.aux_loss is not None:
            parts["aux"] = out.aux_loss.detach()
        return parts

    model.vision_tower.eval()
    history = train_steps(model, data, out_dir, cfg, loss_fn, resume=resume, progress=progress, stop_after=stop_after,
                          find_unused_parameters=True, collate_fn=collate, trainable_only=True,
                          history_extra={"stage": cfg.stage, "trainable": len(names),
                                         "trainable_parameters": sum(p.numel() for p in model.parameters()
                                                                     if p.requires_grad)})
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    if save_model and init_distributed()[0] == 0:
        model.save_pretrained(Path(out_dir) / "model")
        tokenizer.save_pretrained(Path(out_dir) / "model")
    return history


@torch.no_grad()
def answer_loss(model: EveForConditionalGeneration, tokenizer: Any, n: int = 64, seed: int = 0,
                batch_size: int = 8) -> float:
    """Mean cross-entropy (nats per answer token) on ``n`` held-out scene conversations (seed ``seed``)."""
    data = stage_dataset(model, tokenizer, "instruct", n, seed)
    pad = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0)
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for i in range(0, n, batch_size):
        batch = {k: v.to(device) for k, v in collate_conversations([data[j] for j in range(i, min(n, i + batch_size))],
                                                           pad).items()}
        labels = batch.pop("labels")
        logits = model(**batch).logits[:, :-1].float()
        target = labels[:, 1:]
        keep = target != -100
        total += float(F.cross_entropy(logits[keep], target[keep], reduction="sum"))
        count += int(keep.sum())
    return total / max(1, count)
