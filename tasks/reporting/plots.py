"""PNG plots of an α sweep's `summary` table (matplotlib, Agg backend: no display needed).

Every function takes the summary (a pyarrow Table or a list of row dicts with at least
``head, alpha, reward`` and the plotted columns) and an output path, writes the PNG and returns
its path. One line per method; when the rows come from several runs (`run_id`), one line per
(run, method). Rows whose plotted value is null are left out. Where the summary has the
evaluate stage's 95 % bootstrap intervals (``reward_lo/hi``, ``kl_lo/hi``, ``win_rate_lo/hi``)
they are drawn as bands or error bars, and the titles say how many prompts and samples each
point averages. `plot_paired_differences` draws the `comparisons` table.
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


def _counts(rows: list[dict[str, Any]]) -> str:
    """' (N prompts × S samples per point)' from the summary's counts, '' without them."""
    pairs = {(r.get("n_prompts"), r.get("n_samples")) for r in rows if r.get("n_prompts")}
    if len(pairs) != 1:
        return ""
    n, k = pairs.pop()
    return f"\n{n} prompts × {k} sample{'s' if k != 1 else ''} per point"


def _has(pts: list[dict[str, Any]], *cols: str) -> bool:
    return bool(pts) and all(_is_num(p.get(c)) for p in pts for c in cols)


def _finish(fig, ax, path: str | Path, title: str, xlabel: str, ylabel: str, empty: bool) -> Path:
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    if empty:
        ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
    else:
        ax.legend(title="method", fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=120)
    plt.close(fig)
    return path


def plot_reward_vs_alpha(summary: Summary, path: str | Path) -> Path:
    """Mean reward against α, one line per method, with its 95 % interval as a band (± one
    standard error, reward_std / √n, for summaries without intervals)."""
    rows = summary_rows(summary)
    series = _series(rows, "alpha", "reward")
    runs = _run_index(series)
    several = len(runs) > 1
    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    band = "95 % interval"
    for i, ((run, head), pts) in enumerate(series.items()):
        xs = [p["alpha"] for p in pts]
        ys = [p["reward"] for p in pts]
        ax.plot(xs, ys, label=_label(run, head, several), **_style(head, i, runs[run]))
        if _has(pts, "reward_lo", "reward_hi"):
            lo, hi = [p["reward_lo"] for p in pts], [p["reward_hi"] for p in pts]
        elif all(_is_num(p.get("reward_std")) and p.get("n") for p in pts):
            band = "±1 s.e."
            se = [p["reward_std"] / math.sqrt(p["n"]) for p in pts]
            lo = [y - e for y, e in zip(ys, se, strict=True)]
            hi = [y + e for y, e in zip(ys, se, strict=True)]
        else:
            continue
        ax.fill_between(xs, lo, hi, color=_style(head, i)["color"], alpha=0.15, linewidth=0)
    title = f"Mean reward vs α (band: {band}){_counts(rows)}"
    return _finish(fig, ax, path, title, "α", "mean reward", not series)


def _errors(pts: list[dict[str, Any]], col: str) -> list[list[float]] | None:
    """Matplotlib's asymmetric error bars ``[[below...], [above...]]`` from `col`_lo/_hi."""
    if not _has(pts, f"{col}_lo", f"{col}_hi"):
        return None
    return [
        [max(p[col] - p[f"{col}_lo"], 0.0) for p in pts],
        [max(p[f"{col}_hi"] - p[col], 0.0) for p in pts],
    ]


def plot_reward_vs_kl(
    summary: Summary, path: str | Path, calibrated: Sequence[dict[str, Any]] = ()
) -> Path:
    """The reward–KL frontier: mean reward against the summary's `kl` (per-token KL to the base,
    averaged within each response, then over the responses: `metrics.KL_DEFINITION`), one line
    per method through its α values, with 95 % error bars on both axes. The points calibrated to
    the target KLs (`calibrated` rows) are marked with stars and dotted lines at the targets;
    the sweep's grid points carry their α (staggered so neighbours do not overlap)."""
    rows = summary_rows(summary)
    series = _series(rows, "alpha", "reward", "kl")
    runs = _run_index(series)
    several = len(runs) > 1
    chosen = {(str(c["head"]), float(c["alpha"])) for c in calibrated}
    fig, ax = plt.subplots(figsize=(7.0, 5.0))
    for target in sorted({float(c["target_kl"]) for c in calibrated}):
        ax.axvline(target, color="grey", linestyle=":", linewidth=1)
    for i, ((run, head), pts) in enumerate(series.items()):
        pts = sorted(pts, key=lambda p: (p["kl"], p["alpha"]))
        xs = [p["kl"] for p in pts]
        ys = [p["reward"] for p in pts]
        style = _style(head, i, runs[run])
        ax.plot(xs, ys, label=_label(run, head, several), **style)
        xerr, yerr = _errors(pts, "kl"), _errors(pts, "reward")
        if xerr or yerr:
            ax.errorbar(xs, ys, xerr=xerr, yerr=yerr, fmt="none", ecolor=style["color"], alpha=0.5, capsize=2)
        stars = [p for p in pts if (head, float(p["alpha"])) in chosen]
        if stars:
            ax.plot([p["kl"] for p in stars], [p["reward"] for p in stars], linestyle="none", marker="*",
                    markersize=14, color=style["color"], markeredgecolor="black")  # fmt: skip
        for j, p in enumerate(q for q in pts if (head, float(q["alpha"])) not in chosen):
            ax.annotate(
                f"α={p['alpha']:g}",
                (p["kl"], p["reward"]),
                textcoords="offset points",
                xytext=(6, 6 + 10 * ((i + j) % 3) - 10),
                fontsize=7,
                color=style["color"],
            )
    title = "Reward vs KL to the base (bars: 95 % intervals; ★ calibrated to a target KL)" + _counts(rows)
    return _finish(fig, ax, path, title, KL_LABEL, "mean reward", not series)


def plot_win_rate_vs_alpha(summary: Summary, path: str | Path) -> Path:
    """Win rate against α = 0 (same prompt and seed) vs α, one line per method with 95 % error
    bars; a dashed line marks 0.5. α = 0 itself has no win rate."""
    rows = summary_rows(summary)
    series = _series(rows, "alpha", "win_rate")
    runs = _run_index(series)
    several = len(runs) > 1
    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    ax.axhline(0.5, color="grey", linestyle="--", linewidth=1, label="0.5 (even)")
    for i, ((run, head), pts) in enumerate(series.items()):
        xs, ys = [p["alpha"] for p in pts], [p["win_rate"] for p in pts]
        style = _style(head, i, runs[run])
        ax.plot(xs, ys, label=_label(run, head, several), **style)
        yerr = _errors(pts, "win_rate")
        if yerr:
            ax.errorbar(xs, ys, yerr=yerr, fmt="none", ecolor=style["color"], alpha=0.5, capsize=2)
    ax.set_ylim(-0.02, 1.02)
    alphas = [p["alpha"] for pts in series.values() for p in pts]
    if alphas:  # start the axis at α = 0, the baseline every point is compared with
        lo, hi = min(0.0, *alphas), max(0.0, *alphas)
        pad = 0.05 * (hi - lo) or 0.05
        ax.set_xlim(lo - pad, hi + pad)
    title = "Win rate vs α = 0 (same prompt and seed; bars: 95 % intervals)" + _counts(rows)
    return _finish(fig, ax, path, title, "α", "win rate", not series)


def strongest_baseline(calibrated: Sequence[dict[str, Any]], baselines: Sequence[str]) -> str | None:
    """The baseline with the highest mean reward over the target KLs (None without baselines)."""
    scores: dict[str, list[float]] = {}
    for c in calibrated:
        if c["head"] in baselines and _is_num(c.get("reward")):
            scores.setdefault(c["head"], []).append(float(c["reward"]))
    if not scores:
        return None
    return max(sorted(scores), key=lambda h: sum(scores[h]) / len(scores[h]))


def plot_paired_differences(
    comparisons: Sequence[dict[str, Any]], calibrated: Sequence[dict[str, Any]], path: str | Path,
    baselines: Sequence[str] = ("genarm", "dpo-dera"),
) -> Path:  # fmt: skip
    """Each other method's reward minus the strongest baseline's (`strongest_baseline`) at each
    target KL, with its paired 95 % interval (the `comparisons` rows); 0 dashed."""
    ref = strongest_baseline(calibrated, baselines)
    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    ax.axhline(0.0, color="grey", linestyle="--", linewidth=1)
    lines: dict[str, list[tuple[float, float, float, float]]] = {}
    for r in comparisons if ref else ():
        if r["head_b"] == ref and r["head_a"] != ref:
            other, sign = r["head_a"], 1.0
        elif r["head_a"] == ref and r["head_b"] not in (ref, "α=0"):
            other, sign = r["head_b"], -1.0
        else:
            continue
        d, lo, hi = (sign * r["reward_diff"], sign * (r["diff_lo"] if sign > 0 else r["diff_hi"]),
                     sign * (r["diff_hi"] if sign > 0 else r["diff_lo"]))  # fmt: skip
        lines.setdefault(other, []).append((r["target_kl"], d, lo, hi))
    for i, (head, pts) in enumerate(sorted(lines.items())):
        pts.sort()
        shift = 0.002 * (i - (len(lines) - 1) / 2)  # side by side at each target
        xs, ys = [p[0] + shift for p in pts], [p[1] for p in pts]
        style = _style(head, i)
        ax.errorbar(xs, ys, yerr=[[p[1] - p[2] for p in pts], [p[3] - p[1] for p in pts]], label=_NAMES.get(head, head),
                    color=style["color"], marker="o", capsize=3, linewidth=1.5)  # fmt: skip
    name = _NAMES.get(ref, ref) if ref else "the strongest baseline"
    n = {r["n_prompts"] for r in comparisons}
    title = f"Reward minus {name}'s at matched KL (paired 95 % intervals)" + (
        f"\n{n.pop()} prompts, same seeds" if len(n) == 1 else ""
    )
    return _finish(fig, ax, path, title, "target KL to the base", f"reward − {name}", not lines)


PLOTS = {
    "reward_vs_alpha": plot_reward_vs_alpha,
    "reward_vs_kl": plot_reward_vs_kl,
    "win_rate_vs_alpha": plot_win_rate_vs_alpha,
}


def save_summary_plots(
    summary: Summary,
    out_dir: str | Path,
    calibrated: Sequence[dict[str, Any]] = (),
    comparisons: Sequence[dict[str, Any]] = (),
) -> dict[str, Path]:
    """The three summary plots as `<out_dir>/<name>.png` (the frontier marking the `calibrated`
    points), plus `paired_differences.png` when there are `comparisons`; returns {name: path}."""
    out = Path(out_dir)
    paths = {
        "reward_vs_alpha": plot_reward_vs_alpha(summary, out / "reward_vs_alpha.png"),
        "reward_vs_kl": plot_reward_vs_kl(summary, out / "reward_vs_kl.png", calibrated),
        "win_rate_vs_alpha": plot_win_rate_vs_alpha(summary, out / "win_rate_vs_alpha.png"),
    }
    if comparisons:
        paths["paired_differences"] = plot_paired_differences(
            comparisons, calibrated, out / "paired_differences.png"
        )
    return paths
