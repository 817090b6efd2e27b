"""The one training loop on accelerate (mmeff.train.loop.train_steps): gradient accumulation, mixed precision,
transformers' schedule, exact resume and a state file read back without unpickling code."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from mmeff.checkpoint import load_state, save_state
from mmeff.train.loop import StepTrainConfig, check_resume_config, lr_at, train_steps


class Items(torch.utils.data.Dataset):
    """Item ``i`` a pure function of ``i``; counts the items it was asked for."""

    def __init__(self, n: int = 256) -> None:
        self.n, self.reads = n, 0

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> torch.Tensor:
        self.reads += 1
        g = torch.Generator().manual_seed(i)
        return torch.randn(4, generator=g)


def _target(x: torch.Tensor) -> torch.Tensor:
    return x @ torch.tensor([1.0, -2.0, 0.5, 3.0]) + 0.25


def _loss(model: nn.Module, batch: torch.Tensor, step: int, device: torch.device) -> dict[str, torch.Tensor]:
    x = batch.to(device)
    err = (model(x).squeeze(-1).float() - _target(x)).pow(2).mean()
    return {"loss": err, "abs": err.detach().sqrt()}


def _net() -> nn.Module:
    torch.manual_seed(1)
    return nn.Linear(4, 1)


def _cfg(**kw) -> StepTrainConfig:
    base = dict(steps=6, batch_size=4, lr=5e-2, min_lr=5e-3, warmup_steps=2, save_every=2, clip_grad=1.0)
    return StepTrainConfig(**{**base, **kw})


def _run(mode: str, cfg: StepTrainConfig, out=None, n: int = 37, **kw):
    """Train a fresh net fed one of the three ways: ``index`` (items a function of their index), ``shuffle``
    (epochs over ``n`` items), ``batched`` (a list of batches of ``cfg.batch_size`` of ``n`` items)."""
    model = _net()
    data = Items(256 if mode == "index" else n)
    if mode == "batched":
        data = [torch.stack([data[i] for i in range(j, min(j + cfg.batch_size, n))])
                for j in range(0, n, cfg.batch_size)]
    hist = train_steps(model, data, out, cfg, _loss, progress=False, log=lambda s: None,
                       shuffle=mode == "shuffle", batched=mode == "batched", **kw)
    return model, hist


@pytest.mark.parametrize(("mode", "n"), [("index", 0), ("shuffle", 37), ("shuffle", 36), ("batched", 40)])
def test_two_micro_batches_of_b_equal_one_batch_of_2b(mode, n) -> None:
    # shuffled: 37 items end each epoch on a short step of 5 (micro-batches of 4 + 1, weighed by their share
    # of the step's items), 36 items on a step of one micro-batch (which must still sync and step); the
    # caller's batches: 40 items, as a short step of them weighs its batches equally
    small, h_small = _run(mode, _cfg(steps=12, batch_size=4, grad_accum=2, save_every=1), n=n)
    big, h_big = _run(mode, _cfg(steps=12, batch_size=8, save_every=1), n=n)
    for a, b in zip(small.parameters(), big.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert not torch.equal(small.weight, _net().weight)
    for ra, rb in zip(h_small["log"], h_big["log"], strict=True):
        assert ra["lr"] == rb["lr"]
        assert ra["loss"] == pytest.approx(rb["loss"], rel=1e-5)


@pytest.mark.parametrize("mode", ["index", "shuffle", "batched"])
def test_resume_with_grad_accum_is_bit_exact(mode, tmp_path) -> None:
    cfg = _cfg(steps=9, batch_size=3, grad_accum=2, save_every=3)  # 37 items: epochs of 7 steps, the last short
    straight, h1 = _run(mode, cfg, tmp_path / "a")
    _run(mode, cfg, tmp_path / "b", stop_after=3)
    _run(mode, cfg, tmp_path / "b", stop_after=3)
    resumed, h2 = _run(mode, cfg, tmp_path / "b")
    for a, b in zip(straight.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(a, b)
    assert [r["loss"] for r in h1["log"]] == [r["loss"] for r in h2["log"]]
    assert [r["lr"] for r in h1["log"]] == [r["lr"] for r in h2["log"]]


def test_resume_skips_the_taken_batches_of_a_dataloader_without_loading_them(tmp_path) -> None:
    items = Items(40)
    loader = torch.utils.data.DataLoader(items, batch_size=4)  # 10 batches: 5 steps an epoch
    cfg = _cfg(steps=8, grad_accum=2, save_every=1)
    model = _net()
    h1 = train_steps(model, loader, None, cfg, _loss, batched=True, progress=False, log=lambda s: None)
    cut = _net()
    train_steps(cut, loader, tmp_path, cfg, _loss, batched=True, stop_after=3, progress=False, log=lambda s: None)
    items.reads = 0
    resumed = _net()
    h2 = train_steps(resumed, loader, tmp_path, cfg, _loss, batched=True, progress=False, log=lambda s: None)
    assert items.reads == (10 - 6) * 4 + 6 * 4  # the rest of epoch 0 (not the 6 batches taken), 3 steps of epoch 1
    assert torch.equal(model.weight, resumed.weight)
    assert [r["loss"] for r in h1["log"]] == [r["loss"] for r in h2["log"]]


def test_bf16_mixed_precision_runs_on_cpu_and_learns() -> None:
    seen = {}

    def loss(model, batch, step, device):
        if not seen:
            seen.update(autocast=torch.is_autocast_enabled("cpu"), out=model(batch.to(device)).dtype)
        return _loss(model, batch, step, device)

    model = _net()
    cfg = _cfg(steps=30, batch_size=8, lr=0.2, min_lr=0.02, warmup_steps=0, save_every=10,
               mixed_precision="bf16", seed=3)
    hist = train_steps(model, Items(), None, cfg, loss, progress=False, log=lambda s: None)
    losses = [r["loss"] for r in hist["log"]]
    assert losses[-1] < 0.2 * losses[0]
    assert seen == {"autocast": True, "out": torch.float32}  # autocast on; accelerate gives float32 outputs
    # the model comes back as it went in: no autocast wrapper left on its forward
    assert "forward" not in model.__dict__ and "_original_forward" not in model.__dict__
    assert model(torch.zeros(2, 4)).dtype == torch.float32 and not torch.is_autocast_enabled("cpu")
    # another precision in the same process (accelerate keeps its state process-wide)
    again = train_steps(_net(), Items(), None, _cfg(steps=2), _loss, progress=False, log=lambda s: None)
    assert again["step"] == 2


def test_state_file_reads_back_weights_only_with_no_pickled_code(tmp_path) -> None:
    cfg = _cfg(steps=4, grad_accum=2)
    groups = lambda m: torch.optim.SGD([{"params": [m.weight]}, {"params": [m.bias]}], lr=0.1)  # noqa: E731
    train_steps(_net(), Items(), tmp_path, cfg, _loss, stop_after=2, progress=False, log=lambda s: None,
                optimizer=groups, lr_schedule=lambda s: [0.1 / (s + 1), 0.05])
    path = tmp_path / "last.pt"
    assert torch.serialization.get_unsafe_globals_in_checkpoint(str(path)) == []
    state = torch.load(path, weights_only=True)
    assert {"model", "optimizer", "scheduler", "rng", "np_rng", "py_rng", "step", "history"} <= set(state)
    assert state["step"] == 2 and state["scheduler"]["last_epoch"] == 2
    assert [g["lr"] for g in state["optimizer"]["param_groups"]] == [0.1 / 3, 0.05]  # the rates of step 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["history.json", "last.pt"]  # no accelerate folder


def test_lr_curve_is_transformers_warmup_cosine_to_min_lr() -> None:
    from transformers import get_cosine_with_min_lr_schedule_with_warmup

    cfg = _cfg(steps=10, warmup_steps=3, lr=1e-2, min_lr=1e-3, save_every=1, grad_accum=2)
    hist = _run("index", cfg)[1]
    got = [r["lr"] for r in hist["log"]]
    want = [cfg.lr * s / 3 if s < 3 else
            cfg.min_lr + (cfg.lr - cfg.min_lr) * 0.5 * (1 + math.cos(math.pi * (s - 3) / 7)) for s in range(10)]
    assert got == pytest.approx(want, rel=1e-12, abs=1e-15)
    assert got == [lr_at(s, cfg) for s in range(10)]  # lr_at is the loop's schedule, float for float
    opt = torch.optim.Adam([nn.Parameter(torch.zeros(1))], lr=cfg.lr)
    ref = get_cosine_with_min_lr_schedule_with_warmup(opt, 3, 10, min_lr=cfg.min_lr)
    hf = []
    for _ in range(10):
        hf.append(opt.param_groups[0]["lr"])
        opt.step()
        ref.step()
    assert got == pytest.approx(hf, rel=1e-12)


def test_old_configs_and_state_files_still_resume(tmp_path) -> None:
    cfg = _cfg(steps=6, save_every=3)
    straight, h1 = _run("index", cfg, tmp_path / "a")
    _run("index", cfg, tmp_path / "b", stop_after=3)
    # what the hand-written loop saved: no scheduler, numpy / Python RNG or scaler, a config before the new fields
    path = tmp_path / "b" / "last.pt"
    state = load_state(path)
    for key in ("scheduler", "np_rng", "py_rng", "scaler"):
        del state[key]
    for key in ("grad_accum", "mixed_precision"):
        del state["history"]["config"][key]
    save_state(state, path)
    check_resume_config(state["history"]["config"], cfg, path)  # the defaults are what the old run trained with
    resumed, h2 = _run("index", cfg, tmp_path / "b")
    assert torch.equal(straight.weight, resumed.weight)
    assert [r["lr"] for r in h1["log"]] == [r["lr"] for r in h2["log"]]
    with pytest.raises(ValueError, match=r"other settings \(grad_accum 1 -> 2\)"):
        check_resume_config(state["history"]["config"], _cfg(steps=6, grad_accum=2), path)


def test_bad_settings_are_refused_in_one_line() -> None:
    with pytest.raises(ValueError, match="mixed_precision is one of"):
        _run("index", _cfg(steps=1, mixed_precision="fp64"))
    with pytest.raises(ValueError, match="grad_accum is a whole number"):
        _run("index", _cfg(steps=1, grad_accum=0))
    with pytest.raises(ValueError, match=r"2 steps of 4 x 2 micro-batches x 1 ranks need 16"):
        train_steps(_net(), Items(10), None, _cfg(steps=2, grad_accum=2), _loss, progress=False)
