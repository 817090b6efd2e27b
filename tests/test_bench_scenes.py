"""`mmeff bench` (scenes): every method on the held-out scenes with mmeff-mini, at a toy size."""

from __future__ import annotations

import json

from mmeff.bench_scenes import format_scene_table, run_scenes_bench
from mmeff.cli import main


def test_scenes_bench_rows_tokens_and_files(default, model_cache, tmp_path, capsys) -> None:
    rows = run_scenes_bench(per_kind=1, methods=["pool", "freevideo", "tome r=8"], repeats=1,
                            out_dir=tmp_path, cache_dir=model_cache)
    by = {r.method.split("(")[0].lower(): r for r in rows}
    assert set(by) == {"none", "pool", "freevideo", "tome"}
    none, pool, fv = by["none"], by["pool"], by["freevideo"]
    assert (none.image_tokens, none.video_tokens) == (64, 256)
    assert (pool.image_tokens, pool.video_tokens) == (16, 64)  # 25% of each frame's 8x8 grid
    assert fv.image_tokens is None and fv.video_tokens == 72  # video-level: run on the videos only
    assert "colour" not in fv.accuracy and set(fv.accuracy) >= {"after", "direction", "appear", "video"}
    for r in rows:
        assert r.seconds > 0 and (r.video_prefill_ms or 0) > 0
        assert all(0.0 <= v <= 1.0 for v in r.accuracy.values())
    # ToMe merges inside the tower and un-merges before the projector: the LLM sees every token
    assert by["tome"].image_tokens == 64 and "r=8" in by["tome"].method
    data = json.loads((tmp_path / "scenes.json").read_text())
    assert len(data["rows"]) == 4 and data["model"]["name"] == "mmeff-mini"
    assert (tmp_path / "accuracy_tokens.png").stat().st_size > 10_000
    out = capsys.readouterr().out
    assert "held-out split seed 0" in out and "chance 25%" in out and "vid tok" in out
    assert format_scene_table(rows).count("\n") == 5


def test_main_job_cli_runs_the_scenes_suite(default, model_cache, tmp_path, capsys) -> None:
    rc = main(["bench", "--per-kind", "1", "--methods", "fourier", "--media", "image", "--repeats", "1",
               "--cache-dir", str(model_cache), "--scenes-out", str(tmp_path)])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "fourier" in out and "img tok" in out
    rows = json.loads((tmp_path / "scenes.json").read_text())["rows"]
    assert [r["image_tokens"] for r in rows] == [64, 16] and rows[1]["video_tokens"] is None
