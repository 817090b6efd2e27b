"""The ``mmeff`` console script: ``mmeff list`` and ``mmeff bench``."""

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
    )
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
    b.add_argument("--json", default=None, help="write all results to this JSON file")
    b.add_argument("--cache-dir", default=None, help="where converted weights are cached (default $MMEFF_CACHE or ~/.cache/mmeff)")
    b.set_defaults(fn=_cmd_bench)
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
