"""The one API every visual-token reducer in mmeff implements.

A reducer is a small ``@dataclass`` holding its hyper-parameters. Calling it on a token tensor
``(B, N, D)`` plus a :class:`TokenContext` returns a :class:`Reduction`: the reduced tokens
``(B, M, D)`` and the bookkeeping needed to recompute positions (which original tokens each output
token stands for). Adapters (``mmeff.adapters``) call reducers at the model's seams; users apply them
with ``mmeff.apply(model, reducer)``.

To add a method, subclass :class:`TokenReducer` (or :class:`ScoreTopK`, which only needs ``score``) and
decorate it with :func:`register`.
"""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any, ClassVar, Generic, TypeVar

import torch
from torch import Tensor

from mmeff.kernels import gather_tokens, topk_indices_sorted

Grid = tuple[int, ...]

#: Where a VLM adapter may run a reducer: on the vision encoder's output before the projector
#: (``"pre_projector"``), or on the projected features the LLM reads (``"post_projector"``).
STAGES = ("pre_projector", "post_projector")

__all__ = [
    "ADAPTERS",
    "Entry",
    "IN_TOWER",
    "KINDS",
    "QUANTIZERS",
    "REDUCERS",
    "Registry",
    "catalogue",
    "method_adapter",
    "attached",
    "attach_cleanly",
    "Grid",
    "STAGES",
    "TokenContext",
    "Reduction",
    "TokenReducer",
    "BudgetReducer",
    "GridReducer",
    "ScoreTopK",
    "Compose",
    "register",
    "create_reducer",
    "list_reducers",
    "get_reducer_class",
    "pool_grid_shape",
    "grid_cells",
]


# --------------------------------------------------------------------------------------------- context


@dataclass
class TokenContext:
    """What a reducer may know about the tokens besides their values.

    Attributes:
        grid: patch layout of the N tokens, ``(H, W)`` or ``(T, H, W)`` with ``prod(grid) == N``.
        scores: optional importance per token ``(B, N)`` (e.g. CLS attention from the vision encoder).
        prompt: optional prompt embedding ``(B, Dp)`` for prompt-guided methods.
        extras: free-form, method-specific side inputs (kept out of the typed fields on purpose).
    """

    grid: Grid | None = None
    scores: Tensor | None = None
    prompt: Tensor | None = None
    extras: dict[str, Any] = field(default_factory=dict)

    def validate(self, tokens: Tensor) -> None:
        """Check the context against tokens ``(B, N, D)``; raise ``ValueError`` naming the mismatch."""
        b, n = tokens.shape[:2]
        if self.grid is not None:
            if len(self.grid) not in (2, 3) or any(int(g) < 1 for g in self.grid):
                raise ValueError(f"grid must be (H, W) or (T, H, W) of positive ints, got {self.grid}")
            if math.prod(self.grid) != n:
                raise ValueError(f"grid {tuple(self.grid)} has {math.prod(self.grid)} cells but there are {n} tokens")
        if self.scores is not None:
            if self.scores.shape != (b, n):
                raise ValueError(f"scores must have shape (B, N) = {(b, n)}, got {tuple(self.scores.shape)}")
            if self.scores.device != tokens.device:
                raise ValueError(f"scores are on {self.scores.device} but tokens are on {tokens.device}")
        if self.prompt is not None and self.prompt.shape[0] != b:
            raise ValueError(f"prompt batch {self.prompt.shape[0]} does not match token batch {b}")


# ------------------------------------------------------------------------------------------- reduction


@dataclass
class Reduction:
    """Output of a reducer.

    Attributes:
        tokens: reduced tokens ``(B, M, D)``.
        assignment: ``(B, N)`` long, the output index each input token went to, ``-1`` if dropped.
        indices: ``(B, M)`` long, for pure selections the input index of each kept token (ascending);
            ``None`` when outputs mix several inputs (merging, pooling, frequency filtering).
        sizes: ``(B, M)`` float, how many input tokens each output token stands for.
        grid: layout of the M outputs when they still form a grid (pooling, DCT), else ``None``.
        sources: for methods whose outputs draw on overlapping inputs (Free Video-LLM's fast path re-uses
            the slow path's frames), ``(out_idx, in_idx)``, each ``(B, K)`` long: output ``out_idx[b, k]``
            draws on input ``in_idx[b, k]``. When set it defines sizes and positions, and ``assignment``
            holds each input's first output (``-1`` if unused). Build it with :meth:`from_sources`.
    """

    tokens: Tensor
    assignment: Tensor
    indices: Tensor | None = None
    sizes: Tensor | None = None
    grid: Grid | None = None
    sources: tuple[Tensor, Tensor] | None = None

    def __post_init__(self) -> None:
        if self.sizes is None:
            if self.sources is not None:
                out_idx = self.sources[0]
                self.sizes = torch.zeros(out_idx.shape[0], self.tokens.shape[1], device=out_idx.device).scatter_add_(
                    1, out_idx, torch.ones_like(out_idx, dtype=torch.float32)
                )
            else:
                self.sizes = member_counts(self.assignment, self.tokens.shape[1]).to(torch.float32)

    @classmethod
    def from_sources(
        cls, tokens: Tensor, out_idx: Tensor, in_idx: Tensor, num_inputs: int, grid: Grid | None = None
    ) -> Reduction:
        """Outputs ``tokens`` ``(B, M, D)`` built from overlapping inputs: pairs ``(out_idx, in_idx)`` ``(B, K)``.

        ``assignment`` records each input's lowest-numbered output so code that needs a partition (e.g.
        :meth:`then`) still works; positions and sizes use every pair.
        """
        if out_idx.shape != in_idx.shape or out_idx.dim() != 2 or out_idx.shape[0] != tokens.shape[0]:
            raise ValueError(f"out_idx and in_idx must both be (B, K) with B = {tokens.shape[0]}")
        m = tokens.shape[1]
        if out_idx.numel() and (int(out_idx.min()) < 0 or int(out_idx.max()) >= m):
            raise ValueError(f"out_idx must index the {m} outputs")
        if in_idx.numel() and (int(in_idx.min()) < 0 or int(in_idx.max()) >= num_inputs):
            raise ValueError(f"in_idx must index the {num_inputs} inputs")
        first = torch.full((tokens.shape[0], num_inputs), m, dtype=torch.long, device=tokens.device)
        first.scatter_reduce_(1, in_idx, out_idx, reduce="amin")
        assignment = torch.where(first == m, -1, first)
        return cls(tokens=tokens, assignment=assignment, grid=grid, sources=(out_idx, in_idx))

    @property
    def num_tokens(self) -> int:
        """M, the number of output tokens per sample."""
        return self.tokens.shape[1]

    @classmethod
    def identity(cls, tokens: Tensor, grid: Grid | None = None) -> Reduction:
        """The no-op reduction of ``tokens`` ``(B, N, D)``."""
        b, n = tokens.shape[:2]
        idx = torch.arange(n, device=tokens.device).expand(b, n)
        return cls(tokens=tokens, assignment=idx.clone(), indices=idx.clone(), grid=grid)

    @classmethod
    def from_indices(cls, tokens: Tensor, indices: Tensor, grid: Grid | None = None) -> Reduction:
        """Selection of ``indices`` ``(B, M)`` (ascending) from ``tokens`` ``(B, N, D)``."""
        b, n = tokens.shape[:2]
        assignment = torch.full((b, n), -1, dtype=torch.long, device=tokens.device)
        ar = torch.arange(indices.shape[1], device=tokens.device).expand_as(indices)
        assignment.scatter_(1, indices, ar)
        return cls(tokens=gather_tokens(tokens, indices), assignment=assignment, indices=indices, grid=grid)

    def positions(self, pos: Tensor) -> Tensor:
        """Map per-token positions ``(B, N, P)`` (or ``(B, N)``) of the inputs to the outputs.

        A selected token keeps its own position; a merged token gets the member-size-weighted mean
        position rounded to the nearest integer, so rotary embeddings stay on the integer lattice; with
        ``sources`` the mean runs over every input the output draws on.
        """
        squeeze = pos.dim() == 2
        p = pos.unsqueeze(-1) if squeeze else pos
        if self.indices is not None:
            out = p.gather(1, self.indices.unsqueeze(-1).expand(-1, -1, p.shape[-1]))
        elif self.sources is not None:
            out = source_mean(p.to(torch.float64), self.sources, self.sizes, self.num_tokens).round().to(pos.dtype)
        else:
            out = group_mean(p.to(torch.float64), self.assignment, self.num_tokens).round().to(pos.dtype)
        return out.squeeze(-1) if squeeze else out

    def then(self, other: Reduction) -> Reduction:
        """Compose: ``other`` reduced this reduction's outputs; return the end-to-end bookkeeping.

        Reductions with overlapping ``sources`` compose through their ``assignment`` (each input's first
        output), so the composed sizes/positions use that partition.
        """
        valid = self.assignment >= 0
        a = torch.where(valid, other.assignment.gather(1, self.assignment.clamp(min=0)), -1)
        indices = None
        if self.indices is not None and other.indices is not None:
            indices = self.indices.gather(1, other.indices)
        return Reduction(tokens=other.tokens, assignment=a, indices=indices, grid=other.grid)


def member_counts(assignment: Tensor, m: int) -> Tensor:
    """Number of inputs per output: assignment ``(B, N)`` → counts ``(B, M)`` (dropped tokens ignored)."""
    b = assignment.shape[0]
    counts = torch.zeros(b, m + 1, dtype=torch.long, device=assignment.device)
    counts.scatter_add_(1, assignment.clamp(min=-1) + 1, torch.ones_like(assignment))
    return counts[:, 1:]


def source_mean(x: Tensor, sources: tuple[Tensor, Tensor], sizes: Tensor, m: int) -> Tensor:
    """Mean of ``x`` ``(B, N, C)`` over every input each of ``m`` outputs draws on → ``(B, M, C)`` in ``x``'s
    dtype; ``sources`` the ``(out_idx, in_idx)`` pairs of a :class:`Reduction`, ``sizes`` ``(B, M)`` its counts."""
    out_idx, in_idx = sources
    vals = x.gather(1, in_idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
    acc = torch.zeros(x.shape[0], m, x.shape[-1], dtype=x.dtype, device=x.device)
    acc.scatter_add_(1, out_idx.unsqueeze(-1).expand_as(vals), vals)
    return acc / sizes.to(x.dtype).clamp(min=1).unsqueeze(-1)


def group_mean(x: Tensor, assignment: Tensor, m: int) -> Tensor:
    """Mean of ``x`` ``(B, N, C)`` over the members of each of ``m`` groups → ``(B, M, C)``."""
    b, _, c = x.shape
    out = torch.zeros(b, m + 1, c, dtype=x.dtype, device=x.device)
    idx = (assignment + 1).unsqueeze(-1).expand(-1, -1, c)
    out.scatter_add_(1, idx, x)
    cnt = member_counts(assignment, m).clamp(min=1).unsqueeze(-1).to(x.dtype)
    return out[:, 1:] / cnt


# ------------------------------------------------------------------------------------------- registry

T = TypeVar("T")
C = TypeVar("C", bound=type)


@dataclass(frozen=True)
class Entry:
    """One thing the library has: its ``kind`` (see :data:`KINDS`), ``name``, the object (a class or a
    factory), a one-line ``summary`` and, for models, the ``family`` that registered it."""

    kind: str
    name: str
    obj: Any
    summary: str
    family: str = ""


#: the kinds of the one registry, in the order ``mmeff list`` prints them
KINDS = ("reducer", "in-tower method", "press", "quantizer", "model", "adapter")
_CATALOGUE: dict[str, dict[str, Entry]] = {k: {} for k in KINDS}


def _summary(obj: Any) -> str:
    doc = (getattr(obj, "description", "") if isinstance(obj, type) else "") or (obj.__doc__ or "")
    return doc.strip().splitlines()[0] if doc.strip() else ""


class Registry(Generic[T]):
    """The entries of one kind of the library's single registry: name -> class (or factory).

    Every ``Registry`` is a view on the same catalogue (:func:`catalogue`), so ``mmeff list`` shows all
    of them; ``label`` is how errors name the kind ("unknown KV-cache press 'x'").
    """

    def __init__(self, kind: str, label: str | None = None) -> None:
        if kind not in _CATALOGUE:
            raise ValueError(f"unknown registry kind {kind!r}; kinds: {', '.join(KINDS)}")
        self.kind, self.label = kind, label or kind
        self._entries = _CATALOGUE[kind]

    def add(self, name: str, obj: Any, *, summary: str | None = None, family: str = "") -> None:
        """Add ``obj`` under ``name``; a name taken by another object (or another family) is refused."""
        old = self._entries.get(name)
        if old is not None and old.obj is not obj and (not family or old.family != family):
            owner = old.family or getattr(old.obj, "__name__", repr(old.obj))
            raise ValueError(f"{self.label} name {name!r} is already registered by {owner}")
        self._entries[name] = Entry(self.kind, name, obj, _summary(obj) if summary is None else summary, family)

    def register(self, name: str) -> Callable[[C], C]:
        """Class decorator adding ``cls`` under ``name`` (and setting ``cls.name``)."""

        def deco(cls: C) -> C:
            old = self._entries.get(name)
            if old is not None and old.obj is not cls:
                raise ValueError(f"{self.label} name {name!r} is already registered by {old.obj.__name__}")
            cls.name = name
            self.add(name, cls)
            return cls

        return deco

    def names(self) -> list[str]:
        """Registered names, sorted."""
        return sorted(self._entries)

    def entries(self) -> list[Entry]:
        """Entries in registration order (adapters are matched in this order)."""
        return list(self._entries.values())

    def get(self, name: str) -> Any:
        """The object registered under ``name``; ``KeyError`` lists the known names."""
        try:
            return self._entries[name].obj
        except KeyError:
            raise KeyError(f"unknown {self.label} {name!r}; known: {', '.join(self.names())}") from None

    def create(self, name: str, **kwargs: Any) -> T:
        """Instantiate the class registered under ``name`` with ``kwargs``."""
        return self.get(name)(**kwargs)


def catalogue(kind: str | None = None) -> list[Entry]:
    """Everything registered (or one ``kind``), kind by kind in :data:`KINDS` order, names sorted
    (adapters keep their matching order)."""
    kinds = KINDS if kind is None else (kind,)
    out: list[Entry] = []
    for k in kinds:
        if k not in _CATALOGUE:
            raise KeyError(f"unknown registry kind {k!r}; kinds: {', '.join(KINDS)}")
        entries = list(_CATALOGUE[k].values())
        out += entries if k == "adapter" else sorted(entries, key=lambda e: e.name)
    return out


REDUCERS: Registry[TokenReducer] = Registry("reducer")
#: methods that run inside the vision tower (ToMe, ToCom, VisToG): configs that ``mmeff.apply`` takes
IN_TOWER: Registry[Any] = Registry("in-tower method")
#: LLM weight/activation quantizers (FlatQuant, GPTQ, RTN): name -> the quantize function
QUANTIZERS: Registry[Any] = Registry("quantizer")
#: adapters in matching order; host adapters (``method_type`` TokenReducer) are found by model, the
#: others by the method they attach (:func:`method_adapter`)
ADAPTERS: Registry[Any] = Registry("adapter")


def method_adapter(method: Any) -> type:
    """The registered adapter class that attaches ``method`` (an in-tower method or a press), found by its
    ``method_type``; lets a method attach itself without importing the adapters package."""
    for entry in ADAPTERS.entries():
        method_type = getattr(entry.obj, "method_type", None)
        if method_type is not None and method_type is not TokenReducer and isinstance(method, method_type):
            return entry.obj
    raise TypeError(f"no adapter attaches {type(method).__name__}")


def attached(method: Any, model: Any) -> Any:
    """``method`` (an in-tower method or a press) attached to ``model`` by its registered adapter; the
    adapter is returned and is a context manager that detaches on exit. Nothing stays attached when
    attaching fails."""
    return attach_cleanly(method_adapter(method)(model, method))


def attach_cleanly(adapter: Any) -> Any:
    """``adapter.attach()``, detaching first whatever it had attached when that fails (nothing half-attached
    stays on the model); returns the adapter."""
    try:
        adapter.attach()
    except BaseException:
        adapter.detach()
        raise
    return adapter


def register(name: str) -> Callable[[C], C]:
    """Class decorator adding a reducer to the registry under ``name`` (used by the CLI and bench)."""
    return REDUCERS.register(name)


def list_reducers() -> list[str]:
    """Registered reducer names, sorted."""
    return REDUCERS.names()


def get_reducer_class(name: str) -> type[TokenReducer]:
    """The class registered under ``name``; ``KeyError`` lists the known names."""
    return REDUCERS.get(name)


def create_reducer(name: str, **kwargs: Any) -> TokenReducer:
    """Instantiate a registered reducer, e.g. ``create_reducer("pool", tokens=64)``."""
    return REDUCERS.create(name, **kwargs)


# ------------------------------------------------------------------------------------------- reducers


# NaN/Inf features are refused before any reduction (cls_attn would keep NaN tokens, pooling would spread
# them): one pass over the tokens and one host sync per call. MMEFF_CHECK_FINITE=0 turns it off.
CHECK_FINITE: bool = os.environ.get("MMEFF_CHECK_FINITE", "1") != "0"


@dataclass
class TokenReducer:
    """Base class: a pure function from tokens ``(B, N, D)`` + context to a :class:`Reduction`.

    Subclasses implement :meth:`reduce`. ``needs`` names the context fields the method requires, so an
    adapter can compute them (e.g. CLS attention) only when asked, and a missing one fails clearly.
    """

    name: ClassVar[str] = "base"
    needs: ClassVar[frozenset[str]] = frozenset()

    def __call__(self, tokens: Tensor, ctx: TokenContext | None = None) -> Reduction:
        """Validate inputs, then reduce ``tokens`` ``(B, N, D)`` → :class:`Reduction` with ``(B, M, D)``."""
        ctx = ctx if ctx is not None else TokenContext()
        if not isinstance(tokens, Tensor):
            raise TypeError(f"tokens must be a torch.Tensor, got {type(tokens).__name__}")
        if tokens.dim() != 3:
            raise ValueError(f"tokens must have shape (B, N, D), got {tuple(tokens.shape)}")
        if not tokens.is_floating_point():
            raise TypeError(f"tokens must be floating point, got {tokens.dtype}")
        if tokens.shape[1] < 1:
            raise ValueError("tokens must have N >= 1 tokens")
        ctx.validate(tokens)
        for need in self.needs:
            if getattr(ctx, need) is None:
                raise ValueError(f"{type(self).__name__} needs context.{need}, which the caller did not provide")
        # meta tensors (FLOP accounting) and traced or compiled graphs have no values to check
        if CHECK_FINITE and tokens.device.type != "meta" and not torch.compiler.is_compiling() \
                and not torch.jit.is_tracing():
            for what, t in (("tokens", tokens), ("context.scores", ctx.scores), ("context.prompt", ctx.prompt)):
                if t is not None and t.is_floating_point() and not bool(torch.isfinite(t).all()):
                    bad = int((~torch.isfinite(t)).sum())
                    raise ValueError(f"{type(self).__name__}: {what} {tuple(t.shape)} hold {bad} NaN/Inf values (the "
                                     f"encoder or its input produced them); a reduction of them would be silently wrong")
        return self.reduce(tokens, ctx)

    def reduce(self, tokens: Tensor, ctx: TokenContext) -> Reduction:
        """Method-specific reduction; inputs are already validated."""
        raise NotImplementedError

    def follow(self, red: Reduction, x: Tensor, ctx: TokenContext) -> Tensor:
        """Reduce ``x`` ``(B, N, C)``, per-token features travelling with the tokens ``red`` came from (e.g.
        Qwen3-VL's DeepStack features), the way ``red`` reduced them → ``(B, M, C)``.

        Selections gather; every other output is its members' mean (over its ``sources`` when set), which
        is what pooling and merging compute. Methods whose outputs are other functions of their inputs
        override this (Fourier-VLM low-passes ``x`` as it does the tokens).
        """
        if x.shape[:2] != red.assignment.shape:
            raise ValueError(f"follow: x {tuple(x.shape)} does not match the reduction's {tuple(red.assignment.shape)} inputs")
        if red.indices is not None:
            return gather_tokens(x, red.indices)
        if red.sources is not None:
            return source_mean(x.float(), red.sources, red.sizes, red.num_tokens).to(x.dtype)
        return group_mean(x.float(), red.assignment, red.num_tokens).to(x.dtype)

    def __iter__(self) -> Iterator[TokenReducer]:
        yield self

    def default_stage(self, host: str) -> str:
        """Where a VLM adapter named ``host`` (e.g. ``"llava"``) runs this method unless told otherwise.

        ``"post_projector"``: on the features the LLM reads. Methods whose paper reduces the encoder's
        output before the projector override this for the hosts where they do (see :data:`STAGES`).
        """
        return "post_projector"

    def describe(self) -> str:
        """Short human-readable form, e.g. ``pool(tokens=64)``. Fields declared with
        ``metadata={"describe": "if_set"}`` appear only when they differ from their default."""
        def fmt(v: Any) -> str:
            return f"{v:.4g}" if isinstance(v, float) else repr(v)

        def shown(f: Any) -> bool:
            v = getattr(self, f.name)
            return f.repr and v is not None and not (f.metadata.get("describe") == "if_set" and v == f.default)

        args = ", ".join(f"{f.name}={fmt(getattr(self, f.name))}" for f in fields(self) if shown(f))
        return f"{self.name}({args})"


@dataclass
class BudgetReducer(TokenReducer):
    """A reducer with a token budget: exactly one of ``tokens`` (M) or ``ratio`` (M/N, in (0, 1]).

    ``ratio`` is the share of tokens **kept**. ``compression_ratio`` (keyword only) is kvpress's convention,
    the share **removed**: ``compression_ratio=0.75`` is ``ratio=0.25`` (it is stored as ``ratio``).
    """

    tokens: int | None = None
    ratio: float | None = None
    compression_ratio: float | None = field(default=None, kw_only=True, repr=False, compare=False)

    def _take_compression_ratio(self) -> None:
        c = self.compression_ratio
        if c is None:
            return
        if self.ratio is not None:
            raise ValueError(f"{type(self).__name__}: give ratio= (share kept) or compression_ratio= (share removed), "
                             "not both")
        if not isinstance(c, numbers.Real) or isinstance(c, bool) or not (0.0 <= float(c) < 1.0):
            raise ValueError(f"compression_ratio (share of tokens removed) must be in [0, 1), got {c!r}")
        self.ratio, self.compression_ratio = 1.0 - float(c), None

    def __post_init__(self) -> None:
        self._take_compression_ratio()
        if (self.tokens is None) == (self.ratio is None):
            raise ValueError(f"{type(self).__name__}: give exactly one of tokens= or ratio=")
        if self.tokens is not None and (not isinstance(self.tokens, numbers.Real) or isinstance(self.tokens, bool)
                                        or int(self.tokens) != self.tokens):
            raise TypeError(f"tokens must be an int, got {self.tokens!r}")
        # a string ("0.5", e.g. from a config file) would otherwise fail later inside a comparison
        if self.ratio is not None and (not isinstance(self.ratio, numbers.Real) or isinstance(self.ratio, bool)):
            raise TypeError(f"ratio must be a number in (0, 1], got {self.ratio!r} ({type(self.ratio).__name__})")
        if self.tokens is not None and self.tokens < 1:
            raise ValueError(f"token budget must be >= 1, got {self.tokens}")
        if self.ratio is not None and not (0.0 < self.ratio <= 1.0):
            raise ValueError(f"ratio must be in (0, 1], got {self.ratio}")

    def budget(self, n: int) -> int:
        """Number of output tokens for ``n`` inputs; a budget above ``n`` is an error, not a silent clamp."""
        if self.tokens is not None:
            if self.tokens > n:
                raise ValueError(f"{type(self).__name__}: budget tokens={self.tokens} exceeds the {n} tokens given")
            return int(self.tokens)
        return max(1, int(round(n * float(self.ratio))))


def pool_grid_shape(h: int, w: int, m: int) -> tuple[int, int]:
    """The ``(h', w')`` with ``h' * w' == m``, ``h' <= h``, ``w' <= w`` whose aspect is closest to ``h / w``."""
    best: tuple[float, tuple[int, int]] | None = None
    for hh in range(1, min(h, m) + 1):
        if m % hh:
            continue
        ww = m // hh
        if ww > w:
            continue
        err = abs(math.log((hh / ww) / (h / w)))
        if best is None or err < best[0]:
            best = (err, (hh, ww))
    if best is None:
        raise ValueError(f"no {m}-token grid fits inside a {h}x{w} grid; pick a budget of the form h'*w' with h'<={h}, w'<={w}")
    return best[1]


def _bins(size: int, out: int) -> Tensor:
    return torch.div(torch.arange(size) * out, size, rounding_mode="floor")


def grid_cells(grid: Grid, out_hw: tuple[int, int]) -> Tensor:
    """Output cell of every input token when each frame of ``grid`` shrinks to ``out_hw``: ``(N,)`` long.

    Cells are contiguous, non-overlapping bins (unlike ``adaptive_avg_pool2d``'s overlapping windows), so
    every input token belongs to exactly one output token and positions/sizes stay well defined. Output
    index ``f * h' * w' + i * w' + j`` for frame ``f``, row bin ``i``, column bin ``j``.
    """
    t, h, w = (1, *grid) if len(grid) == 2 else grid
    hh, ww = out_hw
    cell = (_bins(h, hh)[:, None] * ww + _bins(w, ww)[None, :]).reshape(-1)
    return (torch.arange(t)[:, None] * (hh * ww) + cell[None, :]).reshape(-1)


@dataclass
class GridReducer(BudgetReducer):
    """A reducer that shrinks each frame's patch grid ``(H, W)`` to a smaller grid ``(h', w')``.

    Give exactly one of:

    - ``tokens``: total output tokens M (for ``(T, H, W)`` grids a multiple of T); each frame gets the
      ``h' * w' = M / T`` grid closest in aspect to ``H / W`` (:func:`pool_grid_shape`);
    - ``ratio``: M as a fraction of N, shaped the same way;
    - ``out_grid``: ``(h', w')`` per frame directly;
    - ``axis_ratio``: per-axis keep ratio, ``h' = max(int(H * r), 1)`` (Fourier-VLM's Qwen2-VL rule, which
      keeps about r**2 of the tokens and works on any grid size).

    A grid larger than the input is a ``ValueError``, never a silent clamp.
    """

    out_grid: tuple[int, int] | None = None
    axis_ratio: float | None = None
    needs = frozenset({"grid"})

    def __post_init__(self) -> None:
        self._take_compression_ratio()
        given = [k for k in ("tokens", "ratio", "out_grid", "axis_ratio") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(
                f"{type(self).__name__}: give exactly one of tokens=, ratio=, out_grid= or axis_ratio= (got {given or 'none'})"
            )
        if self.out_grid is not None:
            og = tuple(self.out_grid)
            if len(og) != 2 or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in og):
                raise ValueError(f"out_grid must be (h, w) of positive ints, got {self.out_grid}")
            self.out_grid = (int(og[0]), int(og[1]))
        elif self.axis_ratio is not None:
            if not isinstance(self.axis_ratio, numbers.Real) or isinstance(self.axis_ratio, bool):
                raise TypeError(f"axis_ratio must be a number in (0, 1], got {self.axis_ratio!r}")
            if not (0.0 < float(self.axis_ratio) <= 1.0):
                raise ValueError(f"axis_ratio must be in (0, 1], got {self.axis_ratio}")
        else:
            super().__post_init__()

    def target(self, grid: Grid) -> tuple[int, int]:
        """Output grid ``(h', w')`` per frame for an input ``grid`` ``(H, W)`` or ``(T, H, W)``."""
        t, h, w = (1, *grid) if len(grid) == 2 else grid
        if self.out_grid is not None:
            hh, ww = self.out_grid
            if hh > h or ww > w:
                raise ValueError(f"{type(self).__name__}: out_grid {self.out_grid} is larger than the {h}x{w} input grid")
            return hh, ww
        if self.axis_ratio is not None:
            r = float(self.axis_ratio)
            return max(int(h * r), 1), max(int(w * r), 1)
        m = self.budget(t * h * w)
        if m % t:
            raise ValueError(f"{type(self).__name__}: budget {m} is not a multiple of the {t} frames")
        return pool_grid_shape(h, w, m // t)

    def out_grid_for(self, grid: Grid) -> Grid:
        """The reduced grid: ``(h', w')`` or ``(T, h', w')`` matching the input's form."""
        hh, ww = self.target(grid)
        return (hh, ww) if len(grid) == 2 else (grid[0], hh, ww)


@dataclass
class ScoreTopK(BudgetReducer):
    """Keep the top-M tokens by :meth:`score`, in their original order (kvpress's ``ScorerPress``)."""

    def score(self, tokens: Tensor, ctx: TokenContext) -> Tensor:
        """Importance per token ``(B, N)``; higher is kept."""
        raise NotImplementedError

    def reduce(self, tokens: Tensor, ctx: TokenContext) -> Reduction:
        n = tokens.shape[1]
        m = self.budget(n)
        if m == n:
            return Reduction.identity(tokens, ctx.grid)
        scores = self.score(tokens, ctx)
        return Reduction.from_indices(tokens, topk_indices_sorted(scores, m))


@dataclass
class Compose(TokenReducer):
    """Run reducers in sequence (e.g. frame sampling, then spatial pooling); bookkeeping is end-to-end."""

    reducers: Sequence[TokenReducer] = ()
    name: ClassVar[str] = "compose"

    def __post_init__(self) -> None:
        flat: list[TokenReducer] = []
        for r in self.reducers:
            if not isinstance(r, TokenReducer):
                raise TypeError(f"Compose takes TokenReducer instances, got {type(r).__name__}")
            flat.extend(r.reducers if isinstance(r, Compose) else [r])
        if not flat:
            raise ValueError("Compose needs at least one reducer")
        self.reducers = tuple(flat)

    @property
    def needs(self) -> frozenset[str]:  # type: ignore[override]
        return frozenset().union(*(r.needs for r in self.reducers))

    def __call__(self, tokens: Tensor, ctx: TokenContext | None = None) -> Reduction:
        ctx = ctx if ctx is not None else TokenContext()
        out: Reduction | None = None
        for r in self.reducers:
            step = r(tokens if out is None else out.tokens, ctx)
            out = step if out is None else out.then(step)
            # later reducers see the reduced tokens: carry the grid and remap scores
            scores = None
            if ctx.scores is not None and step.indices is not None:
                scores = ctx.scores.gather(1, step.indices)
            elif ctx.scores is not None:
                scores = group_mean(ctx.scores.unsqueeze(-1), step.assignment, step.num_tokens).squeeze(-1)
            ctx = replace(ctx, grid=step.grid, scores=scores)
        assert out is not None
        return out

    def follow(self, red: Reduction, x: Tensor, ctx: TokenContext) -> Tensor:
        own = [r for r in self.reducers if type(r).follow is not TokenReducer.follow]
        if own:
            raise ValueError(f"{self.describe()}: {own[0].describe()} reduces companion features its own way, "
                             "which a composition cannot chain; apply it alone")
        return super().follow(red, x, ctx)

    def __iter__(self) -> Iterator[TokenReducer]:
        yield from self.reducers

    def default_stage(self, host: str) -> str:
        stages = {r.default_stage(host) for r in self.reducers}
        if len(stages) > 1:
            raise ValueError(f"composed reducers default to different stages {sorted(stages)} on {host}; pass stage= explicitly")
        return stages.pop()

    def describe(self) -> str:
        return " + ".join(r.describe() for r in self.reducers)


def compose(*reducers: TokenReducer) -> TokenReducer:
    """One reducer from several (returns the single one unchanged)."""
    if len(reducers) == 1:
        if not isinstance(reducers[0], TokenReducer):
            raise TypeError(f"expected a TokenReducer, got {type(reducers[0]).__name__}")
        return reducers[0]
    return Compose(reducers)
