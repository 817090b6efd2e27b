"""Results files of a video-QA run and their report.

One JSON line per sample, fsynced as it is written; a torn last line (a crash mid-write) is dropped on
resume; shards (``RANK`` / ``WORLD_SIZE``) write ``<out>.rank<r>-of-<w>.jsonl`` and :func:`merge_results`
joins them; files are replaced atomically; rows carry the run's configuration so two runs never mix.
:class:`EvalReport` aggregates the records and :func:`format_report` prints it.
"""

from __future__ import annotations

import json
import math
import os
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "EvalReport",
    "append_record",
    "config_mismatch",
    "config_text",
    "format_report",
    "load_results",
    "load_rows",
    "merge_results",
    "report_from_records",
    "resolve_shard",
    "shard_path",
    "write_atomic",
]


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
    return [rec for _, rec in load_rows(path, repair=repair)]


def load_rows(path: str | Path, *, repair: bool = False) -> list[tuple[int, dict[str, Any]]]:
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


def write_atomic(path: Path, records: Sequence[dict[str, Any]]) -> None:
    """Replace ``path`` by ``records`` so that a crash leaves either the old or the new file, never half."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for rec in records:
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def config_text(config: Any) -> str:
    """Canonical JSON of a run configuration (sorted keys), for comparing and quoting configs."""
    return json.dumps(config, sort_keys=True, ensure_ascii=False)


def config_mismatch(where: str, theirs: Any, mine: Any, mine_name: str, hint: str) -> ValueError:
    """One-line error for a row written under another run configuration than ``mine``."""
    if isinstance(theirs, dict) and isinstance(mine, dict):
        keys = sorted(k for k in set(theirs) | set(mine) if theirs.get(k) != mine.get(k))
        differ = f" (differs in {', '.join(keys)})"
    else:
        differ = ""
    return ValueError(
        f"{where} comes from another run configuration{differ}: its config {config_text(theirs)}, "
        f"{mine_name} {config_text(mine)}; {hint}"
    )


def append_record(f: Any, record: dict[str, Any]) -> None:
    """Write ``record`` as one JSON line to the open file ``f`` and fsync it, so a crash loses nothing."""
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
        for line, rec in load_rows(shard):
            rid = str(rec["id"])
            if rid in seen:
                raise ValueError(f"cannot merge {out}: sample id {rid!r} is in shard {seen[rid]} and shard {r}")
            if first is None:
                first = (f"{shard} line {line}", rec.get("config"))
            elif rec.get("config") != first[1]:
                raise config_mismatch(f"cannot merge {out}: {shard} line {line}", rec.get("config"), first[1],
                                       f"{first[0]} has", "rerun the shards under one configuration")
            seen[rid] = r
            records.append(rec)
    if expected_ids is not None:
        lacking = [i for i in expected_ids if str(i) not in seen]
        if lacking:
            raise ValueError(f"cannot merge {out}: {len(lacking)} sample(s) have no result, e.g. {lacking[:5]}")
    # "index" is the sample's position in the full list, so the order matches a single-process run
    records.sort(key=lambda rec: (rec.get("index", math.inf), str(rec["id"])))
    write_atomic(out, records)
    return records


# ---------------------------------------------------------------------------------------------------
# Report
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
