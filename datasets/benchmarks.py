"""Loaders for the video-QA benchmarks mmeff reads: local annotation files to :class:`VideoQASample` lists.

Open-ended: MSVD-QA, MSRVTT-QA, ActivityNet-QA, TGIF-QA (FrameQA). Multiple choice: NExT-QA, Video-MME,
MVBench. Each ``load_*`` docstring gives the release's layout. Use them through
:func:`mmeff.datasets.videoqa.load_videoqa`, which dispatches on the format name; the shared row readers
are in :mod:`mmeff.datasets.annotations`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from mmeff.datasets.annotations import (
    Row,
    VideoFinder,
    VideoQASample,
    annotation_error,
    check_limit,
    collect_samples,
    extra_fields,
    json_rows,
    option_index,
    parquet_rows,
    read_video_map,
    require_field,
    seconds_field,
    table_rows,
    text_field,
    unlettered_options,
    video_map_file,
)

__all__ = [
    "load_activitynet_qa",
    "load_msrvtt_qa",
    "load_msvd_qa",
    "load_mvbench",
    "load_nextqa",
    "load_tgif_qa",
    "load_videomme",
]

_TGIF_FRAMEQA_TYPES = {0: "object", 1: "number", 2: "color", 3: "location"}


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
        for i, (where, row) in enumerate(json_rows(file)):
            key = "video_id" if isinstance(row, dict) and row.get("video_id") is not None else "video"
            video = require_field(file, where, row, key)
            if isinstance(video, bool) or not isinstance(video, (str, int)) or not str(video).strip():
                raise annotation_error(file, where, f"field {key!r} must be a video id, got {video!r}")
            fields = dict(
                id=text_field(file, where, row, "id") if row.get("id") is not None else str(i),
                video=video_path(video),
                question=text_field(file, where, row, "question"),
                answer=text_field(file, where, row, "answer"),
                meta={key: video, **extra_fields(row, ("id", "video_id", "video", "question", "answer"))},
            )
            yield where, fields

    return collect_samples(file, video_root, items(), limit=limit, check_videos=check_videos)


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
    map_file = video_map_file(video_map, file, "youtube_mapping.txt")
    mapping = read_video_map(map_file) if map_file is not None else {}
    find = VideoFinder(root, (".avi", ".mp4"))

    def video_path(video: Any) -> Path:
        name = str(video).strip()
        keys = [name]
        if name.isdigit():
            keys.append(f"vid{name}")
        elif name.startswith("vid") and name[3:].isdigit():
            keys.append(name[3:])
        names = [mapping[k] for k in keys if k in mapping] or keys
        return find(*names)

    return _load_qa_json(file, root, video_path, limit=check_limit(limit), check_videos=check_videos)


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
    find = VideoFinder(root, (".mp4",))

    def video_path(video: Any) -> Path:
        name = str(video).strip()
        return find(f"video{name}" if name.isdigit() else name)

    return _load_qa_json(file, root, video_path, limit=check_limit(limit), check_videos=check_videos)


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
    for where, row in json_rows(answers_file):
        qid = text_field(answers_file, where, row, "question_id")
        if qid in answer_rows:
            raise annotation_error(answers_file, where, f"duplicate question_id {qid!r}")
        answer_rows[qid] = (text_field(answers_file, where, row, "answer"), extra_fields(row, ("question_id", "answer")))
    find = VideoFinder(root, (".mp4", ".mkv", ".webm"))

    def items() -> Iterator[tuple[str, dict[str, Any]]]:
        for where, row in json_rows(questions_file):
            qid = text_field(questions_file, where, row, "question_id")
            name = text_field(questions_file, where, row, "video_name")
            question = text_field(questions_file, where, row, "question")
            if qid not in answer_rows:
                raise annotation_error(questions_file, where, f"question_id {qid!r} has no answer in {answers_file}")
            answer, answer_meta = answer_rows[qid]
            video = find(name) if name.startswith("v_") else find(f"v_{name}", name)
            meta = {
                "video_name": name,
                **answer_meta,
                **extra_fields(row, ("question_id", "video_name", "question")),
            }
            yield where, dict(id=qid, video=video, question=question, answer=answer, meta=meta)

    return collect_samples(questions_file, root, items(), limit=check_limit(limit), check_videos=check_videos)


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
    _, rows = table_rows(file, ("gif_name", "question", "answer"))
    find = VideoFinder(root, (".gif", ".mp4"))

    def items() -> Iterator[tuple[str, dict[str, Any]]]:
        for where, row in rows:
            gif = text_field(file, where, row, "gif_name")
            meta = extra_fields(row, ("gif_name", "question", "answer"))
            if "type" in meta:
                if meta["type"] not in _TGIF_FRAMEQA_TYPES:
                    raise annotation_error(
                        file, where, f"type must be 0-3 (object/number/color/location), got {row['type']!r}"
                    )
                meta["type_name"] = _TGIF_FRAMEQA_TYPES[meta["type"]]
            fields = dict(
                id=f"{gif}:{where.split()[-1]}",
                video=find(gif),
                question=text_field(file, where, row, "question"),
                answer=text_field(file, where, row, "answer"),
                meta=meta,
            )
            yield where, fields

    return collect_samples(file, root, items(), limit=check_limit(limit), check_videos=check_videos)


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
    columns, rows = table_rows(file, ("video", "question", "answer", "qid", "a0", "a1"))
    option_columns = []
    while f"a{len(option_columns)}" in columns:
        option_columns.append(f"a{len(option_columns)}")
    map_file = video_map_file(video_map, file, "map_vid_vidorID.json")
    mapping = read_video_map(map_file) if map_file is not None else None
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
            video = text_field(file, where, row, "video")
            options = [text_field(file, where, row, column) for column in option_columns]
            answer = text_field(file, where, row, "answer")
            if answer.isdigit():
                index = int(answer)
                if index >= len(options):
                    raise annotation_error(
                        file, where, f"answer index {index} is past the last of {len(options)} options"
                    )
            else:
                index = option_index(file, where, answer, options, letter=False)
            meta = extra_fields(row, ("question", "answer", *option_columns))
            fields = dict(
                id=f"{video}_{text_field(file, where, row, 'qid')}",
                video=video_path(video),
                question=text_field(file, where, row, "question"),
                answer=options[index],
                options=options,
                answer_index=index,
                meta=meta,
            )
            yield where, fields

    return collect_samples(file, root, items(), limit=check_limit(limit), check_videos=check_videos)


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
    rows = parquet_rows(file) if file.suffix.lower() == ".parquet" else json_rows(file)
    find = VideoFinder(root, (".mp4", ".mkv", ".webm"))

    def flat_rows() -> Iterator[Row]:
        for where, row in rows:
            nested = row.get("questions") if isinstance(row, dict) else None
            if nested is None:
                yield where, row
                continue
            if not isinstance(nested, list):
                raise annotation_error(file, where, f"'questions' must be a list, got {type(nested).__name__}")
            shared = {k: v for k, v in row.items() if k != "questions"}
            for j, question in enumerate(nested):
                if not isinstance(question, dict):
                    raise annotation_error(
                        file, f"{where} question {j}", f"expected an object, got {type(question).__name__}"
                    )
                yield f"{where} question {j}", {**shared, **question}

    def items() -> Iterator[tuple[str, dict[str, Any]]]:
        for where, row in flat_rows():
            options = unlettered_options(file, where, require_field(file, where, row, "options"))
            index = option_index(file, where, text_field(file, where, row, "answer"), options, letter=True)
            fields = dict(
                id=text_field(file, where, row, "question_id"),
                video=find(text_field(file, where, row, "videoID")),
                question=text_field(file, where, row, "question"),
                answer=options[index],
                options=options,
                answer_index=index,
                meta=extra_fields(row, ("question_id", "question", "options", "answer")),
            )
            yield where, fields

    return collect_samples(file, root, items(), limit=check_limit(limit), check_videos=check_videos)


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
    rows = json_rows(file)

    def items() -> Iterator[tuple[str, dict[str, Any]]]:
        for i, (where, row) in enumerate(rows):
            candidates = require_field(file, where, row, "candidates")
            if not isinstance(candidates, list) or len(candidates) < 2:
                raise annotation_error(
                    file, where, f"'candidates' must be a list of at least 2 texts, got {candidates!r}"
                )
            options = [str(c).strip() for c in candidates]
            if not all(options):
                raise annotation_error(file, where, f"a candidate is empty: {candidates!r}")
            index = option_index(file, where, text_field(file, where, row, "answer"), options, letter=False)
            start, end = seconds_field(file, where, row, "start"), seconds_field(file, where, row, "end")
            if start is not None and end is not None and start >= end:
                raise annotation_error(file, where, f"start {start} is not before end {end}")
            fields = dict(
                id=f"{task}-{i}",
                video=root / text_field(file, where, row, "video"),
                question=text_field(file, where, row, "question"),
                answer=options[index],
                options=options,
                answer_index=index,
                start=start,
                end=end,
                meta={
                    "task": task,
                    **extra_fields(row, ("video", "question", "candidates", "answer", "start", "end")),
                },
            )
            yield where, fields

    return collect_samples(file, root, items(), limit=check_limit(limit), check_videos=check_videos)
