"""Weight and activation quantization of the LLM: FlatQuant W4A4 (``flatquant``) and GPTQ / RTN
(``gptq``). The int4 kernels are in :mod:`mmeff.kernels.quant`. Importing the package registers the
transformers quantizer ``"mmeff_flatquant"`` (``hf_quantizer``), so ``AutoModelForCausalLM.from_pretrained``
restores the folders that ``FlatQuantHandle.save`` writes."""

from mmeff.quant import hf_quantizer as _hf_quantizer  # noqa: F401  (registers the transformers quantizer)
