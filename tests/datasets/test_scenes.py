"""Generated scenes: answers checked against the pixels by an independent reader (connected components)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from mmeff.datasets import videoqa
from mmeff.datasets.media import MP4_FPS, load_video
from mmeff.datasets.scenes import (
    _VIDEO_FPS,
    BACKGROUND,
    CELLS,
    COLOURS,
    IMAGE_KINDS,
    render,
    scene_sample,
    scene_samples,
    scene_videoqa,
)


def _components(image: np.ndarray, tol: int = 40) -> list[dict]:
    """Every flat-coloured blob above the text band: its colour name, shape (by fill ratio), cell, area."""
    out = []
    top = image[: int(image.shape[0] * 0.78)].astype(int)
    size = image.shape[0]
    for name, rgb in COLOURS.items():
        mask = np.abs(top - np.array(rgb)).max(-1) < tol
        labels, n = ndimage.label(mask)
        for i in range(1, n + 1):
            ys, xs = np.nonzero(labels == i)
            if len(ys) < 20:
                continue
            bbox = (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)
            fill = len(ys) / bbox
            shape = "square" if fill > 0.9 else "circle" if fill > 0.65 else "triangle"
            cy, cx = (ys.min() + ys.max()) / 2 / size, (xs.min() + xs.max()) / 2 / size
            cell = CELLS[3 * min(int(cy * 3), 2) + min(int(cx * 3), 2)]
            out.append({"colour": name, "shape": shape, "cell": cell, "area": len(ys), "cx": cx, "cy": cy})
    return out


def test_deterministic_and_options_well_formed() -> None:
    a, b = scene_samples(3, 18), scene_samples(3, 18)
    c = scene_samples(4, 18)
    for x, y in zip(a, b):
        assert np.array_equal(x.image, y.image) and (x.question, x.answer, x.options) == (
            y.question,
            y.answer,
            y.options,
        )
    assert any(not np.array_equal(x.image, z.image) for x, z in zip(a, c))
    assert [s.kind for s in a[:6]] == list(IMAGE_KINDS)
    for s in a:
        assert len(s.options) == 4 and len(set(s.options)) == 4 and s.options[s.answer_index] == s.answer
        assert s.image.shape == (224, 224, 3) and s.image.dtype == np.uint8


@pytest.mark.parametrize("seed", [0, 1])
def test_answers_match_the_pixels(seed: int) -> None:
    for s in scene_samples(seed, 60):
        comps = _components(s.image)
        if s.kind == "text":
            assert s.answer in s.question or s.text == s.answer
            band = s.image[int(224 * 0.78) :]
            assert (band.min(-1) > 230).sum() > 30  # white glyphs are there
            other = next(w for w in s.options if w != s.answer)
            assert not np.array_equal(render(s.objects, 224, other)[int(224 * 0.78) :], band)
            continue
        assert len(comps) == len(s.objects), (s.id, comps)
        if s.kind == "count":
            target = s.question.split()[2][:-1]
            assert sum(c["shape"] == target for c in comps) == int(s.answer), (s.id, comps)
        elif s.kind in ("colour", "small"):
            shape = s.question.rstrip("?").split()[-1]
            cands = [c for c in comps if c["shape"] == shape]
            if s.kind == "small":
                cands = [min(comps, key=lambda c: c["area"])]
                assert cands[0]["area"] * 2 < sorted(c["area"] for c in comps)[1]
            assert len(cands) == 1 and cands[0]["colour"] == s.answer, (s.id, comps)
        elif s.kind == "shape":
            colour = s.question.split()[4]
            (c,) = [c for c in comps if c["colour"] == colour]
            assert c["shape"] == s.answer, (s.id, comps)
        elif s.kind == "position":
            colour, shape = s.question.rstrip("?").split()[-2:]
            (c,) = [c for c in comps if c["colour"] == colour and c["shape"] == shape]
            assert c["cell"] == s.answer, (s.id, comps)


def test_photo_background_and_errors() -> None:
    s = scene_sample(0, 4, "small", photo_background=True)
    assert not (s.image == np.array(BACKGROUND, dtype=np.uint8)).all(-1).mean() > 0.5
    assert np.array_equal(s.image, scene_sample(0, 4, "small", photo_background=True).image)
    with pytest.raises(ValueError, match="kind"):
        scene_sample(0, 0, "depth")
    with pytest.raises(ValueError, match="background"):
        render([], 64, background=np.zeros((32, 32, 3)))


def test_videos_match_their_answers(tmp_path: Path) -> None:
    assert _VIDEO_FPS == videoqa._SYNTH_FPS == MP4_FPS  # the clips are written and read at one rate
    samples = scene_videoqa(tmp_path, seed=0, n=6, size=160)
    assert [s.meta["kind"] for s in samples] == ["after", "direction", "appear"] * 2
    again = scene_videoqa(tmp_path, seed=0, n=6, size=160)
    assert [(s.question, s.answer, s.options) for s in again] == [
        (s.question, s.answer, s.options) for s in samples
    ]
    for s in samples:
        assert s.options[s.answer_index] == s.answer
        clip = load_video(s.video, fps=_VIDEO_FPS)
        frames = clip.frames
        assert len(frames) == 100
        starts = s.meta["starts"]
        if s.meta["kind"] == "after":
            k = s.meta["objects"].index(s.question[len("What appears after the ") : -1])
            colour = s.answer.split()[0]
            assert s.meta["objects"][k + 1] == s.answer
            before = {c["colour"] for c in _components(frames[starts[k + 1] - 2])}
            after = {c["colour"] for c in _components(frames[starts[k + 1] + 2])}
            assert colour not in before and colour in after
        elif s.meta["kind"] == "direction":
            a, b = _components(frames[2]), _components(frames[-3])
            assert len(a) == len(b) == 1
            dx, dy = b[0]["cx"] - a[0]["cx"], b[0]["cy"] - a[0]["cy"]
            moved = ("right" if dx > 0 else "left") if abs(dx) > abs(dy) else ("down" if dy > 0 else "up")
            assert moved == s.answer
        else:
            assert len(_components(frames[-1])) == int(s.answer)
