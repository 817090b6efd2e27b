"""``mmeff tocom-train``: train a ToCom plug-in for a timm ViT by self-distillation on a folder of images."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import timm
import torch
from timm.data import create_transform, resolve_data_config
from torch.utils.data import DataLoader

from mmeff.datasets.images import ImageFiles
from mmeff.methods.tocom import ToCom
from mmeff.train.tocom import train_tocom


def _cmd_tocom_train(args: argparse.Namespace) -> int:
    kwargs = json.loads(args.model_kwargs) if args.model_kwargs else {}
    if args.checkpoint:
        if not Path(args.checkpoint).is_file():
            raise ValueError(f"--checkpoint {args.checkpoint} is not a file")
        kwargs["pretrained_cfg_overlay"] = {"file": args.checkpoint}
    model = timm.create_model(args.model, pretrained=bool(args.checkpoint), **kwargs)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model.to(device)
    cfg = resolve_data_config({}, model=model)
    img_size = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if img_size is not None:  # the pretrained cfg says 224 even when img_size was changed
        cfg["input_size"] = (3, *img_size)
    transform = create_transform(**cfg, is_training=True)
    loader = DataLoader(
        ImageFiles(args.data, transform),
        batch_size=args.batch_size,
        shuffle=True,
        num_workers=args.workers,
        drop_last=True,
        generator=torch.Generator().manual_seed(args.seed),
    )
    tocom = ToCom.for_model(model, steps=args.steps, step_rank=args.step_rank, scale=args.scale)
    tocom = train_tocom(
        model,
        loader,
        tocom=tocom,
        r_max=args.r_max,
        epochs=args.epochs,
        lr=args.lr,
        weight_decay=args.weight_decay,
        tau=args.tau,
        recipe=args.recipe,
        drop_path=args.drop_path,
        out_dir=args.out,
        resume=not args.no_resume,
        seed=args.seed,
    )
    print(json.dumps({"checkpoint": str(Path(args.out) / "tocom.safetensors"), "history": tocom.history}, indent=2))
    return 0


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``mmeff tocom-train`` to ``build_parser``'s sub-parsers."""
    t = sub.add_parser("tocom-train", help="train a ToCom plug-in for a timm ViT by self-distillation on a folder of images")
    t.add_argument("--model", required=True, help="timm model name, e.g. deit_base_patch16_224")
    t.add_argument("--checkpoint", default=None, help="local weights file of the backbone (nothing is downloaded)")
    t.add_argument("--model-kwargs", default=None, help="JSON keyword arguments for timm.create_model")
    t.add_argument("--data", required=True, help="folder of images (any layout, e.g. ImageNet train/; labels unused)")
    t.add_argument("--out", required=True, help="folder for tocom.safetensors and train_state.pt (resumed if present)")
    t.add_argument("--epochs", type=int, default=10)
    t.add_argument("--batch-size", type=int, default=128)
    t.add_argument("--recipe", choices=("official", "mmeff"), default="official",
                   help="official: ToCom's (train mode, drop path 0.1, cosine 2e-3 -> 1e-5, per-logit KL); "
                        "mmeff: eval mode, constant 1e-3, per-image KL")
    t.add_argument("--lr", type=float, default=None, help="peak learning rate (default: the recipe's)")
    t.add_argument("--drop-path", type=float, default=None, help="stochastic depth at the last block while "
                                                                    "training (default: the recipe's)")
    t.add_argument("--weight-decay", type=float, default=0.05)
    t.add_argument("--steps", type=int, default=16, help="rank chunks = largest ToMe r the plug-in covers")
    t.add_argument("--step-rank", type=int, default=2, help="rank per chunk (ToCom: 2)")
    t.add_argument("--r-max", type=int, default=None, help="largest r sampled in training (default: --steps)")
    t.add_argument("--scale", type=float, default=0.1, help="delta scale while training")
    t.add_argument("--tau", type=float, default=1.0, help="distillation temperature")
    t.add_argument("--workers", type=int, default=2, help="data-loading processes")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    t.add_argument("--no-resume", action="store_true", help="ignore a checkpoint already in --out")
    t.set_defaults(fn=_cmd_tocom_train)
    return t
