"""Argument helpers shared by the command modules of the ``mmeff`` console script."""

from __future__ import annotations


def comma_list(text: str) -> list[str]:
    """The non-empty, stripped items of a comma-separated option value (``"a, b,,c"`` -> ``[a, b, c]``)."""
    return [t.strip() for t in text.split(",") if t.strip()]
