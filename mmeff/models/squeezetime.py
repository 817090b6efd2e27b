"""SqueezeTime (Zhai et al., arXiv 2405.08344): mobile video recognition with time squeezed into channels.

A clip ``(B, 3, T, H, W)`` is viewed as ``(B, 3T, H, W)`` (colour-major channels: R0..R(T-1), G0.., B0..),
so everything after is a 2-D network. Temporal modelling lives in the Channel-Time Learning (CTL) module
that replaces the 3x3 convolution of every ResNet bottleneck:

* temporal importance ``beta = sigmoid(W2 relu(BN(W1 GAP(x))))`` (full C x C 1x1 convs, no reduction);
* TFC branch: a 1x1 convolution of ``beta * x`` (the "temporal" conv is 1x1, not 3x3);
* IOI branch: ``conv3x3(x) * G`` with the gate ``G = sigmoid(conv3x3(relu(BN(conv7x7(relu(BN(conv3x3(beta * x))) + P)))))``,
  where ``P`` (1, 16, pd, pd) is the learnable temporal-position-restoring embedding, added after the first
  ReLU (bilinearly resized when the feature map is not ``pd x pd``);
* output ``TFC + IOI``.

Stages downsample *before* a block, with a depthwise 2x2 stride-2 conv + BN applied to the block input
(residual included); channel changes use a stride-1 1x1 conv + BN shortcut. The stem is a 5x5 stride-2
conv on the 3T channels, BN, ReLU and a 3x3 stride-2 max pool; the head average-pools, applies dropout
0.5 and a linear classifier (init std 0.01), as the official ``I2DHead``.

Configurations (:func:`create_model`, :func:`list_models`): ``squeezetime_k400`` is the paper's model
(depth 50, 16 frames at 224 px, ``pos_dim`` = feature sizes 56/28/14/7, 400 classes); ``squeezetime_k600``,
``squeezetime_hmdb51`` change the classes; ``squeezetime_{10,18,34}`` are the released code's smaller
BasicBlock depths (a CTL in both convs; as released, a block's first CTL keeps ``pos_dim`` 7).
Every model is also registered with timm (``timm.create_model("squeezetime_k400")``); timm's local-weights
route reads own or official (MMAction2) checkpoints with the key remap inside:
``timm.create_model("squeezetime_k400", pretrained=True, pretrained_cfg_overlay=dict(file=PATH))``.

Differences from the official code (``xinghaochen/SqueezeTime``): the network is the same (outputs equal
bit for bit on the same weights, 29,706,688 parameters with the K400 head). Around it:

* no ``.cuda()`` in ``__init__`` (the official wrapper moves itself to the GPU when built);
* :func:`load_checkpoint` is strict and says which keys it renamed or skipped, where the official
  ``load`` silently drops every tensor whose shape differs; MMEngine checkpoints are read without
  unpickling code (:func:`mmeff.checkpoint.load_state` with ``records=True``);
* training (:mod:`mmeff.train.videocls`): the official K400 recipe by default; ``recipe="mmeff"`` is the
  earlier one, measured against it on ``mmeff bench squeezetime`` (README).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from timm.models import is_model
from timm.models import register_model as timm_register_model
from torch import Tensor, nn

from mmeff.checkpoint import read_tensors
from mmeff.models.zoo import register_family

__all__ = ["CTL", "SqueezeTime", "create_model", "list_models", "squeeze_time", "export_onnx", "check_onnx"]

_GATE = 16  # channels of the IOI gate branch (fixed in the paper's code)


def squeeze_time(x: Tensor) -> Tensor:
    """``(B, C, T, H, W)`` -> ``(B, C*T, H, W)``, channel ``c*T + t`` (the pretrained stem's order)."""
    if x.dim() != 5:
        raise ValueError(f"SqueezeTime expects clips (B, C, T, H, W), got shape {tuple(x.shape)}")
    b, c, t, h, w = x.shape
    return x.reshape(b, c * t, h, w)


class CTL(nn.Module):
    """Channel-Time Learning module ``(B, C_in, H, W) -> (B, C_out, H, W)`` (module docstring)."""

    def __init__(self, in_channels: int, out_channels: int, pos_dim: int = 7) -> None:
        super().__init__()
        self.importance = nn.Sequential(
            nn.AdaptiveAvgPool2d(1),
            nn.Conv2d(in_channels, in_channels, 1, bias=False),
            nn.BatchNorm2d(in_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(in_channels, in_channels, 1, bias=False),
            nn.Sigmoid(),
        )
        self.tfc = nn.Conv2d(in_channels, out_channels, 1, bias=False)
        self.ioi = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.gate_in = nn.Sequential(nn.Conv2d(in_channels, _GATE, 3, padding=1), nn.BatchNorm2d(_GATE),
                                     nn.ReLU(inplace=True))
        self.pos = nn.Parameter(torch.zeros(1, _GATE, pos_dim, pos_dim))
        nn.init.kaiming_normal_(self.pos, mode="fan_out", nonlinearity="relu")
        self.gate_out = nn.Sequential(nn.Conv2d(_GATE, _GATE, 7, padding=3), nn.BatchNorm2d(_GATE),
                                      nn.ReLU(inplace=True), nn.Conv2d(_GATE, out_channels, 3, padding=1),
                                      nn.Sigmoid())

    def position(self, h: int, w: int) -> Tensor:
        """The position embedding at an ``h x w`` feature map, ``(1, 16, h, w)``."""
        if self.pos.shape[-2:] == (h, w):
            return self.pos
        return F.interpolate(self.pos, size=(h, w), mode="bilinear", align_corners=True)

    def forward(self, x: Tensor) -> Tensor:
        beta = self.importance(x)
        weighted = beta * x
        g = self.gate_in(weighted)
        g = self.gate_out(g + self.position(*g.shape[-2:]))
        return self.tfc(weighted) + self.ioi(x) * g


def _downsample(channels: int) -> nn.Module:
    return nn.Sequential(nn.Conv2d(channels, channels, 2, stride=2, groups=channels), nn.BatchNorm2d(channels))


class _Block(nn.Module):
    """What both block kinds share: the depthwise pre-downsampling of the input (residual included) and
    the residual add with the optional 1x1 shortcut; subclasses define ``body``."""

    expansion = 1

    def __init__(self, in_planes: int, stride: int, shortcut: nn.Module | None) -> None:
        super().__init__()
        self.down = _downsample(in_planes) if stride != 1 else None
        self.shortcut = shortcut
        self.relu = nn.ReLU(inplace=True)

    def body(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        if self.down is not None:
            x = self.down(x)
        return self.relu(self.body(x) + (x if self.shortcut is None else self.shortcut(x)))


class _Bottleneck(_Block):
    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int, shortcut: nn.Module | None, pos_dim: int) -> None:
        super().__init__(in_planes, stride, shortcut)
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = CTL(planes, planes, pos_dim)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)

    def body(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.bn3(self.conv3(out))


class _Basic(_Block):
    def __init__(self, in_planes: int, planes: int, stride: int, shortcut: nn.Module | None, pos_dim: int) -> None:
        super().__init__(in_planes, stride, shortcut)
        self.conv1 = CTL(in_planes, planes, 7)  # as released: the first CTL keeps the default pos_dim
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = CTL(planes, planes, pos_dim)
        self.bn2 = nn.BatchNorm2d(planes)

    def body(self, x: Tensor) -> Tensor:
        return self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))


_DEPTHS: dict[int, tuple[type[nn.Module], tuple[int, int, int, int]]] = {
    10: (_Basic, (1, 1, 1, 1)), 18: (_Basic, (2, 2, 2, 2)), 34: (_Basic, (3, 4, 6, 3)),
    50: (_Bottleneck, (3, 4, 6, 3)), 101: (_Bottleneck, (3, 4, 23, 3)), 152: (_Bottleneck, (3, 8, 36, 3)),
}


class SqueezeTime(nn.Module):
    """SqueezeTime classifier: clips ``(B, 3, T, H, W)`` -> logits ``(B, num_classes)``.

    Args:
        depth: 10/18/34 (BasicBlock) or 50/101/152 (Bottleneck); the paper uses 50.
        num_frames: T, fixed by the stem (3T input channels).
        num_classes: classifier outputs (0: no head, :meth:`forward` returns pooled features).
        img_size: training resolution; sets ``pos_dim`` to each stage's feature size (224 -> 56/28/14/7).
        widths: stage widths (``widen_factor`` scales them).
        spatial_stride: per-stage downsampling (AVA's variant uses ``(1, 2, 2, 1)``).
        dropout: before the classifier.
        in_chans: colour channels per frame.
    """

    def __init__(self, depth: int = 50, num_frames: int = 16, num_classes: int = 400, img_size: int = 224,
                 widths: Sequence[int] = (64, 128, 256, 512), widen_factor: float = 1.0,
                 spatial_stride: Sequence[int] = (1, 2, 2, 2), dropout: float = 0.5, in_chans: int = 3) -> None:
        super().__init__()
        if depth not in _DEPTHS:
            raise ValueError(f"depth must be one of {sorted(_DEPTHS)}, got {depth}")
        if num_frames < 1 or img_size < 32:
            raise ValueError(f"need num_frames >= 1 and img_size >= 32, got {num_frames}, {img_size}")
        block, layers = _DEPTHS[depth]
        widths = [int(w * widen_factor) for w in widths]
        self.num_frames, self.in_chans, self.img_size = num_frames, in_chans, img_size
        self.stem = nn.Sequential(nn.Conv2d(in_chans * num_frames, widths[0], 5, stride=2, padding=2, bias=False),
                                  nn.BatchNorm2d(widths[0]), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1))
        size = -(-img_size // 4)  # after the stem
        planes_in = widths[0]
        stages = []
        for width, n, stride in zip(widths, layers, spatial_stride):
            size = -(-size // stride)
            out = width * block.expansion
            shortcut = None
            if planes_in != out:
                shortcut = nn.Sequential(nn.Conv2d(planes_in, out, 1, bias=False), nn.BatchNorm2d(out))
            blocks = [block(planes_in, width, stride, shortcut, size)]
            blocks += [block(out, width, 1, None, size) for _ in range(n - 1)]
            stages.append(nn.Sequential(*blocks))
            planes_in = out
        self.stages = nn.Sequential(*stages)
        self.num_features = planes_in
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(planes_in, num_classes) if num_classes > 0 else nn.Identity()
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if isinstance(self.head, nn.Linear):
            nn.init.normal_(self.head.weight, std=0.01)
            nn.init.zeros_(self.head.bias)

    def forward_features(self, x: Tensor) -> Tensor:
        """Clips ``(B, 3, T, H, W)`` -> feature map ``(B, num_features, H/32, W/32)``."""
        if x.dim() != 5 or x.shape[1] != self.in_chans or x.shape[2] != self.num_frames:
            raise ValueError(f"expected clips (B, {self.in_chans}, {self.num_frames}, H, W), got {tuple(x.shape)}")
        if not x.is_floating_point():
            raise TypeError(f"clips must be floating point (normalised pixels), got {x.dtype}")
        return self.stages(self.stem(squeeze_time(x)))

    def forward(self, x: Tensor) -> Tensor:
        """Clips ``(B, 3, T, H, W)`` -> logits ``(B, num_classes)`` (pooled features without a head)."""
        return self.head(self.drop(self.pool(self.forward_features(x)).flatten(1)))


# ----------------------------------------------------------------------------------------- registry

_CONFIGS: dict[str, dict[str, Any]] = {
    "squeezetime_k400": {"depth": 50, "num_classes": 400},
    "squeezetime_k600": {"depth": 50, "num_classes": 600},
    "squeezetime_hmdb51": {"depth": 50, "num_classes": 51},
    "squeezetime_10": {"depth": 10, "num_classes": 400},
    "squeezetime_18": {"depth": 18, "num_classes": 400},
    "squeezetime_34": {"depth": 34, "num_classes": 400},
}


def list_models() -> list[str]:
    """Registered SqueezeTime configurations."""
    return sorted(_CONFIGS)


def create_model(name: str, pretrained: str | None = None, **kwargs: Any) -> SqueezeTime:
    """Build a registered configuration (``kwargs`` override it); ``pretrained``: a local checkpoint
    (a state dict, or the official ``{"state_dict": ...}`` with ``backbone.net.`` / ``cls_head.`` keys)."""
    if name not in _CONFIGS:
        raise KeyError(f"unknown SqueezeTime model {name!r}; known: {', '.join(list_models())}")
    model = SqueezeTime(**{**_CONFIGS[name], **kwargs})
    if pretrained is not None:
        load_checkpoint(model, pretrained)
    return model


_OFFICIAL = (("backbone.net.conv1.", "stem.0."), ("backbone.net.bn1.", "stem.1."), ("cls_head.fc_cls.", "head."))


_SUMMARIES = {
    "squeezetime_k400": "SqueezeTime-50 video classifier, K400 head (400 classes): the paper's model",
    "squeezetime_k600": "SqueezeTime-50 video classifier, K600 head (600 classes)",
    "squeezetime_hmdb51": "SqueezeTime-50 video classifier, HMDB51 head (51 classes)",
    "squeezetime_10": "SqueezeTime-10 video classifier, K400 head (400 classes); the miniature bench's backbone",
    "squeezetime_18": "SqueezeTime-18 video classifier, K400 head (400 classes)",
    "squeezetime_34": "SqueezeTime-34 video classifier, K400 head (400 classes)",
}


register_family("squeezetime", _SUMMARIES, create_model)


def _official_key(key: str) -> str:
    """Map a key of the official MMAction2 checkpoint to this module's names."""
    for old, new in _OFFICIAL:
        if key.startswith(old):
            return new + key[len(old):]
    if key.startswith("backbone.net.layer"):
        rest = key[len("backbone.net.layer"):]
        stage, tail = rest.split(".", 1)
        tail = (tail.replace("downsample.", "down.").replace("shortcut_conv.", "shortcut.")
                .replace("param_conv.", "importance.").replace("temporal_conv.", "tfc.")
                .replace("spatial_conv.short_conv.", "ioi.").replace("spatial_conv.pos_embed", "pos"))
        for i, new in ((0, "gate_in.0."), (1, "gate_in.1."), (3, "gate_out.0."), (4, "gate_out.1."),
                       (6, "gate_out.3.")):
            tail = tail.replace(f"spatial_conv.glo_conv.{i}.", new)
        return f"stages.{int(stage) - 1}.{tail}"
    return key


def load_checkpoint(model: SqueezeTime, path: str, skip_mismatched: bool = False) -> list[str]:
    """Load a local checkpoint (own or official key names); returns the official keys it renamed.

    Official MMAction2 / MMEngine checkpoints (``state_dict`` next to ``meta`` and ``message_hub``, which
    pickle MMEngine's history buffers and numpy values) are read without unpickling any class: numpy data is
    rebuilt by numpy, MMEngine's objects become inert records, anything else is refused
    (:func:`mmeff.checkpoint.load_state` with ``records=True``).

    Strict by default. ``skip_mismatched=True`` leaves parameters whose shape differs (e.g. the classifier
    when fine-tuning K400 weights on other classes) at their initialisation and *says so* in the printed
    list, instead of the official loader's silent filter."""
    sd = read_tensors(path, "a SqueezeTime checkpoint")  # MMEngine's records inert, anything else refused
    renamed = [k for k in sd if _official_key(k) != k]
    sd = {_official_key(k): v for k, v in sd.items()}
    if skip_mismatched:
        own = model.state_dict()
        skipped = sorted(k for k, v in sd.items() if k in own and own[k].shape != v.shape)
        if skipped:
            print(f"{path}: left at initialisation (shape differs): {', '.join(skipped)}")
        sd = {k: v for k, v in sd.items() if k not in skipped}
        sd.update({k: own[k] for k in skipped})
    try:
        missing, unexpected = model.load_state_dict(sd, strict=False)
    except RuntimeError as e:  # shape mismatches (another class count, frame count or depth)
        raise ValueError(f"{path}: checkpoint does not fit this {type(model).__name__}: {e}") from None
    if missing or unexpected:
        raise ValueError(f"{path}: checkpoint does not fit {type(model).__name__}; missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    return renamed


def export_onnx(model: SqueezeTime, path: str | Path, *, dynamic_batch: bool = True) -> Path:
    """Export ``model`` (eval mode) to ONNX with the ``torch.export`` exporter: input ``clips``
    ``(B, 3, T, S, S)`` at the model's frames and ``img_size``, output ``logits``; ``dynamic_batch`` keeps
    B free. Needs the ``onnx`` and ``onnxscript`` packages (dev extras)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    was = model.training
    model.eval()
    x = torch.zeros(2, model.in_chans, model.num_frames, model.img_size, model.img_size)
    shapes = {"x": {0: torch.export.Dim("batch", min=1, max=1024)}} if dynamic_batch else None
    try:
        torch.onnx.export(model, (x,), str(path), input_names=["clips"], output_names=["logits"],
                          dynamic_shapes=shapes, dynamo=True, verbose=False)
    finally:
        model.train(was)
    return path


def check_onnx(model: SqueezeTime, path: str | Path, batch_sizes: Sequence[int] = (1, 3), atol: float = 1e-4,
               seed: int = 0) -> float:
    """Run the exported file with onnxruntime (CPU) on random clips of each batch size and compare with
    ``model`` in eval mode; returns the largest absolute logit difference, ``ValueError`` above ``atol``."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    g = torch.Generator().manual_seed(seed)
    was = model.training
    model.eval()
    worst = 0.0
    try:
        for b in batch_sizes:
            x = torch.randn(b, model.in_chans, model.num_frames, model.img_size, model.img_size, generator=g)
            got = session.run(None, {name: x.numpy()})[0]
            with torch.no_grad():
                want = model(x).numpy()
            worst = max(worst, float(abs(got - want).max()))
    finally:
        model.train(was)
    if worst > atol:
        raise ValueError(f"{path}: onnxruntime differs from PyTorch by {worst:.3g} (> {atol})")
    return worst


_TIMM_ARGS = ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir")


def _timm_file(kwargs: dict[str, Any]) -> str | None:
    """The local weights file timm's factory arguments name (``pretrained_cfg_overlay`` or ``pretrained_cfg``
    with a ``file``), else ``None``."""
    for key in ("pretrained_cfg_overlay", "pretrained_cfg"):
        cfg = kwargs.get(key)
        file = cfg.get("file") if isinstance(cfg, dict) else getattr(cfg, "file", None)
        if file:
            return str(file)
    return None


def _register_timm() -> None:
    for name in _CONFIGS:
        if is_model(name):
            continue

        def make(pretrained: bool = False, _name: str = name, **kwargs: Any) -> SqueezeTime:
            # timm's local-weights route: create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=P))
            file = _timm_file(kwargs)
            for key in _TIMM_ARGS:  # what timm's factory adds for its own pretrained machinery
                kwargs.pop(key, None)
            if pretrained and file is None:
                raise ValueError(
                    f"{_name}: SqueezeTime weights are not downloadable here; pass a local file the timm way, "
                    "timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=PATH)), or "
                    "mmeff.create_model(name, pretrained=PATH)")
            # own or official (MMAction2) key names, remapped by load_checkpoint
            return create_model(_name, pretrained=file if pretrained else None, **kwargs)

        make.__name__ = name
        make.__module__ = __name__
        timm_register_model(make)


_register_timm()
