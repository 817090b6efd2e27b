"""HF transformers LLaVA-NeXT, LLaVA-NeXT-Video and LLaVA-OneVision: anyres tiles, newline tokens, pooled frames.

**Images (anyres).** The host encodes a base image (the whole picture resized) and a grid of tiles, projects
them, then packs each image as ``base (h*w) + mosaic``: the tiles stitched into one grid, the padding the
processor added cut off (``unpad``; OneVision may also resample an over-large mosaic, ``anyres_max_N``),
and an ``image_newline`` token after every mosaic row. mmeff reads that layout from the host's own
``pack_image_features``, run once more on token indices instead of features, so it never restates the
packing rules. Budgets are **per tile**: the base image and each tile's surviving (unpadded) part are
reduced on their own ``(h, w)`` grids, so ``ratio`` keeps that share of every tile and ``tokens=K`` keeps
K per tile (and K for the base image). When OneVision resampled the mosaic its tokens no longer belong to
one tile, and the whole mosaic is reduced as one grid.

**Newline tokens are kept, all of them**: they are the only thing telling the LLM where a mosaic row ends
(LLaVA-NeXT was trained with them), they are few (one per row: 48 for a 2x2 mosaic of 24x24 tiles next to
2,880 image tokens) and no reducer sees them. The kept tokens of a row stay in reading order, followed by
that row's newline; a merged token sits on its members' mean row; a row the reducer emptied leaves just
its newline. ``visual_tokens_out`` counts them.

**Videos.** LLaVA-NeXT-Video pools each frame 2x2 (``vision_resampler``) after the tower, OneVision pools it
2x2 (bilinear) after the projector and puts one newline after the whole video. Frame-level methods reduce
each pooled frame on its grid (a per-frame budget); video-level methods (Free Video-LLM) get the video as
one ``(T, h, w)`` grid. OneVision's trailing newline is kept.

Placement: every method runs on what the LLM reads (``post_projector``): the projector's input is the
unpacked tile batch, which the packing needs whole. ``cls_attn`` scores are the CLS token's attention at
the feature layer of each tile (and of the base image); they are refused for pooled video frames and
resampled mosaics, whose tokens have no single patch.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from mmeff.adapters.base import register_adapter
from mmeff.adapters.hf_vlm import VisualItem, join_run
from mmeff.adapters.llava import LlavaAdapter
from mmeff.core import Reduction
from mmeff.hosts import is_instance_of

__all__ = ["LlavaNextAdapter"]

#: (module, class, whether one newline token follows each video)
_HOSTS = (
    ("transformers.models.llava_next.modeling_llava_next", "LlavaNextForConditionalGeneration", False),
    ("transformers.models.llava_next_video.modeling_llava_next_video", "LlavaNextVideoForConditionalGeneration", False),
    ("transformers.models.llava_onevision.modeling_llava_onevision", "LlavaOnevisionForConditionalGeneration", True),
)
#: encoder keywords of the forward, passed to ``get_image_features`` when it takes them
_IMAGE_KEYS = ("image_sizes", "vision_feature_layer", "vision_feature_select_strategy", "batch_num_images")


@dataclass
class _Part:
    """Inputs of one placeholder run: a reduced item's (``item``) or fixed tokens no reducer sees."""

    slots: Tensor  # (N,) long: run slot of each input
    rows: Tensor  # (N,) long: each input's row in the run's reading order
    col: float = 0.0  # order among parts on the same row
    item: int | None = None
    tokens: Tensor | None = None  # (N, D) fixed tokens


@dataclass
class _Run:
    modality: str
    num_slots: int
    width: int  # keys are row * width + col
    parts: list[_Part]


def _host(model: nn.Module) -> tuple[str, str, bool] | None:
    for mod, name, video_newline in _HOSTS:
        if is_instance_of(model, [(mod, name)]):
            return mod, name, video_newline
    return None


@register_adapter
class LlavaNextAdapter(LlavaAdapter):
    name = "llava_next"
    description = ("transformers LLaVA-NeXT / NeXT-Video / OneVision: per-tile and per-frame reduction, "
                   "newline tokens kept")
    hf_classes = tuple(name for _, name, _ in _HOSTS)
    host_notes = (
        "post_projector only; base image and each tile on its own grid, newline tokens kept; frames "
        "after the 2x2 pooling; cls_attn refused on SigLIP towers, pooled frames, resampled mosaics"
    )
    pixel_keys = {"image": "pixel_values", "video": "pixel_values_videos"}
    stages = ("post_projector",)
    encoder_keys = (*_IMAGE_KEYS, "vision_aspect_ratio", "image_sizes_videos")

    def __init__(self, model: nn.Module, reducer: Any, **options: Any) -> None:
        super().__init__(model, reducer, **options)
        host = _host(model)
        # OneVision takes each video's features (frames + newline) as one tensor
        self.concat_features = ("video",) if host is not None and host[2] else ()

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return _host(model) is not None

    def _stage_hint(self, stage: str) -> str:
        return ("; the projector's input is the unpacked batch of tiles, which the host's packing (unpad, "
                "newline tokens) needs whole, so reduction runs on what the LLM reads (stage='post_projector')")

    def placeholder_id(self, modality: str) -> int:
        cfg = self.model.config
        return int(cfg.image_token_id if modality == "image" else cfg.video_token_id)

    # ------------------------------------------------------------------------------------------ encode
    def encode(self, call: dict[str, Any]) -> list[VisualItem]:
        enc = call.get("mm_encoder_outputs") or {}
        if any(enc.get(m) is not None for m in ("image", "video")):
            raise ValueError(f"{type(self.model).__name__}: pass pixel_values / pixel_values_videos, not mm_encoder_outputs "
                             "(mmeff reads the tile and frame layout from the encoder call)")
        items: list[VisualItem] = []
        self._runs: list[_Run] = []
        if call.get("pixel_values") is not None:
            if getattr(self.reducer, "video_level", False):
                raise ValueError(f"{self.reducer.describe()} works on videos; pass the frames as pixel_values_videos")
            self._encode_images(call, items)
        if call.get("pixel_values_videos") is not None:
            self._encode_videos(call, items)
        return items

    def _encode_images(self, call: dict[str, Any], items: list[VisualItem]) -> None:
        inner = self.model.model
        seen: dict[str, Any] = {}
        pack = inner.pack_image_features

        def spy(image_features: list[Tensor], *args: Any, **kwargs: Any) -> Any:
            seen["tiles"], seen["args"], seen["kwargs"] = [int(f.shape[0]) for f in image_features], args, kwargs
            seen["hw"] = int(image_features[0].shape[1])
            return pack(image_features, *args, **kwargs)

        captured: list[Tensor] = []
        handles = [self._capture_cls(call, captured)] if "scores" in self.reducer.needs else []
        params = inspect.signature(inner.get_image_features).parameters
        kwargs = {k: call[k] for k in _IMAGE_KEYS if k in params and call.get(k) is not None}
        inner.pack_image_features = spy  # the host's own packing, watched for one call
        try:
            packed = inner.get_image_features(pixel_values=call["pixel_values"], return_dict=True, **kwargs).pooler_output
        finally:
            del inner.pack_image_features
            for h in handles:
                h.remove()
        hw, tiles = seen["hw"], seen["tiles"]
        # the same packing on token indices (newline = -1) tells where every packed token came from
        index = [torch.arange(t * hw, dtype=torch.float64).view(t, hw, 1) for t in tiles]
        trace_kwargs = {**seen["kwargs"], "image_newline": torch.tensor([-1.0], dtype=torch.float64)}
        traces = pack(index, *seen["args"], **trace_kwargs)[0]
        scores = None
        if captured:
            scores = captured[-1][:, 1:] if self._strategy(call) == "default" else captured[-1]
        first_tile = 0
        for feats, trace, n_tiles in zip(packed, traces, tiles):
            tile_scores = None if scores is None else scores[first_tile:first_tile + n_tiles]
            self._runs.append(self._image_run(feats, trace[:, 0], hw, tile_scores, items))
            first_tile += n_tiles

    def _image_run(self, feats: Tensor, trace: Tensor, hw: int, scores: Tensor | None, items: list[VisualItem]) -> _Run:
        """Items and run layout of one packed image: ``feats`` ``(L, D)``, ``trace`` ``(L,)`` source indices."""
        length = int(trace.shape[0])
        newline = trace < 0
        slots = torch.arange(length)
        side = math.isqrt(hw)
        tile_grid = (side, side) if side * side == hw else None
        base = slots[:hw]
        if not torch.equal(trace[base], torch.arange(hw, dtype=trace.dtype)):
            raise ValueError("unexpected LLaVA-NeXT packing: the base image does not come first")
        parts = [self._item_part(items, feats, base, torch.full((hw,), -1), tile_grid, 0.0,
                                 None if scores is None else scores[0])]
        mosaic = slots[hw:]
        is_nl = newline[hw:]
        rows = is_nl.long().cumsum(0) - is_nl.long()  # row r's tokens, then its newline
        toks = mosaic[~is_nl]
        if toks.numel() == 0:  # a single tile: base then one newline
            parts.append(_Part(mosaic[is_nl], torch.zeros(int(is_nl.sum()), dtype=torch.long), tokens=feats[mosaic[is_nl]]))
            return _Run("image", length, 1, parts)
        tok_rows = rows[~is_nl]
        first_of_row = torch.searchsorted(tok_rows, tok_rows, right=False)
        cols = torch.arange(toks.numel()) - first_of_row
        width = int(cols.max()) + 2
        src = trace[toks]
        if torch.equal(src, src.round()):
            tile = (src.long() - hw) // hw
            for k in tile.unique().tolist():
                sel = tile == k
                p = src[sel].long() - hw * (k + 1)
                grid = (int((p // side).unique().numel()), int((p % side).unique().numel()))
                grid = grid if grid[0] * grid[1] == int(sel.sum()) else None
                parts.append(self._item_part(items, feats, toks[sel], tok_rows[sel], grid, float(cols[sel].min()),
                                             None if scores is None else scores[1 + k, p]))
        else:
            if scores is not None:
                raise ValueError(f"{self.reducer.describe()}: OneVision resampled this image's tiles (anyres_max), so its "
                                 "tokens have no single patch to score")
            n_rows = int(tok_rows.max()) + 1
            grid = (n_rows, width - 1) if n_rows * (width - 1) == toks.numel() else None
            parts.append(self._item_part(items, feats, toks, tok_rows, grid, 0.0, None))
        nl = mosaic[is_nl]
        parts.append(_Part(nl, rows[is_nl], col=float(width - 1), tokens=feats[nl]))
        return _Run("image", length, width, parts)

    @staticmethod
    def _item_part(items: list[VisualItem], feats: Tensor, slots: Tensor, rows: Tensor, grid: Any, col: float,
                   scores: Tensor | None, modality: str = "image", extras: dict[str, Any] | None = None) -> _Part:
        items.append(VisualItem(modality, feats[slots.to(feats.device)], grid,
                                None if scores is None else scores.to(feats.device), extras=extras or {}))
        return _Part(slots, rows, col, item=len(items) - 1)

    def _encode_videos(self, call: dict[str, Any], items: list[VisualItem]) -> None:
        if "scores" in self.reducer.needs:
            raise ValueError(f"{self.reducer.describe()}: {type(self.model).__name__} pools each video frame 2x2 after the "
                             "tower, so its tokens have no single patch to score")
        video = call["pixel_values_videos"]
        out = self.model.model.get_video_features(
            pixel_values_videos=video, vision_feature_layer=call.get("vision_feature_layer"),
            vision_feature_select_strategy=call.get("vision_feature_select_strategy"), return_dict=True,
        ).pooler_output
        newline = _host(self.model)[2]
        frames = int(video.shape[1])
        video_level = bool(getattr(self.reducer, "video_level", False))
        texts = self._row_texts(int(call["input_ids"].shape[0])) if video_level else None
        placeholder_rows = (call["input_ids"] == self.placeholder_id("video")).nonzero()[:, 0]
        for b, feats in enumerate(out):
            n = int(feats.shape[0]) - int(newline)
            per_frame = n // frames
            side = math.isqrt(per_frame)
            grid = (side, side) if side * side == per_frame else None
            length = int(feats.shape[0])
            slots = torch.arange(length)
            frame_of = torch.arange(n) // per_frame
            if video_level:
                if grid is None:
                    raise ValueError("video-level methods need every frame on a square pooled grid")
                row = int(placeholder_rows[b * length]) if placeholder_rows.numel() >= (b + 1) * length else 0
                extras = {"text": None if texts is None else texts[row], "pixels": video[b]}
                parts = [self._item_part(items, feats, slots[:n], torch.zeros(n, dtype=torch.long), (frames, *grid),
                                         0.0, None, "video", extras)]
            else:
                parts = [self._item_part(items, feats, slots[f * per_frame:(f + 1) * per_frame],
                                         frame_of[f * per_frame:(f + 1) * per_frame], grid, 0.0, None, "video")
                         for f in range(frames)]
            if newline:
                parts.append(_Part(slots[n:], torch.full((1,), frames), tokens=feats[n:]))
            self._runs.append(_Run("video", length, 1, parts))

    # -------------------------------------------------------------------------------------------- runs
    def runs(self, items: list[VisualItem], reductions: list[Reduction]) -> tuple[list[VisualItem], list[Reduction]]:
        run_items, run_reds = [], []
        for run in self._runs:
            only = run.parts[0]
            if len(run.parts) == 1 and only.item is not None and torch.equal(only.slots, torch.arange(run.num_slots)):
                red = reductions[only.item]  # one reduced item fills the run as it is (keeps its sources)
            else:
                joined = []
                for part in run.parts:
                    r = reductions[part.item] if part.item is not None else Reduction.identity(part.tokens.unsqueeze(0))
                    rows = r.positions(part.rows.to(r.assignment.device).unsqueeze(0))[0]
                    joined.append((r, part.slots, rows.to(torch.float64) * run.width + part.col))
                red = join_run(run.num_slots, joined)
            run_items.append(VisualItem(run.modality, red.tokens[0], None, reduction=red))
            run_reds.append(red)
        return run_items, run_reds
