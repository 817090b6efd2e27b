"""`mmeff mini train`: the whole recipe of the grounded mmeff-mini, resumable stage by stage.

From the shipped dual encoder's image tower: three dense-tower phases
(:func:`mmeff.train.grounding.train_tower`), cached features of generated training pictures, the projector
aligned to the LM's word embeddings, the projector + LM with a one-object curriculum
(:func:`mmeff.train.grounding.train_lm`), then the weights file, the held-out check with a blank-image
control, the manifest record and a plot of the curves.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open

from mmeff.checkpoint import file_sha256
from mmeff.datasets.scenes import IMAGE_KINDS, VIDEO_KINDS
from mmeff.eval.plotting import pyplot, save_figure
from mmeff.eval.scenes import accuracy_by_kind, answer_scenes, heldout_items
from mmeff.models.mini import HELDOUT_SEED, WEIGHT_FILES, create_clip, load_hf_vision
from mmeff.models.mini_vlm import load_vlm, mini_tokenizer, new_vlm, save_vlm
from mmeff.train.grounding import (
    LMTrainConfig,
    TowerTrainConfig,
    build_pool,
    probe_tower,
    train_lm,
    train_tower,
)
from mmeff.train.mini import device_name

__all__ = ["MiniRecipe", "default_tower_phases", "train_mini", "plot_training"]


def default_tower_phases() -> list[TowerTrainConfig]:
    """The shipped tower schedule: every head for 1,600 steps; 2,000 more steps without the per-shape counts
    (shape, which the binding questions need, was still near chance per patch and the counts' noise held it
    back); then 1,000 steps of every head again at a lower rate, once shape is readable."""
    return [TowerTrainConfig(steps=1600, workers=1, seed=1234),
            TowerTrainConfig(steps=2000, warmup_steps=20, workers=1, seed=4321, count_weight=0.0),
            TowerTrainConfig(steps=1000, lr=5e-4, warmup_steps=20, workers=1, seed=5678)]


@dataclass
class MiniRecipe:
    """Everything :func:`train_mini` does, recorded in the manifest."""

    tower: list[TowerTrainConfig] = field(default_factory=lambda: default_tower_phases())
    lm: LMTrainConfig = field(default_factory=LMTrainConfig)
    pool_images: int = 10000
    pool_videos: int = 3000
    pool_single: int = 3000
    pool_seed: int = 4321
    hidden: int = 192
    layers: int = 4
    heads: int = 6


def train_mini(out: str | Path, recipe: MiniRecipe, *, eval_per_kind: int = 40, time_limit: float | None = None,
               lm_stop_at: int | None = None, init_from: str | Path | None = None,
               progress: bool = True) -> dict[str, Any]:
    """Train the grounded mmeff-mini into ``out`` from the shipped dual encoder's image tower: the tower
    phases (``out/tower<k>/``), the feature pools, the projector + LM (``out/lm/``), then
    ``out/mmeff-mini-vlm.safetensors`` and its part of ``out/manifest.json`` (recipe, curves, seconds,
    hardware, held-out accuracy with a blank-image control). Every stage resumes where it stopped;
    ``time_limit`` (seconds) pauses the LM stage, and a second call continues it. ``init_from`` (a weights
    file :func:`save_vlm` wrote, e.g. the shipped one) starts from its tower, projector and LM instead: the
    tower phases and the projector's fresh start are skipped, and the LM stage runs its own schedule."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    tokenizer = mini_tokenizer()
    tower_logs: list[dict[str, Any]] = []
    start: dict[str, Any] | None = None
    if init_from is not None:
        model = load_vlm(init_from, tokenizer)
        start = {"file": Path(init_from).name, "sha256": file_sha256(init_from)}
        (out / "lm").mkdir(exist_ok=True)
        if not (out / "lm" / "vocab.json").is_file():  # the rows the file trained are the vocabulary
            with safe_open(str(init_from), framework="pt") as f:
                ids = f.get_tensor("embed.ids").tolist()
            (out / "lm" / "vocab.json").write_text(json.dumps(ids))
        tower = model.model.vision_tower
    else:
        model = new_vlm(tokenizer, recipe.hidden, recipe.layers, recipe.heads)
        tower = model.model.vision_tower
        load_hf_vision(tower, create_clip("shipped").visual)
        for k, cfg in enumerate(recipe.tower, 1):
            hist = train_tower(tower, out / f"tower{k}", cfg, progress=progress)
            tower_logs.append({"config": asdict(cfg), "log": hist["log"], "train_seconds": hist.get("train_seconds")})
    probe = probe_tower(tower)
    if progress:
        print(f"tower: per-patch linear read-out on held-out scenes {json.dumps(probe)}", flush=True)
    images = build_pool(tower, recipe.pool_images, video=False, seed=recipe.pool_seed, progress=progress)
    videos = build_pool(tower, recipe.pool_videos, video=True, seed=recipe.pool_seed, progress=progress)
    single = build_pool(tower, recipe.pool_single, video=False, seed=recipe.pool_seed, progress=progress,
                        single=True) if recipe.lm.single_steps else None
    res = train_lm(model, tokenizer, images, videos, out / "lm", recipe.lm, progress=progress,
                   time_limit=time_limit, single=single, stop_at=lm_stop_at, fresh_projector=start is None)
    del images, videos, single
    done = int(res["history"]["step"]) >= recipe.lm.steps
    path = save_vlm(model, res["vocab"], out / WEIGHT_FILES["vlm"])
    model = load_vlm(path, tokenizer)
    items = heldout_items(eval_per_kind)
    acc = accuracy_by_kind(answer_scenes(model, tokenizer, items, batch_size=16, progress=progress))
    blank = [dict(it, frames=[np.full_like(f, 90) for f in it["frames"]]) for it in items]
    acc_blank = accuracy_by_kind(answer_scenes(model, tokenizer, blank, batch_size=16))
    manifest_file = out / "manifest.json"
    manifest = json.loads(manifest_file.read_text()) if manifest_file.is_file() else {}
    manifest.setdefault("files", {})[path.name] = {"sha256": file_sha256(path), "bytes": path.stat().st_size}
    manifest["vlm"] = {
        "complete": done,
        "lm_step": int(res["history"]["step"]),  # of recipe.lm.steps: a paused run says where it stopped
        "init_from": start,  # None: the tower phases above, from the dual encoder's image tower
        "command": "mmeff mini train --out DIR (recipe: mmeff.train.grounding.MiniRecipe defaults)",
        "recipe": asdict(recipe),
        "trained_on": device_name(torch.device("cpu")),
        "torch": torch.__version__,
        "seconds_this_call": time.perf_counter() - t0,
        "tower": tower_logs,
        "tower_probe": probe,
        "lm": {"log": res["history"]["log"], "train_seconds": res["history"].get("train_seconds"),
               "vocab": len(res["vocab"]), "heldout_curve": res["curve"]},
        "heldout_accuracy": {"n_per_kind": eval_per_kind, "seed": HELDOUT_SEED, **acc},
        "heldout_accuracy_blank": {"n_per_kind": eval_per_kind, **acc_blank},
    }
    tmp = manifest_file.with_name("manifest.json.tmp")
    tmp.write_text(json.dumps(manifest, indent=1))
    tmp.replace(manifest_file)
    plot_training(manifest["vlm"], out / "training_curves.png")
    if progress:
        print("held-out accuracy:", json.dumps({k: round(v, 3) for k, v in acc.items()}))
        print("blank images:", json.dumps({k: round(v, 3) for k, v in acc_blank.items()}))
    return manifest


def plot_training(record: dict[str, Any], path: str | Path) -> Path:
    """The recipe's curves from a manifest's ``"vlm"`` record: the tower's per-head losses over its phases
    (left) and the LM's answer loss and held-out accuracy per question kind against steps (right)."""
    plt = pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.2))
    offset = 0
    for k, phase in enumerate(record["tower"], 1):
        steps = [offset + e["step"] for e in phase["log"]]
        for head, style in (("shape", "-"), ("colour", "--"), ("cell", ":"), ("n_all", "-.")):
            ax1.plot(steps, [e[head] for e in phase["log"]], style, color=f"C{k - 1}",
                     label=f"{head} (phase {k})" if head in ("shape",) or k == 1 else None)
        offset = steps[-1] if steps else offset
    ax1.set_yscale("log")
    ax1.set_xlabel("tower step (batch 32)")
    ax1.set_ylabel("per-patch cross-entropy")
    ax1.set_title("dense tower: shape (-), colour (--), cell (:), object count (-.)")
    ax1.legend(fontsize=7)
    curve = record["lm"]["heldout_curve"]
    steps = [c["step"] for c in curve]
    for i, kind in enumerate((*IMAGE_KINDS, *VIDEO_KINDS)):
        ax2.plot(steps, [100 * c.get(kind, float("nan")) for c in curve], lw=1, color=f"C{i}", label=kind)
    ax2.plot(steps, [100 * c["all"] for c in curve], lw=3, color="black", label="all")
    ax2.axhline(25, color="grey", ls=":", lw=1)
    ax2.set_xlabel("LM step")
    ax2.set_ylabel(f"held-out accuracy (%), {record['recipe']['lm']['eval_per_kind']} per kind")
    ax2.set_title("projector + LM from scratch (chance 25%, dotted)")
    ax2.legend(fontsize=7, ncol=2)
    return save_figure(fig, path)
