"""The ``mmeff`` console script: ``mmeff list``, ``mmeff bench`` and ``mmeff finetune``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def _cmd_list(args: argparse.Namespace) -> int:
    import mmeff
    from mmeff.adapters import list_adapters
    from mmeff.core import get_reducer_class

    print("reducers:")
    for name in mmeff.list_reducers():
        doc = (get_reducer_class(name).__doc__ or "").strip().splitlines()[0]
        print(f"  {name:<12} {doc}")
    print("adapters:")
    for name, desc in list_adapters():
        print(f"  {name:<12} {desc}")
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from mmeff.bench import run_bench

    methods = [m.strip() for m in args.methods.split(",")] if args.methods else None
    run_bench(
        args.model,
        media=args.media,
        budget_ratio=args.ratio,
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

    from mmeff.bench_inputs import load_bench_model
    from mmeff.core import create_reducer
    from mmeff.finetune import finetune, llava_sft_batches, load_llava_json

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


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for tests and docs)."""
    from mmeff.bench import DEFAULT_QUESTION

    p = argparse.ArgumentParser(prog="mmeff", description="Cheaper vision-language models: methods, adapters, benchmarks.")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="list registered methods and model adapters").set_defaults(fn=_cmd_list)
    b = sub.add_parser("bench", help="run every method on a model with a real image and video; print a table")
    b.add_argument("--model", default="default",
                   help="'default' (embedded LLaVA + SmolLM2-135M), 'tiny-llava', 'tiny-qwen2-vl', or a local checkpoint path / hub id")
    b.add_argument("--media", default="both", choices=["image", "video", "both"])
    b.add_argument("--ratio", type=float, default=0.25, help="visual-token budget as a fraction of the encoder's tokens")
    b.add_argument("--methods", default=None, help="comma-separated subset of methods (default: all registered)")
    b.add_argument("--question", default=DEFAULT_QUESTION)
    b.add_argument("--frames", type=int, default=4, help="frames sampled from the bundled mp4 for the video run")
    b.add_argument("--decode-tokens", type=int, default=8, help="decode steps timed per repeat")
    b.add_argument("--answer-tokens", type=int, default=16, help="greedy tokens compared with the unreduced model")
    b.add_argument("--repeats", type=int, default=3, help="timed repeats after one warm-up (median reported)")
    b.add_argument("--stage", default=None, choices=["pre_projector", "post_projector"],
                   help="run every method at this stage (default: each method where its paper runs it)")
    b.add_argument("--json", default=None, help="write all results to this JSON file")
    b.add_argument("--cache-dir", default=None, help="where converted weights are cached (default $MMEFF_CACHE or ~/.cache/mmeff)")
    b.set_defaults(fn=_cmd_bench)

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
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``mmeff`` console script."""
    args = build_parser().parse_args(argv)
    if hasattr(args, "ratio") and not 0 < args.ratio <= 1:
        print(f"mmeff: --ratio must be in (0, 1], got {args.ratio}", file=sys.stderr)
        return 2
    try:
        return int(args.fn(args))
    except ValueError as e:  # bad input: a readable message, not a traceback
        print(f"mmeff: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
