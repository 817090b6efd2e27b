"""``mmeff bench tome``: table rows, FLOP accounting, files written, CLI options (timings never asserted)."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("timm")
pytest.importorskip("skimage")

from mmeff.bench.tome import photo_batch, run_tome_bench, token_schedule, vit_gflops  # noqa: E402
from mmeff.cli.main import build_parser, main  # noqa: E402


def _tiny_vit(name: str = "tiny") -> torch.nn.Module:
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    # 224 / 32 = 7x7 patches + class token = 50 tokens; depth 4
    return VisionTransformer(img_size=224, patch_size=32, embed_dim=32, depth=4, num_heads=2, num_classes=10)


def test_token_schedule_clamps_like_tome():
    # 50 tokens, 1 class token: r=30 is clamped to (n - 1) // 2 in every block
    assert token_schedule(50, 1, [30] * 4) == [(50, 26), (26, 14), (14, 8), (8, 5)]
    assert token_schedule(50, 1, [8] * 4) == [(50, 42), (42, 34), (34, 26), (26, 18)]
    assert token_schedule(197, 1, [0] * 12) == [(197, 197)] * 12


def test_vit_gflops_matches_known_vit_b_count():
    timm = pytest.importorskip("timm")
    model = timm.create_model("vit_base_patch16_224", pretrained=False)
    g0, sched = vit_gflops(model, 0)
    assert 2 * 17.4 < g0 < 2 * 17.7  # 17.6 GMACs (fvcore / the ToMe paper)
    g16, sched16 = vit_gflops(model, 16)
    assert sched16[-1][1] == 11 and 0.45 < g16 / g0 < 0.55  # ToMe paper: 8.8 / 17.6


def test_photo_batch_cycles_real_images():
    x = photo_batch(5, size=64, names=("astronaut", "coffee", "camera"))
    assert x.shape == (5, 3, 64, 64) and x.dtype == torch.float32
    assert torch.equal(x[0], x[3]) and torch.equal(x[1], x[4]) and not torch.equal(x[0], x[1])
    assert x.std() > 0.3  # a normalised photo, not a constant


def test_run_tome_bench_rows_and_files(tmp_path):
    lines: list[str] = []
    rows = run_tome_bench(
        ["tiny-a"], [8, 30], batch_size=3, repeats=1, warmup=0, latency_batch=1, device="cpu",
        model_fn=_tiny_vit, out_dir=tmp_path, progress=False, print_fn=lines.append,
    )  # fmt: skip
    assert [r.r for r in rows] == [0, 8, 30]  # r=0 baseline added first
    by_r = {r.r: r for r in rows}
    expected_out = {0: 50, 8: 18, 30: 5}
    for r, row in by_r.items():
        assert row.tokens_in == 50 and row.tokens_out == expected_out[r]
        assert row.tokens_per_block == [n for n, _ in token_schedule(50, 1, [r] * 4)]
        assert row.batch_ms > 0 and row.images_per_s > 0 and row.latency_ms is not None
        assert 0.0 <= row.top1_agreement <= 1.0 and -1.0 <= row.logit_cosine <= 1.0
    assert by_r[0].speedup == 1.0
    assert by_r[0].top1_agreement == 1.0 and by_r[0].logit_cosine == pytest.approx(1.0, abs=1e-12)
    assert by_r[30].gflops < by_r[8].gflops < by_r[0].gflops
    data = json.loads((tmp_path / "tome.json").read_text())
    assert [d["tokens_out"] for d in data["rows"]] == [50, 18, 5] and data["batch_size"] == 3
    assert data["weights"] == {"tiny-a": "random-init"}
    png = (tmp_path / "tome_throughput.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    text = "\n".join(lines)
    assert "random-init weights" in text and "| tiny-a" in text and "speed-up vs r=0" in text


def test_run_tome_bench_rejects_bad_arguments():
    with pytest.raises(ValueError, match="r values"):
        run_tome_bench(["x"], [-1], model_fn=_tiny_vit, progress=False, print_fn=lambda s: None)
    with pytest.raises(ValueError, match="one per model"):
        run_tome_bench(["x", "y"], [4], pretrained=["a"], model_fn=_tiny_vit, progress=False)
    with pytest.raises(ValueError, match="dtype"):
        run_tome_bench(["x"], [4], dtype="int8", model_fn=_tiny_vit, progress=False)


def test_cli_bench_tome_help_and_arguments(capsys):
    with pytest.raises(SystemExit) as e:
        main(["bench", "tome", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for opt in ("--tome-models", "--tome-r", "--tome-batch-size", "--tome-dtype", "--tome-device",
                "--tome-repeats", "--tome-warmup", "--tome-pretrained", "--tome-out", "tome suite"):  # fmt: skip
        assert opt in out, opt
    args = build_parser().parse_args(["bench", "tome"])
    assert args.suite == "tome" and args.tome_models == "vit_small_patch16_224,vit_base_patch16_224"
    assert args.tome_r == "0,4,8,13,16" and args.tome_batch_size is None and args.tome_dtype == "auto"
    assert main(["bench", "tome", "--tome-r", "4,x"]) == 2
    assert "--tome-r takes comma-separated integers" in capsys.readouterr().err
    assert (
        main(["bench", "tome", "--tome-models", "vit_tiny_patch16_224", "--tome-pretrained", "/no/such.pth"])
        == 2
    )
    assert "no such checkpoint file" in capsys.readouterr().err


def test_a_deit_layout_checkpoint_loads_through_timms_route(tmp_path):
    """ToMe's weights are its host's: a released DeiT/timm file (``{"model": state, ...}``, as DeiT and
    ToCom's training write) loads through timm's local-file route (``--tome-pretrained``), weights only,
    and gives the source model's outputs with and without merging."""
    import timm

    import mmeff
    from mmeff.bench.tome import _load

    torch.manual_seed(1)
    src = timm.create_model("vit_tiny_patch16_224", pretrained=False).eval()
    torch.save({"model": src.state_dict(), "epoch": 299}, tmp_path / "deit_tiny.pth")
    got = _load("vit_tiny_patch16_224", str(tmp_path / "deit_tiny.pth"))
    assert sum(p.numel() for p in got.parameters()) == sum(p.numel() for p in src.parameters())
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(got(x), src(x))
        with mmeff.apply(got, mmeff.ToMe(r=8)):
            merged = got(x)
        with mmeff.apply(src, mmeff.ToMe(r=8)):
            torch.testing.assert_close(merged, src(x))
