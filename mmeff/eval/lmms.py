"""lmms-eval model ``mmeff``: any Hugging Face VLM with any mmeff method, for published benchmarks.

mmeff's own harness (``mmeff eval videoqa``) counts visual tokens and latency per sample; lmms-eval runs the
benchmarks papers report. This module bridges the two: the model class :class:`MMEff` loads any HF
image-text-to-text model with its processor, attaches an mmeff method for the model's lifetime and answers
lmms-eval's requests, so a reduced model is scored by the same task code as published numbers::

    pip install lmms-eval        # mmeff registers the model through the ``lmms_eval.models`` entry point
    lmms-eval --model mmeff \\
        --model_args pretrained=Qwen/Qwen2-VL-2B-Instruct,method=fourier,ratio=0.25,max_frames=16 \\
        --tasks videomme --batch_size 1

``--model_args`` (lmms-eval turns ``true``/``false``/numbers into bools/ints/floats):

- ``pretrained``: ``default`` (the embedded mmeff-mini), an mmeff-mini name, a local folder or a hub id;
  loaded with ``AutoModelForImageTextToText`` + ``AutoProcessor`` (``trust_remote_code`` only if asked);
- ``method``: a registered reducer (``mmeff list``: ``fourier``, ``pool``, ``uniform``, ...), KV-cache press
  or in-tower method, or ``none``; every argument this class does not take (``ratio``, ``tokens``,
  ``local_size``, ...) goes to the method's constructor; ``stage`` to the adapter;
- ``device``, ``dtype`` (``auto``, ``float16``, ...), ``batch_size``, ``max_frames`` (frames sampled from a
  video file), ``max_new_tokens`` (when the task gives none), ``cache_dir``.

``generate_until`` honours the task's ``until``, ``max_new_tokens``, ``temperature`` (0: greedy), ``top_p`` and
``num_beams``; ``loglikelihood`` returns the summed log-probability of the continuation and whether greedy
decoding would produce it. Visual tokens the LLM read per request are kept in ``visual_tokens`` (with a
method: after reduction), so a run can report them beside lmms-eval's scores.

Importing this module does not import lmms-eval; building :class:`MMEff` without it raises one
``ImportError`` line naming the package. The inputs are those of
:func:`mmeff.models.hf.chat_batch` (the processor's own chat template; a video file becomes one video
where the processor takes videos, else its frames become images).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from mmeff.adapters.hf_vlm import TEXT_KWARG
from mmeff.api import attach
from mmeff.core import IN_TOWER, REDUCERS, TokenReducer
from mmeff.datasets.media import load_video
from mmeff.eval.videoqa import Media, generate_rows, load_vlm, to_model, visual_placeholders
from mmeff.kv.presses import PRESSES
from mmeff.models.hf import chat_batch

__all__ = ["MMEff", "build_method", "lmms_eval_manifest"]

try:  # the base class is lmms-eval's when it is installed; mmeff itself never needs it
    from lmms_eval.api.model import lmms as _LMMSBase

    HAVE_LMMS_EVAL = True
except ImportError:
    _LMMSBase = object  # type: ignore[assignment,misc]
    HAVE_LMMS_EVAL = False

#: visuals given as paths with these endings are pictures; other paths are videos
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")

#: the one line users see when lmms-eval is missing
MISSING = "the lmms-eval model 'mmeff' needs lmms-eval: pip install lmms-eval"


def lmms_eval_manifest() -> Any:
    """The ``ModelManifest`` lmms-eval's registry reads from the ``lmms_eval.models`` entry point:
    ``--model mmeff`` resolves to :class:`MMEff` (a "simple" model: string contexts, visuals from the doc)."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id="mmeff", simple_class_path=f"{__name__}.MMEff")


def build_method(name: str | None, **kwargs: Any) -> Any:
    """An mmeff method by registered name with its constructor ``kwargs`` (a token reducer, a KV-cache press or
    an in-tower method such as ToMe); ``None`` for ``none``/empty. ``ValueError`` in one line for an unknown
    name or arguments the method does not take."""
    if name is None or str(name).lower() in ("", "none"):
        if kwargs:
            raise ValueError(f"method=none takes no method arguments, got {sorted(kwargs)}")
        return None
    for registry in (REDUCERS, PRESSES, IN_TOWER):
        if name in registry.names():
            try:
                return registry.create(name, **kwargs)
            except TypeError as e:  # an argument the method does not take
                raise ValueError(f"method {name!r}: {e}") from None
    known = REDUCERS.names() + PRESSES.names() + IN_TOWER.names()
    raise ValueError(f"unknown mmeff method {name!r}; known: {', '.join(known)} (or none)")


def _flatten(items: Any) -> list[Any]:
    if items is None:
        return []
    if isinstance(items, (list, tuple)):
        return [x for item in items for x in _flatten(item)]
    return [items]


class MMEff(_LMMSBase):  # type: ignore[misc,valid-type]
    """lmms-eval model: any HF VLM + any mmeff method (module docstring for the arguments)."""

    is_simple = True  # string contexts and doc_to_visual, as lmms-eval's "simple" models take them

    def __init__(
        self,
        pretrained: str = "default",
        method: str | None = "none",
        device: str | None = None,
        dtype: str = "auto",
        batch_size: int | str = 1,
        max_frames: int = 8,
        max_new_tokens: int = 256,
        stage: str | None = None,
        trust_remote_code: bool = False,
        cache_dir: str | None = None,
        max_batch_size: int | None = None,  # lmms-eval passes it to every model; batches are batch_size here
        **method_kwargs: Any,
    ) -> None:
        if not HAVE_LMMS_EVAL:
            raise ImportError(MISSING)
        super().__init__()
        if not str(batch_size).isdigit():  # lmms-eval's batch_size=auto sizes batches for text-only LMs
            raise ValueError(f"batch_size must be a number for the mmeff model, got {batch_size!r}")
        if int(max_frames) < 1 or int(max_new_tokens) < 1 or int(batch_size) < 1:
            raise ValueError("max_frames, max_new_tokens and batch_size must be >= 1")
        self.max_frames, self.max_new_tokens, self.batch_size_per_gpu = int(max_frames), int(max_new_tokens), int(batch_size)
        self.pretrained = str(pretrained)
        self.method = build_method(method, **method_kwargs)
        self.method_name = "none" if self.method is None else str(method)
        model, processor, self.info = load_vlm(self.pretrained, dtype=dtype, trust_remote_code=bool(trust_remote_code),
                                               cache_dir=cache_dir)
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self._device = torch.device(device)
        self._model: nn.Module = model.to(self._device)
        self.processor = processor
        self.tokenizer = getattr(processor, "tokenizer", processor)
        # attached once for the model's lifetime: every generate and forward below runs with the method
        options = {"stage": stage} if stage else {}
        self.adapter = attach(self._model, self.method, **options) if self.method is not None else None
        # token reducers' adapters read each row's question (question-guided methods); other adapters
        # (KV-cache presses, ToMe) would hand the keyword on to the model, which refuses it
        self._takes_text = isinstance(self.method, TokenReducer)
        #: per answered request: task, doc_id, and visual tokens the LLM read (after the method)
        self.visual_tokens: list[dict[str, Any]] = []
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            # each process answers its share of the requests; lmms-eval gathers the results
            self._rank, self._world_size = torch.distributed.get_rank(), torch.distributed.get_world_size()

    # lmms-eval reads these -----------------------------------------------------------------------------
    @property
    def model(self) -> nn.Module:
        """The HF model (with the method attached)."""
        return self._model

    @property
    def device(self) -> torch.device:
        """Where the model runs."""
        return self._device

    @property
    def batch_size(self) -> int:
        """Requests per ``generate`` call."""
        return self.batch_size_per_gpu

    # inputs --------------------------------------------------------------------------------------------
    def _media(self, visuals: Any) -> Media:
        """One request's visuals as :func:`mmeff.models.hf.chat_batch` takes them: images (PIL / arrays) stay images; a video
        file (a path) becomes ``max_frames`` frames (T, H, W, 3); several videos are refused."""
        items = _flatten(visuals)
        if not items:
            return None
        # a path to a picture is an image; any other path is a video file (lmms-eval's video tasks give paths)
        items = [Image.open(v) if isinstance(v, str) and v.lower().endswith(IMAGE_SUFFIXES) else v for v in items]
        paths = [v for v in items if isinstance(v, str)]
        if paths:
            if len(items) > 1:
                raise ValueError(f"mmeff's lmms-eval model takes one video per request, got {len(items)} visuals")
            return load_video(paths[0], num_frames=self.max_frames).frames
        out: list[Any] = []
        for v in items:
            if isinstance(v, Image.Image):
                out.append(v.convert("RGB"))
            elif isinstance(v, np.ndarray) and v.ndim == 4:  # decoded frames: a video
                if len(items) > 1:
                    raise ValueError("mmeff's lmms-eval model takes one video per request")
                return v
            elif isinstance(v, np.ndarray) and v.ndim in (2, 3):
                out.append(Image.fromarray(v).convert("RGB"))
            else:
                raise ValueError(f"mmeff's lmms-eval model takes images and video files, got {type(v).__name__}")
        return out

    def _visuals(self, doc_to_visual: Callable[[Any], Any] | None, task: str, split: str, doc_id: int) -> Any:
        if doc_to_visual is None:
            return None
        return doc_to_visual(self.task_dict[task][split][doc_id])

    @staticmethod
    def _prompt(context: str) -> str:
        # the visuals go in as the processor's own image/video items, so a task's literal tags would be doubled
        return context.replace("<image>", "").replace("<video>", "").strip()

    def _record(self, task: str, doc_id: Any, visual: int) -> None:
        self.visual_tokens.append({"task": task, "doc_id": doc_id, "visual_tokens": int(visual)})

    # requests ------------------------------------------------------------------------------------------
    def generate_until(self, requests: Sequence[Any]) -> list[str]:
        """Answers to ``(context, gen_kwargs, doc_to_visual, doc_id, task, split)`` requests, in order; rows
        with the same ``gen_kwargs`` are batched (``batch_size``)."""
        args = [r.args for r in requests]
        groups: dict[str, list[int]] = {}
        for i, a in enumerate(args):  # one generate call needs one set of generation settings
            groups.setdefault(json.dumps(a[1], sort_keys=True, default=str), []).append(i)
        out: list[str | None] = [None] * len(args)
        for idx in groups.values():
            for start in range(0, len(idx), self.batch_size):
                chunk = idx[start : start + self.batch_size]
                for i, text in zip(chunk, self._generate([args[i] for i in chunk])):
                    out[i] = text
        return [o if o is not None else "" for o in out]

    def _generate(self, chunk: Sequence[tuple]) -> list[str]:
        gen_kwargs = dict(chunk[0][1] or {})
        until = gen_kwargs.pop("until", None)
        until = [until] if isinstance(until, str) else list(until or [])
        max_new = int(gen_kwargs.pop("max_new_tokens", None) or self.max_new_tokens)
        temperature = float(gen_kwargs.pop("temperature", 0) or 0)
        gen: dict[str, Any] = {"num_beams": int(gen_kwargs.pop("num_beams", 1) or 1)}
        if temperature > 0:  # temperature 0 means greedy in lmms-eval's tasks
            gen.update(do_sample=True, temperature=temperature)
            top_p = gen_kwargs.pop("top_p", None)
            if top_p is not None:
                gen["top_p"] = float(top_p)
        prompts = [self._prompt(c[0]) for c in chunk]
        media = [self._media(self._visuals(c[2], c[4], c[5], c[3])) for c in chunk]
        batch = to_model(chat_batch(self.processor, prompts, media, self._model.config), self._model)
        texts, _, visual = generate_rows(self._model, self.processor, batch, max_new_tokens=max_new,
                                         adapter=self.adapter, text=prompts if self._takes_text else None, **gen)
        answers = []
        for c, text, v in zip(chunk, texts, visual):
            for stop in until:  # the task's stop strings cut the answer at the first of them
                if stop and stop in text:
                    text = text[: text.index(stop)]
            answers.append(text)
            self._record(c[4], c[3], v)
            self.cache_hook.add_partial("generate_until", (c[0], c[1]), text)
        return answers

    def loglikelihood(self, requests: Sequence[Any]) -> list[tuple[float, bool]]:
        """``(sum of log p(continuation | context, visuals), continuation is the greedy one)`` per
        ``(context, continuation, doc_to_visual, doc_id, task, split)`` request; the continuation may be a
        callable of the doc, as lmms-eval allows."""
        out = []
        for context, target, doc_to_visual, doc_id, task, split in (r.args for r in requests):
            continuation = target if isinstance(target, str) else target(self.task_dict[task][split][doc_id])
            media = self._media(self._visuals(doc_to_visual, task, split, doc_id))
            prompt = self._prompt(context)
            logp, greedy, visual = self.score(prompt, continuation, media)
            self._record(task, doc_id, visual)
            out.append((logp, greedy))
        return out

    def score(self, prompt: str, continuation: str, media: Media = None) -> tuple[float, bool, int]:
        """``(log-prob sum, is_greedy, visual tokens)`` of ``continuation`` after the chat-templated ``prompt``
        with ``media``. The continuation is the tail of the tokenised prompt + continuation; an mmeff method
        removes visual tokens only, which all come before it, so its logits are the last ones."""
        ctx = chat_batch(self.processor, [prompt], [media], self._model.config)["input_ids"][0]
        full = to_model(chat_batch(self.processor, [prompt], [media], self._model.config, answers=[continuation]), self._model)
        ids = full["input_ids"][0]
        n = int(ids.shape[0])
        common = int(min(n, ctx.shape[0]))
        same = (ids[:common].cpu() == ctx[:common]).int().cumprod(0).sum().item()  # a merged boundary token
        n_cont = n - int(same)
        if n_cont < 1:
            raise ValueError(f"empty continuation after tokenising {continuation!r}")
        unreduced = visual_placeholders(self._model, full["input_ids"])[0]
        kwargs = {TEXT_KWARG: [prompt]} if self._takes_text else {}
        with torch.inference_mode():
            logits = self._model(**full, **kwargs).logits[0].float()
        logits = logits[-n_cont - 1 : -1]  # position t predicts token t + 1
        target = ids[-n_cont:].to(logits.device)
        logp = torch.log_softmax(logits, -1).gather(1, target[:, None]).sum().item()
        greedy = bool((logits.argmax(-1) == target).all())
        visual = unreduced
        if self.adapter is not None and self.adapter.stats.get("visual_tokens_out") is not None:
            visual = int(self.adapter.stats["visual_tokens_out"])
        return float(logp), greedy, int(visual)

    def generate_until_multi_round(self, requests: Sequence[Any]) -> list[str]:
        """Not supported (multi-round tasks feed previous answers back through task code)."""
        raise NotImplementedError("mmeff's lmms-eval model does not run multi-round tasks yet")

    def close(self) -> None:
        """Detach the method (the model is as loaded again)."""
        if self.adapter is not None:
            self.adapter.detach()
            self.adapter = None
