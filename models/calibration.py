"""Finding the α at which a method's KL to the base reaches a target: a safeguarded secant search.

A method's dial α moves its decoding distribution away from the base; the summary's KL (mean
over responses of the per-token KL(π_α ‖ π_base)) grows with α. To compare methods at the same
KL, each method's α is calibrated to each target KL on calibration prompts: measure the KL at a
few α (the sweep's grid), bracket the target between two measured points, and propose the
secant (linear) root inside the bracket, kept away from its ends so the search cannot stall;
repeat until a measured point is within the tolerance or the steps run out. A target above
every measured KL doubles the largest α (up to `alpha_max`).

The search is pure: it asks a caller-supplied ``measure(alphas) -> kls`` (which generates and
measures, every α of a step in one batched call) and returns the measured point closest to
each target.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

__all__ = ["Calibrated", "calibrate", "propose_alpha"]


@dataclass(frozen=True)
class Calibrated:
    """The measured point closest to `target`: its α and KL; `converged` when within tolerance;
    `steps` search steps measured beyond the starting grid."""

    target: float
    alpha: float
    kl: float
    converged: bool
    steps: int


def _within(kl: float, target: float, tolerance: float) -> bool:
    return abs(kl - target) <= tolerance * target


def propose_alpha(
    probes: dict[float, float], target: float, tolerance: float, alpha_max: float
) -> float | None:
    """The next α to measure for `target`, given ``probes {α: KL}`` (α ≥ 0); None when a probe
    is already within ``tolerance × target`` or no further α can help (the target lies beyond
    `alpha_max`, or the bracket has shrunk to nothing)."""
    points = sorted((a, k) for a, k in probes.items() if a >= 0)
    if not points or any(_within(k, target, tolerance) for _, k in points):
        return None
    for (a0, k0), (a1, k1) in zip(points, points[1:], strict=False):
        if k0 < target <= k1:
            width = a1 - a0
            if width <= 1e-6 * max(1.0, a1):
                return None
            guess = a0 + (target - k0) * width / (k1 - k0)
            # keep away from the bracket's ends: a secant that hugs one end converges slowly
            return min(max(guess, a0 + 0.1 * width), a1 - 0.1 * width)
    top_alpha, top_kl = points[-1]
    if top_kl < target:
        if top_alpha >= alpha_max:
            return None
        return min(alpha_max, 2.0 * top_alpha if top_alpha > 0 else 1.0)
    return None  # every probe above the target: the lowest α measured already overshoots


def calibrate(
    measure: Callable[[list[float]], list[float]],
    targets: Sequence[float],
    start: Sequence[float],
    *,
    tolerance: float = 0.05,
    max_steps: int = 8,
    alpha_max: float = 64.0,
) -> tuple[list[Calibrated], dict[float, float]]:
    """Calibrate α to each of `targets` (KL levels > 0). `start`: the α grid measured first (α = 0
    should be among them: it anchors the bracket at KL 0). Each step measures the proposals of all
    unfinished targets in one `measure` call. Returns one `Calibrated` per target (same order) and
    every probe ``{α: KL}`` measured."""
    if any(not (t > 0 and math.isfinite(t)) for t in targets):
        raise ValueError(f"target KLs must be positive numbers, got {list(targets)}")
    grid = sorted({float(a) for a in start})
    probes = dict(zip(grid, measure(grid), strict=True))
    steps = {t: 0 for t in targets}
    for _ in range(max_steps):
        proposals = {t: propose_alpha(probes, t, tolerance, alpha_max) for t in targets}
        wanted = sorted({round(a, 6) for a in proposals.values() if a is not None} - set(probes))
        if not wanted:
            break
        for t, a in proposals.items():
            if a is not None:
                steps[t] += 1
        probes |= dict(zip(wanted, measure(wanted), strict=True))
    out = []
    for t in targets:
        alpha, kl = min(probes.items(), key=lambda p: (abs(p[1] - t), p[0]))
        out.append(Calibrated(float(t), float(alpha), float(kl), _within(kl, t, tolerance), steps[t]))
    return out, dict(sorted(probes.items()))
