"""Weight and activation quantization of the LLM: FlatQuant W4A4 (``flatquant``) and GPTQ / RTN
(``gptq``). The int4 kernels are in :mod:`mmeff.kernels.quant`."""
