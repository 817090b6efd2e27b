"""The library's model factories in the one registry: ``mmeff.create_model(name)`` for every model it ships.

Each family adds its named configurations with :func:`register_model` when its module is imported
(SqueezeTime, Instruct-IPT, CDT, Eve; ``import mmeff`` imports them all); :func:`create_model` builds one,
optionally loading a local checkpoint through the family's own loader. The embedded VLMs (``mmeff-mini``)
are listed here too; :func:`mmeff.models.embedded.default_model` builds them with their tokenizer. Nothing is
ever downloaded.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from functools import partial
from typing import Any

from torch import nn

from mmeff.core import Registry

__all__ = ["MODELS", "create_model", "list_models", "register_family", "register_model"]

#: kind "model" of the one registry: name -> factory(pretrained: str | None, **kwargs) -> nn.Module
MODELS: Registry[nn.Module] = Registry("model")


def register_model(name: str, family: str, factory: Callable[..., nn.Module], summary: str | None = None) -> None:
    """Register ``factory(pretrained=None | path, **kwargs)`` under ``name`` (a second family may not
    take a name already registered by another)."""
    MODELS.add(name, factory, summary=summary if summary is not None else f"{family} model", family=family)


def register_family(family: str, summaries: Mapping[str, str], create: Callable[..., nn.Module]) -> None:
    """Register every configuration of a family: ``summaries`` maps each name to its one-line summary and
    ``create(name, pretrained=None, **kwargs)`` builds it (the family's own ``create_model``)."""
    for name, summary in summaries.items():
        register_model(name, family, partial(_family_factory, create, name), summary)


def _family_factory(create: Callable[..., nn.Module], name: str, pretrained: str | None = None,
                    **kwargs: Any) -> nn.Module:
    return create(name, pretrained, **kwargs)


def list_models(family: str | None = None) -> list[str]:
    """Registered model names (all families, or one: ``"squeezetime"``, ``"instruct_ipt"``)."""
    return sorted(e.name for e in MODELS.entries() if family is None or e.family == family)


def create_model(name: str, pretrained: str | None = None, **kwargs: Any) -> nn.Module:
    """Build the registered configuration ``name`` (``kwargs`` override it); ``pretrained``: a local
    checkpoint file read by the family's loader."""
    factory = MODELS.get(name)
    return factory(pretrained=pretrained, **kwargs)
