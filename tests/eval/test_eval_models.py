"""``mmeff eval videoqa --model`` beyond LLaVA: a saved Qwen2-VL folder runs through its own processor, a hub id
offline and a class without an adapter are refused in one line; :mod:`mmeff.eval.lmms` imports without
lmms-eval and names it when a model is built."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from mmeff.datasets import videoqa
from mmeff.datasets.media import sample_video_path
from mmeff.datasets.videoqa import VideoQASample
from mmeff.eval.results import load_results
from mmeff.models.embedded import default_processor
from mmeff.models.tiny import build_tiny, tiny_qwen2_vl_folder


def _samples() -> list[VideoQASample]:
    video = sample_video_path("bikes")
    return [
        VideoQASample(id="open", video=video, question="What are the people riding?", answer="bikes"),
        VideoQASample(id="mc", video=video, question="What vehicle is shown?", answer="bicycle",
                      options=["car", "bicycle", "boat"], answer_index=1, start=2.0, end=5.0),
    ]


def test_eval_videoqa_runs_a_saved_qwen2_vl_folder(model_cache, tmp_path: Path, monkeypatch, capsys) -> None:
    from mmeff.cli.main import main

    torch.set_num_threads(1)
    folder = tiny_qwen2_vl_folder(tmp_path / "qwen", default_processor(model_cache).tokenizer)
    monkeypatch.setattr(videoqa, "synthetic_videoqa", lambda out_dir, seed=0: _samples(), raising=False)
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    tokens = {}
    for method in ("none", "fourier"):
        out = tmp_path / method / "res.jsonl"
        argv = ["eval", "videoqa", "--model", str(folder), "--method", method, "--ratio", "0.25", "--frames", "4",
                "--data", "synthetic", "--out", str(out), "--batch-size", "2", "--max-new-tokens", "2",
                "--json", str(tmp_path / f"{method}.json")]
        assert main(argv) == 0, capsys.readouterr().err
        rows = load_results(out)
        assert [r["id"] for r in rows] == ["open", "mc"] and not any(r.get("failed") for r in rows)
        assert rows[0]["config"]["model_arg"] == str(folder.resolve())
        tokens[method] = [r["visual_tokens"] for r in rows]
        assert json.loads((tmp_path / f"{method}.json").read_text())["n"] == 2
    # the frames went in as one Qwen2-VL video (4 frames -> 2 temporal patches); fourier keeps a quarter of it
    assert all(t > 0 for t in tokens["none"])
    assert all(f < n for f, n in zip(tokens["fourier"], tokens["none"])), tokens
    assert "fourier" in capsys.readouterr().out


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("mmeff:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_eval_videoqa_hub_id_offline_is_one_line(tmp_path: Path, monkeypatch, capsys) -> None:
    import huggingface_hub.constants

    from mmeff.cli.main import main

    # offline mode answers at once; without it the hub client retries for tens of seconds before failing
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    argv = ["eval", "videoqa", "--model", "someorg/no-such-vlm", "--out", str(tmp_path / "o.jsonl"), "--limit", "1",
            "--frames", "2"]
    assert main(argv) == 2
    line = _one_error_line(capsys)
    assert "cannot reach the Hugging Face hub" in line and "someorg/no-such-vlm" in line, line


def test_eval_videoqa_refuses_a_class_without_adapter(tmp_path: Path, monkeypatch, capsys) -> None:
    import mmeff.cli.eval as cli_eval
    from mmeff.cli.main import main

    monkeypatch.setattr(cli_eval, "load_vlm", lambda ref: (torch.nn.Linear(2, 2), object(), {"name": ref}))
    argv = ["eval", "videoqa", "--model", "someorg/odd-vlm", "--out", str(tmp_path / "o.jsonl"), "--limit", "1",
            "--frames", "2"]
    assert main(argv) == 2
    line = _one_error_line(capsys)
    assert "'someorg/odd-vlm'" in line and "unsupported model class Linear" in line, line


def test_eval_videoqa_folder_without_processor_is_one_line(tmp_path: Path, capsys) -> None:
    from mmeff.cli.main import main

    build_tiny("qwen2_vl", tmp_path / "bare")  # weights and config only
    argv = ["eval", "videoqa", "--model", str(tmp_path / "bare"), "--out", str(tmp_path / "o.jsonl"), "--limit", "1",
            "--frames", "2"]
    assert main(argv) == 2
    line = _one_error_line(capsys)
    assert "processor" in line, line


def test_lmms_module_imports_without_lmms_eval() -> None:
    from mmeff.eval import lmms

    assert lmms.build_method("none") is None
    assert lmms.build_method("fourier", ratio=0.25).name == "fourier"
    assert lmms.build_method("streamingllm", local_size=64).name == "streamingllm"
    with pytest.raises(ValueError, match="unknown mmeff method 'nope'"):
        lmms.build_method("nope")
    with pytest.raises(ValueError, match="method 'fourier'"):
        lmms.build_method("fourier", ratio=0.25, bogus=1)
    with pytest.raises(ValueError, match="method=none takes no method arguments"):
        lmms.build_method("none", ratio=0.25)
    if importlib.util.find_spec("lmms_eval") is None:
        with pytest.raises(ImportError, match="pip install lmms-eval"):
            lmms.MMEff()
