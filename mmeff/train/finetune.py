"""Fine-tuning a VLM with a reducer in place.

Some methods change what the LLM sees enough that the paper tunes the model briefly with the method on
(Fourier-VLM fine-tunes the projector, optionally the LLM, with its DCT filter in place). :func:`finetune`
does that for any mmeff reducer on the HF LLaVA / Qwen2-VL classes: it attaches the reducer with
``mmeff.apply`` (so placeholders, labels and positions shrink exactly as at inference), freezes every
part not named in ``train``, and runs AdamW on the supervised loss of batches that carry ``labels``.

Data: :func:`conversation_ids` turns a chat (``[{"role": "user", "content": "<image>\\n..."}, ...]``) into
token ids with labels only on the assistant turns; :func:`load_llava_json` reads LLaVA's instruction-tuning
JSON; :func:`llava_sft_batches` batches them for a LLaVA model. ``mmeff finetune`` wires these together.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor, nn
from tqdm.auto import tqdm

from mmeff.api import apply
from mmeff.core import TokenReducer
from mmeff.hfconfig import pad_token_id
from mmeff.models.hf import llava_tokens_per_image
from mmeff.preprocess import llava_pixel_values

__all__ = [
    "PARTS",
    "FinetuneResult",
    "conversation_ids",
    "finetune",
    "llava_sft_batches",
    "load_llava_json",
    "model_parts",
]

#: Names accepted by ``finetune(train=...)``.
PARTS = ("projector", "llm", "vision", "lm_head")

IGNORE_INDEX = -100
IMAGE_MARKER = "<image>"


def model_parts(model: nn.Module) -> dict[str, nn.Module]:
    """The trainable parts of a LLaVA or Qwen2-VL model by name (see :data:`PARTS`).

    ``vision`` is the encoder without the projector; for Qwen2-VL the projector is the PatchMerger.
    """
    inner = getattr(model, "model", None)
    lm_head = getattr(model, "lm_head", None)
    if inner is None or lm_head is None or getattr(inner, "language_model", None) is None:
        raise TypeError(f"finetune supports HF LLaVA / Qwen2-VL style models, got {type(model).__name__}")
    if getattr(inner, "multi_modal_projector", None) is not None:
        return {
            "projector": inner.multi_modal_projector,
            "llm": inner.language_model,
            "vision": inner.vision_tower,
            "lm_head": lm_head,
        }
    visual = getattr(inner, "visual", None)
    if visual is not None and getattr(visual, "merger", None) is not None:
        return {"projector": visual.merger, "llm": inner.language_model, "vision": visual, "lm_head": lm_head}
    raise TypeError(f"cannot find the projector of {type(model).__name__}")


def _select_parameters(model: nn.Module, train: Sequence[str]) -> list[tuple[str, nn.Parameter]]:
    if isinstance(train, str):
        train = (train,)
    unknown = [t for t in train if t not in PARTS]
    if unknown or not train:
        raise ValueError(f"train must name parts among {PARTS}, got {list(train)}")
    parts = model_parts(model)
    chosen: dict[int, tuple[str, nn.Parameter]] = {}
    ids_of = {name: {id(p) for p in module.parameters()} for name, module in parts.items()}
    for name, p in model.named_parameters():
        if not p.is_floating_point():
            continue
        owners = {part for part, ids in ids_of.items() if id(p) in ids}
        # Qwen2-VL's "vision" contains the merger: training vision without projector excludes it
        if "projector" in owners and "projector" not in train:
            continue
        if owners & set(train):
            chosen[id(p)] = (name, p)
    if not chosen:
        raise ValueError(f"no floating-point parameters found in parts {list(train)}")
    return list(chosen.values())


@dataclass
class FinetuneResult:
    """What :func:`finetune` did.

    Attributes:
        losses: mean training loss of each optimizer step.
        steps: optimizer steps taken.
        trainable: names of the parameters that were updated.
        num_trainable: their total number of elements.
        stats: the adapter's stats of the last forward (visual tokens in/out, stage).
    """

    losses: list[float]
    steps: int
    trainable: list[str]
    num_trainable: int
    stats: dict[str, Any] = field(default_factory=dict)


def finetune(
    model: nn.Module,
    reducer: TokenReducer | None,
    batches: Iterable[Mapping[str, Any]],
    *,
    train: Sequence[str] = ("projector",),
    steps: int | None = None,
    lr: float = 2e-5,
    weight_decay: float = 0.0,
    warmup_steps: int = 0,
    grad_accum: int = 1,
    max_grad_norm: float | None = 1.0,
    progress: bool = True,
    **adapter_options: Any,
) -> FinetuneResult:
    """Train ``train`` parts of ``model`` on ``batches`` with ``reducer`` attached (in place).

    Args:
        model: HF ``LlavaForConditionalGeneration`` / ``Qwen2VLForConditionalGeneration`` (or 2.5).
        reducer: the method kept on during training (``None`` tunes the plain model, as a control).
        batches: model-forward kwargs with ``input_ids`` ``(B, L)``, pixels and ``labels`` ``(B, L)``
            (``-100`` where no loss is taken); iterated until ``steps`` optimizer steps are done or it ends.
        train: parts to update, from :data:`PARTS` (paper: ``("projector",)`` or ``("projector", "llm")``).
        steps: optimizer steps (``None``: one pass over ``batches``).
        lr, weight_decay: AdamW settings; ``warmup_steps``: linear warm-up, then constant.
        grad_accum: micro-batches per optimizer step.
        max_grad_norm: gradient clipping (``None`` disables it).
        progress: show a tqdm bar with the loss.
        **adapter_options: forwarded to ``mmeff.apply`` (e.g. ``stage=``, ``mrope=``).

    Returns:
        :class:`FinetuneResult`. ``requires_grad`` flags and train/eval mode are restored afterwards.
    """
    if steps is not None and (isinstance(steps, bool) or steps < 1):
        raise ValueError(f"steps must be a positive int or None, got {steps!r}")
    if grad_accum < 1:
        raise ValueError(f"grad_accum must be >= 1, got {grad_accum}")
    if lr <= 0:
        raise ValueError(f"lr must be positive, got {lr}")
    params = _select_parameters(model, train)
    flags = {id(p): p.requires_grad for p in model.parameters()}
    was_training = model.training
    for p in model.parameters():
        p.requires_grad_(False)
    for _, p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW([p for _, p in params], lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / (warmup_steps + 1)))
    losses: list[float] = []
    stats: dict[str, Any] = {}
    total = steps * grad_accum if steps is not None else _len_or_none(batches)
    bar = tqdm(total=total, desc="finetune", unit="batch", disable=not progress)
    ctx = apply(model, reducer, **adapter_options) if reducer is not None else contextlib.nullcontext()
    try:
        model.train()
        with torch.enable_grad(), ctx as handle:
            micro, acc = 0, 0.0
            opt.zero_grad(set_to_none=True)
            for i, batch in enumerate(batches):
                if "labels" not in batch or batch["labels"] is None:
                    raise ValueError(f"batch {i} has no labels; finetune needs supervised batches")
                out = model(**batch)
                loss = out.loss
                if loss is None or not torch.isfinite(loss):
                    raise FloatingPointError(f"loss is {loss} at batch {i} (step {len(losses)})")
                (loss / grad_accum).backward()
                acc += float(loss.detach()) / grad_accum
                micro += 1
                bar.update(1)
                if micro == grad_accum:
                    if max_grad_norm is not None:
                        torch.nn.utils.clip_grad_norm_([p for _, p in params], max_grad_norm)
                    opt.step()
                    sched.step()
                    opt.zero_grad(set_to_none=True)
                    losses.append(acc)
                    bar.set_postfix(loss=f"{acc:.4f}")
                    micro, acc = 0, 0.0
                    if steps is not None and len(losses) >= steps:
                        break
            if handle is not None:
                stats = dict(handle.stats)
    finally:
        bar.close()
        for p in model.parameters():
            p.requires_grad_(flags[id(p)])
        model.train(was_training)
    if not losses:
        raise ValueError(f"batches ran out before one optimizer step ({grad_accum} micro-batches needed)")
    return FinetuneResult(
        losses=losses,
        steps=len(losses),
        trainable=[n for n, _ in params],
        num_trainable=sum(p.numel() for _, p in params),
        stats=stats,
    )


def _len_or_none(x: Any) -> int | None:
    try:
        return len(x)
    except TypeError:
        return None


# --------------------------------------------------------------------------------------------- data


def conversation_ids(
    tokenizer: Any,
    messages: Sequence[Mapping[str, str]],
    *,
    image_token_id: int,
    tokens_per_image: int,
) -> tuple[list[int], list[int]]:
    """Chat-template ``messages`` into ``(input_ids, labels)`` with loss only on assistant turns.

    ``messages`` alternate ``{"role": "user"|"assistant", "content": str}``; every ``<image>`` marker in a
    user turn becomes ``tokens_per_image`` copies of ``image_token_id``. Each assistant turn's span is found
    by templating the conversation up to it with and without the reply, so any chat template whose
    prefixes are stable (ChatML, Llama, Qwen) works; one that rewrites earlier turns is a ``ValueError``.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("tokenizer has no chat_template; conversation_ids needs an instruction-tuned tokenizer")
    if not messages or messages[-1].get("role") != "assistant":
        raise ValueError("a training conversation must end with an assistant turn")
    for i, m in enumerate(messages):
        if m.get("role") not in ("user", "assistant", "system") or not isinstance(m.get("content"), str):
            raise ValueError(f"message {i} must be {{'role': user|assistant|system, 'content': str}}, got {m!r}")
        if m["role"] == "assistant" and IMAGE_MARKER in m["content"]:
            raise ValueError(f"message {i}: assistant turns cannot contain {IMAGE_MARKER}")

    def render(upto: int, gen: bool) -> str:
        return tokenizer.apply_chat_template(list(messages[:upto]), tokenize=False, add_generation_prompt=gen)

    def encode(text: str) -> list[int]:
        ids: list[int] = []
        for j, piece in enumerate(text.split(IMAGE_MARKER)):
            if j > 0:
                ids += [int(image_token_id)] * tokens_per_image
            if piece:
                ids += tokenizer(piece, add_special_tokens=False)["input_ids"]
        return ids

    full = render(len(messages), False)
    ids = encode(full)
    labels = [IGNORE_INDEX] * len(ids)
    for k, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before, after = render(k, True), render(k + 1, False)
        if not (full.startswith(after) and after.startswith(before)):
            raise ValueError("the chat template rewrites earlier turns; cannot locate assistant spans")
        start, end = len(encode(before)), len(encode(after))
        labels[start:end] = ids[start:end]
    if all(v == IGNORE_INDEX for v in labels):
        raise ValueError("no assistant tokens to train on")
    return ids, labels


def load_llava_json(path: str | Path, image_folder: str | Path | None = None) -> list[dict[str, Any]]:
    """Read LLaVA's instruction-tuning JSON into ``[{"images": [Path], "messages": [...]}, ...]``.

    Each record is ``{"image": "rel/path.jpg" (or a list), "conversations": [{"from": "human"|"gpt",
    "value": "..."}]}``; ``from`` becomes ``user``/``assistant``. Image paths are resolved against
    ``image_folder`` (default: the JSON's folder) and must exist.
    """
    path = Path(path)
    try:
        records = json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"no such data file: {path}") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(records, list) or not records:
        raise ValueError(f"{path} must hold a non-empty JSON list of records")
    folder = Path(image_folder) if image_folder is not None else path.parent
    roles = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
    out = []
    for i, r in enumerate(records):
        conv = r.get("conversations") if isinstance(r, dict) else None
        if not isinstance(conv, list) or not conv:
            raise ValueError(f"record {i} of {path} has no 'conversations' list")
        messages = []
        for turn in conv:
            role = roles.get(str(turn.get("from", "")).lower())
            if role is None:
                raise ValueError(f"record {i}: unknown speaker {turn.get('from')!r} (expected human/gpt)")
            messages.append({"role": role, "content": str(turn.get("value", ""))})
        names = r.get("image")
        names = [] if names is None else ([names] if isinstance(names, str) else list(names))
        images = [folder / n for n in names]
        missing = [str(p) for p in images if not p.is_file()]
        if missing:
            raise ValueError(f"record {i}: image file(s) not found: {missing}")
        markers = sum(m["content"].count(IMAGE_MARKER) for m in messages)
        if markers != len(images):
            raise ValueError(f"record {i}: {markers} {IMAGE_MARKER} markers but {len(images)} images")
        out.append({"images": images, "messages": messages})
    return out


def _read_rgb(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as im:
            return np.array(im.convert("RGB"))
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"cannot read image {path}: {e}") from None


def llava_sft_batches(
    model: nn.Module,
    tokenizer: Any,
    records: Sequence[Mapping[str, Any]],
    *,
    batch_size: int = 1,
    image_processor: Any = None,
    epochs: int = 1,
    seed: int = 0,
) -> Iterator[dict[str, Tensor]]:
    """Right-padded supervised batches for a LLaVA model from :func:`load_llava_json` records.

    Yields ``input_ids``/``attention_mask``/``labels`` ``(B, L)`` and ``pixel_values`` ``(N_img, 3, S, S)``
    (CLIP preprocessing at the tower's size, or ``image_processor`` when given, e.g. a checkpoint's own).
    Records are shuffled per epoch with ``seed``.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    cfg = model.config
    per_image = llava_tokens_per_image(cfg)
    pad = pad_token_id(cfg)
    dtype = next(model.parameters()).dtype
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        order = torch.randperm(len(records), generator=gen).tolist()
        for s in range(0, len(order), batch_size):
            chunk = [records[j] for j in order[s : s + batch_size]]
            rows, labs, imgs = [], [], []
            for r in chunk:
                ids, lab = conversation_ids(
                    tokenizer, r["messages"], image_token_id=cfg.image_token_id, tokens_per_image=per_image
                )
                rows.append(ids)
                labs.append(lab)
                imgs += [_read_rgb(Path(p)) for p in r["images"]]
            width = max(len(x) for x in rows)
            batch = {
                "input_ids": torch.tensor([x + [pad] * (width - len(x)) for x in rows]),
                "attention_mask": torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in rows]),
                "labels": torch.tensor([x + [IGNORE_INDEX] * (width - len(x)) for x in labs]),
            }
            if imgs:
                if image_processor is not None:
                    px = image_processor(imgs, return_tensors="pt")["pixel_values"]
                else:
                    px = llava_pixel_values(imgs, int(cfg.vision_config.image_size))
                batch["pixel_values"] = px.to(dtype)
            yield batch

