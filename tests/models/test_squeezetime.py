"""SqueezeTime network (mmeff.models.squeezetime): the paper's size and cost, the squeeze order, the CTL module
against a functional re-derivation of its formula, registries and checkpoint loading."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from mmeff.models import squeezetime as st

pytestmark = pytest.mark.usefixtures("single_thread")


def test_paper_configuration_matches_params_and_flops() -> None:
    model = st.create_model("squeezetime_k400").eval()
    total = sum(p.numel() for p in model.parameters())
    head = sum(p.numel() for p in model.head.parameters())
    # released code: backbone 28.89M (paper table: 28.7M), + the 2048x400 K400 classifier
    assert total - head == 28_887_088 and head == 2048 * 400 + 400
    assert [stage[0].conv2.pos.shape[-1] for stage in model.stages] == [56, 28, 14, 7]
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        out = model(torch.randn(1, 3, 16, 224, 224))
    assert out.shape == (1, 400)
    # paper: 5.5 GFLOPs per view, counted as multiply-adds (fvcore); the counter counts 2 per MAC
    assert fc.get_total_flops() / 2e9 == pytest.approx(5.5, abs=0.05)


def test_squeeze_is_colour_major() -> None:
    x = torch.arange(2 * 3 * 4 * 1 * 1, dtype=torch.float32).view(2, 3, 4, 1, 1)
    y = st.squeeze_time(x)
    assert y.shape == (2, 12, 1, 1)
    for c in range(3):
        for t in range(4):
            assert torch.equal(y[:, c * 4 + t], x[:, c, t])
    with pytest.raises(ValueError, match=r"\(B, C, T, H, W\)"):
        st.squeeze_time(torch.zeros(2, 3, 4, 4))


@pytest.mark.parametrize("pos_dim", [6, 4])  # 6: the embedding is resized to the 6x6 map; 4 is not
def test_ctl_follows_its_formula(pos_dim) -> None:
    torch.manual_seed(0)
    ctl = st.CTL(8, 12, pos_dim=4)
    for m in ctl.modules():  # non-trivial BN statistics, so eval-mode BN is not the identity
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2)
            m.weight.data.normal_()
            m.bias.data.normal_()
    ctl.eval()
    x = torch.randn(2, 8, pos_dim, pos_dim)

    def bn(mod, v):
        return F.batch_norm(v, mod.running_mean, mod.running_var, mod.weight, mod.bias, False, 0.0, mod.eps)

    imp = ctl.importance
    beta = torch.sigmoid(F.conv2d(F.relu(bn(imp[2], F.conv2d(x.mean((2, 3), keepdim=True), imp[1].weight))),
                                  imp[4].weight))
    g = F.relu(bn(ctl.gate_in[1], F.conv2d(beta * x, ctl.gate_in[0].weight, ctl.gate_in[0].bias, padding=1)))
    pos = ctl.pos if pos_dim == 4 else F.interpolate(ctl.pos, size=(pos_dim, pos_dim), mode="bilinear",
                                                     align_corners=True)
    g = F.relu(bn(ctl.gate_out[1], F.conv2d(g + pos, ctl.gate_out[0].weight, ctl.gate_out[0].bias, padding=3)))
    g = torch.sigmoid(F.conv2d(g, ctl.gate_out[3].weight, ctl.gate_out[3].bias, padding=1))
    want = F.conv2d(beta * x, ctl.tfc.weight) + F.conv2d(x, ctl.ioi.weight, ctl.ioi.bias, padding=1) * g
    with torch.no_grad():
        torch.testing.assert_close(ctl(x), want, atol=1e-5, rtol=1e-5)


def test_small_models_and_registries() -> None:
    import timm

    assert "squeezetime_k400" in st.list_models()
    m = st.create_model("squeezetime_10", num_classes=5, num_frames=4, img_size=64).eval()
    with torch.no_grad():
        assert m(torch.randn(2, 3, 4, 64, 64)).shape == (2, 5)
        assert m.forward_features(torch.randn(1, 3, 4, 64, 64)).shape == (1, 512, 2, 2)
    t = timm.create_model("squeezetime_18", num_classes=3, num_frames=2, img_size=64)
    assert isinstance(t, st.SqueezeTime) and t.head.out_features == 3
    with pytest.raises(ValueError, match="not downloadable here; pass a local file the timm way"):
        timm.create_model("squeezetime_18", pretrained=True)
    with pytest.raises(KeyError, match="known: squeezetime_10"):
        st.create_model("squeezetime_9")
    with pytest.raises(ValueError, match=r"expected clips \(B, 3, 4, H, W\)"):
        m(torch.randn(2, 3, 5, 64, 64))
    with pytest.raises(TypeError, match="floating point"):
        m(torch.zeros(1, 3, 4, 64, 64, dtype=torch.uint8))
    with pytest.raises(ValueError, match="depth must be one of"):
        st.SqueezeTime(depth=20)


def test_checkpoints_load_own_and_official_names(tmp_path) -> None:
    torch.manual_seed(0)
    src = st.create_model("squeezetime_10", num_classes=4, num_frames=2, img_size=64).eval()
    torch.save(src.state_dict(), tmp_path / "own.pth")
    dst = st.create_model("squeezetime_10", num_classes=4, num_frames=2, img_size=64).eval()
    assert st.load_checkpoint(dst, str(tmp_path / "own.pth")) == []
    x = torch.randn(1, 3, 2, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(dst(x), src(x), atol=0, rtol=0)
    # the official MMAction2 names, spelled out by hand for a few parameters of each kind
    examples = {
        "backbone.net.conv1.weight": "stem.0.weight",
        "backbone.net.bn1.running_mean": "stem.1.running_mean",
        "backbone.net.layer2.0.downsample.0.weight": "stages.1.0.down.0.weight",
        "backbone.net.layer2.0.shortcut_conv.1.bias": "stages.1.0.shortcut.1.bias",
        "backbone.net.layer1.0.conv2.param_conv.4.weight": "stages.0.0.conv2.importance.4.weight",
        "backbone.net.layer1.0.conv2.temporal_conv.weight": "stages.0.0.conv2.tfc.weight",
        "backbone.net.layer3.0.conv1.spatial_conv.short_conv.bias": "stages.2.0.conv1.ioi.bias",
        "backbone.net.layer3.0.conv1.spatial_conv.pos_embed": "stages.2.0.conv1.pos",
        "backbone.net.layer1.0.conv2.spatial_conv.glo_conv.0.weight": "stages.0.0.conv2.gate_in.0.weight",
        "backbone.net.layer1.0.conv2.spatial_conv.glo_conv.4.running_var": "stages.0.0.conv2.gate_out.1.running_var",
        "backbone.net.layer4.0.conv2.spatial_conv.glo_conv.6.bias": "stages.3.0.conv2.gate_out.3.bias",
        "cls_head.fc_cls.weight": "head.weight",
    }
    for official, ours in examples.items():
        assert st._official_key(official) == ours
    sd = src.state_dict()
    assert set(examples.values()) <= set(sd)
    inverse = {v: k for k, v in examples.items()}
    renamed = {inverse.get(k, k): v for k, v in sd.items()}
    # as MMEngine saves it: numpy values in meta and the message hub (weights_only alone refuses those)
    import numpy as np

    torch.save({"meta": {"epoch": 12, "seed": np.int64(0)}, "state_dict": renamed,
                "message_hub": {"runtime_info": {"lr": np.float64(1e-3)}, "log": np.zeros(3)}}, tmp_path / "official.pth")
    fresh = st.create_model("squeezetime_10", num_classes=4, num_frames=2, img_size=64).eval()
    assert sorted(st.load_checkpoint(fresh, str(tmp_path / "official.pth"))) == sorted(examples)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), src(x), atol=0, rtol=0)
    # timm's own local-weights route reads the same official file, key remap inside
    import timm

    via_timm = timm.create_model("squeezetime_10", pretrained=True, num_classes=4, num_frames=2, img_size=64,
                                 pretrained_cfg_overlay={"file": str(tmp_path / "official.pth")}).eval()
    with torch.no_grad():
        torch.testing.assert_close(via_timm(x), src(x), atol=0, rtol=0)
    other = st.create_model("squeezetime_10", num_classes=7, num_frames=2, img_size=64)
    with pytest.raises(ValueError, match="(?s)does not fit this SqueezeTime.*head.weight"):
        st.load_checkpoint(other, str(tmp_path / "own.pth"))
