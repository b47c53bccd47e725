"""Training objectives of every method: a batch of preference pairs -> its loss.

The heads' (IAV, CALM: the head's outputs) and the baselines' (GenARM's reward LM and DPO for
DeRa: the fine-tuned LM's logits). Pure functions over tensors. A batch holds B pairs as 2B sequences (chosen rows first, then
rejected rows, through the backbone in one concatenated forward) in the compact layout of
:class:`PairBatch`: the head only ever sees the hidden states that predict response tokens.

A head's objective is computed from a few scalars per scored token (the policy's log-prob of the
target, IAV's KL and ‖a‖², CALM's ‖v‖², entropy and strength: the columns of
:data:`IAV_TERMS` / :data:`CALM_TERMS`), then reduced over the batch. The scalars of one token
need its ``V``-sized logits, nothing else, so :func:`iav_chunked_objective` and
:func:`calm_chunked_objective` compute them over the batch's :class:`ScoredTokens` (the real
response tokens only, never padding) a chunk of tokens at a time
(:func:`alignheads.models.losses.chunked_rows`): memory is that of one chunk's logits, whatever
the batch and the vocabulary. :func:`iav_objective` / :func:`calm_objective` reduce the same
scalars computed from a head's output over the whole ``(2B, R)`` grid at once; both give the
same loss and gradients.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from torch import Tensor, nn

from alignheads.models.calm import CALMOutput
from alignheads.models.context import TokenContext
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
    chunk_tokens,
    chunked_rows,
    dpo_loss,
    exact_kl,
    iav_loss,
    masked_mean,
    masked_variance,
    squared_norm,
    token_entropy,
    token_logprobs,
    topk_extrapolated_kl,
    topk_sampled_kl,
)

# the per-token scalars of each head's objective, in column order
IAV_TERMS = ("logp", "kl", "sq_norm")
CALM_TERMS = ("logp", "sq_norm", "entropy", "strength")


@dataclass(frozen=True)
class BatchNeeds:
    """Which optional reference-cache columns a method's training reads (Parquet skips the others)."""

    topk: bool
    hidden: bool  # the cached hidden states as the head's features (`features: cached`)
    # the cached hidden states as another reference model's, for IAV's exact KL to it
    reference_hidden: bool = False
    tail: bool = False  # the cache's tail draws (ids, log-probs), for IAV's kl: sampled


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
    causal context mean needs them). ref_hidden ``(2B, R, H)``: the cached hidden states of
    another reference model (its ``lm_head`` of them: the reference's logits, IAV's exact KL),
    or None. ref_tail_ids / ref_tail_logprobs ``(2B, R, M)``: the cache's draws from the
    reference outside its top k (IAV's `kl: sampled`), or None.
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
    ref_hidden: Tensor | None = None
    ref_tail_ids: Tensor | None = None
    ref_tail_logprobs: Tensor | None = None

    @property
    def n_pairs(self) -> int:
        return self.targets.shape[0] // 2

    def to(self, device: torch.device | str) -> PairBatch:
        moved = {k: (v.to(device) if isinstance(v, Tensor) else v) for k, v in self.__dict__.items()}
        return PairBatch(**moved)


@dataclass(frozen=True)
class ScoredTokens:
    """A batch's ``N`` scored response tokens, flattened (row-major: sequence by sequence).

    rows, cols: ``(N,)`` where each token sits in the ``(2B, R)`` grid; hidden: ``(N, H)`` the
    states predicting them; targets: ``(N,)``; ref_topk_ids / ref_topk_logprobs: ``(N, K)`` or
    None; context: CALM's token context of shape ``(1, N)`` (positions) / ``(1, N, H)``, or None.
    ``shape`` is the grid's ``(2B, R)``. ref_hidden: ``(N, H)`` another reference model's cached
    hidden states at the same tokens (IAV's exact KL to it), or None. ref_tail_ids /
    ref_tail_logprobs: ``(N, M)`` the cache's draws from the reference outside its top k, or None.
    """

    rows: Tensor
    cols: Tensor
    hidden: Tensor
    targets: Tensor
    ref_topk_ids: Tensor | None
    ref_topk_logprobs: Tensor | None
    context: TokenContext | None
    shape: tuple[int, int]
    ref_hidden: Tensor | None = None
    ref_tail_ids: Tensor | None = None
    ref_tail_logprobs: Tensor | None = None

    @property
    def n(self) -> int:
        return self.targets.shape[0]

    def part(self, start: int, stop: int) -> ScoredTokens:
        """Tokens ``[start, stop)`` (views, no copies)."""

        def cut(x: Tensor | None) -> Tensor | None:
            return None if x is None else x[start:stop]

        ctx = None if self.context is None else self.context.select(slice(start, stop))
        return ScoredTokens(
            cut(self.rows), cut(self.cols), cut(self.hidden), cut(self.targets),
            cut(self.ref_topk_ids), cut(self.ref_topk_logprobs), ctx, self.shape, cut(self.ref_hidden),
            cut(self.ref_tail_ids), cut(self.ref_tail_logprobs),
        )  # fmt: skip

    def grid(self, values: Tensor) -> Tensor:
        """Per-token ``values (N, ...)`` laid out on the ``(2B, R, ...)`` grid, zeros at padding."""
        out = values.new_zeros(self.shape + values.shape[1:])
        return out.index_put((self.rows, self.cols), values)


def scored_tokens(batch: PairBatch, hidden: Tensor, context: TokenContext | None) -> ScoredTokens:
    """The real tokens of ``batch`` (``batch.mask``) with their features: hidden ``(2B, R, H)``
    and CALM's context over the same grid (or None)."""
    rows, cols = batch.mask.nonzero(as_tuple=True)

    def pick(x: Tensor | None) -> Tensor | None:
        return None if x is None else x[rows, cols]

    ctx = None
    if context is not None:
        ctx = TokenContext(
            context.positions[rows, cols].unsqueeze(0), context.context[rows, cols].unsqueeze(0)
        )
    return ScoredTokens(
        rows, cols, hidden[rows, cols], batch.targets[rows, cols],
        pick(batch.ref_topk_ids), pick(batch.ref_topk_logprobs), ctx, tuple(batch.mask.shape),
        pick(batch.ref_hidden), pick(batch.ref_tail_ids), pick(batch.ref_tail_logprobs),
    )  # fmt: skip


# --- the heads' per-token terms and their reductions ----------------------------------------------


def response_logps(policy_logits: Tensor, batch: PairBatch) -> Tensor:
    """``(2B,)`` summed log-probs of the targets under ``policy_logits (2B, R, V)``."""
    return sequence_sums(token_logprobs(policy_logits, batch.targets), batch.mask)


def sequence_sums(per_token: Tensor, mask: Tensor) -> Tensor:
    """``(2B,)`` sums over the real columns (``mask``) of ``(2B, R)`` per-token values."""
    return torch.where(mask, per_token, torch.zeros_like(per_token)).sum(-1)


def preference_logps(policy_logits: Tensor, batch: PairBatch) -> PreferenceLogps:
    """Policy (``(2B, R, V)`` logits at α = 1) and cached reference log-probs, split by side."""
    return _split_logps(response_logps(policy_logits, batch), batch)


def _split_logps(logps: Tensor, batch: PairBatch) -> PreferenceLogps:
    b = batch.n_pairs
    return PreferenceLogps(logps[:b], logps[b:], batch.ref_logps[:b], batch.ref_logps[b:])


def _per_side_mean(values: Tensor, mask: Tensor, n_pairs: int) -> tuple[Tensor, Tensor]:
    """Masked means of ``(2B, T)`` values over the chosen rows and over the rejected rows."""
    return masked_mean(values[:n_pairs], mask[:n_pairs]), masked_mean(values[n_pairs:], mask[n_pairs:])


def topk_kl_per_token(base_logits: Tensor, batch: PairBatch | ScoredTokens) -> Tensor:
    """``kl: topk``: the KL of the cached reference to ``softmax(base_logits)`` at each token from
    its top-k (:func:`alignheads.models.losses.topk_extrapolated_kl`: the top-k + tail KL and the
    tail's part extrapolated from the top k's): ``(2B, R)`` for a PairBatch's ``(2B, R, V)``
    logits, ``(n,)`` for ScoredTokens' ``(n, V)``."""
    if batch.ref_topk_ids is None or batch.ref_topk_logprobs is None:
        raise ValueError("kl: topk needs the reference cache's top-k columns, and this batch has none")
    return topk_extrapolated_kl(batch.ref_topk_ids, batch.ref_topk_logprobs, base_logits)


def sampled_kl_per_token(base_logits: Tensor, batch: PairBatch | ScoredTokens) -> Tensor:
    """``kl: sampled``: the KL of the cached reference to ``softmax(base_logits)`` at each token from
    its top-k and the cache's tail draws (:func:`alignheads.models.losses.topk_sampled_kl`:
    unbiased); shapes as :func:`topk_kl_per_token`."""
    if batch.ref_topk_ids is None or batch.ref_tail_ids is None:
        raise ValueError(
            "kl: sampled needs the reference cache's top-k and tail-draw columns, and this batch lacks them"
        )
    return topk_sampled_kl(
        batch.ref_topk_ids, batch.ref_topk_logprobs, batch.ref_tail_ids, batch.ref_tail_logprobs, base_logits
    )


def exact_kl_per_token(base_logits: Tensor, ref_logits: Tensor) -> Tensor:
    """``(...)`` exact KL of the reference logits ``ref_logits (..., V)`` to the base head's
    ``base_logits (..., V)``."""
    return exact_kl(ref_logits, base_logits)


def chosen_nll(policy_logits: Tensor, batch: PairBatch) -> Tensor:
    """Per-token NLL of the chosen responses under ``policy_logits (2B, R, V)``, a scalar."""
    b = batch.n_pairs
    per_token = token_logprobs(policy_logits[:b], batch.targets[:b])
    return -masked_mean(per_token, batch.mask[:b])


def _anchored(loss_obj, logp: Tensor, batch: PairBatch, nll_weight: float):
    """Add ``λ_nll · chosen NLL`` (from the policy's ``(2B, R)`` target log-probs ``logp``) to a
    loss (an RPO-style anchor: plain DPO may lower the chosen responses' likelihood too, as long
    as the rejected ones fall further). λ_nll = 0: unchanged."""
    if nll_weight == 0:
        return loss_obj
    b = batch.n_pairs
    return replace(loss_obj, loss=loss_obj.loss - nll_weight * masked_mean(logp[:b], batch.mask[:b]))


@dataclass(frozen=True)
class HeadStepLoss:
    """A head's loss object (:class:`IAVLoss` or :class:`CALMLoss`) and its per-token terms
    ``(2B, R, m)`` (columns :data:`IAV_TERMS` / :data:`CALM_TERMS`, zeros at padding), from
    which the step's metrics are read without any ``V``-sized tensor."""

    loss: IAVLoss | CALMLoss
    terms: Tensor


def iav_token_terms(out: IAVOutput, targets: Tensor, kl: Tensor, cap: float | None = None) -> Tensor:
    """IAV's per-token terms ``(..., 3)`` (:data:`IAV_TERMS`) of a head output ``(..., V)``:
    the log-prob of ``targets (...)`` under the policy ``soft_cap(sg(W_b h) + W_a h, cap)``, the
    given ``kl (...)`` of the base head to the reference, and ``‖W_a h‖²``."""
    policy = soft_cap(out.base_logits.detach() + out.align_logits, cap)
    logp = token_logprobs(policy, targets)  # float32, or float64 for a float64 head
    return torch.stack([logp, kl.to(logp.dtype), squared_norm(out.align_logits).to(logp.dtype)], -1)


def iav_reduce(terms: Tensor, batch: PairBatch, weights: IAVWeights, nll_weight: float = 0.0) -> IAVLoss:
    """The IAV loss from its per-token terms ``(2B, R, 3)`` (:func:`iav_token_terms`)."""
    mask = batch.mask
    logp, kl, sq = terms.unbind(-1)
    kl_chosen, kl_rejected = _per_side_mean(kl, mask, batch.n_pairs)
    loss = iav_loss(_split_logps(sequence_sums(logp, mask), batch), kl_chosen, kl_rejected,
                    masked_mean(sq, mask), weights)  # fmt: skip
    return _anchored(loss, logp, batch, nll_weight)


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

    out: the head's output over the whole ``(2B, R)`` grid; kl_per_token: ``(2B, R)``
    KL(reference ‖ base head) at each scored token (of the capped base logits, when the model
    caps). :func:`iav_chunked_objective` computes the same loss a chunk of tokens at a time.
    """
    return iav_reduce(iav_token_terms(out, batch.targets, kl_per_token, cap), batch, weights, nll_weight)


def calm_token_terms(out: CALMOutput, targets: Tensor, cap: float | None = None) -> Tensor:
    """CALM's per-token terms ``(..., 4)`` (:data:`CALM_TERMS`) of a head output ``(..., V)``:
    the log-prob of ``targets`` under the policy ``soft_cap(z(1), cap)``, ``‖v‖²``, the policy's
    entropy and the strength ``s``."""
    policy = soft_cap(out.logits(1.0), cap)
    logp = token_logprobs(policy, targets)  # float32, or float64 for a float64 head
    columns = [logp, squared_norm(out.modulation), token_entropy(policy), out.strength]
    return torch.stack([c.to(logp.dtype) for c in columns], -1)


def calm_reduce(terms: Tensor, batch: PairBatch, weights: CALMWeights, nll_weight: float = 0.0) -> CALMLoss:
    """The CALM loss from its per-token terms ``(2B, R, 4)`` (:func:`calm_token_terms`)."""
    mask = batch.mask
    logp, sq, entropy, strength = terms.unbind(-1)
    loss = calm_loss(
        _split_logps(sequence_sums(logp, mask), batch),
        masked_mean(sq, mask),
        masked_variance(strength, mask),
        masked_mean(entropy, mask),
        weights,
    )
    return _anchored(loss, logp, batch, nll_weight)


def calm_objective(
    out: CALMOutput, batch: PairBatch, weights: CALMWeights, nll_weight: float = 0.0, cap: float | None = None
) -> CALMLoss:
    """CALM loss: DPO at α = 1 + λ_l2 · mean‖v_t‖² − λ_var · Var(s) − λ_ent · mean H(π_t)
    (+ λ_nll · chosen NLL when asked). The policy π is ``soft_cap(z(1), cap)``, ``cap`` the
    model's final-logit soft-cap (None: none), i.e. what decoding samples from. ``out`` covers
    the whole ``(2B, R)`` grid; :func:`calm_chunked_objective` computes the same a chunk at a time."""
    return calm_reduce(calm_token_terms(out, batch.targets, cap), batch, weights, nll_weight)


# --- the same, a chunk of tokens at a time ---------------------------------------------------------

# KL(reference ‖ base head) of a chunk of tokens: (capped base logits (n, V), tokens) -> (n,)
KLEstimate = Callable[[Tensor, ScoredTokens], Tensor]


def exact_kl_estimate(frozen: nn.Module, cap: float | None = None) -> KLEstimate:
    """The exact KL to the reference logits ``soft_cap(frozen(h), cap)`` (the run's own
    ``lm_head``: the reference when it is the run's model), recomputed per chunk."""

    def estimate(base_logits: Tensor, tokens: ScoredTokens) -> Tensor:
        with torch.no_grad():
            ref_logits = soft_cap(frozen(tokens.hidden), cap)
        return exact_kl_per_token(base_logits, ref_logits)

    return estimate


def reference_kl_estimate(reference: nn.Module, cap: float | None = None) -> KLEstimate:
    """The exact KL to another reference model: its logits ``soft_cap(reference(h_ref), cap)`` from
    the hidden states the reference pass cached for it (``tokens.ref_hidden (n, H_ref)``),
    ``reference`` its output layer and ``cap`` its final-logit soft-cap, recomputed per chunk."""

    def estimate(base_logits: Tensor, tokens: ScoredTokens) -> Tensor:
        if tokens.ref_hidden is None:
            raise ValueError("the exact KL to another reference model needs its cached hidden states")
        with torch.no_grad():
            hidden = tokens.ref_hidden.to(reference.weight.dtype)
            ref_logits = soft_cap(reference(hidden), cap)
        return exact_kl_per_token(base_logits, ref_logits)

    return estimate


def _chunk_size(head: nn.Module, chunk: int | None) -> int:
    return chunk if chunk is not None else chunk_tokens(head.config.vocab_size)


def grad_inputs(head: nn.Module, tokens: ScoredTokens) -> list[Tensor]:
    """What a chunked objective of ``head`` over ``tokens`` reads that may require a gradient (the
    ``weights`` of :func:`alignheads.models.losses.chunked_rows`): the head's parameters, and the
    tokens' features and context (from a frozen backbone or the cache: none in training)."""
    features = [tokens.hidden] + ([] if tokens.context is None else [tokens.context.context])
    return [*head.parameters(), *features]


def iav_chunked_objective(
    head: nn.Module,
    tokens: ScoredTokens,
    batch: PairBatch,
    frozen: nn.Module,
    kl: KLEstimate,
    weights: IAVWeights,
    nll_weight: float = 0.0,
    cap: float | None = None,
    chunk: int | None = None,
) -> HeadStepLoss:
    """:func:`iav_objective` of ``head`` (an IAV head) over the batch's scored ``tokens``,
    ``chunk`` tokens at a time (default :func:`alignheads.models.losses.chunk_tokens` of the
    vocabulary). ``kl``: :func:`topk_kl_per_token` (from the cache) or :func:`exact_kl_estimate`."""

    def terms(start: int, stop: int) -> Tensor:
        part = tokens.part(start, stop)
        out = head(part.hidden.unsqueeze(0), frozen_head=frozen)  # (1, n, V)
        base = out.base_logits.squeeze(0)
        return iav_token_terms(
            out, part.targets.unsqueeze(0), kl(soft_cap(base, cap), part).unsqueeze(0), cap
        )[0]

    grid = tokens.grid(chunked_rows(terms, tokens.n, _chunk_size(head, chunk), grad_inputs(head, tokens)))
    return HeadStepLoss(iav_reduce(grid, batch, weights, nll_weight), grid)


def calm_chunked_objective(
    head: nn.Module,
    tokens: ScoredTokens,
    batch: PairBatch,
    frozen: nn.Module,
    weights: CALMWeights,
    nll_weight: float = 0.0,
    cap: float | None = None,
    chunk: int | None = None,
) -> HeadStepLoss:
    """:func:`calm_objective` of ``head`` (a CALM head) over the batch's scored ``tokens``, ``chunk``
    tokens at a time (default :func:`alignheads.models.losses.chunk_tokens` of the vocabulary)."""

    def terms(start: int, stop: int) -> Tensor:
        part = tokens.part(start, stop)
        out = head(part.hidden.unsqueeze(0), frozen_head=frozen, context=part.context)
        return calm_token_terms(out, part.targets.unsqueeze(0), cap)[0]

    grid = tokens.grid(chunked_rows(terms, tokens.n, _chunk_size(head, chunk), grad_inputs(head, tokens)))
    return HeadStepLoss(calm_reduce(grid, batch, weights, nll_weight), grid)


def head_response_logps(
    head: nn.Module,
    tokens: ScoredTokens,
    frozen: nn.Module,
    alpha: float,
    cap: float | None = None,
    chunk: int | None = None,
) -> Tensor:
    """``(2B,)`` summed log-probs of the targets under the head's ``soft_cap(z(α), cap)``, a chunk
    of tokens at a time (what held-out evaluation scores)."""

    def logp(start: int, stop: int) -> Tensor:
        part = tokens.part(start, stop)
        z = head.logits(part.hidden.unsqueeze(0), alpha, frozen_head=frozen, context=part.context)
        return token_logprobs(soft_cap(z, cap).squeeze(0), part.targets)

    per_token = tokens.grid(chunked_rows(logp, tokens.n, _chunk_size(head, chunk), grad_inputs(head, tokens)))
    return per_token.sum(-1)


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
