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
from transformers import (
    AutoProcessor,
    CLIPImageProcessor,
    LlavaForConditionalGeneration,
    LlavaProcessor,
)

import mmeff.models.mini as mini
import mmeff.models.mini_vlm as mini_vlm
from mmeff.models.cache import atomic_write_cache, cache_complete, default_cache_dir, read_cache_meta
from mmeff.models.zoo import register_model
from mmeff.preprocess import CLIP_MEAN, CLIP_STD

__all__ = ["CHAT_TEMPLATE", "MINI_MODELS", "build_processor", "default_model", "default_processor"]

#: the embedded VLMs :func:`default_model` builds: name -> (cache folder, shipped weight files, recipe version)
MINI_MODELS = {
    "mmeff-mini": ("mmeff-mini-vlm", ("vlm", "tokenizer"), 4),
    "mmeff-mini-smollm": ("mmeff-mini-llava", ("clip", "llava"), 3),
}

#: SmolLM2's ChatML template (the embedded models' tokenizer) taught to read multimodal content lists: each
#: ``{"type": "image"}`` item becomes ``<image>`` and a newline, as :func:`mmeff.models.hf.build_prompt` lays it out
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}{{ '<image>\n' }}{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}{{ '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def build_processor(model: LlavaForConditionalGeneration, tokenizer: Any) -> LlavaProcessor:
    """A transformers ``LlavaProcessor`` for an embedded model: CLIP preprocessing at the tower's size
    (bicubic short-side resize, centre crop, CLIP mean/std, as :func:`mmeff.preprocess.llava_pixel_values`),
    the model's tokenizer, ``<image>`` expanded to the tower's patch count, and :data:`CHAT_TEMPLATE`."""
    vc = model.config.vision_config
    size = int(vc.image_size)
    images = CLIPImageProcessor(
        size={"shortest_edge": size}, crop_size={"height": size, "width": size}, do_center_crop=True,
        resample=3, image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD), do_convert_rgb=True,
    )
    return LlavaProcessor(
        image_processor=images, tokenizer=tokenizer, patch_size=int(vc.patch_size),
        vision_feature_select_strategy=model.config.vision_feature_select_strategy,
        image_token=tokenizer.convert_ids_to_tokens(int(model.config.image_token_id)),
        num_additional_image_tokens=1, chat_template=CHAT_TEMPLATE,
    )


def default_model(
    cache_dir: str | Path | None = None, name: str = "mmeff-mini"
) -> tuple[LlavaForConditionalGeneration, LlavaProcessor, dict[str, Any]]:
    """An embedded VLM (:mod:`mmeff.models.mini`) as HF ``LlavaForConditionalGeneration``, with its processor.

    ``"mmeff-mini"`` (the default): the grounded model, a from-scratch Llama (hidden 256, 4 layers) on
    SmolLM2's tokenizer, the mini CLIP tower trained with dense per-patch labels, LLaVA's projector
    (:mod:`mmeff.train.grounding`). ``"mmeff-mini-smollm"``: SmolLM2-135M-Instruct with trained LoRA deltas, the
    contrastive tower and its projector (not grounded on the CPU budget it had; for GPU users to train on).
    Both see 64 visual tokens per 224-px image. The weights ship in ``mmeff/weights`` (sha256-checked); the
    assembled model is cached in ``cache_dir/<folder>`` and rebuilt when the shipped weights change.

    Returns ``(model.eval(), processor, info)``: the model's own ``LlavaProcessor``
    (:func:`default_processor`; ``processor.tokenizer`` is the chat tokenizer, left-padding), so inputs come
    the transformers way: ``processor(text=processor.apply_chat_template(messages, add_generation_prompt=True),
    images=[img], return_tensors="pt")`` gives ``input_ids`` and ``pixel_values`` (N, 3, 224, 224);
    :func:`mmeff.models.hf.chat_batch` lays several frames out as one video run.
    """
    final, info = _cached(cache_dir, name)
    model = LlavaForConditionalGeneration.from_pretrained(final, dtype=torch.float32).eval()
    return model, _processor(final), info


def _cached(cache_dir: str | Path | None, name: str) -> tuple[Path, dict[str, Any]]:
    """The cached folder of embedded model ``name`` (built from the shipped weights when missing or stale)
    and its info."""
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
            build_processor(model, tokenizer).save_pretrained(tmp)  # AutoProcessor.from_pretrained(info["path"])

        atomic_write_cache(final, write, {**expect, "info": info})
        del model
    info = dict(read_cache_meta(final)["info"])
    info["path"] = str(final)
    return final, info


def default_processor(cache_dir: str | Path | None = None, name: str = "mmeff-mini") -> LlavaProcessor:
    """The embedded model's own ``LlavaProcessor`` (images, tokenizer, chat template), as transformers
    loads it: ``AutoProcessor.from_pretrained`` of the cached model folder (built by :func:`default_model`).

    ``processor.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text",
    "text": q}]}], add_generation_prompt=True)`` then ``processor(text=..., images=[img])`` gives the
    ``input_ids`` of :func:`mmeff.models.hf.build_prompt` and the pixels of ``llava_pixel_values``.
    """
    return _processor(_cached(cache_dir, name)[0])


def _processor(folder: Path) -> LlavaProcessor:
    processor = AutoProcessor.from_pretrained(folder)
    processor.tokenizer.padding_side = "left"  # batched generation continues every row from its last token
    return processor


def _mini_factory(name: str) -> Callable[..., nn.Module]:
    # the registry's factory signature (pretrained=, **kwargs) over default_model, which also returns the processor
    def make(pretrained: str | None = None, **kwargs: Any) -> nn.Module:
        if pretrained is not None:
            raise ValueError(f"{name} loads its shipped weights; pretrained= does not apply (got {pretrained!r})")
        return default_model(name=name, **kwargs)[0]

    return make


register_model("mmeff-mini", "mini", _mini_factory("mmeff-mini"),
               summary="the embedded default VLM (LLaVA class, 4-layer Llama, grounded mini CLIP; weights ship)")
register_model("mmeff-mini-smollm", "mini", _mini_factory("mmeff-mini-smollm"),
               summary="SmolLM2-135M + LoRA LLaVA on the mini CLIP (weights ship; not grounded on CPU)")
