"""Fine-tuning a pretrained causal LM with SepLLM's sparse attention mask (the paper's "SepLLM fine-tuning").

Training-free SepLLM asks a model trained on dense attention to read a context of sinks, separators and a
local window; the paper's strongest results come from training with exactly that mask, so the model learns
to pack a segment's information into its separators. :func:`train_sepllm` does it for any HF causal LM
whose attention takes a ready 4-D mask (eager / sdpa): every batch runs with
:func:`mmeff.kv.sepllm.sepllm_attention_mask` (query ``i`` attends ``j <= i`` iff ``j < init_size``, token
``j`` is a separator, or ``i - j <= n - 1``) on the library's one loop (:func:`mmeff.train.loop.train_steps`:
resumable, logged). The window ``n`` is drawn per step from ``local_sizes`` (a pure function of the step,
so resuming is exact), so one fine-tuned model serves several cache budgets; a single value is the
paper's fixed ``n``.

:func:`finetune_sepllm` runs it on SmolLM2-135M-Instruct with the first half of the offline text
(evaluations read the second) and keeps the result as an HF folder in mmeff's model cache (safetensors,
written atomically), never in the repository: ``mmeff bench sepllm --sweep --finetune-steps N``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from mmeff.eval.streaming import offline_split
from mmeff.kv.sepllm import additive_mask, separator_ids, sepllm_attention_mask
from mmeff.models.cache import atomic_write_cache, cache_complete, default_cache_dir
from mmeff.models.hf import load_smollm2
from mmeff.train.loop import StepTrainConfig, train_steps

__all__ = ["SepLLMTrainConfig", "TokenWindows", "finetune_sepllm", "sepllm_loss", "train_sepllm", "window_at"]


@dataclass(kw_only=True)
class SepLLMTrainConfig(StepTrainConfig):
    """SepLLM fine-tuning: ``seq_len``-token windows of the training text, ``init_size`` sinks, a local window
    drawn per step from ``local_sizes`` (the windows of the bench's 128/256/512 budgets). The defaults fit a
    shared 2-core CPU in about half an hour on SmolLM2-135M (~15-25 s a step at 512 tokens): 100 steps at a
    small learning rate (the model should keep its language and only learn to read the sparse context), a
    short warm-up and cosine decay."""

    seq_len: int = 512
    init_size: int = 4
    local_sizes: tuple[int, ...] = (64, 128, 256)
    batch_size: int = 1
    lr: float = 5e-5
    min_lr: float = 5e-6
    warmup_steps: int = 10
    steps: int = 100
    save_every: int = 20

    def __post_init__(self) -> None:
        self.local_sizes = tuple(int(n) for n in self.local_sizes)
        if not self.local_sizes or min(self.local_sizes) < 1:
            raise ValueError(f"local_sizes must be ints >= 1, got {self.local_sizes}")
        if self.seq_len < 2 or self.init_size < 0 or self.steps < 1 or self.batch_size < 1:
            raise ValueError(f"need seq_len >= 2, init_size >= 0, steps >= 1, batch_size >= 1; got {self.seq_len}, "
                             f"{self.init_size}, {self.steps}, {self.batch_size}")


class TokenWindows(torch.utils.data.Dataset):
    """Item ``i``: the ``(seq_len,)`` window of ``ids`` at a start drawn from ``(seed, i)`` (a pure function of
    ``i``, as :func:`~mmeff.train.loop.train_steps` wants); ``n`` items."""

    def __init__(self, ids: Sequence[int], seq_len: int, n: int, seed: int = 0) -> None:
        if len(ids) <= seq_len:
            raise ValueError(f"the training text has {len(ids)} tokens; windows of {seq_len} need more")
        self.ids = torch.as_tensor(list(ids), dtype=torch.long)
        self.seq_len, self.n, self.seed = seq_len, n, seed

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + int(i))
        start = int(torch.randint(0, len(self.ids) - self.seq_len + 1, (1,), generator=g))
        return self.ids[start : start + self.seq_len]


def window_at(step: int, cfg: SepLLMTrainConfig) -> int:
    """The local window of ``step``: drawn from ``cfg.local_sizes`` by ``(cfg.seed, step)``."""
    g = torch.Generator().manual_seed(cfg.seed * 7_919 + 17 * int(step) + 1)
    return cfg.local_sizes[int(torch.randint(0, len(cfg.local_sizes), (1,), generator=g))]


def sepllm_loss(model: nn.Module, ids: Tensor, separators: Sequence[int], init_size: int, local_size: int) -> Tensor:
    """Next-token loss of ``ids (B, N)`` under SepLLM's mask (a scalar; the model's dtype decides the mask's)."""
    dtype = next(model.parameters()).dtype
    mask = additive_mask(sepllm_attention_mask(ids, separators, init_size, local_size), dtype)
    return model(input_ids=ids, attention_mask=mask, labels=ids, use_cache=False).loss


def train_sepllm(
    model: nn.Module,
    train_ids: Sequence[int],
    separators: Sequence[int],
    cfg: SepLLMTrainConfig,
    out_dir: str | Path | None,
    *,
    resume: bool = True,
    stop_after: int | None = None,
    progress: bool = True,
    log: Any = print,
) -> dict[str, Any]:
    """Fine-tune every parameter of ``model`` on windows of ``train_ids`` (a token list) under SepLLM's mask
    with ``separators`` (token ids). Resumable from ``out_dir/last.pt``; returns the loop's history (the
    masked loss and the drawn window per log row)."""
    data = TokenWindows(train_ids, cfg.seq_len, cfg.steps * cfg.batch_size, cfg.seed)
    seps = [int(s) for s in separators]
    device = next(model.parameters()).device

    def loss_fn(net: nn.Module, batch: Tensor, step: int, dev: torch.device) -> dict[str, Tensor]:
        n = window_at(step, cfg)
        return {"loss": sepllm_loss(net, batch.to(dev), seps, cfg.init_size, n), "window": torch.tensor(float(n))}

    for p in model.parameters():
        p.requires_grad_(True)
    history = train_steps(model, data, out_dir, cfg, loss_fn, resume=resume, stop_after=stop_after,
                          progress=progress, log=log, device=device, desc="sepllm fine-tune",
                          history_extra={"separator_ids": seps, "train_tokens": len(train_ids)})
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return history


def _run_key(cfg: SepLLMTrainConfig) -> str:
    d = {k: v for k, v in cfg.to_dict().items() if k not in cfg.resume_may_change or k == "steps"}
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:12]


def finetune_sepllm(
    cfg: SepLLMTrainConfig | None = None,
    cache_dir: str | Path | None = None,
    *,
    progress: bool = True,
    log: Any = print,
) -> Path:
    """SepLLM-fine-tuned SmolLM2-135M-Instruct: trained on the first half of the offline text (once; a run
    cut short resumes) and kept as an HF folder (with its tokenizer and ``history.json``) under
    ``cache_dir/sepllm-ft/<config hash>/model`` (default cache: ``$MMEFF_CACHE`` or ``~/.cache/mmeff``).
    Returns that folder (``AutoModelForCausalLM.from_pretrained`` reads it)."""
    cfg = cfg or SepLLMTrainConfig()
    root = (Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()) / "sepllm-ft" / _run_key(cfg)
    final = root / "model"
    expect = {"artefact": "sepllm-ft-smollm2-135m-instruct", "config": cfg.to_dict()}
    if cache_complete(final, expect):
        return final
    model, tok = load_smollm2(cache_dir)
    train_ids, _ = offline_split(tok)
    seps = separator_ids(tok)
    history = train_sepllm(model, train_ids, seps, cfg, root / "train", progress=progress, log=log)

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        (tmp / "history.json").write_text(json.dumps(history, indent=1))

    atomic_write_cache(final, write, expect)
    (root / "train" / "last.pt").unlink(missing_ok=True)  # 1.6 GB of optimiser state; history.json stays
    return final
