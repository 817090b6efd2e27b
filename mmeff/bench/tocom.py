"""``mmeff bench tocom``: a miniature ToCom reproduction on real data that ships offline (scikit-learn digits).

The paper's protocol, shrunk to minutes on a CPU:

1. *Upstream backbone*: a small timm ViT trained on the digits training split without merging.
2. *ToCom*: trained once on that frozen backbone by self-distillation on unlabeled training images
   (:func:`mmeff.train.tocom.train_tocom`, ``(r_s, r_t)`` sampled in ``[0, steps]``).
3. *Downstream models*: the backbone fine-tuned on two downstream tasks (the digits, and the digits
   rotated by 90 degrees), each at one ToMe degree ``r_s``.
4. Every downstream model is evaluated on its held-out test split at every ToMe degree ``r_t`` without
   ToCom and with the *same* upstream ToCom inserted as ``s → t``: the accuracy lost at mismatched
   degrees, and how much ToCom recovers. The plot is accuracy vs ``r_t`` with and without ToCom.

Nothing is downloaded; the digits are scikit-learn's bundled 8x8 scans, cut into 2x2 patches (16 tokens
and a class token). At that size every token carries distinct strokes: with smooth upsampled digits
the tiny ViT puts everything into its class token in block 0 and ToMe costs nothing to compensate.
"""

from __future__ import annotations

import copy
import json
import time
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn
from tqdm.auto import tqdm

from mmeff.api import apply
from mmeff.eval.plotting import pyplot, save_figure
from mmeff.extras import require
from mmeff.methods.tocom import ToCom
from mmeff.methods.tome import ToMe
from mmeff.train.tocom import Batches, train_tocom

__all__ = ["ToComRow", "digits_splits", "tiny_vit", "train_classifier", "accuracy", "run_tocom_bench"]

DEFAULT_TASKS = ("digits", "digits-rot90")


def digits_splits(
    size: int = 8, test_fraction: float = 0.25, seed: int = 0, task: str = "digits"
) -> dict[str, Tensor]:
    """scikit-learn's digits as ``x_train``/``x_test`` ``(N, 3, size, size)`` (normalised) and labels ``(N,)``.

    ``task="digits-rot90"`` rotates every image by 90 degrees (a second downstream task, same labels).
    The split is stratified-free but fixed by ``seed``.
    """
    load_digits = require("sklearn.datasets", "the ToCom miniature's digits").load_digits
    if task not in DEFAULT_TASKS:
        raise ValueError(f"task must be one of {DEFAULT_TASKS}, got {task!r}")
    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32)[:, None] / 16.0  # (N, 1, 8, 8) in [0, 1]
    if task == "digits-rot90":
        x = torch.rot90(x, 1, dims=(2, 3))
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    x = ((x - 0.5) / 0.5).expand(-1, 3, -1, -1).contiguous()
    y = torch.tensor(d.target, dtype=torch.long)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    n_test = int(len(x) * test_fraction)
    test, train = perm[:n_test], perm[n_test:]
    return {"x_train": x[train], "y_train": y[train], "x_test": x[test], "y_test": y[test]}


def tiny_vit(
    num_classes: int = 10,
    img_size: int = 8,
    patch_size: int = 2,
    dim: int = 96,
    depth: int = 4,
    heads: int = 3,
) -> nn.Module:
    """A small timm ``VisionTransformer`` (class token, fused attention) for the miniature."""
    return VisionTransformer(
        img_size=img_size,
        patch_size=patch_size,
        num_classes=num_classes,
        embed_dim=dim,
        depth=depth,
        num_heads=heads,
        mlp_ratio=2.0,
    )


def _shift(x: Tensor, gen: torch.Generator, max_shift: int) -> Tensor:
    """Random cyclic translation by up to ``max_shift`` pixels (0: none)."""
    if max_shift <= 0:
        return x
    dx, dy = (int(v) for v in torch.randint(-max_shift, max_shift + 1, (2,), generator=gen))
    return torch.roll(x, shifts=(dy, dx), dims=(2, 3))


def train_classifier(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    r: int = 0,
    epochs: int = 30,
    lr: float = 2e-3,
    max_shift: int = 0,
    batch_size: int = 64,
    seed: int = 0,
    progress: bool = True,
    desc: str = "train",
) -> nn.Module:
    """Train ``model`` on ``x`` ``(N, 3, H, W)`` / ``y`` ``(N,)`` with cross-entropy at ToMe degree ``r``.

    AdamW with a one-cycle schedule, label smoothing 0.1, optional random shifts of up to ``max_shift``.
    """
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    steps = epochs * ((len(x) + batch_size - 1) // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    model.train()
    with _tome(model, r):
        for _ in tqdm(range(epochs), desc=desc, disable=not progress, leave=False):
            perm = torch.randperm(len(x), generator=gen)
            for i in range(0, len(x), batch_size):
                idx = perm[i : i + batch_size]
                loss = F.cross_entropy(model(_shift(x[idx], gen, max_shift)), y[idx], label_smoothing=0.1)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
    return model.eval()


@torch.no_grad()
def accuracy(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    r: int,
    tocom: ToCom | None = None,
    source: int | None = None,
    scale: float | None = None,
    batch_size: int = 256,
) -> float:
    """Top-1 accuracy (%) of ``model`` at ToMe degree ``r``, optionally with ``tocom`` as ``source → r``."""
    model.eval()
    with (
        _tome(model, r),
        (
            tocom.compensate(model, source=int(source or 0), target=r, scale=scale)
            if tocom is not None
            else nullcontext()
        ),
    ):
        correct = sum(
            int((model(x[i : i + batch_size]).argmax(-1) == y[i : i + batch_size]).sum())
            for i in range(0, len(x), batch_size)
        )
    return 100.0 * correct / len(x)


def _tome(model: nn.Module, r: int) -> AbstractContextManager[Any]:
    """ToMe at ``r`` for a ``with`` block; nothing attached at ``r = 0`` (the plain model)."""
    return apply(model, ToMe(r=r)) if r else nullcontext()


@dataclass
class ToComRow:
    """Accuracy of one downstream model at one inference degree."""

    task: str
    r_source: int
    r_target: int
    acc_tome: float
    acc_tocom: float

    @property
    def gain(self) -> float:
        return self.acc_tocom - self.acc_tome

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "gain": self.gain}


def run_tocom_bench(
    tasks: tuple[str, ...] = DEFAULT_TASKS,
    sources: tuple[int, ...] = (0, 4),
    targets: tuple[int, ...] = (0, 2, 4, 6, 8),
    steps: int = 8,
    pretrain_epochs: int = 40,
    finetune_epochs: int = 10,
    tocom_epochs: int = 20,
    tocom_lr: float | None = None,
    tocom_recipe: str = "official",
    tocom_drop_path: float | None = None,
    scale: float = 0.1,
    seed: int = 0,
    out_dir: str | Path | None = None,
    json_path: str | Path | None = None,
    plot_path: str | Path | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Run the miniature (see the module doc); prints the table and returns it with timings.

    ``out_dir`` keeps the backbone, the ToCom checkpoint (``tocom.safetensors``, resumable) and the
    downstream models. ``sources`` are the downstream training degrees, ``targets`` the inference ones.
    ``tocom_recipe`` / ``tocom_lr`` / ``tocom_drop_path``: :func:`~mmeff.train.tocom.train_tocom`'s
    ``recipe`` / ``lr`` / ``drop_path`` (``None``: the recipe's).
    """
    if max((*sources, *targets)) > steps:
        raise ValueError(f"degrees {sources}/{targets} exceed ToCom's {steps} steps")
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    up = digits_splits(seed=seed, task="digits")
    backbone = tiny_vit()
    train_classifier(
        backbone,
        up["x_train"],
        up["y_train"],
        epochs=pretrain_epochs,
        seed=seed,
        progress=progress,
        desc="backbone",
    )
    t_backbone = time.perf_counter() - t0
    ck = Path(out_dir) / "tocom" if out_dir is not None else None
    t1 = time.perf_counter()
    tocom = train_tocom(
        backbone,
        Batches(up["x_train"], 64, seed=seed),
        steps=steps,
        step_rank=2,
        epochs=tocom_epochs,
        lr=tocom_lr,
        recipe=tocom_recipe,
        drop_path=tocom_drop_path,
        scale=scale,
        out_dir=ck,
        seed=seed,
        progress=progress,
    )
    t_tocom = time.perf_counter() - t1
    rows: list[ToComRow] = []
    jobs = [(task, r_s) for task in tasks for r_s in sources]
    for task, r_s in tqdm(jobs, desc="downstream", disable=not progress):
        data = digits_splits(seed=seed, task=task)
        model = copy.deepcopy(backbone)
        train_classifier(
            model,
            data["x_train"],
            data["y_train"],
            r=r_s,
            epochs=finetune_epochs,
            lr=5e-4,
            seed=seed + 1,
            progress=False,
        )
        if out_dir is not None:
            torch.save(model.state_dict(), Path(out_dir) / f"downstream_{task}_r{r_s}.pt")
        for r_t in targets:
            a0 = accuracy(model, data["x_test"], data["y_test"], r_t)
            a1 = a0 if r_t == r_s else accuracy(model, data["x_test"], data["y_test"], r_t, tocom, r_s)
            rows.append(ToComRow(task, r_s, r_t, a0, a1))
    report = {
        "rows": [r.as_dict() for r in rows],
        "backbone_test_acc": accuracy(backbone, up["x_test"], up["y_test"], 0),
        "tocom_params": sum(p.numel() for p in tocom.parameters()),
        "backbone_params": sum(p.numel() for p in backbone.parameters()),
        "seconds": {"backbone": t_backbone, "tocom": t_tocom, "total": time.perf_counter() - t0},
        "config": {
            "steps": steps,
            "scale": scale,
            "tocom_lr": tocom_lr,
            "tocom_recipe": tocom_recipe,
            "tocom_drop_path": tocom_drop_path,
            "tocom_epochs": tocom_epochs,
            "sources": list(sources),
            "targets": list(targets),
            "seed": seed,
        },
    }
    print(format_table(rows, report))
    if json_path is not None:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(report, indent=2))
    if plot_path is not None:
        plot_rows(rows, plot_path)
    return report


def format_table(rows: list[ToComRow], report: dict[str, Any]) -> str:
    """Markdown table of the rows plus the mismatched-degree averages."""
    lines = [
        f"backbone test accuracy {report['backbone_test_acc']:.2f}% ({report['backbone_params']:,} params); "
        f"ToCom {report['tocom_params']:,} params",
        "",
        "| task | trained at r_s | run at r_t | ToMe | ToMe + ToCom(s→t) | gain |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.task} | {r.r_source} | {r.r_target} | {r.acc_tome:.2f} | {r.acc_tocom:.2f} | {r.gain:+.2f} |"
        )
    mism = [r for r in rows if r.r_source != r.r_target]
    if mism:
        a0 = sum(r.acc_tome for r in mism) / len(mism)
        a1 = sum(r.acc_tocom for r in mism) / len(mism)
        lines.append(f"| **mean, r_t ≠ r_s** | | | {a0:.2f} | {a1:.2f} | {a1 - a0:+.2f} |")
    return "\n".join(lines)


def plot_rows(rows: list[ToComRow], path: str | Path) -> Path:
    """Accuracy vs ``r_t``: one panel per downstream model, ToMe alone vs ToMe + ToCom."""
    plt = pyplot()

    keys = sorted({(r.task, r.r_source) for r in rows})
    fig, axes = plt.subplots(1, len(keys), figsize=(3.6 * len(keys), 3.2), squeeze=False, sharey=True)
    for ax, (task, r_s) in zip(axes[0], keys):
        sel = sorted((r for r in rows if (r.task, r.r_source) == (task, r_s)), key=lambda r: r.r_target)
        xs = [r.r_target for r in sel]
        ax.plot(xs, [r.acc_tome for r in sel], "o-", label="ToMe")
        ax.plot(xs, [r.acc_tocom for r in sel], "s--", label="ToMe + ToCom")
        ax.axvline(r_s, color="grey", lw=0.8, ls=":")
        ax.set_title(f"{task}, trained at r={r_s}", fontsize=9)
        ax.set_xlabel("inference r per block")
    axes[0][0].set_ylabel("test accuracy (%)")
    axes[0][0].legend(fontsize=8)
    return save_figure(fig, path)
