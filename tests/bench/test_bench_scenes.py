"""`mmeff bench` (scenes): the budget sweep, the blank control, Wilson intervals, VisToG, JSON and plot."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from mmeff.bench.scenes import (
    blank_items,
    format_retained_table,
    format_scene_table,
    parse_ratios,
    run_scenes_bench,
    scene_methods,
    wilson_interval,
)
from mmeff.cli.main import main

ROOT = Path(__file__).resolve().parents[2]


def test_wilson_interval_known_values() -> None:
    # hand computation: p = 0.8, z = 1.96, n = 10 -> (0.8 + 0.192) / 1.384 -/+ 1.96 * 0.16 / 1.384
    assert wilson_interval(8, 10) == pytest.approx((0.4902, 0.9433), abs=5e-4)
    assert wilson_interval(50, 100) == pytest.approx((0.4038, 0.5962), abs=5e-4)
    lo, hi = wilson_interval(0, 10)  # not degenerate at the ends, unlike p -/+ z * sqrt(p (1 - p) / n)
    assert lo == 0.0 and hi == pytest.approx(0.2775, abs=5e-4)
    assert wilson_interval(10, 10) == pytest.approx((1 - hi, 1.0))
    with pytest.raises(ValueError, match="correct=11, n=10"):
        wilson_interval(11, 10)


def test_ratios_are_checked_and_sorted() -> None:
    assert parse_ratios("0.25, 1,0.5,0.25") == [1.0, 0.5, 0.25]
    for bad, msg in (("1,1.5", "got 1.5"), ("0", "got 0"), ("a,b", "comma-separated"), ("", "at least one")):
        with pytest.raises(ValueError, match=msg):
            parse_ratios(bad)
    rows = scene_methods([1, 0.5, 0.125], methods=["pool", "random"])
    assert [(m.family, m.ratio) for m in rows] == [("none", 1.0), ("blank", 1.0), ("pool", 0.5), ("random", 0.5),
                                                   ("pool", 0.125), ("random", 0.125)]
    assert rows[1].blank and not rows[0].blank
    assert {m.label() for m in rows[2:]} >= {"pool(ratio=0.125)", "pool(ratio=0.5)"}
    with pytest.raises(ValueError, match=r"unknown method\(s\) \['nope'\]"):
        scene_methods(methods=["nope"])


def test_blank_items_are_uniform_background_grey() -> None:
    from mmeff.datasets.scenes import BACKGROUND
    from mmeff.eval.scenes import heldout_items

    items = heldout_items(1)
    blank = blank_items(items)
    assert [it["question"] for it in blank] == [it["question"] for it in items]
    for it, b in zip(items, blank):
        assert len(b["frames"]) == len(it["frames"])
        for f, g in zip(it["frames"], b["frames"]):
            assert g.shape == f.shape and g.dtype == np.uint8 and (g == np.array(BACKGROUND, np.uint8)).all()
    assert not all((f == 90).all() for f in items[0]["frames"])  # the originals are untouched


def test_sweep_blank_vistog_json_and_plot(default, model_cache, tmp_path, capsys) -> None:
    from mmeff.bench.scenes_vistog import load_or_train_vistog, model_key

    model = default[0]
    projector = {k: v.clone() for k, v in model.model.multi_modal_projector.state_dict().items()}
    rows = run_scenes_bench(per_kind=1, ratios="1,0.25", methods=["pool", "freevideo", "tome", "vistog"],
                            repeats=1, vistog_steps=2, vistog_batch_size=2, out_dir=tmp_path, cache_dir=model_cache,
                            progress=False)
    by = {r.method: r for r in rows}
    assert list(by) == ["none", "blank", "pool", "freevideo", "tome", "vistog"]
    none, blank, pool, fv, vt = by["none"], by["blank"], by["pool"], by["freevideo"], by["vistog"]
    assert (none.image_tokens, none.video_tokens) == (64, 256) and (blank.image_tokens, blank.video_tokens) == (64, 256)
    assert (pool.image_tokens, pool.video_tokens, pool.ratio) == (16, 64, 0.25)  # 25% of each frame's 8x8 grid
    assert fv.image_tokens is None and fv.video_tokens == 72 and "colour" not in fv.accuracy  # videos only
    assert by["tome"].image_tokens == 64  # un-merged before the projector: the LLM sees every token
    assert (vt.image_tokens, vt.video_tokens, vt.ratio, vt.label) == (16, 64, 0.25, "vistog(M=16)")
    assert blank.image_prefill_ms is None and none.image_prefill_ms > 0 and vt.video_prefill_ms > 0
    for r in rows:
        assert r.n["all"] == len(r.answers) and r.n["all"] == (3 if r is fv else 9)
        for k, acc in r.accuracy.items():
            lo, hi = r.interval[k]
            assert 0 <= lo <= acc <= hi <= 1
            correct = round(acc * r.n[k])
            assert (lo, hi) == pytest.approx(wilson_interval(correct, r.n[k]))
    # the blank control asked the same questions
    assert [a["id"] for a in blank.answers] == [a["id"] for a in none.answers]
    # stage 1 trains the projector; the model's own is back afterwards
    after = model.model.multi_modal_projector.state_dict()
    assert all(torch.equal(projector[k], after[k]) for k in projector)

    data = json.loads((tmp_path / "scenes.json").read_text())
    assert data["n"]["all"] == 9 and data["ratios"] == [1.0, 0.25] and data["model"]["name"] == "mmeff-mini"
    assert [r["method"] for r in data["rows"]] == list(by) and len(data["rows"][0]["answers"]) == 9
    assert data["rows"][2]["interval"]["all"] == pytest.approx(pool.interval["all"])
    assert set(data["retained"]) == {"pool", "vistog"} and set(data["retained"]["pool"]) == {"0.25"}
    rec = data["vistog"][0]
    assert rec["num_groups"] == 16 and rec["steps"] == 2 and rec["seconds"] > 0 and rec["cached"] is False
    assert Path(rec["path"], "vistog.safetensors").is_file()
    assert (tmp_path / "accuracy_vs_tokens.png").stat().st_size > 10_000
    out = capsys.readouterr().out
    assert "n = 6 image + 3 video = 9 questions" in out and "all [95% CI]" in out and "accuracy retained" in out
    assert "25%" in format_retained_table(rows) and format_scene_table(rows).count("\n") == len(rows) + 1

    # a second bench reuses the cached VisToG (same model weights, same settings)
    again = load_or_train_vistog(model, default[1], 16, key=model_key("default", default[2]), steps=2, batch_size=2,
                                 cache_dir=model_cache, progress=False)
    assert again.record["cached"] is True and again.record["path"] == rec["path"]
    assert again.record["seconds"] == pytest.approx(rec["seconds"])


def test_cli_json_to_stdout_is_parseable(default, model_cache, tmp_path) -> None:
    cmd = [sys.executable, "-m", "mmeff.cli", "bench", "--per-kind", "1", "--media", "image", "--methods", "fourier",
           "--ratio", "0.25", "--repeats", "1", "--vistog-ratios", "", "--cache-dir", str(model_cache),
           "--scenes-out", str(tmp_path / "out"), "--json", "-"]
    run = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600, env=dict(os.environ))
    assert run.returncode == 0, run.stderr[-3000:]
    data = json.loads(run.stdout)  # stdout holds the JSON only; the tables went to stderr
    assert data["suite"] == "scenes" and data["ratios"] == [1.0, 0.25] and data["n"] == {**{k: 1 for k in (
        "colour", "shape", "count", "position", "small", "text")}, "image": 6, "all": 6}
    rows = data["rows"]
    assert [r["method"] for r in rows] == ["none", "blank", "fourier"] and "answers" not in rows[0]
    assert [r["image_tokens"] for r in rows] == [64, 64, 16] and rows[2]["video_tokens"] is None
    assert "fourier(ratio=0.25" in run.stderr and "img tok" in run.stderr
    assert (tmp_path / "out" / "scenes.json").is_file()


def test_cli_rejects_bad_ratios_before_loading(capsys) -> None:
    assert main(["bench", "--ratios", "1,1.5"]) == 2
    assert "every ratio must be in (0, 1]" in capsys.readouterr().err
    assert main(["bench", "--ratios", "1,0.5", "--ratio", "0.5"]) == 2
    assert "not both" in capsys.readouterr().err
    assert main(["bench", "--ratio", "0"]) == 2
    assert main(["bench", "--methods", "pool,nope"]) == 2
    assert "unknown method(s) ['nope']" in capsys.readouterr().err
