"""Adapter protocol: how a reducer attaches to a host model, and the adapter registry.

An adapter owns every hook it registers and removes all of them in :meth:`Adapter.detach`, so
``mmeff.apply`` can guarantee the model is restored even when the wrapped code raises.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from mmeff.core import ADAPTERS, TokenReducer

__all__ = ["Adapter", "REFUSED_HOSTS", "register_adapter", "find_adapter", "host_table", "list_adapters", "capture_cls_attention", "cls_attention"]

#: transformers VLM classes mmeff knows and does not attach to, with the reason; ``find_adapter`` raises it
#: and ``mmeff list`` prints it
REFUSED_HOSTS: dict[str, str] = {
    "Idefics2ForConditionalGeneration": (
        "not adapted: its perceiver resampler turns each image into a fixed set of latent tokens with no spatial "
        "grid, so grid methods cannot apply and no adapter reads the rest of its layout yet"),
    "Mistral3ForConditionalGeneration": (
        "not adapted yet: Pixtral lays each image out row by row with [IMG_BREAK] after every row and [IMG_END] "
        "after the last; no adapter reads that layout yet"),
}


class Adapter:
    """Base class. Subclasses set ``name``/``description`` and implement ``matches`` and ``attach``."""

    name: ClassVar[str] = "base"
    description: ClassVar[str] = ""
    #: keyword options ``mmeff.apply(model, reducer, **options)`` accepts for this adapter
    option_names: ClassVar[frozenset[str]] = frozenset()
    #: the kind of method this adapter attaches (token reducers; KV-cache presses for ``KVCacheAdapter``)
    method_type: ClassVar[type] = TokenReducer
    #: transformers VLM classes this adapter serves, by name, and one line on where methods run and what is
    #: refused (``mmeff list``'s host table)
    hf_classes: ClassVar[tuple[str, ...]] = ()
    host_notes: ClassVar[str] = ""

    def __init__(self, model: nn.Module, reducer: Any, **options: Any) -> None:
        if not isinstance(reducer, self.method_type):
            raise TypeError(f"expected a {self.method_type.__name__}, got {type(reducer).__name__}")
        unknown = sorted(set(options) - self.option_names)
        if unknown:
            raise TypeError(
                f"{type(self).__name__}: unknown option(s) {unknown}; supported: {sorted(self.option_names)}"
            )
        self.model = model
        self.reducer = reducer
        self.options = options
        self.stats: dict[str, Any] = {}
        self._hooks: list[Any] = []
        self._restore: list[Callable[[], None]] = []

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        """Whether this adapter knows how to attach to ``model``."""
        raise NotImplementedError

    def attach(self) -> None:
        """Register hooks/seams on the model."""
        raise NotImplementedError

    def detach(self) -> None:
        """Remove everything :meth:`attach` added, in reverse order; safe to call twice."""
        while self._hooks:
            self._hooks.pop().remove()
        while self._restore:
            self._restore.pop()()

    def __enter__(self) -> Adapter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.detach()

    # helpers for subclasses -------------------------------------------------------------------------
    def _hook(self, handle: Any) -> None:
        self._hooks.append(handle)

    def _override(self, obj: Any, attr: str, value: Any) -> None:
        """Set an instance attribute (e.g. a wrapped ``generate``) and remember how to undo it."""
        had = attr in obj.__dict__
        old = obj.__dict__.get(attr)
        setattr(obj, attr, value)

        def undo() -> None:
            if had:
                setattr(obj, attr, old)
            else:
                obj.__dict__.pop(attr, None)

        self._restore.append(undo)


def register_adapter(cls: type[Adapter]) -> type[Adapter]:
    """Class decorator adding an adapter; the first one whose ``matches`` is true is used."""
    ADAPTERS.add(cls.name, cls, summary=cls.description)
    return cls


def _host_adapters() -> list[type[Adapter]]:
    """Registered adapters for token reducers, in matching order."""
    return [e.obj for e in ADAPTERS.entries() if issubclass(e.obj.method_type, TokenReducer)]


def list_adapters() -> list[tuple[str, str]]:
    """``(name, description)`` of every registered adapter."""
    return [(e.name, e.summary) for e in ADAPTERS.entries()]


def find_adapter(model: nn.Module) -> type[Adapter]:
    """The adapter class for ``model``; ``TypeError`` naming the class and the supported ones otherwise."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected a torch.nn.Module, got {type(model).__name__}")
    adapters = _host_adapters()
    for a in adapters:
        if a.matches(model):
            return a
    for cls in type(model).__mro__:
        if cls.__name__ in REFUSED_HOSTS:
            raise TypeError(f"{type(model).__name__} is not supported: {REFUSED_HOSTS[cls.__name__]}")
    names = ", ".join(a.name for a in adapters)
    raise TypeError(f"unsupported model class {type(model).__name__}; mmeff adapters exist for: {names}")


def host_table() -> list[tuple[str, str, str]]:
    """``(class name, adapter name or "refused", notes or reason)`` for every transformers VLM class mmeff
    knows, supported ones first."""
    rows = [(h, a.name, a.host_notes) for a in _host_adapters() for h in a.hf_classes]
    return rows + [(h, "refused", why) for h, why in REFUSED_HOSTS.items()]


def capture_cls_attention(attn: nn.Module, captured: list[Tensor]) -> RemovableHandle:
    """Forward pre-hook on a ViT attention module (``q_proj`` / ``k_proj``, optional ``q_norm`` / ``k_norm``
    as InternViT has) appending the class token's attention ``(B, N)`` over the module's input to
    ``captured``; the module itself runs unchanged (SDPA / flash stay on). Remove the returned handle."""
    norm_q = getattr(attn, "q_norm", None) or nn.Identity()
    norm_k = getattr(attn, "k_norm", None) or nn.Identity()

    def grab(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        h = kwargs.get("hidden_states", args[0] if args else None)
        b, n, _ = h.shape
        q = norm_q(module.q_proj(h[:, :1])).view(b, 1, -1, module.head_dim).transpose(1, 2)
        k = norm_k(module.k_proj(h)).view(b, n, -1, module.head_dim).transpose(1, 2)
        captured.append(cls_attention(q, k))

    return attn.register_forward_pre_hook(grab, with_kwargs=True)


def cls_attention(q: Tensor, k: Tensor, cls_index: int = 0) -> Tensor:
    """Attention the CLS query pays to every token, averaged over heads.

    Args:
        q, k: ``(B, heads, N, head_dim)`` queries and keys of one attention layer.
    Returns:
        ``(B, N)`` softmax probabilities (row sums to 1), computed in float32.
    """
    scale = q.shape[-1] ** -0.5
    logits = torch.einsum("bhd,bhnd->bhn", q[:, :, cls_index].float(), k.float()) * scale
    return logits.softmax(dim=-1).mean(dim=1)
