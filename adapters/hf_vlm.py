"""Shared machinery for HF transformers VLMs whose LLM reads visual features at placeholder tokens.

transformers 5.x checks that the number of placeholder tokens equals the number of visual features, so
a reducer that runs between the vision encoder and the LLM must shrink the text side too. This module
does that in one place, through two seams the host exposes:

- a forward pre-hook on the top-level model: encode the pixels, reduce, shrink ``input_ids`` /
  ``attention_mask`` / ``labels`` / token-type ids, and hand the reduced features in through
  ``mm_encoder_outputs`` (the v5 seam for pre-encoded features);
- a wrapped ``generate`` doing the same before generation starts (generate keeps its own copy of the
  prompt length and attention mask, so shrinking inside ``forward`` would desynchronise it). The
  returned sequences carry the caller's original prompt, so ``out[:, prompt_len:]`` still slices off the
  new tokens.

Positions: when the host uses explicit positions (Qwen2-VL's M-RoPE), they are computed on the
*unreduced* layout and then gathered for the kept tokens (merged tokens get their members' mean).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from transformers.modeling_outputs import BaseModelOutputWithPooling

from mmeff.adapters.base import Adapter
from mmeff.core import STAGES, Grid, Reduction, TokenContext
from mmeff.hfconfig import cache_from_kwargs, pad_token_id

__all__ = ["HFVLMAdapter", "VisualItem", "ReducedEncoderOutput", "join_run", "select_row", "TEXT_KWARG"]

#: forward/generate keyword carrying each row's question for prompt-guided methods (removed before the host
#: sees the call), e.g. ``model.generate(**inputs, mmeff_text=["what is the man holding?"])``
TEXT_KWARG = "mmeff_text"


class ReducedEncoderOutput(BaseModelOutputWithPooling):
    """Marks ``mm_encoder_outputs`` entries that mmeff already reduced (never reduce twice)."""


@dataclass
class VisualItem:
    """One image or video as the LLM consumes it: ``features`` ``(N, D)`` laid out on ``grid``.

    When the reducer already ran inside the encoder call (``stage="pre_projector"``), ``reduction`` holds
    its bookkeeping and ``features`` are the reduced, projected ``(M, D)`` tokens; ``grid`` stays the
    unreduced one, since placeholders and positions are laid out for it.
    """

    modality: str
    features: Tensor
    grid: Grid | None
    scores: Tensor | None = None
    reduction: Reduction | None = None
    extras: dict[str, Any] = field(default_factory=dict)
    #: per-token features ``(N, C)`` the host feeds elsewhere (Qwen3-VL's DeepStack layers); reduced with the
    #: tokens through the reducer's :meth:`~mmeff.core.TokenReducer.follow` into ``followed``
    companions: list[Tensor] = field(default_factory=list)
    followed: list[Tensor] = field(default_factory=list)

    @property
    def num_inputs(self) -> int:
        """N, the item's tokens before reduction (= its placeholder tokens in ``input_ids``)."""
        if self.reduction is not None:
            return int(self.reduction.assignment.shape[1])
        return int(self.features.shape[0])


class HFVLMAdapter(Adapter):
    """Base for LLaVA/Qwen2-VL style models. Subclasses define the encoders and position handling.

    Options:
        stage: ``"pre_projector"`` (reduce the vision encoder's output, so the projector runs on fewer
            tokens) or ``"post_projector"`` (reduce what the LLM reads). Default: the reducer's
            :meth:`~mmeff.core.TokenReducer.default_stage` for this host, i.e. where its paper runs it.
    """

    option_names = frozenset({"stage"})
    #: stages this host supports
    stages: tuple[str, ...] = ("post_projector",)

    #: model-forward keyword holding raw pixels for each modality
    pixel_keys: dict[str, str] = {}
    #: per-token tensors of the text sequence that must shrink with ``input_ids`` (pad value)
    seq_keys: dict[str, int] = {"attention_mask": 0, "labels": -100, "token_type_ids": 0, "mm_token_type_ids": 0}
    #: kwargs consumed by the encoders, dropped once features are injected
    encoder_keys: tuple[str, ...] = ()
    #: modalities whose features the host takes as one ``(tokens, D)`` tensor (Gemma 3's images, OneVision's
    #: videos), not a list per item
    concat_features: tuple[str, ...] = ()

    # ------------------------------------------------------------------------------------ to override
    def placeholder_id(self, modality: str) -> int:
        raise NotImplementedError

    def encode(self, kwargs: dict[str, Any]) -> list[VisualItem]:
        """Run the vision side on the call's kwargs; items in the order the LLM consumes them."""
        raise NotImplementedError

    def full_positions(self, kwargs: dict[str, Any]) -> Tensor | None:
        """Positions ``(P, B, L)`` of the unreduced sequence, or ``None`` if the host derives them. By
        default the caller's 1-D ``position_ids`` ``(B, L)`` with a leading ``P = 1`` axis (hosts with
        their own layout, such as Qwen2-VL's M-RoPE, override this)."""
        pos = kwargs.get("position_ids")
        if pos is None:
            return None
        return pos.unsqueeze(0) if pos.dim() == 2 else pos

    def decode_positions(self, mask: Tensor, q: int) -> Tensor | None:
        """Positions for ``q`` new tokens after a reduced prefill, given the fixed ``mask`` ``(B, L)``."""
        return None

    def runs(self, items: list[VisualItem], reductions: list[Reduction]) -> tuple[list[VisualItem], list[Reduction]]:
        """The placeholder runs the reduced items fill, in order: ``(run items, run reductions)``.

        By default each item is one run. Hosts whose run of placeholders holds several reducer inputs plus
        tokens no reducer sees (LLaVA-NeXT: base image, tiles and ``image_newline`` tokens) join them here
        with :func:`join_run`; a run item's ``num_inputs`` is its placeholder count.
        """
        return items, reductions

    def after_prepare(self, new_positions: Tensor | None, new_mask: Tensor | None) -> None:
        """Hook for host state that depends on the reduced layout (e.g. Qwen2-VL's ``rope_deltas``)."""

    def __init__(self, model: nn.Module, reducer: Any, **options: Any) -> None:
        super().__init__(model, reducer, **options)
        stage = options.get("stage")
        stage = self.reducer.default_stage(self.name) if stage is None else stage
        if stage not in STAGES:
            raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
        if stage not in self.stages:
            raise ValueError(f"{type(self).__name__} does not support stage={stage!r}{self._stage_hint(stage)}")
        self.stage: str = stage

    def _row_texts(self, batch: int) -> list[str] | None:
        """The call's ``mmeff_text`` as one entry per batch row (a bare string for a batch of one)."""
        text = [self._text] if isinstance(self._text, str) else self._text
        if text is not None and len(text) != batch:
            raise ValueError(f"{TEXT_KWARG} has {len(text)} entries for a batch of {batch}")
        return text

    def _stage_hint(self, stage: str) -> str:
        return f"; supported: {self.stages}"

    # ----------------------------------------------------------------------------------------- attach
    def attach(self) -> None:
        model = self.model
        if model.__dict__.get("_mmeff_adapter") is not None:
            raise ValueError("this model already has an mmeff method attached; remove it or pass several reducers to one apply()")
        self._sig = inspect.signature(model.forward)
        self._inside_generate = False
        self._prefill: tuple[int, Tensor] | None = None
        self._text: list[str] | None = None
        self._hook(model.register_forward_pre_hook(self._pre_forward, with_kwargs=True))
        self._override(model, "generate", self._wrap_generate(model.generate))
        self._override(model, "_mmeff_adapter", self)

    def _bind(self, args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
        bound = self._sig.bind_partial(*args, **kwargs).arguments
        extra = bound.pop("kwargs", {})
        return {**bound, **extra}

    def _pre_forward(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple | None:
        if self._inside_generate:
            return None
        call = self._bind(args, kwargs)
        had_text = TEXT_KWARG in call
        self._text = call.pop(TEXT_KWARG, None)
        new = self.prepare(call)
        if new is None:
            new = self._fix_decode_mask(call)
            if new is None:
                return ((), call) if had_text else None
        return (), new

    def _fix_decode_mask(self, call: dict[str, Any]) -> dict[str, Any] | None:
        # A hand-written decode loop keeps appending to the caller's unreduced attention mask; swap
        # its prompt part for the reduced one so it matches the cache again.
        mask, cache = call.get("attention_mask"), cache_from_kwargs(call)
        if self._prefill is None or mask is None or cache is None or mask.dim() != 2:
            return None
        orig_len, reduced = self._prefill
        past = cache.get_seq_length()
        ids = call.get("input_ids")
        q = ids.shape[1] if ids is not None else call["inputs_embeds"].shape[1]
        removed = orig_len - reduced.shape[1]
        if past == 0 or mask.shape[1] != past + removed + q or mask.shape[0] != reduced.shape[0]:
            return None
        call["attention_mask"] = torch.cat([reduced.to(mask), mask[:, orig_len:]], dim=1)
        if call.get("position_ids") is None:
            pos = self.decode_positions(call["attention_mask"], q)
            if pos is not None:
                call["position_ids"] = pos
        return call

    def _wrap_generate(self, generate: Callable[..., Any]) -> Callable[..., Any]:
        def mmeff_generate(*args: Any, **kwargs: Any) -> Any:
            if args:
                if "input_ids" in kwargs or "inputs" in kwargs:
                    raise TypeError("generate() got input_ids both positionally and by keyword")
                kwargs["input_ids"], args = args[0], args[1:]
            if "inputs" in kwargs:
                kwargs["input_ids"] = kwargs.pop("inputs")
            orig_ids = kwargs.get("input_ids")
            self._text = kwargs.pop(TEXT_KWARG, None)
            new = self.prepare(dict(kwargs))
            self._inside_generate = True
            try:
                out = generate(*args, **(new if new is not None else kwargs))
            finally:
                self._inside_generate = False
            if new is None or orig_ids is None:
                return out
            return self._restore_prompt(out, orig_ids, new["input_ids"].shape[1])

        mmeff_generate.__doc__ = generate.__doc__
        return mmeff_generate

    @staticmethod
    def _restore_prompt(out: Any, orig_ids: Tensor, reduced_len: int) -> Any:
        def fix(seq: Tensor) -> Tensor:
            reps = seq.shape[0] // orig_ids.shape[0]
            prompt = orig_ids.repeat_interleave(reps, dim=0).to(seq.device)
            return torch.cat([prompt, seq[:, reduced_len:]], dim=1)

        if isinstance(out, Tensor):
            return fix(out)
        if hasattr(out, "sequences"):
            out.sequences = fix(out.sequences)
        return out

    # ---------------------------------------------------------------------------------------- prepare
    def _needs_reduction(self, call: dict[str, Any]) -> bool:
        if any(call.get(k) is not None for k in self.pixel_keys.values()):
            return True
        enc = call.get("mm_encoder_outputs") or {}
        return any(v is not None and not isinstance(v, ReducedEncoderOutput) for v in enc.values())

    def prepare(self, call: dict[str, Any]) -> dict[str, Any] | None:
        """Encode, reduce and shrink one call's kwargs; ``None`` when the call has no visual input."""
        if not self._needs_reduction(call):
            return None
        input_ids = call.get("input_ids")
        if input_ids is None:
            raise ValueError("mmeff needs input_ids (not inputs_embeds) to shrink the visual placeholder tokens")
        cache = cache_from_kwargs(call)
        if cache is not None and cache.get_seq_length() > 0:
            raise ValueError("visual inputs after a filled KV cache are not supported by mmeff adapters")
        items = self.encode(call)
        items, reductions = self.runs(items, self._reduce_items(items))
        positions = self.full_positions(call)
        new = self._shrink(call, items, reductions, positions)
        self.stats = {
            "stage": self.stage,
            "visual_tokens_in": sum(i.num_inputs for i in items),
            "visual_tokens_out": sum(int(r.num_tokens) for r in reductions),
            "items": len(items),
            "prompt_len_in": int(input_ids.shape[1]),
            "prompt_len_out": int(new["input_ids"].shape[1]),
        }
        self.last_reductions = reductions
        mask = new.get("attention_mask")
        self._prefill = (int(input_ids.shape[1]), mask) if mask is not None else None
        self.after_prepare(new.get("position_ids"), mask)
        return new

    def _reduce_items(self, items: list[VisualItem]) -> list[Reduction]:
        # items of the same shape and grid are reduced as one batch (e.g. the frames of a video as images)
        out: list[Reduction | None] = [it.reduction for it in items]
        groups: dict[tuple, list[int]] = {}
        for i, it in enumerate(items):
            if it.reduction is not None:
                continue
            key = (it.modality, tuple(it.features.shape), it.grid, it.scores is None, tuple(sorted(it.extras)),
                   tuple(tuple(c.shape) for c in it.companions))
            groups.setdefault(key, []).append(i)
        for (_, _, grid, _, extra_keys, _), idx in groups.items():
            feats = torch.stack([items[i].features for i in idx])
            scores = torch.stack([items[i].scores for i in idx]) if items[idx[0]].scores is not None else None
            # per-item side inputs (question text, frames) as lists aligned with the batch rows
            extras = {k: [items[i].extras[k] for i in idx] for k in extra_keys}
            ctx = TokenContext(grid=grid, scores=scores, extras=extras)
            red = self.reducer(feats, ctx)
            followed = [self.reducer.follow(red, torch.stack([items[i].companions[k] for i in idx]), ctx)
                        for k in range(len(items[idx[0]].companions))]
            for j, i in enumerate(idx):
                out[i] = select_row(red, j)
                items[i].followed = [f[j] for f in followed]
        return [r for r in out if r is not None]

    def _shrink(
        self, call: dict[str, Any], items: list[VisualItem], reds: list[Reduction], positions: Tensor | None
    ) -> dict[str, Any]:
        input_ids: Tensor = call["input_ids"]
        b, length = input_ids.shape
        keep = ~_padding(call.get("attention_mask"), b, length, input_ids.device)
        new_pos = positions.clone() if positions is not None else None
        per_modality: dict[str, list[int]] = {}
        for i, it in enumerate(items):
            per_modality.setdefault(it.modality, []).append(i)
        for modality, idx in per_modality.items():
            rows, cols = (input_ids == self.placeholder_id(modality)).nonzero(as_tuple=True)
            need = sum(items[i].num_inputs for i in idx)
            if rows.numel() != need:
                raise ValueError(
                    f"{modality} placeholder tokens and features do not match: {rows.numel()} placeholders in input_ids, "
                    f"{need} features from the encoder"
                )
            offset = 0
            for i in idx:
                n, m = items[i].num_inputs, reds[i].num_tokens
                r, c = rows[offset : offset + n], cols[offset : offset + n]
                offset += n
                if not bool((r == r[0]).all()):
                    raise ValueError(f"the placeholders of one {modality} span several batch rows")
                row = int(r[0])
                keep[row, c[m:]] = False
                if new_pos is not None:
                    # positions of merged/selected tokens, written into the slots that survive
                    red_pos = reds[i].positions(new_pos[:, row, c].T.unsqueeze(0))[0]
                    new_pos[:, row, c[:m]] = red_pos.T.to(new_pos.dtype)
        lengths = keep.sum(1)
        width = int(lengths.max())
        left = _is_left_padded(call.get("attention_mask"))
        # destination column of every kept token, right- or left-aligned as the caller padded
        rank = keep.long().cumsum(1) - 1
        dest = rank + (width - lengths).unsqueeze(1) if left else rank
        rr, cc = keep.nonzero(as_tuple=True)
        dd = dest[rr, cc]

        def pack(t: Tensor, fill: int) -> Tensor:
            shape = (*t.shape[:-2], b, width) if t.dim() == 3 else (b, width)
            out = torch.full(shape, fill, dtype=t.dtype, device=t.device)
            out[..., rr, dd] = t[..., rr, cc]
            return out

        pad_id = pad_token_id(self.model.config)
        new = dict(call)
        new["input_ids"] = pack(input_ids, pad_id)
        for key, fill in self.seq_keys.items():
            t = call.get(key)
            if isinstance(t, Tensor) and t.shape[-2:] == (b, length):
                new[key] = pack(t, fill)
        if new.get("attention_mask") is None and bool((lengths != width).any()):
            new["attention_mask"] = pack(torch.ones_like(input_ids), 0)
        if new_pos is not None:
            new["position_ids"] = pack(new_pos, 1)
            if isinstance(call.get("position_ids"), Tensor) and call["position_ids"].dim() == 2 and new_pos.shape[0] == 1:
                new["position_ids"] = new["position_ids"][0]  # back to the caller's (B, L)
        for key in (*self.pixel_keys.values(), *self.encoder_keys):
            new.pop(key, None)
        new["mm_encoder_outputs"] = {m: self.encoder_output(m, [items[i] for i in idx], [reds[i] for i in idx])
                                     for m, idx in per_modality.items()}
        return new

    def encoder_output(self, modality: str, items: list[VisualItem], reds: list[Reduction]) -> ReducedEncoderOutput:
        """What the host reads from ``mm_encoder_outputs[modality]``: the reduced tokens of ``items`` (one
        ``(M_i, D)`` tensor each, or one concatenated tensor for :attr:`concat_features` modalities)."""
        feats = [r.tokens[0] for r in reds]
        return ReducedEncoderOutput(pooler_output=torch.cat(feats) if modality in self.concat_features else feats)


def join_run(num_slots: int, parts: list[tuple[Reduction, Tensor, Tensor]]) -> Reduction:
    """One placeholder run of ``num_slots`` slots filled by several batch-of-one reductions, outputs in key order.

    Each part is ``(reduction, slots, keys)``: ``slots`` ``(N_i,)`` long, the run slot of each of the part's
    inputs; ``keys`` ``(M_i,)`` float, where each of its outputs goes (a stable sort, so equal keys keep
    the part order and each part's own output order). Tokens no reducer sees (newline tokens) come in as
    :meth:`Reduction.identity` parts. Returns the run's reduction: tokens ``(1, M, D)``, assignment
    ``(1, num_slots)`` (and ``sources`` when a part has them), so positions of merged tokens are their
    members' mean as everywhere else.
    """
    tokens = torch.cat([r.tokens[0] for r, _, _ in parts])
    order = torch.sort(torch.cat([k.to(torch.float64).reshape(-1) for _, _, k in parts]), stable=True).indices
    rank = torch.empty_like(order)
    rank[order] = torch.arange(order.numel(), device=order.device)
    out_idx, in_idx, offset = [], [], 0
    for red, slots, _ in parts:
        if red.sources is not None:
            o, i = red.sources[0][0], red.sources[1][0]
        else:
            i = (red.assignment[0] >= 0).nonzero()[:, 0]
            o = red.assignment[0, i]
        out_idx.append(rank[offset + o])
        in_idx.append(slots.to(i.device)[i])
        offset += red.num_tokens
    out, inp = torch.cat(out_idx), torch.cat(in_idx)
    tokens = tokens[order].unsqueeze(0)
    if any(r.sources is not None for r, _, _ in parts):  # some outputs draw on overlapping inputs
        return Reduction.from_sources(tokens, out.unsqueeze(0), inp.unsqueeze(0), num_slots)
    assignment = torch.full((1, num_slots), -1, dtype=torch.long, device=tokens.device)
    assignment[0, inp] = out
    return Reduction(tokens=tokens, assignment=assignment)


def select_row(red: Reduction, j: int) -> Reduction:
    """Row ``j`` of a batched reduction, as a batch of one (of the same class, so overrides survive)."""
    return type(red)(
        tokens=red.tokens[j : j + 1],
        assignment=red.assignment[j : j + 1],
        indices=None if red.indices is None else red.indices[j : j + 1],
        sizes=None if red.sizes is None else red.sizes[j : j + 1],
        grid=red.grid,
        sources=None if red.sources is None else (red.sources[0][j : j + 1], red.sources[1][j : j + 1]),
    )


def _padding(mask: Tensor | None, b: int, length: int, device: torch.device) -> Tensor:
    """``(B, L)`` bool, True on leading/trailing padding; dropped so rows re-pad to the new longest row
    (otherwise a batch keeps the old width and the LLM computes every padding column)."""
    if not isinstance(mask, Tensor) or mask.shape != (b, length):
        return torch.zeros(b, length, dtype=torch.bool, device=device)
    valid = mask.to(device) != 0
    lead = valid.long().cumsum(1) == 0
    trail = valid.long().flip(1).cumsum(1).flip(1) == 0
    return lead | trail


def _is_left_padded(mask: Tensor | None) -> bool:
    if mask is None or mask.dim() != 2:
        return True
    # right padding leaves zeros at the end of some row; everything else is treated as left padding
    return not bool((mask[:, -1] == 0).any())
