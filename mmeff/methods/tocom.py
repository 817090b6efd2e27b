"""ToCom: the token compensator, a plug-in that lets a ViT run at a ToMe degree it was not trained at.

A downstream model fine-tuned at ToMe degree ``r_s`` loses accuracy when it is run at another degree
``r_t``. ToCom (Jie et al., ECCV'24) is a small LoRA-style delta on the query and value projections of
every block (never on the keys: they are ToMe's merge metric, so merge decisions stay the same):

    Δq = scale · B_q (m(s→t) ⊙ A_q x),      Δv = scale · B_v (m(s→t) ⊙ A_v x)

``A`` is ``dim → steps·step_rank``, ``B`` is ``steps·step_rank → dim`` (zero-initialised). The rank is
made of ``steps`` chunks; chunk ``i`` (counting from the end) holds the step ``P_{i→i+1}``, so the mask
``m(s→t) = 1[last t chunks] − 1[last s chunks]`` realises the model arithmetic
``ΔW(s→t) = Σ_{i=s}^{t-1} P_{i→i+1}`` (negated for ``t < s``; zero for ``s = t``). The delta is linear
in ``x``, so it can be folded into ``W_q``/``W_v`` (:meth:`ToCom.merge_into`) for zero overhead.

ToCom is trained once per backbone by self-distillation (:func:`mmeff.train.tocom.train_tocom`): the backbone is frozen,
each step samples ``r_s ≠ r_t``; the student is ToMe(r_t)+ToCom(s→t), the teacher ToMe(r_s) without it,
and the loss is soft KD. The trained plug-in is then inserted into *other* downstream models of the
same architecture (fine-tuned from that backbone) without further training::

    tocom = mmeff.methods.tocom.ToCom.load("tocom.safetensors")
    mmeff.tome.patch(downstream, r=12)                   # run at r=12 ...
    with tocom.compensate(downstream, source=4):        # ... a model fine-tuned at r=4
        logits = downstream(images)

Differences from the official code (``JieShibo/ToCom``, ``models.py``): none in the delta. Its
``Adapter`` (``adapter_down`` -> dropout -> mask of the last ``r`` chunks -> ``adapter_up``, times
``tocom_scale``, added to q and v) is this one; :meth:`ToCom.load_official` reads its ``checkpoint.pth``
and a test restates the ``Adapter`` and gets the same deltas for every ``(r_s, r_t)``. The official patches
timm 0.4.12's attention forward; here hooks on ``attn.qkv`` add the same q/v deltas (any timm version,
fused attention kept). Training differences: :mod:`mmeff.train.tocom`.

Hosts: timm ``VisionTransformer`` (hooks on ``attn.qkv``) and HF CLIP/SigLIP towers (hooks on
``q_proj``/``v_proj``); on open_clip's ``nn.MultiheadAttention`` blocks the delta is folded into
``in_proj_weight`` while attached (inference only).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmeff.checkpoint import Checkpointable, load_exact, read_tensors
from mmeff.core import IN_TOWER, attached
from mmeff.hosts import vit_host

__all__ = ["Compensation", "Slot", "ToCom", "kd_loss", "projection_slots", "weight_of"]


class _Delta(nn.Module):
    """One projection's delta: ``up(mask ⊙ dropout(down(x)))``, ``down: dim → rank``, ``up: rank → dim``."""

    def __init__(self, dim: int, rank: int, dropout: float) -> None:
        super().__init__()
        self.down = nn.Linear(dim, rank, bias=False)
        self.up = nn.Linear(rank, dim, bias=False)
        nn.init.zeros_(self.up.weight)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        """``x`` ``(..., dim)``, ``mask`` ``(rank,)`` → ``(..., dim)``."""
        return self.up(self.dropout(self.down(x)) * mask)

    def weight(self, mask: Tensor) -> Tensor:
        """The delta as a ``(dim, dim)`` matrix (what :meth:`forward` multiplies ``x`` by in eval mode)."""
        return self.up.weight @ (mask[:, None] * self.down.weight)


@dataclass
class Slot:
    """Where one block keeps W_q and W_v (and how to reach them)."""

    kind: str  # "qkv" (timm fused Linear), "qv" (HF q_proj/v_proj), "in_proj" (nn.MultiheadAttention)
    module: nn.Module  # the fused qkv Linear, the attention module (HF), or the MHA
    width: int  # output width of the q (and v) projection


def projection_slots(model: nn.Module) -> tuple[str, list[Slot], int]:
    """``(host kind, per-block slots, input dim)`` for the ViT encoder of ``model``.

    Raises ``TypeError`` for hosts whose q/v projections cannot be reached.
    """
    host = vit_host(model, "ToCom")
    slots: list[Slot] = []
    for i, block in enumerate(host.blocks):
        if host.kind == "timm":
            qkv = block.attn.qkv
            if type(qkv) is not nn.Linear:
                raise TypeError(f"ToCom: block {i} attn.qkv is {type(qkv).__name__}, expected nn.Linear")
            slots.append(Slot("qkv", qkv, block.attn.num_heads * block.attn.head_dim))
        elif host.kind == "hf":
            attn = block.self_attn
            slots.append(Slot("qv", attn, attn.q_proj.out_features))
        else:
            slots.append(Slot("in_proj", block.attn, block.attn.embed_dim))
    dim = _in_dim(slots[0])
    return host.kind, slots, dim


def _in_dim(slot: Slot) -> int:
    if slot.kind == "qkv":
        return int(slot.module.in_features)
    if slot.kind == "qv":
        return int(slot.module.q_proj.in_features)
    return int(slot.module.embed_dim)


class ToCom(Checkpointable, nn.Module):
    """The token-compensator plug-in for one ViT architecture.

    Args:
        dim: the blocks' input width (the q/v projections' input and output width).
        depth: number of blocks.
        steps: chunks of the rank, one per step of ToMe's per-block ``r`` (so ``0 <= r <= steps``).
        step_rank: rank of each chunk (ToCom: 16 steps x rank 2 = rank 32).
        dropout: dropout after the down projection while training (0.1).
        scale: default ``s`` in ``Δ = s · B (m ⊙ A x)`` (0.1 while training; searched at inference).
        host: the host kind it was built for (``timm``/``hf``/``open_clip``), kept in checkpoints.
    """

    def __init__(
        self,
        dim: int,
        depth: int,
        steps: int = 16,
        step_rank: int = 2,
        dropout: float = 0.1,
        scale: float = 0.1,
        host: str = "timm",
    ) -> None:
        super().__init__()
        if min(dim, depth, steps, step_rank) <= 0:
            raise ValueError(
                f"dim, depth, steps and step_rank must be positive, got {(dim, depth, steps, step_rank)}"
            )
        self.dim, self.depth, self.steps, self.step_rank = dim, depth, steps, step_rank
        self.dropout_p, self.scale, self.host = float(dropout), float(scale), host
        rank = steps * step_rank
        self.q = nn.ModuleList(_Delta(dim, rank, dropout) for _ in range(depth))
        self.v = nn.ModuleList(_Delta(dim, rank, dropout) for _ in range(depth))

    @classmethod
    def for_model(cls, model: nn.Module, steps: int = 16, step_rank: int = 2, **kwargs: Any) -> ToCom:
        """A fresh (zero-delta) ToCom sized for ``model``'s ViT encoder."""
        kind, slots, dim = projection_slots(model)
        if any(s.width != dim for s in slots):
            raise TypeError("ToCom needs q/v projections as wide as the block input (dim -> dim)")
        return cls(dim, len(slots), steps, step_rank, host=kind, **kwargs)

    @property
    def rank(self) -> int:
        """Total rank ``steps * step_rank``."""
        return self.steps * self.step_rank

    def config(self) -> dict[str, Any]:
        """Constructor arguments (stored in checkpoints)."""
        return {
            "dim": self.dim,
            "depth": self.depth,
            "steps": self.steps,
            "step_rank": self.step_rank,
            "dropout": self.dropout_p,
            "scale": self.scale,
            "host": self.host,
        }

    # ------------------------------------------------------------------------------------- arithmetic
    def mask(self, source: int, target: int) -> Tensor:
        """``m(s→t) = 1[last t chunks] − 1[last s chunks]`` as a float ``(rank,)`` vector."""
        for name, r in (("source", source), ("target", target)):
            if isinstance(r, bool) or not isinstance(r, int) or not 0 <= r <= self.steps:
                raise ValueError(f"ToCom {name} degree must be an int in [0, {self.steps}], got {r!r}")
        pos = torch.arange(self.rank, device=self.q[0].down.weight.device)
        last = self.rank - pos  # 1 for the last column
        m_t = (last <= target * self.step_rank).float()
        m_s = (last <= source * self.step_rank).float()
        return m_t - m_s

    def delta(self, layer: int, which: str, source: int, target: int, scale: float | None = None) -> Tensor:
        """``ΔW`` ``(dim, dim)`` of block ``layer``'s ``which`` ("q" or "v") projection for ``s → t``."""
        deltas = {"q": self.q, "v": self.v}.get(which)
        if deltas is None:
            raise ValueError(f"which must be 'q' or 'v' (ToCom never touches k), got {which!r}")
        s = self.scale if scale is None else float(scale)
        mask = self.mask(source, target).to(deltas[layer].down.weight.dtype)
        return s * deltas[layer].weight(mask)

    # --------------------------------------------------------------------------------------- attach
    def check(self, model: nn.Module) -> tuple[str, list[Slot]]:
        """``(host kind, slots)`` of ``model``; ``ValueError`` if it is not this plug-in's architecture."""
        kind, slots, dim = projection_slots(model)
        if (dim, len(slots)) != (self.dim, self.depth):
            raise ValueError(
                f"this ToCom is for {self.depth} blocks of width {self.dim}; the model has {len(slots)} blocks "
                f"of width {dim} (a ToCom only transfers between models of the same architecture)"
            )
        return kind, slots

    def compensate(
        self, model: nn.Module, source: int, target: int | None = None, scale: float | None = None
    ) -> Any:
        """Attach to ``model`` for ``source → target`` (``target=None``: the r of the ToMe attached to it).

        Returns a handle usable as a context manager; ``handle.detach()`` removes it. ``source``,
        ``target`` and ``scale`` are attributes of the handle and may be changed between forwards.
        """
        return attached(self.at(source, target, scale), model)

    def at(self, source: int, target: int | None = None, scale: float | None = None) -> Compensation:
        """This plug-in set to ``source → target``, for ``mmeff.apply(model, ToMe(r=t), tocom.at(s))``."""
        return Compensation(self, source, target, scale)

    @torch.no_grad()
    def merge_into(self, model: nn.Module, source: int, target: int, scale: float | None = None) -> None:
        """Fold ``ΔW(s→t)`` into the model's W_q/W_v in place (zero run-time overhead).

        Linear, so ``merge_into(model, t, s)`` afterwards restores the weights up to rounding.
        """
        _, slots = self.check(model)
        for i, slot in enumerate(slots):
            dq, dv = self.delta(i, "q", source, target, scale), self.delta(i, "v", source, target, scale)
            w, width = weight_of(slot)
            w[:width] += dq.to(w.dtype)
            w[2 * width : 3 * width] += dv.to(w.dtype)
            if slot.kind == "qv":
                slot.module.q_proj.weight.copy_(w[:width])
                slot.module.v_proj.weight.copy_(w[2 * width :])

    # ------------------------------------------------------------------------------------ checkpoint
    checkpoint_format = "mmeff.tocom"
    checkpoint_what = "an mmeff ToCom checkpoint"

    def checkpoint_config(self) -> dict[str, Any]:
        """:meth:`config`, what :meth:`save` stores."""
        return self.config()

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu") -> ToCom:
        """Load a plug-in written by :meth:`save`, in eval mode (:meth:`Checkpointable.load`)."""
        return super().load(path, device).eval()

    @classmethod
    def load_official(cls, path: str | Path, steps: int = 16, scale: float = 0.1) -> ToCom:
        """A plug-in from the official training's ``checkpoint.pth`` (``JieShibo/ToCom``: ``{"model": {...}}``
        with ``blocks.{i}.attn.{q,v}_tocom.adapter_{down,up}.weight``), read without unpickling code
        (:func:`mmeff.checkpoint.read_tensors`). The official rank is ``steps`` (16) chunks, the last ``r``
        active at degree ``r``, as here; ``scale`` is its ``--tocom_scale``. In eval mode; ``ValueError``
        naming the file for another layout."""
        what = "an official ToCom checkpoint"
        sd = {k.removeprefix("module."): v for k, v in read_tensors(path, what).items()}
        pat = re.compile(r"blocks\.(\d+)\.attn\.([qv])_tocom\.adapter_(down|up)\.weight")
        found = {m.groups(): v for k, v in sd.items() if (m := pat.fullmatch(k))}
        depth = 1 + max((int(i) for i, _, _ in found), default=-1)
        if not depth or len(found) != 4 * depth:
            raise ValueError(f"{path} is not {what}: expected blocks.N.attn.q_tocom/v_tocom.adapter_down/up "
                             f"weights for every block, found {len(found)} of them")
        rank, dim = found[("0", "q", "down")].shape
        if rank % steps:
            raise ValueError(f"{path}: rank {rank} is not a multiple of steps={steps}")
        tocom = cls(dim, depth, steps, rank // steps, scale=scale)
        state = {f"{w}.{i}.{part}.weight": v for (i, w, part), v in found.items()}
        load_exact(tocom, state, path, what)
        return tocom.eval()


def weight_of(slot: Slot) -> tuple[Tensor, int]:
    """The (3·width, dim) q/k/v weight of a slot (a view for fused hosts, a stacked copy for HF)."""
    if slot.kind == "qkv":
        return slot.module.weight, slot.width
    if slot.kind == "in_proj":
        return slot.module.in_proj_weight, slot.width
    a = slot.module
    return torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]), slot.width


def kd_loss(student: Tensor, teacher: Tensor, tau: float = 1.0, reduction: str = "batchmean") -> Tensor:
    """Soft knowledge distillation ``τ² · KL(softmax(teacher/τ) ‖ softmax(student/τ))``, logits ``(B, C)``.

    ``reduction="batchmean"``: the KL per image (its true value); ``"mean"``: divided by ``B·C`` instead,
    DeiT's legacy form that ToCom's ``losses.py`` uses (the same gradient direction, ``C`` times smaller)."""
    if reduction not in ("batchmean", "mean"):
        raise ValueError(f"reduction must be 'batchmean' or 'mean', got {reduction!r}")
    kl = F.kl_div(F.log_softmax(student / tau, dim=-1), F.log_softmax(teacher / tau, dim=-1),
                  log_target=True, reduction="sum")
    return kl * tau * tau / (student.shape[0] if reduction == "batchmean" else student.numel())


@IN_TOWER.register("tocom")
@dataclass
class Compensation:
    """A :class:`ToCom` set to compensate ``source → target`` (``target=None``: the r of the ToMe attached
    with it); what ``mmeff.apply`` takes. The hooks are :class:`mmeff.adapters.tocom.ToComAdapter`."""

    tocom: ToCom
    source: int
    target: int | None = None
    scale: float | None = None

    def describe(self) -> str:
        """One-line description for logs and errors."""
        return f"ToCom(source={self.source}, target={self.target})"
