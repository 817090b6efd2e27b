"""The main job's figure: accuracy against visual tokens per method on the held-out scenes
(:func:`plot_scenes`, drawn by :func:`mmeff.bench.scenes.run_scenes_bench`)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from mmeff.eval.plotting import pyplot, save_figure

if TYPE_CHECKING:  # rows are duck-typed here: the bench module imports this one
    from mmeff.bench.scenes import SceneRow

__all__ = ["CHANCE", "plot_scenes"]

#: accuracy of a blind guess: every scene question has 4 options
CHANCE = 0.25


def _point(r: SceneRow, medium: str) -> tuple[float, float, list[float]] | None:
    # (tokens, accuracy %, [down, up] error bar) of a row on one medium, None where it did not run
    x, y = getattr(r, f"{medium}_tokens"), r.accuracy.get(medium)
    if x is None or y is None:
        return None
    lo, hi = r.interval[medium]
    return x, 100 * y, [100 * (y - lo), 100 * (hi - y)]


def plot_scenes(rows: Sequence[SceneRow], path: str | Path) -> Path:
    """Accuracy (%) against visual tokens reaching the LLM per item (log2 axis): one line per method over
    the ratios (starting at the uncompressed point), a panel per medium, Wilson intervals as error bars,
    chance (dashed) and the blank-frame control (dotted)."""
    plt = pyplot()
    media = [m for m in ("image", "video") if any(m in r.accuracy for r in rows)]
    fig, axes = plt.subplots(1, max(1, len(media)), figsize=(6.2 * max(1, len(media)), 4.6), squeeze=False)
    families = list(dict.fromkeys(r.method for r in rows if r.method not in ("none", "blank")))
    colours = {f: plt.get_cmap("tab10")(i % 10) for i, f in enumerate(families)}
    for ax, medium in zip(axes[0], media):
        tok = f"{medium}_tokens"
        none = next((_point(r, medium) for r in rows if r.method == "none"), None)
        for i, fam in enumerate(families):
            pts = [(r.ratio or 0.0, _point(r, medium)) for r in rows if r.method == fam]
            pts = sorted(((ratio, p) for ratio, p in pts if p is not None), key=lambda t: -t[0])
            if not pts:
                continue
            budget = pts[0][0] > 0 and fam != "vistog"
            line = [none, *(p for _, p in pts)] if budget and none is not None else [p for _, p in pts]
            shift = 2 ** (0.025 * (i - len(families) / 2))  # spread coinciding error bars along the log axis
            ax.errorbar([p[0] * shift for p in line], [p[1] for p in line],
                        yerr=np.clip(np.array([p[2] for p in line]).T, 0, None), marker="o" if len(line) > 1 else "s",
                        ms=4, capsize=2, lw=1.2, color=colours[fam], label=fam)
        if none is not None:
            ax.errorbar([none[0]], [none[1]], yerr=np.clip(np.array([none[2]]).T, 0, None), marker="*", ms=11, color="black",
                        capsize=2, ls="none", label="none (uncompressed)", zorder=5)
        blank = next((r.accuracy.get(medium) for r in rows if r.method == "blank"), None)
        if blank is not None:
            ax.axhline(100 * blank, color="black", ls=":", lw=1.2, label=f"blank frames ({100 * blank:.0f}%)")
        ax.axhline(100 * CHANCE, color="grey", ls="--", lw=1, label="chance (25%)")
        xs = sorted({int(round(getattr(r, tok))) for r in rows if getattr(r, tok) is not None})
        ax.set_xscale("log", base=2)
        ax.set_xticks(xs, [str(x) for x in xs])
        ax.minorticks_off()
        ax.set_ylim(0, 100)
        ax.set_xlabel(f"visual tokens reaching the LLM per {medium} question")
        ax.set_ylabel("accuracy (%), 95% Wilson interval")
        n = next((r.n.get(medium) for r in rows if r.method == "none"), None)
        ax.set_title(f"mmeff-mini, held-out {medium} questions (n={n})")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    return save_figure(fig, path)
