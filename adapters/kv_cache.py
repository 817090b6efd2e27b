"""How a KV-cache press attaches to an HF decoder (a causal LM, or the LM inside LLaVA / Qwen2-VL).

Three kinds of hooks, no copied ``forward``:

* a forward pre-hook on the input embedding records the token ids (a VLM embeds its ``input_ids``,
  image placeholders included, before handing ``inputs_embeds`` to its LM);
* a forward pre-hook on the decoder (``model.get_decoder()``) swaps an empty cache for an
  :class:`~mmeff.kv.presses.EvictingCache` and tells it which of the arriving tokens are real, separators or
  visual;
* a forward pre-hook on every attention module evicts that layer if it is over budget, then rebuilds the
  layer's attention mask for its compressed layout with transformers' own ``create_causal_mask`` (layers
  may hold different lengths), and in streaming mode replaces the rotary angles by in-cache positions.
"""

from __future__ import annotations

import sys
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from transformers.cache_utils import Cache
from transformers.masking_utils import create_causal_mask

from mmeff.adapters.base import Adapter, register_adapter
from mmeff.hfconfig import CACHE_KWARG, cache_from_kwargs, set_cache_kwarg
from mmeff.kv.presses import FLAG_PROTECTED, FLAG_SEP, EvictingCache, KVPress, Rope, StepInfo

__all__ = ["KVCacheAdapter"]

_MROPE_TYPES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")


def _decoder_of(model: nn.Module) -> nn.Module | None:
    get = getattr(model, "get_decoder", None)
    if get is None:
        return None
    try:
        dec = get()
    except Exception:  # noqa: BLE001 - exotic models raise here; they are simply unsupported
        return None
    layers = getattr(dec, "layers", None)
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        return None
    if not all(hasattr(lay, "self_attn") and hasattr(lay.self_attn, "layer_idx") for lay in layers):
        return None
    return dec


@register_adapter
class KVCacheAdapter(Adapter):
    """Attach a :class:`~mmeff.kv.presses.KVPress` to an HF causal LM or VLM (see the module doc)."""

    name: ClassVar[str] = "kv_cache"
    description: ClassVar[str] = "KV-cache presses on HF decoders (Llama, Qwen2, Mistral; LLaVA and Qwen2-VL LMs)"
    method_type: ClassVar[type] = KVPress

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return _decoder_of(model) is not None and hasattr(model, "get_input_embeddings")

    @classmethod
    def check(cls, model: nn.Module) -> nn.Module:
        """The decoder of ``model``; ``TypeError`` / ``ValueError`` naming what is unsupported."""
        dec = _decoder_of(model)
        if dec is None or not hasattr(model, "get_input_embeddings"):
            raise TypeError(
                f"KV-cache presses need an HF decoder with .layers[i].self_attn (Llama, Qwen2, Mistral, or the LM "
                f"of LLaVA / Qwen2-VL); {type(model).__name__} has none"
            )
        layer_types = getattr(dec.config, "layer_types", None) or []
        odd = sorted({t for t in layer_types if t != "full_attention"})
        sliding = not layer_types and getattr(dec.config, "sliding_window", None) is not None and getattr(
            dec.config, "use_sliding_window", True
        )
        if odd or sliding:
            raise ValueError(
                f"{type(dec).__name__} has {odd or 'sliding-window'} layers; KV-cache presses support full-attention "
                "decoders only"
            )
        return dec

    def __init__(self, model: nn.Module, press: KVPress, **options: Any) -> None:
        super().__init__(model, press, **options)
        self.press = press
        self.decoder = self.check(model)
        self.num_layers = len(self.decoder.layers)
        self.press.budgets(self.num_layers)  # size errors at attach time, not mid-generate
        cfg = model.config
        self.visual_ids = sorted(
            {int(v) for k in ("image_token_id", "image_token_index", "video_token_id")
             if isinstance(v := getattr(cfg, k, None), int)}
        )
        end = getattr(cfg, "vision_end_token_id", None)
        self.vision_end_id = int(end) if isinstance(end, int) else None
        model_type = getattr(cfg, "model_type", "")
        if press.streaming and (model_type in _MROPE_TYPES or self._has_mrope()):
            raise ValueError(
                f"streaming=True re-assigns 1-D RoPE positions inside the cache; {type(model).__name__} uses 3-D "
                "M-RoPE positions (temporal/height/width), which cannot be shifted that way. Use streaming=False "
                "(evicts with the original positions) on this model"
            )
        self.rope: Rope | None = None
        if press.streaming:
            rotary = getattr(self.decoder, "rotary_emb", None)
            attn = self.decoder.layers[0].self_attn
            apply_fn = getattr(sys.modules[type(attn).__module__], "apply_rotary_pos_emb", None)
            if rotary is None or apply_fn is None:
                raise ValueError(
                    f"streaming=True needs the host's rotary embedding and apply_rotary_pos_emb; "
                    f"{type(self.decoder).__name__} lacks one of them"
                )
            self.rope = Rope(rotary, apply_fn)
        self.cache: EvictingCache | None = None
        self._pending_ids: Tensor | None = None

    def _has_mrope(self) -> bool:
        rp = getattr(self.decoder.config, "rope_parameters", None) or getattr(self.decoder.config, "rope_scaling", None)
        return isinstance(rp, dict) and "mrope_section" in rp

    # ----------------------------------------------------------------------------------------- attach
    def attach(self) -> None:
        model = self.model
        if model.__dict__.get("_mmeff_kv_adapter") is not None:
            raise ValueError("this model already has a KV-cache press attached; remove it first")
        self.press.bind(model)
        emb = model.get_input_embeddings()
        self._hook(emb.register_forward_pre_hook(self._embed_pre))
        self._hook(self.decoder.register_forward_pre_hook(self._decoder_pre, with_kwargs=True))
        self._hook(self.decoder.register_forward_hook(self._decoder_post, with_kwargs=True))
        for layer in self.decoder.layers:
            self._hook(layer.self_attn.register_forward_pre_hook(self._attn_pre, with_kwargs=True))
        self._override(model, "_mmeff_kv_adapter", self)
        self.stats = {"press": self.press.describe()}

    def new_cache(self) -> EvictingCache:
        """A fresh cache for this model and press (to pass explicitly as the forward's / ``generate``'s cache:
        ``cache=`` on transformers >= 5.24, ``past_key_values=`` before; see ``mmeff.hfconfig.CACHE_KWARG``)."""
        return EvictingCache(self.press, self.num_layers, self.rope)

    # ------------------------------------------------------------------------------------------ hooks
    def _embed_pre(self, module: nn.Module, args: tuple) -> None:
        if args and isinstance(args[0], Tensor) and not args[0].is_floating_point():
            self._pending_ids = args[0]

    def _step_info(self, ids: Tensor | None, attention_mask: Tensor | None, batch: int, q: int, device: torch.device) -> StepInfo:
        if attention_mask is not None:
            if attention_mask.ndim != 2:
                raise ValueError(
                    f"KV-cache presses need the 2-D padding mask (batch, seen + new); got a {attention_mask.ndim}-D "
                    "attention_mask, which cannot be re-laid-out for the evicted cache"
                )
            valid = attention_mask[:, -q:].to(device=device, dtype=torch.bool)
        else:
            valid = torch.ones(batch, q, dtype=torch.bool, device=device)
        flags = torch.zeros(batch, q, dtype=torch.uint8, device=device)
        if ids is not None:
            ids = ids.to(device)
            flags |= self.press.token_flags(ids)
            if self.visual_ids and self.press.protect_visual:
                vis = torch.isin(ids, torch.tensor(self.visual_ids, device=device))
                flags |= vis.to(torch.uint8) * FLAG_PROTECTED
            if self.vision_end_id is not None and not self.press.protect_visual:
                # Unprotected visual tokens may go; the end-of-vision marker then acts as a separator that
                # summarises the segment (shared/methods/llm_backbone.md §1.5).
                flags |= (ids == self.vision_end_id).to(torch.uint8) * FLAG_SEP
        return StepInfo(valid=valid, flags=flags, ids=ids)

    def _decoder_pre(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
        pending, self._pending_ids = self._pending_ids, None
        ids = kwargs.get("input_ids", args[0] if args else None)
        embeds = kwargs.get("inputs_embeds")
        x = embeds if embeds is not None else ids
        if x is None:
            return args, kwargs
        batch, q = x.shape[:2]
        if ids is None and pending is not None and tuple(pending.shape) == (batch, q):
            ids = pending
        cache = cache_from_kwargs(kwargs)
        use_cache = kwargs.get("use_cache")
        if use_cache is None:
            use_cache = getattr(module.config, "use_cache", True)
        if cache is None and not use_cache:
            self.cache = None  # nothing cached, nothing to evict
            return args, kwargs
        if not isinstance(cache, EvictingCache):
            if isinstance(cache, Cache) and cache.get_seq_length() > 0:
                raise ValueError(
                    f"the cache ({CACHE_KWARG}) is a {type(cache).__name__} already holding {cache.get_seq_length()} tokens that "
                    f"were cached without the {self.press.name} press; start from an empty cache inside mmeff.apply"
                )
            if cache is not None and not isinstance(cache, Cache):
                raise TypeError(f"the cache ({CACHE_KWARG}) must be a transformers Cache, got {type(cache).__name__}")
            cache = self.new_cache()
            set_cache_kwarg(kwargs, cache)
        if ids is None and (self.press.needs_ids or (self.visual_ids and self.press.protect_visual)):
            raise ValueError(
                f"the {self.press.name} press needs the token ids of every forward (separators / visual tokens), "
                "but this call passed only inputs_embeds; call the model with input_ids"
            )
        cache.step = self._step_info(ids, kwargs.get("attention_mask"), batch, q, x.device)
        self.cache = cache
        return args, kwargs

    def _attn_pre(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
        cache = cache_from_kwargs(kwargs)
        if not isinstance(cache, EvictingCache) or cache.step is None:
            return args, kwargs
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        layer = cache.layers[module.layer_idx]
        layer.compress(cache.step.valid.sum(1))
        valid = layer.valid if layer.valid is not None else cache.step.valid[:, :0]
        two_d = torch.cat([valid, cache.step.valid], 1)
        if cache.press.streaming:
            stored = valid.sum(1, keepdim=True)
            pos = (stored + torch.cumsum(cache.step.valid.long(), 1) - 1).clamp_min(0)
            cos, sin = cache.rope.cos_sin(hidden, pos)
            kwargs["position_embeddings"] = (cos, sin)
            layer.pending_rope = (cos, sin)
        kwargs["attention_mask"] = create_causal_mask(
            config=module.config,
            inputs_embeds=hidden,
            attention_mask=two_d,
            layer_idx=module.layer_idx,
            **{CACHE_KWARG: cache},
        )
        return args, kwargs

    def _decoder_post(self, module: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> None:
        if self.cache is not None:
            self.cache.step = None
            self.stats = {"press": self.press.describe(), **self.cache.stats()}

    def detach(self) -> None:
        super().detach()
        self._pending_ids = None
