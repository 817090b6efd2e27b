"""The verified on-disk cache of assembled models (SmolLM2 converted from GGUF, the embedded VLMs).

A cache entry is a folder committed by one atomic rename, with a marker recording the size and sha256 of
every file; anything short of an intact, matching entry is rebuilt.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mmeff.checkpoint import file_sha256

__all__ = ["atomic_write_cache", "cache_complete", "default_cache_dir", "read_cache_meta"]

_MARKER = "mmeff-cache.json"
# Bump when the cached artefact would change for the same inputs, so stale caches get rebuilt.
_CACHE_FORMAT = 1


def default_cache_dir() -> Path:
    """``$MMEFF_CACHE`` if set, else ``~/.cache/mmeff``."""
    env = os.environ.get("MMEFF_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "mmeff"


def cache_complete(folder: Path, expect: dict[str, Any] | None = None, warn: bool = True) -> bool:
    """True when ``folder`` holds a finished, intact cache: marker present, every recorded file with its size
    and the sha256 recorded when it was written.

    A cache is derived data, so anything short of that means "rebuild". A missing folder, another format or
    other inputs (``expect``) are the normal reasons and pass silently; a damaged or unverifiable entry (a file
    missing, resized, altered, or no sha256 on record) is worth knowing about and ``warn`` says which file.
    """
    marker = folder / _MARKER
    try:
        meta = json.loads(marker.read_text())
    except (OSError, ValueError):
        if warn and folder.is_dir():
            _warn_cache(folder, f"{marker} is missing or unreadable")
        return False
    if meta.get("format") != _CACHE_FORMAT or not isinstance(meta.get("files"), dict) or not meta["files"]:
        return False
    for key, value in (expect or {}).items():
        if meta.get(key) != value:
            return False
    hashes = meta.get("sha256") if isinstance(meta.get("sha256"), dict) else {}
    for name, size in meta["files"].items():
        path = folder / name
        problem = None
        if not path.is_file():
            problem = "is missing"
        elif path.stat().st_size != size:
            problem = f"has {path.stat().st_size} bytes, {size} recorded"
        elif name not in hashes:
            problem = "has no sha256 on record (written by an older mmeff)"
        elif file_sha256(path) != hashes[name]:
            problem = "does not match the sha256 recorded when it was written (corrupt or altered)"
        if problem is not None:
            if warn:
                _warn_cache(folder, f"{path} {problem}")
            return False
    return True


def _warn_cache(folder: Path, problem: str) -> None:
    warnings.warn(f"mmeff cache: {problem}; rebuilding {folder}", RuntimeWarning, stacklevel=3)


def read_cache_meta(folder: Path) -> dict[str, Any]:
    """The marker record of the cache entry ``folder`` (the ``meta`` given to :func:`atomic_write_cache`
    plus ``format``, ``files`` and ``sha256``); check :func:`cache_complete` first."""
    return json.loads((folder / _MARKER).read_text())


def _apply_umask(folder: Path) -> None:
    # mkdtemp (and some writers) create owner-only entries; a shared cache should follow the umask.
    umask = os.umask(0)
    os.umask(umask)
    for path in [folder, *folder.rglob("*")]:
        os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)


def _fsync_tree(folder: Path) -> None:
    # the folder rename below is the commit point: its contents must be on disk before it, or a power cut
    # could leave a committed cache with empty files
    for path in [*sorted(p for p in folder.rglob("*") if p.is_file()), folder]:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        except OSError:  # some filesystems cannot fsync a directory; the files themselves were synced
            pass
        finally:
            os.close(fd)


def atomic_write_cache(final: Path, write: Callable[[Path], None], meta: dict[str, Any]) -> None:
    """Run ``write(tmp)`` in a sibling temp folder, add the marker (sizes and sha256 of every file), fsync,
    then rename it to ``final``.

    The rename is the commit point, so a crash mid-write leaves only a ``.tmp`` folder that is never
    mistaken for a cache. If another process finished first, its copy wins and ours is discarded.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        write(tmp)
        paths = [p for p in sorted(tmp.rglob("*")) if p.is_file()]
        files = {str(p.relative_to(tmp)): p.stat().st_size for p in paths}
        hashes = {str(p.relative_to(tmp)): file_sha256(p) for p in paths}
        record = {**meta, "format": _CACHE_FORMAT, "files": files, "sha256": hashes}
        (tmp / _MARKER).write_text(json.dumps(record, indent=1))
        _apply_umask(tmp)
        _fsync_tree(tmp)
        expect = {k: v for k, v in meta.items() if k != "info"}
        if final.exists():
            if cache_complete(final, expect, warn=False):
                shutil.rmtree(tmp, ignore_errors=True)
                return
            shutil.rmtree(final)  # stale, damaged, or half-written by an older crash
        try:
            os.rename(tmp, final)
        except OSError:
            if not cache_complete(final, expect, warn=False):
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
