"""Video-QA evaluation: scoring, the LLM judge client, the resumable sharded harness, LLaVA prediction, CLI."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

import mmeff
from mmeff.datasets import videoqa
from mmeff.datasets.media import sample_video_path
from mmeff.datasets.videoqa import VideoQASample
from mmeff.eval import answers, results
from mmeff.eval import videoqa as eval_videoqa
from mmeff.eval.answers import (
    JudgeError,
    JudgeResponseError,
    build_question,
    extract_option,
    judge_open,
    normalize_answer,
    parse_judge_reply,
    score_open,
)
from mmeff.eval.results import (
    EvalReport,
    format_report,
    load_results,
    merge_results,
    resolve_shard,
    shard_path,
)
from mmeff.eval.videoqa import (
    Prediction,
    evaluate,
    llava_predictor,
    predict_llava,
    read_clip,
)

REPO = Path(__file__).resolve().parents[2]

# every public name mmeff.eval.videoqa had before scoring and results files moved out of it
VIDEOQA_NAMES_BEFORE_SPLIT = [
    "EvalReport", "JudgeError", "JudgeResponseError", "MC_INSTRUCTION", "OPEN_INSTRUCTION", "OPTION_LETTERS",
    "PredictFn", "Prediction", "build_question", "evaluate", "extract_option", "format_question", "format_report",
    "judge_open", "llava_predictor", "load_results", "merge_results", "normalize_answer", "parse_judge_reply",
    "predict_batch", "predict_llava", "read_clip", "report_from_records", "resolve_shard", "rows_visual_tokens",
    "score_open", "shard_path",
]


def test_videoqa_keeps_every_name_it_had_before_the_split() -> None:
    missing = [n for n in VIDEOQA_NAMES_BEFORE_SPLIT if not hasattr(eval_videoqa, n)]
    assert missing == []
    assert set(VIDEOQA_NAMES_BEFORE_SPLIT) <= set(eval_videoqa.__all__)
    # the re-exports are the same objects as in their new homes, not copies
    assert eval_videoqa.extract_option is answers.extract_option
    assert eval_videoqa.EvalReport is results.EvalReport
    assert eval_videoqa.merge_results is results.merge_results

# ------------------------------------------------------------------------------------------- scoring

OPTS = ["a dog", "a red car", "a car", "cat"]


@pytest.mark.parametrize(
    "text, expected",
    [
        ("(B)", 1), ("B.", 1), ("B)", 1), ("B", 1), ("b", 1), ("b.", 1), ("[c]", 2),
        ("Answer: B", 1), ("answer: b.", 1), ("The answer is b", 1), ("the answer is B, a red car", 1),
        ("The answer is (C).", 2), ("The correct option is D", 3), ("Option (b)", 1), ("the best choice is c", 2),
        ("B. a red car", 1), ("C) a car", 2), ("D: cat", 3), ("I think it's B.", 1),
        # option text, case/punctuation/article-insensitive; the longest (containing) match wins
        ("a red car", 1), ("A Red Car!", 1), ("It is a red car on the road.", 1), ("red car", 1),
        ("the car", 2), ("Cat", 3), ("A dog is running", 0),
        # letters must be unambiguous and in range; an article is not a letter
        ("(A) or (B)", None), ("E", None), ("(E)", None), ("The answer is a man", None),
        ("a dog and a cat", None), ("a red car and a car", None), ("nothing fits", None), ("", None),
    ],
)
def test_extract_option(text: str, expected: int | None) -> None:
    assert extract_option(text, OPTS) == expected


def test_extract_option_same_text_options_and_validation() -> None:
    # duplicated option texts are one answer, the first index is reported
    assert extract_option("yes", ["yes", "no", "Yes."]) == 0
    with pytest.raises(ValueError, match="at least one option"):
        extract_option("A", [])


@pytest.mark.parametrize(
    "text, expected",
    [
        ("The Dog!", "dog"), ("  an   apple ", "apple"), ("Three apples.", "3 apples"), ("twenty", "20"),
        ("zero", "0"), ("Yes, he is.", "yes"), ("Yeah", "yes"), ("correct.", "yes"), ("Nope", "no"),
        ("No.", "no"), ("false", "no"),
        # a leading "no" that is part of the answer keeps its meaning
        ("no one", "no 1"), ("right hand", "right hand"), ("don't", "don t"),
    ],
)
def test_normalize_answer(text: str, expected: str) -> None:
    assert normalize_answer(text) == expected


def test_score_open() -> None:
    assert score_open(" bikes ", "bikes") == {"exact": True, "normalized": True}
    assert score_open("Bikes.", "bikes") == {"exact": False, "normalized": True}
    assert score_open("two", "2") == {"exact": False, "normalized": True}
    assert score_open("Yes, they are.", "yes") == {"exact": False, "normalized": True}
    assert score_open("no", "yes") == {"exact": False, "normalized": False}
    assert score_open("a cat", "the dog") == {"exact": False, "normalized": False}


def test_build_question_letters_options() -> None:
    mc = VideoQASample(id="1", video="v.mp4", question="What? ", answer="y", options=["x", "y"], answer_index=1)
    assert build_question(mc) == "What?\nOptions:\n(A) x\n(B) y\nAnswer with the option's letter from the given choices directly."
    op = VideoQASample(id="2", video="v.mp4", question="Who?", answer="me")
    assert build_question(op).startswith("Who?\n") and "single word" in build_question(op)


# --------------------------------------------------------------------------------------------- judge


@pytest.mark.parametrize(
    "reply, correct, score",
    [
        ('{"pred": "yes", "score": 4}', True, 4.0),
        ('```json\n{"pred": "no", "score": 1}\n```', False, 1.0),
        ("{'pred': 'Yes', 'score': 5}", True, 5.0),
        ('Sure! {"pred": "no", "score": "2"} hope that helps', False, 2.0),
        ("Yes. Score: 3", True, 3.0),
        ("pred: no, score=9", False, 5.0),  # clamped to the 0-5 scale
        ('{"pred": "yes"}', True, math.nan),
    ],
)
def test_parse_judge_reply(reply: str, correct: bool, score: float) -> None:
    out = parse_judge_reply(reply)
    assert out["correct"] is correct
    assert (math.isnan(out["score"]) and math.isnan(score)) or out["score"] == score


@pytest.mark.parametrize("reply", ["I cannot decide, score 3", "no idea", '{"score": 3}', ""])
def test_parse_judge_reply_without_verdict(reply: str) -> None:
    with pytest.raises(JudgeResponseError, match="no yes/no verdict"):
        parse_judge_reply(reply)


class _FakeJudge(BaseHTTPRequestHandler):
    requests: list[tuple[str, dict]] = []
    reply = '{"pred": "yes", "score": 4}'
    status = 200

    def do_POST(self) -> None:  # noqa: N802 (http.server's name)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).requests.append((self.path, body))
        user = body["messages"][-1]["content"]
        # grade by the predicted answer so one server serves several cases
        if "Predicted Answer: garbage" in user:
            content = "no idea"
        elif "Predicted Answer: bikes" in user:
            content = type(self).reply
        else:
            content = '{"pred": "no", "score": 0}'
        payload = json.dumps({"choices": [{"message": {"role": "assistant", "content": content}}]}).encode()
        self.send_response(type(self).status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def judge_server():
    _FakeJudge.requests = []
    _FakeJudge.status = 200
    server = ThreadingHTTPServer(("127.0.0.1", 0), _FakeJudge)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_judge_open_talks_openai_chat(judge_server: str) -> None:
    for url in (judge_server, judge_server + "/v1/", judge_server + "/v1/chat/completions"):
        out = judge_open("What do they ride?", "bicycles", "bikes", url, "my-judge", timeout=5)
        assert out["correct"] is True and out["score"] == 4.0
    paths = [p for p, _ in _FakeJudge.requests]
    assert paths == ["/v1/chat/completions"] * 3
    body = _FakeJudge.requests[0][1]
    assert body["model"] == "my-judge" and body["temperature"] == 0
    user = body["messages"][-1]["content"]
    assert "Question: What do they ride?" in user and "Correct Answer: bicycles" in user
    assert judge_open("q", "bicycles", "cars", judge_server, "m", timeout=5)["correct"] is False
    with pytest.raises(JudgeResponseError):
        judge_open("q", "bicycles", "garbage", judge_server, "m", timeout=5)


def test_judge_open_http_error_and_refused(judge_server: str) -> None:
    _FakeJudge.status = 500
    with pytest.raises(JudgeError, match="HTTP 500"):
        judge_open("q", "r", "bikes", judge_server, "m", timeout=5)
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    with pytest.raises(JudgeError, match=f"cannot reach the judge at {url}/v1/chat/completions") as err:
        judge_open("q", "r", "p", url, "m", timeout=5)
    assert not isinstance(err.value, JudgeResponseError)


# ------------------------------------------------------------------------------------------- harness


def _samples(n: int = 6) -> list[VideoQASample]:
    out = []
    for i in range(n):
        if i % 2:
            out.append(VideoQASample(id=f"s{i}", video=f"/nowhere/{i}.mp4", question=f"q{i}", answer="cat",
                                     options=["dog", "cat", "bird"], answer_index=1, meta={"type": "mc"}))
        else:
            out.append(VideoQASample(id=f"s{i}", video=f"/nowhere/{i}.mp4", question=f"q{i}", answer="two",
                                     meta={"type": "count"} if i % 4 == 0 else {}))
    return out


def _fake_answer(s: VideoQASample) -> Prediction:
    # deterministic, a mix of right and wrong answers
    i = int(s.id[1:])
    text = ("(B)" if i % 3 else "A") if s.options else ("2" if i % 4 == 0 else "three")
    return Prediction(id=s.id, text=text, visual_tokens=100 + i, decode_s=0.01 * i, model_s=0.1, new_tokens=i + 1)


class _CountingPredict:
    def __init__(self, fail_on: str | None = None) -> None:
        self.calls: list[str] = []
        self.fail_on = fail_on

    def __call__(self, batch):
        for s in batch:
            if s.id == self.fail_on:
                raise RuntimeError(f"boom on {s.id}")
        self.calls += [s.id for s in batch]
        return [_fake_answer(s) for s in batch]


def test_evaluate_records_and_report(tmp_path: Path) -> None:
    samples = _samples(6)
    out = tmp_path / "r.jsonl"
    report = evaluate(samples, _CountingPredict(), out, batch_size=4, progress=False)
    recs = load_results(out)
    assert [r["id"] for r in recs] == [s.id for s in samples]
    assert [r["index"] for r in recs] == list(range(6))
    r0, r1, r3 = recs[0], recs[1], recs[3]
    assert r0["prediction"] == "2" and r0["reference"] == "two" and r0["exact"] is False and r0["correct"] is True
    assert r0["type"] == "count" and r0["multiple_choice"] is False and "pred_index" not in r0
    assert r1["pred_index"] == 1 and r1["answer_index"] == 1 and r1["correct"] is True and r1["type"] == "mc"
    assert r3["prediction"] == "A" and r3["pred_index"] == 0 and r3["correct"] is False
    assert r3["visual_tokens"] == 103 and r3["new_tokens"] == 4 and r3["latency_s"] == pytest.approx(0.13)
    # open: s0 "2"==two ok, s2 "three" wrong, s4 "2" ok; mc: s1 (B) ok, s3 A wrong, s5 (B) ok
    assert report.n == 6 and report.accuracy == pytest.approx(4 / 6)
    assert report.n_multiple_choice == 3 and report.accuracy_multiple_choice == pytest.approx(2 / 3)
    assert report.n_open == 3 and report.accuracy_open == pytest.approx(2 / 3) and report.exact_open == 0.0
    assert report.per_type == {"-": {"n": 1, "accuracy": 0.0}, "count": {"n": 2, "accuracy": 1.0},
                               "mc": {"n": 3, "accuracy": pytest.approx(2 / 3)}}
    assert report.visual_tokens_mean == pytest.approx(102.5) and report.visual_tokens_median == pytest.approx(102.5)
    assert report.latency_median_s == pytest.approx(0.125) and report.judge_accuracy is None
    d = json.loads(json.dumps(report.as_dict()))
    assert d["n"] == 6 and d["per_type"]["count"]["n"] == 2
    table = format_report(report)
    assert "accuracy" in table and "0.667" in table and "count" in table and "102.5" in table


def test_question_type_from_each_loaders_key(tmp_path: Path) -> None:
    metas = [{"type": 3, "type_name": "what"}, {"type": 2}, {"task": "action_sequence"}, {"kind": "colour"}, {}]
    samples = [VideoQASample(id=f"t{i}", video="v.mp4", question="q", answer="two", meta=m) for i, m in enumerate(metas)]
    report = evaluate(samples, _CountingPredict(), tmp_path / "t.jsonl", progress=False)
    assert [r["type"] for r in load_results(tmp_path / "t.jsonl")] == ["what", "2", "action_sequence", "colour", None]
    assert sorted(report.per_type) == ["-", "2", "action_sequence", "colour", "what"]


def test_evaluate_rejects_bad_input(tmp_path: Path) -> None:
    s = _samples(2)
    with pytest.raises(ValueError, match="unique"):
        evaluate([s[0], s[0]], _CountingPredict(), tmp_path / "a.jsonl", progress=False)
    with pytest.raises(ValueError, match="expected"):
        evaluate(s, lambda batch: [_fake_answer(x) for x in reversed(batch)], tmp_path / "b.jsonl", batch_size=2,
                 progress=False)


@pytest.mark.parametrize("batch_size", [1, 2])
def test_evaluate_resumes_after_crash(tmp_path: Path, batch_size: int) -> None:
    samples = _samples(7)
    out = tmp_path / "r.jsonl"
    first = _CountingPredict(fail_on="s2")
    with pytest.raises(RuntimeError, match="boom on s2"):
        evaluate(samples, first, out, batch_size=batch_size, progress=False)
    assert [r["id"] for r in load_results(out)] == ["s0", "s1"]
    again = _CountingPredict()
    report = evaluate(samples, again, out, batch_size=batch_size, progress=False)
    assert again.calls == [f"s{i}" for i in range(2, 7)]
    assert sorted(first.calls + again.calls) == sorted(s.id for s in samples)  # nothing predicted twice
    ids = [json.loads(line)["id"] for line in out.read_text().splitlines()]
    assert ids == [s.id for s in samples]
    assert report.n == 7
    # a third run has nothing left to do; resume=False starts over
    third = _CountingPredict()
    assert evaluate(samples, third, out, progress=False).n == 7 and third.calls == []
    fresh = _CountingPredict()
    evaluate(samples[:3], fresh, out, resume=False, progress=False)
    assert fresh.calls == ["s0", "s1", "s2"] and len(load_results(out)) == 3


def test_evaluate_handles_truncated_last_line(tmp_path: Path) -> None:
    samples = _samples(4)
    out = tmp_path / "r.jsonl"
    evaluate(samples[:2], _CountingPredict(), out, progress=False)
    good = out.read_text()
    torn = json.dumps({"id": "s2", "prediction": "x"})[:17]
    out.write_text(good + torn)  # a crash mid-write: no newline, invalid JSON
    assert [r["id"] for r in load_results(out)] == ["s0", "s1"]
    pred = _CountingPredict()
    evaluate(samples, pred, out, progress=False)
    assert pred.calls == ["s2", "s3"]
    lines = out.read_text().splitlines()
    assert [json.loads(line)["id"] for line in lines] == ["s0", "s1", "s2", "s3"]
    # corruption before the end is not a crash artefact: refuse rather than guess
    out.write_text(good.splitlines()[0] + "\n{not json\n" + good.splitlines()[1] + "\n")
    with pytest.raises(ValueError, match="line 2 is corrupt"):
        evaluate(samples, _CountingPredict(), out, progress=False)


def test_evaluate_with_judge(tmp_path: Path, judge_server: str) -> None:
    samples = [
        VideoQASample(id="a", video="x.mp4", question="ride?", answer="bicycles"),
        VideoQASample(id="b", video="x.mp4", question="ride?", answer="bicycles"),
        VideoQASample(id="c", video="x.mp4", question="ride?", answer="bicycles"),
        VideoQASample(id="d", video="x.mp4", question="q", answer="y", options=["x", "y"], answer_index=1),
    ]
    texts = {"a": "bikes", "b": "cars", "c": "garbage", "d": "B"}

    def predict(batch):
        return [Prediction(id=s.id, text=texts[s.id], visual_tokens=1, decode_s=0, model_s=0, new_tokens=1) for s in batch]

    def judge(question, ref, pred):
        return judge_open(question, ref, pred, judge_server, "m", timeout=5)

    report = evaluate(samples, predict, tmp_path / "j.jsonl", judge=judge, progress=False)
    recs = {r["id"]: r for r in load_results(tmp_path / "j.jsonl")}
    assert recs["a"]["judge"] == {"correct": True, "score": 4.0} and recs["a"]["correct"] is False
    assert recs["b"]["judge"] == {"correct": False, "score": 0.0}
    assert recs["c"]["judge"]["correct"] is None and "no yes/no verdict" in recs["c"]["judge"]["error"]
    assert "judge" not in recs["d"]  # multiple choice is scored by option match only
    assert len(_FakeJudge.requests) == 3
    assert report.judge_n == 2 and report.judge_accuracy == 0.5 and report.judge_score == 2.0
    assert report.judge_errors == 1 and "judge" in format_report(report)


# ------------------------------------------------------------------------------------------ sharding


def test_resolve_shard_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert resolve_shard() == (0, 1)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")  # a device choice, never the shard
    assert resolve_shard() == (1, 2)
    assert resolve_shard(rank=0, world_size=3) == (0, 3)
    with pytest.raises(ValueError, match="invalid shard"):
        resolve_shard(rank=2, world_size=2)
    assert shard_path("out/r.jsonl", 1, 2) == Path("out/r.jsonl.rank1-of-2.jsonl")
    assert shard_path("out/r.jsonl", 0, 1) == Path("out/r.jsonl")


def test_shards_merge_like_a_single_run(tmp_path: Path) -> None:
    samples = _samples(7)
    single = tmp_path / "single.jsonl"
    evaluate(samples, _CountingPredict(), single, progress=False)
    out = tmp_path / "sharded.jsonl"
    calls = []
    for rank in (0, 1):
        pred = _CountingPredict()
        rep = evaluate(samples, pred, out, rank=rank, world_size=2, progress=False, batch_size=2)
        calls.append(pred.calls)
        assert rep.n == len(pred.calls)
    assert calls == [["s0", "s2", "s4", "s6"], ["s1", "s3", "s5"]]
    assert not out.exists() and shard_path(out, 1, 2).exists()
    merged = merge_results(out, 2, expected_ids=[s.id for s in samples])
    assert merged == load_results(single)
    assert out.read_text() == single.read_text()


def test_merge_results_errors(tmp_path: Path) -> None:
    out = tmp_path / "m.jsonl"
    shard_path(out, 0, 2).write_text(json.dumps({"id": "a", "index": 0}) + "\n")
    with pytest.raises(ValueError, match=r"missing shard.*rank1-of-2"):
        merge_results(out, 2)
    shard_path(out, 1, 2).write_text(json.dumps({"id": "a", "index": 1}) + "\n")
    with pytest.raises(ValueError, match="'a' is in shard 0 and shard 1"):
        merge_results(out, 2)
    shard_path(out, 1, 2).write_text(json.dumps({"id": "b", "index": 1}) + "\n")
    with pytest.raises(ValueError, match="1 sample.*have no result.*'c'"):
        merge_results(out, 2, expected_ids=["a", "b", "c"])
    assert not out.exists()
    assert [r["id"] for r in merge_results(out, 2)] == ["a", "b"]


_RANK_SCRIPT = """
import json, sys
import torch.distributed as dist
sys.path.insert(0, {tests!r})
from test_evaluate import _CountingPredict, _samples
from mmeff.eval.videoqa import evaluate

dist.init_process_group("gloo")
pred = _CountingPredict()
report = evaluate(_samples(7), pred, {out!r}, batch_size=2, progress=False)
print(json.dumps({{"calls": pred.calls, "n": report.n, "accuracy": report.accuracy}}))
dist.destroy_process_group()
"""


def test_two_process_distributed_run_merges_on_rank0(tmp_path: Path) -> None:
    out = tmp_path / "dist.jsonl"
    script = tmp_path / "rank.py"
    script.write_text(_RANK_SCRIPT.format(tests=str(Path(__file__).parent), out=str(out)))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in (0, 1):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": "0",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen([sys.executable, str(script)], env=env, cwd=REPO,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    results = []
    deadline = time.monotonic() + 120
    for p in procs:
        stdout, stderr = p.communicate(timeout=max(1, deadline - time.monotonic()))
        assert p.returncode == 0, stderr[-2000:]
        results.append(json.loads(stdout.strip().splitlines()[-1]))
    assert results[0]["calls"] == ["s0", "s2", "s4", "s6"] and results[1]["calls"] == ["s1", "s3", "s5"]
    # rank 0 merged and reports on everything; rank 1 on its shard
    assert results[0]["n"] == 7 and results[1]["n"] == 3
    single = tmp_path / "single.jsonl"
    report = evaluate(_samples(7), _CountingPredict(), single, progress=False)
    assert out.read_text() == single.read_text()
    assert results[0]["accuracy"] == pytest.approx(report.accuracy)


# -------------------------------------------------------------------------------------- frames/model


def test_read_clip_respects_window() -> None:
    video = sample_video_path("bikes")  # 10 s at 25 fps
    frames, ts = read_clip(video, 4, start=2.0, end=4.0)
    assert frames.shape == (4, 272, 640, 3) and frames.dtype == np.uint8
    assert np.all((ts >= 2.0) & (ts <= 4.0)) and np.all(np.diff(ts) > 0)
    # open-ended window: from 8 s to the end
    _, ts = read_clip(video, 3, start=8.0)
    assert np.all(ts >= 8.0) and np.all(np.diff(ts) > 0)
    _, ts = read_clip(video, 2)
    np.testing.assert_allclose(ts, [2.48, 7.48], atol=1e-6)  # whole video: segment midpoints
    _, ts = read_clip(video, 2, frame_rule="slowfast")
    np.testing.assert_allclose(ts, [2.48, 7.44], atol=1e-6)  # get_seq_frames(250, 2) = [62, 186]
    with pytest.raises(ValueError, match="start must be before end"):
        read_clip(video, 2, start=3.0, end=1.0)
    with pytest.raises(ValueError, match="at or after the end of the video"):
        read_clip(video, 2, start=50.0, end=60.0)


def _video_samples() -> list[VideoQASample]:
    video = sample_video_path("bikes")
    return [
        VideoQASample(id="open", video=video, question="What are the people riding?", answer="bikes",
                      meta={"type": "object"}),
        VideoQASample(id="mc", video=video, question="What vehicle is shown?", answer="bicycle",
                      options=["car", "bicycle", "boat"], answer_index=1, meta={"type": "vehicle"},
                      # a window gives this row other frames, so rows mixed up in a batch would show
                      start=2.0, end=5.0),
    ]


@pytest.mark.parametrize("method", ["none", "pool"])
def test_llava_predict_and_evaluate(default, tmp_path: Path, method: str) -> None:
    model, tok, _ = default
    reducer = mmeff.create_reducer("pool", tokens=16) if method == "pool" else None
    per_video = 2 * (16 if reducer else 64)
    samples = _video_samples()
    singles = [predict_llava(model, tok, s, reducer=reducer, num_frames=2, max_new_tokens=4) for s in samples]
    for s, p in zip(samples, singles):
        assert p.id == s.id and p.visual_tokens == per_video
        assert 1 <= p.new_tokens <= 4 and p.decode_s > 0 and p.model_s > 0
    out = tmp_path / f"{method}.jsonl"
    predict = llava_predictor(model, tok, reducer=reducer, num_frames=2, max_new_tokens=4)
    report = evaluate(samples, predict, out, batch_size=2, progress=False)
    recs = load_results(out)
    # greedy decoding: left-padded batch rows answer exactly like single samples
    assert [r["prediction"] for r in recs] == [p.text for p in singles]
    assert [r["new_tokens"] for r in recs] == [p.new_tokens for p in singles]
    assert [r["visual_tokens"] for r in recs] == [per_video, per_video]
    op, mc = recs
    assert op["id"] == "open" and op["reference"] == "bikes" and op["multiple_choice"] is False
    assert op["correct"] == score_open(op["prediction"], "bikes")["normalized"]
    assert mc["options"] == ["car", "bicycle", "boat"] and mc["answer_index"] == 1
    assert mc["pred_index"] == extract_option(mc["prediction"], mc["options"])
    assert mc["correct"] == (mc["pred_index"] == 1)
    for r in recs:
        assert r["latency_s"] == pytest.approx(r["decode_s"] + r["model_s"]) and r["model_s"] > 0
    assert op["model_s"] == mc["model_s"]  # one generate call, its time split over the batch
    assert isinstance(report, EvalReport) and report.n == 2
    assert report.visual_tokens_mean == per_video and report.visual_tokens_median == per_video
    assert set(report.per_type) == {"object", "vehicle"}
    assert report.accuracy == pytest.approx((op["correct"] + mc["correct"]) / 2)


def test_predict_through_the_models_own_processor(default, model_cache, monkeypatch) -> None:
    """Given the checkpoint's processor, frames go through its image processor (not the hard-coded CLIP
    pipeline) and the prompt through its chat template; for the default model that is the same answer as the
    bare tokenizer's route."""
    import mmeff.eval.videoqa as vq
    from mmeff.models.embedded import default_processor

    model, processor, _ = default
    tok = processor.tokenizer
    assert type(processor).__name__ == "LlavaProcessor" and type(default_processor(model_cache)) is type(processor)
    calls = []
    real = processor.image_processor.__class__.__call__
    monkeypatch.setattr(processor.image_processor.__class__, "__call__",
                        lambda self, *a, **k: (calls.append(1), real(self, *a, **k))[1])
    samples = _video_samples()
    with_tok = vq.predict_batch(model, tok, samples, num_frames=2, max_new_tokens=4)
    with_proc = vq.predict_batch(model, processor, samples, num_frames=2, max_new_tokens=4)
    assert len(calls) == 1  # the batch's frames went through the checkpoint's image processor
    assert [p.text for p in with_proc] == [p.text for p in with_tok]


def test_predict_reads_frames_with_the_reducers_rule(default, monkeypatch) -> None:
    import mmeff.eval.videoqa as vq
    from mmeff.methods.freevideo import FreeVideoConfig, FreeVideoLLM

    seen = []
    real = vq.read_clip
    monkeypatch.setattr(vq, "read_clip", lambda *a: (seen.append(a[4]), real(*a))[1])
    model, tok, _ = default
    reducer = mmeff.create_reducer("pool", tokens=16)
    sample = _video_samples()[0]
    predict_llava(model, tok, sample, reducer=reducer, num_frames=2, max_new_tokens=1)
    reducer.frame_rule = "slowfast"  # what a faithful Free Video-LLM reports
    predict_llava(model, tok, sample, reducer=reducer, num_frames=2, max_new_tokens=1)
    assert seen == ["midpoints", "slowfast"]
    assert FreeVideoLLM(FreeVideoConfig(faithful=True)).frame_rule == "slowfast"
    assert FreeVideoLLM().frame_rule == "midpoints"


def test_cli_eval_videoqa(default, model_cache, tmp_path: Path, monkeypatch, capsys) -> None:
    from mmeff.cli.main import main

    made = []

    def fake_synthetic(out_dir, seed=0):  # the real generator lives in mmeff.datasets.videoqa
        made.append(Path(out_dir))
        return _video_samples()

    monkeypatch.setattr(videoqa, "synthetic_videoqa", fake_synthetic, raising=False)
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    out = tmp_path / "cli" / "res.jsonl"
    args = ["eval", "videoqa", "--model", "default", "--cache-dir", str(model_cache), "--method", "pool",
            "--tokens", "16", "--frames", "2", "--data", "synthetic", "--out", str(out), "--limit", "1",
            "--max-new-tokens", "2", "--json", str(tmp_path / "rep.json")]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert made == [out.parent / "synthetic"]
    assert "pool" in printed and "visual tokens / video" in printed and "32.0" in printed
    assert [r["id"] for r in load_results(out)] == ["open"]
    assert json.loads((tmp_path / "rep.json").read_text())["n"] == 1

    assert main(["eval", "videoqa", "--data", "msvd", "--out", str(out)]) == 2
    assert "mmeff: error: --data msvd needs --annotations and --video-root" in capsys.readouterr().err
    assert main(["eval", "videoqa", "--method", "nope", "--out", str(out)]) == 2
    assert "unknown reducer 'nope'" in capsys.readouterr().err
