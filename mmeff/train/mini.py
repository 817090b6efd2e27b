"""Training mmeff-mini's dual encoder and its SmolLM2 variant (``mmeff mini train --variant smollm``), and the
generated scene conversations every mini trainer shares.

* Data, generated on the fly from ``(seed, index)`` (workers render in parallel): captions for the dual
  encoder (:func:`scene_caption`), image / video question conversations (:class:`VLMData`; the questions of
  one scene: :func:`scene_questions`), and their padded batches (:func:`collate_conversations`).
* :func:`train_clip`: contrastive training of the dual encoder from scratch.
* :func:`train_llava`: the projector and rank-8 LoRA of ``mmeff-mini-smollm`` (the model itself:
  :func:`mmeff.models.mini.build_llava`), after a data-dependent projector start (:func:`init_projector`,
  :func:`align_projector`).
* :func:`main_train_smollm`: both stages into a folder with its ``manifest.json``.

The grounded default ``mmeff-mini`` is trained by :mod:`mmeff.train.grounding` / :mod:`mmeff.train.mini_recipe`.
"""

from __future__ import annotations

import json
import math
import os
import platform
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from mmeff.checkpoint import file_sha256, write_text_atomic
from mmeff.datasets.scenes import (
    CELLS,
    COLOURS,
    NUMBERS,
    SHAPES,
    WORDS,
    draw_options,
    scene_sample,
    scene_video_sample,
)
from mmeff.eval.answers import format_question
from mmeff.eval.scenes import accuracy_by_kind, answer_scenes, heldout_items
from mmeff.models.hf import build_prompt, llava_tokens_per_image, llava_visual_features
from mmeff.models.mini import (
    HELDOUT_SEED,
    TRAIN_SEED,
    VIDEO_FRAMES,
    WEIGHT_FILES,
    LoRA,
    build_llava,
    clip_tokenizer,
    create_clip,
    frame_indices,
    read_llava_file,
    save_clip,
    save_llava,
)
from mmeff.preprocess import llava_pixel_values

__all__ = [
    "scene_caption",
    "scene_questions",
    "chat_turn_text",
    "VLMData",
    "collate_conversations",
    "TrainLog",
    "device_name",
    "train_clip",
    "init_projector",
    "init_projector_from_features",
    "align_projector",
    "train_llava",
    "main_train_smollm",
]


# --------------------------------------------------------------------------------------------------
# Training data (generated on the fly from (seed, index); workers render in parallel)
# --------------------------------------------------------------------------------------------------


def scene_caption(objects: Sequence[Any], text: str | None, rng: np.random.Generator | None = None) -> str:
    """Caption of a rendered scene: every object as "a <colour> <shape> at <cell>", then the word.

    ``rng`` shuffles the object order (captions stay true whatever the order).
    """
    order = list(range(len(objects)))
    if rng is not None:
        rng.shuffle(order)
    parts = [f"a {'small ' if objects[i].size < 0.12 else ''}{objects[i].name()} at {objects[i].cell}" for i in order]
    out = ", ".join(parts) if parts else "nothing"
    if text:
        out += f", the word {text}"
    return out


class _ClipData(torch.utils.data.Dataset):
    def __init__(self, seed: int, n: int) -> None:
        self.seed, self.n = seed, n
        self.tok = None

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.tok is None:
            self.tok = clip_tokenizer()
        s = scene_sample(self.seed, i, photo_background=(i % 5 == 0))
        rng = np.random.default_rng([self.seed, i, 1])
        cap = scene_caption(s.objects, s.text, rng)
        return llava_pixel_values([s.image], 224)[0], self.tok([cap])[0]


def _qa_text(question: str, options: Sequence[str] | None, answer: str, mc: bool) -> tuple[str, str]:
    # Multiple-choice prompts are answered with the option's *text*, which `extract_option` maps back to
    # the option: copying a word from the context is a far easier target for a 135M LM trained on a few
    # thousand CPU samples than the extra indirection to a letter.
    return format_question(question, list(options) if mc and options else None), answer


def scene_questions(sample: Any, rng: np.random.Generator) -> list[tuple[str, list[str], str]]:
    """Every question of the image kinds that has one answer in ``sample``'s scene, worded as
    :func:`~mmeff.datasets.scenes.scene_sample` words them: ``[(question, options, answer), ...]``.

    Training asks several of them about one image (a multi-turn conversation), so each image's visual
    tokens are paid for once per several answers.
    """
    objs = sample.objects
    out: list[tuple[str, list[str], str]] = []
    for o in objs:
        if sum(x.shape == o.shape for x in objs) == 1:
            out.append((f"What colour is the {o.shape}?", draw_options(rng, o.colour, list(COLOURS)), o.colour))
        if sum(x.colour == o.colour for x in objs) == 1:
            out.append((f"What shape is the {o.colour} object?", draw_options(rng, o.shape, [*SHAPES, "star"]), o.shape))
        if sum(x.name() == o.name() for x in objs) == 1:
            out.append((f"Where is the {o.name()}?", draw_options(rng, o.cell, list(CELLS)), o.cell))
        if o.size < 0.12 and sum(x.shape == o.shape for x in objs) == 1:
            out.append((f"What colour is the small {o.shape}?", draw_options(rng, o.colour, list(COLOURS)), o.colour))
    for shape in SHAPES:
        n = sum(x.shape == shape for x in objs)
        if 1 <= n <= 4:
            out.append((f"How many {shape}s are there?", draw_options(rng, str(n), list(NUMBERS)), str(n)))
    if sample.text:
        out.append(("What word is written in the image?", draw_options(rng, sample.text, list(WORDS)), sample.text))
    return out


def chat_turn_text(tokenizer: Any) -> tuple[str, str]:
    """What ``tokenizer``'s chat template puts between an answer and the next question (with the newline
    after the end-of-turn token) and after that question, as text: the two pieces around a later turn's
    question in a multi-turn conversation. Raises ``ValueError`` for templates without that plain layout."""
    a = [{"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A1"}]
    full = tokenizer.apply_chat_template([*a, {"role": "user", "content": "Q2"}], tokenize=False,
                                         add_generation_prompt=True)
    prefix = tokenizer.apply_chat_template(a, tokenize=False)
    if not full.startswith(prefix) or "A1" not in prefix[-len("A1") - 16:]:
        raise ValueError("chat template has no plain multi-turn layout; ask one question per conversation")
    before, after = full[len(prefix):].split("Q2")
    return "\n" + before, after


class VLMData(torch.utils.data.Dataset):
    """Item ``i``: a scene image conversation (its own question first, then up to ``extra_turns`` more
    about the same image; ``video=False``) or one question about a 4-frame scene video."""

    def __init__(self, seed: int, n: int, tokenizer: Any, image_token_id: int, tokens_per_image: int,
                 eos_id: int, video: bool, extra_turns: int = 3) -> None:
        self.seed, self.n, self.tok = seed, n, tokenizer
        self.image_token_id, self.per_image, self.eos_id, self.video = image_token_id, tokens_per_image, eos_id, video
        self.extra_turns = extra_turns
        self._turn: tuple[str, str] | None = None

    def __len__(self) -> int:
        return self.n

    def _turn_text(self) -> tuple[str, str]:
        if self._turn is None:
            self._turn = chat_turn_text(self.tok)
        return self._turn

    def __getitem__(self, i: int) -> tuple[list[int], list[int], torch.Tensor]:
        rng = np.random.default_rng([self.seed, i, 2])
        if self.video:
            total = 100
            idx = [int(np.clip(f + rng.integers(-3, 4), 0, total - 1)) for f in frame_indices(total, VIDEO_FRAMES)]
            v = scene_video_sample(self.seed, i, frames=idx)
            frames, turns = list(v["frames"]), [(v["question"], v["options"], v["answer"])]
        else:
            s = scene_sample(self.seed, i, photo_background=(i % 5 == 0))
            frames, turns = [s.image], [(s.question, s.options, s.answer)]
            extra = [t for t in scene_questions(s, rng) if t[0] != s.question]
            k = int(rng.integers(0, self.extra_turns + 1)) if extra else 0
            turns += [extra[j] for j in rng.permutation(len(extra))[:k]]
        ids: list[int] = []
        labels: list[int] = []
        for t, (q, opts, a) in enumerate(turns):
            question, target = _qa_text(q, opts, a, mc=bool(rng.random() < 0.8))
            if t == 0:
                prompt = build_prompt(self.tok, question, 1, len(frames) * self.per_image, self.image_token_id)
            else:
                before, after = self._turn_text()
                prompt = self.tok(before + question + after, add_special_tokens=False)["input_ids"]
            answer = self.tok(target, add_special_tokens=False)["input_ids"] + [self.eos_id]
            ids += prompt + answer
            labels += [-100] * len(prompt) + answer
        return ids, labels, llava_pixel_values(frames, 224)


def collate_conversations(batch: Sequence[tuple[list[int], list[int], torch.Tensor]], pad: int,
                          visual_key: str = "pixel_values") -> dict[str, torch.Tensor]:
    """Right-pad ``(ids, labels, visual)`` rows: ``input_ids`` / ``labels`` (-100 on padding) /
    ``attention_mask`` (B, L), and every row's visual tensor (pixels (F, 3, S, S) or cached features
    (F, N, D)) concatenated in row order under ``visual_key``, the order LLaVA fills ``<image>`` positions."""
    n = max(len(ids) for ids, _, _ in batch)
    input_ids = torch.full((len(batch), n), pad, dtype=torch.long)
    mask = torch.zeros(len(batch), n, dtype=torch.long)
    labels = torch.full((len(batch), n), -100, dtype=torch.long)
    for r, (ids, lab, _) in enumerate(batch):
        input_ids[r, : len(ids)] = torch.tensor(ids)
        mask[r, : len(ids)] = 1
        labels[r, : len(lab)] = torch.tensor(lab)
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels,
            visual_key: torch.cat([v for _, _, v in batch])}


# --------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------


@dataclass
class TrainLog:
    """What a training stage did: steps, samples, seconds, final loss, hardware."""

    stage: str
    steps: int
    batch_size: int
    samples: int
    seconds: float
    final_loss: float
    device: str
    losses: list[float]


def _lr(step: int, total: int, base: float, warmup: int) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return base * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))


def device_name(device: torch.device) -> str:
    """The hardware a run used, for manifests: the CUDA device's name or "CPU (arch, N threads)"."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def _loader(ds: torch.utils.data.Dataset, batch: int, workers: int, collate: Any = None) -> Any:
    return torch.utils.data.DataLoader(
        ds, batch_size=batch, shuffle=False, num_workers=workers, collate_fn=collate,
        persistent_workers=workers > 0, prefetch_factor=4 if workers > 0 else None, drop_last=True,
    )


def train_clip(
    steps: int,
    *,
    batch_size: int = 256,
    lr: float = 1e-3,
    device: str | torch.device = "cpu",
    workers: int = 0,
    seed: int = TRAIN_SEED,
    log_every: int = 50,
) -> tuple[nn.Module, TrainLog]:
    """Contrastive (CLIP InfoNCE) training of the dual encoder from scratch on scene captions.

    Returns ``(model.eval(), log)``; bf16 autocast on CUDA. ``steps * batch_size`` scenes are generated
    from ``(seed, index)``.
    """
    device = torch.device(device)
    torch.manual_seed(seed)
    model = create_clip(None, device=device).train()
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.98), eps=1e-6)
    loader = _loader(_ClipData(seed, steps * batch_size), batch_size, workers)
    amp = device.type == "cuda"
    losses: list[float] = []
    t0 = time.perf_counter()
    bar = tqdm(loader, total=steps, desc="mini clip", unit="step")
    for step, (px, tok) in enumerate(bar):
        for g in opt.param_groups:
            g["lr"] = _lr(step, steps, lr, warmup=max(1, steps // 20))
        px, tok = px.to(device, non_blocking=True), tok.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            img, txt, scale = model(px, tok)
            logits = scale * img.float() @ txt.float().T
            target = torch.arange(len(px), device=device)
            loss = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        losses.append(float(loss.detach()))
        if step % log_every == 0:
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
    secs = time.perf_counter() - t0
    log = TrainLog("clip", steps, batch_size, steps * batch_size, secs, float(np.mean(losses[-20:])),
                   device_name(device), losses[::max(1, steps // 200)])
    return model.eval(), log


@torch.no_grad()
def init_projector(model: nn.Module, pixel_values: torch.Tensor) -> dict[str, float]:
    """:func:`init_projector_from_features` on the tower's features of ``pixel_values`` (N, 3, S, S)."""
    return init_projector_from_features(model, llava_visual_features(model, pixel_values).flatten(0, 1))


@torch.no_grad()
def init_projector_from_features(model: nn.Module, feats: torch.Tensor) -> dict[str, float]:
    """Data-dependent start for LLaVA's projector: standardise the tower's features, match the LM's scale.

    ``linear_1`` is rescaled by the features' per-channel std with its bias centring them, and ``linear_2``
    scaled so visual tokens start at the mean norm of the LM's (non-zero) word embeddings. ``feats``
    (N, D) are tower features of training images; returns the output norms before and after.
    """
    proj = model.model.multi_modal_projector
    feats = feats.float()
    before = float(proj(feats.to(proj.linear_1.weight.dtype)).norm(dim=-1).mean())
    mu, sd = feats.mean(0), feats.std(0).clamp_min(1e-6)
    w1 = proj.linear_1.weight / sd[None, :]
    proj.linear_1.weight.copy_(w1)
    proj.linear_1.bias.copy_(-(w1 @ mu))
    norms = model.get_input_embeddings().weight.norm(dim=-1)
    target = float(norms[norms > 0].mean())  # rows left at zero (unused tokens) are no word's scale
    got = float(proj(feats).norm(dim=-1).mean())
    proj.linear_2.weight.mul_(target / got)
    proj.linear_2.bias.mul_(target / got)
    out = proj(feats)
    return {"norm_before": before, "norm_after": float(out.norm(dim=-1).mean()), "word_norm": target,
            "relative_spread": float(out.std(0).norm() / out.mean(0).norm().clamp_min(1e-6))}


def _patch_words(sample: Any, grid: int) -> list[list[str]]:
    # the words for each patch (row-major): the covering object's colour and shape, the written word, or
    # "background"; boxes are the objects' bounding squares, the word's box its rendered line
    out = []
    for r in range(grid):
        for c in range(grid):
            x, y = (c + 0.5) / grid, (r + 0.5) / grid
            words = ["background"]
            for o in sample.objects:
                if abs(x - o.cx) <= o.size / 2 and abs(y - o.cy) <= o.size / 2:
                    words = [o.colour, o.shape]
            if sample.text and 0.78 <= y <= 0.97 and abs(x - 0.5) <= 0.06 * len(sample.text):
                words = [sample.text]
            out.append(words)
    return out


def align_projector(
    model: nn.Module, tokenizer: Any, steps: int, *, batch_size: int = 32, lr: float = 1e-3,
    seed: int = TRAIN_SEED, device: str | torch.device = "cpu",
) -> list[float]:
    """Stage 1.5, without the LM: teach the projector to put each visual token near the word embeddings of
    what its patch shows ("red" + "circle", the written word, or "background"), read from the scene
    description. The LM then starts from visual tokens it can already read as words. Cosine loss; only the
    projector trains. Returns the losses.
    """
    device = torch.device(device)
    emb = model.get_input_embeddings().weight.detach()
    cache: dict[str, torch.Tensor] = {}

    def word(w: str) -> torch.Tensor:
        if w not in cache:
            ids = tokenizer(" " + w, add_special_tokens=False)["input_ids"]
            cache[w] = emb[ids].float().mean(0)
        return cache[w]

    grid = model.config.vision_config.image_size // model.config.vision_config.patch_size
    proj = model.model.multi_modal_projector
    for p in proj.parameters():
        p.requires_grad_(True)
    opt = torch.optim.AdamW(proj.parameters(), lr=lr, weight_decay=0.0)
    losses = []
    for step in tqdm(range(steps), desc="mini align", unit="step"):
        for g in opt.param_groups:
            g["lr"] = _lr(step, steps, lr, warmup=max(1, steps // 20))
        samples = [scene_sample(seed + 7, step * batch_size + j, photo_background=(j % 5 == 0))
                   for j in range(batch_size)]
        px = llava_pixel_values([s.image for s in samples], 224).to(device)
        with torch.no_grad():
            feats = llava_visual_features(model, px).float()
            target = torch.stack([torch.stack([sum(word(w) for w in ws) / len(ws) for ws in _patch_words(s, grid)])
                                  for s in samples]).to(device)
        out = proj(feats)
        loss = (1 - F.cosine_similarity(out, target, dim=-1)).mean() + (out.norm(dim=-1) / target.norm(dim=-1) - 1).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


def _answer_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    # run the LM trunk, then the (tied, 49k-row) head only where an answer token is predicted
    out = model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                      pixel_values=batch["pixel_values"])
    h = out.last_hidden_state[:, :-1]
    labels = batch["labels"][:, 1:]
    keep = labels != -100
    logits = model.lm_head(h[keep])
    return F.cross_entropy(logits.float(), labels[keep])


def train_llava(
    model: nn.Module,
    tokenizer: Any,
    steps: int,
    *,
    batch_size: int = 32,
    video_every: int = 3,
    video_batch_size: int = 8,
    lr: float = 1e-3,
    lora_lr: float = 5e-4,
    device: str | torch.device = "cpu",
    workers: int = 0,
    seed: int = TRAIN_SEED,
    log_every: int = 20,
    time_limit: float | None = None,
    init_from: str | Path | None = None,
    align_steps: int = 0,
) -> tuple[LoRA, TrainLog]:
    """Train the projector and LM LoRA of an assembled mini LLaVA on scene image and video questions.

    The vision tower and every LM weight stay frozen; every ``video_every``-th step is a batch of
    ``video_batch_size`` 4-frame video questions. Prompts are multiple choice (4 in 5, as ``mmeff eval``
    asks) or open; the target is the answer's words either way; loss only on the answer tokens and EOS. Returns ``(lora, log)``, the projector
    trained in place; bf16 autocast on CUDA. ``time_limit`` (seconds) stops early; the log's ``steps``
    then says how many ran. ``init_from`` (a file :func:`save_llava` wrote) continues from its projector
    and LoRA factors instead of a fresh start (pass another ``seed`` for new questions).
    """
    device = torch.device(device)
    torch.manual_seed(seed)
    model.to(device).train()
    for p in model.parameters():
        p.requires_grad_(False)
    eos = model.generation_config.eos_token_id
    eos = int(eos[0] if isinstance(eos, (list, tuple)) else eos)
    per_image = llava_tokens_per_image(model.config)
    n_video = steps // video_every + 1 if video_every else 0
    img_ds = VLMData(seed, steps * batch_size, tokenizer, model.config.image_token_id, per_image, eos, video=False)
    vid_ds = VLMData(seed, n_video * video_batch_size, tokenizer, model.config.image_token_id, per_image, eos,
                      video=True)
    lm = model.model.language_model
    lora = LoRA(lm).to(device)
    if init_from is not None:
        sd = read_llava_file(init_from)[0]
        model.model.multi_modal_projector.load_state_dict(
            {k[len("projector."):]: v for k, v in sd.items() if k.startswith("projector.")}, strict=True)
        lora.load_state_dict({k[len("lora."):]: v for k, v in sd.items() if k.startswith("lora.")}, strict=True)
    else:
        init_projector(model, torch.cat([img_ds[j][2] for j in range(32)]).to(device))
        if align_steps:
            align_projector(model, tokenizer, align_steps, device=device, seed=seed)
    proj = list(model.model.multi_modal_projector.parameters())
    for p in proj:
        p.requires_grad_(True)
    opt = torch.optim.AdamW([{"params": proj, "lr": lr}, {"params": list(lora.parameters()), "lr": lora_lr}],
                            weight_decay=0.0)
    base = [g["lr"] for g in opt.param_groups]
    pad = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos)

    def collate(b: list[Any]) -> dict[str, torch.Tensor]:
        return collate_conversations(b, pad)

    img_it = iter(_loader(img_ds, batch_size, workers, collate))
    vid_it = iter(_loader(vid_ds, video_batch_size, max(1, workers // 2) if workers else 0, collate))
    amp = device.type == "cuda"
    losses: list[float] = []
    t0 = time.perf_counter()
    bar = tqdm(range(steps), desc="mini llava", unit="step")
    with lora.attached(lm):
        for step in bar:
            for g, b in zip(opt.param_groups, base):
                g["lr"] = _lr(step, steps, b, warmup=max(1, steps // 20))
            batch = next(vid_it) if video_every and step % video_every == video_every - 1 else next(img_it)
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                loss = _answer_loss(model, batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(proj + list(lora.parameters()), 1.0)
            opt.step()
            losses.append(float(loss.detach()))
            if step % log_every == 0:
                bar.set_postfix(loss=f"{losses[-1]:.3f}")
            if time_limit is not None and time.perf_counter() - t0 > time_limit:
                print(f"time limit: stopped after {step + 1} of {steps} steps")
                break
    steps = len(losses)
    model.eval()
    for p in proj:
        p.requires_grad_(False)
    secs = time.perf_counter() - t0
    log = TrainLog("llava", steps, batch_size, steps * batch_size, secs, float(np.mean(losses[-20:])),
                   device_name(device), losses[::max(1, steps // 200)])
    return lora, log


# --------------------------------------------------------------------------------------------------
# `mmeff mini train`
# --------------------------------------------------------------------------------------------------


def main_train_smollm(
    out: str | Path,
    *,
    device: str = "auto",
    clip_steps: int = 3000,
    clip_batch: int = 256,
    llava_steps: int = 3000,
    llava_batch: int = 32,
    video_batch: int = 8,
    workers: int | None = None,
    eval_per_kind: int = 40,
    cache_dir: str | Path | None = None,
    skip_clip: bool = False,
    time_limit: float | None = None,
    continue_llava: bool = False,
    align_steps: int = 200,
) -> dict[str, Any]:
    """The SmolLM2 variant (``mmeff-mini-smollm``): train the dual encoder and the projector + LoRA into
    ``out`` and write ``manifest.json`` (hashes, steps,
    hardware, held-out accuracy). ``skip_clip`` reuses ``out/mmeff-mini-clip.safetensors`` (its
    training log from ``out/manifest.json`` when present); ``time_limit`` caps the LLaVA stage (seconds);
    ``continue_llava`` trains on from ``out/mmeff-mini-llava.safetensors`` (logged as a further stage)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                       ("cpu" if device == "auto" else device))
    workers = workers if workers is not None else min(12, max(0, (os.cpu_count() or 1) - 2))
    logs: dict[str, Any] = {}
    clip_file = out / WEIGHT_FILES["clip"]
    if skip_clip:
        clip = create_clip(clip_file)
        if (out / "manifest.json").is_file():
            logs["clip"] = json.loads((out / "manifest.json").read_text()).get("train", {}).get("clip")
    else:
        clip, log = train_clip(clip_steps, batch_size=clip_batch, device=dev, workers=workers)
        save_clip(clip, clip_file)
        logs["clip"] = log.__dict__
        print(f"clip: {log.steps} steps in {log.seconds:.0f} s, final loss {log.final_loss:.3f}")
        clip = create_clip(clip_file)  # continue from the fp16 values that ship
        write_text_atomic(out / "manifest.json", json.dumps({"train": logs}, indent=1))
        if llava_steps == 0:
            return {"train": logs}
    init = out / WEIGHT_FILES["llava"] if continue_llava else None
    if init is not None:
        if not init.is_file():
            raise FileNotFoundError(f"--continue needs {init} from an earlier run")
        previous = json.loads((out / "manifest.json").read_text()).get("train", {})
        logs["llava_runs"] = [*previous.get("llava_runs", []), previous["llava"]]
    model, tokenizer, _ = build_llava(cache_dir, clip=clip, llava=None)
    lora, log = train_llava(model, tokenizer, llava_steps, batch_size=llava_batch, video_batch_size=video_batch,
                            device=dev, workers=workers, time_limit=time_limit, init_from=init,
                            seed=TRAIN_SEED + len(logs.get("llava_runs", [])),  # a continuation sees new data
                            align_steps=align_steps)
    logs["llava"] = log.__dict__
    print(f"llava: {log.steps} steps in {log.seconds:.0f} s, final loss {log.final_loss:.3f}")
    llava_file = save_llava(model, lora, out / WEIGHT_FILES["llava"])
    del model
    model, tokenizer, _ = build_llava(cache_dir, clip=clip_file, llava=llava_file)
    model.to(dev)
    results = answer_scenes(model, tokenizer, heldout_items(eval_per_kind), batch_size=16, progress=True)
    acc = accuracy_by_kind(results)
    print("held-out accuracy:", json.dumps({k: round(v, 3) for k, v in acc.items()}))
    command = (f"mmeff mini train --out DIR --clip-steps {clip_steps} --clip-batch {clip_batch} "
               f"--align-steps {align_steps} --llava-steps {llava_steps} --llava-batch {llava_batch} "
               f"--video-batch {video_batch}"
               + (f" --time-limit {time_limit:g}" if time_limit else "")
               + (" --skip-clip --continue" if continue_llava else ""))
    commands = [command]
    if continue_llava:
        commands = [*json.loads((out / "manifest.json").read_text()).get("command", "").split(" && "), command]
    manifest = {
        "files": {p.name: {"sha256": file_sha256(p), "bytes": p.stat().st_size} for p in (clip_file, llava_file)},
        "trained_on": logs.get("llava", {}).get("device", str(dev)),
        "command": " && ".join(commands),
        "train": logs,
        "heldout_accuracy": {"n_per_kind": eval_per_kind, "seed": HELDOUT_SEED, **acc},
        "torch": torch.__version__,
    }
    write_text_atomic(out / "manifest.json", json.dumps(manifest, indent=1))
    return manifest
