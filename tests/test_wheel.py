"""The built wheel is complete: every subpackage, module and data file ships, and it works installed.

``pyproject.toml`` lists its packages by hand, so a new subpackage or data file that is not listed would
only fail for a user. This builds the wheel (no network: ``--no-build-isolation``), compares its contents
with the source tree, installs it into a fresh virtual environment outside the checkout (system site
packages give it torch and transformers; the wheel itself is installed ``--no-deps``) and runs
``mmeff list`` and one ``mmeff.apply`` on a tiny model there, checking the code came from the wheel.
"""

from __future__ import annotations

import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))
from test_architecture import FOLDERS, modules  # noqa: E402


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation",
                        "-q", "-w", str(out)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    (whl,) = out.glob("mmeff-*.whl")
    return whl


def test_wheel_holds_every_module_and_data_file(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    missing = []
    for path in modules().values():
        rel = path.relative_to(ROOT)
        folder = rel.parts[0]
        inside = Path(*FOLDERS[folder].split(".")) / Path(*rel.parts[1:])
        if inside.as_posix() not in names:
            missing.append(inside.as_posix())
    for data in [*(ROOT / "mmeff" / "weights").iterdir(), *(ROOT / "mmeff" / "configs").iterdir()]:
        if f"mmeff/{data.parent.name}/{data.name}" not in names:
            missing.append(f"mmeff/{data.parent.name}/{data.name}")
    assert missing == []
    assert not any(n.startswith(("tests/", "benchmarks/", "scripts/")) for n in names)


def test_installed_wheel_lists_and_applies_outside_the_checkout(wheel: Path, tmp_path: Path) -> None:
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(system_site_packages=True, with_pip=False).create(env_dir)
    py = env_dir / "bin" / "python"
    r = subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "-q", "--no-deps",
                        "--no-index", str(wheel)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    work = tmp_path / "elsewhere"
    work.mkdir()
    lister = subprocess.run([str(env_dir / "bin" / "mmeff"), "list"], capture_output=True, text=True, cwd=work,
                            timeout=300)
    assert lister.returncode == 0, lister.stderr[-3000:]
    for name in ("pool", "tome", "tocom", "vistog", "streamingllm", "mmeff-mini", "squeezetime_18", "llava"):
        assert name in lister.stdout
    code = f"""
import tempfile
import mmeff, torch
from mmeff.models.tiny import build_tiny, llava_inputs
assert str(mmeff.__file__).startswith({str(env_dir)!r}), mmeff.__file__
model = build_tiny("llava", tempfile.mkdtemp())
inputs = llava_inputs(model.config, batch=1)
with torch.no_grad():
    full = model(**inputs).logits
    with mmeff.apply(model, mmeff.AvgPool(tokens=4)) as handle:
        model(**inputs)
    again = model(**inputs).logits
print(handle.stats["visual_tokens_out"], torch.equal(full, again))
"""
    run = subprocess.run([str(py), "-c", code], capture_output=True, text=True, cwd=work, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.split() == ["4", "True"]
