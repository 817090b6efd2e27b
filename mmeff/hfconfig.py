"""Small helpers over HF configs that nest a ``text_config`` (LLaVA, Qwen2-VL) or not (plain LLMs)."""

from __future__ import annotations

from typing import Any

__all__ = ["text_config", "pad_token_id"]


def text_config(config: Any) -> Any:
    """The language-model config of a VLM config, or the config itself for a text-only model."""
    return getattr(config, "text_config", config)


def pad_token_id(config: Any) -> int:
    """The pad id, looked up on the outer then the text config; 0 when neither defines one."""
    for cfg in (config, text_config(config)):
        pad = getattr(cfg, "pad_token_id", None)
        if pad is not None:
            return int(pad)
    return 0
