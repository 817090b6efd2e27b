"""``mmeff finetune``: fine-tune a LLaVA model with a token reducer in place on LLaVA-format JSON data."""

from __future__ import annotations

import argparse
from pathlib import Path

from mmeff.bench.inputs import load_bench_model
from mmeff.core import create_reducer
from mmeff.train.finetune import finetune, llava_sft_batches, load_llava_json


def _cmd_finetune(args: argparse.Namespace) -> int:
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


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``mmeff finetune`` to ``build_parser``'s sub-parsers."""
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
    return f
