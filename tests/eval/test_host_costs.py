"""The host cost table: bundled 7B-class configs load with their provenance, the token-layout rules equal
what the real host classes produce (tiny configs of the same classes), costs fall with the kept ratio,
and the README carries the table this module prints."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from mmeff.eval import host_costs
from mmeff.eval.flops import CONFIG_DIR, load_config, text_dims

README = Path(__file__).resolve().parents[2] / "README.md"


@pytest.mark.parametrize("case", host_costs.HOST_CASES, ids=lambda c: f"{c.config}-{c.reference.split()[0]}")
def test_bundled_configs_load_with_provenance(case):
    raw = json.loads((CONFIG_DIR / f"{case.config}.json").read_text())
    config = load_config(case.config)
    dims = text_dims(config)
    assert dims.layers >= 24 and dims.hidden >= 2048 and dims.vocab > 30000  # real checkpoint sizes, not tiny
    if case.config not in ("llava-1.5-7b", "qwen2-vl-7b"):
        assert len(raw["_mmeff_provenance"]) > 40  # where every value came from


def test_layout_rules_equal_the_hosts_own_packing():
    """Each rule, evaluated on a tiny config of the real class, equals the token count that class's own
    encoder produces for the same reference layout."""
    from transformers import (
        CLIPVisionConfig,
        InternVLConfig,
        InternVLForConditionalGeneration,
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
    )

    from mmeff.models import tiny

    torch.manual_seed(0)
    text = tiny.tiny_llava_config().text_config.to_dict()
    vision = CLIPVisionConfig(image_size=32, patch_size=8, hidden_size=32, intermediate_size=37, num_hidden_layers=1,
                              num_attention_heads=4).to_dict()
    with torch.no_grad():
        nxt = LlavaNextForConditionalGeneration(LlavaNextConfig(
            vision_config=vision, text_config=text, image_grid_pinpoints=[[64, 64]], image_token_index=3)).eval()
        packed = nxt.model.get_image_features(pixel_values=torch.randn(1, 5, 3, 32, 32),
                                              image_sizes=torch.tensor([[64, 64]])).pooler_output[0]
        units, fixed = host_costs._anyres_2x2(nxt.config)
        assert sum(units) + fixed == packed.shape[0]

        ov = LlavaOnevisionForConditionalGeneration(LlavaOnevisionConfig(
            vision_config={**vision, "image_size": 40}, text_config=text, image_token_index=3, video_token_index=4,
            vision_feature_select_strategy="default")).eval()
        video = ov.model.get_video_features(pixel_values_videos=torch.randn(1, 32, 3, 40, 40)).pooler_output
        units, fixed = host_costs._onevision_video(ov.config)  # 5x5 patches pool to 3x3 (rounded up) + newline
        assert sum(units) + fixed == video.shape[1] and units[0] == math.ceil(5 / 2) ** 2

        iv = InternVLForConditionalGeneration(InternVLConfig(
            vision_config=dict(image_size=64, patch_size=8, hidden_size=32, intermediate_size=37, num_hidden_layers=1,
                               num_attention_heads=4),
            text_config=tiny.tiny_lm_config("qwen2").to_dict(), image_token_id=3, downsample_ratio=0.5)).eval()
        tiles = iv.model.get_image_features(pixel_values=torch.randn(5, 3, 64, 64)).pooler_output
        units, fixed = host_costs._internvl_2x2(iv.config)
        assert units == [tiles.shape[1]] * 5 and fixed == 0


def test_rows_fall_with_the_ratio_and_newlines_stay():
    rows = host_costs.host_cost_rows()
    by_case: dict = {}
    for r in rows:
        by_case.setdefault((r["checkpoint"], r["reference"]), []).append(r)
    for case_rows in by_case.values():
        flops = [r["prefill_tflops"] for r in sorted(case_rows, key=lambda r: -r["ratio"])]
        assert flops == sorted(flops, reverse=True) and flops[-1] < flops[0] / 2
    nxt = [r for r in rows if r["checkpoint"] == "llava-hf/llava-v1.6-mistral-7b-hf"]
    assert [r["visual_tokens"] for r in nxt] == [2928, 1488, 768, 408]  # 48 newlines kept at every ratio
    llava = next(r for r in rows if r["checkpoint"] == "llava-hf/llava-1.5-7b-hf" and r["ratio"] == 1.0)
    assert llava["visual_tokens"] == 576 and llava["kv_mib"] == pytest.approx(2 * 32 * 32 * 128 * 2 * 640 / 2**20)


def test_readme_carries_the_table():
    assert host_costs.markdown_table() in README.read_text(encoding="utf-8")
