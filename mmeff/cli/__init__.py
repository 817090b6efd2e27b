"""The ``mmeff`` console script; ``build_parser`` assembles one sub-parser per command group."""

from mmeff.cli.eval import FREEVIDEO_RELEASED
from mmeff.cli.main import build_parser, main

__all__ = ["FREEVIDEO_RELEASED", "build_parser", "main"]
