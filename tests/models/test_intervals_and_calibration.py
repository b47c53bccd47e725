"""The statistics of the evaluation on constructed data with known answers: bootstrap intervals
cover a known mean at about their nominal rate, pairing narrows the interval of correlated arms,
and the calibration search reaches a target KL within its tolerance on a monotone curve."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import bootstrap

from alignheads.models.calibration import calibrate, propose_alpha
from alignheads.models.intervals import mean_interval, paired_difference, per_prompt_means


def test_per_prompt_means_average_the_samples_of_each_prompt():
    means = per_prompt_means(["a", "b", "a", "b", "c"], [1.0, 2.0, 3.0, 6.0, 5.0])
    assert means == {"a": 2.0, "b": 4.0, "c": 5.0}


def test_interval_covers_the_true_mean_at_about_the_nominal_rate():
    # 200 synthetic evaluations of 60 prompts each, skewed data (exponential, true mean 1.5)
    rng = np.random.default_rng(7)
    hits = 0
    trials = 200
    for t in range(trials):
        x = rng.exponential(1.5, size=60)
        ci = mean_interval(x, confidence=0.95, n_resamples=999, seed=t)
        assert ci.lo <= ci.mean <= ci.hi
        hits += ci.lo <= 1.5 <= ci.hi
    # nominal 95 %: a binomial(200, 0.95) count lies in [181, 197] with probability > 0.99
    assert 181 <= hits <= 199, hits


def test_interval_width_shrinks_like_one_over_root_n_and_degenerate_data_is_exact():
    rng = np.random.default_rng(0)
    w = [mean_interval(rng.normal(0, 1, n), seed=1) for n in (100, 1600)]
    ratio = (w[0].hi - w[0].lo) / (w[1].hi - w[1].lo)
    assert 3.2 < ratio < 4.8  # sqrt(1600 / 100) = 4
    flat = mean_interval([0.25] * 10)
    assert (flat.mean, flat.lo, flat.hi, flat.n) == (0.25, 0.25, 0.25, 10)
    one = mean_interval([3.0])
    assert one.mean == 3.0 and math.isnan(one.lo) and math.isnan(one.hi)


def test_pairing_narrows_the_interval_when_the_arms_are_correlated():
    # common random numbers: both arms share a large per-prompt effect u; b is a + 0.3 + small noise
    rng = np.random.default_rng(3)
    u = rng.normal(0, 2.0, size=200)
    a = u + rng.normal(0, 0.3, size=200)
    b = u + 0.3 + rng.normal(0, 0.3, size=200)
    ids = [f"p{i}" for i in range(200)]
    paired = paired_difference(dict(zip(ids, b, strict=True)), dict(zip(ids, a, strict=True)), seed=0)
    unpaired = bootstrap(
        (b, a), lambda x, y, axis=-1: x.mean(axis=axis) - y.mean(axis=axis), paired=False,
        n_resamples=2000, random_state=np.random.default_rng(0), vectorized=True,
    ).confidence_interval  # fmt: skip
    assert paired.mean == pytest.approx(float(np.mean(b - a)))
    assert (paired.hi - paired.lo) < 0.25 * (unpaired.high - unpaired.low)
    assert paired.excludes_zero and unpaired.low < 0 < unpaired.high  # only the pairing sees it
    with pytest.raises(ValueError, match="share no prompt"):
        paired_difference({"x": 1.0}, {"y": 2.0})


def test_paired_difference_uses_only_shared_prompts():
    ci = paired_difference({"a": 1.0, "b": 2.0, "c": 9.0}, {"a": 0.5, "b": 1.0})
    assert ci.n == 2 and ci.mean == pytest.approx(0.75)


def test_calibration_reaches_each_target_within_its_tolerance_on_a_monotone_curve():
    def curve(a: float) -> float:  # convex, like KL(α) of a head: 0 at α = 0
        return 0.04 * a**2 + 0.03 * a

    calls: list[list[float]] = []

    def measure(alphas: list[float]) -> list[float]:
        calls.append(list(alphas))
        return [curve(a) for a in alphas]

    targets = [0.05, 0.10, 0.15, 0.5]
    found, probes = calibrate(measure, targets, [0.0, 0.5, 1.0, 1.5, 2.0], tolerance=0.02, max_steps=10)
    for c in found:
        assert c.converged and abs(c.kl - c.target) <= 0.02 * c.target, c
        assert curve(c.alpha) == pytest.approx(c.kl)
    # 0.5 lies beyond the grid's reach (0.22 at α = 2): the search doubled α to bracket it
    assert max(probes) > 2.0
    assert calls[0] == [0.0, 0.5, 1.0, 1.5, 2.0]  # the grid first, in one call
    assert all(len(c) <= len(targets) for c in calls[1:])  # then at most one α per target per step


def test_calibration_reports_an_unreachable_target_as_not_converged():
    found, _ = calibrate(lambda al: [min(0.1 * a, 0.2) for a in al], [0.5], [0.0, 1.0], alpha_max=8.0)
    assert not found[0].converged and found[0].kl == pytest.approx(0.2)
    assert propose_alpha({0.0: 0.0, 1.0: 0.1}, 0.1, 0.05, 8.0) is None  # already within tolerance
    with pytest.raises(ValueError, match="positive"):
        calibrate(lambda al: al, [0.0], [0.0, 1.0])
