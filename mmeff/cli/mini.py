"""``mmeff mini train``: regenerate the weights of the embedded mini VLM (mmeff-mini, or its SmolLM2 variant)."""

from __future__ import annotations

import argparse
import json
from dataclasses import replace

from mmeff.train.grounding import LMTrainConfig
from mmeff.train.mini import main_train_smollm
from mmeff.train.mini_recipe import MiniRecipe, default_tower_phases, train_mini


def _cmd_mini_train(args: argparse.Namespace) -> int:
    if args.variant == "smollm":
        manifest = main_train_smollm(
            args.out, device=args.device, clip_steps=args.clip_steps, clip_batch=args.clip_batch,
            llava_steps=args.llava_steps, llava_batch=args.llava_batch, video_batch=args.video_batch,
            workers=args.workers, eval_per_kind=args.eval_per_kind, cache_dir=args.cache_dir,
            skip_clip=args.skip_clip, time_limit=args.time_limit, continue_llava=args.continue_llava,
            align_steps=args.align_steps,
        )
        if "files" not in manifest:  # --llava-steps 0: only the dual encoder was trained
            print(json.dumps(manifest, indent=1))
            return 0
        print(json.dumps({k: manifest[k] for k in ("files", "trained_on", "heldout_accuracy")}, indent=1))
        return 0
    lm = LMTrainConfig() if args.lm_steps is None else LMTrainConfig(steps=args.lm_steps)
    recipe = MiniRecipe(tower=default_tower_phases(), lm=lm)
    if args.tower_steps is not None:
        recipe.tower = [replace(c, steps=s) for c, s in zip(recipe.tower, args.tower_steps)]
    if args.pool is not None:
        recipe.pool_images, recipe.pool_videos = args.pool
    manifest = train_mini(args.out, recipe, eval_per_kind=args.eval_per_kind, time_limit=args.time_limit,
                          lm_stop_at=args.lm_stop_at, init_from=args.init_from)
    v = manifest["vlm"]
    print(json.dumps({"files": manifest["files"], "complete": v["complete"], "heldout_accuracy": v["heldout_accuracy"],
                      "blank": v["heldout_accuracy_blank"]}, indent=1))
    return 0


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``mmeff mini`` (task train) to ``build_parser``'s sub-parsers."""
    mi = sub.add_parser("mini", help="the offline mini VLM (mmeff-mini): regenerate its weights")
    mtasks = mi.add_subparsers(dest="mini_task", required=True)
    mt = mtasks.add_parser("train", help="train mmeff-mini (resumable): the grounded default (dense tower, then a small "
                           "LM from scratch) or, --variant smollm, SmolLM2 + LoRA; writes weights + manifest.json to --out")
    mt.add_argument("--out", required=True, help="folder for the weights, checkpoints and manifest.json "
                    "(copy the safetensors files and manifest to mmeff/weights/ to make them the default)")
    mt.add_argument("--variant", default="grounded", choices=["grounded", "smollm"],
                    help="grounded: mmeff-mini (the default model); smollm: mmeff-mini-smollm (needs a GPU to learn)")
    mt.add_argument("--time-limit", type=float, default=None,
                    help="pause the LM (grounded) / LLaVA (smollm) stage after this many seconds; run again to go on")
    mt.add_argument("--eval-per-kind", type=int, default=40, help="held-out questions per kind for the final check")
    g = mt.add_argument_group("grounded variant")
    g.add_argument("--lm-steps", type=int, default=None, help="projector + LM steps (default: the shipped recipe's)")
    g.add_argument("--init-from", default=None,
                   help="start from this weights file (e.g. mmeff/weights/mmeff-mini-vlm.safetensors): no tower "
                   "phases, the LM stage trains on with its own schedule")
    g.add_argument("--lm-stop-at", type=int, default=None,
                   help="pause the LM stage at this step of its schedule (the weights and manifest say where it "
                   "stopped; run again without it to go on)")
    g.add_argument("--tower-steps", type=int, nargs=3, default=None, metavar=("PHASE1", "PHASE2", "PHASE3"),
                   help="steps of the three dense-tower phases (default: the shipped recipe's)")
    g.add_argument("--pool", type=int, nargs=2, default=None, metavar=("IMAGES", "VIDEOS"),
                   help="training pictures whose tower features are cached for the LM stage")
    s_ = mt.add_argument_group("smollm variant")
    s_.add_argument("--device", default="auto", help="torch device (auto: CUDA when available)")
    s_.add_argument("--clip-steps", type=int, default=3000, help="contrastive steps of the dual encoder")
    s_.add_argument("--clip-batch", type=int, default=256)
    s_.add_argument("--align-steps", type=int, default=200,
                    help="projector steps mapping visual tokens onto the words their patches show (no LM)")
    s_.add_argument("--llava-steps", type=int, default=3000,
                    help="projector + LoRA steps (1 in 3 a video batch); 0 trains only the dual encoder")
    s_.add_argument("--llava-batch", type=int, default=32, help="image questions per step")
    s_.add_argument("--video-batch", type=int, default=8, help="4-frame video questions per video step")
    s_.add_argument("--workers", type=int, default=None, help="data-rendering worker processes (default: cores - 2, at most 12)")
    s_.add_argument("--skip-clip", action="store_true", help="reuse the dual encoder already in --out")
    s_.add_argument("--continue", dest="continue_llava", action="store_true",
                    help="train the projector and LoRA on from the weights in --out (new questions; use with --skip-clip)")
    s_.add_argument("--cache-dir", default=None, help="where the SmolLM2 conversion is cached")
    mt.set_defaults(fn=_cmd_mini_train)
    return mi
