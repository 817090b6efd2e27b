"""Applying methods to models: ``with mmeff.apply(model, method): ...`` and ``mmeff.patch(model, method)``.

A method is a token reducer (attached by the model's adapter), a KV-cache press (attached to the
model's decoder by ``KVCacheAdapter``), ToMe token merging inside the vision encoder
(``ToMeAdapter``), a ToCom compensation (``tocom.at(source)``, ``ToComAdapter``) or VisToG grouping
(``VisToGAdapter``); one call may combine reducers with one press, one ToMe and one ToCom, or VisToG
with one press. The hooks all live in :mod:`mmeff.adapters`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from torch import nn

from mmeff.adapters.base import Adapter, find_adapter
from mmeff.adapters.kv_cache import KVCacheAdapter
from mmeff.adapters.tocom import ToComAdapter
from mmeff.adapters.tome import ToMeAdapter
from mmeff.adapters.vistog import VisToGAdapter
from mmeff.core import TokenReducer, attach_cleanly, compose
from mmeff.kv.presses import KVPress
from mmeff.methods.tocom import Compensation
from mmeff.methods.tome import ToMe
from mmeff.methods.vistog import VisToG

__all__ = ["apply", "patch", "unpatch", "attach"]


class AdapterGroup(Adapter):
    """Several adapters attached together (token reducers + a KV-cache press); detaches all of them."""

    name = "group"

    def __init__(self, adapters: list[Adapter]) -> None:  # noqa: D107 - no reducer of its own
        self.adapters = adapters
        self.model = adapters[0].model
        self._hooks, self._restore = [], []

    @property
    def stats(self) -> dict[str, Any]:  # type: ignore[override]
        out: dict[str, Any] = {}
        for a in self.adapters:
            out.update(a.stats)
        return out

    def __getitem__(self, i: int) -> Adapter:
        return self.adapters[i]

    def attach(self) -> None:
        for a in self.adapters:
            a.attach()

    def detach(self) -> None:
        for a in reversed(self.adapters):
            a.detach()


Method = TokenReducer | KVPress | ToMe | VisToG | Compensation


def attach(model: nn.Module, *methods: Method, **options: Any) -> Adapter:
    """Attach ``methods`` to ``model``; returns the adapter, whose ``detach()`` undoes everything.

    Token reducers run in sequence on the visual tokens; at most one KV-cache press and one
    :class:`~mmeff.methods.tome.ToMe` may join them (``options`` then go to the reducers' adapter). Raises
    ``TypeError`` for an unsupported model class or an argument that is none of these.
    """
    if not methods:
        raise ValueError("attach/apply/patch need at least one reducer, KV-cache press or ToMe")
    presses = [m for m in methods if isinstance(m, KVPress)]
    tomes = [m for m in methods if isinstance(m, ToMe)]
    groupers = [m for m in methods if isinstance(m, VisToG)]
    comps = [m for m in methods if isinstance(m, Compensation)]
    reducers = [m for m in methods if not isinstance(m, (KVPress, ToMe, VisToG, Compensation))]
    if len(presses) > 1:
        raise ValueError(f"one KV-cache press at a time, got {[p.name for p in presses]}")
    if len(tomes) > 1:
        raise ValueError("one ToMe at a time")
    if len(comps) > 1:
        raise ValueError("one ToCom at a time")
    adapters: list[Adapter] = []
    if groupers:
        if len(groupers) > 1 or tomes or reducers or comps:
            raise ValueError("VisToG produces the visual tokens itself; combine it only with a KV-cache press")
        if options:
            raise TypeError(f"VisToG takes no adapter options, got {sorted(options)}")
        adapters.append(VisToGAdapter(model, groupers[0]))
    if tomes:
        tome = ToMeAdapter(model, tomes[0])
        if reducers and tome.host.kind != "hf":
            # an in-encoder reducer would see a token count that ToMe changes block by block
            raise ValueError(
                "ToMe and an in-encoder token reducer cannot share a timm/open_clip ViT; use one of them"
            )
        adapters.append(tome)
    if comps:  # after ToMe: with target=None it reads the attached ToMe's r at every forward
        adapters.append(ToComAdapter(model, comps[0]))
    if reducers:
        adapters.append(find_adapter(model)(model, compose(*reducers), **options))
    elif options:
        raise TypeError(f"KV-cache presses, ToMe and ToCom take no adapter options, got {sorted(options)}")
    if presses:
        adapters.append(KVCacheAdapter(model, presses[0]))
    return attach_cleanly(adapters[0] if len(adapters) == 1 else AdapterGroup(adapters))


@contextmanager
def apply(model: nn.Module, *reducers: Method, **options: Any) -> Iterator[Adapter]:
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


def patch(model: nn.Module, *reducers: Method, **options: Any) -> Adapter:
    """Attach permanently (until :func:`unpatch`); returns the adapter."""
    return attach(model, *reducers, **options)


def unpatch(model: nn.Module) -> bool:
    """Remove the methods attached with :func:`patch` (reducers, press, ToMe, ToCom, VisToG); returns whether any was."""
    found = False
    for key in ("_mmeff_kv_adapter", "_mmeff_vistog_adapter", "_mmeff_adapter", "_mmeff_tocom_adapter",
                "_mmeff_tome_adapter"):
        adapter = model.__dict__.get(key)
        if adapter is not None:
            adapter.detach()
            found = True
    return found
