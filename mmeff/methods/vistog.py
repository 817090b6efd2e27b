"""VisToG: visual token grouping with semantic tokens and isolated attention (arXiv 2411.17773).

M learnable *semantic tokens* join the patch tokens right after the vision encoder's patch embedding. In
every encoder layer an additive attention mask stops the class and patch tokens from attending to them,
so the original features come out exactly as the unmodified encoder's, while the semantic tokens read
the patches (and each other). At LLaVA's feature layer a *grouping layer* assigns every patch to one
semantic token (Gumbel-softmax over the query-key similarities, straight-through one-hot) and each group
becomes one token: the M grouped tokens are what the projector and the LLM see. The encoder itself gets
slightly more expensive (N + 1 + M tokens); the savings are in the LLM (M instead of N visual tokens).

Use::

    vistog = mmeff.methods.vistog.VisToG.for_model(llava, num_groups=64)
    with mmeff.apply(llava, vistog):                  # 576 placeholders -> 64 tokens per image
        out = llava.generate(**inputs)
    vistog.save("vistog.safetensors")                 # VisToG.load(...) restores it

It needs training (the two-stage recipe of :func:`mmeff.train.vistog.train_vistog`): a fresh grouping layer is random.

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
stream through the ViT's own block modules (:class:`mmeff.adapters.vistog.VisToGAdapter`), enter the merger as 2x2 windows of
copies of themselves, and the grouping runs on the merger's output. Qwen2.5-VL (windowed attention) is
refused.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmeff.checkpoint import Checkpointable
from mmeff.core import IN_TOWER, Reduction, TokenContext, TokenReducer
from mmeff.hosts import hf_vision_tower, is_qwen2_vl, vision_tower

__all__ = ["GroupReduction", "Grouping", "GroupingLayer", "SEMANTIC_KEY", "VisToG", "isolation_mask", "num_patches", "qwen_widths", "vision_host"]


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


@IN_TOWER.register("vistog")
class VisToG(Checkpointable, nn.Module):
    """The trainable part of VisToG (semantic tokens + grouping layer) and its configuration.

    Attach with ``mmeff.apply(model, vistog)``; build with :meth:`for_model`; save/load with
    :meth:`save`/:meth:`load`. ``num_groups`` (M) is the number of visual tokens per image the LLM reads.
    """

    name: ClassVar[str] = "vistog"
    checkpoint_format = "mmeff-vistog/1"
    checkpoint_what = "a VisToG file"
    checkpoint_keep_dtype = True  # a tower in bf16 gets its VisToG back in bf16

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
            width, merged = qwen_widths(vc)
            return cls(merged, num_groups, token_dim=width, **kwargs).to(param.device,
                                                                                                  param.dtype)
        n = num_patches(tower)
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

    def checkpoint_config(self) -> dict[str, Any]:
        """:attr:`config`, what :meth:`save` stores."""
        return self.config


@dataclass
class Grouping(TokenReducer):
    """The grouping step as a token reducer, run by the VLM adapter on the projector's input:
    rows ``(B, N + M, D)`` (the tower's originals, then the semantic tokens) -> ``(B, M, D)``."""

    vistog: VisToG | None = field(default=None, repr=False)
    name: ClassVar[str] = "vistog"
    checkpoint_format = "mmeff-vistog/1"
    checkpoint_what = "a VisToG file"
    checkpoint_keep_dtype = True  # a tower in bf16 gets its VisToG back in bf16

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
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected a torch.nn.Module, got {type(model).__name__}")
    if is_qwen2_vl(model):
        visual = vision_tower(model)
        if visual is None or not hasattr(visual, "merger"):
            raise TypeError(f"VisToG: cannot find the vision transformer of {type(model).__name__}")
        return "qwen2_vl", visual
    tower = hf_vision_tower(model)
    if tower is None:
        raise TypeError(f"VisToG does not support {type(model).__name__}; supported: HF LLaVA, CLIP/SigLIP vision "
                        "models and Qwen2-VL")
    return "clip", tower


def qwen_widths(vision_config: Any) -> tuple[int, int]:
    """(ViT width, merger output width) of a Qwen2-VL / Qwen2.5-VL vision config (Qwen2-VL names them
    ``embed_dim`` / ``hidden_size``, Qwen2.5-VL ``hidden_size`` / ``out_hidden_size``)."""
    if getattr(vision_config, "embed_dim", None) is not None:
        return int(vision_config.embed_dim), int(vision_config.hidden_size)
    return int(vision_config.hidden_size), int(vision_config.out_hidden_size)


def num_patches(tower: nn.Module) -> int:
    cfg = tower.config
    return (int(cfg.image_size) // int(cfg.patch_size)) ** 2
