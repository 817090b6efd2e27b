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
  (LLaVA's ``"default"`` strategy) or class + patches (``"full"``).
* **Positions** of the M grouped tokens in the LLM: consecutive, as text (LLaVA's 1-D positions are
  recomputed after the placeholders shrink); with explicit ``position_ids`` a group takes its members'
  mean position (the library's rule for merged tokens).
* **Training**: stage 1 trains semantic tokens, grouping layer and projector with the LLM and tower
  frozen; stage 2 also unfreezes the LLM (LLaVA-1.5's recipe).

Hosts: HF ``LlavaForConditionalGeneration`` with a CLIP/SigLIP tower (and a bare HF CLIP/SigLIP vision
model, where the tower's output simply gains the M semantic tokens). Qwen2-VL is refused for now: its
windowed ``cu_seqlens`` attention and 2x2 patch merger need their own handling of the semantic tokens.
"""

from __future__ import annotations

import json
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

    def __init__(self, dim: int, num_groups: int = 64, *, mlp_ratio: float = 4.0, gumbel: bool = True,
                 tau: float = 1.0, hard: bool = True, semantic_self_attention: bool = True,
                 init_std: float = 0.02) -> None:
        super().__init__()
        if num_groups < 1 or dim < 1:
            raise ValueError(f"VisToG needs num_groups >= 1 and dim >= 1, got {num_groups}, {dim}")
        if tau <= 0:
            raise ValueError(f"tau must be > 0, got {tau}")
        self.dim, self.num_groups = int(dim), int(num_groups)
        self.semantic_self_attention = semantic_self_attention
        self.semantic = nn.Parameter(torch.randn(num_groups, dim) * init_std)
        self.grouping = GroupingLayer(dim, mlp_ratio, gumbel, tau, hard)
        self._cfg = {"dim": self.dim, "num_groups": self.num_groups, "mlp_ratio": mlp_ratio, "gumbel": gumbel,
                     "tau": tau, "hard": hard, "semantic_self_attention": semantic_self_attention}

    @property
    def config(self) -> dict[str, Any]:
        """Constructor arguments (what :meth:`save` stores)."""
        return dict(self._cfg)

    @classmethod
    def for_model(cls, model: nn.Module, num_groups: int = 64, **kwargs: Any) -> VisToG:
        """A fresh VisToG sized for ``model``'s vision tower (LLaVA or a bare HF CLIP/SigLIP vision model),
        on its device and dtype."""
        tower = vision_encoder(model)
        param = next(tower.parameters())
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
        if patches.dim() != 3 or semantic.shape != (patches.shape[0], self.num_groups, self.dim):
            raise ValueError(f"VisToG expects patches (B, N, {self.dim}) and semantic (B, {self.num_groups}, "
                             f"{self.dim}); got {tuple(patches.shape)} and {tuple(semantic.shape)}")
        return self.grouping(semantic, patches)

    def save(self, path: str | Path, extra: Mapping[str, Any] | None = None) -> Path:
        """Write the parameters as safetensors with the configuration (and ``extra``) in the metadata."""
        from safetensors.torch import save_file

        sd = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        meta = {"format": _FORMAT, "config": json.dumps(self.config), "extra": json.dumps(dict(extra or {}))}
        save_file(sd, str(path), metadata=meta)
        return Path(path)

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu") -> VisToG:
        """Rebuild a saved VisToG (refuses files of another format)."""
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != _FORMAT:
                raise ValueError(f"{path} is not a VisToG file (format {meta.get('format')!r})")
            sd = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (no iterator)
        cfg = json.loads(meta["config"])
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
        if tokens.shape[1] <= m:
            raise ValueError(f"VisToG: the projector got {tokens.shape[1]} rows, not originals + {m} semantic tokens; "
                             "was the vision tower run without VisToG's hooks?")
        grouped, index = self.vistog(tokens[:, :-m], tokens[:, -m:])
        return Reduction(tokens=grouped.to(tokens.dtype), assignment=index)

    def default_stage(self, host: str) -> str:
        return "pre_projector"

    def describe(self) -> str:
        return self.vistog.describe()


# ------------------------------------------------------------------------------------------ hosts


def vision_encoder(model: nn.Module) -> nn.Module:
    """The HF CLIP/SigLIP vision encoder inside ``model`` (the module with ``embeddings`` and
    ``encoder.layers``); ``TypeError`` naming the class for unsupported models."""
    from mmeff.tome import _hf_tower

    if "qwen2_vl" in type(model).__module__ or "qwen2_5_vl" in type(model).__module__:
        raise TypeError(f"VisToG does not support {type(model).__name__} yet: its windowed (cu_seqlens) attention and "
                        "2x2 PatchMerger need their own handling of the semantic tokens; use LLaVA or a CLIP tower")
    tower = _hf_tower(model) if isinstance(model, nn.Module) else None
    if tower is None:
        raise TypeError(f"VisToG does not support {type(model).__name__}; supported: HF LLaVA and HF CLIP/SigLIP "
                        "vision models")
    return tower


def _num_patches(tower: nn.Module) -> int:
    cfg = tower.config
    return (int(cfg.image_size) // int(cfg.patch_size)) ** 2


class VisToGAdapter(Adapter):
    """Attaches a :class:`VisToG`: hooks on the tower (semantic tokens after the patch embedding, the
    isolation mask into every layer) plus, in a VLM, the host's reducer adapter running the grouping
    before the projector (which also shrinks the image placeholders to M per image).

    ``stats`` after a forward: ``{"tokens_in": N, "tokens_out": M, ...}`` (plus the VLM adapter's)."""

    name = "vistog"
    description = "VisToG semantic-token grouping inside HF CLIP towers (LLaVA)"
    method_type: ClassVar[type] = VisToG

    def __init__(self, model: nn.Module, vistog: VisToG, **options: Any) -> None:
        super().__init__(model, vistog, **options)
        self.vistog = vistog
        self.tower = vision_encoder(model)
        if vistog.dim != int(self.tower.config.hidden_size):
            raise ValueError(f"VisToG dim {vistog.dim} does not match the vision tower's hidden size "
                             f"{self.tower.config.hidden_size}")
        impl = str(getattr(self.tower.config, "_attn_implementation", "") or "")
        if "flash" in impl:
            raise ValueError("VisToG's isolation mask needs eager or sdpa attention in the vision tower, not " + impl)
        self.vlm = self.tower is not model and hasattr(model, "get_image_features")
        self.inner: Adapter | None = None
        self._own: dict[str, Any] = {}
        self._mask: Tensor | None = None
        self._n = 0

    def attach(self) -> None:
        for m in (self.model, self.tower):
            if m.__dict__.get("_mmeff_vistog_adapter") is not None:
                raise ValueError("VisToG is already attached to this model; unpatch it first")
        self._hook(self.tower.embeddings.register_forward_hook(self._append))
        for layer in self.tower.encoder.layers:
            self._hook(layer.register_forward_pre_hook(self._isolate, with_kwargs=True))
        if self.vlm:
            self.inner = find_adapter(self.model)(self.model, _Grouping(vistog=self.vistog), stage="pre_projector")
            self.inner.attach()
        for m in {id(self.model): self.model, id(self.tower): self.tower}.values():
            self._override(m, "_mmeff_vistog_adapter", self)

    def detach(self) -> None:
        try:
            if self.inner is not None:
                self.inner.detach()
                self.inner = None
        finally:
            super().detach()

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

    def _append(self, module: nn.Module, args: tuple, out: Tensor) -> Tensor:
        b, n, _ = out.shape
        sem = self.vistog.semantic.to(out.dtype).unsqueeze(0).expand(b, -1, -1)
        self._n = n
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


# ----------------------------------------------------------------------------------------- training


def _freeze(model: nn.Module, vistog: VisToG, stage: int) -> list[nn.Parameter]:
    """Trainable parameters of ``stage`` (1: VisToG + projector; 2: also the LLM); the rest frozen."""
    for p in model.parameters():
        p.requires_grad_(False)
    inner = model.model
    groups = [vistog, inner.multi_modal_projector] + ([inner.language_model, model.lm_head] if stage == 2 else [])
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
    """One stage of VisToG's two-stage recipe on a HF LLaVA model (tower frozen throughout).

    ``stage=1`` (alignment): semantic tokens, grouping layer and projector learn, at ``lr``; the LLM is
    frozen. ``stage=2`` (joint tuning): the LLM (and its head) also learns, at ``lm_lr``. ``batches``
    yields LLaVA inputs with the *unreduced* image placeholders (N per image): ``input_ids``,
    ``attention_mask``, ``labels`` (-100 where no loss), ``pixel_values``; VisToG shrinks them to M.
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
