"""HF transformers ``InternVLForConditionalGeneration``: reduce each tile's pixel-shuffled tokens.

InternVL splits an image into up to ``max_patches`` tiles plus a thumbnail, runs every tile through
InternViT, folds each 2x2 block of patches into one token (pixel shuffle, ``downsample_ratio`` 0.5) and
projects them; the LLM reads all tiles of an image as one run of ``<IMG_CONTEXT>`` placeholders between
``<img>`` / ``</img>``. Reduction runs on each tile's projected tokens on their ``(h, w)`` grid (a per-tile
budget, ``post_projector``: the pixel shuffle needs the full patch grid, so ``pre_projector`` is refused);
the kept tokens of each tile stay in tile order inside the image's run.

``cls_attn`` uses InternViT's class token: its attention at the feature layer (with the layer's q/k
RMSNorm when the tower has ``use_qk_norm``), summed over the 2x2 patches the pixel shuffle folded into
each token, which mmeff reads from the host's own ``pixel_shuffle`` run on patch indices. Videos come in
as frames, each its own image run; video-level methods are refused.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from mmeff.adapters.base import capture_cls_attention, register_adapter
from mmeff.adapters.hf_vlm import HFVLMAdapter, VisualItem
from mmeff.hosts import is_instance_of

__all__ = ["InternVLAdapter"]


@register_adapter
class InternVLAdapter(HFVLMAdapter):
    name = "internvl"
    description = "transformers InternVLForConditionalGeneration: reduce each tile's pixel-shuffled tokens"
    hf_classes = ("InternVLForConditionalGeneration",)
    host_notes = (
        "post_projector only (the pixel shuffle folds the full patch grid); each tile and the thumbnail on "
        "its own grid; cls_attn from InternViT's class token summed over each token's 2x2 patches; "
        "video-level methods refused"
    )
    pixel_keys = {"image": "pixel_values"}
    stages = ("post_projector",)
    encoder_keys = ("vision_feature_layer", "vision_feature_select_strategy", "image_sizes")
    concat_features = ("image",)

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return is_instance_of(model, [("transformers.models.internvl.modeling_internvl", "InternVLForConditionalGeneration")])

    def _stage_hint(self, stage: str) -> str:
        return "; InternVL's pixel shuffle folds the full patch grid, so reduction runs on its output (stage='post_projector')"

    def placeholder_id(self, modality: str) -> int:
        return int(self.model.config.image_token_id)

    def _option(self, call: dict[str, Any], key: str) -> Any:
        value = call.get(key)
        return getattr(self.model.config, key) if value is None else value

    def encode(self, call: dict[str, Any]) -> list[VisualItem]:
        if getattr(self.reducer, "video_level", False):
            raise ValueError(f"{self.reducer.describe()} works on one video run; InternVL feeds frames as separate images")
        inner = self.model.model
        enc = call.get("mm_encoder_outputs") or {}
        captured: list[Tensor] = []
        if enc.get("image") is not None:
            if "scores" in self.reducer.needs:
                raise ValueError("cls_attn needs the vision tower to run; pass pixel_values, not mm_encoder_outputs")
            feats = enc["image"].pooler_output
        else:
            handle = self._capture_cls(call, captured) if "scores" in self.reducer.needs else None
            try:
                feats = inner.get_image_features(
                    pixel_values=call["pixel_values"], vision_feature_layer=call.get("vision_feature_layer"),
                    vision_feature_select_strategy=call.get("vision_feature_select_strategy"), return_dict=True,
                ).pooler_output
            finally:
                if handle is not None:
                    handle.remove()
        n = int(feats.shape[-2])
        side = math.isqrt(n)
        grid = (side, side) if side * side == n else None
        tiles = feats.reshape(-1, n, feats.shape[-1])
        scores = self._token_scores(captured[-1], call) if captured else None
        return [VisualItem("image", f, grid, None if scores is None else scores[i].to(f.device)) for i, f in enumerate(tiles)]

    def _capture_cls(self, call: dict[str, Any], captured: list[Tensor]) -> Any:
        """Hook appending the class token's attention ``(tiles, 1 + patches)`` at the feature layer."""
        if self._option(call, "vision_feature_select_strategy") != "default":
            raise ValueError("cls_attn needs vision_feature_select_strategy='default' (the class token set apart)")
        layers = self.model.model.vision_tower.encoder.layer
        index = int(self._option(call, "vision_feature_layer")) % (len(layers) + 1) - 1
        if index < 0:
            raise ValueError("cls_attn: vision_feature_layer points at the embeddings, which have no attention")
        return capture_cls_attention(layers[index].attention, captured)

    def _token_scores(self, attention: Tensor, call: dict[str, Any]) -> Tensor:
        """Class-token attention per patch ``(tiles, 1 + P)`` -> per LLM token ``(tiles, T)``: the sum over the
        patches the host's pixel shuffle folds into each token."""
        patches = attention[:, 1:]
        side = math.isqrt(patches.shape[1])
        index = torch.arange(side * side, dtype=torch.float64).view(1, side, side, 1)
        folded = self.model.model.pixel_shuffle(index, scale_factor=self.model.config.downsample_ratio)
        members = folded.reshape(-1, folded.shape[-1]).long()  # (T, patches per token)
        return patches[:, members.to(patches.device)].sum(-1)
