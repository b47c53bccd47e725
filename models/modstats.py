"""Modulation statistics over real (non-padding) tokens.

CALM: mean strength ``s``, utilisation (share of tokens with ``s > 0.5``), high-intensity
share (``s > 2.0``) and the range. IAV: norms ``‖a_t‖₂`` of the alignment vector
``a_t = W_a h_t``. Inputs are tensors with a mask of the tokens to count; results are
plain floats (NaN where no token is counted), ready for tables and logs.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import Tensor

__all__ = [
    "HIGH_INTENSITY_THRESHOLD",
    "UTILISATION_THRESHOLD",
    "NormStats",
    "StrengthStats",
    "alignment_norm_stats",
    "strength_stats",
]

UTILISATION_THRESHOLD = 0.5
HIGH_INTENSITY_THRESHOLD = 2.0


@dataclass(frozen=True)
class StrengthStats:
    """CALM strength over the counted tokens."""

    mean: float
    utilisation: float
    high_intensity: float
    min: float
    max: float
    n_tokens: int

    def as_dict(self) -> dict[str, float | int]:
        return asdict(self)


@dataclass(frozen=True)
class NormStats:
    """Norms of IAV alignment vectors over the counted tokens."""

    mean: float
    std: float
    min: float
    max: float
    n_tokens: int

    def as_dict(self) -> dict[str, float | int]:
        return asdict(self)


def _selected(values: Tensor, mask: Tensor | None) -> Tensor:
    values = values.detach().double()
    if mask is None:
        return values.reshape(-1)
    return values[mask.bool().to(values.device)]


def strength_stats(
    strength: Tensor,
    mask: Tensor | None = None,
    *,
    utilisation_threshold: float = UTILISATION_THRESHOLD,
    high_threshold: float = HIGH_INTENSITY_THRESHOLD,
) -> StrengthStats:
    """Statistics of CALM strengths ``s`` (any shape, e.g. ``(B, T)``) where ``mask`` is true."""
    s = _selected(strength, mask)
    n = s.numel()
    if n == 0:
        return StrengthStats(math.nan, math.nan, math.nan, math.nan, math.nan, 0)
    return StrengthStats(
        mean=s.mean().item(),
        utilisation=(s > utilisation_threshold).double().mean().item(),
        high_intensity=(s > high_threshold).double().mean().item(),
        min=s.min().item(),
        max=s.max().item(),
        n_tokens=n,
    )


def alignment_norm_stats(align_logits: Tensor, mask: Tensor | None = None) -> NormStats:
    """Statistics of ``‖a_t‖₂`` for IAV alignment vectors ``(..., V)`` where ``mask (...)`` is true.

    ``std`` is the population standard deviation.
    """
    norms = _selected(torch.linalg.vector_norm(align_logits.detach().double(), dim=-1), mask)
    n = norms.numel()
    if n == 0:
        return NormStats(math.nan, math.nan, math.nan, math.nan, 0)
    return NormStats(
        mean=norms.mean().item(),
        std=norms.std(correction=0).item(),
        min=norms.min().item(),
        max=norms.max().item(),
        n_tokens=n,
    )
