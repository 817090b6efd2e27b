"""``mmeff bench squeezetime``: the miniature real run (does SqueezeTime learn time?) and throughput.

Throughput (:func:`run_throughput`): SqueezeTime (paper config) against torchvision's ``r3d_18`` (a 3-D
ResNet-18 of similar K400 accuracy class) at the same input, 16 frames at 224 px, in one process: one
untimed warm-up, then the median of ``repeats`` timed forwards (CUDA synchronised when on GPU), as clips/s
at ``batch`` and ms per clip at batch 1, with params and FLOPs (``torch.utils.flop_counter``, 2 per
multiply-add); plus SqueezeTime exported to ONNX and run by onnxruntime on CPU (checked against PyTorch).

A generated action set whose classes only temporal order separates: a shape moving ``left``, ``right``,
``up`` or ``down`` across the frame, or one that ``appear``s or ``disappear``s halfway. Paths are
symmetric and the object is on screen for the same time in each pair, so the average of a clip's frames
is the same for left/right, up/down and appear/disappear: a model that averages frames can at best tell
the three pairs apart (50%), while chance is 1/6. Random colours, shapes, sizes, offsets and backgrounds
vary every clip. The clips are written as mp4 in a Kinetics-style folder (``root/<class>/<clip>.mp4``) and
read back through the library's loader, so the same :func:`mmeff.train.videocls.train` / ``evaluate`` run
that a user runs on Kinetics.

Compared: a small SqueezeTime (``squeezetime_10`` at width x``widen``) and the same backbone as a
frame-averaging 2-D baseline (:class:`mmeff.train.videocls.FrameAverage`, one frame at a time, features
averaged over time), trained with the same recipe and seed.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode
from torchvision.models.video import r3d_18

from mmeff.datasets.media import write_mp4
from mmeff.eval.latency import median_seconds
from mmeff.models.squeezetime import check_onnx, create_model, export_onnx
from mmeff.train.videocls import TrainConfig, VideoFolder, evaluate, frame_average_model, train

__all__ = ["CLASSES", "motion_dataset", "run_miniature", "run_throughput"]

CLASSES = ("appear", "disappear", "down", "left", "right", "up")


def _clip(rng: np.random.Generator, kind: str, frames: int, size: int) -> np.ndarray:
    bg = rng.integers(0, 90, size=3)
    colour = rng.integers(150, 256, size=3)
    r = int(rng.integers(size // 10, size // 6))
    shape = str(rng.choice(["square", "disc"]))
    yy, xx = np.mgrid[0:size, 0:size]
    lo, hi = r + 2, size - r - 3
    # a symmetric path: the mover covers the same segment in both directions
    a, b = float(rng.uniform(lo, lo + size * 0.1)), float(rng.uniform(hi - size * 0.1, hi))
    cross = float(rng.uniform(lo, hi))
    out = np.empty((frames, size, size, 3), dtype=np.uint8)
    for t in range(frames):
        s = t / (frames - 1)
        if kind in ("left", "right", "up", "down"):
            p = a + (b - a) * (s if kind in ("right", "down") else 1 - s)
            cx, cy = (p, cross) if kind in ("left", "right") else (cross, p)
            visible = True
        else:
            cx, cy = cross, (a + b) / 2
            visible = (t >= frames // 2) if kind == "appear" else (t < frames // 2)
        img = np.empty((size, size, 3), dtype=np.uint8)
        img[:] = bg
        if visible:
            mask = (np.abs(xx - cx) <= r) & (np.abs(yy - cy) <= r) if shape == "square" else \
                (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r
            img[mask] = colour
        out[t] = img
    return out


def motion_dataset(root: str | Path, per_class: int, *, frames: int = 16, size: int = 64, seed: int = 0) -> Path:
    """Write ``per_class`` mp4 clips of every class in :data:`CLASSES` under ``root/<class>/`` (skips
    clips already there); returns ``root``."""
    root = Path(root)
    for ci, kind in enumerate(CLASSES):
        (root / kind).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            path = root / kind / f"{kind}_{i:04d}.mp4"
            if path.is_file():
                continue
            rng = np.random.default_rng([seed, ci, i])
            write_mp4(path, list(_clip(rng, kind, frames, size)), (size, size))
    return root


def run_miniature(
    out_dir: str | Path = "bench_squeezetime",
    *,
    train_per_class: int = 40,
    val_per_class: int = 12,
    frames: int = 8,
    size: int = 64,
    epochs: int = 12,
    widen: float = 0.25,
    batch_size: int = 12,
    lr: float = 0.05,
    recipe: str = "official",
    clip_frames: int = 48,
    frame_interval: int = 4,
    seed: int = 0,
    progress: bool = True,
    print_fn: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Generate the data (``clip_frames``-frame clips), train SqueezeTime and the frame-averaging baseline
    with ``recipe`` (:mod:`mmeff.train.videocls`: ``"official"``, ``frames`` frames ``frame_interval`` apart
    from a random window, or ``"mmeff"``, segment midpoints of the whole clip), print and return the table
    (``out_dir/miniature_<recipe>.json``; checkpoints under ``out_dir/<recipe>/<model>/``)."""
    out = Path(out_dir)
    data = out / "data" / f"{clip_frames}f"
    train_root = motion_dataset(data / "train", train_per_class, seed=seed, size=size, frames=clip_frames)
    val_root = motion_dataset(data / "val", val_per_class, seed=seed + 1, size=size, frames=clip_frames)
    cfg = TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, warmup_epochs=1.0, seed=seed,
                      decay_all=recipe == "official")
    views = {"recipe": recipe, "frame_interval": frame_interval, "classes": CLASSES}
    common = {"num_classes": len(CLASSES), "img_size": size, "widen_factor": widen, "dropout": 0.2}
    builders = {
        "squeezetime": lambda: create_model("squeezetime_10", num_frames=frames, **common),
        "frame_average_2d": lambda: frame_average_model("squeezetime_10", **common),
    }
    rows: dict[str, Any] = {}
    for name, build in builders.items():
        torch.manual_seed(seed)
        model = build()
        params = sum(p.numel() for p in model.parameters())
        train_set = VideoFolder(train_root, frames, size, train=True, **views)
        val_set = VideoFolder(val_root, frames, size, train=False, **views)
        hist = train(model, train_set, out / recipe / name, cfg, resume=True, progress=progress, log=lambda s: None)
        res = evaluate(model, val_set, batch_size=8, progress=False)
        rows[name] = {"params": params, "val_top1": res["top1"], "val_top5": res["top5"],
                      "train_top1_last_epoch": hist["epochs"][-1]["train_top1"],
                      "train_seconds": sum(e["seconds"] for e in hist["epochs"])}
    print_fn(f"miniature: {len(CLASSES)} classes separable only by temporal order, {train_per_class}/class train, "
             f"{val_per_class}/class val, {frames} of {clip_frames} frames at {size}px, {epochs} epochs, recipe "
             f"{recipe}; chance 16.7%, a frame-averaging model can reach at most 50%")
    print_fn(f"{'model':<18}{'params':>10}{'val top-1':>11}{'train top-1':>13}{'train s':>9}")
    for name, r in rows.items():
        print_fn(f"{name:<18}{r['params']:>10,}{100 * r['val_top1']:>10.1f}%{100 * r['train_top1_last_epoch']:>12.1f}%"
                 f"{r['train_seconds']:>9.0f}")
    result = {"classes": list(CLASSES), "frames": frames, "clip_frames": clip_frames, "size": size, "epochs": epochs,
              "recipe": recipe, "frame_interval": frame_interval, "rows": rows}
    (out / f"miniature_{recipe}.json").write_text(json.dumps(result, indent=1))
    return result


def run_throughput(
    out_dir: str | Path = "bench_squeezetime",
    *,
    batch: int = 4,
    repeats: int = 3,
    frames: int = 16,
    size: int = 224,
    device: str | None = None,
    onnx: bool = True,
    models: dict[str, Callable[[], torch.nn.Module]] | None = None,
    print_fn: Callable[[str], None] = print,
) -> list[dict[str, Any]]:
    """Time the models (default SqueezeTime K400 and ``r3d_18``, random weights: speed does not depend on
    them); print the table and write ``out_dir/throughput.json``. Ratios are against the first model."""
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if models is None:
        models = {"squeezetime_k400": lambda: create_model("squeezetime_k400"), "r3d_18": lambda: r3d_18()}

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    for name, build in models.items():
        torch.manual_seed(0)
        model = build().eval().to(dev)
        one = torch.randn(1, 3, frames, size, size, device=dev)
        many = torch.randn(batch, 3, frames, size, size, device=dev)
        with torch.no_grad():
            with FlopCounterMode(display=False) as fc:
                model(one)
            latency = median_seconds(model, one, repeats=repeats, device=dev)
            per_batch = median_seconds(model, many, repeats=repeats, device=dev)
        rows.append({"model": name, "runtime": f"pytorch ({dev.type})",
                     "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
                     "gflops": fc.get_total_flops() / 1e9, "ms_per_clip": latency * 1e3,
                     "clips_per_s": batch / per_batch})
        if onnx and name.startswith("squeezetime") and hasattr(model, "num_frames"):
            import onnxruntime as ort

            cpu_model = model.cpu()
            path = export_onnx(cpu_model, out / f"{name}.onnx")
            diff = check_onnx(cpu_model, path, batch_sizes=(1, 2))
            session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            feed = session.get_inputs()[0].name
            x1, xb = {feed: one.cpu().numpy()}, {feed: many.cpu().numpy()}
            rows.append({"model": name, "runtime": "onnxruntime (cpu)", "params_m": rows[-1]["params_m"],
                         "gflops": rows[-1]["gflops"],
                         "ms_per_clip": median_seconds(session.run, None, x1, repeats=repeats) * 1e3,
                         "clips_per_s": batch / median_seconds(session.run, None, xb, repeats=repeats),
                         "onnx_max_abs_diff": diff})
    base = rows[0]
    print_fn(f"{frames} frames at {size}px; batch {batch} for clips/s, batch 1 for ms/clip; median of {repeats} after "
             f"a warm-up; {dev}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print_fn(f"{'model':<18}{'runtime':<20}{'params M':>9}{'GFLOPs':>9}{'ms/clip':>10}{'clips/s':>9}"
             f"{'speed x':>9}")
    for r in rows:
        r["speedup_vs_first"] = r["clips_per_s"] / base["clips_per_s"]
        print_fn(f"{r['model']:<18}{r['runtime']:<20}{r['params_m']:>9.2f}{r['gflops']:>9.1f}{r['ms_per_clip']:>10.1f}"
                 f"{r['clips_per_s']:>9.2f}{r['speedup_vs_first']:>9.2f}")
    (out / "throughput.json").write_text(json.dumps(rows, indent=1))
    return rows
