"""Training checkpoints (mmeff.checkpoint.save_state / load_state and their users): a hostile pickle runs
no code, a damaged file is named with what to do, and writes are atomic."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
import torch
from torch import nn

from mmeff.checkpoint import load_state, save_state, write_text_atomic
from mmeff.train.loop import train_steps


@dataclass
class Config:  # the fields train_steps reads
    steps: int = 4
    batch_size: int = 4
    lr: float = 1e-2
    min_lr: float = 1e-3
    warmup_steps: int = 0
    weight_decay: float = 0.0
    clip_grad: float = 1.0
    save_every: int = 2
    workers: int = 0
    seed: int = 0


def test_load_state_refuses_a_hostile_pickle_and_runs_nothing(tmp_path, hostile_checkpoint) -> None:
    marker = tmp_path / "pwned"
    path = hostile_checkpoint(tmp_path / "last.pt", marker)
    with pytest.raises(ValueError, match=r"last\.pt pickles Python objects.*will not unpickle"):
        load_state(path)
    assert not marker.exists()
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        load_state(tmp_path / "nope.pt")
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(ValueError, match="not an mmeff training checkpoint"):
        load_state(tmp_path / "list.pt")


def test_state_round_trip_keeps_optimizer_and_rng_state(tmp_path) -> None:
    net = nn.Linear(3, 2)
    opt = torch.optim.Adam(net.parameters())
    net(torch.randn(4, 3)).sum().backward()
    opt.step()
    state = {"model": net.state_dict(), "optimizer": opt.state_dict(), "rng": torch.get_rng_state(),
             "history": {"log": [{"step": 1, "loss": 0.5}], "config": {"betas": (0.9, 0.99)}}, "step": 1}
    back = load_state(save_state(state, tmp_path / "s.pt"))
    assert back["step"] == 1 and back["history"] == state["history"] and torch.equal(back["rng"], state["rng"])
    assert back["optimizer"]["param_groups"] == state["optimizer"]["param_groups"]
    assert [p.name for p in tmp_path.iterdir()] == ["s.pt"]  # no temporary file left behind


def test_writes_are_atomic(tmp_path) -> None:
    path = save_state({"a": torch.ones(2)}, tmp_path / "last.pt")
    before = path.read_bytes()
    with pytest.raises(Exception):  # noqa: B017 (whatever torch.save raises for a lambda)
        save_state({"a": lambda: 0}, path)
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["last.pt"]
    write_text_atomic(tmp_path / "h.json", json.dumps({"x": 1}))
    assert json.loads((tmp_path / "h.json").read_text()) == {"x": 1}


class Squares(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 64

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.tensor([float(i % 7)])


def _loss(model: nn.Module, batch: torch.Tensor, step: int, device: torch.device) -> dict[str, torch.Tensor]:
    return {"loss": (model(batch.to(device)) - batch.to(device) ** 2).pow(2).mean()}


def test_train_steps_resume_refuses_hostile_and_damaged_checkpoints(tmp_path, hostile_checkpoint) -> None:
    cfg = Config()
    out = tmp_path / "run"
    out.mkdir()
    marker = tmp_path / "pwned"
    hostile_checkpoint(out / "last.pt", marker)
    with pytest.raises(ValueError, match=r"last\.pt pickles Python objects"):
        train_steps(nn.Linear(1, 1), Squares(), out, cfg, _loss, progress=False, log=lambda s: None)
    assert not marker.exists()
    (out / "last.pt").unlink()
    train_steps(nn.Linear(1, 1), Squares(), out, cfg, _loss, stop_after=2, progress=False, log=lambda s: None)
    good = (out / "last.pt").read_bytes()
    (out / "last.pt").write_bytes(good[: len(good) // 2])  # a copy cut short
    with pytest.raises(ValueError, match=r"last\.pt is damaged.*delete it to start over"):
        train_steps(nn.Linear(1, 1), Squares(), out, cfg, _loss, progress=False, log=lambda s: None)
    (out / "last.pt").write_bytes(good)
    hist = train_steps(nn.Linear(1, 1), Squares(), out, cfg, _loss, progress=False, log=lambda s: None)
    assert hist["step"] == 4 and sorted(p.name for p in out.iterdir()) == ["history.json", "last.pt"]
