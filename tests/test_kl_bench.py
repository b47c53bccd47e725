"""Smoke test of benchmarks/kl_bench.py: its dry run builds both regimes' inputs, trains an IAV head
with each KL, checks the estimators against the exact KL, times the step, and prints its tables."""

from __future__ import annotations

import math
import re

import kl_bench  # benchmarks/ is on pytest's pythonpath (pyproject.toml)
import pytest

HEADS = (
    "untrained W_b (run lm_head)",
    "W_b, trained kl: topk",
    "W_b, trained kl: sampled",
    "W_b, trained kl: exact",
    "W_b + W_a, trained kl: topk",
    "W_b + W_a, trained kl: sampled",
    "W_b + W_a, trained kl: exact",
)


def table_rows(text: str, first_cell: str) -> list[list[str]]:
    """Cells of the printed table rows whose first cell is `first_cell` (as tests/test_benchmarks.py)."""
    rows = [[c.strip() for c in line.split("|")] for line in text.splitlines() if "|" in line]
    return [r for r in rows if r[0] == first_cell]


@pytest.mark.slow
def test_kl_bench_dry_run(capsys) -> None:
    kl_bench.main(["--dry-run"])
    out = capsys.readouterr().out
    rows = table_rows(out, "4") + table_rows(out, "5.5")
    regimes = [r for r in rows if len(r) == 6]
    assert [r[0] for r in regimes] == ["4", "5.5"]
    masses = [float(r[1]) for r in regimes]
    assert 0 < masses[0] < masses[1] <= 1  # a sharper reference puts more mass on its top k
    training = [r for r in rows if len(r) == 8 and r[1] in ("topk", "sampled", "exact")]
    assert [(r[0], r[1], r[2]) for r in training] == [
        (scale, kl, "2") for scale in ("4", "5.5") for kl in ("topk", "sampled", "exact")
    ]
    # exact KL, then error and correlation of: top-k + tail, extrapolated, sampled M = 4, 16, 64
    fidelity = [r for r in rows if len(r) == 14 and r[2] in HEADS]
    assert [r[2] for r in fidelity] == list(HEADS) * 2
    for r in fidelity:
        assert float(r[3]) > 0  # the run model's head is offset from the reference's
        errors = [float(r[i].split("%")[0]) for i in (4, 6, 8, 10, 12)]
        assert all(math.isfinite(e) for e in errors)
        assert abs(errors[1]) <= abs(errors[0])  # extrapolating the tail's KL beats leaving it out
        spreads = [float(r[i].split("±")[1].rstrip("%")) for i in (8, 10, 12)]
        assert spreads[0] > spreads[1] > spreads[2] > 0  # more draws, less noise in the mean
        assert abs(errors[4]) <= spreads[2] + 0.5  # unbiased: 64 draws land near the exact KL
        assert all(float(r[i]) > 0.5 for i in (5, 7, 9, 11, 13))  # per-token correlation with the exact KL
    targets = re.findall(r"target \|relative error\| <= 2% at k = 16 \((.*)\) .*: (?:met|NOT met); worst [+-]\d", out)
    assert targets == ["kl: topk = extrapolated", "top-k + 16 tail draws"]
    timing = table_rows(out, "trained") + table_rows(out, "frozen")
    assert [r[0] for r in timing] == ["trained", "frozen"]
    assert all(float(r[i]) > 0 for r in timing for i in (1, 2, 3))
