"""Modulation statistics on hand-made tensors, masked to real tokens."""

from __future__ import annotations

import math

import pytest
import torch

from alignheads.models.modstats import alignment_norm_stats, strength_stats


def test_calm_strength_stats_count_only_real_tokens() -> None:
    """Real tokens s = 0.2, 0.6, 2.5, 1.0 (the padded 4.9 is ignored):
    mean 4.3/4 = 1.075; utilisation (s > .5): 3/4; high intensity (s > 2): 1/4; range .2–2.5."""
    s = torch.tensor([[4.9, 0.2, 0.6], [2.5, 1.0, 4.9]])
    mask = torch.tensor([[0, 1, 1], [1, 1, 0]])
    stats = strength_stats(s, mask)
    assert stats.mean == pytest.approx(1.075)
    assert stats.utilisation == 0.75 and stats.high_intensity == 0.25
    assert stats.min == pytest.approx(0.2) and stats.max == pytest.approx(2.5)
    assert stats.n_tokens == 4
    assert stats.as_dict()["utilisation"] == 0.75


def test_thresholds_are_strict_and_empty_masks_give_nan() -> None:
    stats = strength_stats(torch.tensor([0.5, 2.0, 2.0001]))
    assert stats.utilisation == pytest.approx(2 / 3) and stats.high_intensity == pytest.approx(1 / 3)
    empty = strength_stats(torch.tensor([1.0]), torch.tensor([0]))
    assert empty.n_tokens == 0 and math.isnan(empty.mean)


def test_iav_alignment_norm_stats() -> None:
    """Real a_t = [3, 4] (‖·‖ = 5) and [0, 1] (1); padding [10, 10] ignored:
    mean 3, population std 2, min 1, max 5."""
    a = torch.tensor([[[3.0, 4.0], [10.0, 10.0]], [[0.0, 1.0], [10.0, 10.0]]])
    stats = alignment_norm_stats(a, torch.tensor([[1, 0], [1, 0]]))
    assert (stats.mean, stats.std, stats.min, stats.max, stats.n_tokens) == (3.0, 2.0, 1.0, 5.0, 2)
