"""Token primitives shared by every mmeff method.

Each primitive has a PyTorch reference here; Triton versions for CUDA tensors are dispatched from the
same functions (``MMEFF_KERNELS=torch|triton`` forces one; see ``mmeff.kernels.dispatch``).

- prune/gather: ``topk_indices_sorted``, ``gather_tokens``, ``prune``
- merge (ToMe-compatible): ``bipartite_soft_matching``, ``merge_wavg``, ``merge_source``,
  ``proportional_attention_bias``
- DCT (Fourier-VLM): ``dct_matrix``, ``lowpass_matrix``, ``dct2``, ``idct2``, ``dct_lowpass``
- W4A4 (FlatQuant): ``kron_factors``, ``kron_transform``, ``kron_transform_quant``,
  ``quantize_sym_per_token_ref``, ``pack_int4``, ``unpack_int4``, ``int4_matmul``
"""

import sys as _sys

if __name__ != "mmeff.kernels":
    # The repository root is on sys.path (``python -m`` run from a checkout), so this folder was found as
    # the top-level ``kernels``: that name belongs to the PyPI package (transformers imports it when installed). Load the installed one
    # in this module's place, so nothing here shadows it.
    import importlib.machinery as _machinery
    import importlib.util as _util
    import os as _os

    _root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
    _spec = _machinery.PathFinder.find_spec(
        __name__, [p for p in _sys.path if _os.path.abspath(p or _os.getcwd()) != _root])
    if _spec is None or _spec.loader is None:
        # Not installed: stay the empty namespace Python makes of a bare folder (no __file__, no version),
        # which is how transformers' availability checks recognise an absent package.
        del __file__
    else:
        _real = _util.module_from_spec(_spec)
        _sys.modules[__name__] = _real
        _spec.loader.exec_module(_real)
else:
    from mmeff.kernels.dct import dct2, dct_lowpass, dct_matrix, idct2, lowpass_matrix
    from mmeff.kernels.gather import gather_tokens, gather_tokens_ref, prune, topk_indices_sorted
    from mmeff.kernels.merge import (
        bipartite_soft_matching,
        merge_source,
        merge_wavg,
        proportional_attention_bias,
    )
    from mmeff.kernels.quant import (
        int4_matmul,
        kron_factors,
        kron_transform,
        kron_transform_quant,
        pack_int4,
        quantize_sym_per_token_ref,
        unpack_int4,
    )

    __all__ = [
        "bipartite_soft_matching",
        "dct2",
        "dct_lowpass",
        "dct_matrix",
        "gather_tokens",
        "gather_tokens_ref",
        "idct2",
        "int4_matmul",
        "kron_factors",
        "kron_transform",
        "kron_transform_quant",
        "lowpass_matrix",
        "merge_source",
        "merge_wavg",
        "pack_int4",
        "prune",
        "proportional_attention_bias",
        "quantize_sym_per_token_ref",
        "topk_indices_sorted",
        "unpack_int4",
    ]
