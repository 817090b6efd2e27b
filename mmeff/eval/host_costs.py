"""Visual tokens, LLM prefill FLOPs and KV cache of the 7B-class checkpoint of every adapted VLM host.

For each host adapter, one real checkpoint config (bundled in ``mmeff/configs``, with its provenance in the
``_mmeff_provenance`` field) and one reference input (e.g. one 672x672 image). The visual tokens the LLM
reads are counted from the config the way the host lays them out: per tile, sub-image or frame, plus the
tokens no reducer sees (LLaVA-NeXT / OneVision newlines, kept by the adapter). A reducer at ``ratio`` keeps
``max(1, round(ratio * n))`` of each unit's ``n`` tokens, as the adapters' per-tile / per-frame budgets do.

Costs are the language model's (``mmeff.eval.flops.llm_flops`` conventions: matrix products only, full
square attention, one ``lm_head`` position): what post-projector reduction changes. The vision tower's
cost is not in this table (post-projector reducers leave it unchanged; for LLaVA-1.5 and Qwen2-VL
``mmeff.eval.flops.prefill_flops`` gives it). Run ``python -m mmeff.eval.host_costs`` for the table.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from transformers import PretrainedConfig

from mmeff.eval.flops import kv_cache_bytes, llm_flops, load_config, text_dims

__all__ = ["HOST_CASES", "HostCase", "host_cost_rows", "markdown_table", "visual_units"]

#: text tokens of the reference prompt (system prompt, question and template)
TEXT_TOKENS = 64
RATIOS = (1.0, 0.5, 0.25, 0.125)


@dataclass(frozen=True)
class HostCase:
    """One host's checkpoint and reference input. ``units(config)`` gives ``(tokens of every unit a reducer
    reduces separately, tokens no reducer sees)``."""

    host: str
    checkpoint: str
    config: str
    reference: str
    units: Callable[[PretrainedConfig], tuple[list[int], int]]


def _side(vc: PretrainedConfig, size: int | None = None) -> int:
    image = size if size is not None else vc.image_size
    image = image[0] if isinstance(image, (list, tuple)) else image
    patch = vc.patch_size[0] if isinstance(vc.patch_size, (list, tuple)) else vc.patch_size
    return int(image) // int(patch)


def _llava(c: PretrainedConfig) -> tuple[list[int], int]:
    return [_side(c.vision_config) ** 2], 0


def _anyres_2x2(c: PretrainedConfig) -> tuple[list[int], int]:
    # base image + a 2x2 mosaic of tiles (no padding to cut for a square image); one newline per mosaic row
    side = _side(c.vision_config)
    return [side * side] * 5, 2 * side


def _next_video(c: PretrainedConfig) -> tuple[list[int], int]:
    side = _side(c.vision_config) // int(c.spatial_pool_stride)
    return [side * side] * 16, 0


def _onevision_video(c: PretrainedConfig) -> tuple[list[int], int]:
    side = math.ceil(_side(c.vision_config) / 2)  # bilinear 2x pooling, rounded up as the host does
    return [side * side] * 32, 1


def _qwen(size: int) -> Callable[[PretrainedConfig], tuple[list[int], int]]:
    def units(c: PretrainedConfig) -> tuple[list[int], int]:
        vc = c.vision_config
        side = size // int(vc.patch_size) // int(vc.spatial_merge_size)
        return [side * side], 0

    return units


def _gemma3(c: PretrainedConfig) -> tuple[list[int], int]:
    return [int(c.mm_tokens_per_image)], 0


def _sub_images(count: int) -> Callable[[PretrainedConfig], tuple[list[int], int]]:
    def units(c: PretrainedConfig) -> tuple[list[int], int]:
        per = _side(c.vision_config) ** 2 // int(c.scale_factor) ** 2
        return [per] * count, 0

    return units


def _internvl_2x2(c: PretrainedConfig) -> tuple[list[int], int]:
    per = round(_side(c.vision_config) ** 2 * float(c.downsample_ratio) ** 2)
    return [per] * 5, 0


HOST_CASES: tuple[HostCase, ...] = (
    HostCase("llava", "llava-hf/llava-1.5-7b-hf", "llava-1.5-7b", "one 336x336 image", _llava),
    HostCase("llava_next", "llava-hf/llava-v1.6-mistral-7b-hf", "llava-next-mistral-7b",
             "one 672x672 image (base + 2x2 tiles)", _anyres_2x2),
    HostCase("llava_next", "llava-hf/LLaVA-NeXT-Video-7B-hf", "llava-next-video-7b", "16 frames", _next_video),
    HostCase("llava_next", "llava-hf/llava-onevision-qwen2-7b-ov-hf", "llava-onevision-qwen2-7b",
             "one 768x768 image (base + 2x2 tiles)", _anyres_2x2),
    HostCase("llava_next", "llava-hf/llava-onevision-qwen2-7b-ov-hf", "llava-onevision-qwen2-7b", "32 frames",
             _onevision_video),
    HostCase("qwen2_vl", "Qwen/Qwen2-VL-7B-Instruct", "qwen2-vl-7b", "one 672x672 image", _qwen(672)),
    HostCase("qwen2_vl", "Qwen/Qwen2.5-VL-7B-Instruct", "qwen2.5-vl-7b", "one 672x672 image", _qwen(672)),
    HostCase("qwen3_vl", "Qwen/Qwen3-VL-8B-Instruct", "qwen3-vl-8b", "one 672x672 image", _qwen(672)),
    HostCase("gemma3", "google/gemma-3-12b-it", "gemma-3-12b", "one image (no pan-and-scan)", _gemma3),
    HostCase("idefics3", "HuggingFaceM4/Idefics3-8B-Llama3", "idefics3-8b", "one 1456x1456 image (4x4 crops + global)",
             _sub_images(17)),
    HostCase("idefics3", "HuggingFaceTB/SmolVLM2-2.2B-Instruct", "smolvlm2-2.2b",
             "one 1536x1536 image (4x4 crops + global)", _sub_images(17)),
    HostCase("internvl", "OpenGVLab/InternVL3-8B-hf", "internvl3-8b", "one 896x896 image (2x2 tiles + thumbnail)",
             _internvl_2x2),
)


def visual_units(case: HostCase) -> tuple[list[int], int]:
    """``(tokens per reduced unit, fixed tokens)`` of ``case``'s reference input, from its bundled config."""
    return case.units(load_config(case.config))


def kept_tokens(units: Sequence[int], fixed: int, ratio: float) -> int:
    """Visual tokens the LLM reads when every unit keeps ``max(1, round(ratio * n))`` of its ``n`` tokens."""
    return sum(max(1, round(ratio * n)) for n in units) + fixed


def host_cost_rows(ratios: Sequence[float] = RATIOS, text_tokens: int = TEXT_TOKENS) -> list[dict]:
    """One row per host case and ratio: visual tokens, LLM prefill TFLOPs, KV cache MiB (fp16, batch 1)."""
    rows = []
    for case in HOST_CASES:
        config = load_config(case.config)
        units, fixed = case.units(config)
        dims = text_dims(config)
        for ratio in ratios:
            visual = kept_tokens(units, fixed, ratio)
            seq = text_tokens + visual
            linear, attn, head = llm_flops(dims, q_len=seq, k_len=seq, batch=1, logits_positions=1, attention="full")
            rows.append({
                "host": case.host, "checkpoint": case.checkpoint, "reference": case.reference, "ratio": ratio,
                "visual_tokens": visual, "prefill_tflops": (linear + attn + head) / 1e12,
                "kv_mib": kv_cache_bytes(config, seq, dtype=torch.float16) / 2**20,
            })
    return rows


def markdown_table(rows: Sequence[dict] | None = None) -> str:
    """The README table: per checkpoint, visual tokens / LLM prefill TFLOPs at each kept ratio."""
    rows = list(rows) if rows is not None else host_cost_rows()
    ratios = sorted({r["ratio"] for r in rows}, reverse=True)
    head = "| adapter | checkpoint | reference input | " + " | ".join(f"{r:.3g} kept" for r in ratios) + " |"
    lines = [head, "|" + "---|" * (3 + len(ratios))]
    seen: dict[tuple[str, str], dict[float, dict]] = {}
    for r in rows:
        seen.setdefault((r["checkpoint"], r["reference"]), {})[r["ratio"]] = r
    for (checkpoint, reference), by_ratio in seen.items():
        cells = [f"{by_ratio[x]['visual_tokens']} tok, {by_ratio[x]['prefill_tflops']:.2f} TF" for x in ratios]
        lines.append(f"| `{by_ratio[ratios[0]]['host']}` | {checkpoint} | {reference} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(markdown_table())
