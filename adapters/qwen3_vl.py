"""HF transformers ``Qwen3VLForConditionalGeneration`` (and its MoE sibling): DeepStack and timestamped frames.

Qwen3-VL shares Qwen2-VL's seams (merged 2x2 patch tokens after the merger, M-RoPE from ``get_rope_index``),
so this adapter is the Qwen2-VL one with two answers changed:

- **DeepStack.** The tower also hands out features of a few intermediate layers (``deepstack_features``),
  which the LLM adds to its first layers' hidden states at the visual positions. They are per-token
  features of the same tokens, so every reduction is applied to them too, through the reducer's
  :meth:`~mmeff.core.TokenReducer.follow`: selections keep the same tokens, pooling and merging average
  the same members, Fourier-VLM low-passes them on the same grid. Kept tokens and their DeepStack
  features stay aligned because both are written in the same order.
- **Timestamped frames.** A video is one block per merged time step, ``<t seconds> <vision_start> frame
  <vision_end>``, and ``get_rope_index`` gives each block its own grid. Frame-level methods reduce each
  time step on its own ``(h, w)`` grid (a per-frame budget), so every block keeps its timestamp and its
  own tokens; video-level methods (Free Video-LLM) would move tokens across the timestamped blocks and
  are refused. Positions are the host's, gathered for the kept tokens (or re-gridded, ``mrope="regrid"``).

Placement: ``post_projector`` (the merger needs whole 2x2 windows); ``cls_attn`` uses the mean attention
each patch receives in the last tower block, as on Qwen2-VL.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from mmeff.adapters.base import register_adapter
from mmeff.adapters.hf_vlm import ReducedEncoderOutput, VisualItem
from mmeff.adapters.qwen2_vl import Qwen2VLAdapter
from mmeff.core import Reduction
from mmeff.hosts import is_instance_of

__all__ = ["Qwen3VLAdapter"]

_HOSTS = (
    ("transformers.models.qwen3_vl.modeling_qwen3_vl", "Qwen3VLForConditionalGeneration"),
    ("transformers.models.qwen3_vl_moe.modeling_qwen3_vl_moe", "Qwen3VLMoeForConditionalGeneration"),
)


@dataclass
class ReducedDeepstackOutput(ReducedEncoderOutput):
    """Reduced tokens plus their reduced DeepStack features: per layer, one ``(M_i, D)`` tensor per item."""

    deepstack_features: list[tuple[Tensor, ...]] | None = None


@register_adapter
class Qwen3VLAdapter(Qwen2VLAdapter):
    name = "qwen3_vl"
    description = "transformers Qwen3-VL ForConditionalGeneration: merged tokens and their DeepStack features"
    hf_classes = tuple(name for _, name in _HOSTS)
    host_notes = (
        "post_projector (after the merger); DeepStack features reduced with their tokens (reducer.follow); "
        "videos per timestamped time step; video-level methods refused"
    )
    encoder_keys = ("image_grid_thw", "video_grid_thw")

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return is_instance_of(model, _HOSTS)

    def encode(self, call: dict[str, Any]) -> list[VisualItem]:
        if getattr(self.reducer, "video_level", False):
            raise ValueError(f"{self.reducer.describe()} reduces a video as a whole; Qwen3-VL puts each time step in its "
                             "own timestamped block, which a video-level method's tokens would cross")
        items = []
        for it in super().encode(call):
            if it.modality != "video" or it.grid is None or len(it.grid) != 3:
                items.append(it)
                continue
            t, h, w = it.grid
            for f in range(t):  # one item per timestamped block
                part = slice(f * h * w, (f + 1) * h * w)
                items.append(VisualItem("video", it.features[part], (h, w),
                                        None if it.scores is None else it.scores[part],
                                        companions=[c[part] for c in it.companions]))
        return items

    def companions_of(self, out: Any, n: int) -> list[list[Tensor]]:
        layers = getattr(out, "deepstack_features", None) or []
        return [[layer[i] for layer in layers] for i in range(n)]

    def encoder_output(self, modality: str, items: list[VisualItem], reds: list[Reduction]) -> ReducedEncoderOutput:
        layers = len(items[0].followed) if items else 0
        return ReducedDeepstackOutput(
            pooler_output=[r.tokens[0] for r in reds],
            deepstack_features=[tuple(it.followed[k] for it in items) for k in range(layers)],
        )
