"""``mmeff video train|eval``: SqueezeTime video recognition on a Kinetics-style folder."""

from __future__ import annotations

import argparse
import json
import os

from torch import nn

from mmeff.checkpoint import load_state
from mmeff.models.squeezetime import create_model, load_checkpoint
from mmeff.train.videocls import TrainConfig, VideoFolder, evaluate, train


def _video_model(args: argparse.Namespace, num_classes: int) -> nn.Module:
    model = create_model(args.model, num_classes=num_classes, num_frames=args.frames, img_size=args.size)
    if args.pretrained:
        load_checkpoint(model, args.pretrained, skip_mismatched=args.task == "train")
    return model


def _cmd_video(args: argparse.Namespace) -> int:
    if args.task == "train":
        views = {"recipe": args.recipe, "frame_interval": args.frame_interval}
        train_set = VideoFolder(args.data, args.frames, args.size, train=True, **views)
        val_set = (VideoFolder(args.val, args.frames, args.size, train=False, clips=args.clips, crops=args.crops,
                               classes=train_set.classes, **views) if args.val else None)
        model = _video_model(args, len(train_set.classes))
        cfg = TrainConfig(epochs=args.epochs, batch_size=args.batch_size,
                          lr=args.lr if args.lr is not None else 0.015 / 64 * args.batch_size,
                          workers=args.workers, seed=args.seed, decay_all=args.recipe == "official")
        hist = train(model, train_set, args.out, cfg, val_set=val_set, resume=not args.no_resume)
        if int(os.environ.get("RANK", "0")) == 0:  # under torchrun every rank returns here; one report
            print(json.dumps(hist["epochs"][-1] if hist["epochs"] else {}, indent=1))
        return 0
    test_set = VideoFolder(args.data, args.frames, args.size, train=False, clips=args.clips, crops=args.crops,
                           recipe=args.recipe, frame_interval=args.frame_interval)
    model = _video_model(args, len(test_set.classes))
    if args.checkpoint:
        state = load_state(args.checkpoint)  # weights_only: a checkpoint from elsewhere cannot run code
        model.load_state_dict(state["model"] if "model" in state else state)
    print(json.dumps(evaluate(model, test_set, batch_size=args.batch_size), indent=1))
    return 0


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``mmeff video`` (tasks train and eval) to ``build_parser``'s sub-parsers."""
    vd = sub.add_parser("video", help="video recognition (SqueezeTime) on a Kinetics-style folder root/<class>/<clip>.mp4")
    vtasks = vd.add_subparsers(dest="task", required=True)
    for task, text in (("train", "train (resumes from --out/last.pt; DDP under torchrun)"),
                       ("eval", "multi-clip x multi-crop top-1 / top-5")):
        vp = vtasks.add_parser(task, help=text)
        vp.add_argument("--data", required=True, help="folder of class sub-folders with videos")
        vp.add_argument("--model", default="squeezetime_k400", help="a SqueezeTime configuration (mmeff.list_models())")
        vp.add_argument("--frames", type=int, default=16, help="frames per clip (the stem is built for it)")
        vp.add_argument("--size", type=int, default=224, help="crop size in pixels")
        vp.add_argument("--clips", type=int, default=10, help="test clips per video (consecutive windows)")
        vp.add_argument("--crops", type=int, default=3, choices=[1, 3], help="test crops per clip (3: ThreeCrop)")
        vp.add_argument("--batch-size", type=int, default=8)
        vp.add_argument("--recipe", choices=("official", "mmeff"), default="official",
                        help="official: SqueezeTime's K400 pipeline (frames --frame-interval apart, MultiScaleCrop, "
                             "ColorJitter, RandomErasing, decay on all weights); mmeff: segment midpoints, random "
                             "resized crop (mmeff.train.videocls)")
        vp.add_argument("--frame-interval", type=int, default=4, help="official recipe: frames between samples")
        vp.add_argument("--pretrained", default=None,
                        help="local checkpoint to start from (own or official names; train skips shape mismatches, "
                        "naming them)")
        if task == "train":
            vp.add_argument("--val", default=None, help="validation folder (evaluated every epoch; best.pt kept)")
            vp.add_argument("--out", required=True, help="checkpoints (last.pt, best.pt) and history.json")
            vp.add_argument("--epochs", type=int, default=100)
            vp.add_argument("--lr", type=float, default=None, help="default: 0.015 per 64 clips, scaled to the batch")
            vp.add_argument("--workers", type=int, default=4, help="decoding worker processes")
            vp.add_argument("--seed", type=int, default=0)
            vp.add_argument("--no-resume", action="store_true", help="start over even if --out/last.pt exists")
        else:
            vp.add_argument("--checkpoint", default=None, help="a last.pt / best.pt from mmeff video train")
        vp.set_defaults(fn=_cmd_video)
    return vd
