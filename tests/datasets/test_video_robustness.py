"""load_video on damaged files: truncation, absurd headers, decode limits, and a seeded fuzz run."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest

from mmeff.datasets import media
from mmeff.datasets.media import load_video, sample_video_path

av = pytest.importorskip("av")


def _faststart(src: Path, dst: Path) -> Path:
    """Remux ``src`` with the index (moov) first, as streamed downloads are: cutting such a file keeps a
    header that claims every frame, which is the case that used to load silently."""
    with (
        av.open(str(src)) as inp,
        av.open(str(dst), "w", format="mp4", options={"movflags": "faststart"}) as out,
    ):
        stream = inp.streams.video[0]
        copy = out.add_stream_from_template(stream)
        for packet in inp.demux(stream):
            if packet.dts is None:  # the flush packet
                continue
            packet.stream = copy
            out.mux(packet)
    return dst


@pytest.fixture(scope="module")
def faststart_clips(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("faststart")
    return {
        name: _faststart(sample_video_path(name), root / f"{name}_fs.mp4")
        for name in ("bikes", "carphone_pristine")
    }


def test_faststart_copy_loads_like_the_original(faststart_clips: dict[str, Path]) -> None:
    ref = load_video(sample_video_path("bikes"), num_frames=5)
    clip = load_video(faststart_clips["bikes"], num_frames=5)
    assert np.array_equal(clip.indices, ref.indices) and clip.duration == pytest.approx(ref.duration)


def test_truncated_copy_is_refused_naming_the_file(faststart_clips: dict[str, Path], tmp_path: Path) -> None:
    data = faststart_clips["bikes"].read_bytes()
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(data[: len(data) // 2])
    for kwargs in ({"num_frames": 4}, {"fps": 1.0}, {"num_frames": 1, "start": 1.0, "end": 2.0}):
        with pytest.raises(
            ValueError,
            match=r"cut\.mp4 is truncated or damaged: header says 250 frames / 10\.00 s, "
            r"only \d+ decode",
        ) as info:
            load_video(cut, **kwargs)
        assert "\n" not in str(info.value) and "allow_truncated=True" in str(info.value)
    # Opting in loads the frames that decode, spread over what is actually there.
    clip = load_video(cut, num_frames=4, allow_truncated=True)
    assert len(clip) == 4 and clip.duration < 6.0 and clip.timestamps[-1] < clip.duration


def _huge_fps_copy(tmp_path: Path) -> Path:
    # mdhd timescale at its maximum: 120 frames squeezed into ~56 us, a header rate of ~2 million fps.
    data = bytearray(sample_video_path("carphone_pristine").read_bytes())
    at = data.find(b"mdhd")
    assert data[at + 4] == 0  # version 0 layout: timescale 12 bytes after version/flags
    data[at + 16 : at + 20] = struct.pack(">I", 2**31 - 1)
    path = tmp_path / "hugefps.mp4"
    path.write_bytes(bytes(data))
    return path


def test_absurd_header_rate_is_refused_before_decoding(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = _huge_fps_copy(tmp_path)

    def must_not_decode(*args: object) -> None:
        raise AssertionError("decoder reached on an absurd header")

    monkeypatch.setattr(media, "_read_decord", must_not_decode)
    monkeypatch.setattr(media, "_read_pyav", must_not_decode)
    with pytest.raises(
        ValueError, match=r"hugefps\.mp4 is damaged: its header reports [\d.e+]+ fps \(accepted: 0 to 1000\)"
    ):
        load_video(path, num_frames=2)


def test_huge_requested_rate_hits_the_frame_limit_without_allocating() -> None:
    # 10 s at 1e9 fps would be 1e10 instants (80 GB) if built before the check.
    with pytest.raises(
        ValueError,
        match=r"would decode 10000000000 frames, over the limit of 10000; raise it with "
        r"frame_limit= or MMEFF_VIDEO_FRAME_LIMIT.*bikes\.mp4",
    ):
        load_video(sample_video_path("bikes"), fps=1e9)
    # max_frames subsamples those instants without building them all either.
    assert len(load_video(sample_video_path("bikes"), fps=1e9, max_frames=3)) == 3


def test_frame_limit_keyword_and_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    bikes = sample_video_path("bikes")
    with pytest.raises(
        ValueError, match=r"num_frames=20 would decode 20 frames, over the limit of 10; .*bikes\.mp4"
    ):
        load_video(bikes, num_frames=20, frame_limit=10)
    monkeypatch.setenv("MMEFF_VIDEO_FRAME_LIMIT", "5")
    with pytest.raises(ValueError, match="over the limit of 5"):
        load_video(bikes, fps=1.0)
    assert len(load_video(bikes, fps=1.0, frame_limit=10)) == 10  # the keyword wins over the environment
    monkeypatch.setenv("MMEFF_VIDEO_FRAME_LIMIT", "lots")
    with pytest.raises(
        ValueError, match=r"MMEFF_VIDEO_FRAME_LIMIT must be an int >= 1, got 'lots'.*bikes\.mp4"
    ):
        load_video(bikes, num_frames=1)


def test_byte_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    bikes = sample_video_path("bikes")  # 640x272: 522,240 bytes a frame
    with pytest.raises(
        ValueError,
        match=r"4 frames of 640x272 need .* GiB, over the limit .*byte_limit= or "
        r"MMEFF_VIDEO_BYTE_LIMIT.*bikes\.mp4",
    ):
        load_video(bikes, num_frames=4, byte_limit=3 * 522_240)
    assert len(load_video(bikes, num_frames=3, byte_limit=3 * 522_240)) == 3
    monkeypatch.setenv("MMEFF_VIDEO_BYTE_LIMIT", str(522_240))
    with pytest.raises(ValueError, match="over the limit"):
        load_video(bikes, num_frames=2)


def test_decoder_errors_are_one_line_with_the_cause_kept(tmp_path: Path) -> None:
    data = bytearray(sample_video_path("carphone_distorted").read_bytes())
    data[60:1060] = bytes(1000)  # zero the start of the frame data
    bad = tmp_path / "zeroed.mp4"
    bad.write_bytes(bytes(data))
    try:
        load_video(bad, num_frames=4)
    except ValueError as exc:
        assert "zeroed.mp4" in str(exc) and "\n" not in str(exc)
        assert "cannot read video" not in str(exc) or exc.__cause__ is not None


# ----------------------------------------------------------------------------------------------------
# Fuzz: damaged copies of the small bundled clips. Every outcome is a correct load or a one-line
# ValueError / FileNotFoundError naming the file; never another type, a crash or a wrong frame count.

_KINDS = ("truncate", "flip", "zero_block", "header_flip", "empty")


def _damage(data: bytes, kind: str, rng: np.random.Generator) -> bytes:
    buf = bytearray(data)
    if kind == "truncate":
        return bytes(buf[: int(rng.integers(1, len(buf)))])
    if kind == "flip":  # bit flips anywhere past the file type box
        for _ in range(int(rng.integers(1, 20))):
            buf[int(rng.integers(32, len(buf)))] ^= 1 << int(rng.integers(8))
    elif kind == "zero_block":
        at, size = int(rng.integers(32, len(buf))), int(rng.integers(16, 4096))
        buf[at : at + size] = bytes(len(buf[at : at + size]))
    elif kind == "header_flip":  # random bytes inside the index, where rates, counts and offsets live
        moov = buf.find(b"moov")
        for _ in range(int(rng.integers(1, 6))):
            buf[min(len(buf) - 1, moov + int(rng.integers(0, 1500)))] = int(rng.integers(256))
    else:
        return b""
    return bytes(buf)


def test_fuzz_damaged_copies(faststart_clips: dict[str, Path], tmp_path: Path) -> None:
    sources = {
        "carphone_distorted": sample_video_path("carphone_distorted"),
        "carphone_pristine": sample_video_path("carphone_pristine"),
        "carphone_pristine_fs": faststart_clips["carphone_pristine"],
    }
    refs = {name: load_video(path, num_frames=4) for name, path in sources.items()}
    rng = np.random.default_rng(2024)
    outcomes: dict[str, int] = {"loaded": 0, "refused": 0}
    for i in range(30):
        name = list(sources)[int(rng.integers(len(sources)))]
        kind = _KINDS[i % len(_KINDS)]
        path = tmp_path / f"v{i:02d}_{name}_{kind}.mp4"
        path.write_bytes(_damage(sources[name].read_bytes(), kind, rng))
        try:
            clip = load_video(path, num_frames=4)
        except (ValueError, FileNotFoundError) as exc:
            message = str(exc)
            assert path.name in message and "\n" not in message, (kind, message)
            outcomes["refused"] += 1
            continue
        # Loaded: same frame count and timing as the intact clip (the same uniform picks prove the count).
        ref = refs[name]
        assert np.array_equal(clip.indices, ref.indices), (path.name, clip.indices, ref.indices)
        assert clip.duration == pytest.approx(ref.duration, rel=0.03), (path.name, clip.duration)
        assert clip.frames.shape == ref.frames.shape
        outcomes["loaded"] += 1
    assert outcomes["refused"] >= 6  # the empty and cut-off copies at least
