"""The library's model registry: one ``mmeff.create_model(name)`` for every model family it ships.

Each family registers its named configurations with :func:`register_model` when its module is imported
(SqueezeTime, Instruct-IPT, ...); :func:`create_model` builds one, optionally loading a local checkpoint
through the family's own loader. Nothing is ever downloaded.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from torch import nn

__all__ = ["create_model", "list_models", "register_model"]

# name -> (family, factory(pretrained: str | None, **kwargs) -> nn.Module)
_REGISTRY: dict[str, tuple[str, Callable[..., nn.Module]]] = {}
# modules that register models on import; imported lazily so `import mmeff` stays light
_FAMILIES = ("mmeff.squeezetime", "mmeff.instruct_ipt", "mmeff.cdt", "mmeff.eve")


def register_model(name: str, family: str, factory: Callable[..., nn.Module]) -> None:
    """Register ``factory(pretrained=None | path, **kwargs)`` under ``name`` (a second family may not
    take a name already registered by another)."""
    if name in _REGISTRY and _REGISTRY[name][0] != family:
        raise ValueError(f"model name {name!r} is already registered by {_REGISTRY[name][0]}")
    _REGISTRY[name] = (family, factory)


def _load_families() -> None:
    for module in _FAMILIES:
        importlib.import_module(module)


def list_models(family: str | None = None) -> list[str]:
    """Registered model names (all families, or one: ``"squeezetime"``, ``"instruct_ipt"``)."""
    _load_families()
    return sorted(n for n, (f, _) in _REGISTRY.items() if family is None or f == family)


def create_model(name: str, pretrained: str | None = None, **kwargs: Any) -> nn.Module:
    """Build the registered configuration ``name`` (``kwargs`` override it); ``pretrained``: a local
    checkpoint file read by the family's loader."""
    _load_families()
    if name not in _REGISTRY:
        raise KeyError(f"unknown model {name!r}; known: {', '.join(list_models())}")
    return _REGISTRY[name][1](pretrained=pretrained, **kwargs)
