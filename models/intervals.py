"""Confidence intervals over prompts: bootstrap intervals of a mean and of a paired difference.

The unit of resampling is the prompt. A prompt's samples share the prompt (and, across methods
and α, their random numbers), so they are not independent draws: each prompt is first reduced
to the mean over its samples (`per_prompt_means`), then the prompts are resampled with
`scipy.stats.bootstrap` (BCa, a fixed seed, so a summary is reproducible). A paired difference
resamples the per-prompt differences of two arms measured on the same prompts and seeds, which
is what common random numbers make valid: the shared noise cancels before resampling.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["Interval", "mean_interval", "paired_difference", "per_prompt_means"]

CONFIDENCE = 0.95
N_RESAMPLES = 2000


@dataclass(frozen=True)
class Interval:
    """A point estimate (the mean over prompts) and its bootstrap interval [lo, hi]; `n` prompts.
    lo and hi are NaN with fewer than two prompts."""

    mean: float
    lo: float
    hi: float
    n: int

    @property
    def excludes_zero(self) -> bool:
        return bool(self.lo > 0 or self.hi < 0)


def per_prompt_means(prompt_ids: Sequence[str], values: Sequence[float]) -> dict[str, float]:
    """``{prompt_id: mean of its values}`` (insertion order of first appearance)."""
    sums: dict[str, list[float]] = {}
    for pid, v in zip(prompt_ids, values, strict=True):
        sums.setdefault(pid, []).append(float(v))
    return {pid: math.fsum(vs) / len(vs) for pid, vs in sums.items()}


def mean_interval(
    values: Sequence[float], confidence: float = CONFIDENCE, n_resamples: int = N_RESAMPLES, seed: int = 0
) -> Interval:
    """The mean of ``values (n,)`` (one per prompt) with its `confidence` bootstrap interval
    over the n values (BCa). Constant values give a zero-width interval (BCa is undefined there)."""
    x = np.asarray(values, dtype=np.float64)
    n = int(x.size)
    if n == 0:
        return Interval(math.nan, math.nan, math.nan, 0)
    mean = float(x.mean())
    if n < 2:
        return Interval(mean, math.nan, math.nan, n)
    if float(np.ptp(x)) == 0.0:
        return Interval(mean, mean, mean, n)
    lo, hi = _bootstrap(x, "BCa", confidence, n_resamples, seed)
    if not (math.isfinite(lo) and math.isfinite(hi)):  # BCa undefined on nearly degenerate data
        lo, hi = _bootstrap(x, "percentile", confidence, n_resamples, seed)
    return Interval(mean, min(lo, mean), max(hi, mean), n)


def _bootstrap(x: np.ndarray, method: str, confidence: float, n_resamples: int, seed: int) -> tuple[float, float]:
    """(low, high) of scipy's bootstrap interval of the mean of ``x (n,)``; NaN where undefined."""
    from scipy.stats import bootstrap

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scipy warns, and returns NaN, where BCa is undefined
        res = bootstrap(
            (x,), np.mean, confidence_level=confidence, n_resamples=n_resamples, method=method,
            vectorized=True, axis=-1, random_state=np.random.default_rng(seed),
        )  # fmt: skip
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


def paired_difference(
    a: dict[str, float],
    b: dict[str, float],
    confidence: float = CONFIDENCE,
    n_resamples: int = N_RESAMPLES,
    seed: int = 0,
) -> Interval:
    """Mean over shared prompts of ``a[p] − b[p]`` (per-prompt means of two arms) with its
    bootstrap interval over those prompts. Raises ValueError when the arms share no prompt."""
    shared = [p for p in a if p in b]
    if not shared:
        raise ValueError("the two arms share no prompt: a paired difference needs the same prompts")
    return mean_interval([a[p] - b[p] for p in shared], confidence, n_resamples, seed)
