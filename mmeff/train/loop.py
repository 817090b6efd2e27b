"""The one training loop of mmeff's trainers, and the config base they share.

:func:`train_steps` runs ``cfg.steps`` optimiser steps of a loss function. Three ways to feed it:

* by default, a dataset whose item ``i`` is a pure function of ``i``: step ``s`` reads items
  ``s * batch * world + rank * batch + j`` (:class:`StepSampler`);
* ``shuffle=True``: epoch-wise reshuffled passes over a finite dataset (a folder of clips), epoch ``e``'s
  order a pure function of ``seed + e`` and sharded over ranks as ``DistributedSampler`` does
  (:class:`EpochSampler`), with a hook before each epoch's loader starts;
* ``batched=True``: the caller's own re-iterable of ready batches (a ``DataLoader``, a list), one pass an
  epoch (ToCom's self-distillation, VisToG's stages).

Each way ``resume=True`` continues bit-for-bit from ``out_dir/last.pt`` with no data state to save (given
a pass of the caller's batches that is a function of its epoch). ``out_dir=None`` runs without files.
Adam with a linear warm-up and cosine decay (:func:`lr_at`) unless the caller gives its own optimiser and
schedule, gradient clipping, a progress bar, ``last.pt`` + ``history.json`` every ``save_every`` steps
(written atomically; read back without unpickling code), and DDP under ``torchrun``
(:func:`~mmeff.train.distributed.init_distributed`); rank 0 logs and saves.

:class:`BaseTrainConfig` holds the settings every trainer has (batch size, learning rate, weight decay,
clipping, loader workers, seed) with :meth:`~BaseTrainConfig.to_dict` / :meth:`~BaseTrainConfig.from_dict`;
:class:`StepTrainConfig` adds the step schedule. Resuming checks the saved config against the current one.
"""

from __future__ import annotations

import itertools
import json
import math
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence, Sized
from dataclasses import asdict, dataclass, fields, is_dataclass
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from mmeff.checkpoint import load_state, save_state, write_text_atomic
from mmeff.train.distributed import init_distributed

__all__ = ["BaseTrainConfig", "EpochSampler", "StepSampler", "StepTrainConfig", "config_dict", "lr_at",
           "train_steps"]

T = TypeVar("T", bound="BaseTrainConfig")


@dataclass(kw_only=True)
class BaseTrainConfig:
    """The settings every mmeff trainer shares. Subclasses add their own (``@dataclass(kw_only=True)``,
    redeclaring a field to change its default).

    ``resume_may_change``: fields a resumed run may set differently from the saved run (they do not change
    the trajectory, or lengthen / shorten it); any other difference refuses to resume."""

    batch_size: int = 8
    lr: float = 1e-3
    weight_decay: float = 0.0
    clip_grad: float = 1.0  # max gradient norm; 0: no clipping
    workers: int = 0  # DataLoader worker processes
    seed: int = 0

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
    ``warmup_steps`` then cosine decay to ``min_lr`` (:func:`lr_at`), ``last.pt`` every ``save_every``."""

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
    """Learning rate at ``step``: linear warm-up over ``warmup_steps``, then cosine to ``min_lr``."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    t = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.min_lr + (cfg.lr - cfg.min_lr) * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))


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

    ``cfg``: a :class:`StepTrainConfig` (or any dataclass with its fields). ``net`` is the DDP-wrapped
    model under ``torchrun`` when ``ddp_forward`` (the loss calls its forward, so DDP averages the
    gradients); otherwise the bare model, and the gradients are averaged here. ``stop_after``: return after
    that many steps of this call (the schedule stays that of ``cfg.steps``; a later call resumes). Returns
    the history ``{"config", "log": [{"step", <part means>, "lr", "seconds"}], "step", "train_seconds",
    **history_extra}`` (``seconds``: since this call started; ``train_seconds``: all calls together).
    Without ``shuffle`` the dataset must hold ``steps * batch * world`` items. Only parameters with
    ``requires_grad`` train; ``trainable_only`` saves only those in ``last.pt`` (a model with a large
    frozen part, e.g. a VLM's language model).

    For a run counted otherwise (a config in epochs): ``steps`` / ``save_every`` replace ``cfg.steps`` /
    ``cfg.save_every``; ``optimizer(model)`` replaces Adam over the trainable parameters and
    ``lr_schedule(step)`` replaces :func:`lr_at` (a rate set on every parameter group, or a sequence of
    rates, one per group). ``shuffle``: feed epoch-wise shuffled passes over the dataset
    (:class:`EpochSampler`, batches of ``cfg.batch_size`` per rank); ``on_epoch(epoch)`` runs before each
    epoch's loader starts, so its workers see what it sets. ``batched``: ``dataset`` is a sized
    re-iterable of ready batches (a ``DataLoader``, a list of batches; under DDP it shards itself): an
    epoch is one pass of ``len(dataset)`` batches, after ``on_epoch(epoch)`` and ``dataset.set_epoch(epoch)``
    when it has one (as a ``DistributedSampler`` wants); a run resumed inside an epoch skips the batches it
    already took. ``on_log(step, row, history)`` runs on every rank each time a log row (part means since
    the last one) is recorded, before ``last.pt`` is written; it may add to ``history``, and rank 0 logs
    the text it returns (instead of the loop's closing summary line).

    For a trainer called inside a larger recipe: ``out_dir=None`` writes no files and never resumes;
    ``device`` is the device ``loss_fn`` gets, and the model stays where the caller put it (default:
    :func:`~mmeff.train.distributed.init_distributed`'s, and the model is moved there); ``reseed=False``
    keeps the caller's global RNG instead of seeding it from ``cfg.seed``; ``checkpoint`` names the state
    file in ``out_dir`` (it holds the CUDA RNG too when training on a GPU); ``desc`` labels the progress
    bar."""
    out = Path(out_dir) if out_dir is not None else None
    rank, world, run_device = init_distributed()
    total = cfg.steps if steps is None else steps
    every = cfg.save_every if save_every is None else save_every
    per_epoch = 0
    if batched:
        if not isinstance(dataset, Sized):
            raise TypeError(f"batched data must have a len (its batches per epoch), got {type(dataset).__name__}")
        per_epoch = len(dataset)
        if per_epoch < 1:
            raise ValueError("the data holds no batches")
    elif shuffle:
        if len(dataset) < 1:
            raise ValueError("the dataset is empty")
        per_epoch = EpochSampler.steps_per_epoch(len(dataset), cfg.batch_size, world)
    else:
        need = total * cfg.batch_size * world
        if len(dataset) < need:
            raise ValueError(f"dataset has {len(dataset)} items; {total} steps of {cfg.batch_size} x {world} "
                             f"ranks need {need} (give the dataset {length_hint}={need})")
    if rank == 0 and out is not None:
        out.mkdir(parents=True, exist_ok=True)
    if reseed:
        torch.manual_seed(cfg.seed)
    if device is None:
        device = run_device
        model.to(device)
    device = torch.device(device)
    net: nn.Module = model
    if world > 1:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                                  find_unused_parameters=find_unused_parameters)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters (every requires_grad is False)")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    opt = optimizer(model) if optimizer is not None else torch.optim.Adam(params, lr=cfg.lr,
                                                                          weight_decay=cfg.weight_decay)
    schedule = lr_schedule if lr_schedule is not None else (lambda s: lr_at(s, cfg))
    config = config_dict(cfg)
    history: dict[str, Any] = {"config": config, "log": [], "step": 0, **(history_extra or {})}
    ckpt = out / checkpoint if out is not None else None
    start = 0
    if resume and ckpt is not None and ckpt.is_file():
        state = load_state(ckpt, map_location=device)
        lacks = sorted({"model", "optimizer", "rng", "history", "step"} - set(state))
        if lacks:
            raise ValueError(f"{ckpt} is not a checkpoint of this loop (it lacks {lacks}; an older mmeff's?); "
                             f"train into another folder or start over without resuming")
        try:
            if trainable_only:
                missing = trainable - set(state["model"])
                if missing:
                    raise RuntimeError(f"trainable parameters missing from the checkpoint: {sorted(missing)[:4]}")
                model.load_state_dict(state["model"], strict=False)
            else:
                model.load_state_dict(state["model"])
        except RuntimeError as e:
            raise ValueError(f"{ckpt} holds another model configuration; train into another folder or start "
                             f"over without resuming ({str(e).splitlines()[0]})") from e
        check_resume_config(state.get("history", {}).get("config"), cfg, ckpt)
        opt.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"].cpu())
        if device.type == "cuda" and state.get("cuda_rng") is not None:
            torch.cuda.set_rng_state(state["cuda_rng"].cpu(), device)
        history, start = state["history"], state["step"]
        if isinstance(cfg, BaseTrainConfig):  # checked above: only resume_may_change fields can differ
            history["config"] = config
        log(f"resumed from {ckpt} at step {start}" + (f" (epoch {start // per_epoch})" if per_epoch else ""))
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

    def one_pass(epoch: int, a: int, b: int) -> Iterator[Any]:
        # a pass of the caller's batches; a resumed epoch skips the batches it already took
        if callable(getattr(dataset, "set_epoch", None)):
            dataset.set_epoch(epoch)
        skip, take, n = a - epoch * per_epoch, b - epoch * per_epoch, 0
        for n, batch in enumerate(dataset, 1):
            if n > skip:
                yield batch
            if n >= take:
                return
        raise ValueError(f"the data yielded {n} batches in epoch {epoch}; its len says {per_epoch}")

    def loaders() -> Iterator[Iterable[Any]]:
        # the loaders get their own generators: drawing their base seeds from the global RNG would shift
        # every later random draw of a resumed run
        if batched:
            for epoch, a, b in epochs():
                yield one_pass(epoch, a, b)
        elif not shuffle:
            yield torch.utils.data.DataLoader(
                dataset, batch_size=cfg.batch_size, sampler=StepSampler(start, stop, cfg.batch_size, rank, world),
                num_workers=cfg.workers, generator=torch.Generator().manual_seed(cfg.seed), collate_fn=collate_fn)
        else:
            # one loader per epoch: its workers start after on_epoch, so they see what it changed
            for epoch, a, b in epochs():
                batches = EpochSampler(len(dataset), cfg.batch_size, a, b, rank, world, cfg.seed)
                yield torch.utils.data.DataLoader(dataset, batch_sampler=batches, num_workers=cfg.workers,
                                                  generator=torch.Generator().manual_seed(cfg.seed + epoch),
                                                  collate_fn=collate_fn)

    use = net if ddp_forward else model

    def save(step: int) -> None:
        history["step"] = step
        history["train_seconds"] = base_seconds + time.perf_counter() - t0
        if rank != 0 or ckpt is None:
            return
        sd = model.state_dict()
        if trainable_only:
            sd = {k: v for k, v in sd.items() if k in trainable}
        save_state({"model": sd, "optimizer": opt.state_dict(), "step": step, "history": history,
                    "rng": torch.get_rng_state(),
                    "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}, ckpt)
        write_text_atomic(ckpt.parent / "history.json", json.dumps(history, indent=1))

    net.train()
    bar = tqdm(itertools.chain.from_iterable(loaders()), total=stop - start, desc=f"{desc} {start}->{stop}/{total}",
               disable=not progress or rank != 0, leave=False)
    t0, window, step = time.perf_counter(), [], start
    for batch in bar:
        lr = schedule(step)
        rates = [lr] * len(opt.param_groups) if isinstance(lr, (int, float)) else list(lr)
        if len(rates) != len(opt.param_groups):
            raise ValueError(f"lr_schedule gave {len(rates)} rates for {len(opt.param_groups)} parameter groups")
        for group, rate in zip(opt.param_groups, rates):
            group["lr"] = rate
        parts = loss_fn(use, batch, step, device)
        opt.zero_grad(set_to_none=True)
        parts["loss"].backward()
        if world > 1 and not ddp_forward:
            for p in params:
                if p.grad is not None:
                    torch.distributed.all_reduce(p.grad)
                    p.grad /= world
        if cfg.clip_grad:
            nn.utils.clip_grad_norm_(params, cfg.clip_grad)
        opt.step()
        step += 1
        window.append({k: float(v.detach()) if isinstance(v, Tensor) else float(v) for k, v in parts.items()})
        bar.set_postfix(loss=f"{np.mean([w['loss'] for w in window[-50:]]):.4f}")
        if step % every == 0 or step == stop:
            row = {k: float(np.mean([w[k] for w in window])) for k in window[0]}
            history["log"].append({"step": step, **row, "lr": lr if isinstance(lr, (int, float)) else rates,
                                   "seconds": time.perf_counter() - t0})
            window = []
            text = on_log(step, row, history) if on_log is not None else None
            save(step)
            if text and rank == 0:
                log(text)
    bar.close()
    if on_log is None and rank == 0 and history["log"]:
        e = history["log"][-1]
        parts_text = " ".join(f"{k} {e[k]:.4f}" for k in e if k not in ("step", "lr", "seconds"))
        log(f"step {e['step']}/{total} {parts_text} ({e['seconds']:.0f} s this call)")
    return history
