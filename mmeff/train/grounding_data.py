"""The data of the grounded mmeff-mini recipe (:mod:`mmeff.train.grounding`): dense per-patch labels read
from the scene label map, and the question conversations the small LM trains on over cached tower features.

* Dense tower stage: :func:`patch_targets` (what lies under each patch, for every head of :data:`HEADS`),
  :class:`TowerData` (rendered pictures with those targets).
* Which patches answer a question: :func:`patch_owners`, :func:`question_patches` (attention supervision),
  :func:`attribute_words` (the words a visual token should carry, for the projector's alignment).
* LM stage: :class:`FeaturePool` (cached features), :class:`PoolRender` (the pictures behind it), the
  one-object curriculum (:func:`single_object_scene`), :class:`LMData` conversations, :func:`collate_lm`,
  :func:`scene_vocabulary`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from mmeff.datasets.scenes import (
    CELLS,
    COLOURS,
    DIRECTIONS,
    NUMBERS,
    SHAPES,
    TEXT_LABEL,
    WORDS,
    SceneObject,
    after_pool,
    draw_options,
    label_map,
    render,
    scene_sample,
    scene_video_sample,
)
from mmeff.eval.answers import format_question
from mmeff.models.hf import build_prompt
from mmeff.models.mini import VIDEO_FRAMES, frame_indices
from mmeff.preprocess import llava_pixel_values
from mmeff.train.mini import chat_turn_text, collate_conversations, scene_questions

__all__ = [
    "HEADS",
    "patch_targets",
    "patch_owners",
    "question_patches",
    "TowerData",
    "video_questions",
    "FeaturePool",
    "Scene",
    "single_object_scene",
    "PoolRender",
    "collate_pool",
    "LMData",
    "collate_lm",
    "scene_vocabulary",
    "attribute_words",
]

#: per-patch (and per-image, read at every patch) classification targets of the dense tower stage
HEADS: dict[str, int] = {
    "colour": 7, "shape": 4, "size": 3, "cell": 10, "centre": 2, "word": 11,
    "n_circle": 7, "n_square": 7, "n_triangle": 7, "n_all": 7,
}
_MIN_PIXELS = 40  # an object owns a patch where it covers at least this many of its 784 pixels
_MIN_INK = 12  # a word owns a patch where this many of its pixels are ink


def _patch_pixels(objects: Sequence[Any], text: str | None, size: int, grid: int) -> np.ndarray:
    """``(grid*grid, len(objects) + 1)`` int: per patch, how many pixels of each object's visible surface and
    (last column) of the written word the label map puts there."""
    lab = label_map(objects, size, text)
    p = size // grid
    blocks = lab[: grid * p, : grid * p].reshape(grid, p, grid, p).transpose(0, 2, 1, 3).reshape(grid * grid, -1)
    return np.stack([(blocks == k + 1).sum(1) for k in range(len(objects))] + [(blocks == TEXT_LABEL).sum(1)], 1)


def patch_targets(objects: Sequence[Any], text: str | None, size: int = 224, grid: int = 8) -> dict[str, np.ndarray]:
    """Dense labels of one picture: ``{head: (grid*grid,) int64}`` for :data:`HEADS` (0 = nothing there)
    and ``"xy"`` ``(grid*grid, 2)`` float32, the owning object's centre (0.5, 0.5 where none)."""
    counts = _patch_pixels(objects, text, size, grid)
    n = grid * grid
    out = {k: np.zeros(n, np.int64) for k in HEADS}
    out["xy"] = np.full((n, 2), 0.5, np.float32)
    if objects:
        cover = counts[:, :-1]  # (n, objects)
        owner = cover.argmax(1)
        owned = cover.max(1) >= _MIN_PIXELS
        for i in np.flatnonzero(owned):
            o = objects[owner[i]]
            out["colour"][i] = 1 + list(COLOURS).index(o.colour)
            out["shape"][i] = 1 + SHAPES.index(o.shape)
            out["size"][i] = 1 if o.size < 0.12 else 2
            out["cell"][i] = 1 + CELLS.index(o.cell)
            out["xy"][i] = (o.cx, o.cy)
        for o in objects:
            r, c = min(int(o.cy * grid), grid - 1), min(int(o.cx * grid), grid - 1)
            out["centre"][r * grid + c] = 1
    if text:
        ink = counts[:, -1] >= _MIN_INK
        out["word"][ink] = 1 + WORDS.index(text)
    for shape in ("circle", "square", "triangle"):
        out[f"n_{shape}"][:] = min(6, sum(o.shape == shape for o in objects))
    out["n_all"][:] = min(6, len(objects))
    return out


def patch_owners(objects: Sequence[Any], text: str | None, size: int = 224, grid: int = 8) -> np.ndarray:
    """``(len(objects) + 1, grid*grid)`` bool: the patches where each object is visible (at least
    ``_MIN_PIXELS`` of its pixels; an occluded part does not count) and, last row, the written word's."""
    counts = _patch_pixels(objects, text, size, grid)
    return np.concatenate([counts[:, :-1] >= _MIN_PIXELS, counts[:, -1:] >= _MIN_INK], 1).T


_ASKS = (  # scene_questions' wordings -> which objects the answer is read from
    (re.compile(r"What colour is the (?:small )?(\w+)\?"), lambda o, m: o.shape == m[1]),
    (re.compile(r"What shape is the (\w+) object\?"), lambda o, m: o.colour == m[1]),
    (re.compile(r"Where is the (.+)\?"), lambda o, m: o.name() == m[1]),
    (re.compile(r"How many (\w+)s are there\?"), lambda o, m: o.shape == m[1]),
)


def question_patches(question: str, objects: Sequence[Any], text: str | None) -> np.ndarray | None:
    """``(64,)`` bool: the patches that hold the answer to ``question`` (a :func:`mmeff.train.mini.scene_questions`
    wording) about the scene of ``objects`` and ``text``: the asked-about object(s), or the written word.
    ``None`` for a wording it does not know or a scene where nothing visible answers it."""
    own = patch_owners(objects, text)
    if question.startswith("What word is written"):
        return own[-1] if own[-1].any() else None
    for pattern, pick in _ASKS:
        m = pattern.fullmatch(question)
        if m:
            sel = np.array([pick(o, m) for o in objects], dtype=bool)
            mask = own[:-1][sel].any(0) if sel.any() else None
            return mask if mask is not None and mask.any() else None
    return None


class TowerData(torch.utils.data.Dataset):
    """Item ``i`` of split ``seed``: ``(pixel_values (3, 224, 224), targets)`` for a scene image, or (one
    item in ``video_every``, drawn) a random frame of a scene video (a mover drawn where it is in that frame)."""

    def __init__(self, seed: int, length: int, video_every: int = 3) -> None:
        self.seed, self.length, self.video_every = seed, length, video_every

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        rng = np.random.default_rng([self.seed, i, 5])
        # drawn, not i % k: the image kinds cycle with i, and a stride would skip one kind entirely
        if self.video_every and rng.random() < 1 / self.video_every:
            f = int(rng.integers(0, 100))
            v = scene_video_sample(self.seed + 1, i, frames=[f])
            image, objects, text = v["frames"][0], v["frame_objects"][0], None
        else:
            s = scene_sample(self.seed, i, photo_background=(i % 5 == 0))
            image, objects, text = s.image, s.objects, s.text
        t = patch_targets(objects, text)
        return llava_pixel_values([image], 224)[0], {k: torch.from_numpy(v) for k, v in t.items()}



def video_questions(v: dict[str, Any], rng: np.random.Generator) -> list[tuple[str, list[str], str]]:
    """Every question of the video kinds with one answer in ``v`` (:func:`scene_video_sample`), worded as
    the generator words them: its own question and, for "after" videos, "what appears after" every other
    object but the last."""
    out = [(v["question"], list(v["options"]), v["answer"])]
    if v["kind"] != "after":
        return out
    objs, starts = v["objects"], v["meta"]["starts"]
    names = [o.name() for o in objs]
    order = sorted(range(len(objs)), key=lambda i: starts[i])
    for a, b in zip(order, order[1:]):
        q = f"What appears after the {names[a]}?"
        if q == v["question"]:
            continue
        out.append((q, draw_options(rng, names[b], after_pool(names, names[a])), names[b]))
    return out


@dataclass
class FeaturePool:
    """Cached tower features of generated training pictures: ``feats`` (pictures, frames, N, D) fp16 and,
    per picture, what its questions are asked about (scene objects / video description)."""

    feats: torch.Tensor
    items: list[dict[str, Any]]
    video: bool


def single_object_scene(seed: int, index: int) -> Scene:
    """A one-object picture (random shape, colour, size and place; a word one time in four) for the first
    LM steps: every question about it is answered by reading any object token, no binding needed."""
    rng = np.random.default_rng([seed, index, 11])
    size = float(rng.choice([0.085, 0.14, 0.2, 0.22]))
    x, y = (float(rng.uniform(size / 2 + 0.02, 1 - size / 2 - 0.02)), float(rng.uniform(size / 2 + 0.02, 0.75 - size / 2)))
    obj = SceneObject(str(rng.choice(SHAPES)), str(rng.choice(list(COLOURS))), x, y, size)
    text = str(rng.choice(WORDS)) if rng.random() < 0.25 else None
    return Scene([obj], text, render([obj], 224, text))


class PoolRender(torch.utils.data.Dataset):
    """Item ``i`` of split ``seed``: the pictures :func:`~mmeff.train.grounding.build_pool` caches features of,
    ``(pixel_values (F, 3, 224, 224), what its questions are asked about)``: a scene image (F = 1), a
    4-frame scene video (frames jittered around the evaluation's segment midpoints) or, ``single``, a
    :func:`single_object_scene` picture."""

    def __init__(self, seed: int, n: int, video: bool, single: bool = False) -> None:
        self.seed, self.n, self.video, self.single = seed, n, video, single

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[torch.Tensor, dict[str, Any]]:
        if self.video:
            rng = np.random.default_rng([self.seed, i, 2])
            idx = [int(np.clip(f + rng.integers(-3, 4), 0, 99)) for f in frame_indices(100, VIDEO_FRAMES)]
            v = scene_video_sample(self.seed, i, frames=idx)
            frames = list(v["frames"])
            meta = {k: v[k] for k in ("kind", "question", "options", "answer", "objects", "meta")}
        else:
            s = single_object_scene(self.seed, i) if self.single else scene_sample(self.seed, i, photo_background=(i % 5 == 0))
            frames, meta = [s.image], {"objects": s.objects, "text": s.text, "kind": getattr(s, "kind", "single")}
        return llava_pixel_values(frames, 224), meta


def collate_pool(b: list[tuple[torch.Tensor, dict[str, Any]]]) -> tuple[torch.Tensor, list[dict[str, Any]]]:
    """:class:`PoolRender` rows -> pixels ``(B, F, 3, 224, 224)`` and the rows' descriptions, in order."""
    return torch.stack([x for x, _ in b]), [m for _, m in b]


class Scene:
    """What :func:`~mmeff.train.mini.scene_questions` reads of a scene sample (its ``objects`` and written
    ``text``), and the picture (``image``, (H, W, 3) uint8) for :func:`single_object_scene`."""

    def __init__(self, objects: Sequence[Any], text: str | None, image: np.ndarray | None = None) -> None:
        self.objects, self.text, self.image = objects, text, image


class LMData(torch.utils.data.Dataset):
    """Item ``i``: a training conversation about one cached picture, ``(ids, labels, feats)``.

    Step ``i // batch`` is a video step every ``video_every``-th step (all its items videos), else an
    image step. An image conversation asks 1 to ``max_turns`` (drawn per step) of the picture's questions
    (:func:`mmeff.train.mini.scene_questions`), the first in the evaluation's exact prompt (image, question,
    lettered options, instruction) 4 times in 5, later ones half the time (else open questions); a video
    conversation asks its questions (:func:`video_questions`). The target is the answer's words and ``<|im_end|>``, the labels -100 elsewhere.

    The fourth element, ``looks``, lists per image question ``(position, patches)``: the index of the last
    prompt token (the one whose output is the answer's first word) and the ``(N,)`` bool mask of the visual
    tokens that hold the answer (:func:`question_patches`); empty for video steps and when ``looks=False``."""

    def __init__(self, images: FeaturePool, videos: FeaturePool | None, tokenizer: Any, length: int, *,
                 batch: int, video_every: int = 3, max_turns: int = 6, seed: int = 0,
                 single: FeaturePool | None = None, single_steps: int = 0, looks: bool = False) -> None:
        self.images, self.videos, self.tok, self.length = images, videos, tokenizer, length
        self.looks = looks
        self.single, self.single_steps = single, single_steps
        self.batch, self.video_every, self.max_turns, self.seed = batch, video_every, max_turns, seed
        self.image_id = tokenizer.convert_tokens_to_ids("<image>")
        self.eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
        self.per_image = images.feats.shape[2]
        self.turn = chat_turn_text(tokenizer)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> tuple[list[int], list[int], torch.Tensor, list[tuple[int, torch.Tensor]]]:
        rng = np.random.default_rng([self.seed, i, 9])
        step = i // self.batch
        video = self.videos is not None and self.video_every and step % self.video_every == self.video_every - 1
        # one turn count per step: rows of similar length waste less compute on padding
        k = int(np.random.default_rng([self.seed, step, 10]).integers(1, self.max_turns + 1))
        pool = self.videos if video else self.images
        # curriculum: one-object pictures first (their share falls from 3/4 to 0 over single_steps)
        if not video and self.single is not None and rng.random() < 0.75 * max(0.0, 1 - step / max(1, self.single_steps)):
            pool = self.single
        j = int(rng.integers(0, len(pool.items)))
        it = pool.items[j]
        if video:
            turns = video_questions(it, rng)
        else:
            turns = scene_questions(Scene(it["objects"], it["text"]), rng)
            turns = [turns[t] for t in rng.permutation(len(turns))[:k]]
        rng.shuffle(turns)
        frames = pool.feats[j]
        ids: list[int] = []
        labels: list[int] = []
        looks: list[tuple[int, torch.Tensor]] = []
        for t, (q, opts, a) in enumerate(turns):
            # the first turn is the evaluation's prompt 4 times in 5; later turns are shorter (open) half the time
            text = format_question(q, opts if rng.random() < (0.8 if t == 0 else 0.5) else None)
            if t == 0:
                prompt = build_prompt(self.tok, text, 1, len(frames) * self.per_image, self.image_id)
            else:
                prompt = self.tok(self.turn[0] + text + self.turn[1], add_special_tokens=False)["input_ids"]
            answer = self.tok(a, add_special_tokens=False)["input_ids"] + [self.eos]
            ids += prompt + answer
            labels += [-100] * len(prompt) + answer
            mask = question_patches(q, it["objects"], it["text"]) if self.looks and not video else None
            if mask is not None:
                looks.append((len(ids) - len(answer) - 1, torch.from_numpy(mask)))
        return ids, labels, frames, looks


def collate_lm(batch: Sequence[tuple[list[int], list[int], torch.Tensor, list[tuple[int, torch.Tensor]]]],
               pad: int) -> dict[str, Any]:
    """:class:`LMData` rows -> :func:`mmeff.train.mini.collate_conversations`' batch (cached features under
    ``"feats"``) plus ``"looks"``, the rows' look targets."""
    out: dict[str, Any] = collate_conversations([row[:3] for row in batch], pad, "feats")
    out["looks"] = [row[3] for row in batch]
    return out


def scene_vocabulary(ds: LMData, samples: int = 3000) -> list[int]:
    """Token ids the scene conversations use (inputs and answers), from ``samples`` items of ``ds`` and
    every answer word: the rows of the embedding that train; all others stay zero."""
    ids: set[int] = set()
    for i in range(min(samples, len(ds))):
        ids.update(ds[i][0])
    words = [*COLOURS, *SHAPES, "star", *CELLS, *WORDS, *NUMBERS, *DIRECTIONS] + [f"{c} {s}" for c in COLOURS for s in SHAPES]
    for w in words:
        ids.update(ds.tok(w, add_special_tokens=False)["input_ids"])
    ids.discard(ds.image_id)
    return sorted(ids)


def attribute_words(objects: Sequence[Any], text: str | None) -> list[list[str]]:
    """Per patch (row-major, 8x8), the words a visual token should carry: the owning object's colour, shape
    and 3x3 cell ("small" for a small one), or the written word; ``[]`` for background."""
    t = patch_targets(objects, text)
    out = []
    for i in range(len(t["colour"])):
        words: list[str] = []
        if t["colour"][i]:
            words = [list(COLOURS)[t["colour"][i] - 1], SHAPES[t["shape"][i] - 1], CELLS[t["cell"][i] - 1]]
            words += ["small"] if t["size"][i] == 1 else []
        elif t["word"][i]:
            words = [WORDS[t["word"][i] - 1]]
        out.append(words)
    return out
