"""Models: the registry (``zoo``: ``mmeff.create_model``), Hugging Face loading and inputs (``hf``), the
embedded default VLM (``mini``, ``mini_vlm``) and the model families mmeff ships (``eve``, ``squeezetime``,
``instruct_ipt`` with its ``instructions`` router, ``cdt``).

``mmeff.models`` was one module before; its public names are re-exported here unchanged.
"""

from mmeff.models.hf import (
    CLIP_MEAN,
    CLIP_STD,
    DEFAULT_IMAGE_TOKEN,
    MINI_MODELS,
    SMOLLM2_GGUF,
    SMOLLM2_WHEEL,
    build_prompt,
    build_tiny,
    default_cache_dir,
    default_model,
    left_pad_batch,
    llava_inputs,
    llava_pixel_values,
    llava_tokens_per_image,
    load_smollm2,
    qwen2_vl_inputs,
    qwen2_vl_patchify,
    smollm2_tokenizer,
    tiny_llava_config,
    tiny_qwen2_vl_config,
)
from mmeff.models.zoo import create_model, list_models

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "DEFAULT_IMAGE_TOKEN",
    "MINI_MODELS",
    "SMOLLM2_GGUF",
    "SMOLLM2_WHEEL",
    "build_prompt",
    "build_tiny",
    "create_model",
    "default_cache_dir",
    "default_model",
    "left_pad_batch",
    "list_models",
    "llava_inputs",
    "llava_pixel_values",
    "llava_tokens_per_image",
    "load_smollm2",
    "qwen2_vl_inputs",
    "qwen2_vl_patchify",
    "smollm2_tokenizer",
    "tiny_llava_config",
    "tiny_qwen2_vl_config",
]
