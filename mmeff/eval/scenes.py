"""mmeff-mini's held-out check: the scene questions it never trained on, how a model answers them, and the
accuracy per question kind.

:func:`heldout_items` generates the split in memory (seed :data:`mmeff.models.mini.HELDOUT_SEED`; video
questions on the frames ``mmeff eval`` decodes), :func:`answer_scenes` answers it greedily with any LLaVA-style
model (optionally under a reduction method, :func:`mmeff.api.apply`), :func:`accuracy_by_kind` scores it.
Training uses it for its curves; ``mmeff bench`` runs the full table.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from mmeff.api import apply
from mmeff.core import TokenReducer
from mmeff.datasets.scenes import IMAGE_KINDS, VIDEO_KINDS, scene_sample, scene_video_sample
from mmeff.eval.answers import extract_option, format_question
from mmeff.eval.videoqa import rows_visual_tokens
from mmeff.models.hf import chat_batch, llava_tokens_per_image
from mmeff.models.mini import HELDOUT_SEED, VIDEO_FRAMES, frame_indices

__all__ = ["answer_scenes", "heldout_items", "accuracy_by_kind"]


@torch.no_grad()
def answer_scenes(
    model: nn.Module,
    tokenizer: Any,
    items: Sequence[dict[str, Any]],
    *,
    reducer: Any = None,
    batch_size: int = 8,
    max_new_tokens: int = 4,
    progress: bool = False,
    **apply_options: Any,
) -> list[dict[str, Any]]:
    """Greedy multiple-choice answers for generated scene items (``frames``, ``question``, ``options``,
    ``answer``, ``kind``): each item's frames are one run of visual tokens, built by
    :func:`mmeff.models.hf.chat_batch` with ``tokenizer`` (the model's processor, or a chat tokenizer).
    Returns per item ``kind``, ``pred`` (text), ``choice`` (option index or None), ``correct``,
    ``visual_tokens``."""
    cfg = model.config
    param = next(model.parameters())
    # Eve's config says how many tokens its projector leaves; LLaVA's are the tower's patches
    per_image = int(getattr(cfg, "tokens_per_image", 0) or llava_tokens_per_image(cfg))
    tok = getattr(tokenizer, "tokenizer", tokenizer)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    out: list[dict[str, Any]] = []
    chunks = [items[i : i + batch_size] for i in range(0, len(items), batch_size)]
    for chunk in tqdm(chunks, desc="answer", unit="batch", disable=not progress):
        batch = chat_batch(tokenizer, [format_question(it["question"], it["options"]) for it in chunk],
                           [np.stack(it["frames"]) for it in chunk], cfg)
        batch = {k: v.to(param.device, dtype=param.dtype if v.is_floating_point() else None)
                 for k, v in batch.items()}
        kw = {"max_new_tokens": max_new_tokens, "do_sample": False, "pad_token_id": pad}
        if reducer is None:
            gen = model.generate(**batch, **kw)
            visual = [len(it["frames"]) * per_image for it in chunk]
        else:
            # the questions reach question-guided reducers (Free Video-LLM) through the LLaVA adapter
            text = {"mmeff_text": [it["question"] for it in chunk]} if isinstance(reducer, TokenReducer) else {}
            with apply(model, reducer, **apply_options) as handle:
                gen = model.generate(**batch, **kw, **text)
            visual = _visual_counts(handle, chunk, per_image) if text else [len(it["frames"]) * per_image
                                                                            for it in chunk]
        texts = tok.batch_decode(gen[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
        for it, text, vt in zip(chunk, texts, visual):
            choice = extract_option(text, it["options"])
            out.append({"kind": it["kind"], "pred": text.strip(), "choice": choice, "visual_tokens": vt,
                        "correct": choice is not None and it["options"][choice] == it["answer"]})
    return out


def _visual_counts(handle: Any, chunk: Sequence[dict[str, Any]], per_image: int) -> list[int]:
    # what each row kept after a question-guided reducer; one frame count per batch keeps rows aligned
    frames = {len(it["frames"]) for it in chunk}
    if len(frames) != 1:
        raise ValueError("a batch must hold items with the same number of frames")
    n = frames.pop()
    return rows_visual_tokens(handle, len(chunk), n, n * per_image)


def heldout_items(
    n_per_kind: int, *, image: bool = True, video: bool = True, seed: int = HELDOUT_SEED
) -> list[dict[str, Any]]:
    """The held-out split: ``n_per_kind`` image questions of every kind (``image``) and video questions
    of every kind (``video``; 4 frames at the segment midpoints), generated in memory from ``seed``."""
    if n_per_kind < 1 or not (image or video):
        raise ValueError(f"need n_per_kind >= 1 and image or video, got {n_per_kind}, {image}, {video}")
    items = []
    for i in range(n_per_kind * len(IMAGE_KINDS) if image else 0):
        s = scene_sample(seed, i, photo_background=(i % 5 == 0))
        items.append({"frames": [s.image], "question": s.question, "options": s.options, "answer": s.answer,
                      "kind": s.kind, "id": s.id})
    if video:
        for i in range(n_per_kind * len(VIDEO_KINDS)):
            v = scene_video_sample(seed, i, frames=frame_indices(100, VIDEO_FRAMES))
            items.append({"frames": list(v["frames"]), "question": v["question"], "options": v["options"],
                          "answer": v["answer"], "kind": v["kind"], "id": f"scene-video-s{seed}-{i}"})
    return items


def accuracy_by_kind(results: Sequence[dict[str, Any]]) -> dict[str, float]:
    """``{kind: accuracy}`` plus ``"image"``, ``"video"`` and ``"all"`` means over items."""
    acc: dict[str, float] = {}
    groups = {k: [r for r in results if r["kind"] == k] for k in (*IMAGE_KINDS, *VIDEO_KINDS)}
    groups["image"] = [r for r in results if r["kind"] in IMAGE_KINDS]
    groups["video"] = [r for r in results if r["kind"] in VIDEO_KINDS]
    groups["all"] = list(results)
    for k, rs in groups.items():
        if rs:
            acc[k] = sum(r["correct"] for r in rs) / len(rs)
    return acc
