"""``mmeff bench``: one module per suite. ``reduction`` is the main job (every visual-token reducer on the
default model); the others are ``mmeff bench <suite>`` (``tome``, ``tocom``, ``sepllm``/``kv``,
``flatquant``/``quant``, ``scenes``, ...); ``kernels`` and ``fourier`` are scripts
(``python -m mmeff.bench.kernels``)."""

from mmeff.bench.reduction import (
    BenchRow,
    MethodSpec,
    bench_reducers,
    default_methods,
    format_table,
    run_bench,
    token_agreement,
)

__all__ = ["BenchRow", "MethodSpec", "bench_reducers", "default_methods", "format_table", "run_bench", "token_agreement"]
