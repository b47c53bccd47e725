"""Per-step records of what the head did during generation (for the generations table)."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from alignheads.models.head_base import SteeringOutput
from alignheads.models.losses import exact_kl

__all__ = ["StepRecorder"]


class StepRecorder:
    """Collects, for every call of the output layer, the last position's statistics.

    In ``generate()`` call ``i`` produces the logits of generated token ``i``, so
    :meth:`stacked` gives ``(B, n_steps)`` tensors aligned with the generated tokens:
    ``kl_to_base`` = ``KL(softmax(z(α)) ‖ softmax(z_LM))`` against the LM's own output layer
    (before any sampling processors), plus the head's own summaries (CALM: ``strength``,
    ``modulation_norm``; IAV: ``align_norm``). Several dials on one LM
    (`models.dials.DialLMHead`) record ``kl_to_base`` for the combined distribution and, per
    dial, ``strength/<name>`` (CALM) or ``align_norm/<name>`` (IAV). Rows follow the batch
    order; beam search reorders rows between steps, so use it with greedy decoding or sampling.
    Steps after a sequence finished are recorded too: mask them with the token counts.
    """

    def __init__(self) -> None:
        self.steps: list[dict[str, Tensor]] = []

    def observe(self, output: SteeringOutput, logits: Tensor, lm_logits: Tensor) -> None:
        """Record one call of a single head: its ``token_stats()`` and the KL of ``logits`` to
        ``lm_logits`` (both ``(B, T, V)``), at the last position."""
        self.observe_stats(output.token_stats(), logits, lm_logits)

    def observe_stats(self, stats: Mapping[str, Tensor], logits: Tensor, lm_logits: Tensor) -> None:
        """Record one call: ``stats`` ``{name: (B, T)}`` and the KL of the steered ``logits`` to
        the LM's ``lm_logits`` (both ``(B, T, V)``), each at the last position."""
        with torch.no_grad():
            step = {name: value[:, -1].detach().float().cpu() for name, value in stats.items()}
            step["kl_to_base"] = exact_kl(logits[:, -1].detach(), lm_logits[:, -1].detach()).cpu()
        self.steps.append(step)

    def stacked(self) -> dict[str, Tensor]:
        """``{name: (B, n_steps)}``; empty dict before any step."""
        if not self.steps:
            return {}
        return {name: torch.stack([step[name] for step in self.steps], dim=1) for name in self.steps[0]}
