"""Answers to video questions: the question turn, reading an answer (multiple choice or open-ended), an LLM judge.

- questions: :func:`format_question` / :func:`build_question` (lettered options and the instruction);
- scoring: :func:`extract_option` (multiple choice), :func:`normalize_answer` / :func:`score_open`
  (open-ended) and :func:`judge_open` (an optional LLM judge behind a local OpenAI-compatible server).
"""

from __future__ import annotations

import ast
import json
import math
import re
import string
import urllib.error
import urllib.request
from collections.abc import Sequence
from typing import Any

from mmeff.datasets.videoqa import VideoQASample

__all__ = [
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
]

# option i is lettered OPTION_LETTERS[i] in the prompt and in the answers extract_option reads
OPTION_LETTERS = string.ascii_uppercase
MC_INSTRUCTION = "Answer with the option's letter from the given choices directly."
OPEN_INSTRUCTION = "Answer the question using a single word or phrase."


def format_question(question: str, options: Sequence[str] | None) -> str:
    """The text turn for a question: the question, then lettered options and the letter instruction for multiple
    choice (``options`` given), or the short-answer instruction for open-ended questions."""
    q = question.strip()
    if options is None:
        return f"{q}\n{OPEN_INSTRUCTION}"
    lines = [f"({OPTION_LETTERS[i]}) {opt}" for i, opt in enumerate(options)]
    return q + "\nOptions:\n" + "\n".join(lines) + "\n" + MC_INSTRUCTION


def build_question(sample: VideoQASample) -> str:
    """The text turn for a sample (:func:`format_question` of its question and options)."""
    return format_question(sample.question, sample.options)


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
