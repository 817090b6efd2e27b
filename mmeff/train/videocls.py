"""Video classification on a Kinetics-style folder (``root/<class>/<clip>.mp4``): data, training, testing.

Used by SqueezeTime (:mod:`mmeff.models.squeezetime`) and any model mapping clips ``(B, 3, T, H, W)`` to logits.

Two recipes (``recipe=``; ``"official"`` is the default):

* ``"official"``: SqueezeTime's K400 config (``configs/recognition/SqueezeTime/SqueezeTime_K400.py``, MMAction2
  transforms restated). Frames: ``T`` consecutive frames ``frame_interval`` (4) apart from a random offset
  (training) or the centred offset of each of ``clips`` equal stretches (test), indices past the end wrapping
  round (MMAction2's ``SampleFrames``, ``out_of_bound_opt='loop'``). Training views: short side to
  ``size * 256 / 224``, ``MultiScaleCrop`` (side scales 1/.875/.75/.66/.5 of the short side, width and height
  at most one scale apart, random position) resized to ``size``, flip, ``ColorJitter`` (brightness, contrast,
  saturation 0.5, hue 0.1, in a random order, the same for all frames; torchvision's functions), and
  ``RandomErasing`` (p 0.25, area 2-33%, aspect 0.3-3.3, the same box in every frame, uniform random
  pixels). One test view (``clips=1, crops=1``, the validation pipeline): short side to ``size * 256 / 224``,
  centre crop; more (``crops=3``, the test pipeline): short side to ``size``, ThreeCrop. SGD weight decay
  on every parameter (biases and norms included).
* ``"mmeff"``: what this library used before issue 35: ``T`` frames at the midpoints of ``T`` segments of a
  random window (``train_window`` of the video), a random resized crop (area 0.3-1, aspect 3/4-4/3) and a
  flip, no colour jitter or erasing; test views resize the short side to ``size``; no weight decay on
  biases, norms and position tables. ``mmeff bench squeezetime --squeezetime-recipe`` compares the two
  (README).

* :func:`train` runs SGD with momentum, linear warm-up and a cosine schedule through the library's loop
  (:func:`mmeff.train.loop.train_steps`: epoch-wise shuffled passes, gradient clipping, a progress bar),
  and writes ``last.pt`` every epoch (``resume=True`` continues bit-for-bit from it). Under ``torchrun``
  (``WORLD_SIZE`` > 1) it runs DDP: NCCL on CUDA, Gloo on CPU, the clips sharded as ``DistributedSampler``
  does; rank 0 logs and saves (its logged loss and accuracy are over its own shard of the data).
* :func:`evaluate` averages softmax probabilities over a clip's views (``average_clips='prob'``) and
  reports top-1 / top-5.

Clips that cannot be decoded fail with the loader's error naming the file.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from mmeff.checkpoint import save_state
from mmeff.datasets.media import load_video
from mmeff.models.squeezetime import create_model
from mmeff.train.distributed import init_distributed
from mmeff.train.loop import BaseTrainConfig, EpochSampler, train_steps

__all__ = ["RECIPES", "VideoFolder", "TrainConfig", "train", "evaluate", "frame_average_model", "FrameAverage",
           "lr_at_step", "sgd"]

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
VIDEO_EXTENSIONS = (".mp4", ".avi", ".mkv", ".webm", ".mov")
RECIPES = ("official", "mmeff")
_SCALES = (1.0, 0.875, 0.75, 0.66, 0.5)  # MultiScaleCrop's side scales


def _to_unit(frames: np.ndarray) -> Tensor:
    """(T, H, W, 3) uint8 -> (3, T, H, W) float in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(frames)).float().div_(255).permute(3, 0, 1, 2)


def _normalise(x: Tensor) -> Tensor:
    """(3, T, H, W) in [0, 1] -> ImageNet-normalised."""
    return (x - torch.tensor(MEAN).view(3, 1, 1, 1)) / torch.tensor(STD).view(3, 1, 1, 1)


def _resize(x: Tensor, size: tuple[int, int]) -> Tensor:
    """(3, T, H, W) to ``size`` (bilinear, antialiased)."""
    if tuple(x.shape[-2:]) == size:
        return x
    return F.interpolate(x.transpose(0, 1), size=size, mode="bilinear", align_corners=False,
                         antialias=True).transpose(0, 1)


def _resize_short(x: Tensor, size: int) -> Tensor:
    """(3, T, H, W) with the short side resized to ``size``."""
    h, w = x.shape[-2:]
    scale = size / min(h, w)
    return _resize(x, (max(size, round(h * scale)), max(size, round(w * scale))))


def interval_offsets(total: int, span: int, clips: int, rng: random.Random | None) -> list[int]:
    """MMAction2's ``SampleFrames`` start frames for windows of ``span`` frames in a video of ``total``: one
    random offset in ``[0, total - span]`` when ``rng`` is given (training), else the centre of each of
    ``clips`` equal stretches (test mode); 0 when the video is shorter than the window."""
    if rng is not None:
        return [rng.randrange(total - span + 1) if total >= span else 0]
    if total <= span - 1:
        return [0] * clips
    avg = (total - span + 1) / clips
    return [int(avg * c + avg / 2) for c in range(clips)]


def _color_jitter(x: Tensor, rng: random.Random) -> Tensor:
    """MMAction2's ``ColorJitter()`` on (3, T, H, W) in [0, 1]: brightness, contrast, saturation factors in
    [0.5, 1.5] and a hue shift in [-0.1, 0.1], applied in a random order, the same to every frame."""
    import torchvision.transforms.v2.functional as TF

    ops = [lambda v: TF.adjust_brightness(v, rng.uniform(0.5, 1.5)),
           lambda v: TF.adjust_contrast(v, rng.uniform(0.5, 1.5)),
           lambda v: TF.adjust_saturation(v, rng.uniform(0.5, 1.5)),
           lambda v: TF.adjust_hue(v, rng.uniform(-0.1, 0.1))]
    rng.shuffle(ops)
    v = x.transpose(0, 1)  # (T, 3, H, W): torchvision's per-image layout
    for op in ops:
        v = op(v)
    return v.clamp(0, 1).transpose(0, 1)


def _random_erase(x: Tensor, rng: random.Random, prob: float = 0.25) -> Tensor:
    """MMAction2's ``RandomErasing(erase_prob=0.25, mode='rand')``: with probability ``prob`` one box (2-33%
    of the area, aspect 0.3-3.3) filled with uniform random pixels, the same box in every frame."""
    if rng.random() >= prob:
        return x
    h, w = x.shape[-2:]
    area = rng.uniform(0.02, 1 / 3) * h * w
    aspect = math.exp(rng.uniform(math.log(0.3), math.log(1 / 0.3)))
    eh, ew = min(h, round(math.sqrt(area * aspect))), min(w, round(math.sqrt(area / aspect)))
    top, left = rng.randint(0, h - eh), rng.randint(0, w - ew)
    gen = torch.Generator().manual_seed(rng.getrandbits(63))
    x = x.clone()
    x[..., top:top + eh, left:left + ew] = torch.randint(0, 256, (3, x.shape[1], eh, ew), generator=gen) / 255
    return x


class VideoFolder(torch.utils.data.Dataset):
    """Clips of ``root/<class>/<file>`` (video extensions only), labelled by sorted class folder.

    ``train=True``: item ``i`` is one augmented view ``(3, T, size, size)`` and its label. ``train=False``:
    all ``clips * crops`` test views ``(V, 3, T, size, size)`` and the label. ``recipe``,
    ``frame_interval`` (the official sampling) and ``train_window`` (the mmeff one): module docstring.
    """

    def __init__(self, root: str | Path, num_frames: int, size: int, *, train: bool, clips: int = 1,
                 crops: int = 1, train_window: float = 1.0, classes: Sequence[str] | None = None,
                 recipe: str = "official", frame_interval: int = 4) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise ValueError(f"video folder {self.root} does not exist")
        found = sorted(d.name for d in self.root.iterdir() if d.is_dir())
        self.classes = list(classes) if classes is not None else found
        unknown = sorted(set(found) - set(self.classes))
        if unknown:
            raise ValueError(f"{self.root} has class folders {unknown} that are not in the given classes")
        self.items = [(p, i) for i, c in enumerate(self.classes) if (self.root / c).is_dir()
                      for p in sorted((self.root / c).iterdir()) if p.suffix.lower() in VIDEO_EXTENSIONS]
        if not self.items:
            raise ValueError(f"no videos ({', '.join(VIDEO_EXTENSIONS)}) under {self.root}/<class>/")
        if crops not in (1, 3) or clips < 1 or num_frames < 1 or not 0 < train_window <= 1 or frame_interval < 1:
            raise ValueError(f"need crops in (1, 3), clips >= 1, num_frames >= 1, 0 < train_window <= 1, "
                             f"frame_interval >= 1; got {crops}, {clips}, {num_frames}, {train_window}, {frame_interval}")
        if recipe not in RECIPES:
            raise ValueError(f"recipe must be one of {RECIPES}, got {recipe!r}")
        self.num_frames, self.size, self.train = num_frames, size, train
        self.clips, self.crops, self.train_window = clips, crops, train_window
        self.recipe, self.frame_interval = recipe, frame_interval
        self.epoch_seed = 0

    def __len__(self) -> int:
        return len(self.items)

    def _decode(self, path: Path, start: float | None, end: float | None) -> Tensor:
        return _to_unit(load_video(path, num_frames=self.num_frames, start=start, end=end).frames)

    def _duration(self, path: Path) -> float:
        return float(load_video(path, num_frames=1).duration)

    def _interval_clips(self, path: Path, rng: random.Random | None) -> list[Tensor]:
        """The official sampling: ``T`` frames ``frame_interval`` apart per window (looping past the end)."""
        probe = load_video(path, num_frames=1)
        fps, total = probe.native_fps, max(1, round(probe.duration * probe.native_fps))
        span, k = self.num_frames * self.frame_interval, self.frame_interval
        out = []
        for off in interval_offsets(total, span, self.clips, rng):
            if off + span <= total:  # every k-th frame from the offset: only those decoded
                frames = load_video(path, fps=fps / k, start=off / fps, end=(off + span - 0.5) / fps).frames
            else:  # the window runs past the end: all frames, indices wrapped round
                every = load_video(path, num_frames=total).frames
                frames = every[(off + np.arange(self.num_frames) * k) % len(every)]
            out.append(_to_unit(frames[: self.num_frames]))
        return out

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        path, label = self.items[i]
        official = self.recipe == "official"
        if self.train:
            rng = random.Random(hash((self.epoch_seed, i)))
            if official:
                return _normalise(self._augment_official(self._interval_clips(path, rng)[0], rng)), label
            start = end = None
            if self.train_window < 1:
                dur = self._duration(path)
                length = dur * self.train_window
                start = rng.uniform(0, dur - length)
                end = start + length
            return _normalise(self._augment(self._decode(path, start, end), rng)), label
        if official:
            raw = self._interval_clips(path, None)
        else:
            dur = self._duration(path) if self.clips > 1 else None
            raw = [self._decode(path, *((dur * c / self.clips, dur * (c + 1) / self.clips) if dur else (None, None)))
                   for c in range(self.clips)]
        # the official validation (one centre view) resizes to 256 for a 224 crop; its test (ThreeCrop) to 224
        short = self._short_256() if official and self.crops == 1 else self.size
        return torch.stack([_normalise(v) for x in raw for v in self._crops(_resize_short(x, short))]), label

    def _augment(self, x: Tensor, rng: random.Random) -> Tensor:
        # random resized crop (area 0.3-1, aspect 3/4-4/3) to size x size, then a coin-flip mirror
        h, w = x.shape[-2:]
        for _ in range(10):
            area = rng.uniform(0.3, 1.0) * h * w
            aspect = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
            ch, cw = round(math.sqrt(area / aspect)), round(math.sqrt(area * aspect))
            if ch <= h and cw <= w:
                break
        else:
            ch = cw = min(h, w)
        top, left = rng.randint(0, h - ch), rng.randint(0, w - cw)
        x = _resize(x[..., top:top + ch, left:left + cw], (self.size, self.size))
        return x.flip(-1) if rng.random() < 0.5 else x

    def _short_256(self) -> int:
        """The official short side before cropping: 256 for a 224 crop, scaled to ``size``."""
        return round(self.size * 256 / 224)

    def _augment_official(self, x: Tensor, rng: random.Random) -> Tensor:
        """Resize -> MultiScaleCrop -> Resize -> Flip -> ColorJitter -> RandomErasing (module docstring)."""
        x = _resize_short(x, self._short_256())
        h, w = x.shape[-2:]
        sides = [int(min(h, w) * s) for s in _SCALES]
        pairs = [(sw, sh) for i, sh in enumerate(sides) for j, sw in enumerate(sides) if abs(i - j) <= 1]
        cw, ch = rng.choice(pairs)
        top, left = rng.randint(0, h - ch), rng.randint(0, w - cw)
        x = _resize(x[..., top:top + ch, left:left + cw], (self.size, self.size))
        if rng.random() < 0.5:
            x = x.flip(-1)
        return _random_erase(_color_jitter(x, rng), rng)

    def _crops(self, x: Tensor) -> list[Tensor]:
        h, w = x.shape[-2:]
        s = self.size
        if self.crops == 1:
            offsets = [((h - s) // 2, (w - s) // 2)]
        elif w >= h:
            offsets = [((h - s) // 2, left) for left in (0, (w - s) // 2, w - s)]
        else:
            offsets = [(top, (w - s) // 2) for top in (0, (h - s) // 2, h - s)]
        return [x[..., t:t + s, le:le + s] for t, le in offsets]


@dataclass(kw_only=True)
class TrainConfig(BaseTrainConfig):
    """Optimisation settings (defaults: the SqueezeTime K400 recipe, scaled by batch size)."""

    epochs: int = 100
    batch_size: int = 8
    lr: float = 0.015 / 64 * 8  # 0.015 per 64 clips, linear scaling
    momentum: float = 0.9
    weight_decay: float = 7e-5
    warmup_epochs: float = 8.0
    clip_grad: float = 40.0
    workers: int = 0
    seed: int = 0
    decay_all: bool = True  # the official: weight decay on biases and norms too; False: matrices only

    # more or fewer epochs change the schedule from that point on; a resumed run may set them
    resume_may_change = BaseTrainConfig.resume_may_change | {"epochs"}
    @classmethod
    def saved_before(cls, data: Mapping[str, Any]) -> dict[str, Any]:
        """Runs saved before ``decay_all`` existed decayed matrices only: they resume so."""
        return {"decay_all": False}


def lr_at_step(step: float, total: float, cfg: TrainConfig, steps_per_epoch: int) -> float:
    """Learning rate at ``step`` of ``total``: linear warm-up from ``lr / 10`` over ``warmup_epochs``, then
    cosine to ``lr / 100``."""
    warm = cfg.warmup_epochs * steps_per_epoch
    if step < warm:
        return cfg.lr * (0.1 + 0.9 * step / warm)
    t = (step - warm) / max(1.0, total - warm)
    return cfg.lr / 100 + (cfg.lr - cfg.lr / 100) * 0.5 * (1 + math.cos(math.pi * t))


def sgd(model: nn.Module, cfg: TrainConfig) -> torch.optim.SGD:
    """SGD with momentum; weight decay on every parameter (``cfg.decay_all``, the official) or on matrices
    and kernels only (not on biases, norms or ``pos`` tables)."""
    def decays(name: str, p: Tensor) -> bool:
        return cfg.decay_all or (p.ndim > 1 and "pos" not in name.split(".")[-1])

    decay = [p for n, p in model.named_parameters() if decays(n, p)]
    rest = [p for n, p in model.named_parameters() if not decays(n, p)]
    return torch.optim.SGD([{"params": decay, "weight_decay": cfg.weight_decay}, {"params": rest, "weight_decay": 0.0}],
                           lr=cfg.lr, momentum=cfg.momentum)


def train(
    model: nn.Module,
    train_set: VideoFolder,
    out_dir: str | Path,
    cfg: TrainConfig | None = None,
    *,
    val_set: VideoFolder | None = None,
    resume: bool = True,
    stop_after: int | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Train ``model`` on ``train_set`` with the cross-entropy loss through the library's loop
    (:func:`mmeff.train.loop.train_steps`, epoch-wise shuffled passes); checkpoint to ``out_dir/last.pt``
    each epoch (and ``best.pt`` by validation top-1 when ``val_set`` is given). ``stop_after``: return after
    this many epochs of this call (a time-boxed job; the schedule stays that of ``cfg.epochs``, and a later
    call resumes). Returns the history ``{"epochs": [{"epoch", "loss", "train_top1", "seconds",
    ("val_top1", ...)}], "best_top1", "config", ...}``."""
    cfg = cfg or TrainConfig()
    out = Path(out_dir)
    rank, world, _ = init_distributed()
    per_epoch = EpochSampler.steps_per_epoch(len(train_set), cfg.batch_size, world)
    total = cfg.epochs * per_epoch
    clock = {"start": 0.0}  # when the current epoch's loader started

    def loss(net: nn.Module, batch: Any, step: int, device: torch.device) -> dict[str, Any]:
        x, y = (t.to(device, non_blocking=True) for t in batch)
        logits = net(x)
        ce = F.cross_entropy(logits, y)
        # sums, so the epoch's means weigh a short last batch by its size
        return {"loss": ce, "loss_sum": ce.detach() * len(y), "correct": int((logits.argmax(1) == y).sum()),
                "seen": len(y)}

    def start_epoch(epoch: int) -> None:
        train_set.epoch_seed = cfg.seed * 100_003 + epoch
        clock["start"] = time.perf_counter()

    def end_epoch(step: int, row: dict[str, float], history: dict[str, Any]) -> str:
        # the epoch's training time, without its evaluation and checkpoint
        entry = {"epoch": step // per_epoch, "loss": row["loss_sum"] / row["seen"],
                 "train_top1": row["correct"] / row["seen"], "seconds": time.perf_counter() - clock["start"]}
        if val_set is not None:
            entry.update({f"val_{k}": v for k, v in evaluate(model, val_set, progress=False).items()})
        history["epochs"].append(entry)
        if rank == 0 and val_set is not None and (history["best_top1"] is None
                                                  or entry["val_top1"] > history["best_top1"]):
            history["best_top1"] = entry["val_top1"]
            save_state({"model": model.state_dict(), "epoch": entry["epoch"] - 1}, out / "best.pt")
        return " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in entry.items())

    return train_steps(model, train_set, out, cfg, loss, resume=resume,
                       stop_after=None if stop_after is None else stop_after * per_epoch, progress=progress, log=log,
                       history_extra={"epochs": [], "best_top1": None}, steps=total, save_every=per_epoch,
                       optimizer=lambda m: sgd(m, cfg), lr_schedule=lambda s: lr_at_step(s, total, cfg, per_epoch),
                       shuffle=True, on_epoch=start_epoch, on_log=end_epoch)


@torch.no_grad()
def evaluate(model: nn.Module, test_set: VideoFolder, *, batch_size: int = 1, progress: bool = True) -> dict[str, float]:
    """Top-1 / top-5 of ``model`` on ``test_set`` (``train=False``), softmax averaged over each clip's views."""
    if test_set.train:
        raise ValueError("evaluate needs a VideoFolder built with train=False (multi-clip / multi-crop views)")
    device = next(model.parameters()).device
    was = model.training
    model.eval()
    hits1 = hits5 = n = 0
    loader = torch.utils.data.DataLoader(test_set, batch_size=batch_size, shuffle=False)
    for views, y in tqdm(loader, desc="test", disable=not progress, leave=False):
        b, v = views.shape[:2]
        prob = model(views.flatten(0, 1).to(device)).softmax(-1).view(b, v, -1).mean(1).cpu()
        k = min(5, prob.shape[1])
        top = prob.topk(k, dim=1).indices
        hits1 += int((top[:, 0] == y).sum())
        hits5 += int((top == y[:, None]).any(1).sum())
        n += b
    model.train(was)
    return {"top1": hits1 / n, "top5": hits5 / n, "clips": float(n)}


class FrameAverage(nn.Module):
    """A 2-D baseline of the same backbone: each frame alone through ``frame_model`` (built for T=1),
    features averaged over time, then the classifier. Frame order cannot matter to it."""

    def __init__(self, frame_model: nn.Module) -> None:
        super().__init__()
        self.net = frame_model

    def forward(self, x: Tensor) -> Tensor:
        """Clips ``(B, 3, T, H, W)`` -> logits ``(B, classes)``."""
        b, c, t, h, w = x.shape
        frames = x.permute(0, 2, 1, 3, 4).reshape(b * t, c, 1, h, w)
        feats = self.net.pool(self.net.forward_features(frames)).flatten(1).view(b, t, -1).mean(1)
        return self.net.head(self.net.drop(feats))


def frame_average_model(name: str, **kwargs: Any) -> FrameAverage:
    """:class:`FrameAverage` around the SqueezeTime configuration ``name`` built for one frame."""
    return FrameAverage(create_model(name, **{**kwargs, "num_frames": 1}))
