"""``mmeff report``: bench and eval JSON files -> plots (accuracy and latency against visual tokens) and a
markdown table.

Every JSON that mmeff writes can be read: the main job's ``scenes.json``, ``mmeff bench tokens --json``,
``mmeff eval videoqa --json`` (one file per method: give several), and the other suites' files (SepLLM,
FlatQuant, ToMe, VisToG, ...). Rows that carry visual tokens together with an accuracy or a latency become
points (one series per file and medium); every file also gets a markdown table of its rows' numbers, so
nothing a file holds is left out of the report.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmeff.eval.plotting import pyplot, save_figure

__all__ = ["ReportPoint", "ReportFile", "read_report_file", "markdown_table", "plot_points", "write_report"]


@dataclass
class ReportPoint:
    """One method on one medium: ``tokens`` reaching the LLM, ``accuracy`` (0-1) and ``latency_ms``
    (prefill, or per sample for eval files), either of which may be missing."""

    source: str
    method: str
    medium: str
    tokens: float
    accuracy: float | None = None
    latency_ms: float | None = None
    quality_name: str = "accuracy"


@dataclass
class ReportFile:
    """A parsed JSON: its ``kind``, table ``rows`` (flat dicts of scalars) and plottable ``points``."""

    path: Path
    label: str
    kind: str
    rows: list[dict[str, Any]]
    points: list[ReportPoint] = field(default_factory=list)


def _num(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return None if math.isnan(float(v)) else float(v)


def _flat(row: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Scalars of ``row`` first, then one level of nested dicts as ``outer.inner`` (so a wide nest such as
    accuracy per kind does not push the row's own numbers out of the table); lists and deeper nests are
    left out."""
    out: dict[str, Any] = {}
    for k, v in row.items():
        if isinstance(v, (str, int, float, bool)) or v is None:
            out[f"{prefix}{k}"] = v
    if not prefix:
        for k, v in row.items():
            if isinstance(v, dict):
                out.update(_flat(v, f"{k}."))
    return out


def _rows_of(data: Any) -> list[dict[str, Any]]:
    if isinstance(data, list):
        return [r for r in data if isinstance(r, dict)]
    if isinstance(data, dict):
        for key in ("rows", "results"):
            if isinstance(data.get(key), list):
                return [r for r in data[key] if isinstance(r, dict)]
        return [data]
    raise ValueError("expected a JSON object or list")


def read_report_file(path: str | Path, label: str | None = None) -> ReportFile:
    """Parse one mmeff JSON file. Raises ``ValueError`` naming the file when it is not JSON or holds no
    rows."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"no such file: {path}")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not JSON ({e})") from None
    rows = _rows_of(data)
    if not rows:
        raise ValueError(f"{path} holds no result rows")
    label = label or path.stem
    points: list[ReportPoint] = []
    first = rows[0]
    if "image_tokens" in first or "video_tokens" in first:  # the main job's scenes.json
        kind = "scenes"
        for r in rows:
            acc = r.get("accuracy") or {}
            for medium in ("image", "video"):
                tok = _num(r.get(f"{medium}_tokens"))
                if tok is not None:
                    points.append(ReportPoint(label, r["method"], medium, tok, _num(acc.get(medium)),
                                              _num(r.get(f"{medium}_prefill_ms"))))
    elif "visual_tokens_mean" in first:  # mmeff eval videoqa --json
        kind = "eval"
        for r in rows:
            lat = _num(r.get("latency_mean_s"))
            # one file per method: files of one model form one series (the latency is a whole answer's)
            source = f"eval {r['model']}" if r.get("model") else label
            points.append(ReportPoint(source, str(r.get("method") or label), "video, per answer",
                                      _num(r.get("visual_tokens_mean")) or 0.0, _num(r.get("accuracy")),
                                      None if lat is None else lat * 1e3))
    elif "visual_tokens" in first:  # mmeff bench tokens, bench vistog, ...
        kind = "tokens"
        for r in rows:
            quality = _num(r.get("accuracy"))
            name = "accuracy"
            if quality is None and _num(r.get("token_agreement")) is not None:
                quality, name = _num(r.get("token_agreement")), "agreement with uncompressed"
            points.append(ReportPoint(label, str(r.get("method")), str(r.get("media") or r.get("model") or "image"),
                                      float(r["visual_tokens"]), quality, _num(r.get("prefill_ms")), name))
    else:
        kind = "table"
    return ReportFile(path, label, kind, [_flat(r) for r in rows], points)


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e5 else f"{v:.3e}"
    return str(v).replace("|", "\\|").replace("\n", " ")


def markdown_table(rows: list[dict[str, Any]], max_columns: int = 20) -> str:
    """Rows of scalars as a markdown table (columns in first-seen order; the first ``max_columns``)."""
    cols: list[str] = []
    for r in rows:
        cols += [k for k in r if k not in cols]
    cols = cols[:max_columns]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def plot_points(points: list[ReportPoint], y: str, path: str | Path) -> Path | None:
    """``y`` (``"accuracy"`` or ``"latency_ms"``) against visual tokens: one colour per method (the same in
    both plots), one marker per source and medium. Points at one token count whose values are within 3%
    of the y range are spread sideways by a few pixels (their values are unchanged) so none hides another.
    Returns ``None`` when no point has ``y``."""
    from matplotlib.lines import Line2D
    from matplotlib.transforms import offset_copy

    pts = [p for p in points if getattr(p, y) is not None]
    if not pts:
        return None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8.5, 4.8))
    # colours follow every point's method (not only those plotted here), so the two plots agree
    methods = list(dict.fromkeys(p.method for p in points))
    colours = {m: plt.get_cmap("tab10" if len(methods) <= 10 else "tab20")(i % 20) for i, m in enumerate(methods)}
    series = list(dict.fromkeys((p.source, p.medium) for p in pts))
    markers = {s: "osD^vP*Xhp"[i % 10] for i, s in enumerate(series)}
    scale = 100.0 if y == "accuracy" else 1.0
    values = [getattr(p, y) * scale for p in pts]
    near = 0.03 * ((max(values) - min(values)) or 1.0)  # closer than 3% of the y range overlaps on the page
    clusters: list[list[tuple[float, ReportPoint]]] = []
    for v, p in sorted(zip(values, pts), key=lambda vp: (vp[1].tokens, vp[0])):
        last = clusters[-1] if clusters else None
        if last and last[-1][1].tokens == p.tokens and v - last[-1][0] <= near:
            last.append((v, p))
        else:
            clusters.append([(v, p)])
    for cluster in clusters:
        for i, (v, p) in enumerate(cluster):
            dx = 7.0 * (i - (len(cluster) - 1) / 2)
            ax.plot([p.tokens], [v], ls="none", marker=markers[(p.source, p.medium)], ms=7, mec="black", mew=0.5,
                    color=colours[p.method], transform=offset_copy(ax.transData, fig=fig, x=dx, y=0, units="points"))
    xs = [p.tokens for p in pts]
    if min(xs) > 0 and max(xs) / min(xs) >= 8:  # token budgets are ratios: 16, 64, 256 read evenly on log 2
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_formatter(plt.FuncFormatter(lambda v, _: f"{v:g}"))
    # the offset transforms keep the points out of the data limits: set those from the values
    ax.update_datalim([(p.tokens, v) for v, p in zip(values, pts)])
    ax.margins(x=0.08, y=0.1)
    ax.autoscale_view()
    names = {p.quality_name for p in pts} if y == "accuracy" else set()
    ax.set_xlabel("visual tokens reaching the LLM")
    ax.set_ylabel(f"{' / '.join(sorted(names))} (%)" if y == "accuracy" else "latency (ms)")
    ax.set_title(("quality" if y == "accuracy" else "latency") + " against visual tokens")
    shown = list(dict.fromkeys(p.method for p in pts))
    handles = [Line2D([], [], ls="none", marker="s", ms=7, color=colours[m], label=m[:40]) for m in shown]
    handles += [Line2D([], [], ls="none", marker=markers[s], ms=7, color="white", mec="black", label=f"{s[0]} ({s[1]})")
                for s in series]
    ax.legend(handles=handles, fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    return save_figure(fig, path)


def write_report(paths: list[str | Path], out_dir: str | Path, title: str = "mmeff report") -> dict[str, Path]:
    """Read ``paths``, write ``accuracy_vs_tokens.png`` / ``latency_vs_tokens.png`` (when the files hold such
    points) and ``report.md`` (the plots and one table per file) under ``out_dir``. Returns what was
    written, by name."""
    if not paths:
        raise ValueError("give at least one JSON file")
    files = [read_report_file(p) for p in paths]
    labels = [f.label for f in files]
    for f in files:  # two files with one stem (bench_a/scenes.json, bench_b/scenes.json) keep their folder
        if labels.count(f.label) > 1:
            old, f.label = f.label, f"{f.path.parent.name}/{f.path.stem}"
            for p in f.points:  # eval files name their series by model, not by file: those stay
                if p.source == old:
                    p.source = f.label
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    points = [p for f in files for p in f.points]
    written: dict[str, Path] = {}
    for y, name in (("accuracy", "accuracy_vs_tokens.png"), ("latency_ms", "latency_vs_tokens.png")):
        png = plot_points(points, y, out / name)
        if png is not None:
            written[name] = png
    md = [f"# {title}", ""]
    md += [f"![{n}]({n})" for n in written] + ([""] if written else [])
    if points:
        md += ["## Points plotted", "",
               markdown_table([{"source": p.source, "method": p.method, "medium": p.medium, "visual tokens": p.tokens,
                                p.quality_name: p.accuracy, "latency ms": p.latency_ms} for p in points]), ""]
    for f in files:
        md += [f"## {f.label} ({f.kind}: `{f.path}`)", "", markdown_table(f.rows), ""]
    (out / "report.md").write_text("\n".join(md))
    written["report.md"] = out / "report.md"
    return written
