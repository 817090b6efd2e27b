"""Token primitives shared by every mmeff method.

Each primitive has a PyTorch reference here; Triton versions for CUDA tensors are dispatched from the
same functions (``MMEFF_KERNELS=torch|triton`` forces one; see ``mmeff.kernels.dispatch``).

- prune/gather: ``topk_indices_sorted``, ``gather_tokens``, ``prune``
- merge (ToMe-compatible): ``bipartite_soft_matching``, ``merge_wavg``, ``merge_source``,
  ``proportional_attention_bias``
- DCT (Fourier-VLM): ``dct_matrix``, ``lowpass_matrix``, ``dct2``, ``idct2``, ``dct_lowpass``
"""

from mmeff.kernels.dct import dct2, dct_lowpass, dct_matrix, idct2, lowpass_matrix
from mmeff.kernels.gather import gather_tokens, gather_tokens_ref, prune, topk_indices_sorted
from mmeff.kernels.merge import bipartite_soft_matching, merge_source, merge_wavg, proportional_attention_bias

__all__ = [
    "bipartite_soft_matching",
    "dct2",
    "dct_lowpass",
    "dct_matrix",
    "gather_tokens",
    "gather_tokens_ref",
    "idct2",
    "lowpass_matrix",
    "merge_source",
    "merge_wavg",
    "prune",
    "proportional_attention_bias",
    "topk_indices_sorted",
]
