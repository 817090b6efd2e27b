"""Video question answering evaluation: scoring, LLaVA prediction, a resumable sharded harness, reports.

The pieces are independent so each can be reused or swapped:

- scoring: :func:`extract_option` (multiple choice), :func:`normalize_answer` / :func:`score_open`
  (open-ended) and :func:`judge_open` (an optional LLM judge behind a local OpenAI-compatible server);
- prediction: :func:`predict_llava` / :func:`predict_batch` run a HF ``LlavaForConditionalGeneration``
  (optionally with an mmeff reducer applied) on sampled frames and time it;
- harness: :func:`evaluate` appends one JSON line per sample (fsynced, so a crash loses nothing),
  resumes by id (only rows of the same run configuration), records unreadable clips as failed and goes
  on, shards over ``RANK`` / ``WORLD_SIZE`` and :func:`merge_results` joins the shards;
- report: :class:`EvalReport` with :func:`format_report`.
"""

from __future__ import annotations

import ast
import json
import math
import os
import re
import statistics
import string
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from mmeff.datasets.videoqa import VideoQASample

__all__ = [
    "EvalReport",
    "JudgeError",
    "JudgeResponseError",
    "Prediction",
    "PredictFn",
    "build_question",
    "format_question",
    "evaluate",
    "extract_option",
    "format_report",
    "judge_open",
    "llava_predictor",
    "load_results",
    "merge_results",
    "normalize_answer",
    "predict_batch",
    "predict_llava",
    "read_clip",
    "report_from_records",
    "resolve_shard",
    "score_open",
    "shard_path",
]

OPTION_LETTERS = string.ascii_uppercase
MC_INSTRUCTION = "Answer with the option's letter from the given choices directly."
OPEN_INSTRUCTION = "Answer the question using a single word or phrase."

# ---------------------------------------------------------------------------------------------------
# Scoring
# ---------------------------------------------------------------------------------------------------

_NUMBER_WORDS = (
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
    "sixteen seventeen eighteen nineteen twenty"
).split()
_WORD_TO_DIGIT = {w: str(i) for i, w in enumerate(_NUMBER_WORDS)}
_YES = ("yes", "yeah", "yep", "yup", "true", "correct", "right", "affirmative")
_NO = ("no", "nope", "nah", "false", "incorrect", "wrong", "negative")
# only when the variant is the whole answer or is followed by punctuation ("Yes, he is" -> yes), so
# answers such as "no one" or "right hand" keep their meaning
_YES_NO_RE = re.compile(r"^\s*(" + "|".join(_YES + _NO) + r")\s*(?:[,.!;:]|$)", re.IGNORECASE)
_ARTICLES = {"a", "an", "the"}
_PUNCT_RE = re.compile(r"[^\w\s]|_")


def normalize_answer(text: str) -> str:
    """Canonical form of a short answer for matching.

    Lowercase; a leading yes/no variant ("Yeah.", "Correct, it is", "nope") becomes ``"yes"`` / ``"no"``;
    punctuation removed; number words 0-20 become digits; articles dropped; whitespace collapsed.
    """
    text = str(text).strip().lower()
    m = _YES_NO_RE.match(text)
    if m:
        return "yes" if m.group(1) in _YES else "no"
    words = _PUNCT_RE.sub(" ", text).split()
    words = [_WORD_TO_DIGIT.get(w, w) for w in words if w not in _ARTICLES]
    return " ".join(words)


def score_open(pred: str, ref: str) -> dict[str, bool]:
    """Open-ended match: ``exact`` (identical after stripping outer whitespace, case-sensitive) and
    ``normalized`` (equal under :func:`normalize_answer`)."""
    return {
        "exact": str(pred).strip() == str(ref).strip(),
        "normalized": normalize_answer(pred) == normalize_answer(ref),
    }


def _option_words(text: str) -> list[str]:
    # like normalize_answer without the yes/no collapse, kept as words for whole-word matching
    words = _PUNCT_RE.sub(" ", str(text).lower()).split()
    return [_WORD_TO_DIGIT.get(w, w) for w in words if w not in _ARTICLES]




def extract_option(text: str, options: Sequence[str]) -> int | None:
    """Index of the option a free-form answer picks, or ``None`` when it picks none or several.

    Letters (``A`` = option 0) are tried from the most to the least explicit form, and the first form
    that occurs decides: the whole answer being one letter ("b", "(B)", "B."), "answer/option/choice
    is B" / "Answer: B", a leading "B." / "B)" / "B:", a parenthesised "(B)" anywhere, a stand-alone
    capital "B" followed by ``.``/``)``/``:`` or the end. Lowercase letters count only where they cannot
    be an English word ("the answer is a man" is not option A). If no letter form occurs, the option
    texts are matched as whole words (case, punctuation and articles ignored); a match inside a longer
    one loses ("red car" beats "car"), and two separate options matched (or two different letters in one
    form) give ``None``.
    """
    n = len(options)
    if n < 1:
        raise ValueError("extract_option needs at least one option")
    if n > len(OPTION_LETTERS):
        raise ValueError(f"at most {len(OPTION_LETTERS)} options can be lettered, got {n}")
    letters = OPTION_LETTERS[:n]
    raw = str(text).strip()

    def idx(letter: str) -> int | None:
        i = OPTION_LETTERS.find(letter.upper())
        return i if 0 <= i < n else None

    def valid(found: list[str]) -> list[int]:
        return [i for i in (idx(x) for x in found) if i is not None]

    cls = f"[{letters}{letters.lower()}]"
    upper = f"[{letters}]"
    tiers = [
        # the whole answer is a letter, possibly wrapped: "b", "(B)", "B.", "Answer: (c)"
        lambda: re.findall(
            rf"^(?:(?:the\s+)?(?:answer|option|choice)\s*(?:is|:)?\s*)?[\(\[]?({cls})[\)\]]?[.:!]?$",
            raw, re.IGNORECASE,
        ),
        # "the answer is B", "Answer: B", "option (c)", "best choice is b."
        # (scoped (?i:) so that a bare lowercase letter still needs punctuation or the end after it)
        lambda: re.findall(
            rf"\b(?i:answer|option|choice)\s*(?:(?i:is)\s*|:\s*)?"
            rf"(?:[\(\[]({cls})[\)\]]|({upper})\b|({cls})(?=\s*(?:[.,;:!)]|$)))",
            raw,
        ),
        # a leading "B." / "B)" / "B:" / "B -" followed by the option text
        lambda: re.findall(rf"^({upper})\s*(?:[.):]|\s-\s)", raw),
        # "(B)" / "[b]" anywhere
        lambda: re.findall(rf"[\(\[]({cls})[\)\]]", raw),
        # stand-alone capital followed by punctuation or the end: "I pick B." / "so it is C"
        lambda: re.findall(rf"(?:^|(?<=\s))({upper})(?=[.):]?\s*$|[.):](?:\s|$))", raw),
    ]
    for tier in tiers:
        found = tier()
        # findall gives tuples for several groups; joining keeps the one that matched
        distinct = set(valid(["".join(f) if isinstance(f, tuple) else f for f in found]))
        if distinct:
            # the first form present decides; two different letters in it are ambiguous
            return distinct.pop() if len(distinct) == 1 else None

    # option texts as whole-word runs; a match lying inside a longer match ("car" in "red car") loses
    words = _option_words(raw)
    spans: dict[int, list[tuple[int, int]]] = {}
    for i, opt in enumerate(options):
        ow = _option_words(opt)
        if ow:
            spans[i] = [(k, k + len(ow)) for k in range(len(words) - len(ow) + 1) if words[k : k + len(ow)] == ow]
    hits = {i: sp for i, sp in spans.items() if sp}

    def covered(a: tuple[int, int], i: int) -> bool:
        return any(
            b[0] <= a[0] and a[1] <= b[1] and b[1] - b[0] > a[1] - a[0] for j, sp in hits.items() if j != i for b in sp
        )

    winners = {i for i, sp in hits.items() if not all(covered(a, i) for a in sp)}
    # options with identical text are one answer; different surviving options are ambiguous
    texts = {tuple(_option_words(options[i])) for i in winners}
    return min(winners) if len(texts) == 1 else None


# ---------------------------------------------------------------------------------------------------
# LLM judge
# ---------------------------------------------------------------------------------------------------


class JudgeError(ValueError):
    """The judge endpoint could not be reached or answered with an HTTP error (aborts the run)."""


class JudgeResponseError(JudgeError):
    """The judge answered, but its reply has no readable yes/no verdict (recorded per sample)."""


_JUDGE_SYSTEM = (
    "You are an intelligent chatbot designed for evaluating the correctness of generative outputs for "
    "question-answer pairs. Your task is to compare the predicted answer with the correct answer and "
    "determine if they match meaningfully. Focus on meaningful matches rather than exact wording; "
    "synonyms and paraphrases are valid matches."
)
_JUDGE_USER = (
    "Please evaluate the following video-based question-answer pair:\n\n"
    "Question: {question}\nCorrect Answer: {ref}\nPredicted Answer: {pred}\n\n"
    "Provide your evaluation only as a yes/no and a score, where the score is an integer between 0 and 5, "
    "with 5 indicating the highest meaningful match. Reply with JSON only, with keys 'pred' and 'score', "
    'e.g. {{"pred": "yes", "score": 4}}.'
)


def _chat_url(url: str) -> str:
    url = url.rstrip("/")
    if url.endswith("/chat/completions"):
        return url
    if url.endswith("/v1"):
        return url + "/chat/completions"
    return url + "/v1/chat/completions"


def parse_judge_reply(content: str) -> dict[str, Any]:
    """``{"correct": bool, "score": float}`` from a judge's reply text (JSON, a Python dict, fenced code,
    or loose prose like ``yes, score 4``); raises :class:`JudgeResponseError` if no verdict is found."""
    text = str(content).strip()
    verdict: Any = None
    score: Any = None
    for block in re.findall(r"\{.*?\}", text, re.DOTALL):
        for loader in (json.loads, ast.literal_eval):
            try:
                obj = loader(block)
            except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
                continue
            if isinstance(obj, dict):
                low = {str(k).lower(): v for k, v in obj.items()}
                verdict = next((low[k] for k in ("pred", "correct", "verdict", "answer", "match") if k in low), None)
                score = low.get("score")
                break
        if verdict is not None:
            break
    if verdict is None:
        m = re.search(r"['\"]?pred['\"]?\s*[:=]\s*['\"]?(yes|no)\b", text, re.IGNORECASE) or re.search(
            # a bare leading verdict must stand alone ("No, ..." / "yes score 4"), so "no idea" is not one
            r"^\W*(yes|no)\b(?=\s*(?:[,.;:!\n]|$|score))", text, re.IGNORECASE
        )
        verdict = m.group(1) if m else None
    if score is None:
        m = re.search(r"score['\"]?\s*[:=]?\s*(\d+(?:\.\d+)?)", text, re.IGNORECASE)
        score = m.group(1) if m else None
    if isinstance(verdict, bool):
        correct = verdict
    elif isinstance(verdict, str) and verdict.strip().lower().strip(".!") in ("yes", "no", "true", "false"):
        correct = verdict.strip().lower().strip(".!") in ("yes", "true")
    else:
        raise JudgeResponseError(f"judge reply has no yes/no verdict: {text[:300]!r}")
    try:
        value = float(score) if score is not None else math.nan
    except (TypeError, ValueError):
        value = math.nan
    if not math.isnan(value):
        value = min(5.0, max(0.0, value))
    return {"correct": correct, "score": value}


def judge_open(
    question: str, ref: str, pred: str, url: str, model: str, timeout: float = 60.0
) -> dict[str, Any]:
    """Ask a local OpenAI-compatible server whether ``pred`` answers ``question`` like ``ref``.

    ``url`` is the server root (``http://127.0.0.1:8000``), its ``/v1``, or the full
    ``/v1/chat/completions`` address. Greedy (temperature 0) request for JSON ``{"pred": "yes"|"no",
    "score": 0-5}``. Returns ``{"correct": bool, "score": float (nan if missing), "raw": reply text}``.
    Raises :class:`JudgeError` naming the URL when the server is unreachable or answers an HTTP error,
    :class:`JudgeResponseError` when the reply has no verdict.
    """
    endpoint = _chat_url(url)
    body = {
        "model": model,
        "messages": [
            {"role": "system", "content": _JUDGE_SYSTEM},
            {"role": "user", "content": _JUDGE_USER.format(question=question, ref=ref, pred=pred)},
        ],
        "temperature": 0,
        "max_tokens": 64,
    }
    req = urllib.request.Request(
        endpoint, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}, method="POST"
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            payload = resp.read().decode("utf-8", errors="replace")
    except urllib.error.HTTPError as e:
        detail = e.read().decode("utf-8", errors="replace")[:300] if e.fp is not None else ""
        raise JudgeError(f"judge at {endpoint} answered HTTP {e.code} {e.reason}: {detail}") from e
    except (urllib.error.URLError, OSError) as e:  # refused, DNS, timeout
        reason = getattr(e, "reason", e)
        raise JudgeError(
            f"cannot reach the judge at {endpoint} ({reason}); start a local OpenAI-compatible server "
            "(e.g. vLLM or llama.cpp) or drop --judge-url"
        ) from e
    try:
        content = json.loads(payload)["choices"][0]["message"]["content"]
    except (ValueError, KeyError, IndexError, TypeError) as e:
        raise JudgeResponseError(f"judge at {endpoint} sent no chat completion: {payload[:300]!r}") from e
    return {**parse_judge_reply(content or ""), "raw": content}


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
    path: str | Path, num_frames: int, start: float | None = None, end: float | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """``num_frames`` frames at segment midpoints of ``[start, end)`` seconds of a video (whole video when
    both are ``None``): ``frames`` (T, H, W, 3) uint8 and ``timestamps`` (T,) seconds. A thin view of
    :func:`~mmeff.datasets.media.load_video`, which owns the decoding and the errors."""
    from mmeff.datasets.media import load_video

    clip = load_video(path, num_frames=num_frames, start=start, end=end)
    return clip.frames, clip.timestamps


def format_question(question: str, options: Sequence[str] | None) -> str:
    """The text turn for a question: then lettered options and the letter instruction for multiple
    choice (``options`` given), or the short-answer instruction for open-ended questions."""
    q = question.strip()
    if options is None:
        return f"{q}\n{OPEN_INSTRUCTION}"
    lines = [f"({OPTION_LETTERS[i]}) {opt}" for i, opt in enumerate(options)]
    return q + "\nOptions:\n" + "\n".join(lines) + "\n" + MC_INSTRUCTION


def build_question(sample: VideoQASample) -> str:
    """The text turn for a sample (:func:`format_question` of its question and options)."""
    return format_question(sample.question, sample.options)


def _eos_ids(model: nn.Module, tokenizer: Any) -> set[int]:
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        eos = getattr(tokenizer, "eos_token_id", None)
    values = eos if isinstance(eos, (list, tuple)) else [eos]
    return {int(v) for v in values if v is not None}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


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
    """Greedy answers of a HF ``LlavaForConditionalGeneration`` for several samples in one ``generate``.

    Each sample's ``num_frames`` frames (:func:`read_clip`, honouring ``start``/``end``) become one contiguous
    run of ``num_frames * llava_tokens_per_image`` placeholders (one video) in a chat prompt built with
    ``build_prompt``, so frame-level methods see each frame and video-level ones (Free Video-LLM) the
    whole clip; the raw questions go to the method as ``mmeff_text``; rows
    are left-padded into ``input_ids`` (B, L) and ``pixel_values`` is (B*num_frames, 3, S, S). With a
    ``reducer``, generation runs inside ``mmeff.apply(model, reducer, **apply_options)``. ``tokenizer`` is
    a chat tokenizer (or a processor with a ``.tokenizer``). A sample whose clip cannot be read gets a
    :class:`Prediction` with ``failed`` set to the reason; the other samples are answered as usual.
    """
    from mmeff.api import apply
    from mmeff.hfconfig import pad_token_id
    from mmeff.models.hf import build_prompt, left_pad_batch, llava_pixel_values, llava_tokens_per_image

    if not samples:
        return []
    if type(model).__name__ != "LlavaForConditionalGeneration":
        raise ValueError(f"predict_batch runs LlavaForConditionalGeneration models, got {type(model).__name__}")
    if num_frames < 1 or max_new_tokens < 1:
        raise ValueError(f"need num_frames >= 1 and max_new_tokens >= 1, got {num_frames}, {max_new_tokens}")
    tok = getattr(tokenizer, "tokenizer", tokenizer)
    cfg = model.config
    param = next(model.parameters())
    device, dtype = param.device, param.dtype
    per_image = llava_tokens_per_image(cfg)
    size = int(cfg.vision_config.image_size)

    pixels: list[torch.Tensor] = []
    decode_s: list[float] = []
    results: list[Prediction | None] = [None] * len(samples)  # failed ones filled now, the rest after generate
    for k, s in enumerate(samples):
        t0 = time.perf_counter()
        try:
            frames, _ = read_clip(s.video, num_frames, s.start, s.end)
        except ValueError as e:  # load_video's one error type for a missing, empty or corrupt clip
            # one bad file in a benchmark of thousands should cost that sample, not the run
            results[k] = Prediction(id=s.id, text="", visual_tokens=0, decode_s=time.perf_counter() - t0,
                                    model_s=0.0, new_tokens=0, failed=str(e))
            continue
        pixels.append(llava_pixel_values(list(frames), size))
        decode_s.append(time.perf_counter() - t0)
    todo = [k for k, r in enumerate(results) if r is None]
    samples = [samples[k] for k in todo]
    if not samples:
        return [r for r in results if r is not None]

    _sync(device)
    t0 = time.perf_counter()
    rows = [build_prompt(tok, build_question(s), 1, num_frames * per_image, cfg.image_token_id) for s in samples]
    pad = tok.pad_token_id if getattr(tok, "pad_token_id", None) is not None else pad_token_id(cfg)
    batch = {k: v.to(device) for k, v in left_pad_batch(rows, pad).items()}
    batch["pixel_values"] = torch.cat(pixels).to(device=device, dtype=dtype)
    gen_kwargs = {"max_new_tokens": max_new_tokens, "do_sample": False, "pad_token_id": pad}
    handle = None
    with torch.inference_mode():
        if reducer is None:
            out = model.generate(**batch, **gen_kwargs)
        else:
            with apply(model, reducer, **apply_options) as handle:
                out = model.generate(**batch, **gen_kwargs, mmeff_text=[s.question for s in samples])
    _sync(device)
    new = out[:, batch["input_ids"].shape[1] :].cpu()
    eos = _eos_ids(model, tok)
    texts, counts = [], []
    for row in new.tolist():
        stop = next((i for i, t in enumerate(row) if t in eos), None)
        counts.append(len(row) if stop is None else stop + 1)
        texts.append(tok.decode(row[: counts[-1]], skip_special_tokens=True).strip())
    model_s = (time.perf_counter() - t0) / len(samples)

    unreduced = num_frames * per_image
    visual = [unreduced] * len(samples) if handle is None else rows_visual_tokens(handle, len(samples), num_frames, unreduced)
    for i, (k, s) in enumerate(zip(todo, samples)):
        results[k] = Prediction(id=s.id, text=texts[i], visual_tokens=visual[i], decode_s=decode_s[i],
                                model_s=model_s, new_tokens=counts[i])
    return [r for r in results if r is not None]


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
    """Greedy answer of a HF ``LlavaForConditionalGeneration`` to one sample (see :func:`predict_batch`)."""
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
    """A ``predict_fn`` for :func:`evaluate`: :func:`predict_batch` with these settings bound."""

    def predict(samples: Sequence[VideoQASample]) -> list[Prediction]:
        return predict_batch(
            model, tokenizer, samples, reducer=reducer, num_frames=num_frames, max_new_tokens=max_new_tokens,
            **apply_options,
        )

    return predict


# ---------------------------------------------------------------------------------------------------
# Results files
# ---------------------------------------------------------------------------------------------------


def shard_path(out_path: str | Path, rank: int, world_size: int) -> Path:
    """Where rank ``rank`` of ``world_size`` writes: ``<out>.rank<r>-of-<w>.jsonl`` (``out`` itself for 1)."""
    out = Path(out_path)
    if world_size <= 1:
        return out
    return out.with_name(f"{out.name}.rank{rank}-of-{world_size}.jsonl")


def resolve_shard(rank: int | None = None, world_size: int | None = None) -> tuple[int, int]:
    """``(rank, world_size)``: the arguments, else ``RANK`` / ``WORLD_SIZE`` from the environment (as set
    by torchrun or accelerate launch), else ``(0, 1)``. ``LOCAL_RANK`` only picks a device, never a shard."""
    if world_size is None:
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if rank is None:
        rank = int(os.environ.get("RANK", "0"))
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"invalid shard: rank {rank} of world_size {world_size}")
    return rank, world_size


def load_results(path: str | Path, *, repair: bool = False) -> list[dict[str, Any]]:
    """Records of a results JSONL file (``[]`` if it does not exist).

    A last line that is not valid JSON is what a crash mid-write leaves: it is ignored, and with
    ``repair=True`` cut from the file so appending continues on a clean line. A bad line anywhere else,
    or any line that is valid JSON but not an object with an ``id``, raises ``ValueError``.
    """
    return [rec for _, rec in _load_rows(path, repair=repair)]


def _load_rows(path: str | Path, *, repair: bool = False) -> list[tuple[int, dict[str, Any]]]:
    """:func:`load_results` with each record's 1-based line number, for errors that point at a line."""
    path = Path(path)
    if not path.exists():
        return []
    data = path.read_bytes()
    rows: list[tuple[int, dict[str, Any]]] = []
    good_end = 0  # byte offset just past the last valid line
    pos = 0
    lines = data.split(b"\n")
    last_used = max((i for i, x in enumerate(lines) if x.strip()), default=-1)
    for i, line in enumerate(lines):
        end = pos + len(line)
        if line.strip():
            try:
                rec = json.loads(line)
            except ValueError as e:
                if i == last_used:
                    break
                raise ValueError(f"{path}: line {i + 1} is corrupt ({e}); fix or delete it") from None
            # whole lines are written at once, so valid JSON is never a torn write: a wrong shape is an error
            if not isinstance(rec, dict) or "id" not in rec:
                raise ValueError(f"{path}: line {i + 1} is not a result record (no 'id'); fix or delete it")
            rows.append((i + 1, rec))
            good_end = end
        pos = end + 1
    if repair:
        keep = data[:good_end]
        if keep and not keep.endswith(b"\n"):
            keep += b"\n"
        if keep != data:
            with open(path, "r+b") as f:
                f.seek(0)
                f.write(keep)
                f.truncate(len(keep))
                f.flush()
                os.fsync(f.fileno())
    return rows


def _write_atomic(path: Path, records: Sequence[dict[str, Any]]) -> None:
    """Replace ``path`` by ``records`` so that a crash leaves either the old or the new file, never half."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for rec in records:
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _config_text(config: Any) -> str:
    return json.dumps(config, sort_keys=True, ensure_ascii=False)


def _config_mismatch(where: str, theirs: Any, mine: Any, mine_name: str, hint: str) -> ValueError:
    """One-line error for a row written under another run configuration than ``mine``."""
    if isinstance(theirs, dict) and isinstance(mine, dict):
        keys = sorted(k for k in set(theirs) | set(mine) if theirs.get(k) != mine.get(k))
        differ = f" (differs in {', '.join(keys)})"
    else:
        differ = ""
    return ValueError(
        f"{where} comes from another run configuration{differ}: its config {_config_text(theirs)}, "
        f"{mine_name} {_config_text(mine)}; {hint}"
    )


def _append(f: Any, record: dict[str, Any]) -> None:
    f.write(json.dumps(record, ensure_ascii=False) + "\n")
    f.flush()
    os.fsync(f.fileno())


def merge_results(
    out_path: str | Path, world_size: int, *, expected_ids: Sequence[str] | None = None
) -> list[dict[str, Any]]:
    """Join the ``world_size`` shard files of ``out_path`` into ``out_path``, sorted by sample order.

    Raises ``ValueError`` for a missing shard, an id in two records, or (with ``expected_ids``) samples no
    shard has. The merged file is written atomically; shards are kept. Returns the merged records.
    """
    out = Path(out_path)
    missing = [str(shard_path(out, r, world_size)) for r in range(world_size) if not shard_path(out, r, world_size).exists()]
    if missing:
        raise ValueError(f"cannot merge {out}: missing shard file(s) {', '.join(missing)} (did every rank finish?)")
    records: list[dict[str, Any]] = []
    seen: dict[str, int] = {}
    first: tuple[str, Any] | None = None  # (where, config) of the first record, which all must share
    for r in range(world_size):
        shard = shard_path(out, r, world_size)
        for line, rec in _load_rows(shard):
            rid = str(rec["id"])
            if rid in seen:
                raise ValueError(f"cannot merge {out}: sample id {rid!r} is in shard {seen[rid]} and shard {r}")
            if first is None:
                first = (f"{shard} line {line}", rec.get("config"))
            elif rec.get("config") != first[1]:
                raise _config_mismatch(f"cannot merge {out}: {shard} line {line}", rec.get("config"), first[1],
                                       f"{first[0]} has", "rerun the shards under one configuration")
            seen[rid] = r
            records.append(rec)
    if expected_ids is not None:
        lacking = [i for i in expected_ids if str(i) not in seen]
        if lacking:
            raise ValueError(f"cannot merge {out}: {len(lacking)} sample(s) have no result, e.g. {lacking[:5]}")
    # "index" is the sample's position in the full list, so the order matches a single-process run
    records.sort(key=lambda rec: (rec.get("index", math.inf), str(rec["id"])))
    _write_atomic(out, records)
    return records


# ---------------------------------------------------------------------------------------------------
# Harness and report
# ---------------------------------------------------------------------------------------------------


@dataclass
class EvalReport:
    """Aggregate results. Accuracy: option match for multiple choice, normalised match for open-ended.

    ``per_type`` maps the question type (the first of ``type_name``, ``type``, ``question_type``, ``task``,
    ``kind`` in ``sample.meta``; ``"-"`` when none) to ``{"n", "accuracy"}``; judge fields
    are ``None`` unless open-ended samples were judged (``judge_accuracy`` over judged samples, unreadable
    replies counted in ``judge_errors`` and left out). Latency is ``decode_s + model_s`` per sample.
    ``n`` and every metric cover the scored samples; ``failed`` counts those that could not be answered
    (e.g. an unreadable clip), which are neither right nor wrong.
    """

    n: int
    accuracy: float | None
    n_multiple_choice: int = 0
    accuracy_multiple_choice: float | None = None
    n_open: int = 0
    accuracy_open: float | None = None
    exact_open: float | None = None
    judge_n: int = 0
    judge_accuracy: float | None = None
    judge_score: float | None = None
    judge_errors: int = 0
    per_type: dict[str, dict[str, float]] = field(default_factory=dict)
    visual_tokens_mean: float | None = None
    visual_tokens_median: float | None = None
    latency_mean_s: float | None = None
    latency_median_s: float | None = None
    decode_mean_s: float | None = None
    model_mean_s: float | None = None
    new_tokens_mean: float | None = None
    failed: int = 0
    out_path: str = ""

    def as_dict(self) -> dict[str, Any]:
        """JSON-serialisable dict (NaN-free: missing values are ``None``)."""
        return asdict(self)


def _mean(xs: Sequence[float]) -> float | None:
    return float(statistics.fmean(xs)) if xs else None


def _median(xs: Sequence[float]) -> float | None:
    return float(statistics.median(xs)) if xs else None


def report_from_records(records: Sequence[dict[str, Any]], out_path: str | Path = "") -> EvalReport:
    """Aggregate result records (as written by :func:`evaluate`) into an :class:`EvalReport`.

    Records with ``failed`` set are counted, not scored; any other record without ``correct`` raises
    ``ValueError``."""
    failed = sum(1 for r in records if r.get("failed"))
    records = [r for r in records if not r.get("failed")]
    bad = next((r for r in records if "correct" not in r), None)
    if bad is not None:
        raise ValueError(f"{out_path or 'results'}: record {bad.get('id')!r} has no 'correct' field")
    mc = [r for r in records if r.get("multiple_choice")]
    op = [r for r in records if not r.get("multiple_choice")]
    judged = [r["judge"] for r in op if isinstance(r.get("judge"), dict) and r["judge"].get("correct") is not None]
    judge_errors = sum(1 for r in op if isinstance(r.get("judge"), dict) and r["judge"].get("error"))
    scores = [float(j["score"]) for j in judged if j.get("score") is not None]
    types: dict[str, list[bool]] = {}
    for r in records:
        types.setdefault(str(r.get("type") or "-"), []).append(bool(r["correct"]))
    return EvalReport(
        n=len(records),
        accuracy=_mean([float(r["correct"]) for r in records]),
        failed=failed,
        n_multiple_choice=len(mc),
        accuracy_multiple_choice=_mean([float(r["correct"]) for r in mc]),
        n_open=len(op),
        accuracy_open=_mean([float(r["correct"]) for r in op]),
        exact_open=_mean([float(r["exact"]) for r in op if "exact" in r]),
        judge_n=len(judged),
        judge_accuracy=_mean([float(j["correct"]) for j in judged]),
        judge_score=_mean(scores),
        judge_errors=judge_errors,
        per_type={k: {"n": len(v), "accuracy": sum(v) / len(v)} for k, v in sorted(types.items())},
        visual_tokens_mean=_mean([r["visual_tokens"] for r in records]),
        visual_tokens_median=_median([r["visual_tokens"] for r in records]),
        latency_mean_s=_mean([r["latency_s"] for r in records]),
        latency_median_s=_median([r["latency_s"] for r in records]),
        decode_mean_s=_mean([r["decode_s"] for r in records]),
        model_mean_s=_mean([r["model_s"] for r in records]),
        new_tokens_mean=_mean([r["new_tokens"] for r in records]),
        out_path=str(out_path),
    )


# the loaders' names for a question's category, most specific first (TGIF-QA has a name for its type
# code, MVBench a task, the synthetic set a kind)
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
        config = None if config is None else json.loads(_config_text(config))
    except (TypeError, ValueError) as e:
        raise ValueError(f"config must be JSON-serialisable ({e})") from None
    rank, world_size = resolve_shard(rank, world_size)
    out = shard_path(out_path, rank, world_size)
    out.parent.mkdir(parents=True, exist_ok=True)
    if not resume and out.exists():
        out.unlink()
    rows = _load_rows(out, repair=True)
    for line, rec in rows:
        if rec.get("config") != config:
            raise _config_mismatch(f"{out} line {line}", rec.get("config"), config, "this run's",
                                   "use another --out, or --no-resume (resume=False) to start it over")
        if "correct" not in rec and not rec.get("failed"):
            raise ValueError(f"{out}: line {line} has no 'correct' field (nor 'failed'); fix or delete it, "
                             "or start over with --no-resume (resume=False)")
    if any(rec.get("failed") for _, rec in rows):
        # a failed sample (say, a clip that was unreadable) gets another try: drop its row, atomically
        _write_atomic(out, [rec for _, rec in rows if not rec.get("failed")])
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
                    _append(f, rec)
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


def _fmt(value: Any, spec: str = ".3f") -> str:
    if value is None:
        return "-"
    return format(value, spec) if isinstance(value, float) else str(value)


def format_report(report: EvalReport) -> str:
    """Plain-text table of an :class:`EvalReport` (overall metrics, then accuracy per question type)."""
    rows = [
        ("samples", _fmt(report.n)),
        ("accuracy", _fmt(report.accuracy)),
    ]
    if report.failed:
        rows += [("failed (unreadable, not scored)", str(report.failed))]
    rows += [
        ("multiple choice (n / acc)", f"{report.n_multiple_choice} / {_fmt(report.accuracy_multiple_choice)}"),
        ("open-ended (n / normalized acc)", f"{report.n_open} / {_fmt(report.accuracy_open)}"),
        ("open-ended exact match", _fmt(report.exact_open)),
    ]
    if report.judge_n or report.judge_errors:
        rows += [
            ("judge (n / acc / score 0-5)",
             f"{report.judge_n} / {_fmt(report.judge_accuracy)} / {_fmt(report.judge_score, '.2f')}"),
            ("judge unreadable replies", str(report.judge_errors)),
        ]
    rows += [
        ("visual tokens / video (mean / median)",
         f"{_fmt(report.visual_tokens_mean, '.1f')} / {_fmt(report.visual_tokens_median, '.1f')}"),
        ("latency s / sample (mean / median)",
         f"{_fmt(report.latency_mean_s)} / {_fmt(report.latency_median_s)}"),
        ("  frame decoding s (mean)", _fmt(report.decode_mean_s)),
        ("  model s (mean)", _fmt(report.model_mean_s)),
        ("new tokens (mean)", _fmt(report.new_tokens_mean, ".1f")),
    ]
    w = max(len(k) for k, _ in rows)
    lines = [f"{k:<{w}}  {v}" for k, v in rows]
    if report.per_type:
        tw = max(4, *(len(t) for t in report.per_type))
        lines += ["", f"{'type':<{tw}}  {'n':>6}  {'acc':>6}", f"{'-' * tw}  {'-' * 6}  {'-' * 6}"]
        lines += [f"{t:<{tw}}  {int(v['n']):>6}  {v['accuracy']:>6.3f}" for t, v in report.per_type.items()]
    if report.out_path:
        lines += ["", f"results: {report.out_path}"]
    return "\n".join(lines)
