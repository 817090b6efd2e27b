"""HF transformers ``LlavaForConditionalGeneration`` (LLaVA-1.5 and friends with a CLIP-like tower).

Reduction happens on the projected features (what the LLM reads) or, with ``stage="pre_projector"`` (the
default for methods whose paper does so, e.g. Fourier-VLM), on the vision tower's selected features right
before ``multi_modal_projector``, through a forward pre-hook on it; one image at a time with its ``(H, W)``
patch grid either way. ``cls_attn`` scores come from q/k of the CLS token at the feature layer,
captured by a forward pre-hook on that layer's attention module, so SDPA/flash attention stay on.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from mmeff.adapters.base import capture_cls_attention, register_adapter
from mmeff.adapters.hf_vlm import HFVLMAdapter, VisualItem, select_row
from mmeff.core import Reduction, TokenContext
from mmeff.hosts import is_instance_of, projector, vision_tower

__all__ = ["LlavaAdapter"]


@register_adapter
class LlavaAdapter(HFVLMAdapter):
    name = "llava"
    description = "transformers LlavaForConditionalGeneration (LLaVA-1.5): reduce projected image features"
    hf_classes = ("LlavaForConditionalGeneration",)
    host_notes = (
        "pre_projector (Fourier-VLM, VisToG default) or post_projector; cls_attn from the tower's CLS; "
        "video-level methods on runs of frames"
    )
    pixel_keys = {"image": "pixel_values"}
    stages = ("pre_projector", "post_projector")
    encoder_keys = ("vision_feature_layer", "vision_feature_select_strategy", "image_sizes")

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        # only a loaded module can have produced an instance, so never import transformers' LLaVA here
        return is_instance_of(model, [("transformers.models.llava.modeling_llava", "LlavaForConditionalGeneration")])

    def placeholder_id(self, modality: str) -> int:
        return int(self.model.config.image_token_id)

    def _feature_layer(self, call: dict[str, Any]) -> int:
        layer = call.get("vision_feature_layer")
        layer = self.model.config.vision_feature_layer if layer is None else layer
        return max(layer) if isinstance(layer, (list, tuple)) else int(layer)

    def _strategy(self, call: dict[str, Any]) -> str:
        s = call.get("vision_feature_select_strategy")
        return self.model.config.vision_feature_select_strategy if s is None else s

    def _attention_layer(self, feature_layer: int) -> nn.Module:
        tower = vision_tower(self.model)
        layers = getattr(getattr(tower, "encoder", None), "layers", None)
        if layers is None:
            raise ValueError(f"cls_attn: cannot find CLIP/SigLIP encoder layers in {type(self.model).__name__}")
        # hidden_states[k] is the output of layers[k-1]; hidden_states has len(layers)+1 entries
        idx = feature_layer % (len(layers) + 1) - 1
        if idx < 0:
            raise ValueError("cls_attn: vision_feature_layer points at the embeddings, which have no attention")
        attn = layers[idx].self_attn
        if not (hasattr(attn, "q_proj") and hasattr(attn, "k_proj")):
            raise ValueError(f"cls_attn: attention module {type(attn).__name__} has no q_proj/k_proj")
        return attn

    def _capture_cls(self, call: dict[str, Any], captured: list[Tensor]) -> RemovableHandle:
        """Hook appending the CLS token's attention ``(tiles, 1 + N)`` at the feature layer to ``captured``."""
        if "siglip" in str(getattr(self.model.config.vision_config, "model_type", "")):
            raise ValueError(f"{self.reducer.describe()} needs a class token's attention; this model's SigLIP tower has none")
        return capture_cls_attention(self._attention_layer(self._feature_layer(call)), captured)

    def encode(self, call: dict[str, Any]) -> list[VisualItem]:
        inner = self.model.model
        enc = call.get("mm_encoder_outputs") or {}
        video_level = bool(getattr(self.reducer, "video_level", False))
        if video_level and self.stage == "pre_projector":
            raise ValueError(f"{self.reducer.describe()} works on whole videos after the projector; use stage='post_projector'")
        captured: list[Tensor] = []
        early: list[Reduction] = []
        patch = int(self.model.config.vision_config.patch_size)
        if enc.get("image") is not None:
            if "scores" in self.reducer.needs:
                raise ValueError("cls_attn needs the vision tower to run; pass pixel_values, not mm_encoder_outputs")
            if self.stage == "pre_projector":
                raise ValueError(
                    "stage='pre_projector' needs pixel_values: mm_encoder_outputs are already projected "
                    "(pass stage='post_projector' to reduce them)"
                )
            feats = list(enc["image"].pooler_output)
            pixel_hw = None
        else:
            pixel_values: Tensor = call["pixel_values"]
            pixel_hw = tuple(pixel_values.shape[-2:])
            handles = []
            if self.stage == "pre_projector":
                if call.get("image_sizes") is not None:
                    raise ValueError("stage='pre_projector' does not support image_sizes (packed variable-size images)")
                grid = (pixel_hw[0] // patch, pixel_hw[1] // patch)
                strategy = self._strategy(call)

                def reduce_input(module: nn.Module, args: tuple) -> tuple:
                    x = args[0]
                    s = None
                    if captured:
                        s = captured[-1][:, 1:] if strategy == "default" else captured[-1]
                        s = s.to(x.device)
                    # the grid only describes the patches; with strategy "full" the CLS token breaks it
                    g = grid if x.shape[1] == grid[0] * grid[1] else None
                    red = self.reducer(x, TokenContext(grid=g, scores=s))
                    early.append(red)
                    return (red.tokens, *args[1:])

                handles.append(projector(self.model).register_forward_pre_hook(reduce_input))
            if "scores" in self.reducer.needs:
                handles.insert(0, self._capture_cls(call, captured))
            try:
                out = inner.get_image_features(
                    pixel_values=pixel_values,
                    vision_feature_layer=call.get("vision_feature_layer"),
                    vision_feature_select_strategy=call.get("vision_feature_select_strategy"),
                    image_sizes=call.get("image_sizes"),
                    return_dict=True,
                )
            finally:
                for h in handles:
                    h.remove()
            feats = list(out.pooler_output)
        scores = captured[-1] if captured else None
        items = []
        for i, f in enumerate(feats):
            if early:
                red = select_row(early[-1], i)
                red.tokens = f.unsqueeze(0)
                items.append(VisualItem("image", f, grid, None, reduction=red))
                continue
            n = f.shape[0]
            grid = None
            if pixel_hw is not None and n == (pixel_hw[0] // patch) * (pixel_hw[1] // patch):
                grid = (pixel_hw[0] // patch, pixel_hw[1] // patch)
            elif pixel_hw is None and int(n**0.5) ** 2 == n:
                grid = (int(n**0.5), int(n**0.5))
            s = None
            if scores is not None:
                s = scores[i]
                if self._strategy(call) == "default":
                    s = s[1:]
                if s.shape[0] != n:
                    raise ValueError(f"cls_attn: {s.shape[0]} scores for {n} features (unsupported feature layout)")
            items.append(VisualItem("image", f, grid, None if s is None else s.to(f.device)))
        if video_level:
            pixels = call.get("pixel_values") if enc.get("image") is None else None
            items = self._group_videos(call["input_ids"], items, pixels)
        return items

    def _group_videos(self, input_ids: Tensor, items: list[VisualItem], pixels: Tensor | None) -> list[VisualItem]:
        """One item per contiguous run of image placeholders: a run holding k images is a k-frame video
        with grid ``(k, H, W)``; its frames' pixels and its row's question travel in ``extras``."""
        b = input_ids.shape[0]
        text = self._row_texts(b)
        is_img = (input_ids == self.placeholder_id("image")).tolist()
        runs: list[tuple[int, int]] = []
        for row, flags in enumerate(is_img):
            length = 0
            for flag in [*flags, False]:
                if flag:
                    length += 1
                elif length:
                    runs.append((row, length))
                    length = 0
        out: list[VisualItem] = []
        cursor = 0
        for row, length in runs:
            n = items[cursor].features.shape[0]
            if length % n:
                raise ValueError(f"a run of {length} image tokens is not a whole number of {n}-token frames")
            frames = items[cursor : cursor + length // n]
            cursor += len(frames)
            grid = frames[0].grid
            if grid is None or len(grid) != 2 or any(f.grid != grid for f in frames):
                raise ValueError("video-level methods need every frame on the same (H, W) patch grid")
            extras: dict[str, Any] = {"text": None if text is None else text[row]}
            if pixels is not None:
                extras["pixels"] = pixels[cursor - len(frames) : cursor]
            feats = torch.cat([f.features for f in frames])
            out.append(VisualItem("image", feats, (len(frames), *grid), None, extras=extras))
        if cursor != len(items):
            raise ValueError(f"{len(items)} images but the placeholder runs hold {cursor}")
        return out
