"""HF transformers ``Gemma3ForConditionalGeneration``: reduce each image's pooled soft tokens.

Gemma 3's projector average-pools the SigLIP tower's patch grid to a fixed ``mm_tokens_per_image`` (256 at
the released sizes, a 16x16 grid) and the LLM reads them at ``image_token_id`` placeholders between
``<start_of_image>`` / ``<end_of_image>``. Reduction runs on those projected tokens (``post_projector``; the
pooling in the projector needs the full patch grid, so ``pre_projector`` is refused) on their ``(h, w)``
grid, one image (or pan-and-scan crop) at a time. The LLM attends bidirectionally inside each image's
block of tokens, which it finds from ``token_type_ids``: those shrink with ``input_ids``, so every kept
block stays one contiguous image block. The SigLIP tower has no class token, so ``cls_attn`` is refused
with that reason.

The LLM was trained on exactly ``mm_tokens_per_image`` tokens per image; fewer is what every reducer does
to every host here (LLaVA-1.5 was trained on 576), and its accuracy cost is what ``mmeff bench`` measures.
"""

from __future__ import annotations

import math
from typing import Any

from torch import nn

from mmeff.adapters.base import register_adapter
from mmeff.adapters.hf_vlm import HFVLMAdapter, VisualItem
from mmeff.hosts import is_instance_of

__all__ = ["Gemma3Adapter"]


@register_adapter
class Gemma3Adapter(HFVLMAdapter):
    name = "gemma3"
    description = "transformers Gemma3ForConditionalGeneration: reduce each image's pooled soft tokens"
    hf_classes = ("Gemma3ForConditionalGeneration",)
    host_notes = (
        "post_projector only (the projector pools the patch grid); token_type_ids shrink with the ids; "
        "cls_attn (no CLS) and videos refused"
    )
    pixel_keys = {"image": "pixel_values"}
    stages = ("post_projector",)
    concat_features = ("image",)

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return is_instance_of(model, [("transformers.models.gemma3.modeling_gemma3", "Gemma3ForConditionalGeneration")])

    def _stage_hint(self, stage: str) -> str:
        return ("; Gemma 3's projector pools the full patch grid to its soft tokens, so reduction runs on them "
                "(stage='post_projector')")

    def placeholder_id(self, modality: str) -> int:
        return int(self.model.config.image_token_id)

    def encode(self, call: dict[str, Any]) -> list[VisualItem]:
        if "scores" in self.reducer.needs:
            raise ValueError(f"{self.reducer.describe()} needs a class token's attention; Gemma 3's SigLIP tower has none")
        if getattr(self.reducer, "video_level", False):
            raise ValueError(f"{self.reducer.describe()} works on videos; Gemma 3 takes images only")
        enc = call.get("mm_encoder_outputs") or {}
        if enc.get("image") is not None:
            feats = enc["image"].pooler_output
        else:
            feats = self.model.model.get_image_features(pixel_values=call["pixel_values"], return_dict=True).pooler_output
        n = int(feats.shape[-2])
        side = math.isqrt(n)
        grid = (side, side) if side * side == n else None
        return [VisualItem("image", f, grid) for f in feats.reshape(-1, n, feats.shape[-1])]
