"""CDT, the Conditioned Diffusion-based video Tokenizer (Yang et al., arXiv 2503.03708).

Official code (``ali-vilab/CDT``, inference only) read for understanding; this is our own implementation.

* **Encoder** (:class:`Compressor` ``.encode``): causal 3-D ResNet levels (two causal 3x3x3 convs with
  channel LayerNorm and ReLU, a 3x7x7 first conv), causal ``(1, 3, 3)`` stride-2 spatial downsampling and a
  causal stride-2 temporal conv (:class:`TimeDownsample`, initialised to the sum of the last two frames).
  Base: 8x8 spatial, 4x temporal, 16 latent channels; ``1 + 4k`` frames give ``1 + k`` latent frames, so
  the first frame is coded alone and every frame depends only on earlier ones. The output is a diagonal
  Gaussian (KL-regularised; ``logvar`` clamped to [-30, 20]); :meth:`CDT.encode` returns its mean.
* **Context decoder** (:class:`Compressor` ``.decode``): mirrors the encoder and returns a multi-scale
  list of feature maps (base: 16 ch at H, 128 at H, 256 at H/2, 384 at H/4 and T/2).
* **Denoiser** (:class:`Unet`): a causal 3-D U-Net (widths 64 x 1..6, per-frame linear attention) that
  concatenates ``context[i]`` at its first four levels and predicts **x0** from ``x_t`` and ``t / 8192``.
* **Diffusion**: 8192 steps, cosine schedule; decoding starts from ``x_T = 0.8 * eps`` and runs DDIM
  (eta 0) for ``steps`` evaluations at ``linspace(0, 8191, steps)`` (one step: the single call at 8191).

Causality and long videos. Every temporal operator is causal (``2 * pad_t`` frames of padding in front,
none behind), so a video can be encoded and decoded in chunks whose outputs equal the whole-video pass:
inside :meth:`CDT.streaming` each :class:`CausalConv3d` keeps the last ``k_t - 1`` frames it saw,
:class:`TimeDownsample` the frames its stride has not consumed, and :class:`TimeUpsample` whether the
video has started (the first frame of a video yields one frame, not two). The official code keeps these
as module-global lists and a global first-chunk flag; here each module owns its state, the context manager
clears it in ``finally``, and multi-step decoding keeps one U-Net state per step so it runs chunk by
chunk (outer loop) and step by step (inner loop), with the context decoder run once per chunk instead of
once per step. :meth:`CDT.decode_stream` yields the frames chunk by chunk, so memory is that of a chunk.

Differences from the official code, deliberate:

* Weights are initialised for training from scratch (PyTorch defaults). The official ``CausalConv3d``
  zero-initialises every weight, which only works when a checkpoint is loaded afterwards.
* Decoding is deterministic by default (``seed=0``); noise is drawn frame by frame so a chunked decode
  sees the same noise as a whole-video one.
* The decoded video is clamped to [-1, 1].
* **Chunked decoding streams every cache.** The official context decoder calls the ResnetBlock that stands
  in for its last upsampler (``cdt_base``; ``cdt_mini`` too) as ``up(input)`` without ``feat_cache``, so in
  a chunked decode that block pads each chunk's first frames as if the video started there. Here it carries
  its cache like every other module, so a chunked decode equals the whole-video one (tested to 1e-5).
  ``decode(..., faithful=True)`` reproduces the official. Measured on ``mmeff bench cdt``'s 65-frame
  carphone clip in chunks of 4 latents: the official way differs from the whole decode by up to 0.043
  (mean 0.0014) after the U-Net, PSNR unchanged (21.19 dB); through the plain-VAE decoder up to 0.66,
  -0.29 dB.
* Everything runs in the parameters' dtype (the official code forces its moment head and context decoder
  input to float32 for float16 checkpoints; use bfloat16 or autocast for half precision).

Module names follow the official checkpoint layout (``model.context_fn.*``, ``model.denoise_fn.*``), so
:meth:`CDT.load_official` reads ``cdt_base.ckpt`` / ``cdt_small.ckpt`` into ``cdt_base`` / ``cdt_small``
(strictly: any missing or unexpected key is an error naming it).

``decoder="vae"`` builds the comparison point of ``mmeff bench cdt``: the same encoder with a plain
deterministic decoder (the context decoder ending in RGB), trained with the same losses.

Videos are ``(B, 3, T, H, W)`` float in [-1, 1]; latents ``(B, C, 1 + (T - 1) / 4, H / 8, W / 8)``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmeff.checkpoint import Checkpointable, read_tensors
from mmeff.models.cdt_parts import (
    Block,
    CausalConv3d,
    CDTConfig,
    Compressor,
    Downsample,
    LayerNorm,
    LinearAttention,
    PreNorm,
    Residual,
    ResnetBlock,
    Streaming,
    TimeDownsample,
    TimeUpsample,
    Unet,
    Upsample,
)
from mmeff.models.zoo import register_family

# the layers live in mmeff.models.cdt_parts; re-exported so every name of this module's past stays here
__all__ = ["CDT", "CDTConfig", "CausalConv3d", "TimeDownsample", "TimeUpsample", "cosine_alphas_cumprod",
           "create_model", "list_models", "param_counts", "sampling_timesteps",
           "Block", "Compressor", "Downsample", "LayerNorm", "LinearAttention", "PreNorm", "Residual", "ResnetBlock",
           "Streaming", "Unet", "Upsample"]

class _Diffusion(nn.Module):
    """Holds the two networks under the official checkpoint's names."""

    def __init__(self, cfg: CDTConfig) -> None:
        super().__init__()
        self.context_fn = Compressor(cfg)
        self.denoise_fn = Unet(cfg) if cfg.decoder == "diffusion" else None


def cosine_alphas_cumprod(timesteps: int = 8192, s: float = 0.008) -> Tensor:
    """``alpha_bar_t`` (``(timesteps,)`` float64) of the cosine schedule (Nichol and Dhariwal), betas
    clipped at 0.999: ``alpha_bar_t = prod_{i <= t} (1 - beta_i)``."""
    x = torch.arange(timesteps + 1, dtype=torch.float64) / timesteps
    f = torch.cos((x + s) / (1 + s) * math.pi / 2) ** 2
    betas = (1 - f[1:] / f[:-1]).clamp(0, 0.999)
    return torch.cumprod(1 - betas, 0)


def sampling_timesteps(steps: int, timesteps: int = 8192) -> Tensor:
    """The DDIM timesteps for ``steps`` denoiser calls, ascending: ``[timesteps - 1]`` for one step,
    else ``linspace(0, timesteps - 1, steps)`` (``(steps,)`` int64)."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if steps > timesteps:
        raise ValueError(f"steps ({steps}) cannot exceed the {timesteps} diffusion timesteps")
    if steps == 1:
        return torch.tensor([timesteps - 1])
    return torch.linspace(0, timesteps - 1, steps).long()


def _randn(shape: Sequence[int], generator: torch.Generator | None, device: torch.device) -> Tensor:
    # drawn on the generator's device (the CPU for a torch.Generator()), then moved
    if generator is None:
        return torch.randn(tuple(shape), device=device)
    return torch.randn(tuple(shape), generator=generator, device=generator.device).to(device)


# --------------------------------------------------------------------------------------------- the model
class CDT(Checkpointable, nn.Module):
    """Conditioned diffusion video tokenizer: :meth:`encode` / :meth:`decode` (module docstring)."""

    def __init__(self, cfg: CDTConfig | None = None) -> None:
        super().__init__()
        self.cfg = cfg or CDTConfig()
        self.model = _Diffusion(self.cfg)
        # float64 on the CPU, indexed and cast per use: a buffer would follow .half() / .float() and lose
        # the 1 - alpha_bar ~ 1e-5 resolution near t = 0
        self._alphas_cumprod = cosine_alphas_cumprod(self.cfg.timesteps)

    # ---- shapes
    @property
    def encoder(self) -> Compressor:
        """The encoder and context decoder (one module, as in the official checkpoint)."""
        return self.model.context_fn

    def latent_shape(self, video_shape: Sequence[int]) -> tuple[int, ...]:
        """``(B, 3, T, H, W)`` -> the latent shape ``(B, C, 1 + (T - 1) / 4, H / 8, W / 8)``."""
        b, _, t, h, w = video_shape
        s, f = self.cfg.space_factor, self.cfg.time_factor
        return (b, self.cfg.latent_channels, 1 + (t - 1) // f, h // s, w // s)

    def _check_video(self, video: Tensor) -> None:
        if not isinstance(video, Tensor) or video.dim() != 5 or video.shape[1] != 3:
            shape = tuple(video.shape) if isinstance(video, Tensor) else type(video).__name__
            raise ValueError(f"CDT takes videos of shape (B, 3, T, H, W) in [-1, 1], got {shape}")
        if not video.is_floating_point():
            raise ValueError(f"CDT takes float videos in [-1, 1], got dtype {video.dtype} (divide uint8 by 127.5, subtract 1)")
        t, h, w = video.shape[2:]
        f, m = self.cfg.time_factor, self.cfg.spatial_multiple
        if (t - 1) % f:
            raise ValueError(f"CDT codes 1 + {f}k frames (the first alone, then groups of {f}); got {t}. "
                             f"Trim or pad the clip, or use reconstruct(), which pads")
        if h % m or w % m:
            raise ValueError(f"frame size {h}x{w} is not a multiple of {m}; crop or pad it, or use reconstruct()")

    def _check_latents(self, z: Tensor) -> None:
        c = self.cfg.latent_channels
        if not isinstance(z, Tensor) or z.dim() != 5 or z.shape[1] != c:
            shape = tuple(z.shape) if isinstance(z, Tensor) else type(z).__name__
            raise ValueError(f"CDT latents have shape (B, {c}, T', H', W'), got {shape}")
        m = self.cfg.spatial_multiple // self.cfg.space_factor
        if z.shape[-1] % m or z.shape[-2] % m:
            raise ValueError(f"latent size {tuple(z.shape[-2:])} is not a multiple of {m} (the denoiser's depth)")

    # ---- streaming state
    def _stateful(self, module: nn.Module | None = None) -> list[Streaming]:
        return [m for m in (module or self).modules() if isinstance(m, Streaming)]

    @contextmanager
    def streaming(self) -> Iterator[None]:
        """Within the block, calls to the networks are consecutive chunks of one video (caches on);
        the caches are cleared on entry and on exit."""
        mods = self._stateful()
        for m in mods:
            m.streaming, m.cache = True, None
        try:
            yield
        finally:
            for m in mods:
                m.streaming, m.cache = False, None

    # ---- encoding
    def encode_posterior(self, video: Tensor, chunk_frames: int | None = None) -> tuple[Tensor, Tensor]:
        """``(B, 3, T, H, W)`` -> ``(mean, logvar)`` of the latent Gaussian. ``chunk_frames`` (a multiple
        of 4): encode the video in chunks through the causal caches (the first chunk takes the remainder,
        ``1 + (T - 1) % chunk_frames`` frames); equal to the whole-video encoding."""
        self._check_video(video)
        enc = self.encoder
        if chunk_frames is None:
            return enc.encode(video)
        f = self.cfg.time_factor
        if chunk_frames < f or chunk_frames % f:
            raise ValueError(f"chunk_frames must be a positive multiple of {f}, got {chunk_frames}")
        t = video.shape[2]
        bounds = [0, 1 + (t - 1) % chunk_frames]
        while bounds[-1] < t:
            bounds.append(bounds[-1] + chunk_frames)
        means, logvars = [], []
        with self.streaming():
            for a, b in zip(bounds[:-1], bounds[1:]):
                m, lv = enc.encode(video[:, :, a:b])
                means.append(m)
                logvars.append(lv)
        return torch.cat(means, 2), torch.cat(logvars, 2)

    def encode(self, video: Tensor, chunk_frames: int | None = None, sample: bool = False) -> Tensor:
        """``(B, 3, T, H, W)`` in [-1, 1] -> latents ``(B, C, 1 + (T - 1) / 4, H / 8, W / 8)``: the
        posterior mean (``sample=True``: a draw from it). ``chunk_frames``: see :meth:`encode_posterior`."""
        mean, logvar = self.encode_posterior(video, chunk_frames)
        return mean + torch.randn_like(mean) * (0.5 * logvar).exp() if sample else mean

    # ---- decoding
    def _noise(self, shape: Sequence[int], frames: range, gen: torch.Generator | None, device: torch.device
               ) -> Tensor:
        b, _, _, h, w = shape
        per_frame = [torch.randn((b, 3, h, w), generator=gen) for _ in frames] if gen is not None else \
            [torch.randn((b, 3, h, w)) for _ in frames]
        return self.cfg.sample_gamma * torch.stack(per_frame, 2).to(device)

    def _denoise(self, x: Tensor, context: list[Tensor], ts: Tensor, states: list[list[Any]] | None) -> Tensor:
        unet = self.model.denoise_fn
        mods = self._stateful(unet) if states is not None else []
        ab = self._alphas_cumprod[ts.cpu()].to(device=x.device, dtype=x.dtype)
        ab_prev = torch.cat([ab.new_ones(1), ab[:-1]])
        for i in reversed(range(len(ts))):
            if states is not None:
                for m, s in zip(mods, states[i]):
                    m.cache = s
            time = torch.full((x.shape[0],), float(ts[i]) / self.cfg.timesteps, device=x.device)
            x0 = unet(x, time, context).to(x.dtype)
            if states is not None:
                states[i] = [m.cache for m in mods]
            if i == 0:
                x = x0
            else:
                eps = (x - ab[i].sqrt() * x0) / (1 - ab[i]).sqrt()
                x = ab_prev[i].sqrt() * x0 + (1 - ab_prev[i]).sqrt() * eps
        return x

    def _uncached_in_official(self) -> list[Streaming]:
        """The temporal modules the official chunked decode runs without their cache: the ResnetBlock that
        stands in for the upsampler at the context decoder's last level (configurations whose last level
        does not downsample: ``cdt_base``, ``cdt_mini``), called there as ``up(input)`` without
        ``feat_cache``."""
        up = self.encoder.dec[-1][1]
        return self._stateful(up) if isinstance(up, ResnetBlock) else []

    @torch.no_grad()
    def decode_stream(self, latents: Tensor, steps: int = 1, chunk_latents: int | None = None,
                      seed: int | None = 0, noise: Tensor | None = None, faithful: bool = False
                      ) -> Iterator[Tensor]:
        """Yield the decoded video ``(B, 3, t_i, H, W)`` chunk by chunk, ``chunk_latents`` latent frames
        at a time (``None``: all at once), each step's denoiser state carried between chunks; the chunks
        concatenate to :meth:`decode`'s output. ``noise``: the initial noise ``(B, 3, T, H, W)`` (default:
        ``sample_gamma * N(0, 1)`` drawn frame by frame from ``seed``; ``seed=None``: the global RNG).
        ``faithful=True`` reproduces the official chunked decode, whose context decoder's last ResnetBlock
        forgets the previous chunk (module docstring): only to compare with numbers of the official code."""
        self._check_latents(latents)
        b, _, tl, hl, wl = latents.shape
        s, f = self.cfg.space_factor, self.cfg.time_factor
        shape = (b, 3, 1 + (tl - 1) * f, hl * s, wl * s)
        if noise is not None and tuple(noise.shape) != shape:
            raise ValueError(f"noise must have shape {shape}, got {tuple(noise.shape)}")
        chunk = tl if chunk_latents is None else int(chunk_latents)
        if chunk < 1:
            raise ValueError(f"chunk_latents must be >= 1, got {chunk_latents}")
        if self.cfg.decoder == "vae" and steps != 1:
            raise ValueError(f"a plain VAE decodes in one pass; steps={steps} needs decoder='diffusion'")
        ts = sampling_timesteps(steps, self.cfg.timesteps).to(latents.device)
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        states: list[list[Any]] | None = None
        with self.streaming():
            for m in self._uncached_in_official() if faithful else []:
                m.streaming = False  # every chunk padded as a first one, as the official code does
            if self.cfg.decoder == "diffusion":
                states = [[None] * len(self._stateful(self.model.denoise_fn)) for _ in range(len(ts))]
            frame = 0
            for a in range(0, tl, chunk):
                z = latents[:, :, a:a + chunk]
                n = (z.shape[2] - 1) * f + 1 if a == 0 else z.shape[2] * f
                context = self.encoder.decode(z)
                if self.cfg.decoder == "vae":
                    out = context[0]
                else:
                    x = noise[:, :, frame:frame + n] if noise is not None else \
                        self._noise(shape, range(frame, frame + n), gen, latents.device)
                    x = x.to(device=latents.device, dtype=latents.dtype)
                    out = self._denoise(x, context, ts, states)
                frame += n
                yield out.clamp(-1, 1)

    @torch.no_grad()
    def decode(self, latents: Tensor, steps: int = 1, chunk_latents: int | None = None, seed: int | None = 0,
               noise: Tensor | None = None, faithful: bool = False) -> Tensor:
        """Latents ``(B, C, T', H', W')`` -> video ``(B, 3, 1 + 4 (T' - 1), 8 H', 8 W')`` in [-1, 1] with
        ``steps`` DDIM steps (1: one denoiser call). ``chunk_latents``: decode that many latent frames at a
        time through the causal caches (bounded memory, any video length). See :meth:`decode_stream`."""
        return torch.cat(list(self.decode_stream(latents, steps, chunk_latents, seed, noise, faithful)), 2)

    @torch.no_grad()
    def reconstruct(self, video: Tensor, steps: int = 1, chunk_frames: int | None = None, seed: int | None = 0
                    ) -> Tensor:
        """Encode and decode ``(B, 3, T, H, W)`` of any size: frames are replicate-padded to ``1 + 4k``
        and the sides to the spatial multiple, and the output cropped back to the input's shape."""
        if not isinstance(video, Tensor) or video.dim() != 5:
            raise ValueError(f"reconstruct takes (B, 3, T, H, W), got {getattr(video, 'shape', type(video))}")
        t, h, w = video.shape[2:]
        f, m = self.cfg.time_factor, self.cfg.spatial_multiple
        pt, ph, pw = (-(t - 1)) % f, (-h) % m, (-w) % m
        x = F.pad(video, (0, pw, 0, ph, 0, pt), mode="replicate") if pt or ph or pw else video
        chunk = None if chunk_frames is None else chunk_frames
        z = self.encode(x, chunk_frames=chunk)
        rec = self.decode(z, steps, None if chunk is None else max(1, chunk // f), seed)
        return rec[:, :, :t, :h, :w]

    def forward(self, video: Tensor, steps: int = 1) -> Tensor:
        """``reconstruct(video, steps)``: ``(B, 3, T, H, W) -> (B, 3, T, H, W)``."""
        return self.reconstruct(video, steps)

    # ---- training
    def training_losses(self, video: Tensor, *, kl_weight: float = 1e-6, perceptual: nn.Module | None = None,
                        perceptual_weight: float = 0.1, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """Losses of one batch ``(B, 3, T, H, W)``: ``rec`` (CDT: the x0-prediction MSE at a uniformly drawn
        diffusion step; VAE: the reconstruction MSE), ``kl`` (mean per latent element), ``perceptual``
        (``perceptual(pred, target)`` over all frames, ``(N, 3, H, W)`` in [-1, 1]) and their weighted
        ``loss``. The latent is a draw from the posterior (reparameterised)."""
        self._check_video(video)
        mean, logvar = self.encoder.encode(video)
        z = mean + _randn(mean.shape, generator, mean.device).to(mean.dtype) * (0.5 * logvar).exp()
        context = self.encoder.decode(z)
        target = video
        if self.cfg.decoder == "vae":
            pred = context[0]
        else:
            b = video.shape[0]
            t = torch.randint(0, self.cfg.timesteps, (b,), generator=generator,
                              device=generator.device if generator is not None else video.device).to(video.device)
            eps = _randn(target.shape, generator, video.device).to(video.dtype)
            ab = self._alphas_cumprod[t.cpu()].view(b, 1, 1, 1, 1).to(device=video.device, dtype=video.dtype)
            x_t = ab.sqrt() * target + (1 - ab).sqrt() * eps
            pred = self.model.denoise_fn(x_t, t.float() / self.cfg.timesteps, context)
        rec = F.mse_loss(pred, target)
        kl = 0.5 * (mean.pow(2) + logvar.exp() - 1 - logvar).mean()
        out = {"rec": rec, "kl": kl}
        loss = rec + kl_weight * kl
        if perceptual is not None and perceptual_weight:
            frames = lambda v: v.transpose(1, 2).flatten(0, 1)  # noqa: E731
            p = perceptual(frames(pred), frames(target)).mean()
            out["perceptual"] = p
            loss = loss + perceptual_weight * p
        out["loss"] = loss
        return out

    # ---- checkpoints
    checkpoint_format = "mmeff.cdt"
    checkpoint_what = "a CDT checkpoint written by CDT.save"

    def checkpoint_config(self) -> dict[str, Any]:
        """The :class:`CDTConfig` as a dict, what :meth:`save` stores."""
        return asdict(self.cfg)

    @classmethod
    def from_checkpoint_config(cls, config: dict[str, Any]) -> CDT:
        """The model of a stored :class:`CDTConfig`."""
        return cls(CDTConfig(**config))

    @classmethod
    def load(cls, path: str | Path, map_location: str | torch.device = "cpu") -> CDT:
        """Read a file written by :meth:`save` (:meth:`Checkpointable.load`)."""
        return super().load(path, map_location)

    def load_official(self, path: str | Path, trust_pickle: bool = False) -> CDT:
        """Load an official checkpoint (``cdt_base.ckpt`` into ``cdt_base``, ``cdt_small.ckpt`` into
        ``cdt_small``; ``.ckpt``/``.pt`` or ``.safetensors``), strictly. Returns ``self``.
        Checkpoints with numpy values or training-record objects are read without unpickling any class
        (:func:`mmeff.checkpoint.load_state` with ``records=True``); dict subclasses such as Lightning's
        ``AttributeDict`` hyper-parameters cannot be, and need ``trust_pickle``.
        ``trust_pickle``: also read checkpoints that pickle other Python objects (runs code from the file;
        only for files you trust)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no such file: {path} (expected an official CDT checkpoint)")
        if trust_pickle and path.suffix != ".safetensors":  # the caller's explicit opt-in, said out loud
            warnings.warn(f"{path}: trust_pickle=True unpickles the file, which can run code from it", stacklevel=2)
            sd = torch.load(path, map_location="cpu", weights_only=False)
            for key in ("state_dict", "module"):
                if isinstance(sd, dict) and isinstance(sd.get(key), dict):
                    sd = sd[key]
        else:  # safetensors, or a pickle whose numpy values and training records load inert
            try:
                sd = read_tensors(path, "an official CDT checkpoint")
            except ValueError as e:
                raise ValueError(f"{e}; if you trust the file, load it with load_official(path, "
                                 f"trust_pickle=True)") from e
        sd = {k: v.float() for k, v in sd.items()}
        result = self.load_state_dict(sd, strict=False)
        if result.missing_keys or result.unexpected_keys:
            raise ValueError(f"{path} does not match this configuration: missing {result.missing_keys[:8]} "
                             f"({len(result.missing_keys)}), unexpected {result.unexpected_keys[:8]} "
                             f"({len(result.unexpected_keys)})")
        return self


def param_counts(model: CDT) -> dict[str, int]:
    """Parameters of the ``encoder`` (with its moment head), ``context_decoder``, ``denoiser`` and ``total``."""
    c = model.encoder
    n = lambda mods: sum(p.numel() for m in mods for p in m.parameters())  # noqa: E731
    enc = n([c.enc, c.quant_conv, c.quant_conv_res])
    dec = n([c.post_quant_conv, c.post_quant_conv_res, c.dec])
    den = n([model.model.denoise_fn]) if model.model.denoise_fn is not None else 0
    return {"encoder": enc, "context_decoder": dec, "denoiser": den, "total": enc + dec + den}


# --------------------------------------------------------------------------------------------- registry
_CONFIGS: dict[str, dict[str, Any]] = {
    "cdt_base": {},
    "cdt_small": {"dim": 64, "space_down": (1, 1, 1, 0), "context_channels": 3, "upsample": "transpose",
                  "pad_mode": "replicate"},
    # the miniature `mmeff bench cdt` trains on two CPU cores, and its plain-VAE comparison point (same
    # encoder; the decoder widened to about the CDT decoder's parameter count)
    "cdt_mini": {"dim": 16, "dim_mults": (1, 2, 2, 2), "unet_dim": 8, "unet_mults": (1, 2, 2, 3, 3, 3),
                 "latent_channels": 8, "context_channels": 8, "space_down": (0, 1, 1, 1)},
    "vae_mini": {"dim": 16, "dim_mults": (1, 2, 2, 2), "decoder_dim": 28, "latent_channels": 8,
                 "context_channels": 3, "decoder": "vae", "space_down": (0, 1, 1, 1)},
    "cdt_tiny": {"dim": 4, "dim_mults": (1, 2, 2, 2), "unet_dim": 4, "unet_mults": (1, 1, 2, 2, 2, 2),
                 "latent_channels": 4, "context_channels": 4},
    "vae_tiny": {"dim": 4, "dim_mults": (1, 2, 2, 2), "latent_channels": 4, "context_channels": 3,
                 "decoder": "vae"},
}


def list_models() -> list[str]:
    """Registered CDT configurations."""
    return sorted(_CONFIGS)


def create_model(name: str, pretrained: str | None = None, **kwargs: Any) -> CDT:
    """Build a registered configuration (``kwargs`` override :class:`CDTConfig` fields). ``pretrained``:
    a file written by :meth:`CDT.save` (its config must match), or an official ``.ckpt``."""
    if name not in _CONFIGS:
        raise KeyError(f"unknown CDT model {name!r}; known: {', '.join(list_models())}")
    known = {f.name for f in fields(CDTConfig)}
    bad = sorted(set(kwargs) - known)
    if bad:
        raise TypeError(f"unknown CDTConfig fields {bad}; known: {sorted(known)}")
    model = CDT(CDTConfig(**{**_CONFIGS[name], **kwargs}))
    if pretrained is not None:
        if str(pretrained).endswith((".ckpt", ".pt", ".pth")):
            return model.load_official(pretrained)
        loaded = CDT.load(pretrained)
        if loaded.cfg != model.cfg:
            diff = {k: (v, getattr(loaded.cfg, k)) for k, v in asdict(model.cfg).items() if getattr(loaded.cfg, k) != v}
            raise ValueError(f"{pretrained} was saved with another configuration (built vs saved): {diff}")
        model = loaded
    return model


_SUMMARIES = {
    "cdt_base": "CDT-base video tokenizer (8x8 spatial, 4x temporal, 16 latent channels; reads cdt_base.ckpt)",
    "cdt_small": "CDT-small video tokenizer (8x8 spatial, 4x temporal, 3-channel context; reads cdt_small.ckpt)",
    "cdt_mini": "CDT miniature (width 16, 8 latent channels) that the CDT bench trains on CPU",
    "vae_mini": "plain-VAE comparison point of cdt_mini (same encoder, a deterministic decoder of similar size)",
    "cdt_tiny": "CDT for tests (width 4, 4 latent channels)",
    "vae_tiny": "plain VAE for tests (width 4, 4 latent channels)",
}


register_family("cdt", _SUMMARIES, create_model)
