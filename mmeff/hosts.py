"""One place that finds the parts of a host model: its vision tower, its projector, its inner model.

Every method and adapter asks here instead of walking the model itself, so a new host family is taught
once. Lookups are by class, read from ``sys.modules`` (an instance can only exist if its module was
imported), so nothing here imports timm, open_clip or a transformers model file.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

__all__ = [
    "VitHost",
    "vit_host",
    "hf_vision_tower",
    "inner_model",
    "is_instance_of",
    "is_open_clip_vit",
    "is_qwen2_5_vl",
    "is_qwen2_vl",
    "is_timm_vit",
    "open_clip_vision",
    "projector",
    "vision_tower",
]


def class_named(module: str, name: str) -> type | None:
    """The class ``name`` of ``module`` if that module is already imported, else ``None``."""
    return getattr(sys.modules.get(module), name, None)


def is_instance_of(model: Any, classes: Iterable[tuple[str, str]]) -> bool:
    """Whether ``model`` is an instance of one of ``classes``, ``(module, class name)`` pairs looked up in
    already imported modules only (how every host adapter recognises its model classes)."""
    return any(c is not None and isinstance(model, c) for c in (class_named(m, n) for m, n in classes))


def is_timm_vit(model: Any) -> bool:
    """Whether ``model`` is a timm ``VisionTransformer`` (or subclass, e.g. DeiT-distilled)."""
    vt = class_named("timm.models.vision_transformer", "VisionTransformer")
    return vt is not None and isinstance(model, vt)


def is_open_clip_vit(model: Any) -> bool:
    """Whether ``model`` is open_clip's own ``VisionTransformer``."""
    vt = class_named("open_clip.transformer", "VisionTransformer")
    return vt is not None and isinstance(model, vt)


def is_qwen2_vl(model: Any) -> bool:
    """Whether ``model`` comes from transformers' Qwen2-VL or Qwen2.5-VL model files."""
    return "qwen2_vl" in type(model).__module__ or "qwen2_5_vl" in type(model).__module__


def is_qwen2_5_vl(model: Any) -> bool:
    """Whether ``model`` comes from transformers' Qwen2.5-VL model file (windowed tower attention)."""
    return "qwen2_5_vl" in type(model).__module__


def _open_clip_visual(visual: Any) -> nn.Module | None:
    if is_open_clip_vit(visual):
        return visual
    timm_model = class_named("open_clip.timm_model", "TimmModel")
    if timm_model is not None and isinstance(visual, timm_model) and is_timm_vit(getattr(visual, "trunk", None)):
        return visual.trunk
    return None


def open_clip_vision(model: nn.Module) -> nn.Module | None:
    """The ViT that encodes images for an open_clip ``model`` (or ``model.visual``), else ``None``.

    Returns open_clip's ``VisionTransformer`` or the timm ``VisionTransformer`` trunk of a ``TimmModel``.
    """
    tower = _open_clip_visual(model)
    if tower is not None:
        return tower
    hosts = tuple(c for c in (class_named("open_clip.model", "CLIP"), class_named("open_clip.model", "CustomTextCLIP"),
                              class_named("open_clip.coca_model", "CoCa")) if c is not None)
    if hosts and isinstance(model, hosts):
        return _open_clip_visual(getattr(model, "visual", None))
    return None


def hf_vision_tower(model: nn.Module) -> nn.Module | None:
    """The HF CLIP/SigLIP vision transformer inside ``model`` (the module with ``embeddings`` and
    ``encoder.layers`` of CLIP/SigLIP encoder layers: a LLaVA's tower, or the vision model itself)."""
    layer_types = tuple(t for t in (class_named("transformers.models.clip.modeling_clip", "CLIPEncoderLayer"),
                                    class_named("transformers.models.siglip.modeling_siglip", "SiglipEncoderLayer"))
                        if t is not None)
    if not layer_types:
        return None
    for m in model.modules():
        emb = getattr(m, "embeddings", None)
        layers = getattr(getattr(m, "encoder", None), "layers", None)
        if (emb is not None and type(emb).__name__.endswith("VisionEmbeddings") and layers is not None
                and len(layers) > 0 and all(isinstance(layer, layer_types) for layer in layers)):
            return m
    return None


def inner_model(model: nn.Module) -> nn.Module | None:
    """A transformers VLM's inner ``model`` (the module holding tower, projector and LM), else ``None``."""
    inner = getattr(model, "model", None)
    return inner if isinstance(inner, nn.Module) else None


def vision_tower(model: nn.Module) -> nn.Module | None:
    """The image encoder of ``model``, whatever the host: a timm ViT (itself), an open_clip tower, an HF
    CLIP/SigLIP tower (LLaVA's), or Qwen2-VL's ``visual`` (with its merger); ``None`` if there is none."""
    if is_timm_vit(model):
        return model
    tower = open_clip_vision(model)
    if tower is not None:
        return tower
    if is_qwen2_vl(model):
        visual = getattr(inner_model(model) or model, "visual", None)
        return visual if isinstance(visual, nn.Module) else None
    return hf_vision_tower(model)


def projector(model: nn.Module) -> nn.Module | None:
    """The module mapping vision features to the LLM width: LLaVA's ``multi_modal_projector`` or
    Qwen2-VL's ``PatchMerger``; ``model`` may be the VLM or its inner model."""
    inner = inner_model(model) or model
    proj = getattr(inner, "multi_modal_projector", None)
    if proj is None:
        proj = getattr(getattr(inner, "visual", None), "merger", None)
    return proj if isinstance(proj, nn.Module) else None


@dataclass
class VitHost:
    """The ViT encoder of a host, as the in-tower methods (ToMe, ToCom) see it.

    Attributes:
        kind: ``"timm"``, ``"open_clip"`` or ``"hf"``.
        blocks: the transformer blocks, in order.
        start: module that runs once at the start of every encoder forward (the patch embedding).
        prefix: tokens in front of the patches that are never merged (class, registers, distillation).
        vlm: the encoder feeds a VLM that counts its output tokens (needs ``unmerge``).
        root: the encoder module (timm/open_clip ViT, HF vision model).
    """

    kind: str
    blocks: Sequence[nn.Module]
    start: nn.Module
    prefix: int
    vlm: bool
    root: nn.Module


def vit_host(model: nn.Module, method: str = "ToMe") -> VitHost:
    """Locate the ViT encoder of ``model`` (timm ViT, open_clip model/tower, HF CLIP/SigLIP or LLaVA).

    Raises ``TypeError`` naming the class for anything else (Qwen2-VL: its 2x2 patch merger needs the
    full grid, so ToMe is refused there). ``method`` names the caller in errors.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected a torch.nn.Module, got {type(model).__name__}")
    tower = model if is_timm_vit(model) else open_clip_vision(model)
    if tower is not None and is_timm_vit(tower):
        return VitHost("timm", tower.blocks, tower.patch_embed, int(tower.num_prefix_tokens), False, tower)
    if tower is not None:  # open_clip's own VisionTransformer: one class token
        return VitHost("open_clip", tower.transformer.resblocks, tower.conv1, 1, False, tower)
    if is_qwen2_vl(model):
        raise TypeError(
            f"{method} is not supported on {type(model).__name__}: its PatchMerger fuses fixed 2x2 patch neighbourhoods, "
            "which merged tokens no longer form; reduce tokens after the merger with an mmeff reducer instead"
        )
    hf = hf_vision_tower(model)
    if hf is not None:
        has_cls = hasattr(hf.embeddings, "class_embedding")
        vlm = hf is not model and not isinstance(model, type(hf)) and hasattr(model, "get_image_features")
        return VitHost("hf", hf.encoder.layers, hf.embeddings, int(has_cls), vlm, hf)
    raise TypeError(
        f"{method} does not support {type(model).__name__}; supported: timm VisionTransformer, open_clip CLIP models and "
        "towers, HF CLIP/SigLIP vision models and VLMs built on them (LLaVA)"
    )
