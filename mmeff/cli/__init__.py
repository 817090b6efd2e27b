"""The ``mmeff`` console script; ``build_parser`` assembles one sub-parser per command group."""

from mmeff.cli.main import build_parser, main

__all__ = ["build_parser", "main"]
