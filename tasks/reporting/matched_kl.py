"""Each method's reward at matched KL, and its decoding cost: the comparison table of the sweep.

A method's α sweep traces a path through (KL, reward) space: KL(π_α ‖ π_base) per token, mean over responses (the summary's `kl`)
against mean reward, one point per α. Comparing methods at the same α says little (their dials
mean different things); comparing them at the same KL to the base does.

α = 0 is the base, and a sweep that also runs through negative α moves away from it in two
directions, so its path has two branches: the positive one (α ≥ 0) and the negative one
(α ≤ 0; α = 0 belongs to both). Each branch is read on its own, walking outward from α = 0
(α increasing on the positive branch, decreasing on the negative one). For a KL level `k`
the reward is the first arrival at `k` along that walk: a sweep point whose KL is `k`, or the
linear interpolation (in α and in reward) inside the first segment between consecutive sweep
points whose KLs bracket `k`, whichever comes first. It is the reward a user gets by turning
the dial from 0 until the model has moved `k` nats per token from the base. The table reports
the positive branch unless asked for the negative one (``branch="negative"``).

The levels are spread evenly over the KL range every method reaches on the branch (from the
largest of the methods' smallest KLs to the smallest of their largest), so each level is an
interpolation, never an extrapolation. A method with no sweep point on the branch has no rows.

Decoding cost, as stated in the table: LM forward passes per generated token (structural: 1
for the heads, whose extra work is one output-layer-sized matmul; 2 for GenARM and DeRa, which
run the base and a fine-tuned copy), plus the measured decoding time per generated token (wall
clock on the machine that built the generation artifacts; the pipeline reports each method's
fastest α, the one least slowed by other load, and it stays noisy on shared CPUs).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa

__all__ = [
    "BRANCHES",
    "MATCHED_KL_SCHEMA",
    "Branch",
    "common_kl_range",
    "kl_levels",
    "matched_kl_markdown",
    "matched_kl_rows",
    "reward_at_kl",
    "save_matched_kl",
]

MATCHED_KL_SCHEMA = pa.schema(
    [
        ("head", pa.string()),
        ("kl", pa.float64()),
        ("reward", pa.float64()),
        ("alpha", pa.float64()),
        ("lm_forwards_per_token", pa.int64()),
        ("ms_per_token", pa.float64()),
    ]
)


Branch = Literal["positive", "negative"]
BRANCHES: tuple[Branch, ...] = ("positive", "negative")


def _num(v: Any) -> bool:
    return v is not None and not (isinstance(v, float) and math.isnan(v))


def _branch_walk(
    points: Sequence[tuple[float, float, float]], branch: Branch
) -> list[tuple[float, float, float]]:
    """The points of ``branch`` in walking order, outward from α = 0: α ≥ 0 increasing
    (positive) or α ≤ 0 decreasing (negative)."""
    if branch == "positive":
        return sorted(p for p in points if p[0] >= 0)
    if branch == "negative":
        return sorted((p for p in points if p[0] <= 0), key=lambda p: p[0], reverse=True)
    raise ValueError(f"branch must be one of {BRANCHES}, got {branch!r}")


def reward_at_kl(
    points: Sequence[tuple[float, float, float]], level: float, branch: Branch = "positive"
) -> tuple[float, float] | None:
    """(reward, α) where the path of ``points`` = (α, KL, reward) first reaches KL ``level``,
    walking ``branch`` outward from α = 0: ``"positive"`` (default) walks α ≥ 0 upwards,
    ``"negative"`` walks α ≤ 0 downwards. The first arrival wins, whether it is a sweep point
    with that KL (returned as is) or a crossing inside a segment (reward and α interpolated
    linearly); a later exact match never beats an earlier crossing. None if the branch never
    reaches ``level``."""
    walk = _branch_walk(points, branch)
    for i, (a0, k0, r0) in enumerate(walk):
        if k0 == level:
            return r0, a0
        if i + 1 < len(walk):
            a1, k1, r1 = walk[i + 1]
            if min(k0, k1) < level < max(k0, k1):
                t = (level - k0) / (k1 - k0)
                return r0 + t * (r1 - r0), a0 + t * (a1 - a0)
    return None


def _paths(
    summary: Sequence[dict[str, Any]], branch: Branch = "positive"
) -> dict[str, list[tuple[float, float, float]]]:
    """Each head's (α, KL, reward) points on ``branch``, in walking order (heads without any
    are left out)."""
    paths: dict[str, list[tuple[float, float, float]]] = {}
    for r in summary:
        if _num(r.get("kl")) and _num(r.get("reward")):
            paths.setdefault(str(r["head"]), []).append(
                (float(r["alpha"]), float(r["kl"]), float(r["reward"]))
            )
    walks = {head: _branch_walk(p, branch) for head, p in sorted(paths.items())}
    return {head: w for head, w in walks.items() if w}


def common_kl_range(
    summary: Sequence[dict[str, Any]], branch: Branch = "positive"
) -> tuple[float, float] | None:
    """(lo, hi): the KL interval every head's sweep spans on ``branch``; None when they do not
    overlap."""
    paths = _paths(summary, branch)
    if not paths:
        return None
    lo = max(min(k for _, k, _ in p) for p in paths.values())
    hi = min(max(k for _, k, _ in p) for p in paths.values())
    return (lo, hi) if lo <= hi else None


def kl_levels(summary: Sequence[dict[str, Any]], n: int = 3, branch: Branch = "positive") -> list[float]:
    """``n`` KL levels evenly inside the common range on ``branch`` (its ends excluded; rounded
    to 4 places)."""
    span = common_kl_range(summary, branch)
    if span is None:
        return []
    lo, hi = span
    if hi == lo:
        return [round(lo, 4)]
    return [round(lo + (hi - lo) * (i + 1) / (n + 1), 4) for i in range(n)]


def matched_kl_rows(
    summary: Sequence[dict[str, Any]],
    costs: dict[str, dict[str, float | None]] | None = None,
    levels: Sequence[float] | None = None,
    branch: Branch = "positive",
) -> list[dict[str, Any]]:
    """One row per (head, KL level): the interpolated reward and α on ``branch`` (``"positive"``,
    the default, or ``"negative"``; see :func:`reward_at_kl`), and the head's decoding cost
    (``costs[head]``: ``lm_forwards_per_token``, ``ms_per_token``; missing entries stay null).
    ``levels`` defaults to :func:`kl_levels` on the same branch; heads without a sweep point
    on the branch get no rows."""
    levels = kl_levels(summary, branch=branch) if levels is None else list(levels)
    rows = []
    for head, path in _paths(summary, branch).items():
        cost = (costs or {}).get(head, {})
        for level in levels:
            hit = reward_at_kl(path, level, branch)
            rows.append(
                {
                    "head": head,
                    "kl": float(level),
                    "reward": None if hit is None else hit[0],
                    "alpha": None if hit is None else hit[1],
                    "lm_forwards_per_token": cost.get("lm_forwards_per_token"),
                    "ms_per_token": cost.get("ms_per_token"),
                }
            )
    return rows


def matched_kl_markdown(rows: Sequence[dict[str, Any]]) -> str:
    """A GitHub markdown table: one row per head, one reward column per KL level, then cost."""
    levels = sorted({r["kl"] for r in rows})
    heads: dict[str, dict[float, dict[str, Any]]] = {}
    for r in rows:
        heads.setdefault(r["head"], {})[r["kl"]] = r
    header = ["method", *(f"reward @ KL {k:.3f} (α)" for k in levels), "LM forwards / token", "ms / token"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join([":---"] + ["---:"] * (len(header) - 1)) + "|"]
    for head, by_level in heads.items():
        first = next(iter(by_level.values()))
        cells = [head]
        for k in levels:
            r = by_level.get(k, {})
            reward, alpha = r.get("reward"), r.get("alpha")
            cells.append("-" if reward is None else f"{reward:.3f} ({alpha:.2f})")
        cells.append("-" if first["lm_forwards_per_token"] is None else str(first["lm_forwards_per_token"]))
        cells.append("-" if first["ms_per_token"] is None else f"{first['ms_per_token']:.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def save_matched_kl(rows: Sequence[dict[str, Any]], out_dir: str | Path) -> dict[str, Path]:
    """`matched_kl.parquet` and `matched_kl.md` in ``out_dir`` (atomic writes); returns their paths."""
    import pyarrow.parquet as pq

    from alignheads.storage.atomic import atomic_path, write_bytes_atomic

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pylist(list(rows), schema=MATCHED_KL_SCHEMA)
    parquet = out / "matched_kl.parquet"
    with atomic_path(parquet) as tmp:
        pq.write_table(table, tmp)
    markdown = out / "matched_kl.md"
    write_bytes_atomic(markdown, matched_kl_markdown(rows).encode("utf-8"))
    return {"matched_kl_table": parquet, "matched_kl_markdown": markdown}
