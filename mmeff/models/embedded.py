"""The embedded VLMs mmeff ships (``mmeff-mini``, ``mmeff-mini-smollm``): :func:`default_model` assembles
one from the shipped weights into a Hugging Face ``LlavaForConditionalGeneration`` and caches it; both
are also in the model registry (``mmeff.create_model("mmeff-mini")``).

It sits above :mod:`mmeff.models.mini` and :mod:`mmeff.models.mini_vlm` (which build the models from the
pieces in :mod:`mmeff.models.hf`), so that ``hf`` never has to import them back.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoTokenizer, LlavaForConditionalGeneration

import mmeff.models.mini as mini
import mmeff.models.mini_vlm as mini_vlm
from mmeff.models.cache import atomic_write_cache, cache_complete, default_cache_dir, read_cache_meta
from mmeff.models.zoo import register_model

__all__ = ["MINI_MODELS", "default_model"]

#: the embedded VLMs :func:`default_model` builds: name -> (cache folder, shipped weight files, recipe version)
MINI_MODELS = {
    "mmeff-mini": ("mmeff-mini-vlm", ("vlm",), 3),
    "mmeff-mini-smollm": ("mmeff-mini-llava", ("clip", "llava"), 2),
}


def default_model(
    cache_dir: str | Path | None = None, name: str = "mmeff-mini"
) -> tuple[LlavaForConditionalGeneration, Any, dict[str, Any]]:
    """An embedded VLM (:mod:`mmeff.models.mini`) as HF ``LlavaForConditionalGeneration``, with its tokenizer.

    ``"mmeff-mini"`` (the default): the grounded model, a from-scratch Llama (hidden 256, 4 layers) on
    SmolLM2's tokenizer, the mini CLIP tower trained with dense per-patch labels, LLaVA's projector
    (:mod:`mmeff.train.grounding`). ``"mmeff-mini-smollm"``: SmolLM2-135M-Instruct with trained LoRA deltas, the
    contrastive tower and its projector (not grounded on the CPU budget it had; for GPU users to train on).
    Both see 64 visual tokens per 224-px image. The weights ship in ``mmeff/weights`` (sha256-checked); the
    assembled model is cached in ``cache_dir/<folder>`` and rebuilt when the shipped weights change.
    Returns ``(model.eval(), tokenizer, info)``; ``pixel_values`` are (N, 3, 224, 224) from
    :func:`mmeff.preprocess.llava_pixel_values` with ``image_size=224``.
    """
    if name not in MINI_MODELS:
        raise ValueError(f"unknown embedded model {name!r}; known: {', '.join(MINI_MODELS)}")
    subdir, files, recipe = MINI_MODELS[name]
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    final = cache / subdir
    # each file is hashed once (weights_path checks it against the manifest); the cache key is that hash
    paths = {k: mini.weights_path(k) for k in files}
    expected = mini.expected_hashes()
    hashes = {k: f"{path.name}:{expected[path.name]}" for k, path in paths.items()}
    expect = {"artefact": subdir, "recipe": recipe, "weights": hashes}
    if not cache_complete(final, expect):
        if name == "mmeff-mini":
            model, tokenizer, info = mini_vlm.build_vlm()
        else:
            model, tokenizer, info = mini.build_llava(cache)

        def write(tmp: Path) -> None:
            model.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)

        atomic_write_cache(final, write, {**expect, "info": info})
        del model
    info = dict(read_cache_meta(final)["info"])
    info["path"] = str(final)
    model = LlavaForConditionalGeneration.from_pretrained(final, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(final)
    tokenizer.padding_side = "left"
    return model, tokenizer, info


def _mini_factory(name: str) -> Callable[..., nn.Module]:
    # the registry's factory signature (pretrained=, **kwargs) over default_model, which also returns the tokenizer
    def make(pretrained: str | None = None, **kwargs: Any) -> nn.Module:
        if pretrained is not None:
            raise ValueError(f"{name} loads its shipped weights; pretrained= does not apply (got {pretrained!r})")
        return default_model(name=name, **kwargs)[0]

    return make


register_model("mmeff-mini", "mini", _mini_factory("mmeff-mini"),
               summary="the embedded default VLM (LLaVA class, 4-layer Llama, grounded mini CLIP; weights ship)")
register_model("mmeff-mini-smollm", "mini", _mini_factory("mmeff-mini-smollm"),
               summary="SmolLM2-135M + LoRA LLaVA on the mini CLIP (weights ship; not grounded on CPU)")
