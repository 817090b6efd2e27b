"""The one on-disk format of mmeff's own modules: safetensors with a ``format`` tag and the JSON config.

ToCom, VisToG and Instruct-IPT save with :func:`save_module` and load with :func:`read_module`, which
refuses a missing file, a file that is not safetensors, and a file of another format, each with a message
naming the file. :func:`file_sha256` is the checksum the shipped weights (mmeff-mini, the Instruct-IPT
miniature) are checked with.

Training states (optimizer, RNG, history: what resuming needs besides the weights) are written by
:func:`save_state` and read by :func:`load_state`: tensors and plain containers only, so ``torch.load``
reads them with ``weights_only=True`` and a hostile file cannot run code; written to a temporary file in the
same folder, synced and renamed, so a crash mid-write never leaves a torn checkpoint behind.
"""

from __future__ import annotations

import json
import os
import pickle
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["atomic_write", "file_sha256", "load_exact", "load_state", "local_or_hub", "read_module", "save_module",
           "save_state", "write_text_atomic"]


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


def load_state(path: str | Path, map_location: str | torch.device | None = "cpu") -> dict[str, Any]:
    """Read a :func:`save_state` file with ``torch.load(weights_only=True)``.

    ``ValueError`` naming the file when it is damaged (e.g. a truncated copy) or pickles Python objects other
    than tensors and plain containers (loading those could run code from the file, so mmeff does not)."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path} is a folder, not a checkpoint file")
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path} (expected a training checkpoint)")
    try:
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


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file, read in 1 MiB pieces (shipped weights are checked against their records)."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_module(module: nn.Module, path: str | Path, fmt: str, config: Mapping[str, Any],
                extra: Mapping[str, Any] | None = None) -> Path:
    """Write ``module``'s state dict (detached, contiguous, on the CPU) to ``path`` (folders made;
    atomically, :func:`atomic_write`) with metadata ``{"format": fmt, "config": json, "extra": json}``;
    returns the path."""
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}
    meta = {"format": fmt, "config": json.dumps(dict(config)), "extra": json.dumps(dict(extra or {}))}
    return atomic_write(path, lambda t: save_file(state, str(t), metadata=meta))


def read_module(path: str | Path, fmt: str, what: str, device: str = "cpu"
                ) -> tuple[dict[str, Any], dict[str, Any], dict[str, Tensor]]:
    """``(config, extra, state_dict)`` of a file written by :func:`save_module` with format ``fmt``.

    ``FileNotFoundError`` if it is missing; ``ValueError`` ("``path`` is not ``what``") if it is not a
    safetensors file or carries another format."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path} is a folder, not a file (expected {what})")
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path} (expected {what})")
    try:
        with safe_open(str(path), framework="pt", device=device) as f:
            meta = f.metadata() or {}
            if meta.get("format") != fmt:
                raise ValueError(f"{path} is not {what} (metadata format={meta.get('format')!r})")
            state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no iterator)
    except SafetensorError as e:
        raise ValueError(f"{path} is not {what}: not a safetensors file ({e})") from e
    return json.loads(meta["config"]), json.loads(meta.get("extra") or "{}"), state


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
