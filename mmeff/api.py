"""Applying reducers to models: ``with mmeff.apply(model, method): ...`` and ``mmeff.patch(model, method)``."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from torch import nn

from mmeff.adapters import Adapter, find_adapter
from mmeff.core import TokenReducer, compose

__all__ = ["apply", "patch", "unpatch", "attach"]


def attach(model: nn.Module, *reducers: TokenReducer, **options: Any) -> Adapter:
    """Attach ``reducers`` (run in sequence) to ``model``; returns the adapter, whose ``detach()`` undoes it.

    Raises ``TypeError`` for an unsupported model class or a non-reducer argument.
    """
    if not reducers:
        raise ValueError("attach/apply/patch need at least one reducer")
    adapter = find_adapter(model)(model, compose(*reducers), **options)
    try:
        adapter.attach()
    except BaseException:
        adapter.detach()
        raise
    return adapter


@contextmanager
def apply(model: nn.Module, *reducers: TokenReducer, **options: Any) -> Iterator[Adapter]:
    """Context manager: the model runs with ``reducers`` inside the block and is restored after it.

    Example::

        with mmeff.apply(model, mmeff.AvgPool(tokens=144)) as handle:
            out = model.generate(**inputs)
        print(handle.stats)   # visual tokens in/out of the last call
    """
    adapter = attach(model, *reducers, **options)
    try:
        yield adapter
    finally:
        adapter.detach()


def patch(model: nn.Module, *reducers: TokenReducer, **options: Any) -> Adapter:
    """Attach permanently (until :func:`unpatch`); returns the adapter."""
    return attach(model, *reducers, **options)


def unpatch(model: nn.Module) -> bool:
    """Remove a method attached with :func:`patch`; returns whether one was attached."""
    adapter = model.__dict__.get("_mmeff_adapter")
    if adapter is None:
        return False
    adapter.detach()
    return True
