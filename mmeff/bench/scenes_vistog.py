"""VisToG for the scenes bench: stage-1 training on the training split's scene questions, and its cache.

:func:`train_scene_vistog` builds a fresh :class:`~mmeff.methods.vistog.VisToG` with M groups and runs stage 1 of
:func:`~mmeff.train.vistog.train_vistog` (semantic tokens, grouping layer and the projector learn; the vision
tower and the LLM stay frozen) on conversations about generated scenes of split
:data:`mmeff.models.mini.TRAIN_SEED`: one image and one of its questions (:func:`mmeff.train.mini.scene_questions`) in
the evaluation's exact prompt (lettered options), the target the answer's words and the end-of-turn
token, as mmeff-mini itself is trained. Stage 1 changes the projector, so the trained projector is kept
beside the VisToG weights and swapped in only while VisToG runs (:meth:`TrainedVisToG.in_place`); the
model's own projector is restored right after training.

:func:`load_or_train_vistog` caches both files (safetensors, VisToG's own format) under
``cache_dir/bench-scenes-vistog/`` keyed by the model's weight hashes and the training settings, so a
second ``mmeff bench`` reuses them.
"""

from __future__ import annotations

import copy
import hashlib
import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from mmeff.checkpoint import read_module, save_module
from mmeff.datasets.scenes import scene_sample
from mmeff.eval.answers import format_question
from mmeff.methods.vistog import VisToG
from mmeff.models.cache import atomic_write_cache, cache_complete, default_cache_dir, read_cache_meta
from mmeff.models.hf import build_prompt, left_pad_batch, llava_tokens_per_image
from mmeff.models.mini import TRAIN_SEED, expected_hashes
from mmeff.preprocess import llava_pixel_values
from mmeff.train.mini import scene_questions
from mmeff.train.vistog import train_vistog

__all__ = ["TrainedVisToG", "scene_vistog_batches", "train_scene_vistog", "load_or_train_vistog", "model_key"]

_SUBDIR = "bench-scenes-vistog"
_RECIPE = 1  # bump when the batches or the training change, so old caches are not reused
_PROJECTOR_FORMAT = "mmeff-scenes-vistog-projector/1"


@dataclass
class TrainedVisToG:
    """A stage-1 VisToG with the projector it was trained with; ``record``: steps, seconds, final loss,
    settings, whether it came from the cache, and where the files are."""

    vistog: VisToG
    projector: dict[str, Tensor] = field(repr=False)
    record: dict[str, Any]

    @property
    def num_groups(self) -> int:
        """M: the visual tokens per image (per frame of a video) the LLM reads."""
        return self.vistog.num_groups

    def describe(self) -> str:
        """Table label."""
        return f"vistog(M={self.num_groups})"

    @contextmanager
    def in_place(self, model: nn.Module) -> Iterator[None]:
        """Swap the trained projector into ``model`` for the duration (VisToG's grouped tokens need the
        projector they were trained with); the original comes back on exit, even on error."""
        proj = model.model.multi_modal_projector
        original = {k: v.detach().clone() for k, v in proj.state_dict().items()}
        proj.load_state_dict(self.projector, strict=True)
        try:
            yield
        finally:
            proj.load_state_dict(original, strict=True)


def _eos_id(model: nn.Module, tokenizer: Any) -> int:
    eos = model.generation_config.eos_token_id
    if eos is None:
        eos = tokenizer.eos_token_id
    return int(eos[0] if isinstance(eos, (list, tuple)) else eos)


def scene_vistog_batches(
    model: nn.Module, tokenizer: Any, *, batch_size: int = 16, seed: int | None = None
) -> Iterator[dict[str, Any]]:
    """Endless stage-1 batches for a LLaVA model: per row one training-split scene image and one of its
    questions (with lettered options, as the bench asks), left-padded.

    The answer (its words and the end-of-turn token) is the end of every row, so only the last ``K + 1``
    positions need logits: ``labels`` is ``(B, K + 1)`` (-100 off the answer) with ``logits_to_keep=K + 1``.
    This skips the 49k-row LM head on every prompt position, the bulk of a step's cost otherwise, and it
    survives VisToG shrinking the image placeholders, which sit before the tail. ``tokenizer``: the chat
    tokenizer or a processor holding it.
    """
    tokenizer = getattr(tokenizer, "tokenizer", tokenizer)  # rows are built token by token, with labels
    seed = TRAIN_SEED if seed is None else seed
    cfg = model.config
    per_image = llava_tokens_per_image(cfg)
    eos = _eos_id(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    index = 0
    while True:
        rows, answers, images = [], [], []
        for _ in range(batch_size):
            s = scene_sample(seed, index, photo_background=(index % 5 == 0))
            rng = np.random.default_rng([seed, index, 17])
            turns = [(s.question, list(s.options), s.answer), *scene_questions(s, rng)]
            q, options, answer = turns[int(rng.integers(len(turns)))]
            answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"] + [eos]
            rows.append(build_prompt(tokenizer, format_question(q, options), 1, per_image, cfg.image_token_id)
                        + answer_ids)
            answers.append(answer_ids)
            images.append(s.image)
            index += 1
        batch: dict[str, Any] = left_pad_batch(rows, pad)
        k = max(len(a) for a in answers)
        labels = torch.full((batch_size, k + 1), -100, dtype=torch.long)
        for r, a in enumerate(answers):
            labels[r, k + 1 - len(a):] = torch.tensor(a)
        batch["labels"] = labels
        batch["logits_to_keep"] = k + 1
        batch["pixel_values"] = llava_pixel_values(images, cfg.vision_config.image_size)
        yield batch


def train_scene_vistog(
    model: nn.Module,
    tokenizer: Any,
    num_groups: int,
    *,
    steps: int,
    batch_size: int = 16,
    lr: float = 1e-3,
    seed: int | None = None,
    progress: bool = True,
) -> TrainedVisToG:
    """Stage 1 of VisToG (:func:`mmeff.train.vistog.train_vistog`) on :func:`scene_vistog_batches`; ``model``'s
    projector is left as it was (the trained one is returned beside the VisToG)."""
    seed = TRAIN_SEED if seed is None else seed
    torch.manual_seed(seed)
    vistog = VisToG.for_model(model, num_groups=num_groups)
    proj = model.model.multi_modal_projector
    original = {k: v.detach().clone() for k, v in proj.state_dict().items()}
    try:
        log = train_vistog(model, vistog, scene_vistog_batches(model, tokenizer, batch_size=batch_size, seed=seed),
                           stage=1, steps=steps, lr=lr, warmup=max(1, steps // 10), progress=progress)
        trained = {k: v.detach().clone() for k, v in proj.state_dict().items()}
    finally:
        proj.load_state_dict(original, strict=True)
    record = {"num_groups": num_groups, "stage": 1, "steps": log.steps, "seconds": log.seconds,
              "batch_size": batch_size, "lr": lr, "seed": seed, "trainable_parameters": log.trainable,
              "first_loss": float(np.mean(log.losses[:5])), "final_loss": float(np.mean(log.losses[-10:])),
              "losses": log.losses[:: max(1, len(log.losses) // 50)], "data": "training-split scene images, "
              "one question each (answer tokens only in the loss)", "cached": False}
    return TrainedVisToG(vistog.eval(), trained, record)


def model_key(model_name: str, info: dict[str, Any]) -> dict[str, Any]:
    """What identifies the model a cached VisToG was trained on: the shipped weights' sha256 for the
    default model, else its name and path (a checkpoint changed in place is not noticed)."""
    if model_name == "default":
        return {"name": "default", "weights": dict(sorted(expected_hashes().items()))}
    return {"name": model_name, "path": info.get("path")}


def load_or_train_vistog(
    model: nn.Module,
    tokenizer: Any,
    num_groups: int,
    *,
    key: dict[str, Any],
    steps: int,
    batch_size: int = 16,
    lr: float = 1e-3,
    cache_dir: str | Path | None = None,
    progress: bool = True,
) -> TrainedVisToG:
    """The cached stage-1 VisToG for ``key`` (:func:`model_key`) and these settings, trained and cached
    first when missing. ``record["cached"]`` says which; ``record["seconds"]`` is the original training time."""
    if steps < 1:
        raise ValueError(f"VisToG training steps must be >= 1, got {steps}")
    expect = {"artefact": _SUBDIR, "recipe": _RECIPE, "model": key, "num_groups": num_groups, "steps": steps,
              "batch_size": batch_size, "lr": lr, "seed": TRAIN_SEED}
    digest = hashlib.sha256(json.dumps(expect, sort_keys=True).encode()).hexdigest()[:16]
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    final = root / _SUBDIR / f"M{num_groups}-{digest}"
    wall = None
    if not cache_complete(final, expect):
        t0 = time.perf_counter()
        trained = train_scene_vistog(model, tokenizer, num_groups, steps=steps, batch_size=batch_size, lr=lr,
                                     progress=progress)
        proj = copy.deepcopy(model.model.multi_modal_projector)
        proj.load_state_dict(trained.projector)

        def write(tmp: Path) -> None:
            trained.vistog.save(tmp / "vistog.safetensors", extra={"record": trained.record})
            save_module(proj, tmp / "projector.safetensors", _PROJECTOR_FORMAT, {"num_groups": num_groups})

        atomic_write_cache(final, write, {**expect, "info": trained.record})
        wall = time.perf_counter() - t0
    param = next(model.parameters())
    vistog = VisToG.load(final / "vistog.safetensors", device=param.device).to(param.dtype).eval()
    _, _, state = read_module(final / "projector.safetensors", _PROJECTOR_FORMAT, "a scenes-bench VisToG projector")
    # read back what was written (also when just trained): the bench runs the weights a rerun would reuse
    record = {**read_cache_meta(final)["info"], "cached": wall is None, "path": str(final)}
    if wall is not None:
        record["wall_seconds"] = wall
    return TrainedVisToG(vistog, {k: v.to(param.device, param.dtype) for k, v in state.items()}, record)
