"""``mmeff report``: bench/eval JSON files -> plots and a markdown table."""

from __future__ import annotations

import argparse

from mmeff.eval.report import write_report


def _cmd_report(args: argparse.Namespace) -> int:
    for path in write_report(args.files, args.out, args.title).values():
        print(f"wrote {path}")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``mmeff report`` to ``build_parser``'s sub-parsers."""
    rp = sub.add_parser("report", help="turn bench/eval JSON files into plots (accuracy and latency against "
                        "visual tokens) and a markdown table")
    rp.add_argument("files", nargs="+", help="JSON files written by mmeff bench / mmeff eval (--json)")
    rp.add_argument("--out", default="report", help="folder for report.md and the PNGs")
    rp.add_argument("--title", default="mmeff report")
    rp.set_defaults(fn=_cmd_report)
    return rp
