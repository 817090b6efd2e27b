"""CDT: architecture sizes, causality, chunked = whole coding through the caches, the diffusion sampler
against a hand-written DDIM, training (losses, gradients, exact resume), checkpoints and bad input."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import mmeff
from mmeff.models.cdt import (
    CDT,
    CausalConv3d,
    CDTConfig,
    ResnetBlock,
    TimeDownsample,
    TimeUpsample,
    cosine_alphas_cumprod,
    create_model,
    param_counts,
    sampling_timesteps,
)

# a tiny CDT-small: replicate padding, transposed-conv upsampling, 3-channel context
SMALL_TINY = {"dim": 4, "dim_mults": (1, 2, 2, 2), "space_down": (1, 1, 1, 0), "context_channels": 3,
              "upsample": "transpose", "pad_mode": "replicate", "unet_dim": 4, "unet_mults": (1, 1, 2, 2, 2, 2),
              "latent_channels": 4}


def _video(b: int = 1, t: int = 9, h: int = 32, w: int = 32, seed: int = 0, dtype=torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(b, 3, t, h, w, generator=g, dtype=dtype) * 2 - 1)


def _tiny(name: str = "cdt_tiny", **kw) -> CDT:
    torch.manual_seed(0)
    return create_model(name, **kw).double().eval()


def test_paper_sizes_match_the_official_parameter_counts() -> None:
    # the spec computed base 43.4 / 44.5 / 104.7 M and small 10.3 / 10.2 / 100.2 M from the official code
    with torch.device("meta"):
        base, small = create_model("cdt_base"), create_model("cdt_small")
    b, s = param_counts(base), param_counts(small)
    # (small's denoiser has 100,148,419: the spec's one-decimal figure rounds 100.15 up)
    for got, want in ((b, (43.4, 44.5, 104.7, 193)), (s, (10.3, 10.2, 100.2, 121))):
        parts = [got[k] / 1e6 for k in ("encoder", "context_decoder", "denoiser", "total")]
        assert all(abs(p - w) <= 0.06 for p, w in zip(parts[:3], want[:3])), parts
        assert round(parts[3]) == want[3]
    assert base.cfg.space_factor == 8 and base.cfg.time_factor == 4 and base.cfg.latent_channels == 16
    assert base.cfg.unet_space_down == (0, 1, 1, 1, 1, 0) and small.cfg.unet_space_down == (1, 1, 1, 0, 1, 0)


def test_registry_and_shapes() -> None:
    assert {"cdt_base", "cdt_small", "cdt_mini", "vae_mini", "cdt_tiny"} <= set(mmeff.list_models("cdt"))
    m = mmeff.create_model("cdt_tiny").double().eval()
    v = _video(2, 17, 32, 48)
    z = m.encode(v)
    assert z.shape == (2, 4, 5, 4, 6) == m.latent_shape(v.shape)
    rec = m.decode(z)
    assert rec.shape == v.shape and rec.abs().max() <= 1
    one = m.encode(_video(1, 1, 32, 32))  # an image: one frame, one latent frame
    assert one.shape == (1, 4, 1, 4, 4) and m.decode(one).shape == (1, 3, 1, 32, 32)


def test_weights_are_not_zero_initialised() -> None:
    # the official CausalConv3d zero-initialises every weight: a model trained from it would learn nothing
    m = create_model("cdt_tiny")
    convs = [mod for mod in m.modules() if isinstance(mod, CausalConv3d)]
    assert convs and all(float(c.weight.detach().abs().sum()) > 0 for c in convs)


def test_causal_conv_matches_an_explicit_front_pad() -> None:
    torch.manual_seed(0)
    for mode in ("constant", "replicate"):
        conv = CausalConv3d(3, 5, 3, padding=1, pad_mode=mode).double()
        x = torch.randn(2, 3, 6, 8, 8, dtype=torch.float64)
        ref = F.conv3d(F.pad(x, (1, 1, 1, 1, 2, 0), mode=mode), conv.weight, conv.bias)
        torch.testing.assert_close(conv(x), ref)
    with pytest.raises(ValueError, match="temporal stride 1"):
        CausalConv3d(3, 3, 3, stride=(2, 1, 1))


def test_time_resampling_starts_as_frame_sum_and_repeat() -> None:
    x = torch.randn(1, 2, 5, 3, 3, dtype=torch.float64)
    down = TimeDownsample(2).double()
    y = down(x)
    assert y.shape[2] == 3  # (5 - 1) // 2 + 1: the first frame alone, then pairs
    torch.testing.assert_close(y[:, :, 0], x[:, :, 0])  # zero padding + frame 0
    torch.testing.assert_close(y[:, :, 1], x[:, :, 1] + x[:, :, 2])
    torch.testing.assert_close(y[:, :, 2], x[:, :, 3] + x[:, :, 4])
    up = TimeUpsample(2).double()
    z = up(y)
    assert z.shape[2] == 5  # 2 * 3 - 1: the first latent frame gives one frame
    torch.testing.assert_close(z[:, :, 0], y[:, :, 0])
    torch.testing.assert_close(z[:, :, 1], y[:, :, 1])
    torch.testing.assert_close(z[:, :, 2], y[:, :, 1])


@pytest.mark.parametrize("cfg", ["cdt_tiny", "small"])
def test_encoder_and_decoder_are_causal(cfg: str) -> None:
    m = _tiny() if cfg == "cdt_tiny" else CDT(CDTConfig(**SMALL_TINY)).double().eval()
    v = _video(1, 13, 16, 16)
    w = v.clone()
    w[:, :, 5:] = _video(1, 8, 16, 16, seed=1)  # change frames 5..12 (latent frames 2..3)
    za, zb = m.encode(v), m.encode(w)
    torch.testing.assert_close(za[:, :, :2], zb[:, :, :2])  # latent j sees frames <= 4j only
    assert (za[:, :, 2:] - zb[:, :, 2:]).abs().max() > 1e-3
    zc = za.clone()
    zc[:, :, 2:] = zb[:, :, 2:]
    ra, rc = m.decode(za, steps=2), m.decode(zc, steps=2)
    torch.testing.assert_close(ra[:, :, :5], rc[:, :, :5])  # frames 0..4 decode from latents 0..1
    assert (ra[:, :, 5:] - rc[:, :, 5:]).abs().max() > 1e-4


@pytest.mark.parametrize("cfg", ["cdt_tiny", "small", "vae_tiny"])
def test_chunked_coding_equals_the_whole_video(cfg: str) -> None:
    m = CDT(CDTConfig(**SMALL_TINY)).double().eval() if cfg == "small" else _tiny(cfg)
    v = _video(1, 17, 16, 16)
    z = m.encode(v)
    for chunk in (4, 8, 12):
        torch.testing.assert_close(m.encode(v, chunk_frames=chunk), z, rtol=1e-9, atol=1e-9)
    for steps in ((1, 3) if m.cfg.decoder == "diffusion" else (1,)):
        whole = m.decode(z, steps=steps)
        for chunk in (1, 3):
            torch.testing.assert_close(m.decode(z, steps=steps, chunk_latents=chunk), whole, rtol=1e-9, atol=1e-9)
    # the caches carry what the next chunk needs: decoding the chunks independently is not the same video
    pieces = [m.decode(z[:, :, :1])] + [m.decode(z[:, :, a - 1:a + 1])[:, :, 1:] for a in range(1, z.shape[2])]
    assert (torch.cat(pieces, 2) - m.decode(z)).abs().max() > 1e-4
    # and state never leaks out of a call
    assert all(mod.cache is None and not mod.streaming for mod in m._stateful())


def test_faithful_chunks_reproduce_the_official_uncached_block() -> None:
    """The official chunked decode calls the context decoder's last-level ResnetBlock without its cache:
    ``faithful=True`` reproduces it. Whole-video decodes and the first chunk are unaffected; later chunks
    change; configurations without that block (the small layout) are unaffected; no state leaks."""
    m = _tiny()
    assert isinstance(m.encoder.dec[-1][1], ResnetBlock) and m._uncached_in_official()
    z = m.encode(_video(1, 21, 16, 16))
    whole, fixed = m.decode(z, steps=2), m.decode(z, steps=2, chunk_latents=2)
    torch.testing.assert_close(m.decode(z, steps=2, faithful=True), whole, rtol=1e-9, atol=1e-9)
    official = m.decode(z, steps=2, chunk_latents=2, faithful=True)
    torch.testing.assert_close(official[:, :, :5], fixed[:, :, :5], rtol=1e-9, atol=1e-9)  # chunk 0: no past
    assert (official[:, :, 5:] - whole[:, :, 5:]).abs().max() > 1e-4
    # the uncached block alone, run chunk by chunk with causal padding, gives the official context
    up = m.encoder.dec[-1][1]
    seen = []
    handle = up.register_forward_hook(lambda mod, inp, out: seen.append((inp[0], out)))
    try:
        m.decode(z, steps=1, chunk_latents=2, faithful=True)
    finally:
        handle.remove()
    for x, y in seen:
        torch.testing.assert_close(up(x), y, rtol=0, atol=0)  # streaming off: each call a whole video
    assert all(mod.cache is None and not mod.streaming for mod in m._stateful())
    small = CDT(CDTConfig(**SMALL_TINY)).double().eval()
    assert small._uncached_in_official() == []
    zs = small.encode(_video(1, 17, 16, 16))
    torch.testing.assert_close(small.decode(zs, chunk_latents=2, faithful=True), small.decode(zs), rtol=1e-9, atol=1e-9)


def test_decode_stream_yields_chunks_of_the_video() -> None:
    m = _tiny()
    z = m.encode(_video(1, 21, 16, 16))
    parts = list(m.decode_stream(z, steps=2, chunk_latents=2))
    assert [p.shape[2] for p in parts] == [5, 8, 8]
    torch.testing.assert_close(torch.cat(parts, 2), m.decode(z, steps=2), rtol=1e-9, atol=1e-9)


def test_schedule_and_timesteps() -> None:
    n, s = 8192, 0.008
    f = [math.cos(((i / n) + s) / (1 + s) * math.pi / 2) ** 2 for i in range(n + 1)]
    betas = np.clip([1 - f[i + 1] / f[i] for i in range(n)], 0, 0.999)
    ref = np.cumprod(1 - betas)
    ab = cosine_alphas_cumprod(n).numpy()
    np.testing.assert_allclose(ab, ref, rtol=1e-10, atol=0)
    assert ab[0] > 0.9999 and ab[-1] < 1e-6
    assert sampling_timesteps(1).tolist() == [8191]
    assert sampling_timesteps(3).tolist() == [0, 4095, 8191]
    with pytest.raises(ValueError, match="steps must be >= 1"):
        sampling_timesteps(0)


def test_sampler_is_ddim_from_point_eight_noise() -> None:
    m = _tiny()
    z = m.encode(_video(1, 9, 16, 16))
    ctx = m.encoder.decode(z)
    g = torch.Generator().manual_seed(0)
    noise = 0.8 * torch.stack([torch.randn((1, 3, 16, 16), generator=g) for _ in range(9)], 2).double()
    unet, ab = m.model.denoise_fn, cosine_alphas_cumprod(8192).double()
    # one step: x0 predicted at t = 8191 / 8192 from the noise alone
    one = unet(noise, torch.tensor([8191 / 8192]), ctx).clamp(-1, 1)
    torch.testing.assert_close(m.decode(z, steps=1), one, rtol=1e-5, atol=1e-5)
    # three steps: DDIM (eta 0) over t = 8191, 4095, 0, written out here independently
    x = noise
    ts = [8191, 4095, 0]
    for i, t in enumerate(ts):
        x0 = unet(x, torch.tensor([t / 8192]), ctx)
        if i == len(ts) - 1:
            x = x0
            break
        a, a_next = ab[t], ab[ts[i + 1]]
        eps = (x - a.sqrt() * x0) / (1 - a).sqrt()
        x = a_next.sqrt() * x0 + (1 - a_next).sqrt() * eps
    torch.testing.assert_close(m.decode(z, steps=3), x.clamp(-1, 1), rtol=1e-5, atol=1e-5)
    # the seed fixes the noise; another seed gives another sample, and explicit noise is used as given
    assert (m.decode(z, seed=1) - m.decode(z, seed=0)).abs().max() > 1e-4
    torch.testing.assert_close(m.decode(z, noise=noise), one, rtol=1e-5, atol=1e-5)


def test_reconstruct_pads_any_size_and_crops_back() -> None:
    m = _tiny()
    v = _video(1, 7, 20, 30)
    rec = m.reconstruct(v)
    assert rec.shape == v.shape
    padded = F.pad(v, (0, 2, 0, 12, 0, 2), mode="replicate")  # 9 frames of 32x32
    torch.testing.assert_close(rec, m.decode(m.encode(padded))[:, :, :7, :20, :30])
    torch.testing.assert_close(m.reconstruct(v, chunk_frames=4), rec, rtol=1e-9, atol=1e-9)


def test_bad_input_is_named() -> None:
    m = _tiny()
    with pytest.raises(ValueError, match=r"1 \+ 4k frames"):
        m.encode(_video(1, 8, 32, 32))
    with pytest.raises(ValueError, match="not a multiple of 16"):
        m.encode(_video(1, 9, 24, 32))
    with pytest.raises(ValueError, match="float videos"):
        m.encode(torch.zeros(1, 3, 9, 32, 32, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"\(B, 3, T, H, W\)"):
        m.encode(torch.zeros(3, 9, 32, 32))
    with pytest.raises(ValueError, match="multiple of 4"):
        m.encode(_video(1, 9, 32, 32), chunk_frames=6)
    with pytest.raises(ValueError, match=r"latents have shape \(B, 4"):
        m.decode(torch.zeros(1, 8, 2, 4, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match="latent size"):
        m.decode(torch.zeros(1, 4, 2, 3, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match="noise must have shape"):
        m.decode(torch.zeros(1, 4, 2, 4, 4, dtype=torch.float64), noise=torch.zeros(1, 3, 4, 32, 32))
    with pytest.raises(ValueError, match="plain VAE decodes in one pass"):
        _tiny("vae_tiny").decode(torch.zeros(1, 4, 1, 4, 4, dtype=torch.float64), steps=2)
    with pytest.raises(ValueError, match="context_channels=3"):
        CDTConfig(decoder="vae")
    with pytest.raises(KeyError, match="unknown CDT model"):
        create_model("cdt_huge")
    with pytest.raises(TypeError, match="unknown CDTConfig fields"):
        create_model("cdt_tiny", width=3)


@pytest.mark.parametrize("name", ["cdt_tiny", "vae_tiny"])
def test_losses_reach_every_parameter_and_training_fits_a_clip(name: str) -> None:
    from mmeff.eval.perceptual import SSIMLoss

    torch.manual_seed(0)
    m = create_model(name)
    # smooth content a 4-channel latent can hold (random pixels cannot be compressed)
    v = F.interpolate(_video(2, 5, 4, 4, dtype=torch.float32), size=(5, 16, 16), mode="trilinear")
    parts = m.training_losses(v, perceptual=SSIMLoss())
    assert set(parts) == {"rec", "kl", "perceptual", "loss"}
    parts["loss"].backward()
    missing = [n for n, p in m.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, missing
    opt = torch.optim.Adam(m.parameters(), 3e-3)
    losses = []
    for _ in range(40):
        # the same diffusion step, noise and latent draw every time: a fixed objective to fit
        loss = m.training_losses(v, generator=torch.Generator().manual_seed(0))["rec"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.5 * losses[0], losses


def test_kl_is_the_gaussian_kl() -> None:
    m = _tiny()
    v = _video(1, 5, 16, 16)
    mean, logvar = m.encode_posterior(v)
    q = torch.distributions.Normal(mean, (0.5 * logvar).exp())
    ref = torch.distributions.kl_divergence(q, torch.distributions.Normal(0.0, 1.0)).mean()
    torch.testing.assert_close(m.training_losses(v, kl_weight=1.0)["kl"], ref)


def test_save_load_and_official_checkpoints(tmp_path: Path) -> None:
    m = _tiny()
    path = m.save(tmp_path / "cdt.safetensors")
    loaded = create_model("cdt_tiny", pretrained=str(path)).double()
    z = m.encode(_video())
    torch.testing.assert_close(loaded.encode(_video()), z)
    with pytest.raises(ValueError, match="another configuration"):
        create_model("cdt_tiny", pretrained=str(path), latent_channels=8)
    with pytest.raises(ValueError, match="not a CDT checkpoint"):
        from mmeff.checkpoint import save_module

        CDT.load(save_module(m, tmp_path / "other.safetensors", "mmeff.other", {}))
    # official layout: {"state_dict": {...}} in a .ckpt, module names as in ali-vilab/CDT
    sd = {k: v.half() for k, v in m.state_dict().items()}
    torch.save({"state_dict": sd}, tmp_path / "cdt.ckpt")
    off = create_model("cdt_tiny", pretrained=str(tmp_path / "cdt.ckpt")).double()
    torch.testing.assert_close(off.encode(_video()), z, rtol=5e-2, atol=5e-2)
    assert any(k.startswith("model.context_fn.enc.0.0.block1.block.0") for k in sd)
    assert any(k.startswith("model.denoise_fn.downs.0.2.fn.fn.to_qkv") for k in sd)
    torch.save({"state_dict": sd, "callbacks": {"cb": Path("x")}}, tmp_path / "pickled.ckpt")
    with pytest.raises(ValueError, match="trust_pickle=True"):
        create_model("cdt_tiny").load_official(tmp_path / "pickled.ckpt")
    with pytest.warns(UserWarning, match="trust_pickle=True unpickles the file"):
        create_model("cdt_tiny").load_official(tmp_path / "pickled.ckpt", trust_pickle=True)
    # numpy values beside the weights (as Lightning / MMEngine write them) need no trust
    import numpy as np

    torch.save({"state_dict": sd, "epoch": np.int64(3), "lr": np.float64(1e-4)}, tmp_path / "lightning.ckpt")
    lit = create_model("cdt_tiny").load_official(tmp_path / "lightning.ckpt").double()
    torch.testing.assert_close(lit.encode(_video()), off.encode(_video()))
    sd["model.extra.weight"] = torch.zeros(1)
    del sd["model.denoise_fn.final_conv.1.weight"]
    torch.save(sd, tmp_path / "bad.ckpt")
    with pytest.raises(ValueError, match=r"missing \['model.denoise_fn.final_conv.1.weight'\].*unexpected"):
        create_model("cdt_tiny", pretrained=str(tmp_path / "bad.ckpt"))
