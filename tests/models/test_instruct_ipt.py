"""Instruct-IPT: the IPT body against torch's own attention, per-sample task biases against dense W + B A,
tiling, folding a task into the weights, save/load, training (exact resume, synchronous updates), evaluation
and the bias analysis."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import mmeff
from mmeff.datasets.restoration import DegradedImages
from mmeff.models.instruct_ipt import (
    InstructIPT,
    IPTConfig,
    ModulatedLinear,
    _starts,
    bias_report,
    create_model,
    param_counts,
)
from mmeff.train.restoration import RestorationTrainConfig, evaluate_restoration, train_restoration

pytestmark = pytest.mark.usefixtures("single_thread")


def _randomise_biases(model: InstructIPT, scale: float = 0.05, seed: int = 0) -> InstructIPT:
    """Trained-looking models: non-zero B (zero at initialisation) and perturbed task queries."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mod in model.modulated_layers().values():
            if mod.rank is None:
                mod.delta.copy_(torch.randn(mod.delta.shape, generator=g) * scale)
            else:
                mod.lora_b.copy_(torch.randn(mod.lora_b.shape, generator=g) * scale)
        model.body.query.add_(torch.randn(model.body.query.shape, generator=g))
    return model


def tiny(**kw) -> InstructIPT:
    torch.manual_seed(0)
    return create_model("instruct_ipt_tiny", **kw).double().eval()


def test_paper_size_parameter_counts_on_meta() -> None:
    with torch.device("meta"):
        ipt = create_model("ipt")
        instruct = create_model("instruct_ipt")
    enc = sum(p.numel() for p in ipt.body.encoder.parameters())
    dec = sum(p.numel() for p in ipt.body.decoder.parameters())
    # IPT's body at 576 wide: 12 encoder layers (4 d^2 attention + 2 * 4 d^2 FFN + biases/norms) = 47.84M,
    # 12 decoder layers (two attentions) = 63.78M
    assert enc == 12 * (4 * 576**2 + 2 * 576 * 2304 + 2304 + 576 + 4 * 576)
    assert dec == 12 * (8 * 576**2 + 2 * 576 * 2304 + 2304 + 576 + 6 * 576)
    assert round(enc / 1e6, 2) == 47.84 and round(dec / 1e6, 2) == 63.78
    c, i = param_counts(ipt), param_counts(instruct)
    assert c["biases"] == 0 and c["shared"] == i["shared"] and c["heads_tails"] == i["heads_tails"]
    # rank 8 on q/k/v/o (576 -> 576) and fc1/fc2 (576 <-> 2304), 12 encoder + 12 decoder layers
    per_task = 12 * (4 * 8 * (576 + 576) + 2 * 8 * (576 + 2304)) + 12 * (8 * 8 * (576 + 576) + 2 * 8 * (576 + 2304))
    assert i["per_task_bias"] == per_task and i["biases"] == 5 * per_task
    assert "instruct_ipt" in mmeff.list_models("instruct_ipt") and "squeezetime_k400" in mmeff.list_models()


def test_attention_equals_torch_multihead_attention_without_bias() -> None:
    cfg = IPTConfig(channels=8, patch_dim=2, patch_size=8, heads=4, enc_layers=1, dec_layers=0, rank=0, overlap=2)
    model = InstructIPT(cfg).double()
    attn = model.body.encoder[0].attn
    ref = nn.MultiheadAttention(cfg.dim, cfg.heads, bias=False, batch_first=True).double()
    with torch.no_grad():
        ref.in_proj_weight.copy_(torch.cat([attn.q.weight, attn.k.weight, attn.v.weight]))
        ref.out_proj.weight.copy_(attn.o.weight)
    q, k, v = (torch.randn(3, 16, cfg.dim, dtype=torch.float64) for _ in range(3))
    want = ref(q, k, v, need_weights=False)[0]
    assert torch.allclose(attn(q, k, v, 0), want, atol=1e-12)


@pytest.mark.parametrize("rank", [3, None, 0])
def test_modulated_linear_is_dense_w_plus_ba_per_sample(rank) -> None:
    torch.manual_seed(1)
    lin = ModulatedLinear(6, 5, num_tasks=4, rank=rank, bias=True).double()
    if rank is None:
        nn.init.normal_(lin.delta)
    elif rank:
        nn.init.normal_(lin.lora_b)
    x = torch.randn(4, 7, 6, dtype=torch.float64)
    for task in (torch.tensor([2, 0, 3, 2]), torch.tensor([1, 1, 1, 1])):
        want = torch.stack([x[i] @ (lin.weight + lin.task_delta(int(t))).T + lin.bias for i, t in enumerate(task)])
        assert torch.allclose(lin(x, task), want, atol=1e-12)
    assert torch.allclose(lin(x, 1), lin(x, torch.tensor([1, 1, 1, 1])), atol=1e-12)  # one index for the batch
    if rank:
        dense = lin.task_delta(2)
        assert torch.linalg.matrix_rank(dense) == (rank if rank is not None else 5)


def test_biases_start_at_zero_so_every_task_starts_shared() -> None:
    x = torch.rand(2, 3, 16, 16, dtype=torch.float64)
    assert torch.equal(tiny()(x, "derain"), x)  # zero tails + image residual: an untrained model is the identity
    model = tiny(task_heads=False, task_query=False)
    with torch.no_grad():
        model.tails[0].weight.normal_()
    outs = [model(x, t) for t in model.tasks]
    assert all(torch.equal(o, outs[0]) for o in outs)
    _randomise_biases(model)
    assert not torch.allclose(model(x, 0), model(x, 1))


def test_mixed_task_batch_equals_each_sample_alone() -> None:
    model = _randomise_biases(tiny())
    x = torch.rand(5, 3, 16, 16, dtype=torch.float64)
    tasks = ["derain", "denoise", "derain", "desnow", "dehaze"]
    joint = model(x, tasks)
    alone = torch.cat([model(x[i:i + 1], t) for i, t in enumerate(tasks)])
    assert torch.allclose(joint, alone, atol=1e-10)
    assert torch.equal(model.task_ids(torch.tensor(2), 3), torch.tensor([2, 2, 2]))


def test_tiles_cover_the_image_with_the_overlap() -> None:
    for length, tile, overlap in ((16, 16, 4), (17, 16, 4), (50, 16, 4), (64, 48, 12), (100, 48, 12)):
        starts = _starts(length, tile, overlap)
        assert starts[0] == 0 and starts[-1] + tile == max(length, tile)
        assert all(b - a <= tile - overlap for a, b in zip(starts, starts[1:]))
        assert starts == sorted(set(starts))


def test_tiled_body_equals_per_tile_reference_and_sizes_are_kept() -> None:
    model = _randomise_biases(tiny())
    s = model.cfg.patch_size
    feats = torch.randn(2, model.cfg.channels, 27, 40, dtype=torch.float64)
    ids = torch.tensor([1, 3])
    got = model.run_body(feats, ids, tile_batch=3)
    assert torch.allclose(model.run_body(feats[:1], 1), model.run_body(feats[:1], torch.tensor([1])),
                          atol=1e-12)
    # reference: every tile through the body on its own, each pixel the mean of the tiles covering it
    total = torch.zeros_like(feats)
    count = torch.zeros(27, 40, dtype=torch.float64)
    for y in _starts(27, s, model.cfg.overlap):
        for x in _starts(40, s, model.cfg.overlap):
            total[:, :, y:y + s, x:x + s] += model.body(feats[:, :, y:y + s, x:x + s].clone(), ids)
            count[y:y + s, x:x + s] += 1
    assert torch.allclose(got, total / count, atol=1e-10)
    one = feats[:, :, :s, :s].contiguous()
    assert torch.equal(model.run_body(one, ids), model.body(one, ids))
    for h, w in ((16, 16), (9, 30), (37, 21), (3, 3)):  # exact tile, smaller than a tile, odd sizes
        assert model(torch.rand(1, 3, h, w, dtype=torch.float64), "denoise").shape == (1, 3, h, w)


def test_specialize_folds_one_task_into_a_plain_ipt() -> None:
    for kw in ({}, {"rank": None}, {"task_heads": False, "task_query": False}):
        model = _randomise_biases(tiny(**kw))
        x = torch.rand(2, 3, 20, 24, dtype=torch.float64)
        for task in ("deblur", "desnow"):
            plain = model.specialize(task)
            assert plain.tasks == (task,) and plain.cfg.rank == 0 and not plain.modulated_layers()
            assert torch.allclose(plain(x, 0), model(x, task), atol=1e-10)
            assert param_counts(plain)["total"] < param_counts(model)["total"]


def test_save_load_and_registry_checkpoints(tmp_path: Path) -> None:
    model = _randomise_biases(tiny()).float()
    path = model.save(tmp_path / "ipt.safetensors")
    x = torch.rand(1, 3, 20, 20)
    back = InstructIPT.load(path)
    assert back.cfg == model.cfg and torch.equal(back(x, "derain"), model(x, "derain"))
    again = mmeff.create_model("instruct_ipt_tiny", pretrained=str(path))
    assert torch.equal(again(x, 2), model(x, 2))
    with pytest.raises(ValueError, match="another configuration"):
        mmeff.create_model("instruct_ipt_tiny", pretrained=str(path), rank=3)
    (tmp_path / "junk.safetensors").write_bytes(b"junk")
    with pytest.raises(ValueError, match="not a safetensors file"):
        InstructIPT.load(tmp_path / "junk.safetensors")
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not an Instruct-IPT checkpoint"):
        InstructIPT.load(tmp_path / "other.safetensors")


def _ipt_body_reference(body: nn.Module, feats: torch.Tensor, task: int, pos_every: bool) -> torch.Tensor:
    """IPT's ``VisionTransformer.forward`` (official ``model/ipt.py``) restated with nn.MultiheadAttention
    (bias=False) on ``body``'s weights (rank 0: no task biases). Default: ``encoder(x + pos)`` and
    ``decoder(x, x, query_pos=q)`` (memory keys without pos); ``--pos_every``: ``encoder(x, pos=pos)`` and
    ``decoder(x, x, pos=pos, query_pos=q)``."""
    cfg = body.cfg
    d = cfg.dim

    def mha(att: nn.Module) -> nn.MultiheadAttention:
        m = nn.MultiheadAttention(d, cfg.heads, bias=False, batch_first=True).double()
        with torch.no_grad():
            m.in_proj_weight.copy_(torch.cat([att.q.weight, att.k.weight, att.v.weight]))
            m.out_proj.weight.copy_(att.o.weight)
        return m

    def ffn(f: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(torch.relu(torch.nn.functional.linear(x, f.fc1.weight, f.fc1.bias)),
                                          f.fc2.weight, f.fc2.bias)

    p, s = cfg.patch_dim, cfg.patch_size
    x = torch.nn.functional.unfold(feats, p, stride=p).transpose(1, 2)
    x = body.encoding(x) + x
    pos = body.pos
    if not pos_every:
        x = x + pos
    for layer in body.encoder:
        h = layer.norm1(x)
        qk = h + pos if pos_every else h
        x = x + mha(layer.attn)(qk, qk, h, need_weights=False)[0]
        x = x + ffn(layer.ffn, layer.norm2(x))
    memory, query = x, body.query[task:task + 1]
    for layer in body.decoder:
        h = layer.norm1(x)
        x = x + mha(layer.self_attn)(h + query, h + query, h, need_weights=False)[0]
        key = memory + pos if pos_every else memory
        x = x + mha(layer.cross_attn)(layer.norm2(x) + query, key, memory, need_weights=False)[0]
        x = x + ffn(layer.ffn, layer.norm3(x))
    x = body.mlp_head(x) + x
    return torch.nn.functional.fold(x.transpose(1, 2), (s, s), p, stride=p) + feats


def test_body_equals_ipt_in_both_position_modes(tmp_path: Path) -> None:
    feats = torch.randn(2, 8, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    outs = {}
    for pos_every in (False, True):
        model = tiny(rank=0, pos_every=pos_every)
        with torch.no_grad():
            model.body.pos.normal_(0, 1.0)  # a position embedding large enough to matter
            got = model.body(feats, 1)
            want = _ipt_body_reference(model.body, feats, 1, pos_every)
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
        outs[pos_every] = got
    assert (outs[True] - outs[False]).abs().max() > 1e-2  # same weights, the two modes differ
    assert IPTConfig().pos_every is False  # IPT's default is the default
    # a file saved before the field existed was trained with pos_every: it loads that way
    from dataclasses import asdict

    from mmeff.checkpoint import save_module

    old = tiny(pos_every=True).float()
    cfg = {k: v for k, v in asdict(old.cfg).items() if k != "pos_every"}
    path = save_module(old, tmp_path / "old.safetensors", InstructIPT.checkpoint_format, cfg)
    x = torch.rand(1, 3, 20, 20)
    for back in (InstructIPT.load(path), create_model("instruct_ipt_tiny", pretrained=str(path))):
        assert back.cfg.pos_every is True and torch.equal(back(x, 0), old(x, 0))


def test_bad_arguments_fail_clearly() -> None:
    model = tiny()
    x = torch.rand(2, 3, 16, 16, dtype=torch.float64)
    with pytest.raises(ValueError, match="unknown task 'colourise'"):
        model(x, "colourise")
    with pytest.raises(ValueError, match="out of range"):
        model(x, 7)
    with pytest.raises(ValueError, match="3 task ids for a batch of 2"):
        model(x, [0, 1, 2])
    with pytest.raises(ValueError, match=r"float RGB images \(B, 3, H, W\)"):
        model(torch.rand(2, 1, 16, 16, dtype=torch.float64), 0)
    with pytest.raises(ValueError, match="unknown modulation targets"):
        IPTConfig(targets=("q", "gate"))
    with pytest.raises(ValueError, match="not divisible"):
        IPTConfig(channels=5, patch_dim=2, heads=3)
    with pytest.raises(TypeError, match="unknown IPTConfig fields"):
        create_model("instruct_ipt_tiny", depth=3)
    with pytest.raises(KeyError, match="unknown model 'ipt_huge'"):
        mmeff.create_model("ipt_huge")


def test_bias_report_reads_rank_and_relative_size() -> None:
    model = tiny(rank=None)
    layer = model.body.encoder[0].attn.q
    u, v = torch.randn(layer.out_features, 2, dtype=torch.float64), torch.randn(2, layer.in_features, dtype=torch.float64)
    with torch.no_grad():
        layer.delta[1].copy_(u @ v)
    rows = {(r["layer"], r["task"]): r for r in bias_report(model)}
    row = rows[("body.encoder.0.attn.q", model.tasks[1])]
    assert row["rank99"] <= 2 and row["rank90"] <= 2 and len(row["singular_values"]) == layer.out_features
    assert row["rel_norm"] == pytest.approx(float((u @ v).norm() / layer.weight.detach().norm()))
    assert rows[("body.encoder.0.attn.q", model.tasks[0])]["rank99"] == 0  # untouched task: no bias at all


def _data(n: int) -> DegradedImages:
    g = torch.Generator().manual_seed(0)
    images = [torch.rand(3, 24, 28, generator=g) for _ in range(3)]
    return DegradedImages(images, crop=16, length=n, seed=0)


def test_training_resumes_bit_exactly_and_updates_shared_and_task_weights(tmp_path: Path) -> None:
    cfg = RestorationTrainConfig(steps=6, batch_size=4, lr=2e-3, warmup_steps=2, save_every=3)

    def fresh() -> InstructIPT:
        torch.manual_seed(0)
        return create_model("instruct_ipt_tiny")

    start = {k: v.clone() for k, v in fresh().state_dict().items()}
    full = fresh()
    train_restoration(full, _data(24), tmp_path / "a", cfg, progress=False, log=lambda s: None)
    part = fresh()
    train_restoration(part, _data(24), tmp_path / "b", cfg, stop_after=3, progress=False, log=lambda s: None)
    resumed = fresh()
    hist = train_restoration(resumed, _data(24), tmp_path / "b", cfg, progress=False, log=lambda s: None)
    assert hist["step"] == 6 and [e["step"] for e in hist["log"]] == [3, 6]
    assert hist["train_seconds"] > hist["log"][-1]["seconds"] > 0  # both calls counted
    for k, v in full.state_dict().items():
        assert torch.equal(v, resumed.state_dict()[k]), k
    moved = {k for k, v in full.state_dict().items() if not torch.equal(v, start[k])}
    assert "body.encoder.0.attn.q.weight" in moved and "body.encoder.0.attn.q.lora_b" in moved
    assert "body.decoder.0.ffn.fc1.lora_a" in moved  # A moves once B is non-zero
    with pytest.raises(ValueError, match="need 24"):
        train_restoration(fresh(), _data(10), tmp_path / "c", cfg, progress=False)


def test_training_beats_the_identity(tmp_path: Path) -> None:
    # the untrained model is the identity, so its loss is the degradation's own L1; training must go below it
    data = _data(960)
    identity = sum(float((data[i][0] - data[i][1]).abs().mean()) for i in range(len(data))) / len(data)
    model = create_model("instruct_ipt_tiny")
    cfg = RestorationTrainConfig(steps=120, batch_size=8, lr=3e-3, warmup_steps=5, save_every=40)
    hist = train_restoration(model, data, tmp_path, cfg, progress=False, log=lambda s: None)
    assert hist["log"][-1]["loss"] < 0.85 * identity


def test_evaluation_scores_per_task_against_the_inputs() -> None:
    class Identity(nn.Module):
        tasks = ("derain", "dehaze")

        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.zeros(()))

        def forward(self, x, task):
            return x + self.w

    g = torch.Generator().manual_seed(0)
    pairs = DegradedImages([torch.rand(3, 24, 30, generator=g) for _ in range(2)], tasks=("derain", "dehaze"))
    res = evaluate_restoration(Identity(), pairs, progress=False)
    assert set(res) == {"derain", "dehaze", "average"} and res["average"]["images"] == 4
    for t in ("derain", "dehaze"):
        assert res[t]["psnr_y"] == pytest.approx(res[t]["input_psnr_y"]) and res[t]["images"] == 2
    assert res["average"]["psnr_rgb"] == pytest.approx((res["derain"]["psnr_rgb"] + res["dehaze"]["psnr_rgb"]) / 2)


class _OfficialIPT(nn.Module):
    """IPT as ``huawei-noah/Pretrained-IPT`` ``model/ipt.py`` builds it (restated: same module tree, so the
    same state-dict keys; seq-first ``nn.MultiheadAttention(bias=False)``; default position mode; 0-255
    pixels through MeanShift), with a super-resolution head first to check it is skipped."""

    def __init__(self, c: int = 8, p: int = 2, size: int = 16, heads: int = 2, layers: int = 1,
                 scales: tuple[int, ...] = (2, 1, 1)) -> None:
        super().__init__()
        d, self.p, self.size, mean = c * p * p, p, size, torch.tensor((0.4488, 0.4371, 0.4040))
        self.sub_mean, self.add_mean = nn.Conv2d(3, 3, 1), nn.Conv2d(3, 3, 1)
        with torch.no_grad():
            for m, sign in ((self.sub_mean, -1), (self.add_mean, 1)):
                m.weight.copy_(torch.eye(3).view(3, 3, 1, 1))
                m.bias.copy_(sign * 255 * mean)

        def resblock() -> nn.Module:
            m = nn.Module()
            m.body = nn.Sequential(nn.Conv2d(c, c, 5, padding=2), nn.ReLU(), nn.Conv2d(c, c, 5, padding=2))
            return m

        self.head = nn.ModuleList(nn.Sequential(nn.Conv2d(3, c, 3, padding=1), resblock(), resblock()) for _ in scales)
        self.tail = nn.ModuleList(nn.Sequential(
            nn.Sequential() if s == 1 else nn.Sequential(nn.Conv2d(c, 4 * c, 3, padding=1), nn.PixelShuffle(2)),
            nn.Conv2d(c, 3, 3, padding=1)) for s in scales)
        body = nn.Module()
        tokens = (size // p) ** 2
        body.linear_encoding = nn.Linear(d, d)
        body.mlp_head = nn.Sequential(nn.Linear(d, 4 * d), nn.Dropout(0), nn.ReLU(), nn.Linear(4 * d, d), nn.Dropout(0))
        body.query_embed = nn.Embedding(len(scales), d * tokens)
        body.position_encoding = nn.Module()
        body.position_encoding.pe = nn.Embedding(tokens, d)
        body.position_encoding.register_buffer("position_ids", torch.arange(tokens)[None])

        def layer(decoder: bool) -> nn.Module:
            m = nn.Module()
            m.self_attn = nn.MultiheadAttention(d, heads, bias=False)
            if decoder:
                m.multihead_attn = nn.MultiheadAttention(d, heads, bias=False)
            m.linear1, m.linear2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)
            for j in (1, 2, 3) if decoder else (1, 2):
                setattr(m, f"norm{j}", nn.LayerNorm(d))
            return m

        body.encoder, body.decoder = nn.Module(), nn.Module()
        body.encoder.layers = nn.ModuleList(layer(False) for _ in range(layers))
        body.decoder.layers = nn.ModuleList(layer(True) for _ in range(layers))
        self.body = body
        with torch.no_grad():  # trained-looking: no parameter left at a symmetric initialisation
            for prm in self.parameters():
                if prm is not self.sub_mean.weight and prm is not self.sub_mean.bias:
                    prm.add_(torch.randn_like(prm) * 0.1)
            self.add_mean.load_state_dict(self.sub_mean.state_dict())
            self.add_mean.bias.neg_()

    def forward(self, x: torch.Tensor, idx: int) -> torch.Tensor:
        b, f = self.body, torch.nn.functional
        conv, rb1, rb2 = self.head[idx]
        feats = conv(self.sub_mean(x))
        for rb in (rb1, rb2):  # EDSR's ResBlock: x + conv(relu(conv(x)))
            feats = feats + rb.body(feats)
        t = f.unfold(feats, self.p, stride=self.p).transpose(1, 2).transpose(0, 1)  # (N, B, D)
        t = b.linear_encoding(t) + t
        q = b.query_embed.weight[idx].view(-1, 1, t.shape[-1]).repeat(1, t.shape[1], 1)
        pos = b.position_encoding.pe(b.position_encoding.position_ids).transpose(0, 1)
        t = t + pos
        for m in b.encoder.layers:
            s = m.norm1(t)
            t = t + m.self_attn(s, s, s)[0]
            t = t + m.linear2(f.relu(m.linear1(m.norm2(t))))
        mem = t
        for m in b.decoder.layers:
            s = m.norm1(t)
            t = t + m.self_attn(s + q, s + q, value=s)[0]
            t = t + m.multihead_attn(query=m.norm2(t) + q, key=mem, value=mem)[0]
            t = t + m.linear2(f.relu(m.linear1(m.norm3(t))))
        t = b.mlp_head(t) + t
        res = f.fold(t.transpose(0, 1).transpose(1, 2), self.size, self.p, stride=self.p) + feats
        return self.add_mean(self.tail[idx](res))


def test_pretrained_ipt_checkpoint_loads_and_equals_ipt(tmp_path: Path) -> None:
    torch.manual_seed(0)
    official = _OfficialIPT().double().eval()
    path = tmp_path / "IPT_pretrain.pt"
    torch.save(official.state_dict(), path)
    model = InstructIPT.load_official(path, tasks=("denoise", "derain"), heads=2).double().eval()
    ours = {k: v for k, v in official.state_dict().items() if not k.startswith(("head.0.", "tail.0."))}
    n_official = sum(v.numel() for k, v in ours.items() if "mean" not in k and "position_ids" not in k) \
        - official.body.query_embed.weight[0].numel()
    assert sum(p.numel() for p in model.parameters()) == n_official  # the SR head and its query are skipped
    assert model.cfg.rank == 0 and not model.cfg.image_residual and model.tasks == ("denoise", "derain")
    x = torch.rand(2, 3, 16, 16, dtype=torch.float64)
    with torch.no_grad():
        for j, idx in enumerate((1, 2)):
            torch.testing.assert_close(model(x, j) * 255, official(x * 255, idx), rtol=1e-9, atol=1e-9)
    # starting Instruct-IPT from IPT: rank-8 biases at zero, the same outputs
    started = InstructIPT.load_official(path, tasks=("denoise", "derain"), heads=2, rank=8).double().eval()
    assert started.modulated_layers() and param_counts(started)["biases"] > 0
    with torch.no_grad():
        torch.testing.assert_close(started(x, 1), model(x, 1), rtol=1e-9, atol=1e-9)
    # the layout's bad cases fail in one line naming the file
    torch.save({"head.0.0.weight": torch.zeros(1)}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="bad.pt is not a Pretrained-IPT checkpoint"):
        InstructIPT.load_official(tmp_path / "bad.pt")
    sr = {k: v for k, v in official.state_dict().items() if not k.startswith(("head.1.", "head.2.", "tail.1.", "tail.2."))}
    torch.save(sr, tmp_path / "IPT_sr2.pt")
    with pytest.raises(ValueError, match="only super-resolution heads"):
        InstructIPT.load_official(tmp_path / "IPT_sr2.pt")
    with pytest.raises(ValueError, match="2 scale-1 heads"):
        InstructIPT.load_official(path, tasks=("denoise",), heads=2)
