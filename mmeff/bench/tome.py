"""``mmeff bench tome``: throughput, latency, FLOPs and agreement of timm ViTs with ToMe against r=0.

Every model runs on the same batch of real photos (``skimage.data``: astronaut, coffee, chelsea, rocket,
...; shorter side resized to ``224 / crop_pct`` with bicubic antialiasing, centre-cropped to 224, normalised
with the model's mean/std; the batch cycles through them). Per model, every ``r`` of the sweep runs in the
same process on the same inputs: ``r=0`` is the unpatched model, the others the same model with
:func:`mmeff.adapters.tome.patch` attached for the measurement and removed after it.

Timing (gpt-fast style): untimed warm-up passes of every configuration first (the first one also gives
the logits the agreement columns compare), then ``repeats`` timed rounds in which the configurations are
interleaved (rotated order per round), ``torch.cuda.synchronize()`` around each forward on CUDA; each
configuration reports its median. Speed-ups are ratios of medians from this one run.

GFLOPs per image are counted from the per-block token counts that the ``r`` schedule gives (each block's
``r`` clamped to ``(n - prefix) // 2`` as :mod:`mmeff.methods.tome` does): attention (qkv, ``QK^T``, ``AV``,
projection) on the block's input tokens, MLP on the tokens left after the merge, ToMe's bipartite matching
scores, plus patch embedding and head; 1 multiply-add = 2 FLOPs (the ToMe paper's 17.6 for ViT-B/16
counts multiply-adds). Norms, softmax, GELU and the weighted merges are left out.

The weights are random (``timm.create_model(name, pretrained=False)``, seed 0) unless local checkpoint
files are given: the agreement columns then only say how far ToMe moves the logits of that random network
on these photos, nothing about accuracy.
"""

from __future__ import annotations

import json
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import timm
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from mmeff.adapters import tome as tome_adapter
from mmeff.eval.plotting import pyplot, save_figure
from mmeff.extras import require
from mmeff.methods.tome import Schedule, parse_r

__all__ = [
    "DEFAULT_MODELS",
    "DEFAULT_R",
    "SKIMAGE_PHOTOS",
    "TomeBenchRow",
    "photo_batch",
    "run_tome_bench",
    "token_schedule",
    "vit_gflops",
]

DEFAULT_MODELS = ("vit_small_patch16_224", "vit_base_patch16_224")
DEFAULT_R = (0, 4, 8, 13, 16)
# real photographs bundled with scikit-image (no download)
SKIMAGE_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry",
                  "retina", "camera")  # fmt: skip


@dataclass
class TomeBenchRow:
    """One line of the table."""

    model: str
    r: int
    tokens_in: int
    tokens_out: int  # tokens leaving the last block (h.stats; the input count for r=0)
    gflops: float  # per image, see the module doc
    batch_ms: float  # median time of one forward of the benchmark batch
    images_per_s: float
    speedup: float  # images/s over images/s of r=0 in the same run
    latency_ms: float | None  # median time of one forward at the latency batch size (None: not measured)
    top1_agreement: float  # fraction of images whose arg-max class equals r=0's
    logit_cosine: float  # mean cosine similarity of the logits with r=0's
    tokens_per_block: list[int] = field(default_factory=list)  # attention tokens of each block

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# --------------------------------------------------------------------------------------- accounting


def token_schedule(n_tokens: int, prefix: int, r_list: Sequence[int]) -> list[tuple[int, int]]:
    """``(attention tokens, MLP tokens)`` of every block: ToMe merges between attention and MLP.

    Each block merges ``min(r_i, (n - prefix) // 2)`` tokens, the clamp :mod:`mmeff.methods.tome` applies.
    """
    out, n = [], n_tokens
    for r in r_list:
        m = n - min(int(r), (n - prefix) // 2)
        out.append((n, m))
        n = m
    return out


def _vit_dims(model: nn.Module) -> dict[str, int]:
    blk = model.blocks[0]
    return {
        "dim": int(model.embed_dim),
        "hidden": int(blk.mlp.fc1.out_features),
        "heads": int(blk.attn.num_heads),
        "depth": len(model.blocks),
        "patches": int(model.patch_embed.num_patches),
        "prefix": int(model.num_prefix_tokens),
        "patch_in": int(model.patch_embed.proj.weight[0].numel()),
        "classes": int(getattr(model.head, "out_features", 0) or 0),
    }


def vit_gflops(model: nn.Module, r: Schedule) -> tuple[float, list[tuple[int, int]]]:
    """GFLOPs per image of a timm ViT under ToMe schedule ``r`` and its per-block token counts.

    Counts (2 FLOPs per multiply-add) qkv, ``QK^T``, ``AV`` and the output projection on each block's
    input tokens, the MLP on its tokens after the merge, the bipartite matching scores of merging blocks
    (``a x b`` dot products of head-averaged keys), the patch embedding and the classifier head.
    """
    d = _vit_dims(model)
    dim, hidden, hd = d["dim"], d["hidden"], d["dim"] // d["heads"]
    sched = token_schedule(d["patches"] + d["prefix"], d["prefix"], parse_r(d["depth"], r))
    macs = d["patches"] * d["patch_in"] * dim + dim * d["classes"]
    for n, m in sched:
        macs += n * dim * 3 * dim + 2 * n * n * dim + n * dim * dim + 2 * m * dim * hidden
        if m < n:
            mergeable = n - d["prefix"]
            macs += ((mergeable + 1) // 2) * (mergeable // 2) * hd
    return 2 * macs / 1e9, sched


# ------------------------------------------------------------------------------------------- inputs


def _photo(name: str) -> torch.Tensor:
    img = torch.from_numpy(getattr(require("skimage.data", "the ToMe bench's photos"), name)())
    if img.dim() == 2:
        img = img[..., None].expand(-1, -1, 3)
    return img[..., :3].permute(2, 0, 1).contiguous()  # (3, H, W) uint8


def photo_batch(
    batch: int,
    size: int = 224,
    crop_pct: float = 0.875,
    mean: Sequence[float] = (0.485, 0.456, 0.406),
    std: Sequence[float] = (0.229, 0.224, 0.225),
    names: Sequence[str] = SKIMAGE_PHOTOS,
) -> torch.Tensor:
    """``(batch, 3, size, size)`` float32: ``skimage.data`` photos, resized and centre-cropped, cycled.

    The shorter side goes to ``size / crop_pct`` (bicubic, antialiased), then a centre ``size`` crop and
    ``(x / 255 - mean) / std`` (timm's evaluation transform).
    """
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    short = int(size / crop_pct)
    imgs = []
    for name in names[: min(batch, len(names))]:
        x = _photo(name).float()[None]
        h, w = x.shape[-2:]
        s = short / min(h, w)
        x = F.interpolate(x, size=(max(size, round(h * s)), max(size, round(w * s))), mode="bicubic",
                          antialias=True, align_corners=False)  # fmt: skip
        top, left = (x.shape[-2] - size) // 2, (x.shape[-1] - size) // 2
        x = x[..., top : top + size, left : left + size].clamp(0, 255) / 255.0
        imgs.append(x[0])
    m = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    sd = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    imgs = [(x - m) / sd for x in imgs]
    return torch.stack([imgs[i % len(imgs)] for i in range(batch)])


# ------------------------------------------------------------------------------------------- timing


def _load(name: str, checkpoint: str | None) -> nn.Module:
    torch.manual_seed(0)
    if checkpoint:
        if not Path(checkpoint).expanduser().is_file():
            raise ValueError(f"--tome-pretrained: no such checkpoint file {checkpoint!r}")
        overlay = {"file": str(Path(checkpoint).expanduser())}
        model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay)
    else:
        model = timm.create_model(name, pretrained=False)
    return model.eval()


def _resolve(device: str | None, dtype: str | torch.dtype | None, batch: int | None) -> tuple[Any, Any, int]:
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu") if device in (None, "auto") else None
    dev = dev or torch.device(device)  # type: ignore[arg-type]
    if dtype in (None, "auto"):
        dt = torch.float16 if dev.type == "cuda" else torch.float32
    elif isinstance(dtype, torch.dtype):
        dt = dtype
    else:
        names = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
                 "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}  # fmt: skip
        if dtype not in names:
            raise ValueError(f"dtype must be one of auto, {', '.join(names)}; got {dtype!r}")
        dt = names[dtype]
    bs = batch if batch is not None else (64 if dev.type == "cuda" else 8)
    if bs < 1:
        raise ValueError(f"batch size must be >= 1, got {bs}")
    return dev, dt, bs


def _device_name(dev: torch.device) -> str:
    if dev.type == "cuda":
        return f"{dev} ({torch.cuda.get_device_name(dev)})"
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def _agreement(ref: torch.Tensor, out: torch.Tensor) -> tuple[float, float]:
    ref, out = ref.double(), out.double()
    top1 = (ref.argmax(-1) == out.argmax(-1)).double().mean().item()
    cos = F.cosine_similarity(ref, out, dim=-1).mean().item()
    return top1, min(cos, 1.0)


def format_table(rows: Sequence[TomeBenchRow], pretrained: bool) -> str:
    """The markdown table printed by :func:`run_tome_bench`."""
    star = "" if pretrained else "*"
    head = ["model", "r", "tokens out", "GFLOPs/img", "ms/batch", "images/s", "speed-up vs r=0",
            "latency ms", f"top-1 agree w/ r=0{star}", f"logit cos w/ r=0{star}"]  # fmt: skip
    cells = [
        [
            x.model,
            str(x.r),
            f"{x.tokens_out}/{x.tokens_in}",
            f"{x.gflops:.2f}",
            f"{x.batch_ms:.1f}",
            f"{x.images_per_s:.1f}",
            f"{x.speedup:.2f}x",
            "-" if x.latency_ms is None else f"{x.latency_ms:.1f}",
            f"{x.top1_agreement:.3f}",
            f"{x.logit_cosine:.4f}",
        ]
        for x in rows
    ]
    right = {1, 2, 3, 4, 5, 6, 7, 8, 9}
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(head)]

    def line(cs: Sequence[str]) -> str:
        return (
            "| "
            + " | ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cs, widths)))
            + " |"
        )

    sep = "|" + "|".join("-" * (w + 1) + (":" if i in right else "-") for i, w in enumerate(widths)) + "|"
    return "\n".join([line(head), sep, *(line(c) for c in cells)])


def _plot(rows: Sequence[TomeBenchRow], path: str | Path, title: str) -> None:
    plt = pyplot()

    models = list(dict.fromkeys(r.model for r in rows))
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name in models:
        rs = [r for r in rows if r.model == name]
        xs = [r.r for r in rs]
        (ln,) = ax.plot(xs, [r.images_per_s for r in rs], marker="o", label=name)
        for r in rs:
            ax.annotate(f"{r.speedup:.2f}x", (r.r, r.images_per_s), textcoords="offset points", xytext=(0, 6),
                        ha="center", fontsize=7, color=ln.get_color())  # fmt: skip
        base = next(r for r in rs if r.r == 0)
        ax2.plot(xs, [r.speedup for r in rs], marker="o", color=ln.get_color(), label=f"{name} measured")
        ax2.plot(xs, [base.gflops / r.gflops for r in rs], ls="--", color=ln.get_color(),
                 label=f"{name} FLOP ratio")  # fmt: skip
    ax.set_xlabel("r (tokens merged per block)")
    ax.set_ylabel("images / s")
    ax.set_title("throughput (annotated: speed-up vs r=0)", fontsize=9)
    ax.legend(fontsize=7)
    ax2.set_xlabel("r (tokens merged per block)")
    ax2.set_ylabel("speed-up vs r=0")
    ax2.set_title("measured speed-up vs GFLOPs(r=0) / GFLOPs(r)", fontsize=9)
    ax2.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    save_figure(fig, path)


def _one_pass(
    model: nn.Module, r: int, x: torch.Tensor, x1: torch.Tensor | None, sync: Callable[[], Any]
) -> tuple[torch.Tensor, dict[str, Any], float, float]:
    """One forward of ``x`` (and of ``x1`` if given) with ToMe ``r`` attached for it (none for r=0).

    Returns the logits of ``x``, the ToMe stats, and the seconds of the two forwards (synchronized).
    """
    h = tome_adapter.patch(model, r=r) if r else None
    try:
        sync()
        t0 = time.perf_counter()
        y = model(x)
        sync()
        t_batch = time.perf_counter() - t0
        st = dict(h.stats) if h is not None else {}
        t_lat = 0.0
        if x1 is not None:
            t0 = time.perf_counter()
            model(x1)
            sync()
            t_lat = time.perf_counter() - t0
    finally:
        if h is not None:
            tome_adapter.unpatch(model)
    return y, st, t_batch, t_lat


@torch.inference_mode()
def run_tome_bench(
    models: Sequence[str] = DEFAULT_MODELS,
    rs: Sequence[int] = DEFAULT_R,
    *,
    batch_size: int | None = None,
    dtype: str | torch.dtype | None = None,
    device: str | None = None,
    warmup: int = 1,
    repeats: int = 5,
    latency_batch: int = 1,
    pretrained: Sequence[str | None] | None = None,
    out_dir: str | Path | None = None,
    json_path: str | Path | None = None,
    plot_path: str | Path | None = None,
    model_fn: Callable[[str], nn.Module] | None = None,
    progress: bool = True,
    print_fn: Callable[[str], None] = print,
) -> list[TomeBenchRow]:
    """Run the table (module doc) and return its rows.

    Args:
        models: timm model names (``timm.create_model``), or names passed to ``model_fn``.
        rs: tokens merged per block; ``0`` (the unmerged baseline) is added first if missing.
        batch_size: images per timed forward (default 64 on CUDA, 8 on CPU).
        dtype: ``"float32"``, ``"float16"``, ``"bfloat16"`` (default float16 on CUDA, float32 on CPU).
        device: torch device or ``"auto"`` (CUDA when available).
        warmup: untimed passes of every configuration before timing (at least one: it gives the logits).
        repeats: timed rounds; each configuration reports the median of its ``repeats`` times.
        latency_batch: also time forwards of this many images (0 skips the latency column).
        pretrained: one local timm checkpoint file (or ``None``) per model; default random weights.
        out_dir: write ``tome.json`` and ``tome_throughput.png`` here (``json_path``/``plot_path`` override).
        model_fn: builds a model from a name (tests); default ``timm.create_model`` as described above.
    """
    t_start = time.perf_counter()
    dev, dt, bs = _resolve(device, dtype, batch_size)
    models = list(models)
    if not models:
        raise ValueError("no models to benchmark")
    rs = [int(r) for r in rs]
    if any(r < 0 for r in rs):
        raise ValueError(f"r values must be >= 0, got {rs}")
    rs = list(dict.fromkeys([0, *sorted(rs)]))
    if repeats < 1 or warmup < 0 or latency_batch < 0:
        raise ValueError("repeats must be >= 1, warmup and latency batch >= 0")
    ckpts = list(pretrained) if pretrained else [None] * len(models)
    if len(ckpts) != len(models):
        raise ValueError(f"{len(ckpts)} checkpoint(s) for {len(models)} model(s); give one per model")
    any_pretrained = any(ckpts)
    passes = max(warmup, 1) + repeats
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    bar = tqdm(total=len(models) * passes * len(rs), desc="bench tome", unit="pass", disable=not progress)
    rows: list[TomeBenchRow] = []
    for name, ckpt in zip(models, ckpts):
        model = model_fn(name) if model_fn is not None else _load(name, ckpt)
        model = model.to(device=dev, dtype=dt).eval()
        cfg = getattr(model, "pretrained_cfg", None) or {}
        size = int(model.patch_embed.img_size[0])
        norm = (float(cfg.get("crop_pct", 0.875)), cfg.get("mean", (0.485, 0.456, 0.406)),
                cfg.get("std", (0.229, 0.224, 0.225)))  # fmt: skip
        x = photo_batch(max(bs, latency_batch), size, *norm).to(device=dev, dtype=dt)
        x, x1 = x[:bs], x[:latency_batch]
        logits: dict[int, torch.Tensor] = {}
        stats: dict[int, dict[str, Any]] = {}
        times: dict[int, list[float]] = {r: [] for r in rs}
        lat: dict[int, list[float]] = {r: [] for r in rs}

        for w in range(max(warmup, 1)):
            for r in rs:
                bar.set_postfix_str(f"{name} r={r} warm-up")
                y, st, _, _ = _one_pass(model, r, x, x1 if latency_batch else None, sync)
                if w == 0:
                    logits[r], stats[r] = y.float().cpu(), st
                bar.update(1)
        for i in range(repeats):
            for r in rs[i % len(rs) :] + rs[: i % len(rs)]:  # rotate the order round by round
                bar.set_postfix_str(f"{name} r={r}")
                _, _, t_batch, t_lat = _one_pass(model, r, x, x1 if latency_batch else None, sync)
                times[r].append(t_batch)
                lat[r].append(t_lat)
                bar.update(1)

        base_ips = bs / statistics.median(times[0])
        for r in rs:
            gflops, sched = vit_gflops(model, r)
            n_in = sched[0][0]
            n_out = int(stats[r]["tokens_out"]) if r else n_in
            top1, cos = _agreement(logits[0], logits[r])
            ips = bs / statistics.median(times[r])
            rows.append(
                TomeBenchRow(
                    model=name,
                    r=r,
                    tokens_in=n_in,
                    tokens_out=n_out,
                    gflops=gflops,
                    batch_ms=statistics.median(times[r]) * 1e3,
                    images_per_s=ips,
                    speedup=ips / base_ips,
                    latency_ms=statistics.median(lat[r]) * 1e3 if latency_batch else None,
                    top1_agreement=top1,
                    logit_cosine=cos,
                    tokens_per_block=[n for n, _ in sched],
                )
            )
        del model
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    bar.close()
    total_s = time.perf_counter() - t_start
    weights = ", ".join(f"{m}: {c}" for m, c in zip(models, ckpts) if c) if any_pretrained else (
        "random init (timm pretrained=False, seed 0)")  # fmt: skip
    photos = ", ".join(SKIMAGE_PHOTOS[: min(bs, len(SKIMAGE_PHOTOS))])
    header = (
        f"ToMe (mmeff.methods.tome, proportional attention) on timm ViTs at {size}x{size}; device {_device_name(dev)}; "
        f"{str(dt).replace('torch.', '')}; batch {bs}; torch {torch.__version__}\n"
        f"inputs: skimage.data photos cycled ({photos}); median of {repeats} timed rounds after "
        f"{max(warmup, 1)} warm-up, configurations interleaved; speed-up = images/s over r=0's in this run\n"
        f"weights: {weights}"
    )
    if latency_batch:
        header += f"\nlatency ms: median time of one forward of {latency_batch} image(s)"
    if not any_pretrained:
        header += ("\n* agreement with r=0 on random-init weights (top-1 class and logit cosine vs the unmerged "
                   "model on these photos): says how far ToMe moves this random network, nothing about accuracy")  # fmt: skip
    print_fn(header)
    print_fn(format_table(rows, any_pretrained))
    print_fn(f"total {total_s:.1f} s")
    if out_dir is not None:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        json_path = json_path or Path(out_dir) / "tome.json"
        plot_path = plot_path or Path(out_dir) / "tome_throughput.png"
    if json_path:
        payload = {
            "device": _device_name(dev),
            "dtype": str(dt).replace("torch.", ""),
            "batch_size": bs,
            "latency_batch": latency_batch,
            "warmup": max(warmup, 1),
            "repeats": repeats,
            "image_size": size,
            "photos": list(SKIMAGE_PHOTOS[: min(bs, len(SKIMAGE_PHOTOS))]),
            "weights": {m: c or "random-init" for m, c in zip(models, ckpts)},
            "torch": torch.__version__,
            "total_s": total_s,
            "rows": [r.as_dict() for r in rows],
        }
        Path(json_path).write_text(json.dumps(payload, indent=2))
        print_fn(f"wrote {json_path}")
    if plot_path:
        _plot(rows, plot_path, f"ToMe on {_device_name(dev)}, {str(dt).replace('torch.', '')}, batch {bs}")
        print_fn(f"wrote {plot_path}")
    return rows
