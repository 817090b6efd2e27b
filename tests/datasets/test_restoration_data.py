"""Degradations (determinism, physics invariants) and the restoration datasets (synthetic and paired folders)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from mmeff.datasets.degradations import (
    DEGRADATIONS,
    add_haze,
    add_noise,
    degrade,
    gaussian_kernel,
    motion_kernel,
)
from mmeff.datasets.media import sample_image
from mmeff.datasets.restoration import (
    TASKS,
    DegradedImages,
    PairedFolder,
    photo_split,
    read_image,
    save_image,
    to_tensor,
    write_degraded,
)


@pytest.fixture(scope="module")
def photo() -> torch.Tensor:
    return to_tensor(sample_image("chelsea"))[:, :96, 100:228]


def _on_8bit_grid(x: torch.Tensor) -> bool:
    return bool(torch.allclose(x * 255, (x * 255).round(), atol=1e-4))


@pytest.mark.parametrize("kind", list(DEGRADATIONS))
def test_degradations_are_deterministic_in_range_and_8bit(photo: torch.Tensor, kind: str) -> None:
    a, b, c = degrade(photo, kind, seed=5), degrade(photo, kind, seed=5), degrade(photo, kind, seed=6)
    assert a.shape == photo.shape and torch.equal(a, b) and not torch.equal(a, c)
    assert float(a.min()) >= 0 and float(a.max()) <= 1 and _on_8bit_grid(a)
    assert not torch.equal(a, photo)


def test_task_names_alias_degradations_and_unknown_kinds_fail(photo: torch.Tensor) -> None:
    assert torch.equal(degrade(photo, "derain", seed=1), degrade(photo, "rain", seed=1))
    with pytest.raises(ValueError, match="unknown degradation 'fog'"):
        degrade(photo, "fog")
    with pytest.raises(ValueError, match=r"\(3, H, W\)"):
        degrade(torch.rand(1, 3, 8, 8), "noise")


def test_noise_has_the_requested_sigma() -> None:
    grey = torch.full((3, 128, 128), 0.5)
    g = torch.Generator().manual_seed(0)
    for sigma in (15, 25, 50):
        std = float((add_noise(grey, g, sigma=sigma) - grey).std() * 255)
        assert std == pytest.approx(sigma, rel=0.03)
    drawn = {round(float((add_noise(grey, g) - grey).std() * 255)) for _ in range(30)}
    assert all(any(abs(d - s) <= 1 for s in (15, 25, 50)) for d in drawn) and len(drawn) >= 2


def test_kernels_are_normalised_lines_and_gaussians() -> None:
    h = motion_kernel(9, 0)
    v = motion_kernel(9, 90)
    assert float(h.sum()) == pytest.approx(1) and float(v.sum()) == pytest.approx(1)
    mid = h.shape[0] // 2
    assert float(h[mid].sum()) > 0.99 and float(v[:, mid].sum()) > 0.99  # all mass on the line
    assert torch.allclose(v, h.T, atol=1e-6)
    d = motion_kernel(11, 45)
    assert torch.allclose(d, d.flip(0).flip(1), atol=1e-6)  # centrally symmetric
    assert torch.allclose(d, d.flip(0).flip(1).T, atol=1e-6)  # and along the anti-diagonal (45 deg, y up)
    i, j = torch.meshgrid(torch.arange(11), torch.arange(11), indexing="ij")
    assert float((d * (i + j - 10).abs()).sum()) < 0.5
    g = gaussian_kernel(1.5)
    assert g.shape == (11, 11) and float(g.sum()) == pytest.approx(1) and torch.allclose(g, g.T)


def test_blur_keeps_flat_images_and_removes_detail(photo: torch.Tensor) -> None:
    flat = torch.full((3, 40, 40), 0.4)
    assert torch.allclose(degrade(flat, "blur", seed=0), flat, atol=1 / 255)
    out = degrade(photo, "blur", seed=0, mode="gaussian", sigma=(2.0, 2.0))

    def detail(x: torch.Tensor) -> float:
        return float((x[:, 1:, :] - x[:, :-1, :]).abs().mean())

    assert detail(out) < 0.6 * detail(photo)


def test_haze_follows_the_scattering_model(photo: torch.Tensor) -> None:
    g = torch.Generator().manual_seed(0)
    h, w = photo.shape[-2:]
    assert torch.equal(add_haze(photo, g, depth=torch.zeros(h, w)), photo.mul(255).round().div(255))
    # with a known depth, (I - A) / (J - A) = t = exp(-beta d) for every channel and pixel
    depth = torch.linspace(0, 1, w).expand(h, w)
    flat = torch.full((3, h, w), 0.1)
    out = add_haze(flat, torch.Generator().manual_seed(3), depth=depth)
    far = out[:, :, -1].mean(1)  # A + (J - A) t at d=1, per channel
    assert bool((out[:, :, 1:] >= out[:, :, :-1] - 1 / 255).all())  # denser with distance on a dark image
    assert float(far.min()) > 0.2
    with pytest.raises(ValueError, match="depth must be"):
        add_haze(photo, g, depth=torch.zeros(5, 5))


def test_rain_streaks_brighten_and_run_vertically(photo: torch.Tensor) -> None:
    dark = torch.full((3, 128, 128), 0.1)
    out = degrade(dark, "rain", seed=2, tilt=0.0)
    layer = (out - dark)[0]
    assert float(layer.min()) >= -1 / 255 and float(layer.max()) > 0.2

    def corr(a: torch.Tensor, b: torch.Tensor) -> float:
        a, b = a - a.mean(), b - b.mean()
        return float((a * b).mean() / (a.std() * b.std()))

    vertical = corr(layer[4:, :], layer[:-4, :])
    horizontal = corr(layer[:, 4:], layer[:, :-4])
    assert vertical > 0.5 and horizontal < 0.2


def test_snow_adds_bright_flakes() -> None:
    dark = torch.full((3, 128, 128), 0.1)
    out = degrade(dark, "snow", seed=1, veil=(0.0, 0.0))
    assert float((out - dark).min()) >= -1 / 255
    assert 0.001 < float(((out - dark)[0] > 0.3).float().mean()) < 0.3


def test_degraded_images_items_are_pure_functions_of_the_index(photo: torch.Tensor) -> None:
    a = DegradedImages([photo, photo.flip(-1)], crop=32, length=50, seed=3)
    b = DegradedImages([photo, photo.flip(-1)], crop=32, length=50, seed=3)
    tasks = set()
    for i in (0, 7, 49):
        (x1, y1, t1), (x2, y2, t2) = a[i], b[i]
        assert torch.equal(x1, x2) and torch.equal(y1, y2) and t1 == t2
        assert x1.shape == y1.shape == (3, 32, 32)
        tasks.add(t1)
    assert {a[i][2] for i in range(50)} == set(range(len(TASKS)))
    assert not torch.equal(a[0][0], DegradedImages([photo, photo.flip(-1)], crop=32, length=50, seed=4)[0][0])
    with pytest.raises(IndexError):
        a[50]
    full = DegradedImages([photo], tasks=("derain", "dehaze"))
    assert len(full) == 2 and [full[i][2] for i in range(2)] == [0, 1] and full[0][1].shape == photo.shape


def test_a_folder_gives_the_same_items_as_the_images_in_memory(tmp_path: Path, photo: torch.Tensor) -> None:
    images = [photo, photo[:, :40, :50].flip(-1).contiguous()]
    for i, im in enumerate(images):
        save_image(im, tmp_path / "sub" / f"{i}.png")
    a = DegradedImages(tmp_path, crop=32, length=6, seed=1)
    b = DegradedImages(images, crop=32, length=6, seed=1)
    assert all(isinstance(p, Path) for p in a.images)  # decoded on access, not held in memory
    for i in range(6):
        assert all(torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y for x, y in zip(a[i], b[i]))
    with pytest.raises(ValueError, match="smaller than the 48px crop, e.g. \\(40, 50\\)"):
        DegradedImages(tmp_path, crop=48)


def test_degraded_images_refuse_bad_sources(tmp_path: Path, photo: torch.Tensor) -> None:
    with pytest.raises(ValueError, match="smaller than the 128px crop"):
        DegradedImages([photo], crop=128)
    with pytest.raises(ValueError, match="unknown restoration task 'colourise'"):
        DegradedImages([photo], tasks=("colourise",))
    with pytest.raises(FileNotFoundError):
        DegradedImages(tmp_path / "missing")
    with pytest.raises(ValueError, match="no images"):
        DegradedImages(tmp_path)
    (tmp_path / "broken.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="broken.png"):
        DegradedImages(tmp_path)


def test_write_degraded_round_trips_through_paired_folder(tmp_path: Path, photo: torch.Tensor) -> None:
    images = [photo, photo[:, :64, :80]]
    out = write_degraded(images, tmp_path / "set", ("derain", "denoise"), seed=9)
    ds = DegradedImages(images, ("derain", "denoise"), seed=9)
    for t, task in enumerate(("derain", "denoise")):
        pairs = PairedFolder(out / task)
        assert len(pairs) == 2
        for k in range(2):
            lq, gt, name = pairs[k]
            ref_lq, ref_gt, ref_t = ds[k * 2 + t]
            assert ref_t == t and name == f"{k:04d}.png"
            assert torch.equal(lq, ref_lq) and torch.equal(gt, ref_gt)


def test_paired_folder_reads_public_benchmark_layouts(tmp_path: Path) -> None:
    img = torch.rand(3, 20, 24)
    for i in (1, 2):
        save_image(img, tmp_path / "rain100l" / "rainy" / f"rain-{i:03d}.png")
        save_image(img * 0.5, tmp_path / "rain100l" / "norain" / f"norain-{i:03d}.png")
    pairs = PairedFolder(tmp_path / "rain100l")
    assert [(a.name, b.name) for a, b in pairs.pairs] == [("rain-001.png", "norain-001.png"),
                                                          ("rain-002.png", "norain-002.png")]
    for beta in ("0.8_0.2", "0.9_0.16"):  # SOTS: several hazy images share one clear one
        save_image(img, tmp_path / "sots" / "hazy" / f"0001_{beta}.png")
    save_image(img, tmp_path / "sots" / "gt" / "0001.png")
    assert {b.name for _, b in PairedFolder(tmp_path / "sots").pairs} == {"0001.png"}
    save_image(img, tmp_path / "sots" / "hazy" / "0002_0.8_0.2.png")
    with pytest.raises(ValueError, match="1 inputs .* have no target in .*: 0002_0.8_0.2.png"):
        PairedFolder(tmp_path / "sots")
    (tmp_path / "odd" / "photos").mkdir(parents=True)
    with pytest.raises(ValueError, match="none of the paired layouts"):
        PairedFolder(tmp_path / "odd")
    save_image(img, tmp_path / "mix" / "input" / "a.png")
    save_image(torch.rand(3, 10, 10), tmp_path / "mix" / "target" / "a.png")
    with pytest.raises(ValueError, match=r"a.png is \(20, 24\) but its target"):
        PairedFolder(tmp_path / "mix")[0]
    assert len(PairedFolder(input_dir=tmp_path / "mix" / "input", target_dir=tmp_path / "mix" / "target")) == 1


def test_read_image_names_a_broken_file(tmp_path: Path) -> None:
    (tmp_path / "x.png").write_bytes(b"\x89PNG broken")
    with pytest.raises(ValueError, match="x.png"):
        read_image(tmp_path / "x.png")


def test_photo_split_is_real_disjoint_and_bounded() -> None:
    train, test = photo_split(max_side=128, video_frames=2)
    assert len(train) == 5 + 4 and len(test) == 2 + 2
    assert all(max(t.shape[-2:]) <= 128 and t.shape[0] == 3 for t in train + test)
    for a in test:  # no test picture is a training picture
        assert all(a.shape != b.shape or not torch.allclose(a, b, atol=0.05) for b in train)
    assert math.isclose(float(np.mean([float(t.std()) for t in train])), 0.2, abs_tol=0.15)  # real content, not flat
