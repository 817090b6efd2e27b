"""FlatQuant: learnable affine (Kronecker) transforms + W4A4(KV4) post-training quantization.

    from mmeff.quant.flatquant import QuantConfig, quantize
    handle = quantize(model, QuantConfig.preset("w4a4kv4"), calib_ids)   # in place, returns a handle
    model(**inputs)                                                      # fake-quant (CPU) / int4 (CUDA)
    handle.save("out/")  ;  model2, handle2 = load_quantized("out/")

Per decoder layer (Llama, Qwen2, and the LMs inside LLaVA / Qwen2-VL; spec: shared/methods/llm_backbone.md §2):

=============  ========================  ===========================================================
transform      applied to                 where it lives after calibration
=============  ========================  ===========================================================
``attn_in``    input of q/k/v (shared)    online Kronecker ``P1ᵀ X P2``; diag scale folded into
                                           ``input_layernorm``; ``P⁻ᵀ`` merged into Wq, Wk, Wv
``mlp_in``     input of gate/up (shared)  online; diag folded into ``post_attention_layernorm``
``down_in``    input of down_proj         online; diag folded into the rows of ``up_proj``
``v``          v_proj output (head_dim)   offline: into Wv (output side) and Wo (input side)
``o``          heads of the o_proj input  online on the head axis; Wo ← Wo kron(P_o, P_v)⁻ᵀ
``k``          Q and K after RoPE          online in the attention function: K·P_h, Q·P_h⁻ᵀ
=============  ========================  ===========================================================

Activations are quantized per token (dynamic, symmetric) with a learnable clip (LAC), weights per output
channel (symmetric, RTN or GPTQ) with learnable per-channel clips (LWC), K/V asymmetric per head and
token. Calibration is layer-wise: each layer's quantized output is fit (MSE) to its full-precision
output, and the next layer is fed the full-precision output. Everything attaches by forward pre-hooks
and a registered transformers attention function; no host forward is copied.

Differences from the official code (ruikangliu/FlatQuant @9d88ffc), each deliberate:

* **Matched now** (issue 34), measured together on SmolLM2 W4A4 in the README: the Kronecker split is
  ``get_decompose_dim``'s (the most nearly square pair of equal parity; it was "largest divisor ≤ √d",
  which differs for e.g. 12, 20, 60 but not for any size of SmolLM2, Llama or Qwen2); LWC is the
  official two-sided clamp of each row's max and min after the input transform and before v_proj's
  output transform ``P_v`` (it was one factor on ``max|w|`` after ``P_v``); calibration no longer applies
  down_proj's smoothing scale twice; the defaults are the official budget (128 × 2,048 tokens, 15
  epochs; ``BUDGETS["cpu"]`` is the small one). Measured effect of the LWC and split change at the CPU
  budget: W4A4 21.60 -> 22.75, W4A4KV4 24.89 -> 26.30 held-out perplexity (FP 9.56), a few percent,
  the size of run-to-run details at this budget; kept because it is the official method.
* **One LAC per quantized input, one factor.** The official fake-quant model gives q, k and v (and gate,
  up) their own activation quantizer, each with learnable max and min clip factors, so the shared input
  is quantized three (two) times with different clips. mmeff quantizes a shared input once with one
  learnable ratio, which is what the fused transform→clip→int4 kernel can run (and what the official
  deploy kernel does); K/V keep separate max/min clips as the official.
* **Plain matrices with a direct inverse** (the official ``--direct_inv``, used by its Qwen2.5 scripts)
  for every model, instead of the default ``U·diag(σ)·Vᵀ`` with Cayley-orthogonal ``U, V``: fewer moving
  parts, the same function class; not measured against the SVD form.
* **float32 calibration without autocast** (the official runs layers under fp16/bf16 AMP for Llama, fp32
  for Qwen); the merge is float64 as in the official.
* **Hooks, not replaced modules.** The official swaps in its own attention and MLP classes (whose
  re-implemented forwards break on transformers updates, its issue #26); mmeff keeps the host's forwards
  and adds pre-hooks and an attention function. With all bits at 16 the result equals the original
  model to 2e-5 (tested).
* **d ≡ 2 (mod 4)**: the official split loops forever; mmeff uses the most nearly square pair.
* **Calibration text**: CPython's pydoc topics (offline) instead of WikiText-2 (no hub here); pass any
  token ids to :func:`quantize`.

The code is in three layers: :mod:`mmeff.quant.transforms` (fake quantizers, the Kronecker/affine
transforms, the int-code linear), :mod:`mmeff.quant.calibration` (``QuantConfig``, the per-layer
``LayerQuant`` and its calibration) and this module (the decoder walk, save/load, the entry points).
Every name stays importable from here.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

import torch
import transformers
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from tqdm.auto import tqdm
from transformers import AutoConfig

from mmeff.checkpoint import atomic_write, check_sha256, file_sha256
from mmeff.core import QUANTIZERS
from mmeff.quant.calibration import (
    LayerQuant,
    QuantConfig,
    capture_layer_inputs,
    quantize_layer,
    register_attention,
)
from mmeff.quant.gptq import quantize_rtn
from mmeff.quant.transforms import (
    LINEARS,
    HeadMatrix,
    KronAffine,
    QuantLinear,
    fake_quant_act,
    fake_quant_kv,
    submodule,
)

__all__ = [
    "FlatQuantHandle",
    "HeadMatrix",
    "KronAffine",
    "LayerQuant",
    "QuantConfig",
    "QuantLinear",
    "calibration_batches",
    "decoder_of",
    "fake_quant_act",
    "fake_quant_kv",
    "linear_names",
    "load_quantized",
    "quantize",
]


# ------------------------------------------------------------------------------------------- the model
def decoder_of(model: nn.Module) -> nn.Module:
    """The decoder of an HF causal LM or VLM whose layers FlatQuant can quantize; ``TypeError`` otherwise."""
    dec = model.get_decoder() if hasattr(model, "get_decoder") else None
    layers = getattr(dec, "layers", None)
    ok = isinstance(layers, nn.ModuleList) and len(layers) > 0 and all(
        all(_has(lay, n) for n in LINEARS) for lay in layers)
    if not ok:
        raise TypeError(
            f"FlatQuant supports Llama/Qwen2-style decoders (q/k/v/o_proj, gate/up/down_proj) and the LMs of "
            f"LLaVA / Qwen2-VL; {type(model).__name__} is not one"
        )
    return dec


def _has(root: nn.Module, dotted: str) -> bool:
    try:
        return isinstance(submodule(root, dotted), (nn.Linear, QuantLinear))
    except AttributeError:
        return False


def calibration_batches(tokenizer: Any, text: str, samples: int, seq_len: int, seed: int = 0) -> Tensor:
    """``(samples, seq_len)`` token ids cut at random offsets from ``text`` (like FlatQuant's WikiText-2
    sampling)."""
    ids = torch.tensor(tokenizer(text, add_special_tokens=False).input_ids)
    if ids.numel() <= seq_len:
        raise ValueError(f"calibration text has {ids.numel()} tokens; need more than seq_len={seq_len}")
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seq_len, (samples,), generator=g)
    return torch.stack([ids[s : s + seq_len] for s in starts.tolist()])


class FlatQuantHandle:
    """A quantized model's state: per-layer transforms, the attention function, and :meth:`save`."""

    def __init__(self, model: nn.Module, cfg: QuantConfig, layers: list[LayerQuant], base_attn: str,
                 report: dict[str, Any]) -> None:
        self.model = model
        self.cfg = cfg
        self.layers = layers
        self.base_attn = base_attn
        self.report = report
        self._hooks: list[Any] = []

    def attach(self) -> None:
        """Install the online hooks and the K/V attention function (done by :func:`quantize`)."""
        dec = decoder_of(self.model)
        for layer, lq in zip(dec.layers, self.layers):
            self._hooks += lq.hooks(layer)
        if self.cfg.kv_bits < 16:
            dec.config._attn_implementation = register_attention(self.base_attn)

    def remove(self) -> None:
        """Take the online transforms off (the weights stay merged and quantized, so outputs are wrong
        without them; for debugging and tests)."""
        while self._hooks:
            self._hooks.pop().remove()
        dec = decoder_of(self.model)
        dec.config._attn_implementation = self.base_attn
        for layer in dec.layers:
            layer.self_attn.__dict__.pop("_mmeff_fq", None)

    def quantized(self) -> list[str]:
        """Model-relative names of the :class:`QuantLinear` layers."""
        return [n for n, m in self.model.named_modules() if isinstance(m, QuantLinear)]

    def save(self, path: str | Path) -> None:
        """Write ``model.safetensors`` (int4 codes packed two per byte, scales, transforms, the rest of the
        model in its dtype) and ``mmeff_quant.json``; reload with :func:`load_quantized`."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        sd = {k: v.detach().contiguous() for k, v in self.model.state_dict().items()}
        prefix = _prefix_of(self.model, decoder_of(self.model))
        for i, lq in enumerate(self.layers):
            for k, v in lq.state_dict().items():
                sd[f"mmeff_fq.{i}.{k}"] = v.detach().contiguous()
        # tied embeddings appear twice in state_dict; safetensors refuses shared storage
        seen: dict[int, str] = {}
        for k in list(sd):
            ptr = sd[k].data_ptr()
            if ptr in seen and sd[k].numel():
                sd[k] = sd[k].clone()
            seen[ptr] = k
        # each file is replaced atomically, and mmeff_quant.json (which records the weights' sha256) last:
        # a crash part-way leaves a record that no longer matches, which load_quantized reports
        weights = atomic_write(path / "model.safetensors", lambda t: save_file(sd, str(t)))
        with tempfile.TemporaryDirectory(dir=path, prefix=".config-") as staged:  # save_pretrained's own checks
            self.model.config.save_pretrained(staged)
            atomic_write(path / "config.json", lambda t: shutil.copyfile(Path(staged) / "config.json", t))
        meta = {"quant_config": asdict(self.cfg), "base_attn": self.base_attn, "decoder_prefix": prefix,
                "quantized": self.quantized(), "architecture": type(self.model).__name__, "report": self.report,
                "sha256": {weights.name: file_sha256(weights)}}
        text = json.dumps(meta, indent=2, default=str)
        atomic_write(path / "mmeff_quant.json", lambda t: t.write_text(text))


def _prefix_of(model: nn.Module, dec: nn.Module) -> str:
    for name, mod in model.named_modules():
        if mod is dec:
            return name
    raise ValueError("decoder not found in model")


def quantize(
    model: nn.Module,
    cfg: QuantConfig,
    calib_ids: Tensor | None = None,
    progress: bool = True,
) -> FlatQuantHandle:
    """Calibrate (if ``cfg.method == "flatquant"``), merge in float64, quantize weights, attach online parts.

    ``calib_ids (S, T)`` token ids (``calibration_batches``); needed for FlatQuant training, GPTQ and the
    diag-scale initialisation. The model is changed in place; returns a :class:`FlatQuantHandle`.
    """
    dec = decoder_of(model)
    base_attn = dec.config._attn_implementation
    if base_attn not in ("sdpa", "eager"):
        raise ValueError(f"FlatQuant runs on 'sdpa' or 'eager' attention; the model uses {base_attn!r}")
    needs_data = cfg.learns or cfg.weights == "gptq" or (cfg.method == "flatquant" and cfg.diag)
    if needs_data and calib_ids is None:
        raise ValueError(f"method={cfg.method!r} weights={cfg.weights!r} needs calib_ids (S, T) token ids")
    if calib_ids is not None and (calib_ids.ndim != 2 or calib_ids.dtype != torch.long):
        raise ValueError(f"calib_ids must be (samples, seq_len) int64, got {tuple(calib_ids.shape)} {calib_ids.dtype}")
    model.eval()
    gen = torch.Generator().manual_seed(cfg.seed)
    device = next(model.parameters()).device
    t0 = time.perf_counter()
    xs: list[Tensor] = []
    kws: list[dict[str, Any]] = []
    if calib_ids is not None:
        caught = capture_layer_inputs(model, dec, calib_ids.to(device), cfg.batch_size)
        xs, kws = [c[0] for c in caught], [c[1] for c in caught]

    layers: list[LayerQuant] = []
    losses: list[tuple[float, float]] = []
    fp_ms: list[float] = []  # mean square of each layer's FP output: the scale its MSE is read against
    bar = tqdm(dec.layers, desc=f"FlatQuant {cfg.method}", disable=not progress, unit="layer")
    for layer in bar:
        lq, fp_out, loss = quantize_layer(layer, cfg, gen, xs, kws, device)
        if loss is not None:
            losses.append(loss)
            bar.set_postfix(mse=f"{loss[1]:.3g}")
        layers.append(lq)
        if fp_out:
            fp_ms.append(float(sum(y.float().pow(2).mean() for y in fp_out) / len(fp_out)))
        if xs:
            xs = fp_out  # the next layer sees full-precision outputs (FlatQuant's choice)
    if cfg.lm_head and cfg.w_bits < 16:
        head = model.get_output_embeddings()
        if not isinstance(head, nn.Linear):
            raise ValueError(f"lm_head=True needs an nn.Linear output embedding, got {type(head).__name__}")
        if head.weight is model.get_input_embeddings().weight:
            head = nn.Linear(head.in_features, head.out_features, bias=False).to(head.weight)
            head.weight.data.copy_(model.get_input_embeddings().weight.data)  # untie: embeddings stay FP
            for c in {id(model.config): model.config, id(model.config.get_text_config()): model.config.get_text_config()}.values():
                c.tie_word_embeddings = False
        q, sc = quantize_rtn(head.weight.double(), bits=cfg.w_bits)
        model.set_output_embeddings(QuantLinear.from_codes(head, q.to(torch.int8), sc, cfg.w_bits))
    handle = FlatQuantHandle(model, cfg, layers, base_attn,
                             {"calibration_s": time.perf_counter() - t0, "layer_mse": losses,
                              "layer_fp_ms": fp_ms})
    handle.attach()
    return handle


def load_quantized(path: str | Path, dtype: torch.dtype | None = None, device: str | None = None) -> tuple[nn.Module, FlatQuantHandle]:
    """Rebuild a model written by :meth:`FlatQuantHandle.save`: config → model, codes → weights,
    transforms → hooks. Returns ``(model, handle)`` ready for inference.

    ``FileNotFoundError`` / one-line ``ValueError`` naming the file for anything else: not a folder, a
    missing or unreadable ``mmeff_quant.json`` / ``config.json`` / ``model.safetensors``, weights that no
    longer match the sha256 recorded at save time (folders saved before that record load unchecked), or
    tensors that do not fit the recorded model."""
    path = Path(path)
    what = "a folder written by FlatQuantHandle.save"
    if path.is_file():
        raise ValueError(f"{path} is a file, not {what}")
    meta_file, weights = path / "mmeff_quant.json", path / "model.safetensors"
    if not meta_file.is_file():
        raise FileNotFoundError(f"{meta_file} not found: {path} is not {what}")
    try:
        meta = json.loads(meta_file.read_text())
        cfg = QuantConfig(**{f.name: meta["quant_config"][f.name] for f in fields(QuantConfig)})
        arch, quantized, base_attn = meta["architecture"], list(meta["quantized"]), meta["base_attn"]
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"{meta_file} is not the record FlatQuantHandle.save writes ({e!r})") from e
    if not weights.is_file():
        raise FileNotFoundError(f"{weights} not found (or not a file): {path} is an incomplete quantized folder")
    want = (meta.get("sha256") or {}).get(weights.name) if isinstance(meta.get("sha256"), dict) else None
    if want is not None:
        got = file_sha256(weights)
        check_sha256(got, want, f"{weights} does not match the sha256 in {meta_file.name}",
                     "the file is corrupt, altered or from another save")
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise ValueError(f"{path / 'config.json'} is missing or not a transformers config ({e.__class__.__name__})") from e
    # the name comes from a file: only a transformers causal-LM class may be built from it, never any other
    # attribute of the module (e.g. a function that would be called with the config)
    cls = getattr(transformers, arch, None) if isinstance(arch, str) and arch.endswith("ForCausalLM") else None
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        raise ValueError(f"{meta_file}: architecture {arch!r} is not a transformers *ForCausalLM class; "
                         f"a FlatQuant folder holds a causal LM")
    with torch.device("meta"):
        model = cls(config)
    try:
        sd = load_file(str(weights))
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{weights} is not a safetensors file ({' '.join(str(e).split())})") from e
    for name in quantized:
        try:
            lin = model.get_submodule(name)
        except AttributeError as e:
            raise ValueError(f"{meta_file} lists {name!r}, which {arch} does not have") from e
        model.set_submodule(name, QuantLinear(lin.in_features, lin.out_features, cfg.w_bits, lin.bias is not None,
                                              lin.weight.dtype, "meta"))
    lq_state = {k: sd.pop(k) for k in [k for k in sd if k.startswith("mmeff_fq.")]}
    for k, v in lq_state.items():
        if ".lwc." in k and v.ndim == 2 and v.shape[1] == 1:
            lq_state[k] = v.expand(-1, 2).contiguous()  # saved by 0.2.0's one-sided LWC (unused once merged)
    try:
        missing, unexpected = model.load_state_dict(sd, strict=False, assign=True)
    except RuntimeError as e:  # shape mismatches
        raise ValueError(f"{weights} does not fit {arch}: {str(e).splitlines()[-1].strip()}") from e
    missing = [m for m in missing if not m.endswith("rotary_emb.inv_freq")]
    if missing or unexpected:
        raise ValueError(f"{weights} does not match {arch}: missing {missing[:5]}, unexpected {unexpected[:5]}")
    model.tie_weights()
    _rebuild_buffers(model)
    if dtype is not None:
        model = model.to(dtype)
    if device is not None:
        model = model.to(device)
    model.eval()
    dec = decoder_of(model)
    gen = torch.Generator().manual_seed(cfg.seed)
    layers = []
    for i, layer in enumerate(dec.layers):
        lq = LayerQuant(layer, cfg, gen)
        try:
            lq.load_state_dict({k.split(".", 2)[2]: v for k, v in lq_state.items() if k.split(".")[1] == str(i)})
        except RuntimeError as e:
            raise ValueError(f"{weights}: the transforms of layer {i} are missing or do not fit "
                             f"({' '.join(str(e).split())[:200]})") from e
        lq.merged = True
        for p in lq.parameters():
            p.requires_grad_(False)
        layers.append(lq.to(next(model.parameters()).device))
    handle = FlatQuantHandle(model, cfg, layers, base_attn, meta.get("report", {}))
    handle.attach()
    return model, handle


def _rebuild_buffers(model: nn.Module) -> None:
    # Non-persistent buffers (rotary inv_freq) are not in the checkpoint and were created on the meta
    # device; the modules holding them are rebuilt from their own config on the CPU.
    for name, mod in list(model.named_modules()):
        if any(b.is_meta for b in mod.buffers(recurse=False)):
            cfg = getattr(mod, "config", None)
            if cfg is None:
                raise ValueError(f"cannot rebuild the buffers of {name} ({type(mod).__name__}): it has no config")
            parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
            setattr(parent, name.rsplit(".", 1)[-1], type(mod)(config=cfg))
    left = [n for n, b in model.named_buffers() if b.is_meta]
    if left:
        raise ValueError(f"buffers {left[:3]} are still on the meta device after loading")


def linear_names(model: nn.Module) -> list[str]:
    """Model-relative names of the linears FlatQuant quantizes (everything else stays in full precision)."""
    dec = decoder_of(model)
    prefix = _prefix_of(model, dec)
    return [f"{prefix}.layers.{i}.{n}" for i in range(len(dec.layers)) for n in LINEARS]


QUANTIZERS.add("flatquant", quantize,
               summary="FlatQuant W4A4(KV4): learned Kronecker transforms + clipping on an HF LM's decoder layers")
