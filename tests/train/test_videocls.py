"""Video classification pipeline (mmeff.train.videocls, mmeff.bench.squeezetime, ``mmeff video``) on generated
mp4 clips: folder listing and errors, train/test views, training that runs and resumes exactly,
multi-view evaluation, the frame-averaging baseline's blindness to order, and the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from mmeff.bench.squeezetime import CLASSES, _clip, motion_dataset
from mmeff.models.squeezetime import create_model
from mmeff.train.videocls import (
    FrameAverage,
    TrainConfig,
    VideoFolder,
    evaluate,
    frame_average_model,
    sgd,
    train,
)

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    root = tmp_path_factory.mktemp("motion")
    return motion_dataset(root / "train", 3, frames=16, size=48), motion_dataset(root / "val", 2, frames=16, size=48, seed=1)


def small(frames: int = 4, size: int = 48):
    torch.manual_seed(0)
    return create_model("squeezetime_10", num_classes=len(CLASSES), num_frames=frames, img_size=size,
                        widen_factor=0.125, dropout=0.0)


def test_generated_pairs_have_equal_frame_averages() -> None:
    # what makes the set temporal: each pair's clips average to the same image (same random draw)
    for a, b in (("left", "right"), ("up", "down"), ("appear", "disappear")):
        ca = _clip(np.random.default_rng(5), a, 16, 48).astype(np.float64).mean(0)
        cb = _clip(np.random.default_rng(5), b, 16, 48).astype(np.float64).mean(0)
        np.testing.assert_allclose(ca, cb)
        assert not np.array_equal(_clip(np.random.default_rng(5), a, 16, 48), _clip(np.random.default_rng(5), b, 16, 48))


def test_folder_views_and_errors(clips, tmp_path) -> None:
    train_root, val_root = clips
    ds = VideoFolder(train_root, 4, 40, train=True)
    assert ds.classes == sorted(CLASSES) and len(ds) == 3 * len(CLASSES)
    x, y = ds[0]
    assert x.shape == (3, 4, 40, 40) and x.dtype == torch.float32 and y == 0
    test = VideoFolder(val_root, 4, 40, train=False, clips=2, crops=3)
    views, y = test[len(test) - 1]
    assert views.shape == (6, 3, 4, 40, 40) and y == len(CLASSES) - 1
    with pytest.raises(ValueError, match="does not exist"):
        VideoFolder(tmp_path / "nope", 4, 40, train=True)
    (tmp_path / "empty" / "a").mkdir(parents=True)
    with pytest.raises(ValueError, match="no videos"):
        VideoFolder(tmp_path / "empty", 4, 40, train=True)
    bad = tmp_path / "bad" / "a"
    bad.mkdir(parents=True)
    (bad / "broken.mp4").write_bytes(b"not a video")
    with pytest.raises(ValueError, match="broken.mp4"):
        VideoFolder(tmp_path / "bad", 4, 40, train=True)[0]
    with pytest.raises(ValueError, match="not in the given classes"):
        VideoFolder(train_root, 4, 40, train=True, classes=["left"])


def test_interval_sampling_is_mmaction2s_sampleframes(tmp_path) -> None:
    """The official sampling (MMAction2 ``SampleFrames``, 'loop'): offsets restated from its rules, and the
    decoded frames are those indices (a clip whose frame k shows the value k)."""
    import random

    from mmeff.datasets.media import write_mp4
    from mmeff.train.videocls import interval_offsets

    assert interval_offsets(100, 64, 10, None) == [int(3.7 * c + 1.85) for c in range(10)]
    assert interval_offsets(60, 64, 3, None) == [0, 0, 0]  # shorter than the window: from 0, looped
    rng = random.Random(0)
    draws = {interval_offsets(70, 64, 1, rng)[0] for _ in range(300)}
    assert draws == set(range(7))  # uniform over [0, total - span]
    assert interval_offsets(40, 64, 1, random.Random(0)) == [0]
    # frame k is a flat grey of level 8k: which frames were taken is read back from their brightness
    root = tmp_path / "v" / "a"
    root.mkdir(parents=True)
    write_mp4(root / "ramp.mp4", [np.full((32, 32, 3), 8 * k, np.uint8) for k in range(30)], (32, 32))
    ds = VideoFolder(tmp_path / "v", 4, 32, train=False, clips=2, crops=1, frame_interval=3)
    levels = [[round(float(f.mean()) * 255 / 8) for f in clip.unbind(1)]
              for clip in ds._interval_clips(root / "ramp.mp4", None)]
    offs = interval_offsets(30, 12, 2, None)
    assert levels == [[o + 3 * j for j in range(4)] for o in offs]
    short = VideoFolder(tmp_path / "v", 4, 32, train=False, frame_interval=10)  # 40 > 30 frames: wraps round
    assert [round(float(f.mean()) * 255 / 8) for f in short._interval_clips(root / "ramp.mp4", None)[0].unbind(1)] \
        == [0, 10, 20, 0]


def test_official_training_view_and_recipes(clips) -> None:
    train_root, _ = clips
    official, ours = (VideoFolder(train_root, 4, 40, train=True, recipe=r) for r in ("official", "mmeff"))
    a, b = official[3][0], ours[3][0]
    assert a.shape == b.shape == (3, 4, 40, 40) and not torch.equal(a, b)
    assert torch.equal(official[3][0], a)  # a view is a function of (epoch seed, index)
    official.epoch_seed = 1
    assert not torch.equal(official[3][0], a)
    with pytest.raises(ValueError, match="recipe"):
        VideoFolder(train_root, 4, 40, train=True, recipe="paper")
    # colour jitter and erasing: the same change on every frame, erasing a box of 2-33% of the frame
    import random

    from mmeff.train.videocls import _color_jitter, _random_erase

    x = torch.rand(3, 1, 24, 24).expand(3, 5, 24, 24).contiguous()
    j = _color_jitter(x, random.Random(2))
    assert torch.allclose(j, j[:, :1].expand_as(j)) and not torch.allclose(j, x)
    erased = next(e for seed in range(50) if not torch.equal(e := _random_erase(x, random.Random(seed)), x))
    box = (erased != x).any(0).any(0)
    assert 0.02 * 576 * 0.5 <= int(box.sum()) <= 576 / 3 * 1.2
    assert ((erased != x).any(0) == box).all()  # the same box in every frame
    # weight decay: the official decays every parameter; the mmeff recipe spares biases and norms
    model = small()
    for decay_all in (True, False):
        opt = sgd(model, TrainConfig(decay_all=decay_all))
        assert (len(opt.param_groups[1]["params"]) > 0) is not decay_all  # the group without decay
    assert TrainConfig.from_dict({"epochs": 3}).decay_all is False  # runs saved before the field


def test_training_learns_resumes_and_evaluates(clips, tmp_path) -> None:
    train_root, val_root = clips
    train_set = VideoFolder(train_root, 4, 48, train=True)
    val_set = VideoFolder(val_root, 4, 48, train=False, clips=1, crops=1)
    cfg = TrainConfig(epochs=3, batch_size=6, lr=0.05, warmup_epochs=0.5)
    full = small()
    start = {k: v.clone() for k, v in full.state_dict().items()}
    hist = train(full, train_set, tmp_path / "full", cfg, val_set=val_set, progress=False, log=lambda s: None)
    assert [e["epoch"] for e in hist["epochs"]] == [1, 2, 3]
    # that it learns time is `mmeff bench squeezetime` (79-90% vs 35-47%); 18 clips here only check the loop runs
    assert all(np.isfinite(e["loss"]) and 0 <= e["val_top1"] <= 1 for e in hist["epochs"])
    assert not torch.equal(start["head.weight"], full.state_dict()["head.weight"])
    assert (tmp_path / "full" / "best.pt").is_file() and json.loads((tmp_path / "full" / "history.json").read_text())
    # two epochs, stop, resume for the third: the same weights as the uninterrupted run
    part = small()
    train(part, train_set, tmp_path / "part", cfg, stop_after=2, progress=False, log=lambda s: None)
    resumed = small()
    logs: list[str] = []
    train(resumed, train_set, tmp_path / "part", cfg, progress=False, log=logs.append)
    assert logs[0].startswith("resumed from") and "epoch 2" in logs[0]
    for (k, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=k)
    res = evaluate(full, VideoFolder(val_root, 4, 48, train=False, clips=2, crops=3), progress=False)
    assert res["clips"] == 2 * len(CLASSES) and 0 <= res["top1"] <= res["top5"] <= 1
    with pytest.raises(ValueError, match="train=False"):
        evaluate(full, train_set)


def test_frame_average_ignores_order_squeezetime_does_not() -> None:
    torch.manual_seed(0)
    avg = frame_average_model("squeezetime_10", num_classes=3, img_size=48, widen_factor=0.125).eval()
    assert isinstance(avg, FrameAverage)
    sq = small().eval()
    x = torch.randn(2, 3, 4, 48, 48)
    rev = x.flip(2)
    with torch.no_grad():
        torch.testing.assert_close(avg(x), avg(rev), atol=1e-5, rtol=1e-5)
        assert (sq(x) - sq(rev)).abs().max() > 1e-4


def test_cli_video_train_and_eval(clips, tmp_path, capsys) -> None:
    from mmeff.cli.main import main

    train_root, val_root = clips
    common = ["--model", "squeezetime_10", "--frames", "4", "--size", "48", "--clips", "1", "--crops", "1"]
    assert main(["video", "train", "--data", str(train_root), "--val", str(val_root), "--out", str(tmp_path / "o"),
                 "--epochs", "1", "--batch-size", "6", "--workers", "0", *common]) == 0
    assert (tmp_path / "o" / "last.pt").is_file()
    capsys.readouterr()
    assert main(["video", "eval", "--data", str(val_root), "--checkpoint", str(tmp_path / "o" / "last.pt"),
                 *common]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["clips"] == 2 * len(CLASSES) and set(out) == {"top1", "top5", "clips"}
    assert main(["video", "eval", "--data", str(val_root), "--checkpoint", str(tmp_path / "o" / "last.pt"),
                 "--recipe", "mmeff", *common]) == 0
    assert json.loads(capsys.readouterr().out)["clips"] == 2 * len(CLASSES)


def test_miniature_runs_both_recipes(tmp_path) -> None:
    from mmeff.bench.squeezetime import run_miniature

    for recipe in ("official", "mmeff"):
        res = run_miniature(tmp_path, train_per_class=2, val_per_class=1, frames=4, size=32, epochs=1, widen=0.125,
                            batch_size=6, recipe=recipe, clip_frames=12, frame_interval=2, progress=False,
                            print_fn=lambda s: None)
        assert res["recipe"] == recipe and set(res["rows"]) == {"squeezetime", "frame_average_2d"}
        assert (tmp_path / recipe / "squeezetime" / "last.pt").is_file()
        assert json.loads((tmp_path / f"miniature_{recipe}.json").read_text())["rows"] == res["rows"]


def test_throughput_table_and_onnx_export(tmp_path) -> None:
    pytest.importorskip("onnxruntime")
    from mmeff.bench.squeezetime import run_throughput
    from mmeff.models.squeezetime import check_onnx, export_onnx

    class Conv3dNet(torch.nn.Module):  # a stand-in 3-D CNN: the table's mechanics, not r3d_18's cost
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv3d(3, 8, 3, padding=1)
            self.fc = torch.nn.Linear(8, 6)

        def forward(self, x):
            return self.fc(self.conv(x).mean((2, 3, 4)))

    lines: list[str] = []
    rows = run_throughput(tmp_path, batch=2, repeats=1, frames=4, size=48, device="cpu", print_fn=lines.append,
                          models={"squeezetime": lambda: small(), "conv3d": Conv3dNet})
    assert [(r["model"], r["runtime"]) for r in rows] == [
        ("squeezetime", "pytorch (cpu)"), ("squeezetime", "onnxruntime (cpu)"), ("conv3d", "pytorch (cpu)")]
    assert rows[1]["onnx_max_abs_diff"] < 1e-4 and rows[0]["speedup_vs_first"] == 1.0
    # the conv3d's FLOPs by hand: 2 * (8 * 3 * 27) MACs per output voxel, + the linear layer
    assert rows[2]["gflops"] * 1e9 == pytest.approx(2 * 8 * 3 * 27 * 4 * 48 * 48 + 2 * 8 * 6)
    assert (tmp_path / "squeezetime.onnx").is_file() and json.loads((tmp_path / "throughput.json").read_text())
    assert len(lines) == 2 + len(rows)
    # the exported graph is checked, and a wrong one is caught
    model = small().eval()
    path = export_onnx(model, tmp_path / "again.onnx")
    assert check_onnx(model, path, batch_sizes=(1, 4)) < 1e-4
    with torch.no_grad():
        model.head.bias.add_(1.0)
    with pytest.raises(ValueError, match="onnxruntime differs"):
        check_onnx(model, path)


def test_ddp_under_torchrun_on_cpu(clips, tmp_path) -> None:
    import os
    import subprocess
    import sys

    train_root, _ = clips
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
           "-m", "mmeff.cli", "video", "train", "--data", str(train_root), "--out", str(tmp_path / "ddp"),
           "--model", "squeezetime_10", "--frames", "4", "--size", "48", "--epochs", "2", "--batch-size", "3",
           "--workers", "0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert run.returncode == 0, run.stderr[-2000:]
    hist = json.loads((tmp_path / "ddp" / "history.json").read_text())
    assert [e["epoch"] for e in hist["epochs"]] == [1, 2]
    # two ranks trained (DistributedSampler shards, gloo on CPU); only rank 0 reports
    assert run.stdout.count('"epoch": 2') == 1


def test_cli_video_eval_and_resume_refuse_a_hostile_checkpoint(clips, tmp_path, capsys, hostile_checkpoint) -> None:
    from mmeff.cli.main import main

    train_root, val_root = clips
    marker = tmp_path / "pwned"
    bad = hostile_checkpoint(tmp_path / "from_the_internet.pt", marker)
    common = ["--model", "squeezetime_10", "--frames", "4", "--size", "48", "--clips", "1", "--crops", "1"]
    assert main(["video", "eval", "--data", str(val_root), "--checkpoint", str(bad), *common]) == 2
    err = capsys.readouterr().err
    assert "from_the_internet.pt pickles Python objects" in err and "Traceback" not in err
    (tmp_path / "o").mkdir()
    hostile_checkpoint(tmp_path / "o" / "last.pt", marker)
    with pytest.raises(ValueError, match=r"last\.pt pickles Python objects"):
        train(small(), VideoFolder(train_root, 4, 48, train=True), tmp_path / "o", TrainConfig(epochs=1, batch_size=6),
              progress=False, log=lambda s: None)
    assert not marker.exists()
