"""The one training loop of mmeff's trainers, and the config base they share.

:func:`train_steps` runs ``cfg.steps`` optimiser steps of a loss function. Three ways to feed it:

* by default, a dataset whose item ``i`` is a pure function of ``i``: step ``s`` reads items
  ``s * B * world + rank * B + j`` with ``B = batch * grad_accum`` (:class:`StepSampler`);
* ``shuffle=True``: epoch-wise reshuffled passes over a finite dataset (a folder of clips), epoch ``e``'s
  order a pure function of ``seed + e`` and sharded over ranks as ``DistributedSampler`` does
  (:class:`EpochSampler`), with a hook before each epoch's loader starts;
* ``batched=True``: the caller's own re-iterable of ready batches (a ``DataLoader``, a list), one pass an
  epoch (ToCom's self-distillation, VisToG's stages).

Each way ``resume=True`` continues bit-for-bit from ``out_dir/last.pt`` with no data state to save (given
a pass of the caller's batches that is a function of its epoch). ``out_dir=None`` runs without files.

What stands on ``accelerate`` / ``transformers``:

* one ``accelerate.Accelerator`` per call: ``prepare`` of the model, optimiser and scheduler (DDP under
  ``torchrun`` or ``accelerate launch``, NCCL on CUDA, Gloo on CPU); ``Accelerator.accumulate`` +
  ``backward`` for gradient accumulation (``cfg.grad_accum`` micro-batches of ``cfg.batch_size`` per
  optimiser step: the loss is divided by ``grad_accum``, DDP syncs on the last micro-batch only);
  ``autocast`` (and the fp16 grad scaler on CUDA) for ``cfg.mixed_precision`` ``"bf16"`` (CPU too) or
  ``"fp16"``; ``clip_grad_norm_``; ``is_main_process`` for logging and saving; ``skip_first_batches`` when
  a run resumes inside an epoch of a caller's ``DataLoader`` (it does not load the batches it skips).
  The precision and accumulation come from the config, not from ``accelerate launch`` flags, so a resumed
  run trains as the saved one did.
* the default schedule is transformers' ``get_cosine_with_min_lr_schedule_with_warmup`` (what
  ``get_scheduler("cosine_with_min_lr")`` builds; :func:`lr_at` is its value at a step, float for float);
  a caller's ``lr_schedule(step)`` runs as a torch ``LRScheduler``, prepared and stepped the same way.

What mmeff keeps, and why:

* the state file. ``accelerator.save_state`` writes a folder (``optimizer.bin``, ``scheduler.bin``,
  sampler ``.bin``, ``random_states_*.pkl`` holding numpy's RNG as an array, ``scaler.pt``) with plain
  ``torch.save``, file by file, with no atomic rename; its ``load_state`` reads them with
  ``weights_only=True`` only after allowing numpy's globals, and a custom object registered for
  checkpointing is a pickle of its own. So the loop keeps one ``last.pt`` written atomically by
  :func:`mmeff.checkpoint.save_state` and read by :func:`mmeff.checkpoint.load_state` (``weights_only=True``,
  no globals allowed: nothing is unpickled), filled from the accelerator's objects (the unwrapped model's,
  the optimiser's, the scheduler's and the grad scaler's ``state_dict``) and the torch / CUDA / numpy /
  Python RNG states as tensors and plain numbers (what ``save_state`` would have saved, minus the pickles).
* the samplers. The data of a step is a pure function of the step (and epoch), sharded by rank here, so
  exact resume needs no data state; the index-based loaders are not ``prepare``-d (accelerate would shard
  them a second time, and its prepared loaders draw their own seeds), and moving a batch to the device
  stays with ``loss_fn`` (it gets ``device``).

Differences from the hand-written loop before it: the default warm-up is transformers' (step ``s`` of
``warmup_steps`` trains at ``lr * s / warmup_steps``, so step 0 at 0, where the old ``lr_at`` gave
``lr * (s + 1) / warmup_steps``); after the warm-up the curve is the old one (cosine from ``lr`` to
``min_lr``, equal to rounding). A step short of micro-batches (the last of an epoch) weighs each by its
share of the step's items (index-based feeds: the same gradient as one batch of them) or equally (the
caller's batches). Files of the old loop still resume (the rates come from the step, not from the file).

:class:`BaseTrainConfig` holds the settings every trainer has (batch size, learning rate, weight decay,
clipping, loader workers, seed, gradient accumulation, mixed precision) with
:meth:`~BaseTrainConfig.to_dict` / :meth:`~BaseTrainConfig.from_dict`; :class:`StepTrainConfig` adds the step
schedule. Resuming checks the saved config against the current one.
"""

from __future__ import annotations

import itertools
import json
import math
import random
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence, Sized
from dataclasses import asdict, dataclass, fields, is_dataclass
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from mmeff.checkpoint import load_state, save_state, write_text_atomic

__all__ = ["BaseTrainConfig", "EpochSampler", "StepSampler", "StepTrainConfig", "config_dict", "lr_at",
           "train_steps"]

T = TypeVar("T", bound="BaseTrainConfig")

#: the ``mixed_precision`` values the loop accepts (accelerate's, less fp8, which needs extra packages)
MIXED_PRECISION = ("no", "bf16", "fp16")


@dataclass(kw_only=True)
class BaseTrainConfig:
    """The settings every mmeff trainer shares. Subclasses add their own (``@dataclass(kw_only=True)``,
    redeclaring a field to change its default).

    ``grad_accum``: micro-batches of ``batch_size`` per optimiser step (per rank); ``mixed_precision``:
    ``"no"``, ``"bf16"`` or ``"fp16"`` (accelerate's autocast; fp16 with a grad scaler, CUDA only).

    ``resume_may_change``: fields a resumed run may set differently from the saved run (they do not change
    the trajectory, or lengthen / shorten it); any other difference refuses to resume."""

    batch_size: int = 8
    lr: float = 1e-3
    weight_decay: float = 0.0
    clip_grad: float = 1.0  # max gradient norm; 0: no clipping
    workers: int = 0  # DataLoader worker processes
    seed: int = 0
    grad_accum: int = 1
    mixed_precision: str = "no"

    resume_may_change: ClassVar[frozenset[str]] = frozenset({"workers", "save_every", "steps"})

    @classmethod
    def saved_before(cls, data: Mapping[str, Any]) -> dict[str, Any]:
        """Values of fields a saved ``data`` lacks because it predates them: what that older run trained
        with, so resuming it is compared against its real settings (default: none, fields take their
        defaults). :meth:`from_dict` fills them in."""
        return {}

    def to_dict(self) -> dict[str, Any]:
        """The fields as a JSON-safe dict (tuples as lists)."""
        return {f.name: list(v) if isinstance(v := getattr(self, f.name), tuple) else v for f in fields(self)}

    @classmethod
    def from_dict(cls: type[T], data: Mapping[str, Any]) -> T:
        """The config of a :meth:`to_dict` dict (lists back to tuples); fields it lacks take
        :meth:`saved_before`'s values, else their defaults. One-line ``ValueError`` for a key that is not
        a field."""
        if not isinstance(data, Mapping):
            raise ValueError(f"a {cls.__name__} is read from a dict, got {type(data).__name__}")
        data = {**cls.saved_before(data), **data}
        known = {f.name for f in fields(cls) if f.init}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown {cls.__name__} fields {unknown}; known: {sorted(known)}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})


@dataclass(kw_only=True)
class StepTrainConfig(BaseTrainConfig):
    """A step-counted run for :func:`train_steps`: ``steps`` optimiser steps, linear warm-up over
    ``warmup_steps`` then cosine decay to ``min_lr`` (transformers' schedule, :func:`lr_at`), ``last.pt``
    every ``save_every``."""

    steps: int = 1000
    min_lr: float = 1e-5
    warmup_steps: int = 50
    save_every: int = 100


def config_dict(cfg: Any) -> dict[str, Any]:
    """``cfg.to_dict()`` for a :class:`BaseTrainConfig`, ``asdict`` for another dataclass config."""
    if isinstance(cfg, BaseTrainConfig):
        return cfg.to_dict()
    if is_dataclass(cfg) and not isinstance(cfg, type):
        return asdict(cfg)
    raise TypeError(f"a training config is a dataclass, got {type(cfg).__name__}")


def check_resume_config(saved: Any, cfg: Any, ckpt: Path) -> None:
    """Refuse (one-line ``ValueError`` naming ``ckpt``) to resume a run saved with ``saved`` (its config
    dict) under ``cfg`` when ``cfg`` is a :class:`BaseTrainConfig` and they differ outside
    ``resume_may_change``, or ``saved`` is not a config of ``cfg``'s class. Other configs are not checked."""
    if not isinstance(cfg, BaseTrainConfig) or saved is None:
        return
    hint = "train into another folder, or start over without resuming"
    try:
        before = type(cfg).from_dict(saved).to_dict()
    except (TypeError, ValueError) as e:
        raise ValueError(f"{ckpt} was saved by another kind of run ({str(e).splitlines()[0]}); {hint}") from None
    now = cfg.to_dict()
    changed = [k for k in now if now[k] != before[k] and k not in cfg.resume_may_change]
    if changed:
        diff = ", ".join(f"{k} {before[k]!r} -> {now[k]!r}" for k in changed)
        raise ValueError(f"{ckpt} holds a run with other settings ({diff}); {hint}")


def lr_at(step: int, cfg: StepTrainConfig) -> float:
    """Learning rate of ``step`` under the loop's default schedule, transformers'
    ``get_cosine_with_min_lr_schedule_with_warmup`` (the same arithmetic, so the same floats): linear warm-up
    ``lr * step / warmup_steps``, then cosine from ``lr`` to ``min_lr`` at ``steps``."""
    warm, total = cfg.warmup_steps, cfg.steps
    if step < warm:
        factor = float(step) / float(max(1, warm))
    else:
        progress = min(1.0, float(step - warm) / float(max(1, total - warm)))
        rate = _min_lr_rate(cfg)
        factor = 0.5 * (1.0 + math.cos(math.pi * 0.5 * 2.0 * progress)) * (1 - rate) + rate
    return cfg.lr * max(0, factor)


def _min_lr_rate(cfg: Any) -> float:
    return cfg.min_lr / cfg.lr if cfg.lr else 0.0


class StepSampler(torch.utils.data.Sampler[int]):
    """Indices of steps ``[start, stop)`` for one rank: step ``s`` takes ``s*B*world + rank*B + j``."""

    def __init__(self, start: int, stop: int, batch: int, rank: int, world: int) -> None:
        self.start, self.stop, self.batch, self.rank, self.world = start, stop, batch, rank, world

    def __iter__(self) -> Iterator[int]:
        for s in range(self.start, self.stop):
            base = (s * self.world + self.rank) * self.batch
            yield from range(base, base + self.batch)

    def __len__(self) -> int:
        return (self.stop - self.start) * self.batch


class EpochSampler(torch.utils.data.Sampler[list[int]]):
    """Batches (lists of indices) of steps ``[start, stop)`` of epoch-wise shuffled passes over ``n`` items,
    for one rank: epoch ``e`` is ``randperm(n)`` drawn from ``seed + e``, padded by its first items to a
    multiple of ``world`` and dealt ``rank::world`` (``DistributedSampler``'s sharding), then cut into
    batches of ``batch`` (the last of an epoch may be smaller). Step ``s`` is batch ``s % steps_per_epoch``
    of epoch ``s // steps_per_epoch``."""

    def __init__(self, n: int, batch: int, start: int, stop: int, rank: int, world: int, seed: int) -> None:
        if n < 1 or batch < 1:
            raise ValueError(f"EpochSampler needs n >= 1 items and batch >= 1, got {n}, {batch}")
        self.n, self.batch, self.start, self.stop = n, batch, start, stop
        self.rank, self.world, self.seed = rank, world, seed
        self.per_epoch = self.steps_per_epoch(n, batch, world)

    @staticmethod
    def steps_per_epoch(n: int, batch: int, world: int = 1) -> int:
        """Steps of one pass over ``n`` items in batches of ``batch`` on each of ``world`` ranks."""
        per_rank = -(-n // world)  # ceil: DistributedSampler pads the last round
        return -(-per_rank // batch)

    def epoch_indices(self, epoch: int) -> list[int]:
        """This rank's items of ``epoch``, in order."""
        order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + epoch)).tolist()
        total = -(-self.n // self.world) * self.world
        order += (order * math.ceil(total / self.n))[: total - self.n]
        return order[self.rank:total:self.world]

    def __iter__(self) -> Iterator[list[int]]:
        epoch, items = -1, []
        for s in range(self.start, self.stop):
            if s // self.per_epoch != epoch:
                epoch = s // self.per_epoch
                items = self.epoch_indices(epoch)
            j = s % self.per_epoch
            yield items[j * self.batch:(j + 1) * self.batch]

    def __len__(self) -> int:
        return self.stop - self.start


class _RateSchedule(torch.optim.lr_scheduler.LRScheduler):
    """A caller's ``lr_schedule(step)`` (one rate for every parameter group, or one per group) as a torch
    scheduler, so accelerate prepares and steps it like any other; ``raw`` is what it last returned."""

    def __init__(self, optimizer: torch.optim.Optimizer,
                 rates: Callable[[int], float | Sequence[float]]) -> None:
        self.rates, self.raw = rates, None
        super().__init__(optimizer)

    def get_lr(self) -> list[float]:  # noqa: D102
        self.raw = got = self.rates(self.last_epoch)
        groups = len(self.optimizer.param_groups)
        out = [got] * groups if isinstance(got, (int, float)) else list(got)
        if len(out) != groups:
            raise ValueError(f"lr_schedule gave {len(out)} rates for {groups} parameter groups")
        return out

    def state_dict(self) -> dict[str, Any]:  # noqa: D102
        # the caller's function is code, not state: it is given again when resuming
        return {k: v for k, v in super().state_dict().items() if k not in ("rates", "raw")}


def _seek(schedule: torch.optim.lr_scheduler.LRScheduler, step: int) -> None:
    """Put ``schedule`` at ``step`` and set that step's rates on the optimiser (a pure function of the step,
    so a resumed run gets the same floats as an uninterrupted one)."""
    with warnings.catch_warnings():  # "scheduler.step() before optimizer.step()": on purpose here
        warnings.simplefilter("ignore", UserWarning)
        schedule.last_epoch = step - 1
        schedule.step()


def _accelerator(mixed_precision: str, grad_accum: int, cpu: bool, find_unused_parameters: bool) -> Any:
    """An ``Accelerator`` for one :func:`train_steps` call. accelerate keeps its state process-wide and
    refuses a second ``Accelerator`` with another precision or device; a single process resets it (a run
    under ``torchrun`` keeps its process group and must keep one setting)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedDataParallelKwargs, GradientAccumulationPlugin

    if AcceleratorState._shared_state:
        state = AcceleratorState()
        if state.mixed_precision != mixed_precision or (state.device.type == "cpu") != cpu:
            AcceleratorState._reset_state(reset_partial_state=PartialState().num_processes == 1)
    elif PartialState._shared_state and PartialState().num_processes == 1 \
            and (PartialState().device.type == "cpu") != cpu:
        PartialState._reset_state()
    return Accelerator(
        mixed_precision=mixed_precision, cpu=cpu, device_placement=False,
        # sync_with_dataloader off: the loop counts micro-batches itself (no prepared loader to watch)
        gradient_accumulation_plugin=GradientAccumulationPlugin(num_steps=grad_accum,
                                                                sync_with_dataloader=False),
        # the scheduler steps once per optimiser step on every rank: the schedule counts steps, not samples
        step_scheduler_with_optimizer=False,
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=find_unused_parameters)])


def _rng_state(device: torch.device) -> dict[str, Any]:
    """Torch / CUDA / numpy / Python RNG states as tensors and plain numbers (read back without pickle)."""
    _, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
            "np_rng": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "gauss": float(gauss)},
            "py_rng": {"state": list(random.getstate()[1]), "gauss": random.getstate()[2]}}


def _set_rng_state(state: Mapping[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["rng"].cpu())
    if device.type == "cuda" and state.get("cuda_rng") is not None:
        torch.cuda.set_rng_state(state["cuda_rng"].cpu(), device)
    if state.get("np_rng") is not None:  # older files (the hand-written loop's) hold the torch RNG only
        s = state["np_rng"]
        keys = s["keys"].numpy().astype(np.uint32)
        np.random.set_state(("MT19937", keys, s["pos"], s["has_gauss"], s["gauss"]))
    if state.get("py_rng") is not None:
        random.setstate((3, tuple(int(v) for v in state["py_rng"]["state"]), state["py_rng"]["gauss"]))


def _shares(sizes: Sequence[int], k: int) -> list[float]:
    """Loss weights of a step's micro-batches of ``sizes`` items: ``backward`` divides by ``k``, so a full
    step (``k`` equal micro-batches) weighs each by exactly 1 and a short one by its share of the items."""
    total = sum(sizes)
    return [k * n / total for n in sizes]


def train_steps(
    model: nn.Module,
    dataset: torch.utils.data.Dataset | Iterable[Any],
    out_dir: str | Path | None,
    cfg: StepTrainConfig,
    loss_fn: Callable[[nn.Module, Any, int, torch.device], dict[str, Tensor]],
    *,
    resume: bool = True,
    stop_after: int | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
    ddp_forward: bool = True,
    find_unused_parameters: bool = False,
    history_extra: dict[str, Any] | None = None,
    length_hint: str = "length",
    collate_fn: Callable[[list[Any]], Any] | None = None,
    trainable_only: bool = False,
    steps: int | None = None,
    save_every: int | None = None,
    optimizer: Callable[[nn.Module], torch.optim.Optimizer] | None = None,
    lr_schedule: Callable[[int], float | Sequence[float]] | None = None,
    shuffle: bool = False,
    on_epoch: Callable[[int], None] | None = None,
    on_log: Callable[[int, dict[str, float], dict[str, Any]], str | None] | None = None,
    batched: bool = False,
    device: torch.device | str | None = None,
    reseed: bool = True,
    checkpoint: str = "last.pt",
    desc: str = "train",
) -> dict[str, Any]:
    """Run ``cfg.steps`` steps of ``loss_fn(net, batch, step, device) -> {"loss": ..., other parts}``.

    ``cfg``: a :class:`StepTrainConfig` (or any dataclass with its fields; ``grad_accum`` and
    ``mixed_precision`` may be missing: 1 and ``"no"``). A step takes ``cfg.grad_accum`` micro-batches of
    ``cfg.batch_size`` (``loss_fn`` runs once per micro-batch, with the step's index), under accelerate's
    autocast when ``cfg.mixed_precision`` asks. ``net`` is the DDP-wrapped model under ``torchrun`` /
    ``accelerate launch`` when ``ddp_forward`` (the loss calls its forward, so DDP averages the gradients);
    otherwise the bare model, and the gradients are averaged here. ``stop_after``: return after that many
    steps of this call (the schedule stays that of ``cfg.steps``; a later call resumes). Returns the history
    ``{"config", "log": [{"step", <part means>, "lr", "seconds"}], "step", "train_seconds", **history_extra}``
    (``seconds``: since this call started; ``train_seconds``: all calls together). Without ``shuffle`` the
    dataset must hold ``steps * batch * grad_accum * world`` items. Only parameters with ``requires_grad``
    train; ``trainable_only`` saves only those in ``last.pt`` (a model with a large frozen part, e.g. a VLM's
    language model).

    For a run counted otherwise (a config in epochs): ``steps`` / ``save_every`` replace ``cfg.steps`` /
    ``cfg.save_every``; ``optimizer(model)`` replaces Adam over the trainable parameters and
    ``lr_schedule(step)`` replaces the warm-up + cosine schedule (:func:`lr_at`) (a rate set on every
    parameter group, or a sequence of rates, one per group). ``shuffle``: feed epoch-wise shuffled passes
    over the dataset (:class:`EpochSampler`, steps of ``cfg.batch_size * cfg.grad_accum`` items per rank);
    ``on_epoch(epoch)`` runs before each epoch's loader starts, so its workers see what it sets.
    ``batched``: ``dataset`` is a sized re-iterable of ready batches (a ``DataLoader``, a list of batches;
    under DDP it shards itself), each a micro-batch: an epoch is one pass of ``len(dataset)`` batches,
    ``ceil(len / grad_accum)`` steps, after ``on_epoch(epoch)`` and ``dataset.set_epoch(epoch)`` when it has
    one (as a ``DistributedSampler`` wants); a run resumed inside an epoch skips the batches it already took
    (``accelerate.skip_first_batches`` for a ``DataLoader``, which does not load them). ``on_log(step, row,
    history)`` runs on every rank each time a log row (part means since the last one) is recorded, before
    ``last.pt`` is written; it may add to ``history``, and the main process logs the text it returns
    (instead of the loop's closing summary line).

    For a trainer called inside a larger recipe: ``out_dir=None`` writes no files and never resumes;
    ``device`` is the device ``loss_fn`` gets, and the model stays where the caller put it (default: the
    accelerator's, CUDA ``LOCAL_RANK`` or the CPU, and the model is moved there); ``reseed=False`` keeps the
    caller's global RNG instead of seeding it from ``cfg.seed``; ``checkpoint`` names the state file in
    ``out_dir``; ``desc`` labels the progress bar."""
    out = Path(out_dir) if out_dir is not None else None
    total = cfg.steps if steps is None else steps
    every = cfg.save_every if save_every is None else save_every
    k = getattr(cfg, "grad_accum", 1)
    precision = getattr(cfg, "mixed_precision", "no")
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"grad_accum is a whole number of micro-batches >= 1, got {k!r}")
    if precision not in MIXED_PRECISION:
        raise ValueError(f"mixed_precision is one of {list(MIXED_PRECISION)}, got {precision!r}")
    if device is None:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        move = True
    else:
        move = False
    device = torch.device(device)
    accelerator = _accelerator(precision, k, device.type == "cpu", find_unused_parameters)
    rank, world = accelerator.process_index, accelerator.num_processes
    main = accelerator.is_main_process
    if move:
        device = accelerator.device  # cuda:LOCAL_RANK under torchrun
        model.to(device)
    b = cfg.batch_size
    per_epoch = 0  # steps
    if batched:
        if not isinstance(dataset, Sized):
            raise TypeError(f"batched data must have a len (its batches per epoch), "
                            f"got {type(dataset).__name__}")
        if len(dataset) < 1:
            raise ValueError("the data holds no batches")
        per_epoch = -(-len(dataset) // k)
    elif shuffle:
        if len(dataset) < 1:
            raise ValueError("the dataset is empty")
        per_epoch = EpochSampler.steps_per_epoch(len(dataset), b * k, world)
    else:
        need = total * b * k * world
        if len(dataset) < need:
            accum = f" x {k} micro-batches" if k > 1 else ""
            raise ValueError(f"dataset has {len(dataset)} items; {total} steps of {b}{accum} x {world} "
                             f"ranks need {need} (give the dataset {length_hint}={need})")
    if main and out is not None:
        out.mkdir(parents=True, exist_ok=True)
    if reseed:
        torch.manual_seed(cfg.seed)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters (every requires_grad is False)")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    opt = optimizer(model) if optimizer is not None else torch.optim.Adam(params, lr=cfg.lr,
                                                                          weight_decay=cfg.weight_decay)
    if lr_schedule is None:
        from transformers import get_cosine_with_min_lr_schedule_with_warmup

        schedule: torch.optim.lr_scheduler.LRScheduler = get_cosine_with_min_lr_schedule_with_warmup(
            opt, cfg.warmup_steps, total, min_lr_rate=_min_lr_rate(cfg))
    else:
        schedule = _RateSchedule(opt, lr_schedule)
    had_forward = "forward" in model.__dict__
    net, opt_, sched_ = accelerator.prepare(model, opt, schedule)
    try:
        config = config_dict(cfg)
        history: dict[str, Any] = {"config": config, "log": [], "step": 0, **(history_extra or {})}
        ckpt = out / checkpoint if out is not None else None
        start = 0
        if resume and ckpt is not None and ckpt.is_file():
            state = load_state(ckpt, map_location=device)
            lacks = sorted({"model", "optimizer", "rng", "history", "step"} - set(state))
            if lacks:
                raise ValueError(f"{ckpt} is not a checkpoint of this loop (it lacks {lacks}; an older "
                                 f"mmeff's?); train into another folder or start over without resuming")
            try:
                if trainable_only:
                    missing = trainable - set(state["model"])
                    if missing:
                        raise RuntimeError(f"trainable parameters missing from the checkpoint: "
                                           f"{sorted(missing)[:4]}")
                    model.load_state_dict(state["model"], strict=False)
                else:
                    model.load_state_dict(state["model"])
            except RuntimeError as e:
                raise ValueError(f"{ckpt} holds another model configuration; train into another folder or "
                                 f"start over without resuming ({str(e).splitlines()[0]})") from e
            check_resume_config(state.get("history", {}).get("config"), cfg, ckpt)
            opt_.load_state_dict(state["optimizer"])
            if state.get("scheduler") is not None:
                sched_.load_state_dict(state["scheduler"])
            if state.get("scaler") is not None and accelerator.scaler is not None:
                accelerator.scaler.load_state_dict(state["scaler"])
            _set_rng_state(state, device)
            history, start = state["history"], state["step"]
            if isinstance(cfg, BaseTrainConfig):  # checked above: only resume_may_change fields can differ
                history["config"] = config
            log(f"resumed from {ckpt} at step {start}"
                + (f" (epoch {start // per_epoch})" if per_epoch else ""))
        # the rates of step `start` from the current schedule (files without a scheduler state, a longer run)
        _seek(schedule, start)
        base_seconds = float(history.get("train_seconds", 0.0))  # over all calls, for reports of resumed runs
        stop = total if stop_after is None else min(total, start + stop_after)
        if start >= stop:
            return history

        def epochs() -> Iterator[tuple[int, int, int]]:
            # (epoch, first step, end step) of the epochs this call runs, after on_epoch
            for epoch in range(start // per_epoch, (stop - 1) // per_epoch + 1):
                if on_epoch is not None:
                    on_epoch(epoch)
                yield epoch, max(start, epoch * per_epoch), min(stop, (epoch + 1) * per_epoch)

        def one_pass(epoch: int, a: int, z: int) -> Iterator[list[tuple[Any, float]]]:
            # the steps of a pass of the caller's batches; a resumed epoch skips the batches it already took
            if callable(getattr(dataset, "set_epoch", None)):
                dataset.set_epoch(epoch)
            n_all = len(dataset)
            skip, take = (a - epoch * per_epoch) * k, min(n_all, (z - epoch * per_epoch) * k)
            source: Iterable[Any] = dataset
            if skip and type(dataset) is torch.utils.data.DataLoader:
                source = accelerator.skip_first_batches(dataset, skip)  # does not load the batches it skips
            else:
                source = itertools.islice(dataset, skip, None)
            it, n = iter(source), skip
            for first in range(skip, take, k):
                group = list(itertools.islice(it, min(k, take - first)))
                n += len(group)
                if len(group) < min(k, take - first):
                    break
                yield [(batch, w) for batch, w in zip(group, _shares([1] * len(group), k))]
            else:
                return
            raise ValueError(f"the data yielded {n} batches in epoch {epoch}; its len says {n_all}")

        def index_steps(loader: Iterable[Any], sizes: Iterable[Sequence[int]]
                        ) -> Iterator[list[tuple[Any, float]]]:
            # group a loader's micro-batches into steps: `sizes` holds each step's micro-batch sizes
            it = iter(loader)
            for step_sizes in sizes:
                yield [(next(it), w) for w in _shares(step_sizes, k)]

        def feed() -> Iterator[list[tuple[Any, float]]]:
            # the loaders get their own generators: drawing their base seeds from the global RNG would shift
            # every later random draw of a resumed run
            if batched:
                for epoch, a, z in epochs():
                    yield from one_pass(epoch, a, z)
            elif not shuffle:
                loader = torch.utils.data.DataLoader(
                    dataset, batch_size=b, sampler=StepSampler(start, stop, b * k, rank, world),
                    num_workers=cfg.workers, generator=torch.Generator().manual_seed(cfg.seed),
                    collate_fn=collate_fn)
                yield from index_steps(loader, itertools.repeat([b] * k, stop - start))
            else:
                # one loader per epoch: its workers start after on_epoch, so they see what it changed
                for epoch, a, z in epochs():
                    steps_of = EpochSampler(len(dataset), b * k, a, z, rank, world, cfg.seed)
                    sizes = [[len(idx[i:i + b]) for i in range(0, len(idx), b)] for idx in steps_of]
                    micro = [idx[i:i + b] for idx in steps_of for i in range(0, len(idx), b)]
                    loader = torch.utils.data.DataLoader(
                        dataset, batch_sampler=micro, num_workers=cfg.workers,
                        generator=torch.Generator().manual_seed(cfg.seed + epoch), collate_fn=collate_fn)
                    yield from index_steps(loader, sizes)

        use = net if ddp_forward else model

        def save(step: int) -> None:
            history["step"] = step
            history["train_seconds"] = base_seconds + time.perf_counter() - t0
            if not main or ckpt is None:
                return
            sd = accelerator.unwrap_model(net).state_dict()
            if trainable_only:
                sd = {name: v for name, v in sd.items() if name in trainable}
            save_state({"model": sd, "optimizer": opt_.state_dict(), "scheduler": sched_.state_dict(),
                        "scaler": accelerator.scaler.state_dict() if accelerator.scaler is not None else None,
                        "step": step, "history": history, **_rng_state(device)}, ckpt)
            write_text_atomic(ckpt.parent / "history.json", json.dumps(history, indent=1))

        net.train()
        opt.zero_grad(set_to_none=True)  # the raw optimiser's: accelerate's skips it outside a sync step
        bar = tqdm(feed(), total=stop - start, desc=f"{desc} {start}->{stop}/{total}",
                   disable=not progress or not main, leave=False)
        t0, window, step = time.perf_counter(), [], start
        for micro in bar:
            rates = [g["lr"] for g in opt_.param_groups]
            lr = (schedule.raw if isinstance(schedule, _RateSchedule)
                  else rates[0] if len(rates) == 1 else rates)
            means: dict[str, float] = {}
            # a short step (the last of an epoch) syncs on its own last micro-batch: accelerate syncs when its
            # micro-batch count reaches a multiple of grad_accum
            accelerator.step = k - len(micro)
            for batch, w in micro:
                with accelerator.accumulate(net):
                    with accelerator.autocast():
                        parts = loss_fn(use, batch, step, device)
                    accelerator.backward(parts["loss"] if w == 1 else parts["loss"] * w)
                for name, v in parts.items():
                    means[name] = means.get(name, 0.0) + w / k * (float(v.detach()) if isinstance(v, Tensor)
                                                                  else float(v))
            if world > 1 and not ddp_forward:
                for p in params:
                    if p.grad is not None:
                        p.grad.copy_(accelerator.reduce(p.grad, "mean"))
            if cfg.clip_grad:
                accelerator.clip_grad_norm_(params, cfg.clip_grad)
            opt_.step()
            opt_.zero_grad(set_to_none=True)
            step += 1
            if step < total:  # the rates of the next step (a schedule need not be defined past the end)
                sched_.step()
            window.append(means)
            bar.set_postfix(loss=f"{np.mean([w['loss'] for w in window[-50:]]):.4f}")
            if step % every == 0 or step == stop:
                row = {name: float(np.mean([w[name] for w in window])) for name in window[0]}
                history["log"].append({"step": step, **row, "lr": lr, "seconds": time.perf_counter() - t0})
                window = []
                text = on_log(step, row, history) if on_log is not None else None
                save(step)
                if text and main:
                    log(text)
        bar.close()
        if on_log is None and main and history["log"]:
            e = history["log"][-1]
            parts_text = " ".join(f"{name} {e[name]:.4f}" for name in e
                                  if name not in ("step", "lr", "seconds"))
            log(f"step {e['step']}/{total} {parts_text} ({e['seconds']:.0f} s this call)")
        return history
    finally:
        _release(accelerator, net, model, had_forward)


def _release(accelerator: Any, net: nn.Module, model: nn.Module, had_forward: bool) -> None:
    """Give the caller's model back as it came: ``prepare`` wraps its ``forward`` in autocast under mixed
    precision, and unwrapping leaves a bound ``forward`` on the instance."""
    accelerator.unwrap_model(net, keep_fp32_wrapper=False)
    if not had_forward:
        model.__dict__.pop("forward", None)
    # not accelerator.free_memory(): its gc.collect() costs ~0.5 s a call, and the accelerator (this call's
    # only reference to the prepared objects) goes with the call
