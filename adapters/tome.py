"""ToMe's attachment to ViT encoders (timm, open_clip, HF CLIP/SigLIP towers) and its one-line patch.

The configuration and ``parse_r`` are in :mod:`mmeff.methods.tome`, the merge in :mod:`mmeff.kernels.merge`.

One line for users::

    handle = mmeff.tome.patch(vit, r=16)            # or r=[..per block..] or r=(16, -0.5)
    logits = vit(images)
    mmeff.tome.unpatch(vit)

How it attaches: the host's own blocks run, each with its own norms, LayerScale, drop-path, q/k norm
and (fused) attention; only the block's ``forward`` attribute is replaced, on the instance, by the
same two residual steps with the merge between them. ``attach`` refuses blocks whose class forward is
not the one this module follows (so a new host version fails loudly, not silently). The merge metric
is taken by a hook where the host computes its keys (timm ``attn.k_norm``, HF ``self_attn.k_proj``);
open_clip's ``nn.MultiheadAttention`` has no key module, so the head-averaged key projection (1/heads
of the key cost) is applied to the attention input in a pre-hook. Proportional attention is a float
``attn_mask``/``attention_mask``, which fused SDPA accepts (flash-attention does not: refused).

Un-merging: with ``unmerge=True`` every block hands on the *full* token grid (each merged token copied
to all the tokens it holds) and the next block gathers one copy back, so the compute is that of the
merged model while ``hidden_states``, ``last_hidden_state``, dense heads and VLM features keep their
original length. This is the default inside HF towers (LLaVA counts image placeholders on it); timm and
open_clip default to the shrinking ToMe behaviour. ``handle.unmerge(x)`` maps any merged ``(B, N', D)``
output back to ``(B, N, D)``; ``trace_source=True`` keeps ToMe's one-hot ``source`` ``(B, N', N)``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from timm.layers import Attention
from timm.models.vision_transformer import Block
from torch import Tensor, nn

from mmeff.adapters.base import Adapter, register_adapter
from mmeff.core import attach_cleanly
from mmeff.hosts import VitHost, vit_host
from mmeff.kernels.merge import bipartite_soft_matching, merge_source, merge_wavg
from mmeff.methods.tome import Schedule, ToMe, parse_r

__all__ = ["ToMe", "ToMeAdapter", "ToMeHost", "find_host", "parse_r", "patch", "unpatch"]

#: the encoder lookup lives in :mod:`mmeff.hosts`; these names stay for code written against ToMe
ToMeHost = VitHost
find_host = vit_host


# ------------------------------------------------------------------------------------------- hosts


def _check_blocks(host: VitHost) -> None:
    """Refuse blocks whose forward differs from the one the ToMe forwards below follow."""
    if host.kind == "timm":
        expected, what = Block.forward, "timm.models.vision_transformer.Block"
        for i, b in enumerate(host.blocks):
            if type(getattr(b, "attn", None)).forward is not Attention.forward:
                raise TypeError(
                    f"ToMe: block {i} has attention {type(getattr(b, 'attn', None)).__name__}; only timm.layers.Attention"
                )
    elif host.kind == "open_clip":
        from open_clip.transformer import ResidualAttentionBlock

        expected, what = ResidualAttentionBlock.forward, "open_clip ResidualAttentionBlock"
        for i, b in enumerate(host.blocks):
            if type(b.attn) is not nn.MultiheadAttention or not b.attn.batch_first or hasattr(b, "ln_1_kv"):
                raise TypeError(
                    f"ToMe: open_clip block {i} is not a batch-first nn.MultiheadAttention self-attention block"
                )
    else:
        expected = type(host.blocks[0]).forward
        what = type(host.blocks[0]).__name__
    for i, b in enumerate(host.blocks):
        if type(b).forward is not expected:
            raise TypeError(
                f"ToMe: block {i} is a {type(b).__name__} whose forward is not {what}.forward; unsupported"
            )


# ----------------------------------------------------------------------------------------- adapter


@register_adapter
class ToMeAdapter(Adapter):
    """Attaches a :class:`ToMe` configuration to a model; ``detach()`` restores every block.

    After each forward:
        ``stats``: ``{"tokens_in": N, "tokens_out": N', "r": [per block]}``;
        ``size`` ``(B, N', 1)`` tokens held by each output, ``pos`` ``(B, N)`` output row of each input
        token, ``source`` ``(B, N', N)`` with ``trace_source``.
    """

    name = "tome"
    description = "ToMe token merging inside timm / open_clip / HF CLIP ViT encoders"
    method_type: ClassVar[type] = ToMe

    def __init__(self, model: nn.Module, tome: ToMe, **options: Any) -> None:
        super().__init__(model, tome, **options)
        self.tome: ToMe = tome
        self.host = vit_host(model, 'ToMe')
        _check_blocks(self.host)
        self.r_list = parse_r(len(self.host.blocks), tome.r)
        self.unmerge_blocks = self.host.kind == "hf" if tome.unmerge is None else bool(tome.unmerge)
        if self.host.vlm and not self.unmerge_blocks:
            raise ValueError(
                f"{type(model).__name__} counts image placeholders on the vision tower's full grid; use ToMe(unmerge=True)"
            )
        self.size: Tensor | None = None
        self.pos: Tensor | None = None
        self.source: Tensor | None = None
        self._rep: Tensor | None = None
        self._metric: Tensor | None = None
        self._n0 = 0

    # ----------------------------------------------------------------------------------------- attach
    def attach(self) -> None:
        """Replace each block's forward and hook the key projections and the patch embedding."""
        for m in (self.model, self.host.root):
            if m.__dict__.get("_mmeff_tome_adapter") is not None:
                raise ValueError("ToMe is already attached to this model; unpatch it first")
        h = self.host
        self._hook(h.start.register_forward_pre_hook(self._begin))
        forward = {"timm": self._timm_forward, "open_clip": self._oc_forward, "hf": self._hf_forward}[h.kind]
        for i, block in enumerate(h.blocks):
            self._override(block, "forward", _BlockForward(forward, block, i))
            if h.kind == "timm":
                self._hook(block.attn.k_norm.register_forward_hook(self._timm_metric))
            elif h.kind == "hf":
                self._hook(block.self_attn.k_proj.register_forward_hook(_HFMetric(self, block.self_attn)))
            else:
                self._hook(block.attn.register_forward_pre_hook(self._oc_metric))
        for m in {id(self.model): self.model, id(h.root): h.root}.values():
            self._override(m, "_mmeff_tome_adapter", self)

    # ------------------------------------------------------------------------------------ per forward
    def _begin(self, module: nn.Module, args: tuple) -> None:
        # timm / open_clip checkpoint their blocks whenever the flag is set, in eval mode too (HF only
        # when training); a recomputed block would run on the merge state of the end of the forward
        recompute = self.host.root.training or (self.host.kind != "hf" and torch.is_grad_enabled())
        if recompute and _checkpointing(self.host):
            raise ValueError("ToMe keeps per-forward merge state and cannot run under gradient checkpointing")
        self.size = self.pos = self.source = self._rep = self._metric = None
        self._n0 = 0
        self.stats = {}

    def _enter(self, x: Tensor) -> Tensor:
        if not self._n0:
            self._n0 = x.shape[1]
        if self.unmerge_blocks and self._rep is not None:
            if x.shape[1] != self._n0:
                raise ValueError(
                    f"ToMe(unmerge=True): block input has {x.shape[1]} tokens, expected {self._n0}"
                )
            return x.gather(1, self._rep.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
        return x

    def _leave(self, x: Tensor) -> Tensor:
        n = x.shape[1]
        self.stats = {"tokens_in": self._n0, "tokens_out": n, "r": list(self.r_list)}
        if self.unmerge_blocks and self.pos is not None:
            return x.gather(1, self.pos.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
        return x

    def _bias(self, x: Tensor) -> Tensor | None:
        """``log(size)`` as ``(B, 1, 1, N)`` in ``x``'s dtype, or ``None`` before the first merge."""
        if not self.tome.prop_attn or self.size is None:
            return None
        return self.size.log().to(x.dtype)[:, None, None, :, 0]

    def _merge(self, i: int, x: Tensor) -> Tensor:
        metric, self._metric = self._metric, None
        r = self.r_list[i]
        if r <= 0:
            return x
        if metric is None or metric.shape[:2] != x.shape[:2]:
            raise RuntimeError(f"ToMe: block {i} produced no key metric for its {x.shape[1]} tokens")
        b, n = x.shape[:2]
        n_out = n - min(r, (n - self.host.prefix) // 2)
        if n_out == n:
            return x
        merge, unmerge = bipartite_soft_matching(metric, r, prefix=self.host.prefix, faithful=self.tome.faithful)
        # row of each current token after the merge (unmerge copies a row index to every member)
        inv = unmerge(torch.arange(n_out, device=x.device).view(1, n_out, 1).expand(b, n_out, 1))[..., 0]
        if self.tome.trace_source:
            # float32 one-hot rows: counts stay exact in half-precision models
            src = self.source if self.source is not None else torch.eye(n, device=x.device).expand(b, n, n)
            self.source = merge_source(merge, x, src)
        size = self.size if self.size is not None else x.new_ones(b, n, 1, dtype=torch.float32)
        merged, self.size = merge_wavg(merge, x.float() if x.dtype != torch.float32 else x, size)
        self.pos = inv if self.pos is None else inv.gather(1, self.pos)
        # one member per merged row: every member holds the same value once un-merged
        self._rep = torch.zeros(b, n_out, dtype=torch.long, device=x.device).scatter_(
            1, self.pos, torch.arange(self._n0, device=x.device).expand(b, self._n0)
        )
        return merged.to(x.dtype)

    # ------------------------------------------------------------------------------ host forwards
    def _timm_forward(
        self, block: nn.Module, i: int, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False
    ) -> Tensor:
        if attn_mask is not None or is_causal:
            raise ValueError("ToMe: attention masks / causal attention cannot follow merged tokens")
        x = self._enter(x)
        x = x + block.drop_path1(block.ls1(block.attn(block.norm1(x), attn_mask=self._bias(x))))
        x = self._merge(i, x)
        x = x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))
        return self._leave(x)

    def _oc_forward(
        self,
        block: nn.Module,
        i: int,
        q_x: Tensor,
        k_x: Tensor | None = None,
        v_x: Tensor | None = None,
        attn_mask: Tensor | None = None,
    ) -> Tensor:
        if k_x is not None or v_x is not None or attn_mask is not None:
            raise ValueError("ToMe: open_clip cross-attention or attention masks cannot follow merged tokens")
        x = self._enter(q_x)
        bias = self._bias(x)
        if bias is not None:
            # nn.MultiheadAttention takes a float mask per (batch * head): (B*H, N, N)
            b, n = x.shape[:2]
            heads = block.attn.num_heads
            bias = bias.expand(b, heads, n, n).reshape(b * heads, n, n)
        x = x + block.ls_1(block.attention(q_x=block.ln_1(x), attn_mask=bias))
        x = self._merge(i, x)
        x = x + block.ls_2(block.mlp(block.ln_2(x)))
        return self._leave(x)

    def _hf_forward(
        self,
        layer: nn.Module,
        i: int,
        hidden_states: Tensor,
        attention_mask: Tensor | None = None,
        **kwargs: Any,
    ) -> Tensor:
        if attention_mask is not None:
            raise ValueError("ToMe: attention masks cannot follow merged tokens")
        attn = layer.self_attn
        x = self._enter(hidden_states)
        bias = self._bias(x)
        if bias is not None and "flash" in str(getattr(attn.config, "_attn_implementation", "")):
            raise ValueError("ToMe proportional attention needs sdpa or eager attention, not flash-attention")
        h, _ = attn(hidden_states=layer.layer_norm1(x), attention_mask=bias, **kwargs)
        x = x + h
        x = self._merge(i, x)
        x = x + layer.mlp(layer.layer_norm2(x))
        return self._leave(x)

    # --------------------------------------------------------------------------------- metric hooks
    def _timm_metric(self, module: nn.Module, args: tuple, out: Tensor) -> None:
        self._metric = out.mean(1)  # (B, H, N, hd) -> (B, N, hd), as ToMe's k.mean(1)

    def _oc_metric(self, module: nn.Module, args: tuple) -> None:
        x = args[1] if len(args) > 1 else args[0]
        d, heads = module.embed_dim, module.num_heads
        w = module.in_proj_weight[d : 2 * d].view(heads, d // heads, d).mean(0)
        bias = module.in_proj_bias
        b = None if bias is None else bias[d : 2 * d].view(heads, d // heads).mean(0)
        with torch.no_grad():
            self._metric = F.linear(x, w, b)

    # ------------------------------------------------------------------------------------- user API
    def set_r(self, r: Schedule) -> None:
        """Change the merge schedule for the next forwards (e.g. a new degree per training step)."""
        self.tome.r = r
        self.r_list = parse_r(len(self.host.blocks), r)

    def unmerge(self, x: Tensor) -> Tensor:
        """Map the last forward's merged ``x`` ``(B, N', D)`` back to ``(B, N, D)`` (copies per member)."""
        if self.pos is None:
            return x
        if x.dim() != 3 or x.shape[1] != int(self._rep.shape[1]):  # type: ignore[union-attr]
            raise ValueError(f"unmerge expects (B, {self._rep.shape[1]}, D), got {tuple(x.shape)}")  # type: ignore[union-attr]
        return x.gather(1, self.pos.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


class _BlockForward:
    """Bound replacement forward for one block (a callable object so ``detach`` can restore it)."""

    def __init__(self, fn: Callable[..., Tensor], block: nn.Module, index: int) -> None:
        self.fn, self.block, self.index = fn, block, index

    def __call__(self, *args: Any, **kwargs: Any) -> Tensor:
        return self.fn(self.block, self.index, *args, **kwargs)


class _HFMetric:
    def __init__(self, adapter: ToMeAdapter, attn: nn.Module) -> None:
        self.adapter, self.heads = adapter, int(getattr(attn, "num_heads", attn.config.num_attention_heads))

    def __call__(self, module: nn.Module, args: tuple, out: Tensor) -> None:
        b, n, d = out.shape
        self.adapter._metric = out.view(b, n, self.heads, d // self.heads).mean(2)


def _checkpointing(host: VitHost) -> bool:
    root = host.root
    if host.kind == "timm":
        return bool(getattr(root, "grad_checkpointing", False))
    if host.kind == "open_clip":
        return bool(getattr(root.transformer, "grad_checkpointing", False))
    return bool(getattr(getattr(root, "encoder", None), "gradient_checkpointing", False))


# ------------------------------------------------------------------------------------ one-liners


def patch(model: nn.Module, r: Schedule = 16, **options: Any) -> ToMeAdapter:
    """Attach ToMe permanently (``mmeff.tome.patch(model, r=16)``); returns the handle.

    ``options`` are the other :class:`ToMe` fields (``prop_attn``, ``trace_source``, ``unmerge``).
    """
    return attach_cleanly(ToMeAdapter(model, ToMe(r=r, **options)))


def unpatch(model: nn.Module) -> bool:
    """Remove ToMe attached by :func:`patch`; returns whether it was attached."""
    adapter = model.__dict__.get("_mmeff_tome_adapter")
    if adapter is None:
        return False
    adapter.detach()
    return True
