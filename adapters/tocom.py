"""ToCom's attachment: hooks on the q/v projections of timm and HF CLIP/SigLIP blocks (the delta folded into
``in_proj_weight`` on open_clip). The plug-in is :mod:`mmeff.methods.tocom`; attach it with
``mmeff.apply(model, ToMe(r=t), tocom.at(source=s))`` or ``tocom.compensate(model, source=s)``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from mmeff.adapters.base import Adapter, register_adapter
from mmeff.methods.tocom import Compensation

__all__ = ["ToComAdapter", "ToComHandle"]


@register_adapter
class ToComAdapter(Adapter):
    """A ToCom attached to one model (hooks, or folded weights on open_clip); a context manager.

    ``source``, ``target``, ``scale`` and ``enabled`` may be changed between forwards (training flips them
    every step).
    """

    name: ClassVar[str] = "tocom"
    description: ClassVar[str] = "ToCom compensation on the q/v projections of timm / HF CLIP ViTs (folded on open_clip)"
    method_type: ClassVar[type] = Compensation

    def __init__(self, model: nn.Module, compensation: Compensation, **options: Any) -> None:
        super().__init__(model, compensation, **options)
        self.tocom = compensation.tocom
        self.kind, self.slots = self.tocom.check(model)
        self.source, self.target, self.scale = compensation.source, compensation.target, compensation.scale
        self.enabled = True
        self._saved: list[Tensor] = []

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        """ToCom attaches by the method (see ``method_type``), never picked for a model alone."""
        return False

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
        if self.model.__dict__.get("_mmeff_tocom_adapter") is not None:
            raise ValueError("a ToCom is already attached to this model; detach it first")
        self._override(self.model, "_mmeff_tocom_adapter", self)
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
        super().detach()
        if self._saved:
            with torch.no_grad():
                for slot, w in zip(self.slots, self._saved):
                    slot.module.in_proj_weight.copy_(w)
            self._saved = []


#: the name ``ToCom.compensate`` returned before the hooks moved here
ToComHandle = ToComAdapter
