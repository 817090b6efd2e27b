"""Rendered scenes and videos with known answers: training and held-out data for the offline mini VLM.

Every sample is generated from ``(seed, index)`` alone, so a split is reproducible on any machine and
never needs a download. Images are flat-coloured shapes on a plain (or, optionally, real-photo)
background, drawn with PIL; each question's answer is read from the scene description that drew it.

Image question kinds (:data:`IMAGE_KINDS`), chosen to exercise what token compression breaks:

* ``colour``   "What colour is the triangle?" (the only triangle)
* ``shape``    "What shape is the green object?" (the only green object)
* ``count``    "How many circles are there?" (1-4, answered as a digit)
* ``position`` "Where is the blue square?" (one of nine 3x3 cells, e.g. "top left", "center")
* ``small``    "What colour is the small object?" (one object drawn at ~1/12 of the image side)
* ``text``     "What word is written in the image?" (one word in PIL's built-in font)

Video question kinds (:data:`VIDEO_KINDS`), written as mp4 by :func:`scene_videoqa`:

* ``after``     "What appears after the red circle?" (objects appear one after another at known frames)
* ``direction`` "Which way does the yellow square move?" (left / right / up / down)
* ``appear``    "How many objects appear in the video?"

Each sample also carries four options (the answer and three distractors of the same kind), so a
model can be scored by multiple choice as well as by exact match.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from mmeff.datasets.annotations import VideoQASample
from mmeff.datasets.media import MP4_FPS, write_mp4
from mmeff.extras import require

__all__ = [
    "COLOURS",
    "SHAPES",
    "CELLS",
    "WORDS",
    "IMAGE_KINDS",
    "VIDEO_KINDS",
    "SceneObject",
    "SceneQA",
    "render",
    "label_map",
    "draw_options",
    "after_pool",
    "scene_sample",
    "scene_samples",
    "scene_videoqa",
    "scene_video_sample",
]

#: colour name -> RGB; far apart, so a decoded (lossy) pixel still names its colour
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (40, 60, 220),
    "yellow": (235, 215, 30),
    "purple": (140, 40, 170),
    "white": (245, 245, 245),
}
SHAPES = ("circle", "square", "triangle")
#: 3x3 cells, row-major: CELLS[3 * row + col]
CELLS = ("top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right")
WORDS = ("cat", "sun", "map", "box", "red", "dog", "car", "hat", "pen", "cup")
IMAGE_KINDS = ("colour", "shape", "count", "position", "small", "text")
VIDEO_KINDS = ("after", "direction", "appear")
BACKGROUND = (90, 90, 90)
NUMBERS = ("1", "2", "3", "4")
DIRECTIONS = ("left", "right", "up", "down")
TEXT_LABEL = 255  # label_map value of the written word's pixels


@dataclass(frozen=True)
class SceneObject:
    """One drawn shape: ``(cx, cy)`` centre and ``size`` (side / diameter) in pixels."""

    shape: str
    colour: str
    cx: float
    cy: float
    size: float

    @property
    def cell(self) -> str:
        """The 3x3 cell name of the centre in a unit square scene (coordinates are fractions)."""
        col = min(int(self.cx * 3), 2)
        row = min(int(self.cy * 3), 2)
        return CELLS[3 * row + col]

    def name(self) -> str:
        return f"{self.colour} {self.shape}"


@dataclass
class SceneQA:
    """One generated question: ``image`` ``(H, W, 3)`` uint8 (``None`` for videos, see ``video``)."""

    id: str
    kind: str
    question: str
    answer: str
    options: list[str]
    image: np.ndarray | None
    objects: list[SceneObject]
    text: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def answer_index(self) -> int:
        return self.options.index(self.answer)


def render(
    objects: Sequence[SceneObject],
    size: int = 224,
    text: str | None = None,
    background: np.ndarray | None = None,
) -> np.ndarray:
    """Draw ``objects`` (coordinates and sizes as fractions of ``size``) → ``(size, size, 3)`` uint8.

    ``text`` is written at the bottom centre in PIL's built-in font, scaled to about ``size/8`` high;
    ``background`` ``(size, size, 3)`` replaces the flat grey.
    """
    if background is not None:
        if background.shape != (size, size, 3):
            raise ValueError(f"background must be ({size}, {size}, 3), got {background.shape}")
        img = Image.fromarray(np.ascontiguousarray(background.astype(np.uint8)))
    else:
        img = Image.new("RGB", (size, size), BACKGROUND)
    _draw(ImageDraw.Draw(img), objects, size, text, [COLOURS[o.colour] for o in objects], (255, 255, 255))
    return np.asarray(img)


def _draw(draw: Any, objects: Sequence[SceneObject], size: int, text: str | None, fills: Sequence[Any],
          text_fill: Any) -> None:
    # one drawing routine for the picture and its label map, so the two agree pixel for pixel
    for o, fill in zip(objects, fills):
        if o.shape not in SHAPES or o.colour not in COLOURS:
            raise ValueError(f"unknown shape or colour in {o}")
        cx, cy, h = o.cx * size, o.cy * size, o.size * size / 2
        box = (cx - h, cy - h, cx + h, cy + h)
        if o.shape == "circle":
            draw.ellipse(box, fill=fill)
        elif o.shape == "square":
            draw.rectangle(box, fill=fill)
        else:
            draw.polygon([(cx, cy - h), (cx - h, cy + h), (cx + h, cy + h)], fill=fill)
    if text:
        font = ImageFont.load_default(size=max(8, size // 8))
        w = draw.textlength(text, font=font)
        draw.text(((size - w) / 2, size * 0.8), text, fill=text_fill, font=font)


def label_map(objects: Sequence[SceneObject], size: int = 224, text: str | None = None) -> np.ndarray:
    """What :func:`render` draws, as labels: ``(size, size)`` uint8, 0 background, ``k + 1`` where
    ``objects[k]`` is the visible surface (later objects cover earlier ones), :data:`TEXT_LABEL` on the
    written word's pixels."""
    if len(objects) >= TEXT_LABEL - 1:
        raise ValueError(f"label_map takes at most {TEXT_LABEL - 2} objects, got {len(objects)}")
    img = Image.new("L", (size, size), 0)
    _draw(ImageDraw.Draw(img), objects, size, None, range(1, len(objects) + 1), 0)
    out = np.array(img)
    if text:
        # the font is anti-aliased: a word pixel is one at least half covered
        ink = Image.new("L", (size, size), 0)
        _draw(ImageDraw.Draw(ink), [], size, text, [], 255)
        out[np.asarray(ink) >= 128] = TEXT_LABEL
    return out


def _place(
    rng: np.random.Generator, n: int, sizes: Sequence[float], tries: int = 200
) -> list[tuple[float, float]]:
    """Centres (fractions) for ``n`` objects of ``sizes`` that do not overlap and stay inside the image."""
    out: list[tuple[float, float]] = []
    for s in sizes[:n]:
        for _ in range(tries):
            margin = s / 2 + 0.02
            c = (float(rng.uniform(margin, 1 - margin)), float(rng.uniform(margin, 0.75 - s / 2)))
            if all(
                abs(c[0] - p[0]) > (s + q) / 2 + 0.02 or abs(c[1] - p[1]) > (s + q) / 2 + 0.02
                for p, q in zip(out, sizes)
            ):
                out.append(c)
                break
        else:
            raise RuntimeError("could not place the objects without overlap; use fewer or smaller ones")
    return out


def after_pool(names: Sequence[str], asked: str) -> list[str]:
    """Answer pool of "what appears after ``asked``": the video's other objects, then every colour-shape name."""
    pool = [*names, *(f"{c} {s}" for c in COLOURS for s in SHAPES)]
    return list(dict.fromkeys(p for p in pool if p != asked))


def draw_options(rng: np.random.Generator, answer: str, pool: Sequence[str], k: int = 4) -> list[str]:
    """``answer`` and ``k - 1`` distinct others from ``pool``, shuffled by ``rng``."""
    others = [p for p in pool if p != answer]
    picks = list(rng.choice(others, size=min(k - 1, len(others)), replace=False))
    opts = [answer, *picks]
    rng.shuffle(opts)
    return [str(o) for o in opts]


def scene_sample(
    seed: int, index: int, kind: str | None = None, size: int = 224, photo_background: bool = False
) -> SceneQA:
    """Sample ``index`` of the split ``seed`` (``kind`` cycles through :data:`IMAGE_KINDS` when ``None``)."""
    rng = np.random.default_rng([seed, index])
    kind = kind or IMAGE_KINDS[index % len(IMAGE_KINDS)]
    if kind not in IMAGE_KINDS:
        raise ValueError(f"kind must be one of {IMAGE_KINDS}, got {kind!r}")
    colours, shapes = list(COLOURS), list(SHAPES)
    text = None
    if kind == "count":
        target = str(rng.choice(shapes))
        n = int(rng.integers(1, 5))
        others = [s for s in shapes if s != target]
        objs_spec = [(target, str(rng.choice(colours))) for _ in range(n)]
        objs_spec += [
            (str(rng.choice(others)), str(rng.choice(colours))) for _ in range(int(rng.integers(0, 3)))
        ]
        sizes = [0.14] * len(objs_spec)
    else:
        n = int(rng.integers(2, 5))
        # distinct shapes or colours so that "the triangle" / "the green object" is unique
        cols = list(rng.choice(colours, size=n, replace=False))
        shps = [str(s) for s in rng.choice(shapes, size=n, replace=True)]
        if kind in ("colour", "position"):
            shps[0] = str(rng.choice(shapes))
            shps[1:] = [str(rng.choice([s for s in shapes if s != shps[0]])) for _ in shps[1:]]
        objs_spec = list(zip(shps, (str(c) for c in cols)))
        sizes = [0.2] * n
        if kind == "small":
            sizes = [0.085] + [0.22] * (n - 1)
    centres = _place(rng, len(objs_spec), sizes)
    objects = [SceneObject(s, c, x, y, z) for (s, c), (x, y), z in zip(objs_spec, centres, sizes)]
    if kind == "text":
        text = str(rng.choice(WORDS))
    background = _photo(rng, size) if photo_background else None
    image = render(objects, size, text, background)
    first = objects[0]
    if kind == "colour":
        q, a, pool = f"What colour is the {first.shape}?", first.colour, colours
    elif kind == "shape":
        q, a, pool = f"What shape is the {first.colour} object?", first.shape, shapes + ["star"]
    elif kind == "count":
        target = objs_spec[0][0]
        q, a, pool = f"How many {target}s are there?", str(sum(o.shape == target for o in objects)), NUMBERS
    elif kind == "position":
        q, a, pool = f"Where is the {first.name()}?", first.cell, CELLS
    elif kind == "small":
        q, a, pool = f"What colour is the small {first.shape}?", first.colour, colours
    else:
        q, a, pool = "What word is written in the image?", str(text), WORDS
    return SceneQA(f"s{seed}-{index}-{kind}", kind, q, a, draw_options(rng, a, pool), image, objects, text)


def scene_samples(
    seed: int, n: int, size: int = 224, kinds: Sequence[str] | None = None, photo_background: bool = False
) -> list[SceneQA]:
    """``n`` image samples of split ``seed``, kinds cycling through ``kinds`` (default: all)."""
    kinds = tuple(kinds or IMAGE_KINDS)
    return [scene_sample(seed, i, kinds[i % len(kinds)], size, photo_background) for i in range(n)]


@functools.cache
def _photo_source(name: str) -> Any:
    data = require("skimage.data", "the scenes' photo backgrounds")
    # decoded once per process: reading the PNG dominated the cost of a photo-background sample
    return Image.fromarray(getattr(data, name)())


def _photo(rng: np.random.Generator, size: int) -> np.ndarray:
    """A random crop of a real scikit-image photo, dimmed so the shapes stay the brightest thing."""
    name = str(rng.choice(["astronaut", "coffee", "chelsea", "rocket"]))
    photo = _photo_source(name)
    w, h = photo.size
    s = int(min(h, w) * rng.uniform(0.5, 1.0))
    y, x = int(rng.integers(0, h - s + 1)), int(rng.integers(0, w - s + 1))
    crop = photo.resize((size, size), Image.Resampling.BILINEAR, box=(x, y, x + s, y + s), reducing_gap=2.0)
    return (np.asarray(crop, dtype=np.float32) * 0.5).astype(np.uint8)


# ------------------------------------------------------------------------------------------- videos

_VIDEO_SECONDS = 4
_VIDEO_FPS = MP4_FPS  # the rate write_mp4 encodes at


def _video_frames(
    rng: np.random.Generator, kind: str, size: int, frames_to_draw: Sequence[int] | None = None
) -> tuple[np.ndarray, list[SceneObject], str, str, list[str], dict[str, Any]]:
    total = _VIDEO_SECONDS * _VIDEO_FPS
    n = int(rng.integers(2, 5)) if kind == "appear" else 3
    cols = [str(c) for c in rng.choice(list(COLOURS), size=n, replace=False)]
    shps = [str(rng.choice(SHAPES)) for _ in range(n)]
    sizes = [0.2] * n
    centres = _place(rng, n, sizes)
    objects = [SceneObject(s, c, x, y, z) for s, c, (x, y), z in zip(shps, cols, centres, sizes)]
    # object i appears at frame starts[i] (sequential for "after", all at once otherwise)
    if kind == "after":
        starts = [int(i * total / (n + 0.5)) for i in range(n)]
    elif kind == "appear":
        starts = sorted(int(v) for v in rng.integers(0, total * 3 // 4, size=n))
    else:
        starts = [0] * n
    direction = str(rng.choice(DIRECTIONS))
    step = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}[direction]
    frames, frame_objects = [], []
    for f in range(total) if frames_to_draw is None else frames_to_draw:
        if not 0 <= f < total:
            raise ValueError(f"frame {f} is outside the video's {total} frames")
        visible = []
        for i, o in enumerate(objects):
            if f < starts[i]:
                continue
            if kind == "direction" and i == 0:
                # the mover travels 0.4 of the frame; start placed so it stays inside
                t = f / (total - 1)
                x0 = 0.3 if step[0] > 0 else 0.7 if step[0] < 0 else 0.5
                y0 = 0.3 if step[1] > 0 else 0.7 if step[1] < 0 else 0.5
                o = SceneObject(o.shape, o.colour, x0 + 0.4 * t * step[0], y0 + 0.4 * t * step[1], 0.16)
                visible.append(o)
            elif not (kind == "direction"):
                visible.append(o)
        frames.append(render(visible, size))
        frame_objects.append(visible)
    if kind == "after":
        k = int(rng.integers(0, n - 1))
        q, a = f"What appears after the {objects[k].name()}?", objects[k + 1].name()
        pool = after_pool([o.name() for o in objects], objects[k].name())
    elif kind == "direction":
        q, a, pool = f"Which way does the {objects[0].name()} move?", direction, list(DIRECTIONS)
    else:
        q, a, pool = "How many objects appear in the video?", str(n), list(NUMBERS)
    meta = {"starts": starts, "fps": _VIDEO_FPS, "direction": direction if kind == "direction" else None}
    return np.stack(frames), objects, q, a, pool, meta, frame_objects


def scene_video_sample(
    seed: int, index: int, frames: Sequence[int] | None = None, size: int = 224
) -> dict[str, Any]:
    """Video question ``index`` of split ``seed`` in memory (what :func:`scene_videoqa` writes as mp4).

    ``frames`` picks which of the 100 frames to draw (default: all). Returns a dict with ``frames``
    (T, size, size, 3) uint8, ``kind``, ``question``, ``answer``, ``options``, ``objects``, ``meta`` and
    ``frame_objects`` (per drawn frame, the objects as drawn there: a mover at its position of that frame).
    """
    kind = VIDEO_KINDS[index % len(VIDEO_KINDS)]
    rng = np.random.default_rng([seed, 1_000_000 + index])
    video, objects, q, a, pool, meta, frame_objects = _video_frames(rng, kind, size, frames)
    return {"frames": video, "kind": kind, "question": q, "answer": a, "options": draw_options(rng, a, pool),
            "objects": objects, "meta": meta, "frame_objects": frame_objects}


def scene_videoqa(out_dir: str | Path, seed: int = 0, n: int = 12, size: int = 224) -> list[VideoQASample]:
    """``n`` video questions of split ``seed`` (kinds cycling through :data:`VIDEO_KINDS`) as
    :class:`~mmeff.datasets.videoqa.VideoQASample` multiple-choice samples; the 4 s, 25 fps mp4 clips are
    written to ``out_dir`` (reused when present). ``meta`` holds each object's first frame."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    samples = []
    for i in range(n):
        v = scene_video_sample(seed, i, size=size)
        kind, q, a, opts = v["kind"], v["question"], v["answer"], v["options"]
        path = out / f"scene-s{seed}-{i}-{kind}.mp4"
        if not path.is_file():
            write_mp4(path, v["frames"], (size, size))
        samples.append(
            VideoQASample(
                id=f"scene-video-s{seed}-{i}",
                video=path,
                question=q,
                answer=a,
                options=opts,
                answer_index=opts.index(a),
                meta={"kind": kind, "objects": [o.name() for o in v["objects"]], **v["meta"]},
            )
        )
    return samples
