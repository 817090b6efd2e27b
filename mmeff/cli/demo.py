"""``mmeff demo``: start the Gradio app on localhost (Gradio itself is imported only when the app starts)."""

from __future__ import annotations

import argparse

from mmeff.demos import app


def _cmd_demo(args: argparse.Namespace) -> int:
    # app.main looked up at call time, so a test can stand in for the app
    return app.main(["--host", args.host, "--port", str(args.port), *(["--share"] if args.share else [])])


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``mmeff demo`` to ``build_parser``'s sub-parsers."""
    dm = sub.add_parser("demo", help="start the Gradio demo app (video QA, token maps, restoration, LLM backbone) "
                        "on localhost; needs the demo extra: pip install 'mmeff[demo]'")
    dm.add_argument("--host", default="127.0.0.1")
    dm.add_argument("--port", type=int, default=7860)
    dm.add_argument("--share", action="store_true", help="ask Gradio for a public link (needs internet)")
    dm.set_defaults(fn=_cmd_demo)
    return dm
