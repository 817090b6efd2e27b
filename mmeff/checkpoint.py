"""The one on-disk format of mmeff's own modules: safetensors with a ``format`` tag and the JSON config.

:class:`Checkpointable` is the ``save`` / ``load`` of every module built from a JSON-able config (ToCom,
VisToG, CDT, Instruct-IPT): :func:`save_module` writes it (atomically) and :func:`read_module` reads it
back, refusing a missing file, a folder, a file that is not safetensors, and a file of another format or
with broken metadata, each in one line naming the file; :func:`load_exact` then refuses weights that do not
fit the config. :func:`state_sha256` is the checksum of the weights a file may carry in its metadata, and
:func:`file_sha256` the checksum the shipped weights (mmeff-mini, the Instruct-IPT miniature) are checked with.

Training states (optimizer, RNG, history: what resuming needs besides the weights) are written by
:func:`save_state` and read by :func:`load_state`: tensors and plain containers only, so ``torch.load``
reads them with ``weights_only=True`` and a hostile file cannot run code; written to a temporary file in the
same folder, synced and renamed, so a crash mid-write never leaves a torn checkpoint behind.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import pickle
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

__all__ = ["RECORD_PREFIXES", "Checkpointable", "InertRecord", "atomic_write", "check_sha256", "file_sha256", "load_exact", "load_state", "local_or_hub",
           "read_module", "read_tensors", "save_module", "save_state", "state_sha256", "write_text_atomic"]


def local_or_hub(ref: str | Path, what: str = "model") -> str:
    """Where ``from_pretrained`` should look: ``ref`` itself (``~`` expanded) when it exists on disk or reads
    as a hub id (``name`` or ``org/name``). A reference that looks like a local path (starts with ``/``,
    ``.`` or ``~``, ends with ``/``, or has more than one ``/``) and does not exist raises
    ``FileNotFoundError`` at once, instead of being sent to the hub (which waits on the network, and with
    ``HF_HUB_OFFLINE=1`` fails with an error about the hub, not about the typo)."""
    text = str(ref)
    path = Path(text).expanduser()
    if path.exists():
        return str(path)
    if text.startswith(("/", ".", "~")) or text.endswith("/") or text.count("/") > 1 or "\\" in text:
        raise FileNotFoundError(f"no such folder: {text} (the {what}'s local path; a hub id reads org/name)")
    return text


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` on a temporary file beside ``path``, fsync it and rename it onto ``path``: readers
    see the old file or the new one, never half of one. The temporary file is removed if ``write`` fails."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_text_atomic(path: str | Path, text: str) -> Path:
    """:func:`atomic_write` of a text file (UTF-8)."""
    return atomic_write(path, lambda t: t.write_text(text, encoding="utf-8"))


def save_state(state: Mapping[str, Any], path: str | Path) -> Path:
    """Write a training state (tensors, numbers, strings, ``None`` and lists / tuples / dicts of them) to
    ``path`` atomically; :func:`load_state` reads it back without unpickling any class."""
    return atomic_write(path, lambda t: torch.save(dict(state), t))


#: module prefixes of training-record classes (MMEngine's message hub and history buffers, MMCV / MMAction2
#: records, Lightning's and OmegaConf's objects that are not dict or list subclasses) that a published
#: checkpoint may name: ``load_state(..., records=True)`` reads them as inert :class:`InertRecord`
#: stand-ins, so nothing of those libraries (installed or not) runs
RECORD_PREFIXES = ("mmengine.", "mmcv.", "mmaction.", "mmdet.", "mmseg.", "pytorch_lightning.", "lightning.",
                   "lightning_fabric.", "omegaconf.")


class InertRecord:
    """Stand-in for a training-record object a checkpoint names (e.g. MMEngine's ``HistoryBuffer``): it
    keeps what the file stored (``args``, ``state``) and runs no code of the class it replaces. Dict and
    list subclasses (Lightning's ``AttributeDict``) cannot stand in this way: torch's weights-only loader
    fills only real dicts and lists, so such files are refused."""

    def __new__(cls, *args: Any, **kwargs: Any) -> InertRecord:  # noqa: D102
        obj = super().__new__(cls)
        obj.args = args
        obj.state = None
        return obj

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:  # noqa: D105
        self.state = state


def _numpy_global(name: str) -> Any:
    """The numpy object a checkpoint names to rebuild arrays and scalars (``None`` for anything else):
    the functions and types torch's weights-only loader documents as safe for numpy data."""
    # numpy 2 names the module numpy._core, numpy 1 numpy.core; a file may come from either
    core = importlib.import_module("numpy._core.multiarray" if hasattr(np, "_core") else "numpy.core.multiarray")
    table = {"numpy.ndarray": np.ndarray, "numpy.dtype": np.dtype}
    table.update({f"{mod}.{fn}": getattr(core, fn) for mod in ("numpy.core.multiarray", "numpy._core.multiarray")
                  for fn in ("_reconstruct", "scalar")})
    if name in table:
        return table[name]
    if name.startswith("numpy.dtypes.") and name.endswith("DType"):
        return getattr(np.dtypes, name.rsplit(".", 1)[1], None)
    return None


def _record_globals(path: Path) -> list[tuple[Any, str]]:
    """``(stand-in, name)`` for every global ``path`` names beyond tensors and containers; an
    ``UnpicklingError`` naming the globals when any is neither numpy data nor a training record."""
    names = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    allowed, refused = [], []
    for name in names:
        obj = _numpy_global(name)
        if obj is None and name.startswith(RECORD_PREFIXES):
            obj = type(name.rsplit(".", 1)[1], (InertRecord,), {"__module__": __name__, "stands_for": name})
        (refused if obj is None else allowed).append((obj, name))
    if any(n.startswith("numpy.") for _, n in allowed):
        # a rebuilt dtype gets its state set, so its concrete class (Float64DType, ...) must be allowed too
        allowed += [(getattr(np.dtypes, t), f"numpy.dtypes.{t}") for t in dir(np.dtypes) if t.endswith("DType")]
    if refused:
        raise pickle.UnpicklingError(f"it names {', '.join(n for _, n in refused[:5])} (neither numpy data nor "
                                     f"a training record)")
    return allowed


def load_state(path: str | Path, map_location: str | torch.device | None = "cpu", *, records: bool = False
               ) -> dict[str, Any]:
    """Read a :func:`save_state` file with ``torch.load(weights_only=True)``.

    ``ValueError`` naming the file when it is damaged (e.g. a truncated copy) or pickles Python objects other
    than tensors and plain containers (loading those could run code from the file, so mmeff does not).
    ``records=True`` (published checkpoints, e.g. MMEngine's) also reads numpy arrays and scalars and the
    training-record classes of :data:`RECORD_PREFIXES`, the latter as inert :class:`InertRecord` objects;
    anything else is still refused, naming the globals."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path} is a folder, not a checkpoint file")
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path} (expected a training checkpoint)")
    try:
        try:
            state = torch.load(path, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError:
            if not records:
                raise
            with torch.serialization.safe_globals(_record_globals(path)):
                state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise ValueError(f"{path} pickles Python objects besides tensors and plain containers; mmeff reads "
                         f"checkpoints with weights_only=True and will not unpickle it (that could run code "
                         f"from the file): {str(e).splitlines()[0][:200]}") from e
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise ValueError(f"{path} is damaged or not a torch checkpoint ({str(e).splitlines()[0][:160]}); "
                         f"delete it to start over") from e
    if not isinstance(state, dict):
        raise ValueError(f"{path} is not an mmeff training checkpoint (holds {type(state).__name__}, not a dict)")
    return state


def read_tensors(path: str | Path, what: str = "a weights file") -> dict[str, Tensor]:
    """The ``{name: tensor}`` of a published weights file: ``.safetensors``, or a torch pickle (``.bin``,
    ``.pt``, ``.pth``, ``.ckpt``) read with ``weights_only=True`` (:func:`load_state` with ``records=True``); a
    ``state_dict`` / ``model`` / ``module`` entry holding the tensors is unwrapped. One-line ``ValueError`` naming the file otherwise."""
    path = Path(path)
    if path.suffix == ".safetensors":
        if not path.is_file():
            raise FileNotFoundError(f"no such file: {path} (expected {what})")
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no iterator)
        except SafetensorError as e:
            raise ValueError(f"{path} is not {what}: not a safetensors file ({e})") from e
    state = load_state(path, records=True)
    for key in ("state_dict", "model", "module"):
        if isinstance(state.get(key), dict):
            state = state[key]
            break
    bad = [k for k, v in state.items() if not isinstance(v, Tensor)]
    if bad:
        raise ValueError(f"{path} is not {what}: entries that are not tensors ({bad[:3]})")
    return dict(state)


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file, read in 1 MiB pieces (shipped weights are checked against their records)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()



def check_sha256(got: str, want: object, mismatch: str, cause: str = "the file is corrupt or was altered") -> None:
    """One ``ValueError`` line when the sha256 ``got`` is not the recorded ``want``: ``mismatch`` says what does
    not match what (``"x.safetensors does not match manifest.json"``), ``cause`` what that means."""
    if got != want:
        raise ValueError(f"{mismatch} (sha256 {got[:16]}..., expected {str(want)[:16]}...): {cause}")

def save_module(module: nn.Module, path: str | Path, fmt: str, config: Mapping[str, Any],
                extra: Mapping[str, Any] | None = None) -> Path:
    """Write ``module``'s state dict (detached, contiguous, on the CPU) to ``path`` (folders made;
    atomically, :func:`atomic_write`) with metadata ``{"format": fmt, "config": json, "extra": json}``;
    returns the path."""
    state = {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}
    meta = {"format": fmt, "config": json.dumps(dict(config)), "extra": json.dumps(dict(extra or {}))}
    return atomic_write(path, lambda t: save_file(state, str(t), metadata=meta))


def read_module(path: str | Path, fmt: str, what: str, device: str | torch.device = "cpu"
                ) -> tuple[dict[str, Any], dict[str, Any], dict[str, Tensor]]:
    """``(config, extra, state_dict)`` of a file written by :func:`save_module` with format ``fmt``.

    ``FileNotFoundError`` if it is missing; one-line ``ValueError`` naming the file if it is a directory,
    not a safetensors file, of another format, or its config / extra metadata is missing or not JSON."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path} is a directory, not a file (expected {what})")
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path} (expected {what})")
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            meta = f.metadata() or {}
            if meta.get("format") != fmt:
                raise ValueError(f"{path} is not {what} (metadata format={meta.get('format')!r})")
            state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no iterator)
    except SafetensorError as e:
        raise ValueError(f"{path} is not {what}: not a safetensors file ({e})") from e
    try:
        return json.loads(meta["config"]), json.loads(meta.get("extra") or "{}"), state
    except (KeyError, json.JSONDecodeError) as e:  # the right format tag, broken config / extra metadata
        raise ValueError(f"{path} is not {what}: its metadata is incomplete or not JSON ({e!r})") from e


def load_exact(module: nn.Module, state: Mapping[str, Tensor], path: str | Path, what: str) -> None:
    """``module.load_state_dict(state)`` when ``state`` has exactly ``module``'s keys and shapes; otherwise
    ``ValueError`` naming ``path`` and (up to three of each) the missing, unexpected and mis-shaped keys."""
    own = module.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    shapes = [k for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        raise ValueError(f"{path} does not fit {what}: missing {missing[:3]}, unexpected {unexpected[:3]}, "
                         f"wrong shape {shapes[:3]} (of {len(own)} tensors)")
    module.load_state_dict(state)


def state_sha256(state: Mapping[str, Tensor]) -> str:
    """sha256 over the names, dtypes, shapes and bytes of a state dict (sorted by name).

    A file's own metadata cannot hold the file's hash, so :class:`Checkpointable` records this one: it
    covers exactly the tensors that loading gets back."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


C = TypeVar("C", bound="Checkpointable")


class Checkpointable:
    """``save`` / ``load`` for an ``nn.Module`` rebuilt from its constructor config: one safetensors file
    with the weights, the config as JSON and a format tag in its metadata (:func:`save_module`).

    A subclass sets ``checkpoint_format`` (the tag; files with another are refused), ``checkpoint_what``
    (how errors name the expected file) and implements :meth:`checkpoint_config`; it overrides
    :meth:`from_checkpoint_config` when its constructor does not take that dict as keyword arguments.
    ``checkpoint_sha256``: record :func:`state_sha256` of the weights in the metadata (key
    ``weights_sha256``) and check it on load (files without the record load unchecked).
    ``checkpoint_keep_dtype``: load in the dtype the weights were saved in (else the constructor's).
    """

    checkpoint_format: ClassVar[str] = ""
    checkpoint_what: ClassVar[str] = "an mmeff checkpoint"
    checkpoint_sha256: ClassVar[bool] = False
    checkpoint_keep_dtype: ClassVar[bool] = False

    def checkpoint_config(self) -> dict[str, Any]:
        """The JSON-able constructor config stored in the file."""
        raise NotImplementedError(f"{type(self).__name__} does not define checkpoint_config()")

    @classmethod
    def from_checkpoint_config(cls: type[C], config: dict[str, Any]) -> C:
        """A fresh module built from a stored config (default: ``cls(**config)``)."""
        return cls(**config)

    def save(self, path: str | Path, extra: Mapping[str, Any] | None = None) -> Path:
        """Write the weights and config to ``path`` (atomically; folders made); ``extra`` goes into the
        metadata as JSON. Returns the path."""
        if not isinstance(self, nn.Module):
            raise TypeError(f"{type(self).__name__} is not an nn.Module; Checkpointable saves modules")
        meta = dict(extra or {})
        if self.checkpoint_sha256:
            meta["weights_sha256"] = state_sha256(self.state_dict())
        return save_module(self, path, self.checkpoint_format, self.checkpoint_config(), meta)

    @classmethod
    def load(cls: type[C], path: str | Path, device: str | torch.device = "cpu") -> C:
        """Rebuild a module written by :meth:`save`, on ``device``.

        ``FileNotFoundError`` for a missing file; one-line ``ValueError`` naming the file for a directory,
        a file that is not such a checkpoint, a config the constructor refuses, weights that no longer
        match their recorded sha256, or weights that do not fit the config (:func:`load_exact`)."""
        path = Path(path)
        config, extra, state = read_module(path, cls.checkpoint_format, cls.checkpoint_what)
        want = extra.get("weights_sha256") if cls.checkpoint_sha256 and isinstance(extra, dict) else None
        if want is not None:
            got = state_sha256(state)
            check_sha256(got, want, f"{path}: weights do not match the sha256 recorded when it was saved")
        try:
            model = cls.from_checkpoint_config(config)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{path}: its config cannot build {cls.__name__} "
                             f"({str(e).splitlines()[0] if str(e) else type(e).__name__})") from e
        assert isinstance(model, nn.Module)
        floats = [t.dtype for t in state.values() if t.is_floating_point()]
        if cls.checkpoint_keep_dtype and floats:
            model.to(dtype=floats[0])
        load_exact(model, state, path, "its own config")
        return model.to(device)
