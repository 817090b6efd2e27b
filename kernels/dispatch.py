"""Choosing between a Triton kernel and its PyTorch reference.

CUDA tensors use Triton when it is importable; everything else uses the PyTorch reference.
``MMEFF_KERNELS=torch`` forces the reference everywhere; ``MMEFF_KERNELS=triton`` forces Triton (on CPU
this only works under ``TRITON_INTERPRET=1``, which is how the tests check kernels without a GPU).
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from torch import Tensor

from mmeff.extras import check

__all__ = ["use_triton", "SUPPORTED_DTYPES", "lazy_jit", "next_pow2", "forced_backend"]

import torch

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def use_triton(*tensors: Tensor) -> bool:
    """Whether the Triton path should run for these tensors (see module docstring)."""
    mode = os.environ.get("MMEFF_KERNELS", "auto").lower()
    if mode not in ("auto", "torch", "triton"):
        raise ValueError(f"MMEFF_KERNELS must be auto, torch or triton, got {mode!r}")
    if mode == "torch":
        return False
    if mode == "triton":
        if not _triton_available():
            check("triton", "MMEFF_KERNELS=triton")
        on_cpu = any(t.device.type == "cpu" for t in tensors)
        if on_cpu and os.environ.get("TRITON_INTERPRET") != "1":
            raise RuntimeError("MMEFF_KERNELS=triton on CPU tensors needs TRITON_INTERPRET=1")
        return True
    return _triton_available() and all(t.is_cuda for t in tensors)


_JIT_CACHE: dict[tuple[object, str | None], object] = {}


def lazy_jit(fn: Callable[..., None]) -> object:
    """``triton.jit(fn)``, wrapped on first use and cached per ``TRITON_INTERPRET`` value.

    triton 3.x reads ``TRITON_INTERPRET`` when it wraps a function, so wrapping at import time would ignore
    a later ``TRITON_INTERPRET=1`` (set by a test, say).
    """
    import triton

    key = (fn, os.environ.get("TRITON_INTERPRET"))
    kernel = _JIT_CACHE.get(key)
    if kernel is None:
        kernel = _JIT_CACHE[key] = triton.jit(fn)
    return kernel


def next_pow2(n: int) -> int:
    """Smallest power of two >= ``n`` (1 for ``n <= 1``); Triton block sizes must be powers of two."""
    return 1 << max(0, (n - 1).bit_length())


@contextmanager
def forced_backend(name: str) -> Iterator[None]:
    """Set ``MMEFF_KERNELS`` to ``name`` (``torch`` or ``triton``) inside the block, restoring it after."""
    old = os.environ.get("MMEFF_KERNELS")
    os.environ["MMEFF_KERNELS"] = name
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("MMEFF_KERNELS", None)
        else:
            os.environ["MMEFF_KERNELS"] = old
