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

ToCom is trained once per backbone by self-distillation (:func:`train_tocom`): the backbone is frozen,
each step samples ``r_s ≠ r_t``; the student is ToMe(r_t)+ToCom(s→t), the teacher ToMe(r_s) without it,
and the loss is soft KD. The trained plug-in is then inserted into *other* downstream models of the
same architecture (fine-tuned from that backbone) without further training::

    tocom = mmeff.tocom.ToCom.load("tocom.safetensors")
    mmeff.tome.patch(downstream, r=12)                   # run at r=12 ...
    with tocom.compensate(downstream, source=4):        # ... a model fine-tuned at r=4
        logits = downstream(images)

Hosts: timm ``VisionTransformer`` (hooks on ``attn.qkv``) and HF CLIP/SigLIP towers (hooks on
``q_proj``/``v_proj``); on open_clip's ``nn.MultiheadAttention`` blocks the delta is folded into
``in_proj_weight`` while attached (inference only).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from mmeff.checkpoint import load_state, save_state
from mmeff.tome import ToMe, ToMeAdapter, find_host

__all__ = ["Batches", "ToCom", "ToComHandle", "kd_loss", "projection_slots", "train_tocom"]


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
class _Slot:
    """Where one block keeps W_q and W_v (and how to reach them)."""

    kind: str  # "qkv" (timm fused Linear), "qv" (HF q_proj/v_proj), "in_proj" (nn.MultiheadAttention)
    module: nn.Module  # the fused qkv Linear, the attention module (HF), or the MHA
    width: int  # output width of the q (and v) projection


def projection_slots(model: nn.Module) -> tuple[str, list[_Slot], int]:
    """``(host kind, per-block slots, input dim)`` for the ViT encoder of ``model``.

    Raises ``TypeError`` for hosts whose q/v projections cannot be reached.
    """
    host = find_host(model)
    slots: list[_Slot] = []
    for i, block in enumerate(host.blocks):
        if host.kind == "timm":
            qkv = block.attn.qkv
            if type(qkv) is not nn.Linear:
                raise TypeError(f"ToCom: block {i} attn.qkv is {type(qkv).__name__}, expected nn.Linear")
            slots.append(_Slot("qkv", qkv, block.attn.num_heads * block.attn.head_dim))
        elif host.kind == "hf":
            attn = block.self_attn
            slots.append(_Slot("qv", attn, attn.q_proj.out_features))
        else:
            slots.append(_Slot("in_proj", block.attn, block.attn.embed_dim))
    dim = _in_dim(slots[0])
    return host.kind, slots, dim


def _in_dim(slot: _Slot) -> int:
    if slot.kind == "qkv":
        return int(slot.module.in_features)
    if slot.kind == "qv":
        return int(slot.module.q_proj.in_features)
    return int(slot.module.embed_dim)


class ToCom(nn.Module):
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
    def _check(self, model: nn.Module) -> tuple[str, list[_Slot]]:
        kind, slots, dim = projection_slots(model)
        if (dim, len(slots)) != (self.dim, self.depth):
            raise ValueError(
                f"this ToCom is for {self.depth} blocks of width {self.dim}; the model has {len(slots)} blocks "
                f"of width {dim} (a ToCom only transfers between models of the same architecture)"
            )
        return kind, slots

    def compensate(
        self, model: nn.Module, source: int, target: int | None = None, scale: float | None = None
    ) -> ToComHandle:
        """Attach to ``model`` for ``source → target`` (``target=None``: the r of the ToMe attached to it).

        Returns a handle usable as a context manager; ``handle.detach()`` removes it. ``source``,
        ``target`` and ``scale`` are attributes of the handle and may be changed between forwards.
        """
        kind, slots = self._check(model)
        handle = ToComHandle(self, model, kind, slots, source, target, scale)
        handle.attach()
        return handle

    @torch.no_grad()
    def merge_into(self, model: nn.Module, source: int, target: int, scale: float | None = None) -> None:
        """Fold ``ΔW(s→t)`` into the model's W_q/W_v in place (zero run-time overhead).

        Linear, so ``merge_into(model, t, s)`` afterwards restores the weights up to rounding.
        """
        _, slots = self._check(model)
        for i, slot in enumerate(slots):
            dq, dv = self.delta(i, "q", source, target, scale), self.delta(i, "v", source, target, scale)
            w, width = _weight_of(slot)
            w[:width] += dq.to(w.dtype)
            w[2 * width : 3 * width] += dv.to(w.dtype)
            if slot.kind == "qv":
                slot.module.q_proj.weight.copy_(w[:width])
                slot.module.v_proj.weight.copy_(w[2 * width :])

    # ------------------------------------------------------------------------------------ checkpoint
    def save(self, path: str | Path, extra: dict[str, Any] | None = None) -> Path:
        """Write weights and config as safetensors (``extra`` goes into the metadata as JSON)."""
        from mmeff.checkpoint import save_module

        return save_module(self, path, "mmeff.tocom", self.config(), extra)

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu") -> ToCom:
        """Load a plug-in written by :meth:`save`."""
        from mmeff.checkpoint import read_module

        config, _, state = read_module(path, "mmeff.tocom", "an mmeff ToCom checkpoint")
        tocom = cls(**config)
        tocom.load_state_dict(state)
        return tocom.to(device).eval()


def _weight_of(slot: _Slot) -> tuple[Tensor, int]:
    """The (3·width, dim) q/k/v weight of a slot (a view for fused hosts, a stacked copy for HF)."""
    if slot.kind == "qkv":
        return slot.module.weight, slot.width
    if slot.kind == "in_proj":
        return slot.module.in_proj_weight, slot.width
    a = slot.module
    return torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]), slot.width


class ToComHandle:
    """A ToCom attached to one model (hooks, or folded weights on open_clip); a context manager."""

    def __init__(
        self,
        tocom: ToCom,
        model: nn.Module,
        kind: str,
        slots: list[_Slot],
        source: int,
        target: int | None,
        scale: float | None,
    ) -> None:
        self.tocom, self.model, self.kind, self.slots = tocom, model, kind, slots
        self.source, self.target, self.scale = source, target, scale
        self.enabled = True
        self._hooks: list[Any] = []
        self._saved: list[Tensor] = []

    def resolved(self) -> tuple[int, int, float]:
        """``(source, target, scale)`` in use; ``target=None`` reads the attached ToMe's constant r."""
        target = self.target
        if target is None:
            tome = self.model.__dict__.get("_mmeff_tome_adapter")
            if tome is None:
                raise ValueError("ToCom target=None needs ToMe attached to the model (or pass target=)")
            if len(set(tome.r_list)) != 1:
                raise ValueError(
                    f"ToCom needs the same r in every block, the attached ToMe uses {tome.r_list}"
                )
            target = tome.r_list[0]
        scale = self.tocom.scale if self.scale is None else float(self.scale)
        return int(self.source), int(target), scale

    def attach(self) -> None:
        """Register the projection hooks (timm/HF) or fold the delta into the weights (open_clip)."""
        if self.kind == "open_clip":
            if self.tocom.training:
                raise ValueError(
                    "ToCom trains on timm or HF hosts; on open_clip it is folded into the weights"
                )
            s, t, scale = self.resolved()
            self._saved = [slot.module.in_proj_weight.detach().clone() for slot in self.slots]
            self.tocom.merge_into(self.model, s, t, scale)
            return
        for i, slot in enumerate(self.slots):
            if slot.kind == "qkv":
                self._hooks.append(slot.module.register_forward_hook(self._qkv_hook(i, slot.width)))
            else:
                self._hooks.append(slot.module.q_proj.register_forward_hook(self._proj_hook(i, "q")))
                self._hooks.append(slot.module.v_proj.register_forward_hook(self._proj_hook(i, "v")))

    def _mask(self) -> tuple[Tensor, float] | None:
        if not self.enabled:
            return None
        s, t, scale = self.resolved()
        if s == t or scale == 0.0:
            return None
        return self.tocom.mask(s, t).to(self.tocom.q[0].down.weight.dtype), scale

    def _qkv_hook(self, i: int, width: int) -> Callable[..., Tensor | None]:
        def hook(module: nn.Module, args: tuple, out: Tensor) -> Tensor | None:
            ms = self._mask()
            if ms is None:
                return None
            mask, scale = ms
            # the plug-in keeps its own dtype (e.g. fp32 deltas on a bf16 backbone)
            x = args[0].to(mask.dtype)
            dq = self.tocom.q[i](x, mask) * scale
            dv = self.tocom.v[i](x, mask) * scale
            return out + torch.cat([dq, torch.zeros_like(dq), dv], dim=-1).to(out.dtype)

        return hook

    def _proj_hook(self, i: int, which: str) -> Callable[..., Tensor | None]:
        deltas = self.tocom.q if which == "q" else self.tocom.v

        def hook(module: nn.Module, args: tuple, out: Tensor) -> Tensor | None:
            ms = self._mask()
            if ms is None:
                return None
            mask, scale = ms
            x = args[0].to(mask.dtype)
            return out + (deltas[i](x, mask) * scale).to(out.dtype)

        return hook

    def detach(self) -> None:
        """Remove hooks / restore folded weights; safe to call twice."""
        while self._hooks:
            self._hooks.pop().remove()
        if self._saved:
            with torch.no_grad():
                for slot, w in zip(self.slots, self._saved):
                    slot.module.in_proj_weight.copy_(w)
            self._saved = []

    def __enter__(self) -> ToComHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.detach()


# ------------------------------------------------------------------------------------------ training


def kd_loss(student: Tensor, teacher: Tensor, tau: float = 1.0) -> Tensor:
    """Soft knowledge distillation ``τ² · KL(softmax(teacher/τ) ‖ softmax(student/τ))``, logits ``(B, C)``."""
    return (
        F.kl_div(
            F.log_softmax(student / tau, dim=-1),
            F.log_softmax(teacher / tau, dim=-1),
            log_target=True,
            reduction="batchmean",
        )
        * tau
        * tau
    )


def _images(batch: Any) -> Tensor:
    if isinstance(batch, Tensor):
        return batch
    if isinstance(batch, (list, tuple)) and batch and isinstance(batch[0], Tensor):
        return batch[0]
    if isinstance(batch, dict) and isinstance(batch.get("pixel_values"), Tensor):
        return batch["pixel_values"]
    raise TypeError(
        f"batches must be image tensors, (images, labels) or dicts with pixel_values, got {type(batch).__name__}"
    )


def _logits(model: nn.Module, images: Tensor) -> Tensor:
    out = model(images)
    if isinstance(out, Tensor):
        return out
    for key in ("logits", "image_embeds", "pooler_output"):
        v = getattr(out, key, None)
        if isinstance(v, Tensor):
            return v
    raise TypeError(f"cannot find logits in the model output {type(out).__name__}")


def train_tocom(
    model: nn.Module,
    data: Iterable[Any],
    *,
    tocom: ToCom | None = None,
    steps: int = 16,
    step_rank: int = 2,
    r_max: int | None = None,
    epochs: int = 10,
    lr: float = 1e-3,
    weight_decay: float = 0.05,
    scale: float = 0.1,
    tau: float = 1.0,
    out_dir: str | Path | None = None,
    resume: bool = True,
    seed: int = 0,
    progress: bool = True,
) -> ToCom:
    """Train a ToCom for ``model`` by self-distillation (ToCom's recipe; backbone frozen).

    Each step samples ``(r_s, r_t)`` in ``[0, r_max]²`` with ``r_s ≠ r_t`` (the same in every block);
    the student is ``model`` at ToMe(r_t) with ToCom(s→t), the teacher ``model`` at ToMe(r_s) without
    it; loss :func:`kd_loss`. ``data`` yields image batches ``(B, 3, H, W)`` (labels, if any, are
    ignored). With ``out_dir``, ``tocom.safetensors`` and ``train_state.pt`` (optimizer, epoch, RNG,
    history) are written after every epoch and a later call with ``resume=True`` continues from them.
    Returns the trained plug-in (in eval mode).
    """
    if iter(data) is data:  # type: ignore[comparison-overlap]
        raise TypeError(
            "data must be re-iterable (a DataLoader or a list of batches), not a one-shot iterator"
        )
    tocom = tocom if tocom is not None else ToCom.for_model(model, steps, step_rank, scale=scale)
    r_max = tocom.steps if r_max is None else int(r_max)
    if not 1 <= r_max <= tocom.steps:
        raise ValueError(f"r_max must be in [1, {tocom.steps}] (the plug-in's steps), got {r_max}")
    param = next(model.parameters())
    tocom.to(param.device)
    opt = torch.optim.AdamW(tocom.parameters(), lr=lr, weight_decay=weight_decay)
    start, history = 0, []
    out = Path(out_dir) if out_dir is not None else None
    rng = random.Random(seed)
    if (
        out is not None
        and resume
        and (out / "train_state.pt").is_file()
        and (out / "tocom.safetensors").is_file()
    ):
        tocom.load_state_dict(ToCom.load(out / "tocom.safetensors", device=param.device).state_dict())
        state = load_state(out / "train_state.pt", map_location=param.device)
        opt.load_state_dict(state["optimizer"])
        start, history = int(state["epoch"]) + 1, list(state["history"])
        rng.setstate(state["rng"])
        torch.set_rng_state(state["torch_rng"].cpu())
        if param.is_cuda and state.get("cuda_rng") is not None:
            torch.cuda.set_rng_state(state["cuda_rng"].cpu(), param.device)
    requires = {n: p.requires_grad for n, p in model.named_parameters()}
    was_training = model.training
    model.requires_grad_(False).eval()
    tome = ToMeAdapter(model, ToMe(r=0))
    tome.attach()
    handle = tocom.compensate(model, source=0, target=0, scale=tocom.scale)
    try:
        for epoch in range(start, epochs):
            tocom.train()
            if callable(getattr(data, "set_epoch", None)):
                data.set_epoch(epoch)  # type: ignore[attr-defined]
            total, count = 0.0, 0
            bar = tqdm(data, desc=f"ToCom epoch {epoch + 1}/{epochs}", disable=not progress, leave=False)
            for batch in bar:
                images = _images(batch).to(param.device, param.dtype)
                r_s, r_t = rng.sample(range(r_max + 1), 2)
                tome.set_r(r_s)
                handle.enabled = False
                with torch.no_grad():
                    teacher = _logits(model, images)
                tome.set_r(r_t)
                handle.enabled, handle.source, handle.target = True, r_s, r_t
                loss = kd_loss(_logits(model, images).float(), teacher.float(), tau)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += loss.item() * images.shape[0]
                count += images.shape[0]
                bar.set_postfix(loss=f"{total / count:.4f}")
            history.append({"epoch": epoch, "kd_loss": total / max(count, 1)})
            if out is not None:
                tocom.save(
                    out / "tocom.safetensors", extra={"epoch": epoch, "kd_loss": history[-1]["kd_loss"]}
                )
                save_state(
                    {
                        "optimizer": opt.state_dict(),
                        "epoch": epoch,
                        "history": history,
                        "rng": rng.getstate(),
                        "torch_rng": torch.get_rng_state(),
                        "cuda_rng": torch.cuda.get_rng_state(param.device) if param.is_cuda else None,
                    },
                    out / "train_state.pt",
                )
    finally:
        handle.detach()
        tome.detach()
        for n, p in model.named_parameters():
            p.requires_grad_(requires[n])
        model.train(was_training)
    tocom.history = history  # type: ignore[assignment]
    return tocom.eval()


class Batches:
    """Re-iterable batches of a tensor ``x`` ``(N, ...)``, reshuffled on every pass when ``shuffle``.

    Pass ``e`` is shuffled with seed ``seed + e`` (as ``DistributedSampler``); :func:`train_tocom` calls
    :meth:`set_epoch`, so a resumed run sees the same batches as an uninterrupted one.
    """

    def __init__(self, x: Tensor, batch_size: int, shuffle: bool = True, seed: int = 0) -> None:
        self.x, self.batch_size, self.shuffle = x, int(batch_size), shuffle
        self.seed, self.epoch = int(seed), 0

    def set_epoch(self, epoch: int) -> None:
        """Shuffle the next pass as pass ``epoch`` (later passes continue from there)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return math.ceil(len(self.x) / self.batch_size)

    def __iter__(self) -> Iterator[Tensor]:
        n = len(self.x)
        gen = torch.Generator().manual_seed(self.seed + self.epoch)
        self.epoch += 1
        idx = torch.randperm(n, generator=gen) if self.shuffle else torch.arange(n)
        for i in range(0, n, self.batch_size):
            yield self.x[idx[i : i + self.batch_size]]
