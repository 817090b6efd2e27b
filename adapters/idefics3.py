"""HF transformers ``Idefics3ForConditionalGeneration`` and ``SmolVLMForConditionalGeneration``: per sub-image.

Both split an image into sub-images (a grid of crops, then the whole image downscaled), run each through
the SigLIP tower and a pixel-shuffle connector (``scale_factor**2`` patches folded into one token), and lay
the tokens out as one run of ``image_token_id`` placeholders per sub-image, between text markers the
processor writes (``<fake_token_around_image><row_r_col_c>`` ... ``<global-img>``). Reduction runs on each
sub-image's connector output on its ``(h, w)`` grid (a per-sub-image budget); the markers are text, so they
are all kept and every kept run still sits between its own markers.

On transformers < 5.21, SmolVLM's ``inputs_merger`` scatters image tokens in blocks of the vision
``patch_size``; a reduction that leaves a row with another count is refused there with that reason.

Refused, with the reason: ``stage="pre_projector"`` (the pixel shuffle folds the full patch grid),
``cls_attn`` (SigLIP has no class token), video-level methods (SmolVLM feeds a video as separate frame
images with timestamp text between them, not as one run).
"""

from __future__ import annotations

import math
from typing import Any

from torch import nn

from mmeff.adapters.base import register_adapter
from mmeff.adapters.hf_vlm import HFVLMAdapter, VisualItem
from mmeff.hosts import is_instance_of

__all__ = ["Idefics3Adapter"]

_HOSTS = (
    ("transformers.models.idefics3.modeling_idefics3", "Idefics3ForConditionalGeneration"),
    ("transformers.models.smolvlm.modeling_smolvlm", "SmolVLMForConditionalGeneration"),
)


def transformers_version() -> str:
    """The installed transformers version string."""
    import transformers

    return str(transformers.__version__)


def smolvlm_block_merger(model: nn.Module) -> bool:
    """Whether ``model`` is a SmolVLM whose ``inputs_merger`` (transformers < 5.21) views the image tokens
    of each row as blocks of the vision ``patch_size``."""
    from packaging.version import Version

    return type(model).__name__ == "SmolVLMForConditionalGeneration" and Version(transformers_version()) < Version("5.21")


@register_adapter
class Idefics3Adapter(HFVLMAdapter):
    name = "idefics3"
    description = "transformers Idefics3 / SmolVLM ForConditionalGeneration: reduce each sub-image's tokens"
    hf_classes = tuple(name for _, name in _HOSTS)
    host_notes = (
        "post_projector only (the pixel shuffle folds the full patch grid); each sub-image on its own grid, "
        "marker tokens kept; cls_attn (SigLIP, no CLS) and video-level methods refused"
    )
    pixel_keys = {"image": "pixel_values"}
    stages = ("post_projector",)
    encoder_keys = ("pixel_attention_mask",)

    def prepare(self, call: dict[str, Any]) -> dict[str, Any] | None:
        new = super().prepare(call)
        if new is not None and smolvlm_block_merger(self.model):
            block = int(self.model.config.vision_config.patch_size)
            per_row = (new["input_ids"] == self.placeholder_id("image")).sum(1)
            if bool((per_row % block).any()):
                raise ValueError(
                    f"transformers {transformers_version()}'s SmolVLM places image tokens in blocks of {block}; this "
                    f"reduction leaves {per_row.tolist()} per row: keep a multiple of {block} per row, or use "
                    "transformers >= 5.21")
        return new

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return is_instance_of(model, _HOSTS)

    def _stage_hint(self, stage: str) -> str:
        return "; the connector's pixel shuffle folds the full patch grid, so reduction runs on its output (stage='post_projector')"

    def placeholder_id(self, modality: str) -> int:
        return int(self.model.config.image_token_id)

    def encode(self, call: dict[str, Any]) -> list[VisualItem]:
        if "scores" in self.reducer.needs:
            raise ValueError(f"{self.reducer.describe()} needs a class token's attention; the SigLIP tower has none")
        if getattr(self.reducer, "video_level", False):
            raise ValueError(f"{self.reducer.describe()} works on one video run; {type(self.model).__name__} feeds video "
                             "frames as separate images with timestamp text between them")
        enc = call.get("mm_encoder_outputs") or {}
        if enc.get("image") is not None:
            rows = enc["image"].pooler_output
        else:
            rows = self.model.model.get_image_features(call["pixel_values"], call.get("pixel_attention_mask"),
                                                       return_dict=True).pooler_output
        vc = self.model.config.vision_config
        per_image = (int(vc.image_size) // int(vc.patch_size)) ** 2 // int(self.model.config.scale_factor) ** 2
        side = math.isqrt(per_image)
        grid = (side, side) if side * side == per_image else None
        rows = list(rows) if isinstance(rows, (list, tuple)) else [rows.reshape(-1, rows.shape[-1])]
        return [VisualItem("image", f, grid) for row in rows for f in row.split(per_image)]
