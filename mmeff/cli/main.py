"""The ``mmeff`` console script: :func:`build_parser` assembles one sub-parser per command group, each
from its module here (``mmeff list``: listing; ``bench``; ``tocom-train``: tocom; ``video``; ``ipt``;
``cdt``; ``eve``; ``mini``; ``finetune``; ``eval``; ``report``; ``demo``), and :func:`main` runs the
chosen command with the one-line error handling every command shares."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

import torch

from mmeff.cli import bench, cdt, demo, eve, finetune, ipt, listing, mini, report, tocom, video
from mmeff.cli import eval as evaluate
from mmeff.cli.eval import FREEVIDEO_RELEASED

__all__ = ["FREEVIDEO_RELEASED", "build_parser", "main"]

#: the command groups in the order ``mmeff --help`` lists them; each has ``add_parser(sub)``
COMMANDS = (listing, bench, tocom, video, ipt, cdt, eve, mini, finetune, evaluate, report, demo)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for tests and docs)."""
    p = argparse.ArgumentParser(prog="mmeff", description="Cheaper vision-language models: methods, adapters, benchmarks.")
    p.add_argument("--debug", action="store_true", help="show the traceback of a failure (also: MMEFF_DEBUG=1)")
    sub = p.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.add_parser(sub)
    return p


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
    if isinstance(device, str) and device.startswith("cuda") and not torch.cuda.is_available():
        return f"--device {device}: this machine has no CUDA GPU (torch {torch.__version__}); use --device cpu"
    return None


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``mmeff`` console script. Bad input, a missing or unreadable file, and any other
    failure end with one line on stderr (exit 2 for input the caller can fix, 1 otherwise, 130 on Ctrl-C);
    the traceback only with ``--debug`` or ``MMEFF_DEBUG=1``."""
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
