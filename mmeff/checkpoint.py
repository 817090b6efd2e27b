"""The one on-disk format of mmeff's own modules: safetensors with a ``format`` tag and the JSON config.

ToCom, VisToG and Instruct-IPT save with :func:`save_module` and load with :func:`read_module`, which
refuses a missing file, a file that is not safetensors, and a file of another format, each with a message
naming the file. :func:`file_sha256` is the checksum the shipped weights (mmeff-mini, the Instruct-IPT
miniature) are checked with.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import Tensor, nn

__all__ = ["file_sha256", "read_module", "save_module"]


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
    """Write ``module``'s state dict (detached, contiguous, on the CPU) to ``path`` (folders made) with
    metadata ``{"format": fmt, "config": json, "extra": json}``; returns the path."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}
    meta = {"format": fmt, "config": json.dumps(dict(config)), "extra": json.dumps(dict(extra or {}))}
    save_file(state, str(path), metadata=meta)
    return path


def read_module(path: str | Path, fmt: str, what: str, device: str = "cpu"
                ) -> tuple[dict[str, Any], dict[str, Any], dict[str, Tensor]]:
    """``(config, extra, state_dict)`` of a file written by :func:`save_module` with format ``fmt``.

    ``FileNotFoundError`` if it is missing; ``ValueError`` ("``path`` is not ``what``") if it is not a
    safetensors file or carries another format."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
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
