"""The layout's rules, checked on the source so they cannot quietly come back (issue 33).

* no import cycle among the package's modules, counting imports inside functions too;
* dependencies point one way: kernels -> core -> datasets/methods/kv/quant -> adapters -> api -> models ->
  eval -> train -> bench -> cli/demos (a module may import its own layer or lower ones, never higher);
* no module imports another module's private (``_name``) names;
* imports inside functions are for optional heavy dependencies, not for dodging cycles: at most a few
  of them name an mmeff module.

``python tests/test_architecture.py`` prints the figures (modules per folder, function-level imports,
largest files) that the README's architecture section quotes.
"""

from __future__ import annotations

import ast
import sys
from collections import Counter, defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# folder -> package it is installed as (pyproject's package-dir)
FOLDERS = {"mmeff": "mmeff", "kernels": "mmeff.kernels", "adapters": "mmeff.adapters", "datasets": "mmeff.datasets",
           "demos": "mmeff.demos"}
# layer of each top-level part of the package; a module may import only its own layer or lower ones
LAYERS: dict[str, int] = {
    "mmeff.kernels": 0, "mmeff.extras": 0,
    "mmeff.core": 1, "mmeff.checkpoint": 1, "mmeff.hfconfig": 1, "mmeff.hosts": 1, "mmeff.preprocess": 1,
    "mmeff.datasets": 2, "mmeff.methods": 2, "mmeff.kv": 2, "mmeff.quant": 2,
    "mmeff.adapters": 3,
    "mmeff.api": 4,
    "mmeff.models": 5,
    "mmeff.eval": 6,
    "mmeff.train": 7,
    "mmeff.bench": 8,
    "mmeff.cli": 9, "mmeff.demos": 9,
    "mmeff.deprecated": 10, "mmeff": 10,
}
# mmeff modules a function may import lazily, with the reason
LAZY_OK: dict[tuple[str, str], str] = {}


def modules() -> dict[str, Path]:
    """Module name -> file for every module of the installed package."""
    out: dict[str, Path] = {}
    for folder, package in FOLDERS.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            rel = path.relative_to(ROOT / folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            out[".".join([package, *parts])] = path
    return out


def layer(module: str) -> int:
    """The layer of ``module``: that of its longest registered prefix."""
    parts = module.split(".")
    for i in range(len(parts), 0, -1):
        key = ".".join(parts[:i])
        if key in LAYERS:
            return LAYERS[key]
    raise KeyError(f"{module} is in no layer; add its package to LAYERS")


def _type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imports(module: str, path: Path, known: dict[str, Path]) -> list[tuple[str, list[str], bool, int]]:
    """``(target module, imported names, inside a function, line)`` for every import of an mmeff module."""
    tree = ast.parse(path.read_text(), str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out: list[tuple[str, list[str], bool, int]] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _type_checking(child):
                continue
            nested = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                for alias in child.names:
                    if alias.name == "mmeff" or alias.name.startswith("mmeff."):
                        out.append((alias.name, [], in_function, child.lineno))
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = package.split(".")
                    base = base[: len(base) - child.level + 1]
                    source = ".".join(base + ([child.module] if child.module else []))
                else:
                    source = child.module or ""
                if source == "mmeff" or source.startswith("mmeff."):
                    names = [a.name for a in child.names]
                    subs = [f"{source}.{n}" for n in names if f"{source}.{n}" in known]
                    rest = [n for n in names if f"{source}.{n}" not in known]
                    for s in subs:
                        out.append((s, [], in_function, child.lineno))
                    if rest:
                        out.append((source, rest, in_function, child.lineno))
            visit(child, nested)

    visit(tree, False)
    return out


def graph() -> tuple[dict[str, set[str]], list[tuple[str, str, list[str], bool, int]]]:
    """Module import graph (edges among the package's modules) and the flat list of imports."""
    known = modules()
    edges: dict[str, set[str]] = defaultdict(set)
    flat = []
    for module, path in known.items():
        for target, names, in_function, line in imports(module, path, known):
            if target not in known:
                continue
            flat.append((module, target, names, in_function, line))
            if target != module:
                edges[module].add(target)
    return edges, flat


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = [0]
    sys.setrecursionlimit(10_000)

    def strong(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(set(edges) | {w for ws in edges.values() for w in ws}):
        if v not in index:
            strong(v)
    return out


def test_no_import_cycle() -> None:
    edges, _ = graph()
    assert cycles(edges) == []


def test_dependencies_point_down() -> None:
    _, flat = graph()
    upward = [f"{m}:{line} imports {t} (layer {layer(m)} -> {layer(t)})" for m, t, _, _, line in flat
              if layer(t) > layer(m)]
    assert upward == []


def test_no_private_imports_across_modules() -> None:
    _, flat = graph()
    private = [f"{m}:{line} imports {n} from {t}" for m, t, names, _, line in flat for n in names
               if n.startswith("_") and not n.startswith("__") and t != m]
    assert private == []


def test_function_level_imports_are_not_cycle_dodges() -> None:
    _, flat = graph()
    lazy = [f"{m}:{line} imports {t}" for m, t, _, in_function, line in flat
            if in_function and (m, t) not in LAZY_OK]
    assert lazy == []


def test_every_module_has_a_layer_and_ships() -> None:
    import tomllib

    packages = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    for module, path in modules().items():
        layer(module)
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        assert package in packages, f"{path} is in package {package}, which pyproject.toml does not ship"


def report() -> str:
    """Figures for the README: modules per folder, cycles, function-level imports, largest files."""
    known = modules()
    edges, flat = graph()
    per_folder = Counter(".".join(m.split(".")[:2]) if m.count(".") else m for m in known)
    lines = ["modules per package: " + ", ".join(f"{k} {v}" for k, v in sorted(per_folder.items()))]
    lines.append(f"import cycles: {[len(c) for c in cycles(edges)] or 'none'}")
    total_lazy = 0
    for path in known.values():
        tree = ast.parse(path.read_text())
        for fn in ast.walk(tree):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                total_lazy += sum(isinstance(n, (ast.Import, ast.ImportFrom)) for n in ast.walk(fn))
    lines.append(f"function-level imports: {total_lazy} ({sum(f[3] for f in flat)} of an mmeff module)")
    sizes = sorted(((len(p.read_text().splitlines()), m) for m, p in known.items()), reverse=True)[:5]
    lines.append("largest files: " + ", ".join(f"{m} {n}" for n, m in sizes))
    return "\n".join(lines)


if __name__ == "__main__":
    print(report())
