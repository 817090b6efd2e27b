"""``mmeff bench [SUITE]``: one handler per suite (scenes, tokens, sepllm, flatquant, tome, tocom, vistog,
squeezetime, ipt, cdt, eve), each a thin call into ``mmeff.bench.<suite>``."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

from transformers import AutoModelForCausalLM, AutoTokenizer

from mmeff.bench.cdt import run_cdt_bench
from mmeff.bench.eve import run_eve_bench
from mmeff.bench.ipt import run_ipt_bench
from mmeff.bench.kv import run_sepllm_bench, run_sepllm_study
from mmeff.bench.quant import run_flatquant_bench
from mmeff.bench.reduction import DEFAULT_QUESTION, run_bench
from mmeff.bench.scenes import DEFAULT_RATIOS, run_scenes_bench
from mmeff.bench.squeezetime import run_miniature, run_throughput
from mmeff.bench.tocom import run_tocom_bench
from mmeff.bench.tome import run_tome_bench
from mmeff.bench.vistog import run_vistog_bench
from mmeff.checkpoint import local_or_hub
from mmeff.cli.common import comma_list
from mmeff.train.sepllm import SepLLMTrainConfig


def _bench_scenes(args: argparse.Namespace) -> int:
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


def _bench_tokens(args: argparse.Namespace) -> int:
    if args.ratios is not None:
        raise ValueError(f"--ratios is for the scenes suite; the {args.suite} suite takes one --ratio")
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


def _bench_sepllm(args: argparse.Namespace) -> int:
    model = tokenizer = None
    if args.model != "default":
        ref = local_or_hub(args.model)
        model = AutoModelForCausalLM.from_pretrained(ref).eval()
        tokenizer = AutoTokenizer.from_pretrained(ref)
    if args.sweep:
        finetune = None
        if args.finetune_steps:
            finetune = SepLLMTrainConfig(steps=args.finetune_steps, lr=args.finetune_lr, min_lr=args.finetune_lr / 10,
                                         seq_len=args.finetune_seq_len, init_size=args.init_size,
                                         local_sizes=tuple(int(n) for n in comma_list(args.finetune_windows)))
        run_sepllm_study(
            model, tokenizer, finetune=finetune, baseline=args.sweep_baseline, json_path=args.json, plot_path=args.plot,
            cache_dir=args.cache_dir, tag="pretrained" if args.model == "default" else Path(args.model).name,
            budgets=[int(b) for b in comma_list(args.sweep_budgets)], init_size=args.init_size, rows=args.sweep_rows,
            length=args.sweep_length, shift_tokens=args.sweep_shift_tokens,
        )
        return 0
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


def _bench_flatquant(args: argparse.Namespace) -> int:
    load = None
    if args.model != "default":
        ref = local_or_hub(args.model)

        def load():  # a fresh copy per method: quantization is in place
            return AutoModelForCausalLM.from_pretrained(ref).eval(), AutoTokenizer.from_pretrained(ref)

    run_flatquant_bench(
        load,
        eval_tokens=args.tokens,
        budget=args.preset,
        samples=args.samples,
        calib_len=args.calib_len,
        epochs=args.epochs,
        weights=args.weights,
        json_path=args.json,
        plot_path=args.plot,
        cache_dir=args.cache_dir,
        **({"methods": tuple(comma_list(args.methods))} if args.methods else {}),
        **({"columns": tuple(comma_list(args.columns))} if args.columns else {}),
    )
    return 0


def _bench_tome(args: argparse.Namespace) -> int:
    try:
        rs = [int(v) for v in comma_list(args.tome_r)]
    except ValueError:
        raise ValueError(f"--tome-r takes comma-separated integers, got {args.tome_r!r}") from None
    run_tome_bench(
        comma_list(args.tome_models),
        rs,
        batch_size=args.tome_batch_size,
        dtype=args.tome_dtype,
        device=args.tome_device,
        warmup=args.tome_warmup,
        repeats=args.tome_repeats,
        latency_batch=args.tome_latency_batch,
        pretrained=comma_list(args.tome_pretrained) if args.tome_pretrained else None,
        out_dir=args.tome_out,
        json_path=args.json,
        plot_path=args.plot,
    )
    return 0


def _bench_tocom(args: argparse.Namespace) -> int:
    run_tocom_bench(
        pretrain_epochs=args.tocom_pretrain_epochs,
        finetune_epochs=args.tocom_finetune_epochs,
        tocom_epochs=args.tocom_epochs,
        tocom_recipe=args.tocom_recipe,
        tocom_lr=args.tocom_lr,
        tocom_drop_path=args.tocom_drop_path,
        out_dir=args.tocom_out,
        json_path=args.json or str(Path(args.tocom_out) / "tocom.json"),
        plot_path=args.plot or str(Path(args.tocom_out) / "tocom_accuracy.png"),
    )
    return 0


def _bench_squeezetime(args: argparse.Namespace) -> int:
    if args.squeezetime_part in ("miniature", "all"):
        for recipe in args.squeezetime_recipe.split(","):
            run_miniature(args.squeezetime_out, epochs=args.squeezetime_epochs, recipe=recipe.strip())
    if args.squeezetime_part in ("throughput", "all"):
        run_throughput(args.squeezetime_out, batch=args.squeezetime_batch, repeats=args.repeats)
    return 0


def _bench_ipt(args: argparse.Namespace) -> int:
    run_ipt_bench(args.ipt_out, steps=args.ipt_steps, batch_size=args.ipt_batch_size, rank=args.ipt_rank,
                  per_task_steps=args.ipt_per_task_steps, full_rank=not args.ipt_no_full_rank)
    return 0


def _bench_cdt(args: argparse.Namespace) -> int:
    run_cdt_bench(args.cdt_out, steps=args.cdt_steps, batch_size=args.cdt_batch_size, repeats=args.repeats)
    return 0


def _bench_eve(args: argparse.Namespace) -> int:
    run_eve_bench(args.eve_out, steps=[int(v) for v in args.eve_steps.split(",")],
                  batch_size=args.eve_batch_size, repeats=args.repeats)
    return 0


def _bench_vistog(args: argparse.Namespace) -> int:
    run_vistog_bench(
        comma_list(args.vistog_models),
        groups={m: [int(g) for g in args.vistog_groups.split(",")] for m in ("tiny-llava", "mmeff-mini")},
        config_groups=[int(g) for g in args.vistog_config_groups.split(",")],
        repeats=args.repeats, decode_tokens=args.decode_tokens, cache_dir=args.cache_dir,
        out_dir=args.vistog_out,
    )
    return 0


#: suite -> handler, in the order of ``--help``'s choices
SUITES: dict[str, Callable[[argparse.Namespace], int]] = {
    "scenes": _bench_scenes, "tokens": _bench_tokens, "sepllm": _bench_sepllm,
    "flatquant": _bench_flatquant, "tome": _bench_tome, "tocom": _bench_tocom,
    "vistog": _bench_vistog, "squeezetime": _bench_squeezetime, "ipt": _bench_ipt, "cdt": _bench_cdt,
    "eve": _bench_eve,
}


def _cmd_bench(args: argparse.Namespace) -> int:
    return SUITES[args.suite](args)


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``mmeff bench`` (every suite's options, grouped by suite) to ``build_parser``'s sub-parsers."""
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
                   choices=list(SUITES),
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
    kv.add_argument("--plot", default=None, help="sepllm: perplexity-along-the-stream curves; flatquant: the table as bars (PNG)")
    kv.add_argument("--device", default=None, help="torch device (default: where the model loads, CPU)")
    kv.add_argument("--sweep", action="store_true",
                    help="sepllm: the paper's protocol instead of the table: token by token (chunk 1), SepLLM at three "
                    "(sep, local) splits of each cache budget vs StreamingLLM at SepLLM's measured average KV, on "
                    "held-out text (masked dense forwards, checked against the real cache); --plot: the Pareto plot")
    kv.add_argument("--sweep-budgets", default="128,256,512", help="sepllm --sweep: comma-separated cache sizes")
    kv.add_argument("--sweep-rows", type=int, default=6, help="sepllm --sweep: held-out segments")
    kv.add_argument("--sweep-length", type=int, default=1280,
                    help="sepllm --sweep: tokens per segment (scored from the largest budget on)")
    kv.add_argument("--sweep-shift-tokens", type=int, default=512,
                    help="sepllm --sweep: tokens per segment of the real-cache, in-cache-position (streaming=True) run "
                    "at the smallest budget; 0 skips it")
    kv.add_argument("--sweep-baseline", default=None,
                    help="sepllm --sweep: take the first model's runs from this earlier --json instead of rerunning them")
    kv.add_argument("--finetune-steps", type=int, default=0,
                    help="sepllm --sweep: also fine-tune SmolLM2 with SepLLM's attention mask for this many steps (on the "
                    "first half of the text; cached in the model cache, never the repo) and sweep it (0: no; 100: ~30 min)")
    kv.add_argument("--finetune-lr", type=float, default=5e-5, help="sepllm --finetune-steps: peak learning rate")
    kv.add_argument("--finetune-seq-len", type=int, default=512, help="sepllm --finetune-steps: tokens per sequence")
    kv.add_argument("--finetune-windows", default="64,128,256",
                    help="sepllm --finetune-steps: local windows, one drawn per step")
    fq = b.add_argument_group("flatquant suite")
    fq.add_argument("--preset", default="cpu", choices=["cpu", "paper"],
                    help="calibration budget: cpu = 16 x 256 tokens, 3 epochs; paper = the official 128 x 2048, 15 epochs")
    fq.add_argument("--samples", type=int, default=None, help="calibration sequences (overrides --preset)")
    fq.add_argument("--calib-len", type=int, default=None, help="tokens per calibration sequence (overrides --preset)")
    fq.add_argument("--epochs", type=int, default=None, help="FlatQuant calibration epochs per layer (overrides --preset)")
    fq.add_argument("--columns", default=None,
                    help="comma-separated subset of W4A4,W4A4KV4,W4A8,W4A16 (default all; --methods picks rows: "
                    "RTN,GPTQ,QuaRot-style,FlatQuant)")
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
    tc.add_argument("--tocom-recipe", choices=("official", "mmeff"), default="official",
                    help="ToCom's training recipe (mmeff.train.tocom): official (train mode + drop path, cosine "
                         "lr, per-logit KL) or mmeff (eval mode, constant lr, per-image KL)")
    tc.add_argument("--tocom-lr", type=float, default=None, help="ToCom peak learning rate (default: the recipe's)")
    tc.add_argument("--tocom-drop-path", type=float, default=None,
                    help="drop path at the backbone's last block while training ToCom (default: the recipe's)")
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
                    help="folder for the clips, checkpoints and miniature_<recipe>.json (default: ./bench_squeezetime)")
    sq.add_argument("--squeezetime-epochs", type=int, default=12, help="training epochs of each model")
    sq.add_argument("--squeezetime-recipe", default="official",
                    help="training recipe(s) of the miniature, comma-separated: official, mmeff "
                         "(mmeff.train.videocls; 'official,mmeff' compares them)")
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
    return b
