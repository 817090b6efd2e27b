"""``mmeff eval videoqa``: a model (with a token reducer) on a video question-answering benchmark."""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
from pathlib import Path
from typing import Any

import torch

from mmeff.adapters import find_adapter
from mmeff.bench.inputs import BUILTIN_MODELS, load_bench_model
from mmeff.core import TokenReducer, create_reducer
from mmeff.datasets import videoqa
from mmeff.datasets.scenes import scene_videoqa
from mmeff.datasets.videoqa import VideoQASample
from mmeff.eval.answers import judge_open
from mmeff.eval.results import format_report, resolve_shard
from mmeff.eval.videoqa import evaluate, llava_predictor, load_vlm
from mmeff.methods.freevideo import ClipScorer, FreeVideoConfig, FreeVideoLLM
from mmeff.models.mini import FREEVIDEO_SCENES, HELDOUT_SEED, clip_scorer

#: Free Video-LLM's released path string (7B LLaVA on full-length videos); scenes use ``FREEVIDEO_SCENES``
FREEVIDEO_RELEASED = "slow_3frms_spatial_1d_max_pool_roi8-middle_5frms_spatial_1d_max_pool_24x12-fast_50frms_4x4"


def _samples(args: argparse.Namespace) -> list[VideoQASample]:
    if args.frames is None:  # mmeff-mini was trained on 4-frame scene videos
        args.frames = 4 if args.data == "scenes" else 8
    if args.frames < 1 or args.batch_size < 1 or args.max_new_tokens < 1:
        raise ValueError("--frames, --batch-size and --max-new-tokens must be >= 1")
    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit must be >= 1, got {args.limit}")
    out = Path(args.out)
    if args.data == "scenes":
        samples = scene_videoqa(out.parent / "scenes", seed=HELDOUT_SEED, n=args.limit or 60)
    elif args.data == "synthetic":
        samples = list(videoqa.synthetic_videoqa(out.parent / "synthetic"))
        samples = samples[: args.limit] if args.limit is not None else samples
    else:
        if args.annotations is None or args.video_root is None:
            raise ValueError(f"--data {args.data} needs --annotations and --video-root")
        samples = list(videoqa.load_videoqa(args.data, args.annotations, args.video_root, limit=args.limit))
    if not samples:
        raise ValueError("no samples to evaluate")
    return samples


def _reducer(args: argparse.Namespace) -> TokenReducer | None:
    reducer = None
    if args.method == "freevideo":
        if args.freevideo is None:  # 4-frame scene videos on an 8x8 grid need far smaller paths than 7B LLaVA
            args.freevideo = FREEVIDEO_SCENES if args.data == "scenes" else FREEVIDEO_RELEASED
        cfg = FreeVideoConfig.from_official(args.freevideo, faithful=args.faithful)
        if args.clip_model == "mmeff-mini-clip" and args.clip_pretrained is None:
            scorer = clip_scorer()
        else:
            if args.clip_pretrained is None:
                print(f"mmeff: warning: --clip-pretrained not given: {args.clip_model} scores frames with random "
                      "weights", file=sys.stderr)
            scorer = ClipScorer.from_open_clip(args.clip_model, pretrained=args.clip_pretrained)
        reducer = FreeVideoLLM(cfg, scorer=scorer)
    elif args.method != "none":
        budget = {"tokens": args.tokens} if args.tokens is not None else {"ratio": args.ratio}
        try:
            reducer = create_reducer(args.method, **budget)
        except KeyError as e:
            raise ValueError(e.args[0]) from None
    return reducer


def _run_config(args: argparse.Namespace, info: dict[str, Any], reducer: TokenReducer | None) -> dict[str, Any]:
    # everything that changes the answers goes in every row, so resuming --out under another run is refused
    def where(path: str | None) -> str | None:
        return None if path is None else str(Path(path).resolve())

    run_config = {
        "model": info.get("name", args.model),
        # a hub id stays itself (resolving it as a path would name a folder that does not exist)
        "model_arg": args.model if args.model == "default" or (
            args.model not in BUILTIN_MODELS and not Path(args.model).expanduser().exists()) else where(args.model),
        "method": reducer.describe() if reducer else "none", "stage": args.stage, "frames": args.frames,
        "budget": None if args.method in ("none", "freevideo") else
        ({"tokens": args.tokens} if args.tokens is not None else {"ratio": args.ratio}),
        "freevideo": {"path": args.freevideo, "faithful": args.faithful, "clip_model": args.clip_model,
                      "clip_pretrained": where(args.clip_pretrained)} if args.method == "freevideo" else None,
        "max_new_tokens": args.max_new_tokens, "data": args.data, "annotations": where(args.annotations),
        "video_root": where(args.video_root), "judge_model": args.judge_model if args.judge_url else None,
    }
    if args.data == "scenes":
        run_config["seed"] = HELDOUT_SEED
    return run_config


def _load_model(args: argparse.Namespace) -> tuple[torch.nn.Module, Any, dict[str, Any]]:
    """The model, its processor and info for ``--model``: the built-in names as ``mmeff bench`` loads them;
    anything else (a local folder or a hub id) as any HF image-text-to-text model with its processor,
    refused in one line when no mmeff adapter serves its class (methods could not attach to it)."""
    if args.model in BUILTIN_MODELS:
        model, tok, info = load_bench_model(args.model, cache_dir=args.cache_dir)
        if tok is None:
            raise ValueError(f"mmeff eval videoqa needs a model with a processor; {args.model!r} is a random "
                             f"{type(model).__name__} without one")
        return model, tok, info
    model, tok, info = load_vlm(args.model)
    try:
        find_adapter(model)
    except TypeError as e:
        raise ValueError(f"mmeff eval videoqa: {args.model!r}: {e}") from None
    return model, tok, info


def _cmd_eval_videoqa(args: argparse.Namespace) -> int:
    samples = _samples(args)
    out = Path(args.out)
    reducer = _reducer(args)
    model, tok, info = _load_model(args)
    # LOCAL_RANK picks the GPU of this process; the shard comes from RANK / WORLD_SIZE
    device = args.device or (f"cuda:{os.environ.get('LOCAL_RANK', '0')}" if torch.cuda.is_available() else "cpu")
    model.to(device)
    rank, world_size = resolve_shard()
    started_group = False
    if world_size > 1 and "MASTER_ADDR" in os.environ and torch.distributed.is_available() \
            and not torch.distributed.is_initialized():
        # only a barrier is needed (rank 0 merges the shards), which gloo does on any device
        torch.distributed.init_process_group("gloo")
        started_group = True
    judge = None
    if args.judge_url:
        judge = functools.partial(judge_open, url=args.judge_url, model=args.judge_model, timeout=args.judge_timeout)
    options = {"stage": args.stage} if args.stage else {}
    # the processor's chat template lays out the prompt: the frames as one video where the processor takes
    # videos, one contiguous run of frame tokens on LLaVA
    predict = llava_predictor(model, tok, reducer=reducer, num_frames=args.frames, max_new_tokens=args.max_new_tokens,
                              **options)
    # with a process group, rank 0 merges the shards and reports on everything; without one each rank
    # reports on its own shard (join them later with mmeff.eval.videoqa.merge_results)
    merged = world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized()
    run_config = _run_config(args, info, reducer)
    try:
        report = evaluate(samples, predict, out, batch_size=args.batch_size, resume=not args.no_resume,
                          rank=rank, world_size=world_size, judge=judge, config=run_config)
    finally:
        if started_group:
            torch.distributed.destroy_process_group()
    if rank == 0 or not merged:
        shard = f"; shard {rank} of {world_size}" if world_size > 1 and not merged else ""
        print(f"model: {info.get('name', args.model)}; method: {reducer.describe() if reducer else 'none'}; "
              f"{args.frames} frames/video; data: {args.data} ({len(samples)} samples{shard})")
        print(format_report(report))
        if args.json:
            # the method and model travel with the numbers, so `mmeff report` can label a set of such files
            payload = {"method": reducer.describe() if reducer else "none", "model": info.get("name", args.model),
                       "frames": args.frames, **report.as_dict()}
            Path(args.json).write_text(json.dumps(payload, indent=2))
            print(f"wrote {args.json}")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``mmeff eval`` (task videoqa) to ``build_parser``'s sub-parsers."""
    e = sub.add_parser("eval", help="evaluate a model (with a method) on a benchmark")
    tasks = e.add_subparsers(dest="task", required=True)
    v = tasks.add_parser("videoqa", help="video question answering: accuracy, visual tokens and latency per video")
    v.add_argument("--model", default="default",
                   help="'default', an mmeff-mini name, or any HF image-text-to-text model mmeff has an adapter for "
                   "(LLaVA, LLaVA-NeXT, Qwen2-VL/2.5/3, Gemma3, Idefics3, InternVL): a local folder with its "
                   "processor, or a hub id")
    v.add_argument("--method", default="none",
                   help="registered reducer (freevideo: Free Video-LLM with an open_clip scorer), or 'none'")
    budget = v.add_mutually_exclusive_group()
    budget.add_argument("--tokens", type=int, default=None, help="visual-token budget per frame (default: --ratio)")
    budget.add_argument("--ratio", type=float, default=0.25, help="budget as a fraction of the encoder's tokens")
    v.add_argument("--stage", default=None, choices=["pre_projector", "post_projector"],
                   help="where the method runs (default: where its paper runs it)")
    v.add_argument("--frames", type=int, default=None,
                   help="frames sampled uniformly per video (or per clip window); default 4 for scenes, else 8")
    v.add_argument("--freevideo", default=None,
                   help="--method freevideo: the official path string (default: the released configuration, or for "
                   f"--data scenes {FREEVIDEO_SCENES})")
    v.add_argument("--faithful", action="store_true", help="--method freevideo: the official crop layout quirk")
    v.add_argument("--clip-model", default="mmeff-mini-clip",
                   help="--method freevideo: open_clip architecture of the scorer (default: mmeff-mini's trained "
                   "dual encoder; any other name needs --clip-pretrained for real weights)")
    v.add_argument("--clip-pretrained", default=None, help="--method freevideo: local open_clip checkpoint for the scorer")
    v.add_argument("--data", default="scenes",
                   help="'scenes' (held-out scene videos written under the --out folder: --limit of them, default 60), "
                   "'synthetic' (12 questions on the bundled real clips) or an annotation format: "
                        "msvd-qa, msrvtt-qa, activitynet-qa, tgif-qa, nextqa, videomme, mvbench")
    v.add_argument("--annotations", default=None, help="annotation file or folder of the --data format")
    v.add_argument("--video-root", default=None, help="folder holding the format's videos")
    v.add_argument("--out", default="results.jsonl",
                   help="results JSONL, one line per sample; rerunning resumes it (ranks write <out>.rank<r>-of-<w>.jsonl)")
    v.add_argument("--no-resume", action="store_true", help="start --out afresh instead of skipping ids already in it")
    v.add_argument("--batch-size", type=int, default=1, help="samples per generate call (left-padded)")
    v.add_argument("--limit", type=int, default=None, help="evaluate only the first N samples")
    v.add_argument("--max-new-tokens", type=int, default=32)
    v.add_argument("--judge-url", default=None,
                   help="local OpenAI-compatible server (e.g. http://127.0.0.1:8000) that grades open-ended answers")
    v.add_argument("--judge-model", default="judge", help="model name sent to the judge server")
    v.add_argument("--judge-timeout", type=float, default=60.0, help="seconds per judge request")
    v.add_argument("--device", default=None, help="torch device (default: cuda:$LOCAL_RANK if CUDA is available, else cpu)")
    v.add_argument("--json", default=None, help="also write the report to this JSON file")
    v.add_argument("--cache-dir", default=None, help="where converted weights are cached (default $MMEFF_CACHE or ~/.cache/mmeff)")
    v.set_defaults(fn=_cmd_eval_videoqa)
    return e
