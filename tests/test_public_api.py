"""The public API survives the move into subpackages (issue 33).

``tests/data/public_api_0.1.0.json`` is the public names of every module of mmeff 0.1.0, when all modules
sat flat in ``mmeff/`` (read from each module's ``__all__``). Each old path must still import, with a
``FutureWarning`` naming the new home, and still hold every one of its names; ``mmeff``'s own names and
the modules that did not move or became packages (``mmeff.models``, ``mmeff.bench``, ``mmeff.cli``) answer
without a warning. The new homes are plain modules: importing them warns about nothing.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

OLD = json.loads((Path(__file__).parent / "data" / "public_api_0.1.0.json").read_text())


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd="/")


def test_every_old_module_path_warns_and_keeps_its_names() -> None:
    code = f"""
import importlib, json, warnings
from mmeff.deprecated import ALIASES
old = json.loads({json.dumps(json.dumps(OLD))})
bad = []
# mmeff itself last: its attributes (mmeff.tome, ...) make the public old modules silently
for module, names in sorted(old.items(), key=lambda kv: (kv[0] == 'mmeff', kv[0])):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mod = importlib.import_module(module)
    moved = [w for w in caught if issubclass(w.category, FutureWarning) and module in str(w.message)]
    if module not in ALIASES:
        if moved:
            bad.append(f"{{module}} warns but is still a real module")
    elif len(moved) != 1:
        bad.append(f"{{module}}: {{len(moved)}} FutureWarnings naming it")
    missing = [n for n in names if not hasattr(mod, n)]
    if missing:
        bad.append(f"{{module}} lost {{missing}}")
print(json.dumps(bad))
"""
    r = _run(code)
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(r.stdout.strip().splitlines()[-1]) == []


def test_warning_points_at_the_users_import_line() -> None:
    r = _run("import warnings; warnings.simplefilter('always')\nfrom mmeff.mini import create_clip\n")
    assert r.returncode == 0, r.stderr
    assert "<string>:2: FutureWarning: mmeff.mini moved to mmeff.models.mini" in r.stderr


def test_single_target_alias_is_the_module_itself() -> None:
    # monkeypatching through the old path must reach the code that runs
    r = _run("import warnings; warnings.simplefilter('ignore')\nimport mmeff.profile, mmeff.eval.profile\n"
             "import mmeff.kvcache, mmeff.kv.presses\n"
             "print(mmeff.kvcache is mmeff.kv.presses)")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "True"


def test_new_paths_and_import_mmeff_warn_about_nothing() -> None:
    r = _run("import warnings; warnings.simplefilter('error')\nimport mmeff, mmeff.methods.tome, mmeff.models.mini, "
             "mmeff.eval.videoqa, mmeff.train.loop, mmeff.bench.reduction, mmeff.cli\n"
             "mmeff.tome.patch; mmeff.vistog.VisToG; mmeff.flatquant.quantize; mmeff.cdt.CDT\nprint('ok')")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "ok"


def test_unknown_attribute_is_an_attribute_error() -> None:
    import mmeff

    with pytest.raises(AttributeError, match="no attribute 'nonexistent'"):
        mmeff.nonexistent  # noqa: B018
