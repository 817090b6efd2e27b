"""Bundled offline media and the uniform frame reader."""

from __future__ import annotations

import numpy as np
import pytest

from mmeff.datasets import media
from mmeff.datasets.media import IMAGE_NAMES, VIDEO_NAMES, read_frames, sample_image, sample_video_path


@pytest.mark.parametrize("name", IMAGE_NAMES)
def test_sample_image_is_rgb_uint8(name: str) -> None:
    img = sample_image(name)
    assert img.dtype == np.uint8
    assert img.ndim == 3 and img.shape[2] == 3
    assert img.shape[0] >= 64 and img.shape[1] >= 64
    assert img.flags["C_CONTIGUOUS"]
    # A real picture, not a constant fill.
    assert img.std() > 5


def test_sample_image_default_is_astronaut() -> None:
    img = sample_image()
    assert img.shape == (512, 512, 3)
    assert np.array_equal(img, sample_image("astronaut"))


def test_sample_image_unknown_name_lists_valid_ones() -> None:
    with pytest.raises(ValueError, match="astronaut.*coffee"):
        sample_image("definitely-not-an-image")


@pytest.mark.parametrize("name", VIDEO_NAMES)
def test_sample_video_path_exists(name: str) -> None:
    path = sample_video_path(name)
    assert path.is_file() and path.suffix == ".mp4"
    frames, ts = read_frames(path, 2)
    assert frames.shape[0] == 2 and frames.shape[-1] == 3 and ts[1] > ts[0]


def test_sample_video_path_unknown_name() -> None:
    with pytest.raises(ValueError, match="bikes"):
        sample_video_path("nope")


@pytest.mark.parametrize("num_frames", [1, 8, 16])
def test_read_frames_uniform(num_frames: int) -> None:
    frames, ts = read_frames(sample_video_path("bikes"), num_frames)
    assert frames.shape == (num_frames, 272, 640, 3)
    assert frames.dtype == np.uint8
    assert ts.shape == (num_frames,)
    assert np.all(np.diff(ts) > 0)
    # bikes.mp4: 250 frames at 25 fps; segment midpoints of a 10 s clip.
    expected = np.floor((np.arange(num_frames) + 0.5) * 250 / num_frames) / 25.0
    np.testing.assert_allclose(ts, expected, atol=1e-6)
    if num_frames > 1:
        assert not np.array_equal(frames[0], frames[-1])


def _get_seq_frames(total: int, n: int) -> list[int]:
    """SlowFast-LLaVA's ``dataset.get_seq_frames`` (Free Video-LLM's frame loader), restated."""
    seg = float(total - 1) / n
    return [(int(np.round(seg * i)) + int(np.round(seg * (i + 1)))) // 2 for i in range(n)]


def test_slowfast_frame_rule_is_the_official_get_seq_frames() -> None:
    for total in (2, 17, 100, 250, 301, 1234):
        for n in (1, 3, 8, 50):
            if n <= total:
                assert media._seq_frames(total, n).tolist() == _get_seq_frames(total, n), (total, n)
    clip = media.load_video(sample_video_path("bikes"), num_frames=50, frame_rule="slowfast")  # 250 frames
    assert clip.indices.tolist() == _get_seq_frames(250, 50)
    mid = media.load_video(sample_video_path("bikes"), num_frames=50)
    assert 0 < int((clip.indices != mid.indices).sum()) and int(np.abs(clip.indices - mid.indices).max()) == 1
    with pytest.raises(ValueError, match="frame_rule"):
        media.load_video(sample_video_path("bikes"), num_frames=4, frame_rule="random")


def test_read_frames_more_than_available_repeats() -> None:
    frames, ts = read_frames(sample_video_path("carphone_pristine"), 200)  # clip has 120 frames
    assert frames.shape[0] == 200
    assert np.all(np.diff(ts) >= 0)
    assert ts[-1] < 4.01


def test_pyav_fallback_matches_decord(monkeypatch: pytest.MonkeyPatch) -> None:
    path = sample_video_path("carphone_pristine")
    ref_frames, ref_ts = read_frames(path, 6)

    def no_decord(*args, **kwargs):
        raise ImportError("decord disabled for this test")

    monkeypatch.setattr(media, "_read_decord", no_decord)
    frames, ts = read_frames(path, 6)
    assert np.array_equal(frames, ref_frames)
    np.testing.assert_allclose(ts, ref_ts, atol=1e-6)


def test_read_frames_corrupt_file(tmp_path) -> None:
    bad = tmp_path / "corrupt.mp4"
    bad.write_bytes(np.random.default_rng(0).integers(0, 256, 20_000, dtype=np.uint8).tobytes())
    with pytest.raises(ValueError, match="corrupt.mp4"):
        read_frames(bad, 4)


def test_read_frames_truncated_file(tmp_path) -> None:
    data = sample_video_path("bikes").read_bytes()
    bad = tmp_path / "truncated.mp4"
    bad.write_bytes(data[: len(data) // 3])
    with pytest.raises(ValueError, match="truncated.mp4"):
        read_frames(bad, 4)


def test_read_frames_empty_file(tmp_path) -> None:
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match="empty.mp4"):
        read_frames(empty, 4)


def test_read_frames_missing_file(tmp_path) -> None:
    with pytest.raises(ValueError, match="missing.mp4"):
        read_frames(tmp_path / "missing.mp4", 4)


def test_read_frames_zero_frame_video(tmp_path) -> None:
    av = pytest.importorskip("av")
    path = tmp_path / "zero_frames.mp4"
    container = av.open(str(path), "w", format="mp4")
    stream = container.add_stream("mpeg4", rate=25)
    stream.width, stream.height, stream.pix_fmt = 64, 64, "yuv420p"
    container.start_encoding()
    container.close()
    assert path.stat().st_size > 0
    with pytest.raises(ValueError, match="zero_frames.mp4"):
        read_frames(path, 2)


@pytest.mark.parametrize("bad", [0, -3, 2.5, True])
def test_read_frames_bad_num_frames(bad) -> None:
    with pytest.raises(ValueError, match="num_frames"):
        read_frames(sample_video_path("bikes"), bad)
