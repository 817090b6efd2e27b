"""Session fixtures shared by several test files: the offline SmolLM2 and the default LLaVA (mmeff-mini)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from mmeff.models.embedded import default_model
from mmeff.models.hf import load_smollm2


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory):
    path = tmp_path_factory.mktemp("mmeff-cache")
    yield path
    # ~1.1 GB of fp32 safetensors; pytest would otherwise keep it around for three runs.
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def smollm2(model_cache):
    # First call converts the GGUF (the expensive part of this file); everything else reuses the cache.
    return load_smollm2(model_cache)


@pytest.fixture(scope="session")
def default(model_cache):
    return default_model(model_cache)


@pytest.fixture(scope="module")
def single_thread():
    """One intra-op thread for a module of tiny models: more only adds synchronisation, which turns into
    seconds per forward when the CPU is shared with other jobs."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


class _Hostile:
    """Unpickling this creates ``marker``: what a checkpoint from the internet could do instead."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):  # noqa: ANN204
        return (open, (self.marker, "w"))


@pytest.fixture
def hostile_checkpoint():
    """``write(path, marker) -> path``: a torch checkpoint (a dict, like a training state) whose unpickling
    would create the file ``marker``."""

    def write(path: Path, marker: Path) -> Path:
        torch.save({"model": {}, "step": 1, "payload": _Hostile(marker)}, path)
        return path

    return write
