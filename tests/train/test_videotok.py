"""Video-tokenizer training and evaluation (mmeff.train.videotok), the perceptual losses, the `mmeff cdt` CLI,
DDP under torchrun and `mmeff bench cdt`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from mmeff.cli.main import main
from mmeff.eval.metrics import psnr, quantize_8bit
from mmeff.eval.perceptual import LPIPSUnavailable, SSIMLoss, lpips_model, lpips_status, perceptual_loss
from mmeff.models.cdt import CDT, create_model
from mmeff.train.videotok import (
    TokenizerTrainConfig,
    VideoCrops,
    centre_clip,
    evaluate_tokenizer,
    train_tokenizer,
    video_tensor,
)

ROOT = Path(__file__).resolve().parents[2]


def _videos(n: int = 2, t: int = 12, size: int = 24) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.rand(3, t + i, size, size + 4 * i, generator=g) * 2 - 1 for i in range(n)]


# ------------------------------------------------------------------------------------------ perceptual
def test_ssim_substitute_and_the_auto_warning(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MMEFF_LPIPS_BACKBONE", str(tmp_path / "absent.pth"))
    a = torch.rand(2, 3, 16, 16) * 2 - 1
    loss = SSIMLoss()
    assert torch.allclose(loss(a, a), torch.zeros(2), atol=1e-6)
    b = a + 0.3 * torch.randn_like(a)
    assert (loss(b, a) > 0.05).all()
    with pytest.warns(UserWarning, match=r"LPIPS is unavailable .*absent\.pth.*SSIM substitute"):
        auto = perceptual_loss("auto")
    assert isinstance(auto, SSIMLoss) and perceptual_loss("none") is None
    with pytest.raises(LPIPSUnavailable, match="absent.pth"):
        perceptual_loss("lpips")
    with pytest.raises(ValueError, match="perceptual kind"):
        perceptual_loss("mse")


def test_lpips_loads_its_backbone_from_a_local_file(tmp_path: Path) -> None:
    pytest.importorskip("lpips")
    import torchvision

    torch.manual_seed(0)
    tv = torchvision.models.alexnet()
    path = tmp_path / "alexnet.pth"
    torch.save(tv.state_dict(), path)
    assert lpips_status(backbone_weights=path) is None
    model = lpips_model(backbone_weights=path)
    layers = {name: layer for block in model.net.children() for name, layer in block.named_children()}
    for i in (0, 3, 6, 8, 10):  # lpips keeps torchvision's `features` indices as layer names
        torch.testing.assert_close(layers[str(i)].weight, tv.features[i].weight)
    # the linear heads come from the wheel: non-negative, not the random init
    assert all(float(p.min()) >= 0 for n, p in model.named_parameters() if n.startswith("lin"))
    a = torch.rand(2, 3, 32, 32) * 2 - 1
    assert float(model(a, a).abs().max()) < 1e-6
    b = (a + 0.5 * torch.randn_like(a)).requires_grad_()
    d = model(b, a).sum()
    d.backward()
    assert float(d.detach()) > 0 and b.grad is not None and float(b.grad.abs().sum()) > 0
    torch.save({"not": torch.zeros(1)}, tmp_path / "bad.pth")
    with pytest.raises(LPIPSUnavailable, match="is not torchvision alex weights"):
        lpips_model(backbone_weights=tmp_path / "bad.pth")


# ------------------------------------------------------------------------------------------ data
def test_video_crops_are_pure_functions_of_the_index() -> None:
    vids = _videos()
    ds = VideoCrops(vids, frames=5, size=16, length=50, seed=3)
    assert len(ds) == 50 and ds[7].shape == (3, 5, 16, 16)
    torch.testing.assert_close(ds[7], VideoCrops(vids, 5, 16, 50, seed=3)[7])
    assert not torch.equal(ds[7], VideoCrops(vids, 5, 16, 50, seed=4)[7])
    # every crop is a strided window of one of the videos (possibly flipped)
    x = ds[11]
    found = False
    for v in vids:
        for flip in (False, True):
            src = v.flip(-1) if flip else v
            for s in (1, 2):
                for t0 in range(v.shape[1] - 4 * s):
                    win = src[:, t0:t0 + 4 * s + 1:s]
                    hits = [(y, xx) for y in range(v.shape[2] - 15) for xx in range(v.shape[3] - 15)
                            if torch.equal(win[:, :, y:y + 16, xx:xx + 16], x)]
                    found = found or bool(hits)
    assert found
    with pytest.raises(IndexError):
        ds[50]
    with pytest.raises(ValueError, match="shorter than 30 frames"):
        VideoCrops(vids, frames=30, size=16, length=1)
    with pytest.raises(ValueError, match="at least one video"):
        VideoCrops([], 5, 16, 1)


def test_video_tensor_and_centre_clip() -> None:
    frames = np.zeros((3, 10, 20, 3), np.uint8)
    frames[..., 0] = 255
    v = video_tensor(frames)
    assert v.shape == (3, 3, 10, 20) and float(v[0].min()) == 1.0 and float(v[1].max()) == -1.0
    assert video_tensor(frames, short_side=5).shape == (3, 3, 5, 10)
    with pytest.raises(ValueError, match="uint8"):
        video_tensor(frames.astype(np.float32))
    c = centre_clip(torch.arange(3 * 6 * 8 * 10.0).reshape(3, 6, 8, 10), 4, 6, start=1)
    assert c.shape == (3, 4, 6, 6) and float(c[0, 0, 0, 0]) == 1 * 80 + 1 * 10 + 2
    with pytest.raises(ValueError, match="cannot give 9 frames"):
        centre_clip(torch.zeros(3, 6, 8, 10), 9, 6)


# ------------------------------------------------------------------------------------------ training
def _cfg(steps: int) -> TokenizerTrainConfig:
    return TokenizerTrainConfig(steps=steps, batch_size=2, save_every=2, warmup_steps=1, perceptual="ssim")


def test_training_resumes_bit_for_bit(tmp_path: Path) -> None:
    data = VideoCrops(_videos(), frames=5, size=16, length=8)
    torch.manual_seed(0)
    a = create_model("cdt_tiny")
    ha = train_tokenizer(a, data, tmp_path / "a", _cfg(4), progress=False, log=lambda s: None)
    torch.manual_seed(0)
    b = create_model("cdt_tiny")
    train_tokenizer(b, data, tmp_path / "b", _cfg(4), stop_after=2, progress=False, log=lambda s: None)
    b2 = create_model("cdt_tiny")  # a fresh process: everything comes from last.pt
    hb = train_tokenizer(b2, data, tmp_path / "b", _cfg(4), progress=False, log=lambda s: None)
    for (k, va), vb in zip(a.state_dict().items(), b2.state_dict().values()):
        assert torch.equal(va, vb), k
    assert [r["loss"] for r in ha["log"]] == [r["loss"] for r in hb["log"]]
    assert ha["perceptual"] == "ssim" and set(ha["log"][0]) >= {"rec", "kl", "perceptual", "lr", "seconds"}
    assert json.loads((tmp_path / "b" / "history.json").read_text())["step"] == 4
    with pytest.raises(ValueError, match="need 40"):
        train_tokenizer(a, data, tmp_path / "c", _cfg(20), progress=False)


def test_evaluation_matches_the_metrics_on_the_decoded_frames() -> None:
    torch.manual_seed(0)
    m = create_model("cdt_tiny").eval()
    clips = [v[:, :9, :16, :16] for v in _videos()]
    res = evaluate_tokenizer(m, clips, steps=(1, 2), progress=False)
    assert set(res) == {1, 2} and res[1]["frames"] == 18
    want = []
    for v in clips:
        rec = m.decode(m.encode(v[None]), steps=2)[0]
        want.append(psnr(quantize_8bit((rec + 1) / 2).transpose(0, 1), ((v + 1) / 2).transpose(0, 1)))
    assert res[2]["psnr"] == pytest.approx(float(torch.cat(want).mean()), rel=1e-6)
    assert 0 < res[1]["ssim"] < 1 and res[1]["decode_seconds"] > 0
    with pytest.raises(ValueError, match="no videos"):
        evaluate_tokenizer(m, [], progress=False)


# ------------------------------------------------------------------------------------------ CLI
@pytest.fixture(scope="module")
def video_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from mmeff.datasets.videoqa import write_mp4

    root = tmp_path_factory.mktemp("videos")
    rng = np.random.default_rng(0)
    base = rng.integers(0, 255, (6, 8, 3), dtype=np.uint8)
    for i in range(2):
        frames = [np.kron(np.roll(base, t + i, axis=1), np.ones((8, 8, 1), np.uint8)) for t in range(21)]
        write_mp4(root / f"clip{i}.mp4", frames, (64, 48), fps=10)
    return root


def test_cli_train_eval_reconstruct(tmp_path: Path, video_folder: Path, capsys: pytest.CaptureFixture) -> None:
    run = tmp_path / "run"
    assert main(["cdt", "train", "--data", str(video_folder), "--out", str(run), "--model", "cdt_tiny",
                 "--frames", "5", "--size", "16", "--steps", "2", "--batch-size", "2", "--save-every", "1",
                 "--perceptual", "ssim", "--short-side", "32"]) == 0
    text = capsys.readouterr().out
    out = json.loads(text[text.index("{"):])  # after the trainer's log line
    assert out["step"] == 2 and out["perceptual"] == "ssim"
    ckpt = run / "model.safetensors"
    assert CDT.load(ckpt).cfg.latent_channels == 4
    assert main(["cdt", "eval", "--checkpoint", str(ckpt), "--data", str(video_folder), "--frames", "9",
                 "--size", "32", "--steps", "1,2", "--short-side", "32"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert set(res) == {"1", "2"} and res["1"]["frames"] == 18
    dst = tmp_path / "rec.mp4"
    assert main(["cdt", "reconstruct", "--checkpoint", str(ckpt), "--input", str(video_folder / "clip0.mp4"),
                 "--output", str(dst), "--chunk-frames", "8"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["frames"] == 21 and rep["size"] == [48, 64] and rep["latent_shape"] == [1, 4, 6, 6, 8]
    from mmeff.datasets.media import load_video

    back = load_video(dst, fps=10)
    assert back.frames.shape == (21, 48, 64, 3) and back.native_fps == pytest.approx(10)
    # bad input: a readable message and exit status 2
    assert main(["cdt", "eval", "--checkpoint", str(tmp_path / "none.safetensors"), "--data",
                 str(video_folder)]) == 2
    assert "none.safetensors" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["cdt", "train", "--data", str(tmp_path / "empty"), "--out", str(run)]) == 2
    assert "holds no videos" in capsys.readouterr().err
    assert main(["cdt", "train", "--data", str(video_folder), "--out", str(run), "--model", "vae_tiny",
                 "--frames", "5", "--size", "16", "--short-side", "32", "--perceptual", "ssim"]) == 2
    assert "holds another model configuration" in capsys.readouterr().err
    assert main(["cdt", "reconstruct", "--checkpoint", str(ckpt), "--input", str(video_folder / "clip0.mp4"),
                 "--output", str(dst), "--steps", "1,2"]) == 2
    assert "one --steps value" in capsys.readouterr().err


def test_ddp_training_under_torchrun(tmp_path: Path, video_folder: Path) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
           "-m", "mmeff.cli", "cdt", "train", "--data", str(video_folder), "--out", str(tmp_path / "ddp"),
           "--model", "cdt_tiny", "--frames", "5", "--size", "16", "--steps", "2", "--batch-size", "1",
           "--save-every", "1", "--perceptual", "ssim", "--short-side", "32"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.count('"checkpoint"') == 1
    assert json.loads((tmp_path / "ddp" / "history.json").read_text())["step"] == 2


def test_bench_writes_table_json_and_figures(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import mmeff.train.videotok as vt
    from mmeff.bench.cdt import run_cdt_bench

    # the bench's data are the offline clips; a small stand-in keeps this test fast
    monkeypatch.setattr(vt, "offline_videos", lambda split, **kw: _videos(2, 40, 32))
    lines: list[str] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = run_cdt_bench(tmp_path, steps=2, batch_size=2, frames=5, size=16, test_frames=9, test_size=32,
                            long_frames=33, sample_steps=(1, 2), repeats=1, models=("cdt_tiny", "vae_tiny"),
                            progress=False, print_fn=lines.append)
    assert set(res["models"]) == {"cdt_tiny", "vae_tiny"}
    assert set(res["models"]["cdt_tiny"]["quality"]) == {"1", "2"} and set(res["models"]["vae_tiny"]["quality"]) == {"1"}
    for r in res["long_video"].values():
        assert r["video_max_diff"] < 1e-4 and r["latent_max_diff"] < 1e-4
    assert res["decode_speed"]["cdt_tiny@1"]["vs_cdt_1_step"] == 1.0
    assert len(res["models"]["cdt_tiny"]["quality"]["1"]["psnr_per_video"]) == 2
    assert all("psnr_last_17" in r for r in res["long_video"].values())
    official = res["long_video"]["cdt_tiny"]["official_chunks"]  # the official uncached block changes the video
    assert official["video_max_diff"] > 0 and official["psnr_fixed"] == pytest.approx(res["long_video"]["cdt_tiny"]["psnr"], abs=0.2)
    for name in ("cdt.json", "cdt_psnr_steps.png", "cdt_examples.png"):
        assert (tmp_path / name).is_file()
    assert any(line.startswith("cdt_tiny ") for line in lines) and any("long video" in line for line in lines)


# ------------------------------------------------------------------------------------------ FVD
def test_frechet_distance_against_scipy_and_closed_form() -> None:
    from scipy import linalg

    from mmeff.train.videotok import frechet_distance

    g = torch.Generator().manual_seed(0)
    a = torch.randn(200, 6, generator=g, dtype=torch.float64)
    b = torch.randn(150, 6, generator=g, dtype=torch.float64) @ torch.randn(6, 6, generator=g, dtype=torch.float64) + 1
    s_a, s_b = np.cov(a.numpy().T), np.cov(b.numpy().T)
    ref = float(((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(s_a + s_b - 2 * linalg.sqrtm(s_a @ s_b).real))
    assert frechet_distance(a, b) == pytest.approx(ref, rel=1e-6)
    assert frechet_distance(a, a) == pytest.approx(0, abs=1e-8)
    # shifted copy: the distance is the squared shift
    assert frechet_distance(a, a + 2) == pytest.approx(4 * 6, rel=1e-9)
    with pytest.raises(ValueError, match="at least 2 samples"):
        frechet_distance(a[:1], b)


def test_fvd_runs_a_local_torchscript_detector(tmp_path: Path) -> None:
    from mmeff.train.videotok import fvd, i3d_features, load_torchscript_detector

    class Stand(torch.nn.Module):  # I3D's call signature; features: per-channel mean and std over time
        def forward(self, x: torch.Tensor, rescale: bool = False, resize: bool = False,
                    return_features: bool = True) -> torch.Tensor:
            return torch.cat([x.mean((2, 3, 4)), x.std((2, 3, 4))], 1)

    path = tmp_path / "i3d.pt"
    torch.jit.script(Stand()).save(str(path))
    vids = [torch.rand(3, 5, 20, 30) * 2 - 1 for _ in range(4)]
    # TorchScript runs the code stored in the file: only on an explicit opt-in, with a warning
    with pytest.raises(ValueError, match="i3d.pt is TorchScript.*trust_torchscript=True"):
        i3d_features(vids, path)
    with pytest.warns(UserWarning, match="runs the code stored in the file"):
        f = i3d_features(vids, path, batch_size=3, trust_torchscript=True)
    assert f.shape == (4, 6)
    trusted = load_torchscript_detector(path, trust=True)
    assert fvd(vids, vids, trusted) == pytest.approx(0, abs=1e-8)
    assert fvd(vids, [v * 0.5 for v in vids], trusted) > 0
    with pytest.raises(FileNotFoundError, match="i3d_torchscript.pt"):
        i3d_features(vids, tmp_path / "none.pt", trust_torchscript=True)
    # through the evaluation: FVD of the reconstructions at each step count
    torch.manual_seed(0)
    m = create_model("cdt_tiny").eval()
    clips = [torch.rand(3, 5, 16, 16) * 2 - 1 for _ in range(3)]
    with pytest.raises(ValueError, match="TorchScript"):
        evaluate_tokenizer(m, clips, steps=(1,), fvd_detector=path, progress=False)
    res = evaluate_tokenizer(m, clips, steps=(1,), fvd_detector=trusted, progress=False)
    recs = [m.decode(m.encode(v[None]))[0] for v in clips]
    assert res[1]["fvd"] == pytest.approx(fvd(clips, recs, trusted), rel=1e-6)
