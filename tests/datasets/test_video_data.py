"""load_video windows and rates, the video-QA annotation loaders, and the synthetic video-QA set."""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import av
import numpy as np
import pytest

from mmeff.datasets import media
from mmeff.datasets.media import VideoClip, load_video, read_frames, sample_video_path
from mmeff.datasets.videoqa import (
    COLOUR_THRESHOLD,
    VIDEOQA_FORMATS,
    VideoQASample,
    load_activitynet_qa,
    load_msrvtt_qa,
    load_msvd_qa,
    load_mvbench,
    load_nextqa,
    load_tgif_qa,
    load_videomme,
    load_videoqa,
    synthetic_videoqa,
)

BIKES = sample_video_path("bikes")  # 250 frames, 25 fps, 640x272, 10 s
BUNNY = sample_video_path("bigbuckbunny")  # 132 frames, 25 fps, 1280x720, 5.28 s
CARPHONE = sample_video_path("carphone_pristine")  # 120 frames, 29.97 fps, 176x144, 4.004 s


# ----------------------------------------------------------------------------------------------------
# load_video


def test_load_video_num_frames_whole_video() -> None:
    clip = load_video(BIKES, num_frames=8)
    assert isinstance(clip, VideoClip) and len(clip) == 8
    assert clip.frames.shape == (8, 272, 640, 3) and clip.frames.dtype == np.uint8
    assert clip.indices.dtype == np.int64 and clip.timestamps.dtype == np.float64
    expected = np.floor((np.arange(8) + 0.5) * 250 / 8).astype(np.int64)
    np.testing.assert_array_equal(clip.indices, expected)
    np.testing.assert_allclose(clip.timestamps, expected / 25.0, atol=1e-6)
    assert clip.native_fps == pytest.approx(25.0)
    assert clip.duration == pytest.approx(10.0, abs=1e-6)
    assert clip.path == BIKES


def test_load_video_num_frames_inside_window() -> None:
    clip = load_video(BIKES, num_frames=5, start=2.0, end=4.0)
    # Frames 50..99 lie in [2, 4) s; midpoints of five 10-frame segments.
    np.testing.assert_array_equal(clip.indices, 50 + np.array([5, 15, 25, 35, 45]))
    assert np.all((clip.timestamps >= 2.0) & (clip.timestamps < 4.0))
    assert np.all(np.diff(clip.timestamps) > 0)


def test_read_frames_is_load_video() -> None:
    frames, ts = read_frames(CARPHONE, 6)
    clip = load_video(CARPHONE, num_frames=6)
    assert np.array_equal(frames, clip.frames)
    np.testing.assert_array_equal(ts, clip.timestamps)


@pytest.mark.parametrize("fps", [1.0, 2.0, 3.0])
def test_load_video_fps_whole_video(fps: float) -> None:
    clip = load_video(BIKES, fps=fps)
    assert len(clip) == math.ceil(10.0 * fps)
    assert np.all(np.diff(clip.timestamps) > 0)
    # Each sample is the frame on screen at k / fps: spacing is 1/fps give or take one native frame.
    np.testing.assert_allclose(np.diff(clip.timestamps), 1.0 / fps, atol=1.0 / 25 + 1e-6)
    instants = np.arange(len(clip)) / fps
    assert np.all(clip.timestamps <= instants + 1e-6)
    assert np.all(clip.timestamps > instants - 1.0 / 25)
    assert clip.timestamps[0] == 0.0 and clip.timestamps[-1] < 10.0
    np.testing.assert_allclose(clip.timestamps, clip.indices / 25.0, atol=1e-6)
    assert not np.array_equal(clip.frames[0], clip.frames[-1])


def test_load_video_fps_inside_window() -> None:
    start, end, fps = 1.0, 3.5, 4.0
    clip = load_video(CARPHONE, fps=fps, start=start, end=end)
    assert len(clip) == 10  # instants 1.0, 1.25, ..., 3.25
    assert np.all((clip.timestamps >= start - 1e-6) & (clip.timestamps < end))
    assert clip.timestamps[0] - start < 1.0 / clip.native_fps
    assert np.all(np.diff(clip.timestamps) > 0)
    np.testing.assert_allclose(np.diff(clip.timestamps), 1.0 / fps, atol=1.0 / clip.native_fps + 1e-6)
    assert clip.native_fps == pytest.approx(30000 / 1001)


def test_load_video_window_opening_between_frames_takes_first_frame_inside() -> None:
    clip = load_video(BIKES, fps=1.0, start=2.5, end=6.0)
    # 2.5 s falls between frames 62 (2.48 s) and 63 (2.52 s): the earlier one is outside the window.
    assert clip.indices[0] == 63
    np.testing.assert_array_equal(clip.indices, [63, 87, 112, 137])


def test_load_video_end_past_video_is_clipped() -> None:
    clip = load_video(BIKES, fps=1.0, start=8.0, end=50.0)
    np.testing.assert_allclose(clip.timestamps, [8.0, 9.0], atol=1e-6)


def test_load_video_low_rate_gives_one_frame() -> None:
    clip = load_video(CARPHONE, fps=0.1)
    assert len(clip) == 1 and clip.indices[0] == 0


def test_load_video_max_frames_caps_by_uniform_subsampling() -> None:
    full = load_video(BIKES, fps=10.0)
    assert len(full) == 100
    capped = load_video(BIKES, fps=10.0, max_frames=7)
    assert len(capped) == 7
    assert np.all(np.diff(capped.timestamps) > 0)
    assert set(capped.indices.tolist()) <= set(full.indices.tolist())
    # Spread over the whole video, not the first seven instants.
    assert capped.timestamps[0] < 1.0 and capped.timestamps[-1] > 9.0
    assert len(load_video(BIKES, fps=1.0, max_frames=50)) == 10  # cap above the count changes nothing


def test_load_video_rate_above_native_repeats_frames() -> None:
    clip = load_video(CARPHONE, fps=60.0, start=0.0, end=0.5)
    assert len(clip) == 30
    assert np.all(np.diff(clip.timestamps) >= 0)
    assert len(np.unique(clip.indices)) == 15  # frames 0..14 of 29.97 fps lie in [0, 0.5)


@pytest.mark.parametrize(
    ("path", "kwargs"),
    [
        (BIKES, {"fps": 1.0, "start": 2.5, "end": 6.0}),
        (BUNNY, {"num_frames": 5, "start": 2.0}),
        (CARPHONE, {"fps": 7.5, "start": 1.0, "end": 3.0}),
        (BIKES, {"num_frames": 300}),
    ],
)
def test_pyav_fallback_matches_decord(monkeypatch: pytest.MonkeyPatch, path: Path, kwargs: dict) -> None:
    ref = load_video(path, **kwargs)
    seeks: list[bool] = []
    by_pts = media._pyav_frames_by_pts

    def spy(*args):
        result = by_pts(*args)
        seeks.append(result is not None)
        return result

    monkeypatch.setitem(sys.modules, "decord", None)  # `import decord` now raises ImportError
    monkeypatch.setattr(media, "_pyav_frames_by_pts", spy)
    clip = load_video(path, **kwargs)
    assert seeks == [True]
    assert np.array_equal(clip.frames, ref.frames)
    np.testing.assert_array_equal(clip.indices, ref.indices)
    np.testing.assert_allclose(clip.timestamps, ref.timestamps, atol=1e-6)
    assert clip.native_fps == pytest.approx(ref.native_fps)
    assert clip.duration == pytest.approx(ref.duration, abs=1e-6)


def test_pyav_in_order_decoding_matches_seeking(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "decord", None)
    seeking = load_video(BIKES, fps=2.0, start=4.0, end=7.0)
    monkeypatch.setattr(media, "_pyav_frames_by_pts", lambda *args: None)
    in_order = load_video(BIKES, fps=2.0, start=4.0, end=7.0)
    assert np.array_equal(seeking.frames, in_order.frames)
    np.testing.assert_array_equal(seeking.indices, in_order.indices)


def _zero_frame_mp4(path: Path) -> Path:
    container = av.open(str(path), "w", format="mp4")
    stream = container.add_stream("mpeg4", rate=25)
    stream.width, stream.height, stream.pix_fmt = 64, 64, "yuv420p"
    container.start_encoding()
    container.close()
    return path


def test_load_video_file_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not found.*missing.mp4"):
        load_video(tmp_path / "missing.mp4", num_frames=2)
    (tmp_path / "empty.mp4").write_bytes(b"")
    with pytest.raises(ValueError, match="empty.*empty.mp4"):
        load_video(tmp_path / "empty.mp4", fps=1.0)
    corrupt = tmp_path / "corrupt.mp4"
    corrupt.write_bytes(np.random.default_rng(0).integers(0, 256, 20_000, dtype=np.uint8).tobytes())
    with pytest.raises(ValueError, match="cannot read video .*corrupt.mp4"):
        load_video(corrupt, fps=1.0)
    truncated = tmp_path / "truncated.mp4"
    truncated.write_bytes(BIKES.read_bytes()[: BIKES.stat().st_size // 3])
    with pytest.raises(ValueError, match="truncated.mp4"):
        load_video(truncated, num_frames=4)
    with pytest.raises(ValueError, match="zero_frames.mp4"):
        load_video(_zero_frame_mp4(tmp_path / "zero_frames.mp4"), fps=2.0)


def test_load_video_unreadable_by_both_decoders_names_each(tmp_path: Path) -> None:
    bad = tmp_path / "notes.mp4"
    bad.write_text("this is not a video\n" * 100)
    with pytest.raises(ValueError, match=r"notes\.mp4: decord: .*; pyav: "):
        load_video(bad, num_frames=1)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({}, "exactly one of num_frames or fps"),
        ({"num_frames": 4, "fps": 1.0}, "exactly one of num_frames or fps"),
        ({"fps": 0.0}, "fps must be > 0"),
        ({"fps": -2.0}, "fps must be > 0"),
        ({"fps": float("nan")}, "fps must be finite"),
        ({"fps": True}, "fps must be a number"),
        ({"num_frames": 0}, "num_frames must be an int >= 1"),
        ({"num_frames": 2.5}, "num_frames must be an int >= 1"),
        ({"fps": 1.0, "max_frames": 0}, "max_frames must be an int >= 1"),
        ({"num_frames": 4, "max_frames": 2}, "max_frames only caps fps sampling"),
        ({"fps": 1.0, "start": -1.0}, "start must be >= 0"),
        ({"fps": 1.0, "start": 3.0, "end": 3.0}, "start must be before end"),
        ({"fps": 1.0, "start": 5.0, "end": 2.0}, "start must be before end"),
        ({"num_frames": 2, "end": 0.0}, "start must be before end"),
        ({"fps": 1.0, "start": "1"}, "start must be a number"),
    ],
)
def test_load_video_bad_arguments(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message) as info:
        load_video(BIKES, **kwargs)
    assert "bikes.mp4" in str(info.value)


@pytest.mark.parametrize("start", [10.0, 25.0])
def test_load_video_window_outside_video(start: float) -> None:
    with pytest.raises(ValueError, match=r"at or after the end of the video \(10\.000 s\).*bikes\.mp4"):
        load_video(BIKES, fps=1.0, start=start)


def test_load_video_window_without_frames() -> None:
    # Frames sit at 0.00 and 0.04 s; [0.01, 0.03) holds none.
    with pytest.raises(ValueError, match=r"contains no frame.*bikes\.mp4"):
        load_video(BIKES, num_frames=1, start=0.01, end=0.03)


def test_load_video_window_errors_do_not_fall_back(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    monkeypatch.setattr(media, "_read_pyav", lambda *args: calls.append(args))
    with pytest.raises(ValueError, match="contains no frame"):
        load_video(BIKES, fps=1.0, start=0.01, end=0.03)
    assert calls == []


# ----------------------------------------------------------------------------------------------------
# Annotation loaders


def _link(target: Path, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    os.symlink(target, path)
    return path


def _write_json(path: Path, data: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def _write_table(path: Path, rows: list[list[object]], sep: str) -> Path:
    path.write_text("\n".join(sep.join(str(c) for c in row) for row in rows) + "\n", encoding="utf-8")
    return path


@pytest.fixture
def msvd(tmp_path: Path) -> tuple[Path, Path]:
    root = tmp_path / "YouTubeClips"
    _link(BIKES, root / "-4wsuPCjDBc_5_15.avi")
    _link(CARPHONE, root / "lw7pTwpx0K0_38_48.avi")
    (tmp_path / "MSVD-QA").mkdir()
    (tmp_path / "MSVD-QA" / "youtube_mapping.txt").write_text(
        "-4wsuPCjDBc_5_15 vid1\nlw7pTwpx0K0_38_48 vid2\n"
    )
    rows = [
        {"answer": "bike", "id": 0, "question": "what are people riding?", "video_id": 1},
        {"answer": "man", "id": 1, "question": "who talks on a phone?", "video_id": 2},
        {"answer": "car", "id": 2, "question": "where is the man?", "video_id": 2},
    ]
    return _write_json(tmp_path / "MSVD-QA" / "test_qa.json", rows), root


def test_load_msvd_qa_with_mapping_beside_annotations(msvd: tuple[Path, Path]) -> None:
    annotations, root = msvd
    samples = load_msvd_qa(annotations, root)
    assert [s.id for s in samples] == ["0", "1", "2"]
    assert [s.video.name for s in samples] == ["-4wsuPCjDBc_5_15.avi", "lw7pTwpx0K0_38_48.avi"] + [
        "lw7pTwpx0K0_38_48.avi"
    ]
    assert samples[1].question == "who talks on a phone?" and samples[1].answer == "man"
    assert all(not s.multiple_choice for s in samples) and samples[0].meta["video_id"] == 1
    # The mapped file really is the clip behind it.
    assert load_video(samples[1].video, num_frames=1).frames.shape[1:] == (144, 176, 3)


def test_load_msvd_qa_without_mapping_uses_video_names(tmp_path: Path) -> None:
    root = tmp_path / "videos"
    _link(BIKES, root / "vid7.mp4")
    _link(CARPHONE, root / "clipA.avi")
    rows = [
        {"video_id": 7, "question": "q1", "answer": "a1", "id": 10},
        {"video": "clipA", "question": "q2", "answer": "a2"},
    ]
    samples = load_msvd_qa(_write_json(tmp_path / "qa.json", rows), root)
    assert [s.video for s in samples] == [root / "vid7.mp4", root / "clipA.avi"]
    assert [s.id for s in samples] == ["10", "1"]


def test_load_msvd_qa_json_mapping_and_errors(msvd: tuple[Path, Path], tmp_path: Path) -> None:
    annotations, root = msvd
    mapping = _write_json(tmp_path / "map.json", {"1": "lw7pTwpx0K0_38_48", "2": "-4wsuPCjDBc_5_15"})
    samples = load_msvd_qa(annotations, root, video_map=mapping)
    assert samples[0].video.name == "lw7pTwpx0K0_38_48.avi"
    bad = _write_json(
        tmp_path / "bad.json", [{"video_id": 1, "question": "q", "answer": "a"}, {"video_id": 2}]
    )
    with pytest.raises(ValueError, match=r"bad\.json: row 1: missing field 'question'"):
        load_msvd_qa(bad, root, video_map=mapping)
    with pytest.raises(ValueError, match=r"youtube_mapping\.txt: line 1"):
        (annotations.parent / "youtube_mapping.txt").write_text("only-one-token\n")
        load_msvd_qa(annotations, root)


def test_load_msrvtt_qa(tmp_path: Path) -> None:
    root = tmp_path / "videos"
    _link(BIKES, root / "video7010.mp4")
    _link(BUNNY, root / "video12.mp4")
    rows = [
        {"answer": "bike", "category_id": 3, "id": 0, "question": "what is ridden?", "video_id": 7010},
        {"answer": "rabbit", "category_id": 1, "id": 1, "question": "what animal?", "video": "video12"},
    ]
    samples = load_msrvtt_qa(_write_json(tmp_path / "test_qa.json", rows), root)
    assert [s.video for s in samples] == [root / "video7010.mp4", root / "video12.mp4"]
    assert samples[0].meta == {"video_id": 7010, "category_id": 3}
    missing = _write_json(
        tmp_path / "missing.json", rows + [{"answer": "x", "id": 2, "question": "q", "video_id": 5}]
    )
    with pytest.raises(
        ValueError, match=r"1 video\(s\) referenced by .*missing\.json are missing.*video5\.mp4"
    ):
        load_msrvtt_qa(missing, root)
    assert len(load_msrvtt_qa(missing, root, check_videos=False)) == 3


@pytest.fixture
def activitynet(tmp_path: Path) -> tuple[Path, Path]:
    root = tmp_path / "videos"
    _link(BIKES, root / "v_JspVuT6rsLA.mp4")
    _link(CARPHONE, root / "abc123.mkv")
    questions = [
        {
            "question": "is the man riding a bike",
            "question_id": "v_JspVuT6rsLA_0",
            "video_name": "JspVuT6rsLA",
        },
        {"question": "what does the man hold", "question_id": "v_abc123_1", "video_name": "abc123"},
    ]
    answers = [
        {"answer": "phone", "question_id": "v_abc123_1", "type": 5},
        {"answer": "yes", "question_id": "v_JspVuT6rsLA_0", "type": 3},
    ]
    _write_json(tmp_path / "test_a.json", answers)
    return _write_json(tmp_path / "test_q.json", questions), root


def test_load_activitynet_qa_joins_questions_and_answers(activitynet: tuple[Path, Path]) -> None:
    q_file, root = activitynet
    samples = load_activitynet_qa(q_file, root)
    assert [(s.id, s.answer, s.meta["type"]) for s in samples] == [
        ("v_JspVuT6rsLA_0", "yes", 3),
        ("v_abc123_1", "phone", 5),
    ]
    assert [s.video for s in samples] == [root / "v_JspVuT6rsLA.mp4", root / "abc123.mkv"]
    # Either file of the pair finds the other.
    assert load_activitynet_qa(q_file.with_name("test_a.json"), root) == samples


def test_load_activitynet_qa_errors(activitynet: tuple[Path, Path], tmp_path: Path) -> None:
    q_file, root = activitynet
    questions = json.loads(q_file.read_text())
    extra = _write_json(
        tmp_path / "extra_q.json", questions + [{"question": "q", "question_id": "v_x_9", "video_name": "x"}]
    )
    with pytest.raises(ValueError, match=r"extra_q\.json: row 2: question_id 'v_x_9' has no answer"):
        load_activitynet_qa(extra, root, answers=tmp_path / "test_a.json")
    bad = _write_json(tmp_path / "bad_q.json", [{"question": "q", "video_name": "JspVuT6rsLA"}])
    with pytest.raises(ValueError, match=r"bad_q\.json: row 0: missing field 'question_id'"):
        load_activitynet_qa(bad, root, answers=tmp_path / "test_a.json")
    with pytest.raises(ValueError, match=r"expected a \*_q\.json or \*_a\.json"):
        load_activitynet_qa(tmp_path / "questions.json", root)


def test_load_tgif_qa_frameqa_tsv(tmp_path: Path) -> None:
    root = tmp_path / "gifs"
    _link(BIKES, root / "tumblr_abc_250.mp4")
    _link(CARPHONE, root / "tumblr_xyz_400.mp4")
    header = ["gif_name", "question", "answer", "vid_id", "key", "type"]
    rows = [
        header,
        ["tumblr_abc_250", "what are the people riding ?", "bikes", "gif_1", 1, 0],
        ["tumblr_xyz_400", "how many men are talking ?", "one", "gif_2", 2, 1],
    ]
    samples = load_tgif_qa(_write_table(tmp_path / "Test_frameqa_question.csv", rows, "\t"), root)
    assert [s.id for s in samples] == ["tumblr_abc_250:2", "tumblr_xyz_400:3"]
    assert [s.meta["type_name"] for s in samples] == ["object", "number"]
    assert samples[1].answer == "one" and samples[1].video == root / "tumblr_xyz_400.mp4"
    # Commas work too.
    comma = load_tgif_qa(_write_table(tmp_path / "frameqa.csv", rows, ","), root)
    assert [(s.question, s.answer) for s in comma] == [(s.question, s.answer) for s in samples]

    short = _write_table(tmp_path / "short.tsv", rows + [["tumblr_abc_250", "what ?"]], "\t")
    with pytest.raises(ValueError, match=r"short\.tsv: line 4: expected 6 fields"):
        load_tgif_qa(short, root)
    no_answer = _write_table(tmp_path / "cols.tsv", [["gif_name", "question"], ["a", "b"]], "\t")
    with pytest.raises(ValueError, match=r"cols\.tsv: missing column\(s\) answer"):
        load_tgif_qa(no_answer, root)


_NEXTQA_HEADER = ["video", "frame_count", "width", "height", "question", "answer", "qid", "type"] + [
    f"a{i}" for i in range(5)
]


def _nextqa_rows(*rows: list[object]) -> list[list[object]]:
    return [_NEXTQA_HEADER, *rows]


def test_load_nextqa_with_map(tmp_path: Path) -> None:
    root = tmp_path / "NExTVideo"
    _link(BIKES, root / "1025" / "2440175990.mp4")
    _write_json(tmp_path / "nextqa" / "map_vid_vidorID.json", {"2440175990": "1025/2440175990"})
    options = ["run", "swim", "dance", "ride bikes", "sit"]
    rows = _nextqa_rows([2440175990, 250, 640, 272, "what are the people doing", 3, 4, "DC", *options])
    samples = load_nextqa(_write_table(tmp_path / "nextqa" / "val.csv", rows, ","), root)
    [sample] = samples
    assert sample.id == "2440175990_4"
    assert sample.video == root / "1025" / "2440175990.mp4"
    assert sample.options == ["run", "swim", "dance", "ride bikes", "sit"]
    assert sample.answer_index == 3 and sample.answer == "ride bikes"
    assert sample.meta["type"] == "DC" and sample.meta["frame_count"] == 250


def test_load_nextqa_finds_nested_videos_and_text_answers(tmp_path: Path) -> None:
    root = tmp_path / "videos"
    _link(CARPHONE, root / "0001" / "deep" / "555.mp4")
    rows = _nextqa_rows(
        [555, 120, 176, 144, "what is he holding", "phone", 0, "DO", "cup", "phone", "book", "pen", "key"]
    )
    [sample] = load_nextqa(_write_table(tmp_path / "test.csv", rows, ","), root)
    assert sample.video == root / "0001" / "deep" / "555.mp4"
    assert sample.answer_index == 1


def test_load_nextqa_errors(tmp_path: Path) -> None:
    root = tmp_path / "videos"
    _link(BIKES, root / "1.mp4")
    good = [1, 10, 8, 8, "q", 0, 0, "CW", "a", "b", "c", "d", "e"]
    out_of_range = _write_table(
        tmp_path / "range.csv",
        _nextqa_rows(good, [1, 10, 8, 8, "q", 7, 1, "CW", "a", "b", "c", "d", "e"]),
        ",",
    )
    with pytest.raises(ValueError, match=r"range\.csv: line 3: answer index 7 is past the last of 5 options"):
        load_nextqa(out_of_range, root)
    empty_option = _write_table(
        tmp_path / "empty.csv", _nextqa_rows([1, 10, 8, 8, "q", 0, 0, "CW", "a", "", "c", "d", "e"]), ","
    )
    with pytest.raises(ValueError, match=r"empty\.csv: line 2: field 'a1' is empty"):
        load_nextqa(empty_option, root)
    dup = _write_table(tmp_path / "dup.csv", _nextqa_rows(good, good), ",")
    with pytest.raises(ValueError, match=r"dup\.csv: line 3: duplicate id '1_0'"):
        load_nextqa(dup, root)
    missing = [[v, 10, 8, 8, "q", 0, 0, "CW", "a", "b", "c", "d", "e"] for v in range(2, 9)]
    with pytest.raises(ValueError, match=r"7 video\(s\)") as info:
        load_nextqa(_write_table(tmp_path / "missing.csv", _nextqa_rows(*missing), ","), root)
    listed = str(info.value)
    assert "2.mp4" in listed and "6.mp4" in listed and "7.mp4" not in listed  # first five only


_VIDEOMME_ROWS = [
    {
        "video_id": "001",
        "duration": "short",
        "domain": "Sports",
        "sub_category": "Cycling",
        "videoID": "fFjv93ACGo8",
        "question_id": "001-1",
        "task_type": "Object Recognition",
        "question": "What are the people riding?",
        "options": ["A. Horses.", "B. Bikes.", "C. Boats.", "D. Skis."],
        "answer": "B",
    },
    {
        "video_id": "002",
        "duration": "short",
        "domain": "Film",
        "sub_category": "Animation",
        "videoID": "bunnyID",
        "question_id": "002-1",
        "task_type": "Counting",
        "question": "Which animal is the main character?",
        "options": ["A. Fox", "B. Cat", "C. Rabbit", "D. Bird"],
        "answer": "C",
    },
]


@pytest.fixture
def videomme_root(tmp_path: Path) -> Path:
    root = tmp_path / "data"
    _link(BIKES, root / "fFjv93ACGo8.mp4")
    _link(BUNNY, root / "bunnyID.mp4")
    return root


def test_load_videomme_json_rows(tmp_path: Path, videomme_root: Path) -> None:
    samples = load_videomme(_write_json(tmp_path / "videomme.json", _VIDEOMME_ROWS), videomme_root)
    assert [s.id for s in samples] == ["001-1", "002-1"]
    assert samples[0].options == ["Horses.", "Bikes.", "Boats.", "Skis."]
    assert samples[0].answer_index == 1 and samples[0].answer == "Bikes."
    assert samples[1].answer == "Rabbit" and samples[1].video == videomme_root / "bunnyID.mp4"
    assert samples[0].meta["duration"] == "short" and samples[0].meta["domain"] == "Sports"


def test_load_videomme_nested_json(tmp_path: Path, videomme_root: Path) -> None:
    per_question = ("question_id", "task_type", "question", "options", "answer")
    nested = [
        {
            **{k: v for k, v in row.items() if k not in per_question},
            "questions": [{k: row[k] for k in per_question}],
        }
        for row in _VIDEOMME_ROWS
    ]
    flat = load_videomme(_write_json(tmp_path / "flat.json", _VIDEOMME_ROWS), videomme_root)
    assert load_videomme(_write_json(tmp_path / "nested.json", nested), videomme_root) == flat


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"options": ["A. x", "C. y", "B. z"]}, "lettered A, B, C"),
        ({"answer": "E"}, "past the last of 4 options"),
        ({"answer": "Bikes"}, "not an option letter"),
        ({"options": "A. x"}, "list of at least 2"),
    ],
)
def test_load_videomme_malformed_rows(
    tmp_path: Path, videomme_root: Path, change: dict, message: str
) -> None:
    rows = [_VIDEOMME_ROWS[0], {**_VIDEOMME_ROWS[1], **change}]
    with pytest.raises(ValueError, match=rf"bad\.json: row 1: .*{message}"):
        load_videomme(_write_json(tmp_path / "bad.json", rows), videomme_root)


def test_load_videomme_parquet_without_pyarrow(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, videomme_root: Path
) -> None:
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    parquet = tmp_path / "test-00000-of-00001.parquet"
    parquet.write_bytes(b"PAR1")
    with pytest.raises(ImportError, match="pip install pyarrow"):
        load_videomme(parquet, videomme_root)


def test_load_videomme_parquet(tmp_path: Path, videomme_root: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    parquet = tmp_path / "test-00000-of-00001.parquet"
    pq.write_table(pa.Table.from_pylist(_VIDEOMME_ROWS), parquet)
    assert load_videomme(parquet, videomme_root) == load_videomme(
        _write_json(tmp_path / "rows.json", _VIDEOMME_ROWS), videomme_root
    )


def test_load_mvbench(tmp_path: Path) -> None:
    root = tmp_path / "video" / "star" / "Charades_v1_480"
    _link(BIKES, root / "ZS9XR.mp4")
    rows = [
        {
            "video": "ZS9XR.mp4",
            "question": "What happened after the person took the bike?",
            "candidates": ["Rode it.", "Sat down.", "Opened the door."],
            "answer": "Rode it.",
            "start": 2.5,
            "end": 7.0,
        },
        {"video": "ZS9XR.mp4", "question": "Which is true?", "candidates": ["A", "B"], "answer": "B"},
    ]
    samples = load_mvbench(_write_json(tmp_path / "json" / "action_sequence.json", rows), root)
    assert [s.id for s in samples] == ["action_sequence-0", "action_sequence-1"]
    assert samples[0].answer_index == 0 and samples[1].answer_index == 1
    assert (samples[0].start, samples[0].end) == (2.5, 7.0) and samples[1].start is None
    assert samples[0].meta["task"] == "action_sequence"
    clip = load_video(samples[0].video, fps=1.0, start=samples[0].start, end=samples[0].end)
    assert clip.timestamps[0] >= 2.5 and clip.timestamps[-1] < 7.0

    bad_answer = _write_json(tmp_path / "bad.json", [rows[0], {**rows[1], "answer": "C"}])
    with pytest.raises(ValueError, match=r"bad\.json: row 1: answer 'C' is not one of the options"):
        load_mvbench(bad_answer, root)
    bad_bounds = _write_json(tmp_path / "bounds.json", [{**rows[0], "start": 8.0}])
    with pytest.raises(ValueError, match=r"bounds\.json: row 0: start 8\.0 is not before end 7\.0"):
        load_mvbench(bad_bounds, root)
    with pytest.raises(ValueError, match=r"not valid JSON"):
        (tmp_path / "broken.json").write_text("[{")
        load_mvbench(tmp_path / "broken.json", root)
    with pytest.raises(ValueError, match=r"no samples"):
        load_mvbench(_write_json(tmp_path / "empty.json", []), root)


# ----------------------------------------------------------------------------------------------------
# load_videoqa


@pytest.fixture
def all_formats(tmp_path: Path, msvd, activitynet, videomme_root) -> dict[str, tuple[Path, Path]]:
    tgif_root = tmp_path / "gifs"
    _link(BIKES, tgif_root / "g1.mp4")
    next_root = tmp_path / "NExTVideo"
    _link(BIKES, next_root / "0000" / "42.mp4")
    mvbench_root = tmp_path / "mvb"
    _link(CARPHONE, mvbench_root / "c.mp4")
    msrvtt_root = tmp_path / "msrvtt"
    _link(BIKES, msrvtt_root / "video3.mp4")
    return {
        "msvd-qa": msvd,
        "msrvtt-qa": (
            _write_json(
                tmp_path / "msrvtt_qa.json", [{"answer": "a", "id": 0, "question": "q", "video_id": 3}]
            ),
            msrvtt_root,
        ),
        "activitynet-qa": activitynet,
        "tgif-qa": (
            _write_table(
                tmp_path / "frameqa.tsv",
                [["gif_name", "question", "answer", "type"], ["g1", "q", "a", 2]],
                "\t",
            ),
            tgif_root,
        ),
        "nextqa": (
            _write_table(
                tmp_path / "next.csv",
                _nextqa_rows([42, 1, 1, 1, "q", 0, 1, "TN", "a", "b", "c", "d", "e"]),
                ",",
            ),
            next_root,
        ),
        "videomme": (_write_json(tmp_path / "videomme.json", _VIDEOMME_ROWS), videomme_root),
        "mvbench": (
            _write_json(
                tmp_path / "mvb.json",
                [{"video": "c.mp4", "question": "q", "candidates": ["x", "y"], "answer": "y"}],
            ),
            mvbench_root,
        ),
    }


def test_load_videoqa_dispatches_every_format(all_formats: dict[str, tuple[Path, Path]]) -> None:
    direct = {
        "msvd-qa": load_msvd_qa,
        "msrvtt-qa": load_msrvtt_qa,
        "activitynet-qa": load_activitynet_qa,
        "tgif-qa": load_tgif_qa,
        "nextqa": load_nextqa,
        "videomme": load_videomme,
        "mvbench": load_mvbench,
    }
    assert set(direct) == set(VIDEOQA_FORMATS) == set(all_formats)
    for name, (annotation_file, root) in all_formats.items():
        samples = load_videoqa(name, annotation_file, root)
        assert samples and all(isinstance(s, VideoQASample) and s.video.is_file() for s in samples)
        assert samples == direct[name](annotation_file, root)
        assert all(s.multiple_choice == (name in ("nextqa", "videomme", "mvbench")) for s in samples)
        for s in samples:
            if s.multiple_choice:
                assert s.options[s.answer_index] == s.answer
    assert load_videoqa("MSVD", *all_formats["msvd-qa"]) == load_msvd_qa(*all_formats["msvd-qa"])
    assert (
        load_videoqa("Video_MME", *all_formats["videomme"], limit=1)
        == load_videomme(*all_formats["videomme"])[:1]
    )


def test_load_videoqa_errors(all_formats: dict[str, tuple[Path, Path]], tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown video-QA format 'kinetics'.*msvd-qa.*nextqa.*mvbench"):
        load_videoqa("kinetics", tmp_path / "a.json", tmp_path)
    with pytest.raises(ValueError, match="video_map only applies to msvd-qa and nextqa"):
        load_videoqa("mvbench", *all_formats["mvbench"], video_map=tmp_path / "map.json")
    with pytest.raises(ValueError, match="limit must be an int >= 1"):
        load_videoqa("mvbench", *all_formats["mvbench"], limit=0)
    with pytest.raises(ValueError, match="annotation file not found"):
        load_videoqa("tgif-qa", tmp_path / "nope.tsv", tmp_path)
    annotation_file, _ = all_formats["msvd-qa"]
    # Three questions about two distinct videos: each missing file is reported once.
    with pytest.raises(ValueError, match=r"2 video\(s\).*not a directory"):
        load_videoqa("msvd-qa", annotation_file, tmp_path / "no_such_dir")
    loose = load_videoqa("msvd-qa", annotation_file, tmp_path / "no_such_dir", check_videos=False)
    assert len(loose) == 3 and not loose[0].video.exists()


# ----------------------------------------------------------------------------------------------------
# Synthetic set


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[VideoQASample]]:
    out = tmp_path_factory.mktemp("synthetic")
    return out, synthetic_videoqa(out, seed=0)


def _pyav_frames(path: Path, step: int = 1) -> tuple[np.ndarray, float, tuple[int, int]]:
    """Every ``step``-th frame as RGB, the duration from the stream's own metadata, and (width, height)."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        duration = float(stream.duration * stream.time_base)
        decoded = enumerate(container.decode(stream))
        frames = np.stack([f.to_ndarray(format="rgb24") for i, f in decoded if i % step == 0])
        return frames, duration, (stream.codec_context.width, stream.codec_context.height)


def _pyav_frame_at(path: Path, seconds: float, size: tuple[int, int]) -> np.ndarray:
    with av.open(str(path)) as container:
        for frame in container.decode(video=0):
            if frame.time >= seconds - 1e-6:
                return frame.reformat(width=size[0], height=size[1], format="rgb24").to_ndarray()
    raise AssertionError(f"no frame at {seconds} s in {path}")


def test_synthetic_set_shape(synthetic: tuple[Path, list[VideoQASample]]) -> None:
    out, samples = synthetic
    assert 8 <= len(samples) <= 16
    assert len({s.id for s in samples}) == len(samples)
    assert all(s.video.is_file() for s in samples)
    assert any(s.video.parent == out for s in samples)
    mc = [s for s in samples if s.multiple_choice]
    assert 0 < len(mc) < len(samples)
    for s in mc:
        assert s.options[s.answer_index] == s.answer and len(set(s.options)) == len(s.options)
    assert {s.meta["kind"] for s in samples} == {"colour", "which", "duration", "order"}


def test_synthetic_colour_answers(synthetic: tuple[Path, list[VideoQASample]]) -> None:
    _, samples = synthetic
    colour = [s for s in samples if s.meta["kind"] == "colour"]
    assert sorted(s.answer for s in colour) == ["black and white"] * 2 + ["colour"] * 2
    for s in colour:
        frames, _, _ = _pyav_frames(s.video, step=5)
        spread = frames.max(axis=-1).astype(int) - frames.min(axis=-1)
        assert s.answer == ("colour" if spread.mean() >= COLOUR_THRESHOLD else "black and white")
        assert s.answer == ("black and white" if s.meta.get("grey") else "colour")
        if s.answer == "black and white":
            assert spread.max() <= 8  # grey everywhere, not just on average
        else:
            assert spread.mean() > 2 * COLOUR_THRESHOLD


def test_synthetic_which_clip_answers(synthetic: tuple[Path, list[VideoQASample]]) -> None:
    _, samples = synthetic
    which = [s for s in samples if s.meta["kind"] == "which"]
    sizes = {"bikes": (640, 272), "bunny": (1280, 720), "phone call": (176, 144)}
    assert sorted(s.answer for s in which) == sorted(sizes)
    for s in which:
        assert sorted(s.options) == sorted(sizes)
        with av.open(str(s.video)) as container:
            stream = container.streams.video[0]
            assert (stream.codec_context.width, stream.codec_context.height) == sizes[s.answer]


def test_synthetic_duration_answers(synthetic: tuple[Path, list[VideoQASample]]) -> None:
    _, samples = synthetic
    durations = [s for s in samples if s.meta["kind"] == "duration"]
    assert len(durations) >= 2
    for s in durations:
        with av.open(str(s.video)) as container:
            stream = container.streams.video[0]
            frames = sum(1 for packet in container.demux(stream) if packet.size > 0)
            seconds = frames / float(stream.average_rate)
        assert s.answer == str(round(seconds))
        assert s.meta["duration_s"] == pytest.approx(seconds, abs=1e-3)
    assert {s.answer for s in durations} >= {"10", "5"}


def test_synthetic_order_answers(synthetic: tuple[Path, list[VideoQASample]]) -> None:
    _, samples = synthetic
    order = [s for s in samples if s.meta["kind"] == "order"]
    assert sorted(s.answer for s in order) == ["bikes", "phone call"]
    sources = {"bikes": BIKES, "carphone_pristine": CARPHONE}
    for s in order:
        frames, duration, size = _pyav_frames(s.video)
        first, second = s.meta["segments"]
        assert duration == pytest.approx(first["seconds"] + second["seconds"], abs=1e-3)
        assert len(frames) == 25 * (first["seconds"] + second["seconds"])
        # The clip's first frame is the first segment's opening frame, its middle the second segment's.
        boundary = 25 * first["seconds"]
        for frame, segment, other in ((frames[0], first, second), (frames[boundary], second, first)):
            same = _pyav_frame_at(sources[segment["source"]], segment["start"], size)
            different = _pyav_frame_at(sources[other["source"]], other["start"], size)
            error_same = np.abs(frame.astype(int) - same).mean()
            assert error_same < 12
            assert np.abs(frame.astype(int) - different).mean() > 2 * error_same
        assert s.answer == {"bikes": "bikes", "carphone_pristine": "phone call"}[first["source"]]


def test_synthetic_is_deterministic_and_reuses_files(synthetic: tuple[Path, list[VideoQASample]]) -> None:
    out, samples = synthetic
    written = sorted(p for p in out.iterdir() if p.suffix == ".mp4")
    stamps = {p: p.stat().st_mtime_ns for p in written}
    assert synthetic_videoqa(out, seed=0) == samples
    assert {p: p.stat().st_mtime_ns for p in sorted(p for p in out.iterdir() if p.suffix == ".mp4")} == stamps
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary files left


def test_synthetic_seed_changes_excerpts(tmp_path: Path, synthetic: tuple[Path, list[VideoQASample]]) -> None:
    _, samples = synthetic
    other = synthetic_videoqa(tmp_path, seed=1)
    assert [s.id for s in other] == [s.id for s in samples]
    assert [s.meta.get("segments") for s in other] != [s.meta.get("segments") for s in samples]
    assert all(s.video.is_file() for s in other)


def test_videoqa_names_after_the_split() -> None:
    """videoqa.py was split into annotations (schema + row readers), benchmarks (the loaders) and media
    (write_mp4, VIDEO_SUFFIXES): every name is still importable from mmeff.datasets.videoqa, as the same
    object as in its new home, and from the package's lazy exports."""
    import mmeff.datasets as package
    from mmeff.datasets import annotations, benchmarks, videoqa

    for name in videoqa.__all__:
        assert hasattr(videoqa, name), name
    for module in (annotations, benchmarks, media):
        for name in set(module.__all__) & set(videoqa.__all__):
            assert getattr(videoqa, name) is getattr(module, name), name
    assert set(benchmarks.__all__) <= set(videoqa.__all__)
    assert videoqa.write_mp4 is media.write_mp4 and videoqa.VIDEO_SUFFIXES is media.VIDEO_SUFFIXES
    assert ".mp4" in media.VIDEO_SUFFIXES and media.MP4_FPS == 25
    assert package.VideoQASample is VideoQASample and package.write_mp4 is media.write_mp4
