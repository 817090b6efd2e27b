"""The layers of CDT (:mod:`mmeff.models.cdt`): causal 3-D ops, the configuration, the encoder / context
decoder (:class:`Compressor`) and the denoiser (:class:`Unet`).

Every temporal operator is causal and, inside :meth:`CDT.streaming <mmeff.models.cdt.CDT.streaming>`,
carries what the next chunk needs (:class:`Streaming`), so a video coded chunk by chunk equals the
whole-video pass. Module names follow the official checkpoint layout. Videos are ``(B, 3, T, H, W)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["Block", "CDTConfig", "CausalConv3d", "Compressor", "Downsample", "LayerNorm", "LinearAttention",
           "PreNorm", "Residual", "ResnetBlock", "Streaming", "TimeDownsample", "TimeUpsample", "Unet",
           "Upsample"]


# --------------------------------------------------------------------------------------------- causal ops
class Streaming:
    """Mixin of modules with temporal state: ``streaming`` on means calls are consecutive chunks of one
    video and ``cache`` carries what the next chunk needs; off means every call is a whole video."""

    streaming: bool = False
    cache: Any = None

    def reset_stream(self) -> None:
        """Forget the carried state (the next call starts a video)."""
        self.cache = None


class CausalConv3d(nn.Conv3d, Streaming):
    """``nn.Conv3d`` padded causally in time: ``k_t - 1`` frames in front (``2 * pad_t``), none behind;
    spatial padding ``padding[1:]`` on both sides, with ``pad_mode`` ``"constant"`` (zeros) or
    ``"replicate"``. Temporal stride must be 1. ``(B, C, T, H, W) -> (B, C', T, H', W')``."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int | Sequence[int],
                 stride: int | Sequence[int] = 1, padding: int | Sequence[int] = 0, bias: bool = True,
                 pad_mode: str = "constant") -> None:
        k = (kernel_size,) * 3 if isinstance(kernel_size, int) else tuple(kernel_size)
        p = (padding,) * 3 if isinstance(padding, int) else tuple(padding)
        s = (stride,) * 3 if isinstance(stride, int) else tuple(stride)
        if s[0] != 1:
            raise ValueError("CausalConv3d supports temporal stride 1 only (use TimeDownsample)")
        if pad_mode not in ("constant", "replicate"):
            raise ValueError(f"pad_mode must be 'constant' or 'replicate', got {pad_mode!r}")
        super().__init__(in_channels, out_channels, k, s, 0, bias=bias)
        self.pad_mode = pad_mode
        self.time_pad = 2 * p[0]
        self.space_pad = (p[2], p[2], p[1], p[1])

    def forward(self, x: Tensor) -> Tensor:  # noqa: D102
        front = self.time_pad
        if self.time_pad and self.streaming:
            past = self.cache
            if past is not None:
                x = torch.cat([past, x], dim=2)
                front = max(0, self.time_pad - past.shape[2])
            self.cache = x[:, :, -self.time_pad:]
        pad = (*self.space_pad, front, 0)
        if any(pad):
            x = F.pad(x, pad, mode=self.pad_mode)
        return super().forward(x)


class TimeDownsample(nn.Module, Streaming):
    """Causal stride-2 temporal conv (kernel 3, two frames of front padding), per pixel; starts as the
    sum of each window's last two frames. ``(B, C, T, H, W) -> (B, C', (T - 1) // 2 + 1, H, W)``."""

    def __init__(self, dim: int, dim_out: int | None = None, pad_mode: str = "constant") -> None:
        super().__init__()
        dim_out = dim_out or dim
        self.pad_mode = pad_mode
        self.conv = nn.Conv1d(dim, dim_out, 3, stride=2)
        with torch.no_grad():
            self.conv.weight.zero_()
            self.conv.bias.zero_()
            idx = torch.arange(min(dim, dim_out))
            self.conv.weight[idx, idx, 1] = 1.0
            self.conv.weight[idx, idx, 2] = 1.0

    def forward(self, x: Tensor) -> Tensor:  # noqa: D102
        b, c, t, h, w = x.shape
        seq = x.permute(0, 3, 4, 1, 2).reshape(b * h * w, c, t)
        if self.streaming and self.cache is not None:
            seq = torch.cat([self.cache, seq], dim=2)
        else:
            seq = F.pad(seq, (2, 0), mode=self.pad_mode) if self.pad_mode == "constant" else \
                torch.cat([seq[:, :, :1].expand(-1, -1, 2), seq], dim=2)
        n = (seq.shape[2] - 3) // 2 + 1 if seq.shape[2] >= 3 else 0
        if self.streaming:
            # the next output window starts at frame 2n of this padded sequence
            self.cache = seq[:, :, 2 * n:]
        if n == 0:
            raise ValueError("TimeDownsample got too few frames for one output; chunks must hold at least "
                             "one frame at the start of a video and an even number after it")
        out = self.conv(seq[:, :, : 2 * n + 1])
        return out.reshape(b, h, w, -1, n).permute(0, 3, 4, 1, 2).contiguous()


class TimeUpsample(nn.Module, Streaming):
    """1x1 conv to twice the channels, interleaved into twice the frames (both copies start as the
    identity); the first frame of a video yields one frame. ``(B, C, T, H, W) -> (B, C, 2T (- 1), H, W)``."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.conv = nn.Conv1d(dim, dim * 2, 1)
        with torch.no_grad():
            self.conv.weight.zero_()
            self.conv.bias.zero_()
            idx = torch.arange(dim)
            self.conv.weight[2 * idx, idx, 0] = 1.0
            self.conv.weight[2 * idx + 1, idx, 0] = 1.0

    def forward(self, x: Tensor) -> Tensor:  # noqa: D102
        b, c, t, h, w = x.shape
        seq = x.permute(0, 3, 4, 1, 2).reshape(b * h * w, c, t)
        out = self.conv(seq).reshape(b * h * w, c, 2, t).transpose(2, 3).reshape(b, h, w, c, 2 * t)
        out = out.permute(0, 3, 4, 1, 2)
        started = self.streaming and self.cache is not None
        if self.streaming:
            self.cache = True
        return (out if started else out[:, :, 1:]).contiguous()


class LayerNorm(nn.Module):
    """LayerNorm over the channel axis of ``(B, C, T, H, W)``."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.g = nn.Parameter(torch.ones(1, dim, 1, 1, 1))
        self.b = nn.Parameter(torch.zeros(1, dim, 1, 1, 1))

    def forward(self, x: Tensor) -> Tensor:  # noqa: D102
        var, mean = torch.var_mean(x, dim=1, unbiased=False, keepdim=True)
        return (x - mean) * torch.rsqrt(var + self.eps) * self.g + self.b


class Block(nn.Module):
    """Causal conv (3x3x3, or 3x7x7 when ``large``) -> channel LayerNorm -> ReLU."""

    def __init__(self, dim: int, dim_out: int, large: bool = False, pad_mode: str = "constant") -> None:
        super().__init__()
        k, p = ((3, 7, 7), (1, 3, 3)) if large else ((3, 3, 3), (1, 1, 1))
        self.block = nn.ModuleList([CausalConv3d(dim, dim_out, k, padding=p, pad_mode=pad_mode),
                                    LayerNorm(dim_out), nn.ReLU()])

    def forward(self, x: Tensor) -> Tensor:  # noqa: D102
        for layer in self.block:
            x = layer(x)
        return x


class ResnetBlock(nn.Module):
    """Two :class:`Block` s with a 1x1 shortcut; a time embedding ``(B, E)`` is added after the first."""

    def __init__(self, dim: int, dim_out: int, time_dim: int | None = None, large: bool = False,
                 pad_mode: str = "constant") -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.LeakyReLU(0.2), nn.Linear(time_dim, dim_out)) if time_dim else None
        self.block1 = Block(dim, dim_out, large, pad_mode)
        self.block2 = Block(dim_out, dim_out, pad_mode=pad_mode)
        self.res_conv = CausalConv3d(dim, dim_out, 1) if dim != dim_out else nn.Identity()

    def forward(self, x: Tensor, time_emb: Tensor | None = None) -> Tensor:  # noqa: D102
        h = self.block1(x)
        if self.mlp is not None and time_emb is not None:
            h = h + self.mlp(time_emb)[:, :, None, None, None]
        return self.block2(h) + self.res_conv(x)


class LinearAttention(nn.Module):
    """One-head linear attention within each frame (softmax over channels for q, positions for k)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.scale = dim**-0.5
        self.to_qkv = CausalConv3d(dim, dim * 3, 1, bias=False)
        self.to_out = CausalConv3d(dim, dim, 1)

    def forward(self, x: Tensor) -> Tensor:  # noqa: D102
        b, c, t, h, w = x.shape
        q, k, v = (z.permute(0, 2, 1, 3, 4).reshape(b * t, c, h * w) for z in self.to_qkv(x).chunk(3, dim=1))
        q = q.softmax(dim=-2) * self.scale
        k = k.softmax(dim=-1)
        ctx = torch.bmm(k, v.transpose(1, 2))  # (bt, d, e)
        out = torch.bmm(ctx.transpose(1, 2), q)  # (bt, e, n)
        return self.to_out(out.reshape(b, t, c, h, w).permute(0, 2, 1, 3, 4))


class PreNorm(nn.Module):
    """Channel LayerNorm, then ``fn``."""

    def __init__(self, dim: int, fn: nn.Module) -> None:
        super().__init__()
        self.fn = fn
        self.norm = LayerNorm(dim)

    def forward(self, x: Tensor) -> Tensor:  # noqa: D102
        return self.fn(self.norm(x))


class Residual(nn.Module):
    """``fn(x) + x``."""

    def __init__(self, fn: nn.Module) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x: Tensor) -> Tensor:  # noqa: D102
        return self.fn(x) + x


class Downsample(nn.Module):
    """Causal ``(1, 3, 3)`` conv of spatial stride 2: ``(B, C, T, H, W) -> (B, C', T, H/2, W/2)``."""

    def __init__(self, dim: int, dim_out: int | None = None, pad_mode: str = "constant") -> None:
        super().__init__()
        self.conv = CausalConv3d(dim, dim_out or dim, (1, 3, 3), (1, 2, 2), (0, 1, 1), pad_mode=pad_mode)

    def forward(self, x: Tensor) -> Tensor:  # noqa: D102
        if x.shape[-1] % 2 or x.shape[-2] % 2:
            raise ValueError(f"spatial downsampling needs even sizes, got {tuple(x.shape[-2:])}")
        return self.conv(x)


class Upsample(nn.Module):
    """Spatial x2: nearest-exact + causal ``(1, 5, 5)`` conv (``mode="nearest"``, base) or a
    ``(1, 5, 5)`` transposed conv (``mode="transpose"``, small)."""

    def __init__(self, dim: int, dim_out: int | None = None, mode: str = "nearest",
                 pad_mode: str = "constant") -> None:
        super().__init__()
        dim_out = dim_out or dim
        self.mode = mode
        if mode == "nearest":
            self.conv: nn.Module = CausalConv3d(dim, dim_out, (1, 5, 5), padding=(0, 2, 2), pad_mode=pad_mode)
        elif mode == "transpose":
            self.conv = nn.ConvTranspose3d(dim, dim_out, (1, 5, 5), (1, 2, 2), (0, 2, 2), output_padding=(0, 1, 1))
        else:
            raise ValueError(f"upsample must be 'nearest' or 'transpose', got {mode!r}")

    def forward(self, x: Tensor) -> Tensor:  # noqa: D102
        if self.mode == "nearest":
            # half-precision nearest interpolation is not supported everywhere; it is exact in float32
            y = x if x.dtype in (torch.float32, torch.float64) else x.float()
            x = F.interpolate(y, scale_factor=(1.0, 2.0, 2.0), mode="nearest-exact").to(x.dtype)
        return self.conv(x)


# --------------------------------------------------------------------------------------------- config
@dataclass(frozen=True)
class CDTConfig:
    """A CDT (or, with ``decoder="vae"``, a plain VAE) configuration. Defaults are CDT-base.

    ``dim``/``dim_mults``: encoder widths; ``decoder_dim``: context-decoder base width (default ``dim``);
    ``space_down``/``time_down``: which encoder levels halve space / time; ``latent_channels``;
    ``context_channels``: channels of the finest context map (3 for small, and RGB for ``decoder="vae"``);
    ``upsample`` ``"nearest"`` or ``"transpose"``; ``pad_mode`` ``"constant"`` or ``"replicate"``;
    ``unet_dim``/``unet_mults``/``condition_levels``: the denoiser; ``timesteps``; ``sample_gamma``: the
    initial-noise scale; ``latent_scale``: the factor a latent-diffusion model multiplies latents by.
    """

    dim: int = 128
    dim_mults: tuple[int, ...] = (1, 2, 3, 4)
    decoder_dim: int | None = None
    space_down: tuple[int, ...] = (0, 1, 1, 1)
    time_down: tuple[int, ...] = (0, 0, 1, 1)
    latent_channels: int = 16
    context_channels: int = 16
    upsample: str = "nearest"
    pad_mode: str = "constant"
    decoder: str = "diffusion"
    unet_dim: int = 64
    unet_mults: tuple[int, ...] = (1, 2, 3, 4, 5, 6)
    condition_levels: int = 4
    timesteps: int = 8192
    sample_gamma: float = 0.8
    latent_scale: float = 1.3

    def __post_init__(self) -> None:
        for name in ("dim_mults", "space_down", "time_down", "unet_mults"):
            object.__setattr__(self, name, tuple(int(v) for v in getattr(self, name)))
        if not (len(self.dim_mults) == len(self.space_down) == len(self.time_down)):
            raise ValueError("dim_mults, space_down and time_down need one entry per encoder level")
        if self.decoder not in ("diffusion", "vae"):
            raise ValueError(f"decoder must be 'diffusion' or 'vae', got {self.decoder!r}")
        if self.decoder == "vae" and self.context_channels != 3:
            raise ValueError("decoder='vae' decodes to RGB: set context_channels=3")
        if self.decoder == "diffusion":
            if len(self.unet_mults) < len(self.dim_mults) + 2:
                raise ValueError("unet_mults needs at least two more levels than dim_mults")
            if not 1 <= self.condition_levels <= len(self.dim_mults):
                raise ValueError(f"condition_levels must be in 1..{len(self.dim_mults)}")

    @property
    def space_factor(self) -> int:
        """Pixels per latent, per side (8 for base and small)."""
        return 2 ** sum(self.space_down)

    @property
    def time_factor(self) -> int:
        """Frames per latent frame after the first (4)."""
        return 2 ** sum(self.time_down)

    @property
    def unet_space_down(self) -> tuple[int, ...]:
        """The denoiser's per-level spatial halving: the encoder's, ones, then none at the last level."""
        n = len(self.unet_mults)
        return self.space_down + (1,) * (n - len(self.space_down) - 1) + (0,)

    @property
    def unet_time_down(self) -> tuple[int, ...]:
        """The denoiser's per-level temporal halving: the encoder's, then none."""
        return self.time_down + (0,) * (len(self.unet_mults) - len(self.time_down))

    @property
    def spatial_multiple(self) -> int:
        """Frame height and width must be multiples of this (encoder and, for CDT, denoiser)."""
        if self.decoder == "vae":
            return self.space_factor
        return max(self.space_factor, 2 ** sum(self.unet_space_down))


# --------------------------------------------------------------------------------------------- networks
class Compressor(nn.Module):
    """The encoder (``encode``: video -> Gaussian moments) and the context decoder (``decode``: latent ->
    multi-scale context, finest first)."""

    def __init__(self, cfg: CDTConfig) -> None:
        super().__init__()
        pm = cfg.pad_mode
        dims = [3, *(cfg.dim * m for m in cfg.dim_mults)]
        enc_io = list(zip(dims[:-1], dims[1:]))
        ddim = cfg.decoder_dim or cfg.dim
        ddims = [*(ddim * m for m in cfg.dim_mults)]
        rev = [*reversed(ddims), cfg.context_channels]
        dec_io = list(zip(rev[:-1], rev[1:]))
        rsd, rtd = list(reversed(cfg.space_down)), list(reversed(cfg.time_down))
        lat = cfg.latent_channels
        self.enc = nn.ModuleList()
        for i, (a, b) in enumerate(enc_io):
            self.enc.append(nn.ModuleList([
                ResnetBlock(a, b, large=i == 0, pad_mode=pm),
                Downsample(b, pad_mode=pm) if cfg.space_down[i] else nn.Identity(),
                TimeDownsample(b, pad_mode=pm) if cfg.time_down[i] else nn.Identity(),
            ]))
        rdims = list(reversed(dims[1:]))
        self.quant_conv = nn.Conv3d(dims[-1], 2 * lat, 1)
        self.quant_conv_res = nn.ModuleList(
            [ResnetBlock(a, b, pad_mode=pm) for a, b in zip(rdims[:-1], rdims[1:])] + [nn.Conv3d(rdims[-1], 2 * lat, 1)])
        self.post_quant_conv = nn.Conv3d(lat, ddims[-1], 1)
        self.post_quant_conv_res = nn.ModuleList(
            [nn.Conv3d(lat, ddims[0], 1)] + [ResnetBlock(a, b, pad_mode=pm) for a, b in zip(ddims[:-1], ddims[1:])])
        self.dec = nn.ModuleList()
        for i, (a, b) in enumerate(dec_io):
            last = i == len(dec_io) - 1
            if rsd[i]:
                up: nn.Module = Upsample(a if last else b, b, cfg.upsample, pm)
            else:
                up = ResnetBlock(a, b, pad_mode=pm) if last else nn.Identity()
            self.dec.append(nn.ModuleList([
                ResnetBlock(a, a if last else b, pad_mode=pm),
                up,
                TimeUpsample(b) if rtd[i] else nn.Identity(),
            ]))

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(B, 3, T, H, W)`` -> ``(mean, logvar)``, each ``(B, C, T', H', W')``."""
        for res, down, tdown in self.enc:
            x = tdown(down(res(x)))
        h = self.quant_conv(x)
        for layer in self.quant_conv_res:
            x = layer(x)
        mean, logvar = (x + h).chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    def decode(self, z: Tensor) -> list[Tensor]:
        """Latent ``(B, C, T', H', W')`` -> context maps, finest first (for ``decoder="vae"`` the first
        is the RGB reconstruction ``(B, 3, T, H, W)``)."""
        h = self.post_quant_conv(z)
        for layer in self.post_quant_conv_res:
            z = layer(z)
        x = z + h
        outs = []
        for res, up, tup in self.dec:
            x = tup(up(res(x)))
            outs.append(x)
        return outs[::-1]


class Unet(nn.Module):
    """The conditional causal denoiser: ``(x_t (B, 3, T, H, W), t / timesteps (B, 1), context) -> x0``."""

    def __init__(self, cfg: CDTConfig) -> None:
        super().__init__()
        pm, d = cfg.pad_mode, cfg.unet_dim
        dims = [3, *(d * m for m in cfg.unet_mults)]
        io = list(zip(dims[:-1], dims[1:]))
        ddim = cfg.decoder_dim or cfg.dim
        ctx = [cfg.context_channels, *(ddim * m for m in cfg.dim_mults)]
        sd, td = cfg.unet_space_down, cfg.unet_time_down
        self.condition_levels = cfg.condition_levels
        self.time_mlp = nn.Sequential(nn.Linear(1, d * 4), nn.GELU(), nn.Linear(d * 4, d))
        self.downs = nn.ModuleList()
        for i, (a, b) in enumerate(io):
            cond = i < cfg.condition_levels and i < len(io) - 1
            self.downs.append(nn.ModuleList([
                ResnetBlock(a + (ctx[i] if cond else 0), b, d, large=i == 0, pad_mode=pm),
                ResnetBlock(b, b, d, pad_mode=pm),
                Residual(PreNorm(b, LinearAttention(b))),
                Downsample(b, pad_mode=pm) if sd[i] else nn.Identity(),
                TimeDownsample(b, pad_mode=pm) if td[i] else nn.Identity(),
            ]))
        mid = dims[-1]
        self.mid_block1 = ResnetBlock(mid, mid, d, pad_mode=pm)
        self.mid_attn = Residual(PreNorm(mid, LinearAttention(mid)))
        self.mid_block2 = ResnetBlock(mid, mid, d, pad_mode=pm)
        rsd, rtd = list(reversed(sd[:-1])), list(reversed(td[:-1]))
        self.ups = nn.ModuleList()
        for i, (a, b) in enumerate(reversed(io[1:])):
            self.ups.append(nn.ModuleList([
                ResnetBlock(b * 2, a, d, pad_mode=pm),
                ResnetBlock(a, a, d, pad_mode=pm),
                Residual(PreNorm(a, LinearAttention(a))),
                Upsample(a, mode=cfg.upsample, pad_mode=pm) if rsd[i] else nn.Identity(),
                TimeUpsample(a) if rtd[i] else nn.Identity(),
            ]))
        self.final_conv = nn.ModuleList([LayerNorm(d), CausalConv3d(d, 3, (3, 7, 7), padding=(1, 3, 3), pad_mode=pm)])

    def forward(self, x: Tensor, time: Tensor, context: Sequence[Tensor]) -> Tensor:  # noqa: D102
        t = self.time_mlp(time.to(self.time_mlp[0].weight.dtype).reshape(-1, 1))
        skips = []
        for i, (res1, res2, attn, down, tdown) in enumerate(self.downs):
            if i < self.condition_levels and i < len(self.downs) - 1:
                x = torch.cat([x, context[i].to(x.dtype)], dim=1)
            x = attn(res2(res1(x, t), t))
            if i:  # the first level's features feed no skip (as in the official network)
                skips.append(x)
            x = tdown(down(x))
        x = self.mid_block2(self.mid_attn(self.mid_block1(x, t)), t)
        for res1, res2, attn, up, tup in self.ups:
            x = torch.cat([x, skips.pop()], dim=1)
            x = tup(up(attn(res2(res1(x, t), t))))
        return self.final_conv[1](self.final_conv[0](x))
