"""Models: the registry (``zoo``: ``mmeff.create_model``), Hugging Face plumbing (``hf``: SmolLM2, LLaVA
assembly, prompts), the verified model cache (``cache``), tiny random models and inputs for tests (``tiny``),
the embedded default VLMs (``embedded``, built by ``mini`` and ``mini_vlm``) and the model families mmeff
ships (``eve``, ``squeezetime``, ``instruct_ipt`` with its ``instructions`` router, ``cdt``).

``mmeff.models`` was one module before; its public names are re-exported here unchanged. Code inside the
package imports them from their defining modules instead.
"""

from mmeff.adapters.qwen2_vl import qwen2_vl_patchify, qwen2_vl_unpatchify
from mmeff.models.cache import atomic_write_cache, cache_complete, default_cache_dir, read_cache_meta
from mmeff.models.embedded import MINI_MODELS, default_model
from mmeff.models.hf import (
    DEFAULT_IMAGE_TOKEN,
    SMOLLM2_GGUF,
    SMOLLM2_WHEEL,
    assemble_llava,
    build_prompt,
    left_pad_batch,
    llava_tokens_per_image,
    llava_visual_features,
    load_smollm2,
    smollm2_tokenizer,
)
from mmeff.models.tiny import (
    build_tiny,
    llava_inputs,
    qwen2_vl_inputs,
    tiny_llava_config,
    tiny_lm_config,
    tiny_qwen2_vl_config,
)
from mmeff.models.zoo import create_model, list_models
from mmeff.preprocess import CLIP_MEAN, CLIP_STD, llava_pixel_values

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "DEFAULT_IMAGE_TOKEN",
    "MINI_MODELS",
    "SMOLLM2_GGUF",
    "SMOLLM2_WHEEL",
    "assemble_llava",
    "atomic_write_cache",
    "build_prompt",
    "build_tiny",
    "cache_complete",
    "create_model",
    "default_cache_dir",
    "default_model",
    "left_pad_batch",
    "list_models",
    "llava_inputs",
    "llava_pixel_values",
    "llava_tokens_per_image",
    "llava_visual_features",
    "load_smollm2",
    "qwen2_vl_inputs",
    "qwen2_vl_patchify",
    "qwen2_vl_unpatchify",
    "read_cache_meta",
    "smollm2_tokenizer",
    "tiny_llava_config",
    "tiny_lm_config",
    "tiny_qwen2_vl_config",
]
