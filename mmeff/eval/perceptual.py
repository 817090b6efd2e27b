"""Perceptual losses and metrics: LPIPS when its weights are on this machine, an SSIM loss otherwise.

LPIPS (Zhang et al., CVPR 2018) needs two sets of weights: the small linear heads, which ship inside the
``lpips`` wheel, and the ImageNet backbone (torchvision's AlexNet or VGG16), which the ``lpips`` package
downloads at run time. Nothing is downloaded here: the backbone is read from ``backbone_weights``, else
``$MMEFF_LPIPS_BACKBONE``, else torchvision's own cache file (``<torch hub dir>/checkpoints/
alexnet-owt-7be5be79.pth`` / ``vgg16-397923af.pth``, where ``torchvision.models.alexnet(weights=...)``
leaves it on a machine with internet).

When either is missing, :func:`perceptual_loss` with ``kind="auto"`` says so once (a ``UserWarning``
naming what is missing and where it looked) and uses the documented substitute, :class:`SSIMLoss`
(``1 - SSIM``, Gaussian 11x11 window, per image, RGB), a structural term that like LPIPS penalises blur
that an MSE barely sees. ``kind="lpips"`` raises instead, with the same message.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch
import torchvision
from torch import Tensor, nn

from mmeff.eval.metrics import ssim

__all__ = ["LPIPSUnavailable", "SSIMLoss", "lpips_model", "lpips_status", "perceptual_loss"]

_BACKBONE_FILES = {"alex": "alexnet-owt-7be5be79.pth", "vgg": "vgg16-397923af.pth"}


class LPIPSUnavailable(RuntimeError):
    """LPIPS cannot run here: the ``lpips`` package or the backbone weights are missing."""


def _backbone_path(net: str, backbone_weights: str | Path | None) -> Path:
    if backbone_weights is not None:
        return Path(backbone_weights)
    env = os.environ.get("MMEFF_LPIPS_BACKBONE")
    if env:
        return Path(env)
    return Path(torch.hub.get_dir()) / "checkpoints" / _BACKBONE_FILES[net]


def lpips_status(net: str = "alex", backbone_weights: str | Path | None = None) -> str | None:
    """``None`` when LPIPS-``net`` can run offline; else why not (what is missing and where it looked)."""
    if net not in _BACKBONE_FILES:
        raise ValueError(f"LPIPS net must be one of {sorted(_BACKBONE_FILES)}, got {net!r}")
    try:
        import lpips  # noqa: F401
    except ImportError:
        return "the lpips package is not installed (pip install 'mmeff[bench]')"
    path = _backbone_path(net, backbone_weights)
    if not path.is_file():
        return (f"the {net} ImageNet backbone weights are not on this machine (looked for {path}; pass "
                f"backbone_weights=, set MMEFF_LPIPS_BACKBONE, or put torchvision's {_BACKBONE_FILES[net]} there)")
    return None


def lpips_model(net: str = "alex", backbone_weights: str | Path | None = None) -> nn.Module:
    """LPIPS-``net`` (v0.1) with its linear heads from the ``lpips`` wheel and the backbone from the local
    file; frozen, in eval mode. Call it as ``model(a, b)`` on ``(N, 3, H, W)`` in [-1, 1] -> ``(N, 1, 1, 1)``.
    Raises :class:`LPIPSUnavailable` (with :func:`lpips_status`'s reason) when it cannot be built."""
    reason = lpips_status(net, backbone_weights)
    if reason is not None:
        raise LPIPSUnavailable(f"LPIPS is unavailable: {reason}")
    import lpips

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # lpips passes torchvision's deprecated pretrained=False
        model = lpips.LPIPS(net=net, pnet_rand=True, pretrained=True, verbose=False)
    tv = torchvision.models.alexnet() if net == "alex" else torchvision.models.vgg16()
    path = _backbone_path(net, backbone_weights)
    try:
        tv.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    except Exception as e:  # a wrong or truncated file must not silently give a random backbone
        raise LPIPSUnavailable(f"{path} is not torchvision {net} weights: {e}") from e
    # lpips names each backbone layer by its index in torchvision's `features`
    for block in model.net.children():
        for name, layer in block.named_children():
            layer.load_state_dict(tv.features[int(name)].state_dict())
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


class SSIMLoss(nn.Module):
    """``1 - SSIM`` per image ``(N,)`` of ``(N, 3, H, W)`` in [-1, 1] (H, W >= 11): the substitute for
    LPIPS when its weights are absent (module docstring)."""

    name = "ssim"

    def forward(self, pred: Tensor, target: Tensor) -> Tensor:  # noqa: D102
        return (1 - ssim((pred.clamp(-1, 1) + 1) / 2, (target + 1) / 2)).to(pred.dtype)


class _LPIPSLoss(nn.Module):
    name = "lpips"

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, pred: Tensor, target: Tensor) -> Tensor:
        return self.model(pred, target).flatten()

    def train(self, mode: bool = True) -> _LPIPSLoss:
        # the network stays in eval mode (its dropout off) whatever the trainer does
        super().train(mode)
        self.model.eval()
        return self


def perceptual_loss(kind: str = "auto", net: str = "alex", backbone_weights: str | Path | None = None
                    ) -> nn.Module | None:
    """The perceptual term ``loss(pred, target) -> (N,)`` on ``(N, 3, H, W)`` in [-1, 1], with ``.name``.

    ``kind``: ``"lpips"`` (raise :class:`LPIPSUnavailable` if it cannot run), ``"ssim"`` (the substitute),
    ``"auto"`` (LPIPS if available, else warn once with the reason and use the substitute) or ``"none"``
    (returns ``None``)."""
    if kind == "none":
        return None
    if kind == "ssim":
        return SSIMLoss()
    if kind not in ("auto", "lpips"):
        raise ValueError(f"perceptual kind must be 'auto', 'lpips', 'ssim' or 'none', got {kind!r}")
    reason = lpips_status(net, backbone_weights)
    if reason is None:
        return _LPIPSLoss(lpips_model(net, backbone_weights))
    if kind == "lpips":
        raise LPIPSUnavailable(f"LPIPS is unavailable: {reason}")
    warnings.warn(f"LPIPS is unavailable ({reason}); using the SSIM substitute (1 - SSIM) as the perceptual "
                  f"loss. See mmeff.eval.perceptual.", stacklevel=2)
    return SSIMLoss()
