"""Training checkpoints (mmeff.checkpoint.save_state / load_state and their users): a hostile pickle runs
no code, a damaged file is named with what to do, and writes are atomic."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
import torch
from torch import nn

from mmeff.checkpoint import InertRecord, load_state, read_tensors, save_state, write_text_atomic
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


# ------------------------------------------------------------------ one config base, one loop, one file format
def test_train_configs_share_the_base_and_round_trip_through_json() -> None:
    from mmeff.train.loop import BaseTrainConfig, StepTrainConfig
    from mmeff.train.restoration import RestorationTrainConfig
    from mmeff.train.videocls import TrainConfig
    from mmeff.train.videotok import TokenizerTrainConfig

    for cls in (RestorationTrainConfig, TokenizerTrainConfig, TrainConfig):
        assert issubclass(cls, BaseTrainConfig)
        cfg = cls(batch_size=3, seed=7)
        data = json.loads(json.dumps(cfg.to_dict()))
        assert cls.from_dict(data) == cfg
    assert issubclass(RestorationTrainConfig, StepTrainConfig) and issubclass(TokenizerTrainConfig, StepTrainConfig)
    # each trainer keeps its own defaults
    assert (RestorationTrainConfig().steps, RestorationTrainConfig().batch_size, RestorationTrainConfig().save_every) \
        == (2000, 16, 250)
    assert TokenizerTrainConfig().perceptual == "auto" and TrainConfig().clip_grad == 40.0
    with pytest.raises(ValueError, match=r"unknown RestorationTrainConfig fields \['kl_weight', 'perceptual'") as e:
        RestorationTrainConfig.from_dict(TokenizerTrainConfig().to_dict())
    assert "\n" not in str(e.value)


def test_train_steps_refuses_to_resume_under_other_settings(tmp_path) -> None:
    from mmeff.train.loop import StepTrainConfig, train_steps

    cfg = StepTrainConfig(steps=4, batch_size=4, lr=1e-2, min_lr=1e-3, warmup_steps=0, save_every=2)
    out = tmp_path / "run"
    torch.manual_seed(0)
    train_steps(nn.Linear(1, 1), Squares(), out, cfg, _loss, stop_after=2, progress=False, log=lambda s: None)
    other = StepTrainConfig(**{**cfg.to_dict(), "lr": 5e-2})
    with pytest.raises(ValueError, match=r"last\.pt holds a run with other settings \(lr 0\.01 -> 0\.05\)"):
        train_steps(nn.Linear(1, 1), Squares(), out, other, _loss, progress=False, log=lambda s: None)
    # loader workers do not change the run: resuming with another count goes on
    same = StepTrainConfig(**{**cfg.to_dict(), "workers": 1})
    hist = train_steps(nn.Linear(1, 1), Squares(), out, same, _loss, progress=False, log=lambda s: None)
    assert hist["step"] == 4 and hist["config"]["workers"] == 1


def test_epoch_sampler_shards_like_distributed_sampler() -> None:
    from torch.utils.data import DistributedSampler

    from mmeff.train.loop import EpochSampler

    n, batch, world, seed = 11, 2, 3, 5
    per_epoch = EpochSampler.steps_per_epoch(n, batch, world)
    assert per_epoch == 2  # 11 clips over 3 ranks: 4 each (padded), in batches of 2
    for rank in range(world):
        got = list(EpochSampler(n, batch, 0, 3 * per_epoch, rank, world, seed))
        assert len(got) == 3 * per_epoch
        ref = DistributedSampler(range(n), world, rank, shuffle=True, seed=seed)
        for epoch in range(3):
            ref.set_epoch(epoch)
            flat = [i for b in got[epoch * per_epoch:(epoch + 1) * per_epoch] for i in b]
            assert flat == list(ref)
    # a run resumed mid-epoch sees the same batches
    whole = list(EpochSampler(n, batch, 0, 6, 1, world, seed))
    assert list(EpochSampler(n, batch, 3, 6, 1, world, seed)) == whole[3:6]
    assert [len(b) for b in EpochSampler(5, 2, 0, 3, 0, 1, 0)] == [2, 2, 1]  # a short last batch


def test_checkpointable_round_trip_sha256_and_one_line_errors(tmp_path) -> None:
    from safetensors.torch import save_file

    from mmeff.checkpoint import Checkpointable

    class Net(Checkpointable, nn.Module):
        checkpoint_format = "mmeff.test-net"
        checkpoint_what = "a test net"
        checkpoint_sha256 = True

        def __init__(self, width: int = 3) -> None:
            super().__init__()
            self.width = width
            self.fc = nn.Linear(width, 2)

        def checkpoint_config(self):
            return {"width": self.width}

    net = Net(4).to(torch.float64)
    path = net.save(tmp_path / "sub" / "net.safetensors", extra={"note": "x"})
    back = Net.load(path)
    assert back.width == 4 and torch.equal(back.fc.weight, net.fc.weight.float())
    assert back.fc.weight.dtype == torch.float32  # the constructor's dtype unless checkpoint_keep_dtype
    Net.checkpoint_keep_dtype = True
    assert Net.load(path).fc.weight.dtype == torch.float64
    errors = []
    with pytest.raises(ValueError, match="is a directory") as e:
        Net.load(tmp_path)
    errors.append(e)
    with pytest.raises(FileNotFoundError, match="no such file"):
        Net.load(tmp_path / "absent.safetensors")
    save_file({"w": torch.zeros(1)}, str(tmp_path / "other.safetensors"), metadata={"format": "mmeff.other"})
    with pytest.raises(ValueError, match="is not a test net") as e:
        Net.load(tmp_path / "other.safetensors")
    errors.append(e)
    save_file({"w": torch.zeros(1)}, str(tmp_path / "broken.safetensors"), metadata={"format": "mmeff.test-net"})
    with pytest.raises(ValueError, match="metadata is incomplete") as e:
        Net.load(tmp_path / "broken.safetensors")
    errors.append(e)
    save_file({"fc.weight": torch.zeros(2, 4)}, str(tmp_path / "short.safetensors"),
              metadata={"format": "mmeff.test-net", "config": '{"width": 4}'})
    with pytest.raises(ValueError, match=r"missing \['fc.bias'\]") as e:
        Net.load(tmp_path / "short.safetensors")
    errors.append(e)
    save_file({"fc.weight": torch.zeros(2, 4)}, str(tmp_path / "cfg.safetensors"),
              metadata={"format": "mmeff.test-net", "config": '{"depth": 4}'})
    with pytest.raises(ValueError, match="its config cannot build Net") as e:
        Net.load(tmp_path / "cfg.safetensors")
    errors.append(e)
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF  # one weight's last byte
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="do not match the sha256") as e:
        Net.load(path)
    errors.append(e)
    assert all("\n" not in str(x.value) for x in errors)


def _mmengine_checkpoint(path, extra=None):
    """A checkpoint in MMEngine's layout (meta, state_dict, message_hub with a HistoryBuffer and numpy values),
    pickled under MMEngine's module names by stand-in modules that are removed before loading."""
    import collections
    import sys
    import types

    import numpy as np

    names = ("mmengine", "mmengine.logging", "mmengine.logging.history_buffer")
    saved = {n: sys.modules.get(n) for n in names}
    mod = types.ModuleType(names[-1])

    class HistoryBuffer:
        def __init__(self) -> None:
            self._log_history = np.array([0.5, 0.25])
            self._count_history = np.array([1, 1])
            self.max_length = 1000

    HistoryBuffer.__module__ = names[-1]
    HistoryBuffer.__qualname__ = "HistoryBuffer"
    mod.HistoryBuffer = HistoryBuffer
    try:
        sys.modules.update({n: types.ModuleType(n) for n in names[:-1]})
        sys.modules[names[-1]] = mod
        torch.save({"meta": {"epoch": 3, "seed": np.int64(5), "cfg": "model = dict(type='Recognizer3D')"},
                    "state_dict": collections.OrderedDict(w=torch.arange(4.0)),
                    "message_hub": {"log_scalars": {"train/loss": HistoryBuffer()},
                                    "runtime_info": {"iter": 7, "lr": np.float64(0.1)}},
                    **(extra or {})}, path)
    finally:
        for n, m in saved.items():
            if m is None:
                sys.modules.pop(n, None)
            else:
                sys.modules[n] = m
    return path


def test_mmengine_checkpoints_load_with_records_inert(tmp_path, hostile_checkpoint) -> None:
    path = _mmengine_checkpoint(tmp_path / "epoch_3.pth")
    with pytest.raises(ValueError, match=r"epoch_3\.pth pickles Python objects"):
        load_state(path)  # a training state of mmeff's own never holds foreign objects
    state = load_state(path, records=True)
    assert torch.equal(state["state_dict"]["w"], torch.arange(4.0)) and state["meta"]["epoch"] == 3
    buf = state["message_hub"]["log_scalars"]["train/loss"]
    assert isinstance(buf, InertRecord) and type(buf).__name__ == "HistoryBuffer"
    assert list(buf.state["_log_history"]) == [0.5, 0.25] and float(state["message_hub"]["runtime_info"]["lr"]) == 0.1
    assert torch.equal(read_tensors(path)["w"], torch.arange(4.0))
    # records=True still refuses what is not numpy data or a training record, and runs none of it
    marker = tmp_path / "pwned"
    bad = hostile_checkpoint(tmp_path / "bad.pth", marker)
    with pytest.raises(ValueError, match=r"bad\.pth pickles Python objects.*it names io\.open \(neither numpy") as e:
        load_state(bad, records=True)
    assert len(str(e.value).splitlines()) == 1 and not marker.exists()
