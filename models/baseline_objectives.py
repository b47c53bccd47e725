"""The baselines' training losses, as pure functions over summed response log-probs.

* GenARM's autoregressive reward LM (reference-free):
  ``L = −log σ(β(log π_r(y_w) − log π_r(y_l)))``, i.e. DPO with a zero reference.
* DPO for DeRa: the loss of DESIGN.md with the reference's summed log-probs from the cache.

Both may add ``λ_nll`` times the chosen responses' per-token NLL (the anchor the heads use).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from alignheads.models.losses import DPOOutput, dpo_loss
from alignheads.models.objectives import PairBatch, chosen_nll, response_logps

__all__ = ["BaselineLoss", "dpo_objective", "reward_lm_loss", "reward_lm_objective"]


def reward_lm_loss(chosen_logps: Tensor, rejected_logps: Tensor, beta: float) -> DPOOutput:
    """``−log σ(β(log π_r(y_w) − log π_r(y_l)))`` per pair; inputs ``(B,)`` summed response
    log-probs of the reward LM; returns ``(B,)`` losses and the implicit rewards ``β log π_r``."""
    zeros = torch.zeros_like(chosen_logps)
    return dpo_loss(chosen_logps, rejected_logps, zeros, zeros, beta)


@dataclass(frozen=True)
class BaselineLoss:
    """Scalar total, the per-pair preference output, and the policy's ``(2B,)`` summed log-probs."""

    loss: Tensor
    dpo: DPOOutput
    logps: Tensor


def _anchored(pref: DPOOutput, logits: Tensor, batch: PairBatch, logps: Tensor, nll: float) -> BaselineLoss:
    loss = pref.losses.mean()
    if nll:
        loss = loss + nll * chosen_nll(logits, batch)
    return BaselineLoss(loss=loss, dpo=pref, logps=logps)


def reward_lm_objective(logits: Tensor, batch: PairBatch, beta: float, nll: float = 0.0) -> BaselineLoss:
    """GenARM reward-LM loss of a batch. logits: ``(2B, R, V)`` at the positions predicting the
    response tokens (chosen rows first); the batch's cached reference is not used."""
    logps = response_logps(logits, batch)
    b = batch.n_pairs
    return _anchored(reward_lm_loss(logps[:b], logps[b:], beta), logits, batch, logps, nll)


def dpo_objective(logits: Tensor, batch: PairBatch, beta: float, nll: float = 0.0) -> BaselineLoss:
    """DPO loss of a batch against the cached reference log-probs ``batch.ref_logps (2B,)``.
    logits: ``(2B, R, V)`` of the fine-tuned LM at the positions predicting the response tokens."""
    logps = response_logps(logits, batch)
    b = batch.n_pairs
    ref = batch.ref_logps
    pref = dpo_loss(logps[:b], logps[b:], ref[:b], ref[b:], beta)
    return _anchored(pref, logits, batch, logps, nll)
