"""VisToG's attachment: semantic tokens in the vision tower (CLIP/SigLIP towers, Qwen2-VL / Qwen2.5-VL side stream)
and the grouping step run by the host's reducer adapter. The algorithm is in :mod:`mmeff.methods.vistog`."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from transformers.models.qwen2_vl.modeling_qwen2_vl import apply_rotary_pos_emb_vision

from mmeff.adapters.base import Adapter, find_adapter, register_adapter
from mmeff.methods.vistog import SEMANTIC_KEY, Grouping, VisToG, isolation_mask, qwen_widths, vision_host

__all__ = ["VisToGAdapter"]


@register_adapter
class VisToGAdapter(Adapter):
    """Attaches a :class:`VisToG` to a model; ``detach()`` undoes everything.

    CLIP towers (LLaVA): the semantic tokens join the sequence after the patch embedding and the isolation
    mask goes into every layer; the host's reducer adapter runs the grouping before the projector (and
    shrinks the image placeholders to M per image).

    Qwen2-VL: the ViT packs all images into one sequence with per-frame attention and a 2x2 PatchMerger,
    so the semantic tokens run beside it instead. After each block, hooks update them with the block's
    own modules (``norm1``, ``attn.qkv`` with the patches' keys/values as the host computed and rotated
    them, ``attn.proj``, ``norm2``, ``mlp``): they attend to every patch of their image and to each other,
    without rotary position. That is exactly the joint sequence under the isolation mask, and the host's
    patch computation is untouched. Each semantic token then goes through the PatchMerger as a 2x2 window
    of copies of itself, and the grouping runs on the merger's output (where this library's reducers run
    on Qwen2-VL), M tokens per image or video.

    Qwen2.5-VL: the same side stream. Its tower runs most blocks in windows over a window-ordered patch
    sequence; the semantic tokens still attend to every patch of their image in every block (a semantic
    token summarises the whole image; attention over a set does not depend on the order), and the
    patches keep the host's windows.

    ``stats`` after a forward: ``{"tokens_in": N, "tokens_out": M, ...}`` plus the VLM adapter's.
    """

    name = "vistog"
    description = "VisToG semantic-token grouping (HF CLIP towers / LLaVA, Qwen2-VL, Qwen2.5-VL)"
    method_type: ClassVar[type] = VisToG

    def __init__(self, model: nn.Module, vistog: VisToG, **options: Any) -> None:
        super().__init__(model, vistog, **options)
        self.vistog = vistog
        self.kind, self.tower = vision_host(model)
        if self.kind == "qwen2_vl":
            width, out = qwen_widths(self.tower.config)
        else:
            width = out = int(self.tower.config.hidden_size)
        if vistog.token_dim != width or vistog.dim != out:
            raise ValueError(f"VisToG (token_dim {vistog.token_dim}, dim {vistog.dim}) does not match the vision tower "
                             f"(width {width}, grouping width {out}); build it with VisToG.for_model(model)")
        impl = str(getattr(self.tower.config, "_attn_implementation", "") or "")
        if "flash" in impl and self.kind == "clip":
            raise ValueError("VisToG's isolation mask needs eager or sdpa attention in the vision tower, not " + impl)
        self.vlm = self.tower is not model and hasattr(model, "get_image_features")
        self.inner: Adapter | None = None
        self._own: dict[str, Any] = {}
        self._mask: Tensor | None = None
        # Qwen2-VL side stream of one vision call: image ranges, running semantic tokens, merged results
        self._ranges: list[tuple[int, int]] = []
        self._sem: Tensor | None = None
        self._qkv: Tensor | None = None
        self._merged: list[Tensor] = []

    def attach(self) -> None:
        for m in (self.model, self.tower):
            if m.__dict__.get("_mmeff_vistog_adapter") is not None:
                raise ValueError("VisToG is already attached to this model; unpatch it first")
        if self.kind == "clip":
            self._hook(self.tower.embeddings.register_forward_hook(self._append))
            for layer in self.tower.encoder.layers:
                self._hook(layer.register_forward_pre_hook(self._isolate, with_kwargs=True))
        else:
            if not self.vlm:
                raise TypeError("VisToG on Qwen2-VL attaches to the whole Qwen2VLForConditionalGeneration")
            self._hook(self.tower.register_forward_pre_hook(self._q_begin, with_kwargs=True))
            for block in self.tower.blocks:
                self._hook(block.attn.qkv.register_forward_hook(self._q_keys))
                self._hook(block.register_forward_hook(self._q_block, with_kwargs=True))
            self._hook(self.tower.register_forward_hook(self._q_end))
        if self.vlm:
            stage = "post_projector" if self.kind == "qwen2_vl" else "pre_projector"
            self.inner = find_adapter(self.model)(self.model, Grouping(vistog=self.vistog), stage=stage)
            self.inner.attach()
            if self.kind == "qwen2_vl":
                self._override(self.inner, "encode", self._q_encode(self.inner.encode))
        for m in {id(self.model): self.model, id(self.tower): self.tower}.values():
            self._override(m, "_mmeff_vistog_adapter", self)

    def detach(self) -> None:
        try:
            if self.inner is not None:
                self.inner.detach()
                self.inner = None
        finally:
            super().detach()
            self._sem = self._qkv = None
            self._merged = []

    @property
    def stats(self) -> dict[str, Any]:  # type: ignore[override]
        out = dict(self._own)
        if self.inner is not None:
            out.update(self.inner.stats)
        return out

    @stats.setter
    def stats(self, value: dict[str, Any]) -> None:
        self._own = dict(value)

    @property
    def last_assignment(self) -> list[Tensor]:
        """Each image's patch -> group index ``(1, N)`` from the last VLM forward."""
        reds = getattr(self.inner, "last_reductions", None) or []
        return [r.assignment for r in reds]

    # ------------------------------------------------------------------------------- CLIP towers
    def _append(self, module: nn.Module, args: tuple, out: Tensor) -> Tensor:
        b, n, _ = out.shape
        sem = self.vistog.semantic.to(out.dtype).unsqueeze(0).expand(b, -1, -1)
        self._mask = isolation_mask(n, self.vistog.num_groups, out.dtype, out.device,
                                    self.vistog.semantic_self_attention)
        self._own = {"tokens_in": n - 1 if hasattr(module, "class_embedding") else n,
                     "tokens_out": self.vistog.num_groups}
        return torch.cat([out, sem], dim=1)

    def _isolate(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
        hidden = args[0] if args else kwargs["hidden_states"]
        if self._mask is None or hidden.shape[1] != self._mask.shape[-1]:
            raise RuntimeError(f"VisToG: an encoder layer got {hidden.shape[1]} tokens, expected "
                               f"{None if self._mask is None else self._mask.shape[-1]} (patch embedding not hooked?)")
        mask = self._mask.to(hidden.dtype)
        given = args[1] if len(args) > 1 else kwargs.get("attention_mask")
        if given is not None:
            mask = mask + given
        if len(args) > 1:
            return (args[0], mask, *args[2:]), kwargs
        return args, {**kwargs, "attention_mask": mask}

    # ---------------------------------------------------------------------------------- Qwen2-VL
    def _q_begin(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        grid = kwargs.get("grid_thw", args[1] if len(args) > 1 else None)
        if grid is None:
            raise ValueError("VisToG: the Qwen2-VL vision transformer was called without grid_thw")
        sizes = [int(t) * int(h) * int(w) for t, h, w in grid.tolist()]
        starts = [sum(sizes[:i]) for i in range(len(sizes))]
        self._ranges = [(a, a + n) for a, n in zip(starts, sizes)]
        self._sem = self.vistog.semantic.unsqueeze(0).expand(len(sizes), -1, -1)
        self._own = {"tokens_in": sum(sizes) // int(module.spatial_merge_size) ** 2,
                     "tokens_out": len(sizes) * self.vistog.num_groups}

    def _q_keys(self, module: nn.Module, args: tuple, out: Tensor) -> None:
        self._qkv = out

    def _q_block(self, block: nn.Module, args: tuple, kwargs: dict[str, Any], out: Tensor) -> None:
        if self._sem is None or self._qkv is None:
            raise RuntimeError("VisToG: a Qwen2-VL block ran outside a hooked vision forward")
        attn = block.attn
        heads = int(attn.num_heads)
        qkv, self._qkv = self._qkv, None
        n = qkv.shape[0]
        _, k, v = qkv.reshape(n, 3, heads, -1).unbind(1)  # (N, H, hd) each, split as the host splits them
        cos, sin = kwargs["position_embeddings"]
        _, k = apply_rotary_pos_emb_vision(k, k, cos, sin)  # the patches' keys as the host rotates them
        sem = self._sem.to(qkv.dtype)
        i, m, e = sem.shape
        sq, sk, sv = attn.qkv(block.norm1(sem)).reshape(i, m, 3, heads, -1).unbind(2)  # (I, M, H, hd)
        work = torch.promote_types(qkv.dtype, torch.float32)  # softmax in fp32 for half models, fp64 stays
        outs = []
        for j, (a, b) in enumerate(self._ranges):
            keys, vals = torch.cat([k[a:b], sk[j]]), torch.cat([v[a:b], sv[j]])
            bias = None  # without semantic self-attention each semantic token sees the patches and itself
            if not self.vistog.semantic_self_attention:
                bias = isolation_mask(b - a, m, work, sem.device, False)[0, 0, b - a:]
            logits = torch.einsum("mhd,nhd->hmn", sq[j].to(work), keys.to(work)) * attn.scaling
            if bias is not None:
                logits = logits + bias
            outs.append(torch.einsum("hmn,nhd->mhd", logits.softmax(-1), vals.to(work)).reshape(m, e))
        sem = sem + attn.proj(torch.stack(outs).to(sem.dtype))
        self._sem = sem + block.mlp(block.norm2(sem))

    def _q_end(self, module: nn.Module, args: tuple, out: Any) -> None:
        merger = module.merger
        window = int(module.spatial_merge_size) ** 2
        # a semantic token is no 2x2 window: it enters the merger as a window of copies of itself
        merged = merger.mlp(merger.ln_q(self._sem).repeat(1, 1, window))
        self._merged.extend(merged.unbind(0))
        self._sem = None

    def _q_encode(self, encode: Any) -> Any:
        def vistog_encode(call: dict[str, Any]) -> list[Any]:
            self._merged = []
            items = encode(call)
            merged, self._merged = self._merged, []
            if merged and len(merged) != len(items):
                raise RuntimeError(f"VisToG: {len(merged)} semantic sets for {len(items)} visual items")
            for j, it in enumerate(items):
                it.extras[SEMANTIC_KEY] = merged[j] if merged else None
            return items

        return vistog_encode
