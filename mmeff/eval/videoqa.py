"""Video question answering evaluation: LLaVA (and any HF VLM) prediction and a resumable, sharded harness.

The pieces are independent so each can be reused or swapped:

- prediction: :func:`predict_batch` (:func:`predict_llava` for one sample) runs any HF VLM with an mmeff
  adapter (optionally with an mmeff reducer applied) on sampled frames through its own processor and chat
  template, and times it (:func:`load_vlm` loads one from a folder or hub id; :mod:`mmeff.eval.lmms`, the
  lmms-eval model, builds its inputs the same way);
- harness: :func:`evaluate` appends one JSON line per sample (fsynced, so a crash loses nothing),
  resumes by id (only rows of the same run configuration), records unreadable clips as failed and goes
  on, shards over ``RANK`` / ``WORLD_SIZE``;
- scoring and the judge live in :mod:`mmeff.eval.answers`, results files and the report in
  :mod:`mmeff.eval.results`; their names are importable from here too, as before the split.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import AutoModelForImageTextToText, AutoProcessor

from mmeff.api import apply
from mmeff.checkpoint import local_or_hub
from mmeff.datasets.media import load_video
from mmeff.datasets.videoqa import VideoQASample
from mmeff.eval.answers import (
    MC_INSTRUCTION,
    OPEN_INSTRUCTION,
    OPTION_LETTERS,
    JudgeError,
    JudgeResponseError,
    build_question,
    extract_option,
    format_question,
    judge_open,
    normalize_answer,
    parse_judge_reply,
    score_open,
)
from mmeff.eval.latency import sync
from mmeff.eval.results import (
    EvalReport,
    append_record,
    config_mismatch,
    config_text,
    format_report,
    load_results,
    load_rows,
    merge_results,
    report_from_records,
    resolve_shard,
    shard_path,
    write_atomic,
)
from mmeff.hfconfig import pad_token_id
from mmeff.models.embedded import MINI_MODELS, default_model
from mmeff.models.hf import chat_batch, llava_tokens_per_image

__all__ = [
    # defined here
    "Media",
    "Prediction",
    "PredictFn",
    "evaluate",
    "generate_rows",
    "llava_predictor",
    "load_vlm",
    "predict_batch",
    "predict_llava",
    "read_clip",
    "rows_visual_tokens",
    "to_model",
    "visual_placeholders",
    # from mmeff.eval.answers, importable here as before the split
    "MC_INSTRUCTION",
    "OPEN_INSTRUCTION",
    "OPTION_LETTERS",
    "JudgeError",
    "JudgeResponseError",
    "build_question",
    "extract_option",
    "format_question",
    "judge_open",
    "normalize_answer",
    "parse_judge_reply",
    "score_open",
    # from mmeff.eval.results, likewise
    "EvalReport",
    "format_report",
    "load_results",
    "merge_results",
    "report_from_records",
    "resolve_shard",
    "shard_path",
]


# ---------------------------------------------------------------------------------------------------
# Prediction
# ---------------------------------------------------------------------------------------------------


@dataclass
class Prediction:
    """A model's answer to one sample.

    ``visual_tokens``: visual tokens the LLM read for the whole video (after any reduction);
    ``decode_s``: frame decoding + pixel preprocessing of this sample; ``model_s``: prompt building,
    generation and detokenising (a batch's time split evenly over its samples); ``new_tokens``:
    generated tokens up to and including the first EOS; ``failed``: why the sample could not be answered
    (e.g. an unreadable clip), in which case ``text`` is empty and the sample is not scored.
    """

    id: str
    text: str
    visual_tokens: int
    decode_s: float
    model_s: float
    new_tokens: int
    failed: str | None = None


PredictFn = Callable[[Sequence[VideoQASample]], Sequence[Prediction]]


def read_clip(
    path: str | Path, num_frames: int, start: float | None = None, end: float | None = None,
    frame_rule: str = "midpoints",
) -> tuple[np.ndarray, np.ndarray]:
    """``num_frames`` frames at segment midpoints of ``[start, end)`` seconds of a video (whole video when
    both are ``None``; ``frame_rule="slowfast"``: SlowFast-LLaVA's rule): ``frames`` (T, H, W, 3) uint8 and
    ``timestamps`` (T,) seconds. A thin view of :func:`~mmeff.datasets.media.load_video`, which owns the
    decoding and the errors."""
    clip = load_video(path, num_frames=num_frames, start=start, end=end, frame_rule=frame_rule)
    return clip.frames, clip.timestamps


def _eos_ids(model: nn.Module, tokenizer: Any) -> set[int]:
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        eos = getattr(tokenizer, "eos_token_id", None)
    values = eos if isinstance(eos, (list, tuple)) else [eos]
    return {int(v) for v in values if v is not None}


def rows_visual_tokens(handle: Any, batch: int, frames: int, unreduced: int) -> list[int]:
    """Visual tokens per row after reduction: the adapter's per-image reductions are in row order
    (pixel_values are concatenated per row), so row ``i`` owns images ``i*frames ... (i+1)*frames-1``."""
    reds = getattr(handle, "last_reductions", None)
    if reds is not None and len(reds) == batch:  # video-level methods: one reduction per row's video
        return [int(r.num_tokens) for r in reds]
    if reds is not None and len(reds) == batch * frames:
        counts = [int(r.num_tokens) for r in reds]
        return [sum(counts[i * frames : (i + 1) * frames]) for i in range(batch)]
    total = handle.stats.get("visual_tokens_out") if handle is not None else None
    if total is None:
        return [unreduced] * batch
    return [int(round(total / batch))] * batch


def predict_batch(
    model: nn.Module,
    tokenizer: Any,
    samples: Sequence[VideoQASample],
    *,
    reducer: Any = None,
    num_frames: int = 8,
    max_new_tokens: int = 32,
    **apply_options: Any,
) -> list[Prediction]:
    """Greedy answers of a HF VLM with an mmeff adapter for several samples in one ``generate``.

    Each sample's ``num_frames`` frames (:func:`read_clip`, honouring ``start``/``end``; with the reducer's
    ``frame_rule`` when it has one: a ``faithful=True`` Free Video-LLM reads frames as its official loader)
    are one video in a chat prompt built by :func:`mmeff.models.hf.chat_batch`: a ``video`` item where the
    processor has a video pipeline (Qwen2-VL), on LLaVA one contiguous run of ``num_frames *
    llava_tokens_per_image`` placeholders, so frame-level methods see each frame and video-level ones (Free
    Video-LLM) the whole clip. The raw questions go to the method as ``mmeff_text``; rows are left-padded.
    With a ``reducer``, generation runs inside ``mmeff.apply(model, reducer, **apply_options)``.
    ``tokenizer`` is the checkpoint's processor (its chat template, image processor and tokenizer build the
    inputs, as the checkpoint was trained) or, for LLaVA, a bare chat tokenizer (LLaVA's CLIP pipeline).
    ``decode_s`` counts reading and preprocessing the clip. A sample whose clip cannot be read gets a
    :class:`Prediction` with ``failed`` set to the reason; the other samples are answered as usual.
    """
    if not samples:
        return []
    if num_frames < 1 or max_new_tokens < 1:
        raise ValueError(f"need num_frames >= 1 and max_new_tokens >= 1, got {num_frames}, {max_new_tokens}")
    device = next(model.parameters()).device
    clips, decode_s, results = _read_clips(samples, num_frames, reducer)
    todo = [k for k, r in enumerate(results) if r is None]
    samples = [samples[k] for k in todo]
    if not samples:
        return [r for r in results if r is not None]
    t0 = time.perf_counter()
    batch = to_model(chat_batch(tokenizer, [build_question(s) for s in samples], clips, model.config), model)
    prep = (time.perf_counter() - t0) / len(samples)
    decode_s = [d + prep for d in decode_s]

    sync(device)
    t0 = time.perf_counter()
    handle = None
    if reducer is None:
        texts, counts, visual = generate_rows(model, tokenizer, batch, max_new_tokens=max_new_tokens)
    else:
        with apply(model, reducer, **apply_options) as handle:
            texts, counts, visual = generate_rows(model, tokenizer, batch, max_new_tokens=max_new_tokens,
                                                  adapter=handle, text=[s.question for s in samples])
    sync(device)
    model_s = (time.perf_counter() - t0) / len(samples)
    if handle is not None and type(model).__name__ == "LlavaForConditionalGeneration":
        # LLaVA's reductions are per frame in row order: each row's exact sum, not a share of the batch's
        visual = rows_visual_tokens(handle, len(samples), num_frames, num_frames * llava_tokens_per_image(model.config))
    for i, (k, s) in enumerate(zip(todo, samples)):
        results[k] = Prediction(id=s.id, text=texts[i], visual_tokens=visual[i], decode_s=decode_s[i],
                                model_s=model_s, new_tokens=counts[i])
    return [r for r in results if r is not None]


def _read_clips(samples: Sequence[VideoQASample], num_frames: int, reducer: Any
                ) -> tuple[list[np.ndarray], list[float], list[Prediction | None]]:
    """Each readable sample's ``(num_frames, H, W, 3)`` clip and seconds spent reading it; ``results`` holds a
    ``failed`` :class:`Prediction` where a clip could not be read (None elsewhere, filled after generation)."""
    rule = getattr(reducer, "frame_rule", "midpoints")  # a faithful method reads frames as its official code
    clips: list[np.ndarray] = []
    decode_s: list[float] = []
    results: list[Prediction | None] = [None] * len(samples)
    for k, s in enumerate(samples):
        t0 = time.perf_counter()
        try:
            frames, _ = read_clip(s.video, num_frames, s.start, s.end, rule)
        except ValueError as e:  # load_video's one error type for a missing, empty or corrupt clip
            # one bad file in a benchmark of thousands should cost that sample, not the run
            results[k] = Prediction(id=s.id, text="", visual_tokens=0, decode_s=time.perf_counter() - t0,
                                    model_s=0.0, new_tokens=0, failed=str(e))
            continue
        clips.append(np.asarray(frames))  # one clip: one run of placeholders or one video item
        decode_s.append(time.perf_counter() - t0)
    return clips, decode_s, results


def predict_llava(
    model: nn.Module,
    tokenizer: Any,
    sample: VideoQASample,
    *,
    reducer: Any = None,
    num_frames: int = 8,
    max_new_tokens: int = 32,
    **apply_options: Any,
) -> Prediction:
    """Greedy answer of a HF VLM to one sample (see :func:`predict_batch`)."""
    return predict_batch(
        model, tokenizer, [sample], reducer=reducer, num_frames=num_frames, max_new_tokens=max_new_tokens,
        **apply_options,
    )[0]


def llava_predictor(
    model: nn.Module,
    tokenizer: Any,
    *,
    reducer: Any = None,
    num_frames: int = 8,
    max_new_tokens: int = 32,
    **apply_options: Any,
) -> PredictFn:
    """A ``predict_fn`` for :func:`evaluate`: :func:`predict_batch` with these settings bound (any HF VLM with an
    adapter; the name is from when only LLaVA ran)."""

    def predict(samples: Sequence[VideoQASample]) -> list[Prediction]:
        return predict_batch(
            model, tokenizer, samples, reducer=reducer, num_frames=num_frames, max_new_tokens=max_new_tokens,
            **apply_options,
        )

    return predict


# ---------------------------------------------------------------------------------------------------
# Any HF VLM with its own processor (Qwen2-VL, Gemma3, Idefics3, ...): the chat template lays out the prompt
# ---------------------------------------------------------------------------------------------------

#: one row's visual input: a list of images (PIL or (H, W, 3) uint8 arrays), a video as a (T, H, W, 3) uint8
#: array, or ``None`` for a text-only row
Media = Sequence[Any] | np.ndarray | None


def load_vlm(ref: str, *, dtype: str | torch.dtype = "auto", trust_remote_code: bool = False,
             cache_dir: str | Path | None = None) -> tuple[nn.Module, Any, dict[str, Any]]:
    """``(model.eval(), processor, info)`` of any HF image-text-to-text model: ``"default"`` / an embedded
    mmeff-mini name (with its saved ``LlavaProcessor``), a local folder or a hub id, loaded with
    ``AutoModelForImageTextToText`` and ``AutoProcessor`` (``trust_remote_code`` off unless asked: it runs
    code from the checkpoint). Every failure is one ``ValueError`` / ``FileNotFoundError`` line: a path that
    does not exist, a hub id that cannot be reached (offline), a folder without a processor."""
    if ref in ("default", *MINI_MODELS):
        name = "mmeff-mini" if ref == "default" else ref
        model, processor, info = default_model(cache_dir, name=name)
        if dtype != "auto":  # the shipped weights are float32
            model = model.to(getattr(torch, dtype) if isinstance(dtype, str) else dtype)
        return model, processor, {**info, "name": name}
    where = local_or_hub(ref)  # a typo'd local path fails here, before the hub is asked
    local = Path(where).exists()
    if isinstance(dtype, str) and dtype != "auto":
        dtype = getattr(torch, dtype)
    try:
        model = AutoModelForImageTextToText.from_pretrained(where, dtype=dtype, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:  # transformers raises OSError for files, ValueError for an unknown class
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        if not local and ("connect" in first or "offline" in first.lower()):
            raise ValueError(f"cannot reach the Hugging Face hub to load {ref!r} and it is not in the local cache "
                             "(offline? download it once, or pass its local folder)") from None
        raise ValueError(f"cannot load {ref!r} as an image-text-to-text model: {first}") from None
    try:
        processor = AutoProcessor.from_pretrained(where, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, TypeError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ValueError(f"{ref!r} has no usable processor ({first}); save one beside the weights with "
                         "processor.save_pretrained(folder)") from None
    if not hasattr(processor, "image_processor") or getattr(processor, "chat_template", None) is None:
        raise ValueError(f"{ref!r}: its processor ({type(processor).__name__}) needs an image processor and a "
                         "chat template to build prompts")
    getattr(processor, "tokenizer", processor).padding_side = "left"  # batched generation pads on the left
    return model.eval(), processor, {"name": ref, "path": where, "provenance": "user checkpoint"}


def visual_placeholders(model: nn.Module, input_ids: torch.Tensor) -> list[int]:
    """Visual tokens each row of ``input_ids`` (B, L) holds before any reduction: its image / video
    placeholder tokens (the ids the model's config names)."""
    cfg = model.config
    ids = {getattr(cfg, k, None) for k in ("image_token_id", "image_token_index", "video_token_id")}
    ids = [int(i) for i in ids if isinstance(i, int)]
    if not ids:
        return [0] * input_ids.shape[0]
    return torch.isin(input_ids, torch.tensor(ids, device=input_ids.device)).sum(1).tolist()


def to_model(batch: dict[str, Any], model: nn.Module) -> dict[str, Any]:
    """``batch`` on the model's device, floating tensors (pixels) in its dtype."""
    param = next(model.parameters())
    return {k: (v.to(param.device, param.dtype) if v.is_floating_point() else v.to(param.device))
            if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def generate_rows(model: nn.Module, processor: Any, batch: dict[str, Any], *, max_new_tokens: int,
                  adapter: Any = None, text: Sequence[str] | None = None, **gen_kwargs: Any
                  ) -> tuple[list[str], list[int], list[int]]:
    """``model.generate`` on a left-padded ``batch``: ``(texts, new_tokens, visual_tokens)`` per row, each text
    decoded up to the first EOS. ``adapter``: the attached mmeff method (its stats give the visual tokens the
    LLM read; ``text`` goes to it as ``mmeff_text`` for question-guided methods); without one the count is
    the placeholders. ``gen_kwargs`` go to ``generate`` (default greedy)."""
    tok = getattr(processor, "tokenizer", processor)
    pad = tok.pad_token_id if getattr(tok, "pad_token_id", None) is not None else pad_token_id(model.config)
    gen = {"do_sample": False, "pad_token_id": pad, **gen_kwargs}
    if adapter is not None and text is not None:
        gen["mmeff_text"] = list(text)
    unreduced = visual_placeholders(model, batch["input_ids"])
    with torch.inference_mode():
        out = model.generate(**batch, max_new_tokens=max_new_tokens, **gen)
    new = out[:, batch["input_ids"].shape[1]:].cpu()
    eos = _eos_ids(model, tok)
    texts, counts = [], []
    for row in new.tolist():
        stop = next((i for i, t in enumerate(row) if t in eos), None)
        counts.append(len(row) if stop is None else stop + 1)
        texts.append(tok.decode(row[: counts[-1]], skip_special_tokens=True).strip())
    visual = unreduced
    reds = getattr(adapter, "last_reductions", None) if adapter is not None else None
    if reds is not None and len(reds) == len(texts) and all(unreduced):  # one reduction per row (a video, an image)
        visual = [int(r.num_tokens) for r in reds]
    elif adapter is not None and adapter.stats.get("visual_tokens_out") is not None:
        # several items per row: split the batch total in proportion to the rows' placeholders
        total, full = int(adapter.stats["visual_tokens_out"]), max(sum(unreduced), 1)
        visual = [int(round(total * u / full)) for u in unreduced]
    return texts, counts, visual


_TYPE_KEYS = ("type_name", "type", "question_type", "task", "kind")


def _question_type(meta: dict[str, Any]) -> str | None:
    value = next((meta[k] for k in _TYPE_KEYS if meta.get(k) is not None), None)
    return None if value is None else str(value)


def _record(
    sample: VideoQASample,
    index: int,
    pred: Prediction,
    judge: Callable[[str, str, str], dict[str, Any]] | None,
) -> dict[str, Any]:
    rec: dict[str, Any] = {
        "id": sample.id,
        "index": index,
        "video": str(sample.video),
        "question": sample.question,
        "prediction": pred.text,
        "reference": sample.answer,
        "multiple_choice": sample.multiple_choice,
        "type": _question_type(sample.meta),
    }
    if pred.failed:  # no answer: neither right nor wrong, so no 'correct'
        rec.update(failed=str(pred.failed), decode_s=float(pred.decode_s))
        return rec
    if sample.options is not None:
        choice = extract_option(pred.text, sample.options)
        rec.update(options=list(sample.options), answer_index=sample.answer_index, pred_index=choice,
                   correct=choice == sample.answer_index)
    else:
        scored = score_open(pred.text, sample.answer)
        rec.update(exact=scored["exact"], normalized=scored["normalized"], correct=scored["normalized"])
        if judge is not None:
            try:
                verdict = judge(sample.question, sample.answer, pred.text)
                score = verdict.get("score")
                rec["judge"] = {
                    "correct": bool(verdict["correct"]),
                    "score": None if score is None or (isinstance(score, float) and math.isnan(score)) else float(score),
                }
            except JudgeResponseError as e:  # one unreadable reply should not stop a long run
                rec["judge"] = {"correct": None, "score": None, "error": str(e)}
    rec.update(
        visual_tokens=int(pred.visual_tokens),
        new_tokens=int(pred.new_tokens),
        decode_s=float(pred.decode_s),
        model_s=float(pred.model_s),
        latency_s=float(pred.decode_s + pred.model_s),
    )
    return rec


def _chunks(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def _dist_ready() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def evaluate(
    samples: Sequence[VideoQASample],
    predict_fn: PredictFn,
    out_path: str | Path,
    *,
    batch_size: int = 1,
    resume: bool = True,
    rank: int | None = None,
    world_size: int | None = None,
    progress: bool = True,
    judge: Callable[[str, str, str], dict[str, Any]] | None = None,
    config: dict[str, Any] | None = None,
) -> EvalReport:
    """Predict, score and record every sample; returns the report of the samples this call covers.

    ``predict_fn(list_of_samples) -> list_of_Prediction`` (same order, at most ``batch_size`` samples a
    call), e.g. :func:`llava_predictor`. One JSON line per sample is appended to the results file and
    fsynced. With ``resume`` the ids already in the file are skipped (a torn last line is dropped and its
    sample redone); without it the file is started afresh. ``judge(question, ref, pred) -> {"correct",
    "score"}`` (e.g. :func:`judge_open` with url/model bound) additionally grades open-ended answers.

    ``config`` (JSON-serialisable: method and its options, model, frames, budget, data...) is stored in
    every row; resuming a file whose rows carry another config raises ``ValueError`` naming both, so two
    runs never mix in one file. A prediction with ``failed`` set is recorded as failed (not scored) and
    the run goes on; such samples are tried again on the next resume.

    Sharding: ``rank`` / ``world_size`` default to ``RANK`` / ``WORLD_SIZE``; sample ``i`` goes to rank
    ``i % world_size``, which writes ``shard_path(out_path, rank, world_size)``. If ``torch.distributed``
    is initialised, all ranks meet at a barrier and rank 0 merges the shards into ``out_path`` and reports
    on all samples; otherwise each rank reports on its shard and :func:`merge_results` joins them later.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    ids = [s.id for s in samples]
    if len(set(ids)) != len(ids):
        dup = sorted({i for i in ids if ids.count(i) > 1})
        raise ValueError(f"sample ids must be unique (results are resumed by id); repeated: {dup[:5]}")
    try:  # compared with the rows' configs as read back from JSON, so tuples and lists are alike
        config = None if config is None else json.loads(config_text(config))
    except (TypeError, ValueError) as e:
        raise ValueError(f"config must be JSON-serialisable ({e})") from None
    rank, world_size = resolve_shard(rank, world_size)
    out = shard_path(out_path, rank, world_size)
    out.parent.mkdir(parents=True, exist_ok=True)
    if not resume and out.exists():
        out.unlink()
    rows = load_rows(out, repair=True)
    for line, rec in rows:
        if rec.get("config") != config:
            raise config_mismatch(f"{out} line {line}", rec.get("config"), config, "this run's",
                                   "use another --out, or --no-resume (resume=False) to start it over")
        if "correct" not in rec and not rec.get("failed"):
            raise ValueError(f"{out}: line {line} has no 'correct' field (nor 'failed'); fix or delete it, "
                             "or start over with --no-resume (resume=False)")
    if any(rec.get("failed") for _, rec in rows):
        # a failed sample (say, a clip that was unreadable) gets another try: drop its row, atomically
        write_atomic(out, [rec for _, rec in rows if not rec.get("failed")])
        rows = [(line, rec) for line, rec in rows if not rec.get("failed")]
    done = {str(r["id"]): r for _, r in rows}
    mine = [(i, s) for i, s in enumerate(samples) if i % world_size == rank]
    todo = [(i, s) for i, s in mine if s.id not in done]

    desc = "eval" if world_size == 1 else f"eval[rank {rank}/{world_size}]"
    bar = tqdm(total=len(mine), initial=len(mine) - len(todo), desc=desc, unit="sample", disable=not progress)
    # running accuracy of this shard, resumed records included
    n_correct = sum(bool(done[s.id]["correct"]) for _, s in mine if s.id in done)
    n_scored = sum(1 for _, s in mine if s.id in done)
    n_failed = 0
    try:
        with open(out, "a", encoding="utf-8") as f:
            for chunk in _chunks(todo, batch_size):
                batch = [s for _, s in chunk]
                preds = list(predict_fn(batch))
                got = [p.id for p in preds]
                if got != [s.id for s in batch]:
                    raise ValueError(f"predict_fn returned predictions for {got}, expected {[s.id for s in batch]}")
                for (i, s), p in zip(chunk, preds):
                    rec = _record(s, i, p, judge)
                    if config is not None:
                        rec["config"] = config
                    append_record(f, rec)
                    done[s.id] = rec
                    bar.update(1)
                    if rec.get("failed"):
                        n_failed += 1
                    else:
                        n_correct += bool(rec["correct"])
                        n_scored += 1
                acc = f"acc {n_correct / n_scored:.3f}" if n_scored else "acc -"
                bar.set_postfix_str(acc + (f", failed {n_failed}" if n_failed else ""))
    finally:
        bar.close()

    if world_size > 1 and _dist_ready():
        torch.distributed.barrier()
        if rank == 0:
            merged = merge_results(out_path, world_size, expected_ids=ids)
            return report_from_records(merged, out_path)
    return report_from_records([done[s.id] for _, s in mine], out)
