"""Reading a method's reward at a matched KL off its α sweep, when the sweep has negative α.

A sweep through negative α traces two branches out of α = 0 (the base): KL grows both ways.
Each branch is walked on its own from α = 0 outward, and the first crossing of the level along
that walk wins, whether it falls inside a segment or on a sweep point.
"""

from __future__ import annotations

import pytest

from alignheads.tasks.reporting.matched_kl import (
    common_kl_range,
    kl_levels,
    matched_kl_rows,
    reward_at_kl,
)

# α −1 and α 1 both move away from the base; at KL 0.1 the positive branch is at α = 0.5
# (halfway to KL 0.2) and the negative one at α = −1/3 (a third of the way to KL 0.3)
TWO_SIDED = [(-1.0, 0.3, 7.0), (0.0, 0.0, 1.0), (1.0, 0.2, 3.0)]


def test_negative_alpha_does_not_hijack_the_positive_branch():
    # before the fix the walk started at α = −1 and returned the negative branch: (3.0, −1/3)
    assert reward_at_kl(TWO_SIDED, 0.1) == pytest.approx((2.0, 0.5))
    assert reward_at_kl(TWO_SIDED, 0.1, branch="positive") == pytest.approx((2.0, 0.5))


def test_the_negative_branch_is_walked_from_zero_downwards():
    # reward 1 + (1/3)(7 − 1) = 3 at α = −1/3
    assert reward_at_kl(TWO_SIDED, 0.1, branch="negative") == pytest.approx((3.0, -1.0 / 3.0))
    # KL 0.25 lies beyond the positive branch's reach (0.2) but on the negative one
    assert reward_at_kl(TWO_SIDED, 0.25) is None
    assert reward_at_kl(TWO_SIDED, 0.25, branch="negative") == pytest.approx(
        (1.0 + 6 * 0.25 / 0.3, -0.25 / 0.3)
    )
    # order of the points does not matter
    assert reward_at_kl(list(reversed(TWO_SIDED)), 0.1, branch="negative") == pytest.approx((3.0, -1.0 / 3.0))
    with pytest.raises(ValueError, match="branch"):
        reward_at_kl(TWO_SIDED, 0.1, branch="both")


def test_an_exact_match_does_not_beat_an_earlier_crossing():
    # KL 0.3 is crossed between α 0 and 1 (at α 0.75) before the sweep point α = 3 sits on it;
    # before the fix the exact point won: (9.0, 3.0)
    path = [(0.0, 0.0, 0.0), (1.0, 0.4, 1.0), (2.0, 0.2, 3.0), (3.0, 0.3, 9.0)]
    assert reward_at_kl(path, 0.3) == pytest.approx((0.75, 0.75))
    # an exact match that is the first arrival is returned as the sweep point itself
    assert reward_at_kl(path, 0.4) == (1.0, 1.0)
    assert reward_at_kl([(0.0, 0.1, 2.0)], 0.1) == (2.0, 0.0)
    # a flat segment on the level: its first point
    assert reward_at_kl([(0.0, 0.0, 0.0), (1.0, 0.2, 1.0), (2.0, 0.2, 5.0)], 0.2) == (1.0, 1.0)
    # same on the negative side: α −1 crosses 0.3 before the exact point α = −3
    mirrored = [(-a, k, r) for a, k, r in path]
    assert reward_at_kl(mirrored, 0.3, branch="negative") == pytest.approx((0.75, -0.75))


def test_matched_kl_rows_report_the_requested_branch():
    summary = [{"head": "h", "alpha": a, "kl": k, "reward": r} for a, k, r in TWO_SIDED] + [
        {"head": "g", "alpha": 0.0, "kl": 0.0, "reward": 0.0},
        {"head": "g", "alpha": 1.0, "kl": 0.4, "reward": 4.0},
    ]
    # the levels sit inside the range both heads reach on the positive branch: [0, 0.2]
    # (before the fix the negative branch's KL 0.3 widened it to [0, 0.3])
    assert common_kl_range(summary) == (0.0, 0.2)
    assert kl_levels(summary, n=1) == [0.1]
    rows = matched_kl_rows(summary, levels=[0.1])
    by = {r["head"]: r for r in rows}
    assert by["h"]["alpha"] == pytest.approx(0.5) and by["h"]["reward"] == pytest.approx(2.0)
    assert by["g"]["alpha"] == pytest.approx(0.25) and by["g"]["reward"] == pytest.approx(1.0)
    # the negative branch: head g has only its α = 0 point there (α = 0 is on both branches),
    # so the common range shrinks to KL 0 and g never reaches KL 0.1 on it
    assert common_kl_range(summary, branch="negative") == (0.0, 0.0)
    assert common_kl_range([r for r in summary if r["head"] == "h"], branch="negative") == (0.0, 0.3)
    neg = {r["head"]: r for r in matched_kl_rows(summary, levels=[0.1], branch="negative")}
    assert neg["h"]["alpha"] == pytest.approx(-1.0 / 3.0) and neg["h"]["reward"] == pytest.approx(3.0)
    assert neg["g"]["alpha"] is None and neg["g"]["reward"] is None
    assert set(neg["h"]) == set(rows[0])  # same schema
    # a head with no point on the branch at all has no rows there
    only_positive = [{"head": "p", "alpha": 1.0, "kl": 0.1, "reward": 1.0}]
    assert matched_kl_rows(only_positive, levels=[0.1], branch="negative") == []
