"""Each method's reward at matched KL, and its decoding cost: the comparison table of the sweep.

Comparing methods at the same α says little (their dials mean different things); comparing them
at the same KL to the base does. Each method's α is calibrated to each target KL
(`evaluate.target_kls`) on calibration prompts (the calibrate stage), then generated on the
evaluation prompts like any sweep point; this table reports those measured points, each with
the KL it reached on the evaluation prompts and the bootstrap intervals of the evaluate stage's
`calibrated` table. Nothing is interpolated.

Decoding cost, as stated in the table: LM forward passes per generated token (structural: 1
for the heads, whose extra work is one output-layer-sized matmul; 2 for GenARM and DeRa, which
run the base and a fine-tuned copy), plus the measured decoding time per generated token (wall
clock on the machine that built the generation artifacts; each method's fastest artifact, the
one least slowed by other load, and it stays noisy on shared CPUs).

The paired comparisons (`comparisons` table) are printed by `comparisons_markdown`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa

from alignheads.tasks.evaluate import CALIBRATED_SCHEMA

__all__ = [
    "MATCHED_KL_SCHEMA",
    "comparisons_markdown",
    "matched_kl_markdown",
    "matched_kl_rows",
    "save_matched_kl",
]

# the `calibrated` table's columns people compare methods on, then each method's decoding cost
MATCHED_KL_SCHEMA = pa.schema(
    [
        *(CALIBRATED_SCHEMA.field(name) for name in
          ("head", "target_kl", "alpha", "kl", "kl_lo", "kl_hi", "reward", "reward_lo", "reward_hi", "converged")),
        ("lm_forwards_per_token", pa.int64()),
        ("ms_per_token", pa.float64()),
    ]
)  # fmt: skip


def matched_kl_rows(
    calibrated: Sequence[dict[str, Any]], costs: dict[str, dict[str, float | None]] | None = None
) -> list[dict[str, Any]]:
    """One row per (method, target KL) of the evaluate stage's `calibrated` rows, with the
    method's decoding cost (``costs[head]``: ``lm_forwards_per_token``, ``ms_per_token``)."""
    rows = []
    for r in sorted(calibrated, key=lambda r: (r["head"], r["target_kl"])):
        cost = (costs or {}).get(r["head"], {})
        rows.append(
            {name: r.get(name) for name in MATCHED_KL_SCHEMA.names if name in CALIBRATED_SCHEMA.names}
            | {
                "lm_forwards_per_token": cost.get("lm_forwards_per_token"),
                "ms_per_token": cost.get("ms_per_token"),
            }
        )
    return rows


def _interval(value: float | None, lo: float | None, hi: float | None, digits: int = 3) -> str:
    if value is None:
        return "-"
    if lo is None or hi is None:
        return f"{value:.{digits}f}"
    return f"{value:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"


def matched_kl_markdown(rows: Sequence[dict[str, Any]]) -> str:
    """A GitHub markdown table: one row per method, one column per target KL holding the reward
    with its interval and (α, achieved KL), then the decoding cost."""
    targets = sorted({r["target_kl"] for r in rows})
    heads: dict[str, dict[float, dict[str, Any]]] = {}
    for r in rows:
        heads.setdefault(r["head"], {})[r["target_kl"]] = r
    header = ["method", *(f"reward @ KL {t:g} (α, KL reached)" for t in targets), "LM forwards / token", "ms / token"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join([":---"] + ["---:"] * (len(header) - 1)) + "|"]
    for head, by_target in heads.items():
        first = next(iter(by_target.values()))
        cells = [head]
        for t in targets:
            r = by_target.get(t)
            if r is None:
                cells.append("-")
                continue
            mark = "" if r.get("converged", True) else " †"
            cells.append(
                f"{_interval(r['reward'], r['reward_lo'], r['reward_hi'])} "
                f"(α {r['alpha']:.3g}, KL {r['kl']:.3f}){mark}"
            )
        cells.append("-" if first["lm_forwards_per_token"] is None else str(first["lm_forwards_per_token"]))
        cells.append("-" if first["ms_per_token"] is None else f"{first['ms_per_token']:.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    note = "\n† the calibration did not reach this KL within its tolerance: the closest α measured.\n"
    return "\n".join(lines) + "\n" + (note if any(not r.get("converged", True) for r in rows) else "")


def comparisons_markdown(rows: Sequence[dict[str, Any]]) -> str:
    """The paired comparisons as a markdown table: a − b reward difference with its interval,
    and whether the interval excludes 0."""
    header = ["target KL", "a (α)", "b (α)", "reward a − b [95 % interval]", "significant"]
    lines = ["| " + " | ".join(header) + " |", "|---:|:---|:---|---:|:---:|"]
    for r in rows:
        lines.append(
            f"| {r['target_kl']:g} | {r['head_a']} ({r['alpha_a']:.3g}) | {r['head_b']} ({r['alpha_b']:.3g}) | "
            f"{_interval(r['reward_diff'], r['diff_lo'], r['diff_hi'])} | {'yes' if r['significant'] else 'no'} |"
        )
    return "\n".join(lines) + "\n"


def save_matched_kl(
    rows: Sequence[dict[str, Any]], comparisons: Sequence[dict[str, Any]], out_dir: str | Path
) -> dict[str, Path]:
    """`matched_kl.parquet`, `matched_kl.md` and `comparisons.md` in ``out_dir`` (atomic
    writes); returns their paths."""
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
    paired = out / "comparisons.md"
    write_bytes_atomic(paired, comparisons_markdown(comparisons).encode("utf-8"))
    return {"matched_kl_table": parquet, "matched_kl_markdown": markdown, "comparisons_markdown": paired}
