"""PNG plots of an α sweep's `summary` table (matplotlib, Agg backend: no display needed).

Every function takes the summary (a pyarrow Table or a list of row dicts with at least
``head, alpha, reward`` and the plotted columns) and an output path, writes the PNG and returns
its path. One line per head; when the rows come from several runs (`run_id`), one line per
(run, head). Rows whose plotted value is null are left out.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import pyarrow as pa  # noqa: E402

from alignheads.models.metrics import KL_LABEL  # noqa: E402

Summary = pa.Table | Sequence[dict[str, Any]]

# head -> colour, fixed so IAV and CALM look the same in every plot
_COLOURS = {"iav": "tab:blue", "calm": "tab:orange", "genarm": "tab:green", "dpo-dera": "tab:red"}
_NAMES = {"iav": "IAV", "calm": "CALM", "genarm": "GenARM", "dpo-dera": "DPO+DeRa"}


def summary_rows(summary: Summary) -> list[dict[str, Any]]:
    """The summary as a list of row dicts."""
    if isinstance(summary, pa.Table):
        return summary.to_pylist()
    return [dict(r) for r in summary]


def _is_num(v: Any) -> bool:
    return v is not None and not (isinstance(v, float) and math.isnan(v))


def _series(rows: list[dict[str, Any]], *cols: str) -> dict[tuple[str, str], list[dict[str, Any]]]:
    """Rows grouped by (run_id, head), sorted by α, keeping rows whose `cols` are all numbers."""
    if not rows:
        raise ValueError("the summary is empty: nothing to plot")
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in rows:
        if all(_is_num(r.get(c)) for c in cols):
            groups.setdefault((str(r.get("run_id") or ""), str(r["head"])), []).append(r)
    return {k: sorted(v, key=lambda r: r["alpha"]) for k, v in sorted(groups.items())}


def _label(run_id: str, head: str, several_runs: bool) -> str:
    name = _NAMES.get(head, head)
    return f"{name} ({run_id[:8]})" if several_runs and run_id else name


_LINESTYLES = ("-", "--", ":", "-.")


def _style(head: str, index: int, run_index: int = 0) -> dict[str, Any]:
    """Colour by head; line style by run when several runs share the plot."""
    colour = _COLOURS.get(head, f"C{(index + 2) % 10}")
    linestyle = _LINESTYLES[run_index % len(_LINESTYLES)]
    return {"color": colour, "marker": "o", "linewidth": 2, "markersize": 6, "linestyle": linestyle}


def _run_index(series: dict[tuple[str, str], list]) -> dict[str, int]:
    return {run: i for i, run in enumerate(sorted({run for run, _ in series}))}


def _finish(fig, ax, path: str | Path, title: str, xlabel: str, ylabel: str, empty: bool) -> Path:
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    if empty:
        ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
    else:
        ax.legend(title="head")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=120)
    plt.close(fig)
    return path


def plot_reward_vs_alpha(summary: Summary, path: str | Path) -> Path:
    """Mean reward against α, one line per head, with ± one standard error (reward_std / √n) when
    the summary has those columns."""
    rows = summary_rows(summary)
    series = _series(rows, "alpha", "reward")
    runs = _run_index(series)
    several = len(runs) > 1
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for i, ((run, head), pts) in enumerate(series.items()):
        xs = [p["alpha"] for p in pts]
        ys = [p["reward"] for p in pts]
        ax.plot(xs, ys, label=_label(run, head, several), **_style(head, i, runs[run]))
        if all(_is_num(p.get("reward_std")) and p.get("n") for p in pts):
            se = [p["reward_std"] / math.sqrt(p["n"]) for p in pts]
            ax.fill_between(
                xs,
                [y - s for y, s in zip(ys, se, strict=True)],
                [y + s for y, s in zip(ys, se, strict=True)],
                color=_style(head, i)["color"],
                alpha=0.15,
                linewidth=0,
            )
    return _finish(fig, ax, path, "Mean reward vs α (band: ±1 s.e.)", "α", "mean reward", not series)


def plot_reward_vs_kl(summary: Summary, path: str | Path) -> Path:
    """The reward–KL frontier: mean reward against the summary's `kl` (per-token KL to the base,
    averaged within each response, then over the responses: `metrics.KL_DEFINITION`), one line
    per head through its α values, each point labelled with its α."""
    rows = summary_rows(summary)
    series = _series(rows, "alpha", "reward", "kl")
    runs = _run_index(series)
    several = len(runs) > 1
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for i, ((run, head), pts) in enumerate(series.items()):
        pts = sorted(pts, key=lambda p: (p["kl"], p["alpha"]))
        xs = [p["kl"] for p in pts]
        ys = [p["reward"] for p in pts]
        style = _style(head, i, runs[run])
        ax.plot(xs, ys, label=_label(run, head, several), **style)
        for p in pts:
            ax.annotate(
                f"α={p['alpha']:g}",
                (p["kl"], p["reward"]),
                textcoords="offset points",
                xytext=(5, 5),
                fontsize=8,
                color=style["color"],
            )
    return _finish(
        fig, ax, path, "Reward vs KL to the base (points: α)", KL_LABEL, "mean reward",
        not series,
    )  # fmt: skip


def plot_win_rate_vs_alpha(summary: Summary, path: str | Path) -> Path:
    """Win rate against α = 0 (same prompt and seed) vs α, one line per head, with the tie and
    lose rates' complement left implicit; a dashed line marks 0.5. α = 0 itself has no win rate."""
    rows = summary_rows(summary)
    series = _series(rows, "alpha", "win_rate")
    runs = _run_index(series)
    several = len(runs) > 1
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    ax.axhline(0.5, color="grey", linestyle="--", linewidth=1, label="0.5 (even)")
    for i, ((run, head), pts) in enumerate(series.items()):
        ax.plot(
            [p["alpha"] for p in pts],
            [p["win_rate"] for p in pts],
            label=_label(run, head, several),
            **_style(head, i, runs[run]),
        )
    ax.set_ylim(-0.02, 1.02)
    alphas = [p["alpha"] for pts in series.values() for p in pts]
    if alphas:  # start the axis at α = 0, the baseline every point is compared with
        lo, hi = min(0.0, *alphas), max(0.0, *alphas)
        pad = 0.05 * (hi - lo) or 0.05
        ax.set_xlim(lo - pad, hi + pad)
    return _finish(fig, ax, path, "Win rate vs α = 0 (same prompt and seed)", "α", "win rate", not series)


PLOTS = {
    "reward_vs_alpha": plot_reward_vs_alpha,
    "reward_vs_kl": plot_reward_vs_kl,
    "win_rate_vs_alpha": plot_win_rate_vs_alpha,
}


def save_summary_plots(summary: Summary, out_dir: str | Path) -> dict[str, Path]:
    """All three plots as `<out_dir>/<name>.png`; returns {name: path}."""
    out = Path(out_dir)
    return {name: fn(summary, out / f"{name}.png") for name, fn in PLOTS.items()}
