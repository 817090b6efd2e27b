"""Token primitives shared by every mmeff method.

Each primitive has a PyTorch reference here; Triton versions for CUDA tensors are dispatched from the
same functions (``MMEFF_KERNELS=torch|triton`` forces one).
"""

from mmeff.kernels.gather import gather_tokens, topk_indices_sorted

__all__ = ["gather_tokens", "topk_indices_sorted"]
