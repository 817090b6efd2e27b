"""ToMe: token merging inside ViT encoders (Bolya et al., ICLR'23) for timm, open_clip and HF CLIP/SigLIP.

In every block, between the attention residual and the MLP, ToMe merges the ``r`` most similar token
pairs (bipartite soft matching on the attention keys averaged over heads, see
:func:`mmeff.kernels.merge.bipartite_soft_matching`) by a size-weighted average, so each block after
runs on fewer tokens. With proportional attention the logits get ``+ log(size)``: a merged token counts
as the tokens it holds. Class, register and distillation tokens are never merged.

One line for users::

    handle = mmeff.tome.patch(vit, r=16)            # or r=[..per block..] or r=(16, -0.5)
    logits = vit(images)                             # ~2x the throughput of the unmerged model
    handle.stats                                     # {"tokens_in": 197, "tokens_out": 5, ...}
    mmeff.tome.unpatch(vit)

    with mmeff.apply(llava, mmeff.ToMe(r=8)):       # inside a VLM the merged tower still hands
        out = llava.generate(**inputs)               # the projector its full 576-token grid

The hooks that run it inside timm, open_clip and HF towers (and ``patch``/``unpatch``) are in
:mod:`mmeff.adapters.tome`; ``mmeff.tome`` (an attribute of ``mmeff``) holds both.

Differences from the official code (``facebookresearch/ToMe``, ``tome/merge.py``, ``tome/patch/timm.py``);
on timm ViTs with a class token the merged outputs equal it (3.9e-6, the issue-35 comparison):

* **Token order without a class token** (SigLIP-style towers): the official leaves unmerged tokens in score
  order, which reshuffles the next block's alternating A/B split; mmeff keeps them in spatial order by
  default. ``ToMe(faithful=True)`` gives the official order (on the tests' tiny SigLIP the two differ by
  0.47 in the pooled output; the issue measured 0.84 in logits on its model). With a class token both
  orders are the same.
* **Proportional attention as a float attention mask**, so fused SDPA stays on (the official computes
  attention by hand); same values.
* **Hooks on the host's own blocks** (any timm version, LayerScale, qk-norm, registers; open_clip; HF
  CLIP/SigLIP) instead of the official's replacement block classes for timm of its time.
* **``unmerge``** (default in HF towers): every block hands the full grid on, so a VLM's projector gets the
  token count it was trained on; the official has no such mode (classification only).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

from mmeff.core import IN_TOWER

__all__ = ["Schedule", "ToMe", "parse_r"]

Schedule = int | Sequence[int] | tuple[int, float]


def parse_r(depth: int, r: Schedule) -> list[int]:
    """Per-block merge counts for ``depth`` blocks, as ToMe's ``parse_r``.

    ``r`` is an int (the same in every block), a list (padded with zeros to ``depth``), or a tuple
    ``(r, inflection)`` with ``inflection`` in ``[-1, 1]``: a linear ramp with mean ``r`` that starts at
    ``r * (1 - inflection)`` (``inflection > 0`` merges more in late blocks, ``< 0`` in early ones).
    """
    if depth <= 0:
        raise ValueError(f"depth must be positive, got {depth}")
    if isinstance(r, bool):
        raise TypeError(f"r must be an int, a list of ints or (r, inflection), got {r!r}")
    if isinstance(r, int):
        out = [r] * depth
    elif isinstance(r, tuple):
        if len(r) != 2 or not isinstance(r[0], int) or not -1.0 <= float(r[1]) <= 1.0:
            raise ValueError(f"a tuple r must be (r: int, inflection in [-1, 1]), got {r!r}")
        base, inflect = r[0], float(r[1])
        lo = int(base * (1.0 - inflect))
        hi = 2 * base - lo
        step = (hi - lo) / max(depth - 1, 1)
        out = [int(lo + step * i) for i in range(depth)]
    elif isinstance(r, Sequence):
        out = [int(v) for v in r]
        if len(out) > depth:
            raise ValueError(f"r lists {len(out)} values but the encoder has {depth} blocks")
        out += [0] * (depth - len(out))
    else:
        raise TypeError(f"r must be an int, a list of ints or (r, inflection), got {type(r).__name__}")
    if any(v < 0 for v in out):
        raise ValueError(f"merge counts must be >= 0, got {out}")
    return out


@IN_TOWER.register("tome")
@dataclass
class ToMe:
    """Token merging configuration; attach with ``mmeff.apply(model, ToMe(...))`` or :func:`patch`.

    Attributes:
        r: tokens merged per block: int, per-block list, or ``(r, inflection)`` (see :func:`parse_r`).
            Each block's value is clamped to half its mergeable tokens.
        prop_attn: add ``log(size)`` to the attention logits (ToMe's proportional attention).
        trace_source: keep ``handle.source`` ``(B, N', N)``, which original tokens each output holds.
        unmerge: blocks exchange the full token grid (compute stays merged); ``None`` = host default
            (True for HF CLIP/SigLIP towers, which VLMs read hidden states from; False otherwise).
        faithful: order the tokens as the official code on towers without a class token (SigLIP-style):
            the unmerged tokens stay in score order, so the next block's alternating A/B split follows
            the official one. The default (False) keeps them in their original order, so the split stays
            spatial (neighbouring patches alternate between A and B in every block); on towers with a
            class token the two are the same. On the tiny SigLIP of tests/methods/test_tome.py (r = 8, 6, 4)
            the two orders differ by 0.47 in the pooled output (the issue measured 0.84 in logits);
            which is more accurate has not been measured.
    """

    r: Schedule = 16
    prop_attn: bool = True
    trace_source: bool = False
    unmerge: bool | None = None
    faithful: bool = False

    name: ClassVar[str] = "tome"

    def describe(self) -> str:
        """One-line description for logs and errors."""
        return f"ToMe(r={self.r!r}, prop_attn={self.prop_attn}{', faithful=True' if self.faithful else ''})"
