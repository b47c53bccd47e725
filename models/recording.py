"""Per-step records of what the head did during generation (for the generations table)."""

from __future__ import annotations

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
    ``modulation_norm``; IAV: ``align_norm``). Rows follow the batch order; beam search
    reorders rows between steps, so use it with greedy decoding or sampling.
    Steps after a sequence finished are recorded too: mask them with the token counts.
    """

    def __init__(self) -> None:
        self.steps: list[dict[str, Tensor]] = []

    def observe(self, output: SteeringOutput, logits: Tensor, lm_logits: Tensor) -> None:
        with torch.no_grad():
            step = {name: value[:, -1].detach().float().cpu() for name, value in output.token_stats().items()}
            step["kl_to_base"] = exact_kl(logits[:, -1].detach(), lm_logits[:, -1].detach()).cpu()
        self.steps.append(step)

    def stacked(self) -> dict[str, Tensor]:
        """``{name: (B, n_steps)}``; empty dict before any step."""
        if not self.steps:
            return {}
        return {name: torch.stack([step[name] for step in self.steps], dim=1) for name in self.steps[0]}
