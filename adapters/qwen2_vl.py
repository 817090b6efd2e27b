"""HF transformers ``Qwen2VLForConditionalGeneration`` (and Qwen2.5-VL, which shares the seams).

Reduction runs on the PatchMerger output (what the LLM reads), per image on its ``(h, w)`` grid and per
video on its ``(t, h, w)`` grid, in merged-token units (``grid_thw // (1, 2, 2)``). M-RoPE positions are
computed by the host's ``get_rope_index`` on the unreduced prompt and gathered for the kept tokens;
``rope_deltas`` is set for the reduced layout so decoding continues at the right position.

Options (``mmeff.apply(model, reducer, **options)``):

- ``mrope="gather"`` (default; ``FourierLowPass(faithful=True)`` defaults to ``"regrid"``): every kept token keeps its original (t, h, w) M-RoPE position, a merged
  token its members' rounded mean; text after the image keeps its unreduced positions.
- ``mrope="regrid"``: for grid-shaped reductions (pool, Fourier-VLM), positions are recomputed by the
  host's ``get_rope_index`` as if the image had the reduced grid (``grid_thw = (t, 2h', 2w')``), which is
  what Fourier-VLM's code does by overwriting ``grid_thw``; here the caller's ``grid_thw`` is never
  mutated, so running the same inputs twice gives the same result.

``stage="pre_projector"`` is refused: the PatchMerger consumes 2x2 windows of patches, which a reduction
before it would break; every method here runs on its output.

The encoder has no CLS token, so ``cls_attn`` scores here are the mean attention each patch receives in
the last vision block (a common CLS-free substitute), averaged over each 2×2 merge window.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from einops import rearrange
from torch import Tensor, nn
from transformers.models.qwen2_vl.modeling_qwen2_vl import apply_rotary_pos_emb_vision

from mmeff.adapters.base import register_adapter
from mmeff.adapters.hf_vlm import HFVLMAdapter, VisualItem
from mmeff.hosts import is_instance_of
from mmeff.methods.fourier import FourierLowPass

__all__ = ["Qwen2VLAdapter", "qwen2_vl_patchify", "qwen2_vl_unpatchify", "received_attention"]


def received_attention(q: Tensor, k: Tensor, chunk: int = 1024) -> Tensor:
    """Mean attention each key receives over all queries and heads.

    Args:
        q, k: ``(heads, N, head_dim)`` for one attention segment.
    Returns:
        ``(N,)`` float32; sums to 1 over N. Queries are processed in chunks to bound memory at
        ``heads * chunk * N`` floats.
    """
    heads, n, d = q.shape
    total = torch.zeros(n, dtype=torch.float32, device=q.device)
    kf = k.float()
    for s in range(0, n, chunk):
        p = (torch.einsum("hqd,hkd->hqk", q[:, s : s + chunk].float(), kf) * d**-0.5).softmax(-1)
        total += p.sum(dim=(0, 1))
    return total / (heads * n)


def qwen2_vl_patchify(
    frames: torch.Tensor, patch_size: int, merge_size: int, temporal_patch_size: int
) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """Flatten normalised frames (T, C, H, W) into Qwen2-VL patches, exactly like the HF image/video processors.

    T is padded to a multiple of ``temporal_patch_size`` by repeating the last frame (an image, T=1, is
    duplicated). H and W must be multiples of ``patch_size * merge_size``. Patches are ordered by merge
    window (the vision tower's rotary positions and merger rely on that order).

    Returns ``patches`` (grid_t*grid_h*grid_w, C*temporal_patch_size*patch_size**2) and ``(grid_t, grid_h, grid_w)``.
    """
    if frames.ndim != 4:
        raise ValueError(f"frames must be (T, C, H, W), got shape {tuple(frames.shape)}")
    t, c, h, w = frames.shape
    unit = patch_size * merge_size
    if h % unit or w % unit or h == 0 or w == 0:
        raise ValueError(f"frame size {h}x{w} must be a positive multiple of patch*merge = {unit}")
    if pad := -t % temporal_patch_size:
        frames = torch.cat([frames, frames[-1:].expand(pad, -1, -1, -1)], dim=0)
        t += pad
    gt, gh, gw = t // temporal_patch_size, h // patch_size, w // patch_size
    # Qwen2VLVideoProcessor.patchify's order: merge window by merge window, each patch (C, tp, p, p)
    patches = rearrange(frames, "(gt tp) c (bh mh p) (bw mw q) -> (gt bh bw mh mw) (c tp p q)",
                        tp=temporal_patch_size, mh=merge_size, mw=merge_size, p=patch_size, q=patch_size)
    return patches, (gt, gh, gw)


def qwen2_vl_unpatchify(
    patches: torch.Tensor, grid: Sequence[int], patch_size: int, merge_size: int, temporal_patch_size: int,
    channels: int = 3,
) -> torch.Tensor:
    """Inverse of :func:`qwen2_vl_patchify`: patches ``(t*h*w, C*tp*p*p)`` of one item with ``grid``
    ``(t, h, w)`` -> normalised frames ``(t*tp, C, h*p, w*p)`` (padding frames included)."""
    gt, gh, gw = (int(g) for g in grid)
    m, p, tp = merge_size, patch_size, temporal_patch_size
    if patches.shape != (gt * gh * gw, channels * tp * p * p):
        raise ValueError(f"patches {tuple(patches.shape)} do not match grid {tuple(grid)} with C={channels}, tp={tp}, p={p}")
    return rearrange(patches, "(gt bh bw mh mw) (c tp p q) -> (gt tp) c (bh mh p) (bw mw q)",
                     gt=gt, bh=gh // m, bw=gw // m, mh=m, mw=m, c=channels, tp=tp, p=p, q=p)


@register_adapter
class Qwen2VLAdapter(HFVLMAdapter):
    name = "qwen2_vl"
    description = "transformers Qwen2VL/Qwen2.5-VL ForConditionalGeneration: reduce merged image/video tokens"
    hf_classes = ("Qwen2VLForConditionalGeneration", "Qwen2_5_VLForConditionalGeneration")
    host_notes = (
        "post_projector (after the PatchMerger); M-RoPE positions gathered from the unreduced layout (or "
        "re-gridded); images and videos"
    )
    pixel_keys = {"image": "pixel_values", "video": "pixel_values_videos"}
    encoder_keys = ("image_grid_thw", "video_grid_thw", "second_per_grid_ts")
    option_names = frozenset({"stage", "mrope"})

    def __init__(self, model: nn.Module, reducer: Any, **options: Any) -> None:
        super().__init__(model, reducer, **options)
        # Fourier-VLM's official hook re-grids the positions; faithful=True asks for that by default
        official = isinstance(reducer, FourierLowPass) and reducer.faithful
        mrope = options.get("mrope", "regrid" if official else "gather")
        if mrope not in ("gather", "regrid"):
            raise ValueError(f"mrope must be 'gather' or 'regrid', got {mrope!r}")
        self.mrope: str = mrope

    def _stage_hint(self, stage: str) -> str:
        return "; the PatchMerger needs whole 2x2 patch windows, so reductions run on its output (post_projector)"

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return is_instance_of(model, [(f"transformers.models.{m}.modeling_{m}", c) for m, c in (
            ("qwen2_vl", "Qwen2VLForConditionalGeneration"), ("qwen2_5_vl", "Qwen2_5_VLForConditionalGeneration"))])

    def placeholder_id(self, modality: str) -> int:
        cfg = self.model.config
        return int(cfg.image_token_id if modality == "image" else cfg.video_token_id)

    @property
    def _merge(self) -> int:
        return int(self.model.config.vision_config.spatial_merge_size)

    def _capture_scores(self) -> tuple[list[Tensor], Any]:
        """Hooks that append per-merged-token scores ``(sum_i n_i,)`` to the returned list on each encode."""
        visual = self.model.model.visual
        attn = visual.blocks[-1].attn
        captured: list[Tensor] = []
        grids: list[Tensor] = []

        def grab_grid(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
            grids.append(kwargs.get("grid_thw", args[1] if len(args) > 1 else None))

        def grab(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
            h = kwargs.get("hidden_states", args[0] if args else None)
            cu = kwargs["cu_seqlens"]
            cos, sin = kwargs["position_embeddings"]
            n = h.shape[0]
            q, k, _ = module.qkv(h).reshape(n, 3, module.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
            q, k = apply_rotary_pos_emb_vision(q, k, cos, sin)
            q, k = q.transpose(0, 1), k.transpose(0, 1)
            parts = [received_attention(q[:, s:e], k[:, s:e]) for s, e in zip(cu[:-1].tolist(), cu[1:].tolist())]
            # the processor orders patches so each merge window's m*m patches are consecutive
            merged = torch.cat(parts).view(-1, self._merge**2).mean(-1)
            if getattr(visual, "window_size", None) is not None:
                # Qwen2.5-VL runs its blocks in window order; put scores back in the merger's output order
                # imported here, not at the top: transformers.vision_utils arrived within 5.x and pyproject
                # accepts transformers>=5.0, where only this Qwen2.5-VL path needs it
                from transformers.vision_utils import get_vision_window_index

                window_index, _ = get_vision_window_index(
                    grids[-1], spatial_merge_size=self._merge, window_size=visual.window_size,
                    patch_size=visual.patch_size, kwargs={},
                )
                merged = merged[torch.argsort(window_index.to(merged.device))]
            captured.append(merged)

        h1 = visual.register_forward_pre_hook(grab_grid, with_kwargs=True)
        h2 = attn.register_forward_pre_hook(grab, with_kwargs=True)

        class _Both:
            def remove(self) -> None:
                h1.remove()
                h2.remove()

        return captured, _Both()

    def encode(self, call: dict[str, Any]) -> list[VisualItem]:
        inner = self.model.model
        enc = call.get("mm_encoder_outputs") or {}
        items: list[VisualItem] = []
        for modality, pix_key, grid_key, fn in (
            ("image", "pixel_values", "image_grid_thw", inner.get_image_features),
            ("video", "pixel_values_videos", "video_grid_thw", inner.get_video_features),
        ):
            grid_thw = call.get(grid_key)
            scores: Tensor | None = None
            if enc.get(modality) is not None:
                if "scores" in self.reducer.needs:
                    raise ValueError("cls_attn needs the vision tower to run; pass pixel values, not mm_encoder_outputs")
                out = enc[modality]
            elif call.get(pix_key) is not None:
                if grid_thw is None:
                    raise ValueError(f"{pix_key} given without {grid_key}")
                captured, handle = self._capture_scores() if "scores" in self.reducer.needs else ([], None)
                try:
                    out = fn(call[pix_key], grid_thw, return_dict=True)
                finally:
                    if handle is not None:
                        handle.remove()
                scores = captured[-1] if captured else None
            else:
                continue
            feats = list(out.pooler_output)
            companions = self.companions_of(out, len(feats))
            offset = 0
            for i, f in enumerate(feats):
                grid = None
                if grid_thw is not None:
                    t, h, w = (int(v) for v in grid_thw[i])
                    t, h, w = t, h // self._merge, w // self._merge
                    grid = (h, w) if (modality == "image" and t == 1) else (t, h, w)
                n = f.shape[0]
                s = None if scores is None else scores[offset : offset + n].to(f.device)
                offset += n
                items.append(VisualItem(modality, f, grid, s, companions=companions[i]))
        if getattr(self.reducer, "video_level", False):
            self._video_extras(call, items)
        return items

    def companions_of(self, out: Any, n: int) -> list[list[Tensor]]:
        """Per item, the features besides ``pooler_output`` that must shrink with its tokens (none here)."""
        return [[] for _ in range(n)]

    def _video_extras(self, call: dict[str, Any], items: list[VisualItem]) -> None:
        """For video-level methods: each video's question (``mmeff_text``) and its frames, recovered from the
        patchified pixels (first frame of each temporal patch, so one frame per merged time step)."""
        vids = [it for it in items if it.modality == "video"]
        if not vids:
            return
        ids = call["input_ids"]
        b = ids.shape[0]
        text = self._row_texts(b)
        # a video's placeholders start right after a vision_start token: count them per row, in order
        start = ids == int(self.model.config.vision_start_token_id)
        nxt = torch.zeros_like(start)
        nxt[:, :-1] = ids[:, 1:] == self.placeholder_id("video")
        rows = (start & nxt).nonzero(as_tuple=True)[0].tolist()
        if len(rows) != len(vids):
            raise ValueError(f"{len(vids)} videos but {len(rows)} video placeholder runs in input_ids")
        pix, grid_thw = call.get("pixel_values_videos"), call.get("video_grid_thw")
        vc = self.model.config.vision_config
        offset = 0
        for it, row, thw in zip(vids, rows, grid_thw.tolist() if grid_thw is not None else [None] * len(vids), strict=True):
            it.extras["text"] = None if text is None else text[row]
            if pix is not None and thw is not None:
                n = thw[0] * thw[1] * thw[2]
                frames = qwen2_vl_unpatchify(pix[offset : offset + n], thw, vc.patch_size, vc.spatial_merge_size,
                                             vc.temporal_patch_size, getattr(vc, "in_channels", 3))
                offset += n
                it.extras["pixels"] = frames[:: vc.temporal_patch_size]

    def full_positions(self, call: dict[str, Any]) -> Tensor | None:
        if self.mrope == "regrid":
            return None  # recomputed on the reduced layout in _shrink; gathering them first is wasted work
        inner = self.model.model
        if call.get("position_ids") is not None:
            pos = call["position_ids"]
            return pos[1:] if pos.shape[0] == 4 else pos
        if call.get("mm_token_type_ids") is None:
            raise ValueError("Qwen2-VL needs mm_token_type_ids (returned by its processor) to place M-RoPE positions")
        extra = {}
        if call.get("second_per_grid_ts") is not None:
            extra["second_per_grid_ts"] = call["second_per_grid_ts"]
        pos, _ = inner.get_rope_index(
            call["input_ids"],
            mm_token_type_ids=call["mm_token_type_ids"],
            image_grid_thw=call.get("image_grid_thw"),
            video_grid_thw=call.get("video_grid_thw"),
            attention_mask=call.get("attention_mask"),
            **extra,
        )
        return pos

    def decode_positions(self, mask: Tensor, q: int) -> Tensor | None:
        # the host derives decode positions from the whole mask without slicing the new tokens
        # (transformers 5.23), so hand-written decode loops get them from here instead
        deltas = self.model.model.rope_deltas
        if deltas is None:
            return None
        pos = (mask.long().cumsum(-1) - 1)[:, -q:] + deltas.to(mask.device)
        return pos.unsqueeze(0).expand(3, -1, -1)

    def _shrink(self, call: dict[str, Any], items: list[VisualItem], reds: list, positions: Tensor | None) -> dict:
        new = super()._shrink(call, items, reds, positions)
        if self.mrope == "regrid":
            new["position_ids"] = self._regrid_positions(call, new, items, reds)
        return new

    def _regrid_positions(self, call: dict[str, Any], new: dict[str, Any], items: list[VisualItem], reds: list) -> Tensor:
        """M-RoPE positions of the reduced prompt with every item laid out on its reduced grid."""
        if call.get("position_ids") is not None:
            raise ValueError("mrope='regrid' recomputes positions; it cannot be combined with explicit position_ids")
        if new.get("mm_token_type_ids") is None:
            raise ValueError("Qwen2-VL needs mm_token_type_ids (returned by its processor) to place M-RoPE positions")
        grids: dict[str, list[list[int]]] = {"image": [], "video": []}
        for it, red in zip(items, reds, strict=True):
            if red.grid is None or it.grid is None:
                raise ValueError(
                    f"mrope='regrid' needs reductions that keep a grid (pool, fourier); {self.reducer.describe()} does not"
                )
            t = 1 if len(red.grid) == 2 else int(red.grid[0])
            if len(it.grid) == 3 and t != it.grid[0]:
                raise ValueError("mrope='regrid' needs the frame count unchanged (per-frame grid reductions)")
            grids[it.modality].append([t, int(red.grid[-2]) * self._merge, int(red.grid[-1]) * self._merge])
        dev = new["input_ids"].device
        extra = {}
        if call.get("second_per_grid_ts") is not None:
            extra["second_per_grid_ts"] = call["second_per_grid_ts"]
        pos, _ = self.model.model.get_rope_index(
            new["input_ids"],
            mm_token_type_ids=new["mm_token_type_ids"],
            image_grid_thw=torch.tensor(grids["image"], device=dev) if grids["image"] else None,
            video_grid_thw=torch.tensor(grids["video"], device=dev) if grids["video"] else None,
            attention_mask=new.get("attention_mask"),
            **extra,
        )
        return pos

    def after_prepare(self, new_positions: Tensor | None, new_mask: Tensor | None) -> None:
        if new_positions is None:
            return
        # decoding continues at max(position) + 1; the host derives it as cumsum(mask) - 1 + delta
        valid = new_mask.bool() if new_mask is not None else torch.ones_like(new_positions[0], dtype=torch.bool)
        maxpos = new_positions.masked_fill(~valid.unsqueeze(0), -1).amax(dim=(0, 2))
        self.model.model.rope_deltas = (maxpos + 1 - valid.sum(-1)).unsqueeze(1)
