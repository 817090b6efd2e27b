"""`mmeff eval videoqa` resume safety (issue 32, items 4-5): rows of another run configuration are never
resumed as this run's, malformed rows and repeated annotation ids are refused by name, and one unreadable
clip is recorded as failed instead of stopping the evaluation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mmeff.datasets import videoqa
from mmeff.datasets.media import sample_video_path
from mmeff.datasets.videoqa import VideoQASample
from mmeff.eval.results import format_report, load_results
from mmeff.eval.videoqa import Prediction, evaluate, llava_predictor


def _samples(n: int = 3) -> list[VideoQASample]:
    return [VideoQASample(id=f"s{i}", video=f"/nowhere/{i}.mp4", question=f"q{i}", answer="two") for i in range(n)]


def _predict(batch: list[VideoQASample]) -> list[Prediction]:
    return [Prediction(id=s.id, text="2", visual_tokens=8, decode_s=0.0, model_s=0.0, new_tokens=1) for s in batch]


def _video_sample(sid: str, video: Path | str) -> VideoQASample:
    return VideoQASample(id=sid, video=video, question="What vehicle is shown?", answer="bicycle",
                         options=["car", "bicycle", "boat"], answer_index=1)


# ------------------------------------------------------------------------------ one run per results file


def test_cli_refuses_to_resume_another_runs_rows_unless_no_resume(
    default, model_cache, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from mmeff.cli.main import main

    # one bundled clip stands in for the synthetic set, so each run is a single short generate
    monkeypatch.setattr(videoqa, "synthetic_videoqa", lambda out_dir, seed=0: [_video_sample("a", sample_video_path("bikes"))])
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    out = tmp_path / "res.jsonl"
    base = ["eval", "videoqa", "--model", "default", "--cache-dir", str(model_cache), "--method", "pool",
            "--frames", "2", "--data", "synthetic", "--out", str(out), "--max-new-tokens", "2"]
    assert main([*base, "--tokens", "16"]) == 0
    first = load_results(out)
    assert first[0]["config"]["budget"] == {"tokens": 16} and first[0]["config"]["frames"] == 2
    capsys.readouterr()

    # another budget into the same --out: a one-line error naming the file and both configs
    assert main([*base, "--tokens", "8"]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("mmeff: error")]
    assert len(errors) == 1  # one line (the rest of stderr is weight-loading progress)
    err = errors[0]
    assert str(out) in err and "differs in budget, method" in err
    assert '"budget": {"tokens": 16}' in err and '"budget": {"tokens": 8}' in err
    assert load_results(out) == first  # nothing appended

    # --no-resume starts the file over under the new config
    assert main([*base, "--tokens", "8", "--no-resume"]) == 0
    rows = load_results(out)
    assert len(rows) == 1 and rows[0]["config"]["budget"] == {"tokens": 8}
    assert main([*base, "--tokens", "8"]) == 0  # the same run resumes as before


def test_evaluate_refuses_other_config_and_rows_without_one(tmp_path: Path) -> None:
    out = tmp_path / "r.jsonl"
    evaluate(_samples(2), _predict, out, progress=False, config={"method": "pool(tokens=16)", "frames": 8})
    with pytest.raises(ValueError, match=r"r\.jsonl line 1 comes from another run configuration \(differs in frames\)"):
        evaluate(_samples(3), _predict, out, progress=False, config={"method": "pool(tokens=16)", "frames": 4})
    with pytest.raises(ValueError, match=r"differs in frames, method"):
        evaluate(_samples(3), _predict, out, progress=False, config={"method": "tome(ratio=0.5)", "frames": 4})
    # rows of a run that recorded no config are not this run's either
    with pytest.raises(ValueError, match=r"its config \{.*\}, this run's null"):
        evaluate(_samples(3), _predict, out, progress=False)
    # the matching config resumes (tuples and lists alike, as JSON reads them back)
    report = evaluate(_samples(3), _predict, out, progress=False, config={"frames": 8, "method": "pool(tokens=16)"})
    assert report.n == 3 and len(load_results(out)) == 3


# ---------------------------------------------------------------------------------------- malformed rows


def test_row_without_correct_or_id_names_the_line(tmp_path: Path) -> None:
    out = tmp_path / "r.jsonl"
    evaluate(_samples(2), _predict, out, progress=False)
    lines = out.read_text().splitlines()
    row = json.loads(lines[1])
    del row["correct"]
    out.write_text(lines[0] + "\n" + json.dumps(row) + "\n")
    with pytest.raises(ValueError, match=r"r\.jsonl: line 2 has no 'correct' field"):
        evaluate(_samples(3), _predict, out, progress=False)
    # valid JSON without an id is no torn write, even as the last line
    out.write_text(lines[0] + "\n" + json.dumps({"prediction": "x"}) + "\n")
    with pytest.raises(ValueError, match=r"r\.jsonl: line 2 is not a result record \(no 'id'\)"):
        evaluate(_samples(3), _predict, out, progress=False)


def test_repeated_annotation_ids_are_refused_by_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from mmeff.cli.main import main

    rows = [{"id": i, "video_id": 1, "question": f"what is {k}?", "answer": "dog"}
            for k, i in enumerate([7, 8, 7, 9, 8])]
    ann = tmp_path / "test_qa.json"
    ann.write_text(json.dumps(rows))
    root = tmp_path / "videos"
    root.mkdir()
    with pytest.raises(ValueError, match=r"test_qa\.json: row 2: duplicate id '7' \(first at row 0\); 1 more: '8' \(row 4"):
        videoqa.load_videoqa("msrvtt-qa", ann, root, check_videos=False)
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    args = ["eval", "videoqa", "--data", "msrvtt-qa", "--annotations", str(ann), "--video-root", str(root),
            "--out", str(tmp_path / "r.jsonl")]
    assert main(args) == 2  # refused before any model is loaded
    err = capsys.readouterr().err
    assert str(ann) in err and "'7'" in err and "'8'" in err


# --------------------------------------------------------------------------------------- unreadable clips


def test_unreadable_clips_are_recorded_as_failed_and_the_rest_scored(default, tmp_path: Path) -> None:
    model, tok, _ = default
    bikes = Path(sample_video_path("bikes"))
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    truncated = tmp_path / "truncated.mp4"
    truncated.write_bytes(bikes.read_bytes()[: bikes.stat().st_size // 3])  # no moov atom left
    samples = [_video_sample("good", bikes), _video_sample("empty", empty), _video_sample("cut", truncated),
               _video_sample("gone", tmp_path / "missing.mp4")]
    predict = llava_predictor(model, tok, num_frames=2, max_new_tokens=2)
    out = tmp_path / "r.jsonl"
    report = evaluate(samples, predict, out, batch_size=4, progress=False)  # one batch holding all four
    rows = {r["id"]: r for r in load_results(out)}
    assert "failed" not in rows["good"] and isinstance(rows["good"]["correct"], bool)
    assert "empty (0 bytes)" in rows["empty"]["failed"] and "cannot read video" in rows["cut"]["failed"]
    assert "not found" in rows["gone"]["failed"]
    assert all("correct" not in rows[i] for i in ("empty", "cut", "gone"))
    assert report.n == 1 and report.failed == 3 and report.accuracy == float(rows["good"]["correct"])
    assert report.as_dict()["failed"] == 3 and "failed" in format_report(report)

    # a resume tries the failed samples again: the repaired clip is scored, the others fail again
    empty.write_bytes(bikes.read_bytes())
    again = evaluate(samples, predict, out, batch_size=4, progress=False)
    rows = {r["id"]: r for r in load_results(out)}
    assert len(load_results(out)) == 4 and "failed" not in rows["empty"]
    assert rows["empty"]["prediction"] == rows["good"]["prediction"]  # same clip, same greedy answer
    assert again.n == 2 and again.failed == 2
