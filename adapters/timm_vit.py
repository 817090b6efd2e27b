"""In-encoder token reduction for timm ``VisionTransformer``, plus the machinery shared with open_clip.

The reducer runs *inside* the encoder. A forward hook on block ``layer`` replaces that block's output
``(B, P + N, D)`` by ``(B, P + M, D)``: the P prefix tokens (class, register, distillation tokens) stay
untouched in front and only the N patch tokens are reduced to M. Every later block, the final norm,
pooling and the head then simply run on fewer tokens. No host ``forward`` is copied or replaced, so
the model keeps its own fused attention, LayerScale, qk-norm, pooling variants and dynamic image sizes.

``cls_attn`` scores are recomputed from the reduction block's own q/k for the class query only, in a
forward pre-hook on that block's attention module; the block itself still runs fused SDPA.

Example::

    vit = timm.create_model("vit_base_patch16_224", pretrained=True)
    with mmeff.apply(vit, mmeff.CLSAttnTopK(tokens=49), layer=3) as handle:
        logits = vit(images)
    handle.stats  # {"tokens_in": 196, "tokens_out": 49, "layer": 3}
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import Attention
from torch import Tensor, nn

from mmeff.adapters.base import Adapter, cls_attention, register_adapter
from mmeff.core import Grid, Reduction, TokenContext, TokenReducer
from mmeff.hosts import is_timm_vit

__all__ = ["EncoderTower", "ViTEncoderAdapter", "TimmViTAdapter", "timm_tower", "is_timm_vit"]

#: ``(embed module, its positional args, its output) -> (H, W)`` patch grid of the current call
GridFn = Callable[[nn.Module, tuple, Any], "Grid | None"]
#: ``(attention module, its input (B, L, D), class index) -> (q_cls (B, h, 1, hd), k (B, h, L, hd))``
QKFn = Callable[[nn.Module, Tensor, int], "tuple[Tensor, Tensor]"]


@dataclass
class EncoderTower:
    """The parts of a ViT an in-encoder adapter hooks into.

    Attributes:
        blocks: the transformer blocks, in order.
        embed: patch-embedding module; a forward hook on it records each call's patch grid.
        num_prefix: P, the tokens in front of the patches (class, registers, distillation).
        cls_index: index of the class token among the prefix tokens, ``None`` if there is none.
        batch_first: whether blocks exchange ``(B, L, D)`` tensors (else ``(L, B, D)``).
        grid: the configured patch grid ``(H, W)``, used when no call-specific grid was recorded.
        grid_of: computes the grid of one call from the embed module's input/output.
        attention: ``block -> attention module``; raises ``ValueError`` when q/k cannot be recomputed.
        cls_qk: class-query and key heads from the attention module's input.
    """

    blocks: Sequence[nn.Module]
    embed: nn.Module
    num_prefix: int
    cls_index: int | None
    batch_first: bool
    grid: Grid | None
    grid_of: GridFn
    attention: Callable[[nn.Module], nn.Module]
    cls_qk: QKFn


class ViTEncoderAdapter(Adapter):
    """Base for adapters that reduce patch tokens between two blocks of a ViT encoder.

    Options:
        layer: the reduction happens on the output of block ``layer`` (``int``, default 0, negative
            values count from the end like Python indices).

    After each forward: ``stats = {"tokens_in": N, "tokens_out": M, "layer": resolved_index}`` and
    ``last_reduction`` (the :class:`~mmeff.core.Reduction` of the patch tokens, ``(B, M, D)``).
    Subclasses implement :meth:`tower`.
    """

    option_names = frozenset({"layer"})

    def __init__(self, model: nn.Module, reducer: TokenReducer, **options: Any) -> None:
        super().__init__(model, reducer, **options)
        layer = options.get("layer", 0)
        if isinstance(layer, bool) or not isinstance(layer, int):
            raise TypeError(f"layer must be an int block index, got {layer!r}")
        self.requested_layer: int = layer
        self.layer: int | None = None
        self.last_reduction: Reduction | None = None
        self._tower: EncoderTower | None = None
        self._grid: Grid | None = None
        self._scores: Tensor | None = None

    # ------------------------------------------------------------------------------------ to override
    def tower(self) -> EncoderTower:
        """Describe the encoder of ``self.model``; raise ``ValueError`` if it cannot be handled."""
        raise NotImplementedError

    def hosts(self) -> list[nn.Module]:
        """Modules that record the attached adapter in ``_mmeff_adapter`` (the model, the tower)."""
        return [self.model]

    # ----------------------------------------------------------------------------------------- attach
    def attach(self) -> None:
        """Validate ``layer`` and hook the patch embedding, block ``layer`` and (cls_attn) its attention."""
        hosts = list({id(m): m for m in self.hosts()}.values())
        for m in hosts:
            if m.__dict__.get("_mmeff_adapter") is not None:
                raise ValueError(
                    "this model already has an mmeff method attached; remove it or pass several reducers to one apply()"
                )
        tower = self.tower()
        depth = len(tower.blocks)
        if not -depth <= self.requested_layer < depth:
            raise ValueError(
                f"layer={self.requested_layer} is out of range for an encoder with {depth} blocks; "
                f"use 0..{depth - 1} (or -{depth}..-1 from the end)"
            )
        self.layer = self.requested_layer % depth
        block = tower.blocks[self.layer]
        attn = None
        if "scores" in self.reducer.needs:
            if tower.cls_index is None:
                raise ValueError(
                    f"{self.reducer.describe()} needs CLS attention scores, but this {type(self.model).__name__} "
                    "has no class token; use a reducer that does not need context.scores"
                )
            attn = tower.attention(block)
        self._tower = tower
        self._hook(tower.embed.register_forward_hook(self._record_grid))
        if attn is not None:
            self._hook(attn.register_forward_pre_hook(self._capture_scores, with_kwargs=True))
        self._hook(block.register_forward_hook(self._reduce, with_kwargs=True))
        for m in hosts:
            self._override(m, "_mmeff_adapter", self)

    # ------------------------------------------------------------------------------------------ hooks
    def _record_grid(self, module: nn.Module, args: tuple, output: Any) -> None:
        assert self._tower is not None
        self._grid = self._tower.grid_of(module, args, output)
        # a new image batch starts here: never let scores of an earlier call leak into this one
        self._scores = None

    def _capture_scores(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        tower = self._tower
        assert tower is not None and tower.cls_index is not None
        x = args[0] if args else next((v for v in kwargs.values() if isinstance(v, Tensor)), None)
        if x is None:
            raise ValueError(f"cls_attn: cannot find the input of attention module {type(module).__name__}")
        if not tower.batch_first:
            x = x.transpose(0, 1)
        # scores only pick which tokens survive; no gradient flows through the selection anyway
        with torch.no_grad():
            q, k = tower.cls_qk(module, x, tower.cls_index)
            probs = cls_attention(q, k)
        self._scores = probs[:, tower.num_prefix :]

    def _reduce(self, module: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> Tensor:
        tower = self._tower
        assert tower is not None
        if any(isinstance(a, Tensor) for a in (*args[1:], *kwargs.values())):
            # a mask sized for the full sequence cannot be applied to the later, shorter blocks
            raise ValueError(
                "in-encoder token reduction does not support attention masks or other tensor inputs to the blocks"
            )
        if not isinstance(output, Tensor) or output.dim() != 3:
            raise ValueError(f"block {self.layer} returned {type(output).__name__}, expected a (B, L, D) tensor")
        x = output if tower.batch_first else output.transpose(0, 1)
        p = tower.num_prefix
        prefix, patches = x[:, :p], x[:, p:]
        n = patches.shape[1]
        grid = self._grid_for(n)
        if grid is None and "grid" in self.reducer.needs:
            raise ValueError(
                f"{self.reducer.describe()} needs the patch grid, but the {n} patch tokens at block {self.layer} "
                f"do not fill the recorded grid {self._grid or tower.grid} (patch dropout in training mode?)"
            )
        scores, self._scores = self._scores, None
        if "scores" in self.reducer.needs and scores is None:
            raise ValueError(f"cls_attn: no CLS attention was captured at block {self.layer} during this forward")
        red = self.reducer(patches, TokenContext(grid=grid, scores=scores))
        self.stats = {"tokens_in": n, "tokens_out": red.num_tokens, "layer": self.layer}
        self.last_reduction = red
        if red.tokens is patches:
            # keep-all: hand back the block's own tensor, whose (possibly non-contiguous) layout the
            # later matmuls were going to see, so the result is bit-identical to the plain model
            return output
        out = torch.cat([prefix, red.tokens.to(x.dtype)], dim=1) if p else red.tokens.to(x.dtype)
        return out if tower.batch_first else out.transpose(0, 1)

    def _grid_for(self, n: int) -> Grid | None:
        assert self._tower is not None
        for g in (self._grid, self._tower.grid):
            if g is not None and math.prod(g) == n:
                return tuple(int(v) for v in g)
        return None


# ---------------------------------------------------------------------------------------------- timm


def _timm_grid(embed: nn.Module, args: tuple, output: Any) -> Grid | None:
    if isinstance(output, Tensor) and output.dim() == 4:
        # dynamic_img_size models defer flattening: the embed returns NHWC
        return int(output.shape[1]), int(output.shape[2])
    if not args or not isinstance(args[0], Tensor):
        return None
    hw = tuple(int(s) for s in args[0].shape[-2:])
    if hasattr(embed, "dynamic_feat_size"):
        # accounts for dynamic_img_pad (ceil) and hybrid CNN stems
        return tuple(int(v) for v in embed.dynamic_feat_size(hw))
    grid = getattr(embed, "grid_size", None)
    return tuple(int(v) for v in grid) if grid is not None else None


def _timm_attention(block: nn.Module) -> nn.Module:
    attn = getattr(block, "attn", None)
    if not isinstance(attn, Attention):
        raise ValueError(
            f"cls_attn: block {type(block).__name__} has attention {type(attn).__name__}; only timm.layers.Attention "
            "(fused qkv projection) is supported"
        )
    return attn


def _timm_cls_qk(attn: nn.Module, x: Tensor, cls_index: int) -> tuple[Tensor, Tensor]:
    b, n, _ = x.shape
    h, hd = attn.num_heads, attn.head_dim
    ad = h * hd
    qkv = attn.qkv
    if type(qkv) is nn.Linear:
        # project only the class query and the keys instead of the full q/k/v for every token
        w, bias = qkv.weight, qkv.bias
        q = F.linear(x[:, cls_index : cls_index + 1], w[:ad], None if bias is None else bias[:ad])
        k = F.linear(x, w[ad : 2 * ad], None if bias is None else bias[ad : 2 * ad])
    else:
        # quantised or wrapped projections: call them the way the host does
        out = qkv(x)
        q, k = out[:, cls_index : cls_index + 1, :ad], out[..., ad : 2 * ad]
    q = q.reshape(b, 1, h, hd).transpose(1, 2)
    k = k.reshape(b, n, h, hd).transpose(1, 2)
    # q_norm/k_norm normalise each head vector, so applying them to the sliced rows is exact
    return attn.q_norm(q), attn.k_norm(k)


def timm_tower(vit: nn.Module) -> EncoderTower:
    """Describe a timm ``VisionTransformer``: blocks, ``num_prefix_tokens`` prefix, class token at 0."""
    has_cls = bool(getattr(vit, "has_class_token", getattr(vit, "cls_token", None) is not None))
    grid = getattr(vit.patch_embed, "grid_size", None)
    return EncoderTower(
        blocks=vit.blocks,
        embed=vit.patch_embed,
        num_prefix=int(vit.num_prefix_tokens),
        # _pos_embed concatenates [cls, registers, patches]
        cls_index=0 if has_cls else None,
        batch_first=True,
        grid=tuple(int(v) for v in grid) if grid is not None else None,
        grid_of=_timm_grid,
        attention=_timm_attention,
        cls_qk=_timm_cls_qk,
    )


@register_adapter
class TimmViTAdapter(ViTEncoderAdapter):
    """timm ``VisionTransformer``: reduce patch tokens after block ``layer`` (option, default 0).

    Works with class/register/distillation prefix tokens, LayerScale, qk-norm, fused attention,
    ``dynamic_img_size``/``dynamic_img_pad`` and every ``global_pool``. ``cls_attn`` needs a class
    token and ``timm.layers.Attention`` blocks. Attention masks passed to ``forward`` are rejected.
    """

    name = "timm_vit"
    description = "timm VisionTransformer: reduce patch tokens inside the encoder after block `layer`"

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return is_timm_vit(model)

    def tower(self) -> EncoderTower:
        if not is_timm_vit(self.model):
            raise ValueError(f"TimmViTAdapter needs a timm VisionTransformer, got {type(self.model).__name__}")
        return timm_tower(self.model)
