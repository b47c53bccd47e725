"""Pareto fronts of a dial sweep: which α vectors no other vector beats on two objectives at once,
and a PNG per pair of objectives (matplotlib, Agg backend) with 95 % intervals on both axes.

Both objectives are maximised. A point is dominated when another point is at least as good on
both objectives and strictly better on one; the front is the points nobody dominates.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402

from alignheads.tasks.dial_set import BASE_LABEL  # noqa: E402

_MARKERS = {"heads": "o", "genarm": "s"}
_NAMES = {"heads": "dials (heads, 1 forward)", "genarm": "multi-objective GenARM (K+1 forwards)"}


def dominates(a: tuple[float, float], b: tuple[float, float]) -> bool:
    """Whether `a` is at least as good as `b` on both objectives and better on one."""
    return a[0] >= b[0] and a[1] >= b[1] and (a[0] > b[0] or a[1] > b[1])


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point dominates, ordered by the first objective."""
    front = [i for i, p in enumerate(points) if not any(dominates(q, p) for j, q in enumerate(points) if j != i)]
    return sorted(front, key=lambda i: (points[i][0], -points[i][1]))


def beyond_singles(rows: Sequence[dict[str, Any]], a: str, b: str, dials: dict[str, str]) -> list[dict[str, Any]]:
    """For each α vector turning on the dials of objectives `a` and `b` together (and no other),
    whether its point is dominated by no vector that turns on only one of them (alone, at any
    strength): the combination reaches what neither dial alone reaches. `rows`: one method's
    dial_summary rows; `dials`: dial -> objective."""
    def active(row: dict[str, Any]) -> set[str]:
        return {d for d in dials if row.get(f"alpha_{d}")}

    of = {d for d, o in dials.items() if o in (a, b)}
    singles = [r for r in rows if len(active(r)) == 1 and active(r) <= of]
    out = []
    for r in rows:
        on = active(r)
        if len(on) < 2 or not on <= of or {dials[d] for d in on} != {a, b}:
            continue
        point = (r[a], r[b])
        beaten = [s["alpha_vector"] for s in singles if s[a] >= point[0] and s[b] >= point[1]]
        out.append({"alpha_vector": r["alpha_vector"], a: point[0], b: point[1], "beyond_singles": not beaten, "dominated_by": beaten})
    return out


def _err(row: dict[str, Any], name: str) -> tuple[float, float]:
    lo, hi, mean = row.get(f"{name}_lo"), row.get(f"{name}_hi"), row[name]
    if lo is None or hi is None or not (math.isfinite(lo) and math.isfinite(hi)):
        return 0.0, 0.0
    return mean - lo, hi - mean


def plot_pareto(rows: Sequence[dict[str, Any]], a: str, b: str, path: Path) -> Path:
    """One PNG: every (method, α vector) of the dial summary at (mean `a`, mean `b`) with its
    intervals as error bars, each method's Pareto front as a line, the vectors labelled."""
    fig, ax = plt.subplots(figsize=(7.5, 6))
    methods = sorted({r["method"] for r in rows})
    for k, method in enumerate(methods):
        members = [r for r in rows if r["method"] == method]
        colour = f"C{k}"
        xs, ys = [r[a] for r in members], [r[b] for r in members]
        xerr = list(zip(*(_err(r, a) for r in members), strict=True))
        yerr = list(zip(*(_err(r, b) for r in members), strict=True))
        ax.errorbar(xs, ys, xerr=xerr, yerr=yerr, fmt=_MARKERS.get(method, "^"), color=colour,
                    ecolor=colour, alpha=0.8, capsize=2, label=_NAMES.get(method, method))  # fmt: skip
        front = pareto_front(list(zip(xs, ys, strict=True)))
        ax.plot([xs[i] for i in front], [ys[i] for i in front], "-", color=colour, alpha=0.5, linewidth=1.5)
        for r, x, y in zip(members, xs, ys, strict=True):
            label = "α=0" if r["alpha_vector"] == BASE_LABEL else r["alpha_vector"]
            ax.annotate(label, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7, color=colour)
    sizes = {(r.get("n_prompts"), r.get("n_samples")) for r in rows}
    counts = ""
    if len(sizes) == 1:
        prompts, samples = sizes.pop()
        counts = f" ({prompts} prompts × {samples} samples per point)"
    ax.set_xlabel(f"{a} (mean term, 95 % interval)")
    ax.set_ylabel(f"{b} (mean term, 95 % interval)")
    ax.set_title(f"Pareto front: {a} vs {b}{counts}", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(title="method", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def save_pareto_plots(rows: Sequence[dict[str, Any]], objectives: Sequence[str], directory: Path) -> dict[str, Path]:
    """`pareto_<a>_<b>.png` for every pair of objectives; name -> path."""
    out = {}
    for a, b in itertools.combinations(objectives, 2):
        name = f"pareto_{a}_{b}"
        out[name] = plot_pareto(rows, a, b, Path(directory) / f"{name}.png")
    return out
