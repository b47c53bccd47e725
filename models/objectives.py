"""Training objectives of every method: a batch of preference pairs -> its loss.

The heads' (IAV, CALM: the head's outputs) and the baselines' (GenARM's reward LM and DPO for
DeRa: the fine-tuned LM's logits). Pure functions over tensors. A batch holds B pairs as 2B sequences (chosen rows first, then
rejected rows, through the backbone in one concatenated forward) in the compact layout of
:class:`PairBatch`: the head only ever sees the hidden states that predict response tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor

from alignheads.models.calm import CALMOutput
from alignheads.models.head_base import soft_cap
from alignheads.models.iav import IAVOutput
from alignheads.models.losses import (
    CALMLoss,
    CALMWeights,
    DPOOutput,
    IAVLoss,
    IAVWeights,
    PreferenceLogps,
    calm_loss,
    dpo_loss,
    exact_kl,
    iav_loss,
    masked_mean,
    masked_variance,
    mean_entropy,
    mean_squared_norm,
    token_logprobs,
    topk_tail_kl,
)


@dataclass(frozen=True)
class BatchNeeds:
    """Which optional reference-cache columns a method's training reads (Parquet skips the others)."""

    topk: bool
    hidden: bool


@dataclass
class PairBatch:
    """B preference pairs as 2B sequences (rows ``[:B]`` chosen, ``[B:]`` rejected), compact.

    Compact means one column per *scored* response token (``R`` = the most any row has):
    targets, mask: ``(2B, R)`` the response tokens and which columns are real; ref_logps:
    ``(2B,)`` the reference's summed response log-probs; ref_topk_ids / ref_topk_logprobs:
    ``(2B, R, k)`` or None. The features that predict each target come either from the
    backbone — input_ids, attention_mask ``(2B, T)`` right-padded prompt + response and
    gather_index ``(2B, R)`` the position predicting each target — or from the cache —
    hidden ``(2B, R, H)``, positions ``(2B, R)`` their true positions, prefix_sum ``(2B, H)``
    and prefix_count ``(2B,)`` the hidden states before the first scored position (CALM's
    causal context mean needs them).
    """

    targets: Tensor
    mask: Tensor
    ref_logps: Tensor
    ref_topk_ids: Tensor | None = None
    ref_topk_logprobs: Tensor | None = None
    input_ids: Tensor | None = None
    attention_mask: Tensor | None = None
    gather_index: Tensor | None = None
    hidden: Tensor | None = None
    positions: Tensor | None = None
    prefix_sum: Tensor | None = None
    prefix_count: Tensor | None = None

    @property
    def n_pairs(self) -> int:
        return self.targets.shape[0] // 2

    def to(self, device: torch.device | str) -> PairBatch:
        moved = {k: (v.to(device) if isinstance(v, Tensor) else v) for k, v in self.__dict__.items()}
        return PairBatch(**moved)


def response_logps(policy_logits: Tensor, batch: PairBatch) -> Tensor:
    """``(2B,)`` summed log-probs of the targets under ``policy_logits (2B, R, V)``."""
    per_token = token_logprobs(policy_logits, batch.targets)
    return torch.where(batch.mask, per_token, torch.zeros_like(per_token)).sum(-1)


def preference_logps(policy_logits: Tensor, batch: PairBatch) -> PreferenceLogps:
    """Policy (``(2B, R, V)`` logits at α = 1) and cached reference log-probs, split by side."""
    logps = response_logps(policy_logits, batch)
    b = batch.n_pairs
    return PreferenceLogps(logps[:b], logps[b:], batch.ref_logps[:b], batch.ref_logps[b:])


def _per_side_mean(values: Tensor, mask: Tensor, n_pairs: int) -> tuple[Tensor, Tensor]:
    """Masked means of ``(2B, T)`` values over the chosen rows and over the rejected rows."""
    return masked_mean(values[:n_pairs], mask[:n_pairs]), masked_mean(values[n_pairs:], mask[n_pairs:])


def topk_kl_per_token(base_logits: Tensor, batch: PairBatch) -> Tensor:
    """``(2B, R)`` top-k + tail KL of the cached reference to ``softmax(base_logits)``."""
    if batch.ref_topk_ids is None or batch.ref_topk_logprobs is None:
        raise ValueError("kl: topk needs the reference cache's top-k columns, and this batch has none")
    return topk_tail_kl(batch.ref_topk_ids, batch.ref_topk_logprobs, base_logits)


def exact_kl_per_token(base_logits: Tensor, ref_logits: Tensor) -> Tensor:
    """``(2B, R)`` exact KL of the reference logits (the backbone's own head) to the base head."""
    return exact_kl(ref_logits, base_logits)


def chosen_nll(policy_logits: Tensor, batch: PairBatch) -> Tensor:
    """Per-token NLL of the chosen responses under ``policy_logits (2B, R, V)``, a scalar."""
    b = batch.n_pairs
    per_token = token_logprobs(policy_logits[:b], batch.targets[:b])
    return -masked_mean(per_token, batch.mask[:b])


def _anchored(loss_obj, policy_logits: Tensor, batch: PairBatch, nll_weight: float):
    """Add ``λ_nll · chosen NLL`` to a loss (an RPO-style anchor: plain DPO may lower the chosen
    responses' likelihood too, as long as the rejected ones fall further). λ_nll = 0: unchanged."""
    if nll_weight == 0:
        return loss_obj
    return replace(loss_obj, loss=loss_obj.loss + nll_weight * chosen_nll(policy_logits, batch))


def iav_objective(
    out: IAVOutput,
    batch: PairBatch,
    kl_per_token: Tensor,
    weights: IAVWeights,
    nll_weight: float = 0.0,
    cap: float | None = None,
) -> IAVLoss:
    """IAV loss: DPO at α = 1 + λ_kl · ½(KL_chosen + KL_rejected) + λ_l2 · mean‖a_t‖²
    (+ λ_nll · chosen NLL when asked).

    The preference and anchor terms train the alignment head only: the policy is
    ``soft_cap(sg(W_b h) + W_a h, cap)``, ``cap`` the model's final-logit soft-cap
    (:func:`alignheads.models.head_base.soft_cap`; None: none), i.e. what decoding samples from.
    Were their gradients to reach ``W_b`` too, the base head would take up part of the alignment
    and α = 0 would no longer be the reference's distribution, which flattens the dial (seen on
    the tiny world: reward fell from α = 0 to α = 1). ``W_b`` learns from the KL term alone, and
    only when it trains at all (against another reference model: `IAVTrainConfig.base_head`).

    kl_per_token: ``(2B, R)`` KL(reference ‖ base head) at each scored token (of the capped
    base logits, when the model caps).
    """
    mask = batch.mask
    policy = soft_cap(out.base_logits.detach() + out.align_logits, cap)
    kl_chosen, kl_rejected = _per_side_mean(kl_per_token, mask, batch.n_pairs)
    loss = iav_loss(
        preference_logps(policy, batch),
        kl_chosen,
        kl_rejected,
        mean_squared_norm(out.align_logits, mask),
        weights,
    )
    return _anchored(loss, policy, batch, nll_weight)


def calm_objective(
    out: CALMOutput, batch: PairBatch, weights: CALMWeights, nll_weight: float = 0.0, cap: float | None = None
) -> CALMLoss:
    """CALM loss: DPO at α = 1 + λ_l2 · mean‖v_t‖² − λ_var · Var(s) − λ_ent · mean H(π_t)
    (+ λ_nll · chosen NLL when asked). The policy π is ``soft_cap(z(1), cap)``, ``cap`` the
    model's final-logit soft-cap (None: none), i.e. what decoding samples from."""
    mask = batch.mask
    policy = soft_cap(out.logits(1.0), cap)
    loss = calm_loss(
        preference_logps(policy, batch),
        mean_squared_norm(out.modulation, mask),
        masked_variance(out.strength, mask),
        mean_entropy(policy, mask),
        weights,
    )
    return _anchored(loss, policy, batch, nll_weight)


# --- the baselines: a whole fine-tuned LM ---------------------------------------------------------
# GenARM's autoregressive reward LM (reference-free): L = −log σ(β(log π_r(y_w) − log π_r(y_l))),
# i.e. DPO with a zero reference. DPO for DeRa: docs/architecture.md's DPO loss with the
# reference's summed log-probs from the cache. Both may add λ_nll times the chosen NLL.


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


def _anchored_lm(
    pref: DPOOutput, logits: Tensor, batch: PairBatch, logps: Tensor, nll: float
) -> BaselineLoss:
    loss = pref.losses.mean()
    if nll:
        loss = loss + nll * chosen_nll(logits, batch)
    return BaselineLoss(loss=loss, dpo=pref, logps=logps)


def reward_lm_objective(logits: Tensor, batch: PairBatch, beta: float, nll: float = 0.0) -> BaselineLoss:
    """GenARM reward-LM loss of a batch. logits: ``(2B, R, V)`` at the positions predicting the
    response tokens (chosen rows first); the batch's cached reference is not used."""
    logps = response_logps(logits, batch)
    b = batch.n_pairs
    return _anchored_lm(reward_lm_loss(logps[:b], logps[b:], beta), logits, batch, logps, nll)


def dpo_objective(logits: Tensor, batch: PairBatch, beta: float, nll: float = 0.0) -> BaselineLoss:
    """DPO loss of a batch against the cached reference log-probs ``batch.ref_logps (2B,)``.
    logits: ``(2B, R, V)`` of the fine-tuned LM at the positions predicting the response tokens."""
    logps = response_logps(logits, batch)
    b = batch.n_pairs
    ref = batch.ref_logps
    pref = dpo_loss(logps[:b], logps[b:], ref[:b], ref[b:], beta)
    return _anchored_lm(pref, logits, batch, logps, nll)
