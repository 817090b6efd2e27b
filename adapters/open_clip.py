"""In-encoder token reduction for open_clip image towers.

Accepts a whole ``CLIP`` / ``CustomTextCLIP`` / ``CoCa`` model or just its ``model.visual``. The tower
is either open_clip's own ``VisionTransformer`` (``conv1`` patch embedding, one class token,
``transformer.resblocks``) or a ``TimmModel`` whose ``trunk`` is a timm ``VisionTransformer`` (e.g. the
SigLIP configs), which is handled exactly like :class:`~mmeff.adapters.timm_vit.TimmViTAdapter`.

As for timm, a forward hook on block ``layer`` reduces the patch tokens of that block's output; later
blocks, ``ln_post``, pooling (``tok``/``avg``/attentional) and ``proj`` run on ``1 + M`` tokens, and
``output_tokens=True`` towers return the ``M`` reduced tokens. The text tower is never touched.

In open_clip 3.x the resblocks are batch-first and default blocks use ``nn.MultiheadAttention``
(``in_proj_weight``, called with ``need_weights=False`` so PyTorch's fused path stays on); custom blocks
(qk-norm etc.) use open_clip's ``Attention`` with the same ``in_proj_weight`` layout. ``cls_attn``
recomputes the class query and the keys from ``in_proj_weight`` in a pre-hook on that module.
"""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from mmeff.adapters.base import register_adapter
from mmeff.adapters.timm_vit import EncoderTower, ViTEncoderAdapter, timm_tower
from mmeff.core import Grid
from mmeff.hosts import class_named as _cls
from mmeff.hosts import is_timm_vit
from mmeff.hosts import open_clip_vision as vision_tower

__all__ = ["OpenCLIPAdapter", "open_clip_tower", "vision_tower"]


def _conv_grid(embed: nn.Module, args: tuple, output: Any) -> Grid | None:
    # conv1 returns (B, width, H, W) for whatever image size came in
    if isinstance(output, Tensor) and output.dim() == 4:
        return int(output.shape[-2]), int(output.shape[-1])
    return None


def _oc_attention(block: nn.Module) -> nn.Module:
    attn = getattr(block, "attn", None)
    if isinstance(attn, nn.MultiheadAttention):
        if not attn._qkv_same_embed_dim or attn.bias_k is not None:
            raise ValueError("cls_attn: MultiheadAttention with separate q/k/v weights or bias_k is not supported")
        return attn
    oc_attention = _cls("open_clip.transformer", "Attention")
    if oc_attention is not None and isinstance(attn, oc_attention):
        if getattr(attn, "logit_scale", None) is not None:
            raise ValueError("cls_attn: open_clip scaled-cosine attention is not supported")
        return attn
    raise ValueError(
        f"cls_attn: block {type(block).__name__} has attention {type(attn).__name__}; expected "
        "nn.MultiheadAttention or open_clip.transformer.Attention"
    )


def _oc_cls_qk(attn: nn.Module, x: Tensor, cls_index: int) -> tuple[Tensor, Tensor]:
    b, n, _ = x.shape
    w, bias = attn.in_proj_weight, attn.in_proj_bias
    e = w.shape[0] // 3
    h = int(attn.num_heads)
    hd = e // h
    # rows [0, e) of in_proj are q, [e, 2e) are k, in both MultiheadAttention and open_clip Attention
    q = F.linear(x[:, cls_index : cls_index + 1], w[:e], None if bias is None else bias[:e])
    k = F.linear(x, w[e : 2 * e], None if bias is None else bias[e : 2 * e])
    q = q.reshape(b, 1, h, hd).transpose(1, 2)
    k = k.reshape(b, n, h, hd).transpose(1, 2)
    ln_q, ln_k = getattr(attn, "ln_q", None), getattr(attn, "ln_k", None)
    if ln_q is not None:
        q = ln_q(q)
    if ln_k is not None:
        k = ln_k(k)
    return q, k


def open_clip_tower(visual: nn.Module) -> EncoderTower:
    """Describe open_clip's ``VisionTransformer``: ``transformer.resblocks``, one class token at 0."""
    tr = visual.transformer
    return EncoderTower(
        blocks=tr.resblocks,
        embed=visual.conv1,
        num_prefix=1,
        cls_index=0,
        # 3.x is always batch-first; older releases ran the stack as (L, B, D)
        batch_first=bool(getattr(tr, "batch_first", True)),
        grid=tuple(int(v) for v in visual.grid_size),
        grid_of=_conv_grid,
        attention=_oc_attention,
        cls_qk=_oc_cls_qk,
    )


@register_adapter
class OpenCLIPAdapter(ViTEncoderAdapter):
    """open_clip ``CLIP``/``CustomTextCLIP``/``CoCa`` or their ``visual``: reduce after block ``layer``.

    Option ``layer`` (int, default 0) picks the block whose output is reduced. ``stats`` and
    ``last_reduction`` describe the image tower's last forward.
    """

    name = "open_clip"
    description = "open_clip CLIP/CustomTextCLIP/CoCa image tower (ViT or timm ViT trunk): reduce inside the encoder"

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return vision_tower(model) is not None

    def hosts(self) -> list[nn.Module]:
        out = [self.model]
        visual = getattr(self.model, "visual", None)
        if isinstance(visual, nn.Module):
            out.append(visual)
        tower = vision_tower(self.model)
        if tower is not None:
            out.append(tower)
        return out

    def tower(self) -> EncoderTower:
        tower = vision_tower(self.model)
        if tower is None:
            raise ValueError(
                f"OpenCLIPAdapter needs an open_clip model with a ViT image tower, got {type(self.model).__name__}"
            )
        return timm_tower(tower) if is_timm_vit(tower) else open_clip_tower(tower)
