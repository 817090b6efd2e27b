"""The restoration CLI end to end (degrade -> train -> eval -> restore), DDP under torchrun, and the bench."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mmeff.cli.main import main
from mmeff.datasets.restoration import photo_split, read_image, save_image
from mmeff.models.instruct_ipt import InstructIPT, param_counts

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def clean_folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("clean")
    _, test = photo_split(max_side=48, video_frames=1)
    for i, img in enumerate(test):
        save_image(img, root / f"{i}.png")
    return root


def test_degrade_train_eval_restore(tmp_path: Path, clean_folder: Path, capsys) -> None:
    assert main(["ipt", "degrade", "--images", str(clean_folder), "--out", str(tmp_path / "test"),
                 "--tasks", "derain,dehaze"]) == 0
    assert sorted(p.name for p in (tmp_path / "test").iterdir()) == ["dehaze", "derain"]
    run = tmp_path / "run"
    assert main(["ipt", "train", "--data", str(clean_folder), "--out", str(run), "--model", "instruct_ipt_tiny",
                 "--tasks", "derain,dehaze", "--steps", "6", "--batch-size", "2", "--save-every", "3"]) == 0
    model = InstructIPT.load(run / "model.safetensors")
    assert model.tasks == ("derain", "dehaze") and json.loads((run / "history.json").read_text())["step"] == 6
    capsys.readouterr()
    assert main(["ipt", "eval", "--checkpoint", str(run / "model.safetensors"), "--data", str(tmp_path / "test")]) == 0
    scores = json.loads(capsys.readouterr().out)
    assert set(scores) == {"derain", "dehaze", "average"} and scores["average"]["images"] == 6
    assert main(["ipt", "eval", "--checkpoint", str(run / "model.safetensors"), "--data", str(tmp_path / "test" / "derain"),
                 "--task", "derain"]) == 0
    assert json.loads(capsys.readouterr().out)["derain"]["images"] == 3
    out = tmp_path / "restored.png"
    src = tmp_path / "test" / "derain" / "input" / "0000.png"
    assert main(["ipt", "restore", "--checkpoint", str(run / "model.safetensors"), "--input", str(src),
                 "--output", str(out), "--instruction", "please get rid of the rain"]) == 0
    assert capsys.readouterr().out.startswith("derain:")
    with torch.no_grad():
        want = model.eval()(read_image(src)[None], "derain")[0].clamp(0, 1).mul(255).round().div(255)
    assert torch.equal(read_image(out), want)
    # bad input: readable errors, exit status 2
    assert main(["ipt", "restore", "--checkpoint", str(run / "model.safetensors"), "--input", str(src),
                 "--output", str(out), "--instruction", "write me a poem"]) == 2
    assert "matches no restoration task" in capsys.readouterr().err
    assert main(["ipt", "restore", "--checkpoint", str(run / "model.safetensors"), "--input", str(src),
                 "--output", str(out), "--task", "desnow"]) == 2
    assert "unknown task 'desnow'" in capsys.readouterr().err
    assert main(["ipt", "eval", "--checkpoint", str(run / "model.safetensors"), "--data", str(clean_folder)]) == 2
    assert "with --task" in capsys.readouterr().err
    assert main(["ipt", "restore", "--checkpoint", str(tmp_path / "none.safetensors"), "--input", str(src),
                 "--output", str(out), "--task", "derain"]) == 2


def test_ddp_training_under_torchrun_from_the_repo_root(tmp_path: Path, clean_folder: Path) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29531",
           "-m", "mmeff.cli", "ipt", "train", "--data", str(clean_folder), "--out", str(tmp_path / "ddp"),
           "--model", "instruct_ipt_tiny", "--steps", "4", "--batch-size", "2", "--save-every", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.count('"checkpoint"') == 1  # rank 0 reports and saves
    assert json.loads((tmp_path / "ddp" / "history.json").read_text())["step"] == 4
    assert InstructIPT.load(tmp_path / "ddp" / "model.safetensors").tasks[0] == "denoise"


def test_bench_writes_tables_json_and_figures(tmp_path: Path) -> None:
    from mmeff.bench.ipt import run_ipt_bench

    lines: list[str] = []
    res = run_ipt_bench(tmp_path, steps=4, per_task_steps=2, batch_size=2, max_side=80, progress=False,
                        print_fn=lines.append)
    assert set(res["models"]) == {"instruct_ipt", "ipt", "instruct_ipt_full", "ipt_per_task"}
    for r in res["models"].values():
        assert set(r["psnr_y"]) == {"denoise", "deblur", "derain", "dehaze", "desnow", "average"}
    one = param_counts(InstructIPT.load(tmp_path / "ipt_per_task" / "derain" / "model.safetensors"))["total"]
    assert res["models"]["ipt_per_task"]["params"]["total"] == 5 * one
    assert one < res["models"]["ipt"]["params"]["total"]  # one head, tail and query instead of five
    p = res["models"]["instruct_ipt"]["params"]
    assert p["biases"] > 0 and res["models"]["ipt"]["params"]["biases"] == 0
    assert res["rank_analysis_full"]["encoder.self_attn.q"]["full_rank"] == 64
    assert all(v["got"] == v["want"] for v in res["instructions"].values())
    for name in ("ipt.json", "ipt_psnr.png", "ipt_singular_values.png", "ipt_examples.png"):
        assert (tmp_path / name).is_file()
    assert (tmp_path / "test" / "derain" / "input").is_dir()
    assert any(line.startswith("instruct_ipt ") for line in lines)
    assert len(res["speed"]) == 3 and all(ms > 0 for ms in res["speed"].values())
    assert all(r["train_seconds"] > 0 for r in res["models"].values())
