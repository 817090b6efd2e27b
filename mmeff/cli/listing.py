"""``mmeff list``: the library's catalogue, every entry of the one registry, kind by kind.

``mmeff.core.catalogue`` holds what the modules registered when they were imported; ``import mmeff``,
which runs before any ``mmeff.cli`` module, imports every module that registers something.
"""

from __future__ import annotations

import argparse

from mmeff.adapters import host_table
from mmeff.core import KINDS, catalogue

#: the line that opens each kind's section (reducers, presses and adapters as ``mmeff list`` always printed)
HEADINGS = {
    "reducer": "reducers:",
    "in-tower method": "in-tower methods (run inside the vision tower; mmeff.apply(model, method)):",
    "press": "KV-cache presses:",
    "quantizer": "quantizers:",
    "model": "models (mmeff.create_model; the mini family also: mmeff bench --model NAME, 'default' is mmeff-mini):",
    "adapter": "adapters:",
}


def catalogue_lines() -> list[str]:
    """``mmeff list``'s output: per kind of :data:`mmeff.core.KINDS` its heading, then one indented
    ``name  summary`` line per entry (``(none registered)`` for an empty kind)."""
    entries = catalogue()
    width = max([12, *(len(e.name) for e in entries)])
    lines: list[str] = []
    for kind in KINDS:
        lines.append(HEADINGS.get(kind, f"{kind}s:"))
        of_kind = [e for e in entries if e.kind == kind]
        lines += [f"  {e.name:<{width}} {e.summary}".rstrip() for e in of_kind] or ["  (none registered)"]
    return lines + host_lines()


def host_lines() -> list[str]:
    """The VLM host table: every transformers class mmeff knows, the adapter serving it (where methods run,
    what is refused) or ``refused`` with the reason."""
    rows = host_table()
    width = max(len(c) for c, _, _ in rows)
    lines = ["VLM hosts (transformers classes; mmeff.apply(model, method) picks the adapter):"]
    for cls, adapter, notes in rows:
        lines.append(f"  {cls:<{width}} {adapter:<10} {notes}".rstrip())
    return lines


def _cmd_list(args: argparse.Namespace) -> int:
    print("\n".join(catalogue_lines()))
    return 0


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``mmeff list`` to ``build_parser``'s sub-parsers."""
    ls = sub.add_parser("list", help="list registered methods and model adapters")
    ls.set_defaults(fn=_cmd_list)
    return ls
