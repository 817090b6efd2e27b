"""The transformers quantizer of mmeff's FlatQuant / GPTQ folders: ``from_pretrained`` restores them.

    import mmeff                                  # registers "mmeff_flatquant" with transformers
    handle.save("out/")                           # a quantize()d model (FlatQuant, Hadamard, RTN or GPTQ weights)
    model = AutoModelForCausalLM.from_pretrained("out/")
    handle_of(model)                              # its FlatQuantHandle; model.save_pretrained("out2/") loads again

:meth:`~mmeff.quant.flatquant.FlatQuantHandle.save` writes a ``quantization_config`` with
``quant_method="mmeff_flatquant"`` into config.json (:func:`~mmeff.quant.flatquant.hf_quantization_config`).
transformers reads it with :class:`FlatQuantConfig` and hands the model to :class:`FlatQuantHfQuantizer`
(the ``HfQuantizer`` route of torchao, compressed-tensors and GPTQModel): before the weights are read it
swaps the listed linears for empty :class:`~mmeff.quant.transforms.QuantLinear` and gives every decoder
layer its transforms as the submodule ``mmeff_fq``, so codes, scales and transforms load as ordinary
state-dict entries; afterwards it attaches the online hooks and the K/V attention function. Nothing named
in a file is imported or run: the model class is transformers' own for the config's ``model_type``, and
the config only gives numbers, one of two attention names and module names that must be linears of it.

The quantizer only restores pre-quantized folders: quantizing needs calibration data
(:func:`mmeff.quant.flatquant.quantize`), so ``from_pretrained(fp_folder, quantization_config=...)`` is refused.
"""

from __future__ import annotations

from dataclasses import MISSING, fields
from typing import Any

from safetensors import SafetensorError, safe_open
from torch import nn
from transformers.quantizers import HfQuantizer, register_quantization_config, register_quantizer
from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING
from transformers.utils.quantization_config import QuantizationConfigMixin

from mmeff.quant.calibration import QuantConfig
from mmeff.quant.flatquant import (
    HF_QUANT_METHOD,
    FlatQuantHandle,
    LoadedLayerQuant,
    add_quantized_shells,
    decoder_of,
    finish_loading,
)
from mmeff.quant.transforms import QuantLinear

__all__ = ["FlatQuantConfig", "FlatQuantHfQuantizer", "handle_of", "register"]

_FIELDS = {f.name: f for f in fields(QuantConfig)}
_HANDLE = "mmeff_quant_handle"  # attribute of a loaded model that holds its FlatQuantHandle


def _bad(msg: str) -> ValueError:
    return ValueError(f"quantization_config ({HF_QUANT_METHOD}): {msg}")


class FlatQuantConfig(QuantizationConfigMixin):
    """The ``quantization_config`` of a FlatQuant / GPTQ folder: every :class:`QuantConfig` field, the
    attention the model was calibrated with (``base_attn``) and the names of its quantized linears
    (``modules``). ``to_dict()`` is what config.json holds; anything else in it (an unknown key, a value
    of the wrong type or out of range, another ``quant_method``) is a one-line ``ValueError``."""

    def __init__(self, modules: list[str] | None = None, base_attn: str = "sdpa",
                 quant_method: str = HF_QUANT_METHOD, **quant_fields: Any) -> None:
        if quant_method != HF_QUANT_METHOD:
            raise _bad(f"quant_method is {quant_method!r}, not {HF_QUANT_METHOD!r}")
        unknown = sorted(set(quant_fields) - set(_FIELDS))
        if unknown:
            raise _bad(f"unknown field(s) {unknown}; known: {sorted(_FIELDS)}, base_attn, modules")
        values = {}
        for name, f in _FIELDS.items():
            v = quant_fields.get(name, f.default if f.default is not MISSING else None)
            want = type(f.default)
            # JSON has one number type: an integral float field may come back as an int, never a bool as a number
            ok = isinstance(v, want) and not (want is not bool and isinstance(v, bool))
            if not ok and not (want is float and isinstance(v, int) and not isinstance(v, bool)):
                raise _bad(f"{name} must be {want.__name__}, got {v!r}")
            values[name] = float(v) if want is float else v
        try:
            QuantConfig(**values)  # the value checks of quantize()'s own config
        except ValueError as e:
            raise _bad(str(e)) from e
        if base_attn not in ("sdpa", "eager"):
            raise _bad(f"base_attn must be 'sdpa' or 'eager', got {base_attn!r}")
        modules = [] if modules is None else modules
        if not (isinstance(modules, list) and all(isinstance(m, str) and m for m in modules)):
            raise _bad("modules must be a list of module names")
        self.quant_method = HF_QUANT_METHOD
        for name, v in values.items():
            setattr(self, name, v)
        self.base_attn = base_attn
        self.modules = list(modules)

    def quant_config(self) -> QuantConfig:
        """The :class:`QuantConfig` the model was quantized with."""
        return QuantConfig(**{name: getattr(self, name) for name in _FIELDS})


class FlatQuantHfQuantizer(HfQuantizer):
    """Restores a folder written by :meth:`FlatQuantHandle.save` (or by ``save_pretrained`` of a model it
    restored) inside ``from_pretrained``; see the module docstring."""

    requires_calibration = True  # only pre-quantized folders: quantizing needs calibration data

    def __init__(self, quantization_config: FlatQuantConfig, **kwargs: Any) -> None:
        super().__init__(quantization_config, **kwargs)
        self._layers: list[LoadedLayerQuant] = []

    def validate_environment(self, *args: Any, device_map: Any = None, **kwargs: Any) -> None:
        """Refuse a device map that offloads to disk or CPU hooks (the online transforms run per module)."""
        if isinstance(device_map, dict) and len(set(map(str, device_map.values()))) > 1:
            raise ValueError(f"{HF_QUANT_METHOD} models load on one device; device_map spreads it over "
                             f"{sorted(set(map(str, device_map.values())))}")

    def _process_model_before_weight_loading(self, model: nn.Module, checkpoint_files: list[str] | None = None,
                                             **kwargs: Any) -> nn.Module:
        qc: FlatQuantConfig = self.quantization_config
        cfg = qc.quant_config()
        _check_checkpoint(checkpoint_files, qc.modules, cfg, model)
        try:
            self._layers = add_quantized_shells(model, cfg, qc.modules)
        except (ValueError, TypeError) as e:
            raise _bad(str(e)) from e
        return model

    def _process_model_after_weight_loading(self, model: nn.Module, **kwargs: Any) -> nn.Module:
        qc: FlatQuantConfig = self.quantization_config
        base = decoder_of(model).config._attn_implementation
        # the K/V wrapper runs on the attention the model was loaded with when that is one it can wrap
        base = base if base in ("sdpa", "eager") else qc.base_attn
        handle = finish_loading(model, qc.quant_config(), self._layers, base)
        setattr(model, _HANDLE, handle)
        return model

    def is_serializable(self, *args: Any, **kwargs: Any) -> bool:
        """``save_pretrained`` writes the codes, scales and transforms as they load: a folder that loads again."""
        return True

    @property
    def is_trainable(self) -> bool:
        """The codes are integers and the transforms frozen: no fine-tuning through this quantizer."""
        return False


def _check_checkpoint(files: list[str] | None, modules: list[str], cfg: QuantConfig, model: nn.Module) -> None:
    """Compare the config's module list with the checkpoint's codes before anything is loaded, so a config
    that does not belong to its weights is one line instead of a loader traceback (headers only)."""
    if not files:
        return
    codes: dict[str, tuple[list[int], str]] = {}
    read = False
    for file in files:
        if not str(file).endswith(".safetensors"):
            continue
        read = True
        try:
            with safe_open(str(file), framework="pt") as f:
                for key in f.keys():
                    if key.endswith(".qweight"):
                        sl = f.get_slice(key)
                        codes[key.removesuffix(".qweight")] = (list(sl.get_shape()), sl.get_dtype())
        except (SafetensorError, OSError) as e:
            raise ValueError(f"{file} is not a safetensors file ({' '.join(str(e).split())})") from e
    if not read:  # not safetensors (nothing FlatQuantHandle.save or save_pretrained writes): the loader decides
        return
    if sorted(codes) != sorted(modules):
        extra, lacking = sorted(set(codes) - set(modules)), sorted(set(modules) - set(codes))
        raise _bad(f"modules do not match the checkpoint's codes: not listed {extra[:3]}, without codes {lacking[:3]}")
    for name in modules:
        try:
            lin = model.get_submodule(name)
        except AttributeError:
            raise _bad(f"{type(model).__name__} has no module {name!r}") from None
        if not isinstance(lin, (nn.Linear, QuantLinear)):
            raise _bad(f"{name!r} is a {type(lin).__name__}, not a linear layer")
        shell = QuantLinear(lin.in_features, lin.out_features, cfg.w_bits, False, device="meta")
        want = (list(shell.qweight.shape), "U8" if shell.packed else "I8")
        if codes[name] != want:
            raise _bad(f"w_bits={cfg.w_bits} gives {name}.qweight {want[1]} {want[0]}, the checkpoint holds "
                       f"{codes[name][1]} {codes[name][0]}: the config does not belong to these weights")


def handle_of(model: nn.Module) -> FlatQuantHandle:
    """The :class:`FlatQuantHandle` of a model restored by ``from_pretrained`` (its config, transforms and
    ``save``); ``ValueError`` for a model that was not."""
    handle = getattr(model, _HANDLE, None)
    if not isinstance(handle, FlatQuantHandle):
        raise ValueError(f"{type(model).__name__} was not loaded from a {HF_QUANT_METHOD} folder by from_pretrained")
    return handle


def register() -> None:
    """Register :class:`FlatQuantConfig` and :class:`FlatQuantHfQuantizer` with transformers under
    ``"mmeff_flatquant"``; a no-op when they are (transformers refuses a second registration)."""
    for mapping, cls, reg in ((AUTO_QUANTIZATION_CONFIG_MAPPING, FlatQuantConfig, register_quantization_config),
                              (AUTO_QUANTIZER_MAPPING, FlatQuantHfQuantizer, register_quantizer)):
        old = mapping.get(HF_QUANT_METHOD)
        if old is cls:
            continue
        if old is not None and old.__module__ == __name__:
            del mapping[HF_QUANT_METHOD]  # this module's class from before an importlib.reload
        reg(HF_QUANT_METHOD)(cls)  # another library's class under the name: transformers' own error


register()
