"""The video-QA sample schema and the annotation-file readers every format's loader shares.

:class:`VideoQASample` is the one schema; the helpers read JSON, csv/tsv and parquet annotation rows,
check their fields with errors that name the file and row (:func:`annotation_error`), parse multiple-
choice options, find the video files and turn rows into a checked sample list (:func:`collect_samples`).
The per-benchmark loaders are in :mod:`mmeff.datasets.benchmarks`; :mod:`mmeff.datasets.videoqa`
re-exports everything users import.
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mmeff.datasets.media import VIDEO_SUFFIXES

__all__ = [
    "Row",
    "VideoFinder",
    "VideoQASample",
    "annotation_error",
    "check_limit",
    "collect_samples",
    "extra_fields",
    "json_rows",
    "option_index",
    "parquet_rows",
    "read_json",
    "read_video_map",
    "require_field",
    "seconds_field",
    "table_rows",
    "text_field",
    "unlettered_options",
    "video_map_file",
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


_MISSING_SHOWN = 5

#: one annotation row and where it sits in its file ("row 3" for JSON lists, "line 7" for tables)
Row = tuple[str, Any]


# ----------------------------------------------------------------------------------------------------
# Reading annotation files


def annotation_error(file: Path, where: str, problem: str) -> ValueError:
    """The ``ValueError`` for a bad annotation row: ``"<file>: <where>: <problem>"`` (raise it)."""
    return ValueError(f"{file}: {where}: {problem}")


def read_json(file: Path) -> Any:
    """The parsed JSON of ``file``; ``ValueError`` naming the file when it is missing or not JSON."""
    if not file.is_file():
        raise ValueError(f"annotation file not found: {file}")
    try:
        # utf-8-sig (here and for tables) also reads files saved with a byte-order mark.
        with file.open(encoding="utf-8-sig") as fh:
            return json.load(fh)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{file}: not valid JSON ({exc})") from None


def json_rows(file: Path) -> list[Row]:
    """``("row i", row)`` for each element of the JSON list in ``file``."""
    data = read_json(file)
    if not isinstance(data, list):
        raise ValueError(f"{file}: expected a JSON list of rows, got {type(data).__name__}")
    return [(f"row {i}", row) for i, row in enumerate(data)]


def table_rows(file: Path, required: Iterable[str]) -> tuple[list[str], list[Row]]:
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
        rows: list[Row] = []
        for row in reader:
            where = f"line {reader.line_num}"
            # DictReader files surplus cells under None and pads short rows with None.
            if None in row or any(value is None for value in row.values()):
                raise annotation_error(file, where, f"expected {len(columns)} fields like the header")
            rows.append((where, row))
    return columns, rows


def parquet_rows(file: Path) -> list[Row]:
    """``("row i", row dict)`` for each row of a parquet file; ``ImportError`` when pyarrow is missing."""
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


def require_field(file: Path, where: str, row: Any, key: str) -> Any:
    """``row[key]``; :func:`annotation_error` when ``row`` is not an object or the field is missing/null."""
    if not isinstance(row, dict):
        raise annotation_error(file, where, f"expected an object with field {key!r}, got {type(row).__name__}")
    if row.get(key) is None:
        raise annotation_error(file, where, f"missing field {key!r}")
    return row[key]


def text_field(file: Path, where: str, row: Any, key: str) -> str:
    """``row[key]`` as stripped, non-empty text (numbers are accepted and turned into text)."""
    value = require_field(file, where, row, key)
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise annotation_error(file, where, f"field {key!r} must be text, got {value!r}")
    text = str(value).strip()
    if not text:
        raise annotation_error(file, where, f"field {key!r} is empty")
    return text


def seconds_field(file: Path, where: str, row: dict[str, Any], key: str) -> float | None:
    """``row[key]`` as a finite number of seconds ``>= 0``, or ``None`` when the field is absent."""
    value = row.get(key)
    if value is None:
        return None
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        raise annotation_error(file, where, f"field {key!r} must be a number of seconds, got {value!r}") from None
    if isinstance(value, bool) or not np.isfinite(seconds) or seconds < 0:
        raise annotation_error(file, where, f"field {key!r} must be a number of seconds >= 0, got {value!r}")
    return seconds


def _number_or_text(value: Any) -> Any:
    # Table cells are strings; metadata such as frame counts reads better as numbers.
    if isinstance(value, str) and re.fullmatch(r"-?\d+", value.strip()):
        return int(value)
    return value


def extra_fields(row: dict[str, Any], used: Iterable[str]) -> dict[str, Any]:
    """The fields of ``row`` not in ``used`` (for ``meta``), integer-looking text turned into ints."""
    skip = set(used)
    return {k: _number_or_text(v) for k, v in row.items() if k not in skip}


# ----------------------------------------------------------------------------------------------------
# Multiple choice


_LETTERED = re.compile(r"\s*\(?([A-Z])\s*[.):]\s*(.*)", re.S)
_LETTER = re.compile(r"\s*\(?([A-Za-z])\)?\.?\s*")


def unlettered_options(file: Path, where: str, options: Any) -> list[str]:
    """Option texts without their "A. " / "(B)" prefixes, which must then run A, B, C, ... in order."""
    if not isinstance(options, (list, tuple)) or len(options) < 2:
        raise annotation_error(file, where, f"'options' must be a list of at least 2 texts, got {options!r}")
    if not all(isinstance(o, str) and o.strip() for o in options):
        raise annotation_error(file, where, f"every option must be non-empty text, got {options!r}")
    matches = [_LETTERED.fullmatch(o) for o in options]
    if not any(matches):
        return [o.strip() for o in options]
    letters = [m.group(1) if m else None for m in matches]
    if letters != [chr(ord("A") + i) for i in range(len(options))]:
        raise annotation_error(file, where, f"options must be lettered A, B, C, ... in order, got {options!r}")
    texts = [m.group(2).strip() for m in matches if m]
    if not all(texts):
        raise annotation_error(file, where, f"an option has a letter but no text: {options!r}")
    return texts


def option_index(file: Path, where: str, answer: str, options: list[str], *, letter: bool) -> int:
    """Index of ``answer`` in ``options``: a letter ("C", "(C)", "C.") when ``letter``, else the text."""
    if letter:
        m = _LETTER.fullmatch(answer)
        if m is None:
            raise annotation_error(file, where, f"answer {answer!r} is not an option letter")
        index = ord(m.group(1).upper()) - ord("A")
        if index >= len(options):
            raise annotation_error(file, where, f"answer {answer!r} is past the last of {len(options)} options")
        return index
    stripped = [o.strip() for o in options]
    if answer.strip() not in stripped:
        raise annotation_error(file, where, f"answer {answer!r} is not one of the options {options!r}")
    return stripped.index(answer.strip())


# ----------------------------------------------------------------------------------------------------
# Videos and sample lists


class VideoFinder:
    """Maps annotation video names to paths under ``root``: the first candidate file that exists, else
    the first candidate (so a missing video is reported under its most likely name)."""

    def __init__(self, root: Path, suffixes: tuple[str, ...]) -> None:
        self.root = root
        self.suffixes = suffixes
        self._cache: dict[tuple[str, ...], Path] = {}

    def __call__(self, *names: str) -> Path:
        """The path for the first of ``names`` (tried with each suffix unless they carry one) that exists."""
        if names not in self._cache:
            candidates = []
            for name in names:
                if Path(name).suffix.lower() in VIDEO_SUFFIXES:
                    candidates.append(self.root / name)
                else:
                    candidates.extend(self.root / f"{name}{suffix}" for suffix in self.suffixes)
            self._cache[names] = next((c for c in candidates if c.exists()), candidates[0])
        return self._cache[names]


def check_limit(limit: int | None) -> int | None:
    """``limit`` itself when it is ``None`` or an int ``>= 1``; ``ValueError`` otherwise."""
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 1):
        raise ValueError(f"limit must be an int >= 1 or None, got {limit!r}")
    return limit


def collect_samples(
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
            raise annotation_error(file, where, str(exc)) from None
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
        raise annotation_error(file, where, f"duplicate id {rid!r} (first at {first_seen[rid]}){extra}")
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


def read_video_map(file: Path) -> dict[str, str]:
    """A video-name map: JSON ``{"annotation id": "relative/file/stem"}`` or, for MSVD's
    ``youtube_mapping.txt``, lines ``<clip name> vid<N>`` (clip name first, annotation id second)."""
    if file.suffix.lower() == ".json":
        data = read_json(file)
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
            raise annotation_error(file, f"line {number}", f"expected '<video file name> <annotation id>', got {line!r}")
        mapping[parts[1]] = parts[0]
    return mapping


def video_map_file(explicit: str | Path | None, annotations: Path, default_name: str) -> Path | None:
    """The video map to read: ``explicit`` when given, else ``default_name`` beside ``annotations`` if it
    exists, else ``None``."""
    if explicit is not None:
        return Path(explicit)
    beside = annotations.parent / default_name
    return beside if beside.is_file() else None
