"""The matched-KL table reports the calibrated points as measured (no interpolation), with their
intervals and each method's decoding cost; the comparisons table prints as markdown."""

from __future__ import annotations

from alignheads.tasks.reporting.matched_kl import (
    comparisons_markdown,
    matched_kl_markdown,
    matched_kl_rows,
    save_matched_kl,
)

CALIBRATED = [
    {"target_kl": 0.1, "head": "iav", "alpha": 1.25, "kl": 0.098, "kl_lo": 0.09, "kl_hi": 0.11,
     "reward": 0.8, "reward_lo": 0.7, "reward_hi": 0.9, "converged": True},
    {"target_kl": 0.05, "head": "iav", "alpha": 0.7, "kl": 0.051, "kl_lo": 0.045, "kl_hi": 0.06,
     "reward": 0.5, "reward_lo": 0.4, "reward_hi": 0.6, "converged": True},
    {"target_kl": 0.1, "head": "genarm", "alpha": 0.66, "kl": 0.12, "kl_lo": 0.1, "kl_hi": 0.14,
     "reward": 1.1, "reward_lo": 1.0, "reward_hi": 1.2, "converged": False},
]  # fmt: skip
COSTS = {"iav": {"lm_forwards_per_token": 1, "ms_per_token": 0.5}, "genarm": {"lm_forwards_per_token": 2}}


def test_rows_are_the_measured_points_with_costs():
    rows = matched_kl_rows(CALIBRATED, COSTS)
    assert [(r["head"], r["target_kl"]) for r in rows] == [("genarm", 0.1), ("iav", 0.05), ("iav", 0.1)]
    iav = rows[2]
    assert (iav["alpha"], iav["kl"], iav["reward"], iav["reward_lo"], iav["reward_hi"]) == (1.25, 0.098, 0.8, 0.7, 0.9)
    assert (iav["lm_forwards_per_token"], iav["ms_per_token"]) == (1, 0.5)
    assert rows[0]["ms_per_token"] is None  # no measurement: null, not zero


def test_markdown_marks_points_short_of_their_target(tmp_path):
    rows = matched_kl_rows(CALIBRATED, COSTS)
    text = matched_kl_markdown(rows)
    assert "0.800 [0.700, 0.900] (α 1.25, KL 0.098)" in text
    assert "1.100 [1.000, 1.200] (α 0.66, KL 0.120) †" in text
    assert text.splitlines()[0].count("reward @ KL") == 2
    comparisons = [
        {"target_kl": 0.1, "head_a": "genarm", "alpha_a": 0.66, "head_b": "iav", "alpha_b": 1.25,
         "reward_diff": 0.3, "diff_lo": 0.1, "diff_hi": 0.5, "significant": True},
    ]  # fmt: skip
    assert "| 0.1 | genarm (0.66) | iav (1.25) | 0.300 [0.100, 0.500] | yes |" in comparisons_markdown(comparisons)
    paths = save_matched_kl(rows, comparisons, tmp_path)
    assert {p.name for p in paths.values()} == {"matched_kl.parquet", "matched_kl.md", "comparisons.md"}
