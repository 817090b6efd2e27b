"""The ToCom miniature (``mmeff bench tocom``) and the ``mmeff tocom-train`` script, at toy sizes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from mmeff.bench.tocom import digits_splits, run_tocom_bench
from mmeff.cli.main import main
from mmeff.datasets.images import ImageFiles
from mmeff.methods.tocom import ToCom


def test_digits_splits_are_real_and_disjoint() -> None:
    a = digits_splits(task="digits")
    r = digits_splits(task="digits-rot90")
    assert a["x_train"].shape[1:] == (3, 8, 8) and len(a["x_train"]) + len(a["x_test"]) == 1797
    assert set(a["y_train"].tolist()) == set(range(10))
    # the same split, the second task rotated
    torch.testing.assert_close(torch.rot90(a["x_test"], 1, dims=(2, 3)), r["x_test"])
    assert torch.equal(a["y_test"], r["y_test"])
    with pytest.raises(ValueError, match="task"):
        digits_splits(task="mnist")


def test_miniature_runs_end_to_end(tmp_path: Path) -> None:
    rep = run_tocom_bench(
        tasks=("digits",),
        sources=(0, 2),
        targets=(0, 2),
        steps=2,
        pretrain_epochs=1,
        finetune_epochs=1,
        tocom_epochs=1,
        out_dir=tmp_path,
        json_path=tmp_path / "t.json",
        plot_path=tmp_path / "t.png",
        progress=False,
    )
    rows = rep["rows"]
    assert [(r["r_source"], r["r_target"]) for r in rows] == [(0, 0), (0, 2), (2, 0), (2, 2)]
    for r in rows:
        assert 0.0 <= r["acc_tome"] <= 100.0
        if r["r_source"] == r["r_target"]:  # no compensation at the training degree
            assert r["acc_tocom"] == r["acc_tome"]
    assert json.loads((tmp_path / "t.json").read_text())["rows"] == rows
    assert (tmp_path / "t.png").stat().st_size > 0
    assert (tmp_path / "tocom" / "tocom.safetensors").is_file()
    assert ToCom.load(tmp_path / "tocom" / "tocom.safetensors").config()["steps"] == 2
    with pytest.raises(ValueError, match="exceed"):
        run_tocom_bench(sources=(0,), targets=(9,), steps=8, progress=False)


def _image_folder(root: Path, n: int = 6) -> Path:
    from PIL import Image
    from skimage import data

    photos = [data.astronaut(), data.coffee(), data.chelsea()]
    for i in range(n):
        sub = root / f"class{i % 2}"
        sub.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.asarray(photos[i % 3])).save(sub / f"img{i}.png")
    return root


def test_image_files_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        ImageFiles(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images"):
        ImageFiles(tmp_path / "empty")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "broken.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(ValueError, match="broken.jpg"):
        ImageFiles(bad)[0]


def test_tocom_train_cli_trains_and_resumes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = _image_folder(tmp_path / "imgs")
    out = tmp_path / "run"
    args = [
        "tocom-train",
        "--model",
        "vit_tiny_patch16_224",
        "--model-kwargs",
        '{"img_size": 32, "patch_size": 8, "depth": 2, "num_classes": 5}',
        "--data",
        str(data),
        "--out",
        str(out),
        "--batch-size",
        "3",
        "--steps",
        "3",
        "--workers",
        "0",
        "--device",
        "cpu",
    ]
    assert main([*args, "--epochs", "1"]) == 0
    first = json.loads(capsys.readouterr().out)
    assert len(first["history"]) == 1 and (out / "train_state.pt").is_file()
    assert main([*args, "--epochs", "2"]) == 0  # resumes: only epoch 2 runs
    second = json.loads(capsys.readouterr().out)
    assert [h["epoch"] for h in second["history"]] == [0, 1]
    assert second["history"][0] == first["history"][0]
    assert main([*args[:-6], "--checkpoint", str(tmp_path / "nope.pth")]) == 2
