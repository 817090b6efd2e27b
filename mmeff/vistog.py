"""VisToG: visual token grouping with semantic tokens and isolated attention (arXiv 2411.17773).

M learnable *semantic tokens* join the patch tokens right after the vision encoder's patch embedding. In
every encoder layer an additive attention mask stops the class and patch tokens from attending to them,
so the original features come out exactly as the unmodified encoder's, while the semantic tokens read
the patches (and each other). At LLaVA's feature layer a *grouping layer* assigns every patch to one
semantic token (Gumbel-softmax over the query-key similarities, straight-through one-hot) and each group
becomes one token: the M grouped tokens are what the projector and the LLM see. The encoder itself gets
slightly more expensive (N + 1 + M tokens); the savings are in the LLM (M instead of N visual tokens).

Use::

    vistog = mmeff.vistog.VisToG.for_model(llava, num_groups=64)
    with mmeff.apply(llava, vistog):                  # 576 placeholders -> 64 tokens per image
        out = llava.generate(**inputs)
    vistog.save("vistog.safetensors")                 # VisToG.load(...) restores it

It needs training (the two-stage recipe of :func:`train_vistog`): a fresh grouping layer is random.

No official code exists; the spec is reconstructed from the abstract and reviews. Open points, decided:

* **Semantic tokens** have no position embedding (they are not patches) and pass the tower's
  ``pre_layrnorm`` like every token. ``init_std`` 0.02, as ViT class tokens.
* **Isolation**: the mask is applied in *every* encoder layer (after LLaVA's feature layer too, so all
  hidden states of the original tokens are preserved); semantic tokens attend to the class token, the
  patches and, with ``semantic_self_attention`` (default True), to each other. The mask is an additive
  float mask (``finfo.min``), which eager and SDPA attention take; flash-attention is refused.
* **Grouping layer** (GroupViT's grouping block, one of them): LayerNorm on both inputs, an assignment
  attention ``softmax_over_groups(q(S) k(P)^T / sqrt(d))`` with Gumbel noise while training
  (``gumbel``, ``tau``) and a hard straight-through one-hot (``hard``); each group is the mean of the
  values ``v(P)`` of its patches (empty groups get zero), projected and added to its semantic token,
  followed by a residual MLP (ratio 4). At inference the assignment is the noise-free argmax.
* **Which tokens are grouped**: the projector's input rows except the semantic tokens, i.e. the patches
  (LLaVA's ``"default"`` strategy) or class + patches (``"full"``); on Qwen2-VL the merged 2x2 tokens of
  each image or video (M groups per video, not per frame).
* **Positions** of the M grouped tokens in the LLM: consecutive, as text (LLaVA's 1-D positions are
  recomputed after the placeholders shrink); with explicit ``position_ids`` and on Qwen2-VL (M-RoPE,
  ``mrope="gather"``) a group takes its members' mean position, an empty group its image's centre.
* **Training**: stage 1 trains semantic tokens, grouping layer and projector with the LLM and tower
  frozen; stage 2 also unfreezes the LLM (LLaVA-1.5's recipe).

Hosts: HF ``LlavaForConditionalGeneration`` with a CLIP/SigLIP tower (and a bare HF CLIP/SigLIP vision
model, where the tower's output simply gains the M semantic tokens), and Qwen2-VL, whose packed
per-frame attention and 2x2 PatchMerger cannot take extra tokens: there the semantic tokens run as a side
stream through the ViT's own block modules (:class:`VisToGAdapter`), enter the merger as 2x2 windows of
copies of themselves, and the grouping runs on the merger's output. Qwen2.5-VL (windowed attention) is
refused.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from mmeff.adapters.base import Adapter, find_adapter
from mmeff.core import Reduction, TokenContext, TokenReducer

__all__ = ["VisToG", "VisToGAdapter", "GroupingLayer", "isolation_mask", "train_vistog", "vistog_flops"]

_FORMAT = "mmeff-vistog/1"


# ----------------------------------------------------------------------------------------- grouping


class GroupingLayer(nn.Module):
    """Assign ``N`` patch tokens to ``M`` groups and pool them: ``(B, M, D), (B, N, D) -> (B, M, D)``."""

    def __init__(self, dim: int, mlp_ratio: float = 4.0, gumbel: bool = True, tau: float = 1.0, hard: bool = True) -> None:
        super().__init__()
        self.norm_tokens = nn.LayerNorm(dim)
        self.norm_x = nn.LayerNorm(dim)
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)
        self.norm_out = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
        self.gumbel, self.tau, self.hard = gumbel, tau, hard
        self.scale = dim**-0.5

    def assign(self, semantic: Tensor, patches: Tensor) -> tuple[Tensor, Tensor]:
        """Soft-or-hard assignment ``(B, M, N)`` (each column sums to 1) and each patch's group ``(B, N)``.

        Training adds Gumbel noise (when ``gumbel``); with ``hard`` the forward value is one-hot and the
        gradient that of the softmax (straight-through)."""
        q = self.q(self.norm_tokens(semantic))
        k = self.k(self.norm_x(patches))
        logits = (q @ k.transpose(1, 2)).float() * self.scale  # (B, M, N)
        if self.training and self.gumbel:
            u = torch.rand_like(logits).clamp_(1e-9, 1 - 1e-9)
            logits = logits - torch.log(-torch.log(u))
        soft = F.softmax(logits / self.tau, dim=1)  # over groups: each patch picks one
        index = soft.argmax(dim=1)
        if not self.hard:
            return soft, index
        one_hot = F.one_hot(index, soft.shape[1]).transpose(1, 2).to(soft.dtype)
        # (soft - soft.detach()) is exactly zero, so the forward value is exactly one-hot
        return one_hot + (soft - soft.detach()), index

    def forward(self, semantic: Tensor, patches: Tensor) -> tuple[Tensor, Tensor]:
        """Grouped tokens ``(B, M, D)`` and each patch's group ``(B, N)`` long."""
        attn, index = self.assign(semantic, patches)
        # each group is the mean of its members' values (columns already sum to one per patch)
        weights = attn / (attn.sum(dim=2, keepdim=True).detach().clamp_min(1.0))
        pooled = weights.to(patches.dtype) @ self.v(self.norm_x(patches))
        x = semantic + self.proj(pooled)
        return x + self.mlp(self.norm_out(x)), index


def isolation_mask(n_original: int, n_semantic: int, dtype: torch.dtype, device: torch.device | str = "cpu",
                   semantic_self_attention: bool = True) -> Tensor:
    """Additive attention mask ``(1, 1, T, T)`` with ``T = n_original + n_semantic``: original tokens
    (class + patches, first) never attend to the semantic tokens (last); semantic tokens attend to the
    originals and, if ``semantic_self_attention``, to each other (else each to itself only)."""
    t = n_original + n_semantic
    mask = torch.zeros(t, t, dtype=dtype, device=device)
    low = torch.finfo(dtype).min
    mask[:n_original, n_original:] = low
    if not semantic_self_attention:
        block = torch.full((n_semantic, n_semantic), low, dtype=dtype, device=device)
        mask[n_original:, n_original:] = block.fill_diagonal_(0.0)
    return mask[None, None]


# ------------------------------------------------------------------------------------------ method


class VisToG(nn.Module):
    """The trainable part of VisToG (semantic tokens + grouping layer) and its configuration.

    Attach with ``mmeff.apply(model, vistog)``; build with :meth:`for_model`; save/load with
    :meth:`save`/:meth:`load`. ``num_groups`` (M) is the number of visual tokens per image the LLM reads.
    """

    name: ClassVar[str] = "vistog"

    def __init__(self, dim: int, num_groups: int = 64, *, token_dim: int | None = None, mlp_ratio: float = 4.0,
                 gumbel: bool = True, tau: float = 1.0, hard: bool = True, semantic_self_attention: bool = True,
                 init_std: float = 0.02) -> None:
        super().__init__()
        token_dim = dim if token_dim is None else token_dim
        if num_groups < 1 or dim < 1 or token_dim < 1:
            raise ValueError(f"VisToG needs num_groups, dim, token_dim >= 1, got {num_groups}, {dim}, {token_dim}")
        if tau <= 0:
            raise ValueError(f"tau must be > 0, got {tau}")
        self.dim, self.num_groups, self.token_dim = int(dim), int(num_groups), int(token_dim)
        self.semantic_self_attention = semantic_self_attention
        self.semantic = nn.Parameter(torch.randn(num_groups, token_dim) * init_std)
        self.grouping = GroupingLayer(dim, mlp_ratio, gumbel, tau, hard)
        self._cfg = {"dim": self.dim, "num_groups": self.num_groups, "token_dim": self.token_dim,
                     "mlp_ratio": mlp_ratio, "gumbel": gumbel, "tau": tau, "hard": hard,
                     "semantic_self_attention": semantic_self_attention}

    @property
    def config(self) -> dict[str, Any]:
        """Constructor arguments (what :meth:`save` stores)."""
        return dict(self._cfg)

    @classmethod
    def for_model(cls, model: nn.Module, num_groups: int = 64, **kwargs: Any) -> VisToG:
        """A fresh VisToG sized for ``model``'s vision tower, on its device and dtype: LLaVA or a bare HF
        CLIP/SigLIP vision model (grouping at the tower's width), or Qwen2-VL (semantic tokens at the
        ViT's width, grouping at the PatchMerger's output width)."""
        kind, tower = vision_host(model)
        param = next(tower.parameters())
        if kind == "qwen2_vl":
            vc = tower.config
            return cls(int(vc.hidden_size), num_groups, token_dim=int(vc.embed_dim), **kwargs).to(param.device,
                                                                                                  param.dtype)
        n = _num_patches(tower)
        if num_groups > n:
            raise ValueError(f"num_groups={num_groups} exceeds the {n} patch tokens of the vision tower")
        return cls(int(tower.config.hidden_size), num_groups, **kwargs).to(param.device, param.dtype)

    def describe(self) -> str:
        """One-line description for logs and errors."""
        return f"VisToG(num_groups={self.num_groups})"

    def forward(self, patches: Tensor, semantic: Tensor) -> tuple[Tensor, Tensor]:
        """Group ``patches`` ``(B, N, D)`` with the encoded semantic tokens ``(B, M, D)`` ->
        grouped tokens ``(B, M, D)`` and each patch's group ``(B, N)``."""
        if patches.dim() != 3 or patches.shape[-1] != self.dim or semantic.shape != (patches.shape[0], self.num_groups, self.dim):
            raise ValueError(f"VisToG expects patches (B, N, {self.dim}) and semantic (B, {self.num_groups}, "
                             f"{self.dim}); got {tuple(patches.shape)} and {tuple(semantic.shape)}")
        return self.grouping(semantic, patches)

    def save(self, path: str | Path, extra: Mapping[str, Any] | None = None) -> Path:
        """Write the parameters as safetensors with the configuration (and ``extra``) in the metadata."""
        from mmeff.checkpoint import save_module

        return save_module(self, path, _FORMAT, self.config, extra)

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu") -> VisToG:
        """Rebuild a saved VisToG (refuses files of another format)."""
        from mmeff.checkpoint import read_module

        cfg, _, sd = read_module(path, _FORMAT, "a VisToG file")
        dim, m = cfg.pop("dim"), cfg.pop("num_groups")
        out = cls(dim, m, **cfg)
        out.load_state_dict(sd, strict=True)
        dtype = next(iter(sd.values())).dtype
        return out.to(device=device, dtype=dtype)


@dataclass
class _Grouping(TokenReducer):
    """The grouping step as a token reducer, run by the VLM adapter on the projector's input:
    rows ``(B, N + M, D)`` (the tower's originals, then the semantic tokens) -> ``(B, M, D)``."""

    vistog: VisToG | None = field(default=None, repr=False)
    name: ClassVar[str] = "vistog"

    def reduce(self, tokens: Tensor, ctx: TokenContext) -> Reduction:
        m = self.vistog.num_groups
        semantic = ctx.extras.get(SEMANTIC_KEY)
        if semantic is not None:  # Qwen2-VL: merged patches here, merged semantic tokens beside them
            if any(t is None for t in semantic):
                raise ValueError("VisToG needs pixel values: pre-encoded features have no semantic tokens")
            if m > tokens.shape[1]:
                raise ValueError(f"VisToG: num_groups={m} exceeds the {tokens.shape[1]} merged tokens of this image")
            patches, sem = tokens, torch.stack(list(semantic)).to(tokens.dtype)
        else:  # LLaVA: the projector's rows are the originals, then the semantic tokens
            if tokens.shape[1] <= m:
                raise ValueError(f"VisToG: the projector got {tokens.shape[1]} rows, not originals + {m} semantic "
                                 "tokens; was the vision tower run without VisToG's hooks?")
            patches, sem = tokens[:, :-m], tokens[:, -m:]
        grouped, index = self.vistog(patches, sem)
        return GroupReduction(tokens=grouped.to(tokens.dtype), assignment=index)

    def default_stage(self, host: str) -> str:
        # LLaVA: before the projector, as the paper; Qwen2-VL: after the PatchMerger (it needs 2x2 windows)
        return "post_projector" if host == "qwen2_vl" else "pre_projector"

    def describe(self) -> str:
        return self.vistog.describe()


SEMANTIC_KEY = "vistog_semantic"


@dataclass
class GroupReduction(Reduction):
    """A grouping's bookkeeping (``assignment``: each patch's group). Positions: a group takes its members'
    mean; an empty group the mean of all its image's patches (the centre), not position 0."""

    def positions(self, pos: Tensor) -> Tensor:
        out = super().positions(pos)
        empty = self.sizes == 0  # (B, M)
        if not bool(empty.any()):
            return out
        squeeze = pos.dim() == 2
        p, o = (pos.unsqueeze(-1), out.unsqueeze(-1)) if squeeze else (pos, out)
        centre = p.to(torch.float64).mean(1, keepdim=True).round().to(o.dtype).expand_as(o)
        o = torch.where(empty.unsqueeze(-1), centre, o)
        return o.squeeze(-1) if squeeze else o


# ------------------------------------------------------------------------------------------ hosts


def vision_host(model: nn.Module) -> tuple[str, nn.Module]:
    """``("clip", tower)`` for HF LLaVA / CLIP / SigLIP vision models (the module with ``embeddings`` and
    ``encoder.layers``), ``("qwen2_vl", visual)`` for Qwen2-VL; ``TypeError`` naming the class otherwise."""
    from mmeff.tome import _hf_tower

    if not isinstance(model, nn.Module):
        raise TypeError(f"expected a torch.nn.Module, got {type(model).__name__}")
    if "qwen2_5_vl" in type(model).__module__:
        raise TypeError(f"VisToG does not support {type(model).__name__}: Qwen2.5-VL's windowed attention reorders "
                        "the patches; supported: HF LLaVA, CLIP/SigLIP vision models and Qwen2-VL")
    if "qwen2_vl" in type(model).__module__:
        visual = getattr(getattr(model, "model", model), "visual", None)
        if visual is None or not hasattr(visual, "merger"):
            raise TypeError(f"VisToG: cannot find the vision transformer of {type(model).__name__}")
        return "qwen2_vl", visual
    tower = _hf_tower(model)
    if tower is None:
        raise TypeError(f"VisToG does not support {type(model).__name__}; supported: HF LLaVA, CLIP/SigLIP vision "
                        "models and Qwen2-VL")
    return "clip", tower


def _num_patches(tower: nn.Module) -> int:
    cfg = tower.config
    return (int(cfg.image_size) // int(cfg.patch_size)) ** 2


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

    ``stats`` after a forward: ``{"tokens_in": N, "tokens_out": M, ...}`` plus the VLM adapter's.
    """

    name = "vistog"
    description = "VisToG semantic-token grouping (HF CLIP towers / LLaVA, Qwen2-VL)"
    method_type: ClassVar[type] = VisToG

    def __init__(self, model: nn.Module, vistog: VisToG, **options: Any) -> None:
        super().__init__(model, vistog, **options)
        self.vistog = vistog
        self.kind, self.tower = vision_host(model)
        width = int(self.tower.config.embed_dim if self.kind == "qwen2_vl" else self.tower.config.hidden_size)
        out = int(self.tower.config.hidden_size)
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
            self.inner = find_adapter(self.model)(self.model, _Grouping(vistog=self.vistog), stage=stage)
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
        from transformers.models.qwen2_vl.modeling_qwen2_vl import apply_rotary_pos_emb_vision

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


# ----------------------------------------------------------------------------------------- training


def _freeze(model: nn.Module, vistog: VisToG, stage: int) -> list[nn.Parameter]:
    """Trainable parameters of ``stage`` (1: VisToG + projector; 2: also the LLM); the rest frozen."""
    for p in model.parameters():
        p.requires_grad_(False)
    inner = model.model
    # the projector: LLaVA's MLP, or Qwen2-VL's PatchMerger (which the semantic tokens also pass)
    projector = inner.visual.merger if hasattr(inner, "visual") else inner.multi_modal_projector
    groups = [vistog, projector] + ([inner.language_model, model.lm_head] if stage == 2 else [])
    params: dict[int, nn.Parameter] = {}
    for g in groups:
        for p in g.parameters():
            p.requires_grad_(True)
            params[id(p)] = p
    return list(params.values())


@dataclass
class TrainLog:
    """What one :func:`train_vistog` stage did."""

    stage: int
    steps: int
    seconds: float
    losses: list[float]
    trainable: int


def train_vistog(
    model: nn.Module,
    vistog: VisToG,
    batches: Iterable[Mapping[str, Tensor]],
    *,
    stage: int,
    steps: int,
    lr: float = 1e-3,
    lm_lr: float = 2e-5,
    warmup: int = 0,
    progress: bool = True,
) -> TrainLog:
    """One stage of VisToG's two-stage recipe on HF LLaVA or Qwen2-VL (vision tower frozen throughout).

    ``stage=1`` (alignment): semantic tokens, grouping layer and projector (Qwen2-VL: the PatchMerger)
    learn, at ``lr``; the LLM is
    frozen. ``stage=2`` (joint tuning): the LLM (and its head) also learns, at ``lm_lr``. ``batches``
    yields the host's inputs with the *unreduced* image placeholders (LLaVA: ``input_ids``,
    ``attention_mask``, ``labels`` with -100 where no loss, ``pixel_values``; Qwen2-VL adds its grid and
    ``mm_token_type_ids``); VisToG shrinks them to M per image.
    Loss: the model's next-token cross-entropy. Runs ``steps`` batches (cycling ``batches``).
    """
    if stage not in (1, 2):
        raise ValueError(f"stage must be 1 (alignment) or 2 (joint tuning), got {stage}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    from mmeff.api import apply

    params = _freeze(model, vistog, stage)
    lm_ids = {id(p) for p in model.model.language_model.parameters()} | {id(p) for p in model.lm_head.parameters()}
    groups = [{"params": [p for p in params if id(p) not in lm_ids], "lr": lr}]
    if stage == 2:
        groups.append({"params": [p for p in params if id(p) in lm_ids], "lr": lm_lr})
    opt = torch.optim.AdamW(groups, weight_decay=0.0)
    base = [g["lr"] for g in opt.param_groups]
    was_training = model.training
    model.train()
    vistog.train()
    losses: list[float] = []
    t0 = time.perf_counter()
    it = _cycle(batches)
    try:
        with apply(model, vistog):
            for step in tqdm(range(steps), desc=f"vistog stage {stage}", disable=not progress):
                scale = min(1.0, (step + 1) / warmup) if warmup else 1.0
                for g, b in zip(opt.param_groups, base):
                    g["lr"] = b * scale * 0.5 * (1 + math.cos(math.pi * step / steps))
                batch = next(it)
                out = model(**batch)
                if out.loss is None:
                    raise ValueError("train_vistog: the batch has no labels, so the model returned no loss")
                opt.zero_grad(set_to_none=True)
                out.loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                opt.step()
                losses.append(float(out.loss.detach()))
    finally:
        for p in model.parameters():
            p.requires_grad_(False)
        for p in vistog.parameters():
            p.requires_grad_(False)
        model.train(was_training)
        vistog.eval()
    return TrainLog(stage, len(losses), time.perf_counter() - t0, losses, sum(p.numel() for p in params))


def _cycle(batches: Iterable[Mapping[str, Tensor]]) -> Iterator[dict[str, Tensor]]:
    while True:
        empty = True
        for b in batches:
            empty = False
            yield dict(b)
        if empty:
            raise ValueError("train_vistog: batches is empty")


# ------------------------------------------------------------------------------------------- cost


def vistog_flops(config: Any, num_groups: int, images: int = 1) -> dict[str, int]:
    """What VisToG adds to a LLaVA config's vision side, in FLOPs (2 per multiply-add, matmuls only, as
    :mod:`mmeff.profile`): ``tower_extra`` (M more tokens through every CLIP layer, attention over
    N + 1 + M tokens) and ``grouping`` (q/k/v/proj, the M x N assignment and pooling, the MLP)."""
    from mmeff.profile import _clip_vision_flops

    if getattr(config, "model_type", None) != "llava":
        raise TypeError(f"vistog_flops models LLaVA configs (CLIP towers), got {getattr(config, 'model_type', None)!r}")
    vc = config.vision_config
    n = (int(vc.image_size) // int(vc.patch_size)) ** 2
    d = int(vc.hidden_size)
    base = _clip_vision_flops(config, [n] * images)
    # M extra tokens: the formula counts n + 1 rows (CLS), so pass n + M patches and remove the conv part
    c, p = int(vc.num_channels), int(vc.patch_size)
    grown = _clip_vision_flops(config, [n + num_groups] * images) - images * 2 * num_groups * c * p * p * d
    m = num_groups
    grouping = images * 2 * (m * d * d + 2 * n * d * d + m * d * d + m * n * d + m * n * d + 2 * m * d * 4 * d)
    return {"tower_extra": grown - base, "grouping": grouping}
