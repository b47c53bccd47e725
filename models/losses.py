"""Training losses as pure functions: tensors in, tensors out, no model inside.

Shapes use ``B`` (batch), ``T`` (sequence length), ``V`` (vocabulary), ``K`` (top-k of the
reference cache). "Prediction positions" are the positions whose logits predict a response
token: the hidden state (and so the logits) at position ``t`` predicts the token at
``t + 1`` (shift by one), so a response token at ``t + 1`` is scored by the logits at ``t``.
All reductions run in float32 (or wider, if the inputs are wider).

The maths (docs/architecture.md):

* ``logp(y|x) = Σ_t log softmax(z_t)[y_t]`` over response tokens only.
* DPO: ``L_pref = −log σ(β[(logp_π(y_w) − logp_ref(y_w)) − (logp_π(y_l) − logp_ref(y_l))])``.
* KL to the reference: exact ``KL(p_ref ‖ softmax(z))`` or the top-k + tail estimate
  ``Σ_{j≤k} p_j (ℓ_j − q_j) + r (log r − log r_q)``.
* IAV: ``L = L_pref + λ_kl · ½(KL_chosen + KL_rejected) + λ_l2 · mean‖a_t‖²``.
* CALM: ``L = L_pref + λ_l2 · mean‖v_t‖² − λ_var · Var(s) − λ_ent · mean H(π_t)``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode

__all__ = [
    "IN_PLACE_GRAD_ELEMENTS",
    "LOGITS_PER_CHUNK",
    "CALMLoss",
    "CALMWeights",
    "DPOOutput",
    "IAVLoss",
    "IAVWeights",
    "PreferenceLogps",
    "calm_loss",
    "add_weight_grad",
    "chunk_ranges",
    "chunk_tokens",
    "chunked_rows",
    "dpo_loss",
    "exact_kl",
    "iav_loss",
    "masked_mean",
    "masked_variance",
    "mean_entropy",
    "mean_squared_norm",
    "prediction_mask",
    "sequence_logprobs",
    "squared_norm",
    "token_entropy",
    "token_logprobs",
    "topk_extrapolated_kl",
    "topk_sampled_kl",
    "topk_tail_kl",
]


def _wide(x: Tensor) -> Tensor:
    """Float32 at least (keeps float64)."""
    return x if x.dtype == torch.float64 else x.float()


# --------------------------------------------------------------------------- reductions


def masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``values`` over the entries where ``mask`` is true.

    values: any shape ``S``; mask: bool or 0/1 of shape ``S``. Returns a scalar. Masked-out
    entries are ignored even when they are NaN or infinite. An empty mask gives 0.
    """
    mask = mask.bool()
    values = _wide(values)
    total = torch.where(mask, values, torch.zeros((), dtype=values.dtype, device=values.device)).sum()
    return total / mask.sum().clamp(min=1).to(values.dtype)


def masked_variance(values: Tensor, mask: Tensor) -> Tensor:
    """Population variance ``mean((x − mean x)²)`` over the entries where ``mask`` is true.

    values, mask: shape ``S``. Returns a scalar; an empty mask gives 0.
    """
    mask = mask.bool()
    mean = masked_mean(values, mask)
    return masked_mean((_wide(values) - mean) ** 2, mask)


def prediction_mask(target_mask: Tensor) -> Tensor:
    """Mask of the positions whose logits predict a masked-in token.

    target_mask: ``(B, T)``, true on the tokens to score (e.g. response tokens).
    Returns a bool ``(B, T)`` with ``out[:, t] = target_mask[:, t + 1]`` and the last column
    false (the last position predicts nothing inside the sequence).
    """
    target_mask = target_mask.bool()
    out = torch.zeros_like(target_mask)
    out[:, :-1] = target_mask[:, 1:]
    return out


# --------------------------------------------------------------------------- log-probs


def token_logprobs(logits: Tensor, targets: Tensor) -> Tensor:
    """``log softmax(logits)[target]`` for each position, without shifting.

    logits: ``(..., V)``; targets: ``(...)`` integer ids. Returns ``(...)`` float32.
    Computed as ``z[y] − logsumexp(z)`` so no ``(..., V)`` log-softmax is materialised.
    """
    logits = _wide(logits)
    picked = logits.gather(-1, targets.long().unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


def sequence_logprobs(logits: Tensor, input_ids: Tensor, response_mask: Tensor) -> Tensor:
    """Summed log-probability of the response tokens of each sequence.

    logits: ``(B, T, V)`` from a forward pass over ``input_ids`` (prompt + response);
    input_ids: ``(B, T)``; response_mask: ``(B, T)``, true on response tokens (prompt and
    padding false). The logits at ``t`` score the token at ``t + 1``, so
    ``out[b] = Σ_{t ≥ 1, mask[b, t]} log softmax(logits[b, t − 1])[input_ids[b, t]]``.
    A response token at position 0 has no predicting position and is not counted.
    Returns ``(B,)``.
    """
    per_token = token_logprobs(logits[:, :-1], input_ids[:, 1:])
    return torch.where(response_mask[:, 1:].bool(), per_token, torch.zeros_like(per_token)).sum(-1)


# --------------------------------------------------------------------------- DPO


@dataclass(frozen=True)
class DPOOutput:
    """Per-pair DPO losses and implicit rewards, all ``(B,)``.

    ``chosen_rewards = β(logp_π(y_w) − logp_ref(y_w))``, likewise for rejected, and
    ``losses = −log σ(chosen_rewards − rejected_rewards)``.
    """

    losses: Tensor
    chosen_rewards: Tensor
    rejected_rewards: Tensor

    @property
    def margins(self) -> Tensor:
        return self.chosen_rewards - self.rejected_rewards


def dpo_loss(
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    ref_chosen: Tensor,
    ref_rejected: Tensor,
    beta: float = 0.1,
) -> DPOOutput:
    """DPO per pair. All inputs ``(B,)`` summed response log-probs; returns ``(B,)`` tensors."""
    chosen = beta * (_wide(policy_chosen) - _wide(ref_chosen))
    rejected = beta * (_wide(policy_rejected) - _wide(ref_rejected))
    return DPOOutput(
        losses=-F.logsigmoid(chosen - rejected), chosen_rewards=chosen, rejected_rewards=rejected
    )


# --------------------------------------------------------------------------- KL


# |implicit-reward margin| below this is a tie: the policy equals the reference up to rounding
# (a head or baseline at α = 0, scored against cached float reference log-probs)
TIE_MARGIN = 1e-4


def preference_accuracy(margins: Tensor, tie: float = TIE_MARGIN) -> float:
    """Share of pairs whose implicit-reward margin ``(N,)`` (chosen − rejected) is positive; a
    margin within ``tie`` of 0 counts as half, so a policy that is the reference scores 0.5."""
    m = margins.detach().double()
    ties = m.abs() <= tie
    return ((m > tie).double() + 0.5 * ties.double()).mean().item()


def exact_kl(ref_logits: Tensor, policy_logits: Tensor) -> Tensor:
    """``KL(p_ref ‖ softmax(policy_logits))`` per position.

    ref_logits, policy_logits: ``(..., V)`` logits or log-probs (both are normalised here).
    Returns ``(...)``: ``Σ_v p_ref(v) (log p_ref(v) − log q(v))``, with ``0 log 0 = 0``.
    """
    ref_lp = torch.log_softmax(_wide(ref_logits), dim=-1)
    pol_lp = torch.log_softmax(_wide(policy_logits), dim=-1)
    p = ref_lp.exp()
    terms = torch.where(p > 0, p * (ref_lp - pol_lp), torch.zeros_like(p))
    return terms.sum(-1)


@dataclass(frozen=True)
class _TopKParts:
    """What both top-k KL estimates read, per position ``(...)``: ``head = Σ_j p_j (ℓ_j − q_j)``,
    ``log P = logsumexp ℓ`` and ``log Q = logsumexp q`` (the reference's and the policy's mass on
    the ids), ``r = 1 − P`` (clamped at 0), ``log r_q`` (the policy's mass outside the ids, a
    finite dummy where there is none) and ``use``: whether both tails are non-empty."""

    head: Tensor
    log_p: Tensor
    log_q: Tensor
    r: Tensor
    log_rq: Tensor
    use: Tensor


def _topk_head(
    ref_topk_ids: Tensor, ref_topk_logprobs: Tensor, pol_lp: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """What every top-k KL estimate reads of the top k, per position ``(...)``: ``head = Σ_j p_j
    (ℓ_j − q_j)``, ``log P = logsumexp ℓ``, ``r = 1 − P`` (clamped at 0), and ``q_top (..., K)``
    the policy's log-probs ``pol_lp (..., V)`` at the ids."""
    ref_lp = _wide(ref_topk_logprobs)
    q_top = pol_lp.gather(-1, ref_topk_ids.long())
    p_top = ref_lp.exp()
    # 0 · log 0 = 0 (as in exact_kl): a cached ℓ_j = −inf would otherwise give 0 · (−inf) = NaN
    head = torch.where(p_top > 0, p_top * (ref_lp - q_top), torch.zeros_like(p_top)).sum(-1)
    log_p = torch.logsumexp(ref_lp, dim=-1)
    return head, log_p, (-torch.expm1(log_p)).clamp(min=0), q_top


def _topk_parts(ref_topk_ids: Tensor, ref_topk_logprobs: Tensor, policy_logits: Tensor) -> _TopKParts:
    pol_lp = torch.log_softmax(_wide(policy_logits), dim=-1)
    ids = ref_topk_ids.long()
    head, log_p, r, q_top = _topk_head(ids, ref_topk_logprobs, pol_lp)
    tail = torch.ones_like(pol_lp, dtype=torch.bool).scatter(-1, ids, False)
    has_tail = tail.any(-1)
    neg_inf = torch.full((), float("-inf"), dtype=pol_lp.dtype, device=pol_lp.device)
    tail_lp = torch.where(tail, pol_lp, neg_inf)
    # rows without a tail get finite dummies, so neither value nor gradient turns into NaN
    tail_lp = torch.where(has_tail.unsqueeze(-1), tail_lp, torch.zeros_like(tail_lp))
    log_rq = torch.logsumexp(tail_lp, dim=-1)
    use = has_tail & (r > 0)
    log_rq = torch.where(use, log_rq, torch.zeros_like(log_rq))
    return _TopKParts(head, log_p, torch.logsumexp(q_top, dim=-1), r, log_rq, use)


def _tail_term(parts: _TopKParts, log_ratio: Tensor) -> Tensor:
    """``r · log_ratio`` where both tails exist, else 0 (``log_ratio`` finite everywhere)."""
    return torch.where(parts.use, parts.r * log_ratio, torch.zeros_like(parts.r))


def _safe_log_r(parts: _TopKParts) -> Tensor:
    return torch.where(parts.use, parts.r, torch.ones_like(parts.r)).log()


def topk_tail_kl(ref_topk_ids: Tensor, ref_topk_logprobs: Tensor, policy_logits: Tensor) -> Tensor:
    """Top-k + tail estimate of ``KL(p_ref ‖ softmax(policy_logits))`` per position.

    ref_topk_ids: ``(..., K)`` distinct token ids; ref_topk_logprobs: ``(..., K)`` the
    reference's log-probs ``ℓ_j`` of those ids, normalised over the full vocabulary;
    policy_logits: ``(..., V)``. Returns ``(...)``::

        Σ_{j≤K} p_j (ℓ_j − q_j) + r (log r − log r_q)

    with ``p_j = exp ℓ_j``, ``q_j = log softmax(z)[id_j]``, ``r = 1 − Σ p_j`` (computed as
    ``−expm1(logsumexp ℓ)``, clamped at 0) the reference's mass outside the ids and ``r_q``
    the policy's mass outside the same ids, from a masked logsumexp of the policy's
    log-probs (never ``1 − Σ``). It is the exact KL between the two (K+1)-bucket
    distributions, so it never exceeds the full KL and equals it when the ids cover the
    vocabulary (then the tail term is 0). A cached ``ℓ_j = −inf`` (reference probability 0)
    contributes 0 (``0 log 0 = 0``, as in :func:`exact_kl`).

    What it leaves out is ``r · KL(p̃ ‖ q̃)``, the KL between the two distributions *inside* the
    tail, which weighs as much as the tail mass ``r``: at V = 32,000 and k = 64 it read 0.78x
    the exact KL where the reference's top 64 held 81 % of its mass (benchmarks/refpass_bench.py).
    :func:`topk_extrapolated_kl` estimates that part too.
    """
    parts = _topk_parts(ref_topk_ids, ref_topk_logprobs, policy_logits)
    return parts.head + _tail_term(parts, _safe_log_r(parts) - parts.log_rq)


def topk_extrapolated_kl(ref_topk_ids: Tensor, ref_topk_logprobs: Tensor, policy_logits: Tensor) -> Tensor:
    """:func:`topk_tail_kl` plus an estimate of the KL inside the tail, per position (``kl: topk``).

    Inputs as :func:`topk_tail_kl`. By the chain rule, the exact KL is the (K+1)-bucket KL plus
    ``r · KL(p̃ ‖ q̃)``, the two tail distributions' KL weighted by the reference's tail mass ``r``;
    the cache does not hold ``p̃``. This estimate takes for it the KL of the two distributions
    conditioned on the top-k ids, ``KL(p̄ ‖ q̄)`` with ``p̄_j = p_j / P``, ``q̄_j = e^{q_j} / Q``
    (``P``, ``Q`` the two masses on the ids): the log-ratio of reference and policy is assumed to
    vary as much inside the tail as among the top k. In closed form::

        Σ_j p_j (ℓ_j − q_j) / P + r (log(r / P) − log(r_q / Q))

    It equals :func:`topk_tail_kl` + ``r · KL(p̄ ‖ q̄)`` ≥ :func:`topk_tail_kl`, and the exact KL
    when the ids cover the vocabulary (``r = 0``). On the tiny world's trained LM and on
    random models with Llama's vocabulary and perturbed heads (benchmarks/refpass_bench.py) it cut the
    top-k + tail estimate's relative error several-fold; it may exceed the exact KL (by < 0.1 %
    in those runs), where the tail's log-ratio varies less than the top k's.
    """
    parts = _topk_parts(ref_topk_ids, ref_topk_logprobs, policy_logits)
    log_ratio = _safe_log_r(parts) - parts.log_p - parts.log_rq + parts.log_q
    return parts.head * torch.exp(-parts.log_p) + _tail_term(parts, log_ratio)


def topk_sampled_kl(
    ref_topk_ids: Tensor,
    ref_topk_logprobs: Tensor,
    tail_ids: Tensor,
    tail_logprobs: Tensor,
    policy_logits: Tensor,
) -> Tensor:
    """Top-k + sampled-tail estimate of ``KL(p_ref ‖ softmax(policy_logits))`` per position,
    unbiased for the tail that the top-k estimates can only guess at.

    ref_topk_ids / ref_topk_logprobs: ``(..., K)`` as :func:`topk_tail_kl`; tail_ids: ``(..., M)``
    ids drawn (with replacement) from the reference's distribution restricted to the ids outside
    the top k, ``p̃_i = p_i / r``; tail_logprobs: ``(..., M)`` their reference log-probs ``ℓ_i``
    (normalised over the full vocabulary); policy_logits: ``(..., V)``. Returns ``(...)``::

        Σ_{j≤K} p_j (ℓ_j − q_j) + r · (1/M) Σ_s (ℓ_{i_s} − q_{i_s})

    with ``r = 1 − Σ_j p_j`` (as in :func:`topk_tail_kl`) and ``q = log softmax(z)``. The second
    term's expectation over the draws is ``r Σ_{i ∉ top k} p̃_i (ℓ_i − q_i) = Σ_{i ∉ top k} p_i (ℓ_i − q_i)``,
    the tail's part of the exact KL, so the estimate is unbiased (up to the storage rounding of the
    cached log-probs), and so is its gradient in the policy's logits. Its noise falls as
    ``1/√M`` per token and averages out over a batch's tokens. Where the top k cover the
    vocabulary (``r = 0``) it is the exact KL whatever the draws.
    """
    pol_lp = torch.log_softmax(_wide(policy_logits), dim=-1)
    head, _, r, _ = _topk_head(ref_topk_ids, ref_topk_logprobs, pol_lp)
    sampled = (_wide(tail_logprobs) - pol_lp.gather(-1, tail_ids.long())).mean(-1)
    return head + torch.where(r > 0, r * sampled, torch.zeros_like(r))


# --------------------------------------------------------------------------- regularisers


def squared_norm(vectors: Tensor) -> Tensor:
    """``‖x‖²`` of each vector, in float32 (or wider): vectors ``(..., D)`` → ``(...)``."""
    return _wide(vectors).pow(2).sum(-1)


def mean_squared_norm(vectors: Tensor, mask: Tensor) -> Tensor:
    """``mean_t ‖x_t‖²`` over masked-in positions.

    vectors: ``(..., D)`` (e.g. IAV's ``a_t = W_a h_t`` or CALM's ``v_t``, ``D = V``);
    mask: ``(...)``. Returns a scalar.
    """
    return masked_mean(squared_norm(vectors), mask)


def token_entropy(logits: Tensor) -> Tensor:
    """``H(softmax(z))`` of each position, ``0 log 0 = 0``: logits ``(..., V)`` → ``(...)``."""
    lp = torch.log_softmax(_wide(logits), dim=-1)
    p = lp.exp()
    return -torch.where(p > 0, p * lp, torch.zeros_like(p)).sum(-1)


def mean_entropy(logits: Tensor, mask: Tensor) -> Tensor:
    """``mean_t H(softmax(z_t))`` over masked-in positions. logits ``(..., V)``, mask ``(...)``."""
    return masked_mean(token_entropy(logits), mask)


# --------------------------------------------------------------------------- chunking over tokens

# Vocabulary-sized values (logits, log-softmax, their gradients) one chunk of tokens may hold:
# 2^22 float32 = 16 MiB per (tokens x V) copy, whatever V is, so a chunk is 128 tokens at
# V = 32,000 and 32 at V = 128,000, and a loss's peak memory stays the same as V grows. A whole
# tiny-world batch (V = 512: 8192 tokens) is one chunk.
LOGITS_PER_CHUNK = 2**22


def chunk_tokens(vocab_size: int, budget: int = LOGITS_PER_CHUNK) -> int:
    """Tokens per chunk that keep one ``(tokens, V)`` copy within ``budget`` elements (at least 1)."""
    return max(1, budget // vocab_size)


# Weights whose gradient a chunked loss sums in place (elements): above one chunk's budget of
# logits, a per-chunk copy of the gradient would outweigh the chunk itself (IAV's W_a at 7B size:
# 131M elements, 500 MiB). Smaller ones (CALM's maps) are summed by autograd's own kernels, bit for
# bit as before; read when the backward pass runs.
IN_PLACE_GRAD_ELEMENTS = LOGITS_PER_CHUNK


def chunk_ranges(n: int, chunk: int) -> list[tuple[int, int]]:
    """``[start, stop)`` of each chunk of ``chunk`` rows over ``[0, n)``."""
    return [(start, min(n, start + chunk)) for start in range(0, n, chunk)]


def chunked_rows(
    fn: Callable[[int, int], Tensor], n: int, chunk: int, weights: Sequence[Tensor] = ()
) -> Tensor:
    """``fn(start, stop)`` (per-row values ``(stop − start, ...)``) over ``[0, n)`` in chunks of
    ``chunk`` rows, concatenated: ``(n, ...)``.

    The rows are tokens and ``fn`` computes a few scalars per token from vocabulary-sized
    intermediates. When autograd records and there is more than one chunk, only the small outputs
    are kept: the backward pass recomputes one chunk's intermediates at a time
    (:class:`_Recomputed`), so peak memory is set by ``chunk``, not by ``n``. The gradient of a
    linear map's weight of more than :data:`IN_PLACE_GRAD_ELEMENTS` (IAV's ``V x H`` W_a) is summed
    over the chunks in place, in one buffer (:func:`add_weight_grad`), never a second
    weight-sized tensor per chunk; a smaller weight's per-chunk gradient fits in a chunk's own
    budget, and autograd's kernels sum it. ``weights``: every tensor requiring grad that ``fn``
    reads (a head's parameters); with none, the chunks are recorded plainly (correct gradients, no
    saving). (One chunk is run plainly: recomputing it would save nothing.) Rows are independent,
    so the values and gradients are those of one call over all rows, up to the kernels' rounding.
    ``fn`` must be deterministic (it runs twice).
    """
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    if n <= chunk:
        return fn(0, n)
    trainable = [w for w in weights if w.requires_grad]
    if not (torch.is_grad_enabled() and trainable):
        return torch.cat([fn(start, stop) for start, stop in chunk_ranges(n, chunk)])
    return _Recomputed.apply(fn, n, chunk, *trainable)


def add_weight_grad(sink: Tensor | None, grad_out: Tensor, inputs: Tensor, dtype: torch.dtype) -> Tensor:
    """``sink + grad_outᵀ · inputs``: a linear map's weight gradient ``(O, I)`` from one chunk's
    output gradient ``grad_out (..., O)`` and inputs ``(..., I)``, added into ``sink`` in place
    (``sink`` None: a new ``(O, I)`` tensor of ``dtype``, the weight's).

    The products run in ``grad_out``'s dtype, as the linear map computed them (under bf16
    autocast: bf16, then summed in the weight's float32 as autograd's cast would), so that the
    sum equals autograd's sum of the per-chunk gradients up to the kernels' rounding; in the
    weight's own dtype ``addmm_`` adds them without any temporary.
    """
    g = grad_out.reshape(-1, grad_out.shape[-1]).t()
    x = inputs.reshape(-1, inputs.shape[-1]).to(g.dtype)
    if sink is None:
        return g.mm(x).to(dtype)
    if sink.dtype == g.dtype:
        return sink.addmm_(g, x)
    return sink.add_(g.mm(x))


class _GradSink:
    """Where one backward pass's recomputations sum a weight's gradient: ``grad`` (or None)."""

    __slots__ = ("grad",)

    def __init__(self) -> None:
        self.grad: Tensor | None = None


class _LinearIntoSink(torch.autograd.Function):
    """``F.linear(x, weight, bias)`` whose backward adds the weight's gradient into a
    :class:`_GradSink` (:func:`add_weight_grad`) and returns none for the weight itself: the
    recomputing :class:`_Recomputed` hands the summed gradient to autograd once. ``weight`` is an
    input all the same, so that autograd runs this backward when asked for the weight's
    gradient."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, sink: _GradSink) -> Tensor:
        ctx.save_for_backward(x, weight)
        ctx.sink = sink
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, weight = ctx.saved_tensors
        ctx.sink.grad = add_weight_grad(ctx.sink.grad, grad, x, weight.dtype)
        grad_x = grad.matmul(weight.to(grad.dtype)).to(x.dtype) if ctx.needs_input_grad[0] else None
        grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0) if ctx.needs_input_grad[2] else None
        return grad_x, None, grad_bias, None


class _RouteLinears(TorchFunctionMode):
    """While active, ``F.linear`` calls (``nn.Linear``'s) whose weight has a sink go through
    :class:`_LinearIntoSink`; sinks: ``id(weight) -> _GradSink``."""

    def __init__(self, sinks: dict[int, _GradSink]) -> None:
        super().__init__()
        self.sinks = sinks

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:
            x, weight, bias = _linear_args(args, kwargs)
            sink = self.sinks.get(id(weight))
            if sink is not None:
                return _LinearIntoSink.apply(x, weight, bias, sink)
        return func(*args, **kwargs)


def _linear_args(args: tuple, kwargs: dict) -> tuple[Tensor, Tensor, Tensor | None]:
    """``(input, weight, bias)`` of an ``F.linear`` call, positional or by keyword."""
    named = dict(zip(("input", "weight", "bias"), args, strict=False)) | kwargs
    return named["input"], named["weight"], named.get("bias")


def _sum_grads(a: Tensor | None, b: Tensor | None) -> Tensor | None:
    """``a + b`` (in place into ``a``) where both exist, else whichever does."""
    if a is None or b is None:
        return b if a is None else a
    return a.add_(b)


@dataclass(frozen=True)
class _AutocastState:
    """Autocast as the forward pass ran under it, for the backward's recomputation."""

    device_type: str
    enabled: bool
    dtype: torch.dtype
    cache: bool

    @classmethod
    def now(cls, device_type: str) -> _AutocastState:
        return cls(
            device_type,
            torch.is_autocast_enabled(device_type),
            torch.get_autocast_dtype(device_type),
            torch.is_autocast_cache_enabled(),
        )

    def __call__(self) -> torch.autocast:
        return torch.autocast(self.device_type, self.dtype, self.enabled, self.cache)


class _Recomputed(torch.autograd.Function):
    """:func:`chunked_rows` with autograd recording: the forward pass keeps only the concatenated
    outputs; the backward pass recomputes each chunk, routes its linear maps' weight gradients
    into one sink per weight (:class:`_RouteLinears`) and takes the other gradients with
    ``torch.autograd.grad`` (which leaves ``.grad`` alone), then returns each weight's sum once,
    as autograd's own gradient of the weight: gradient accumulation, ``no_sync`` and
    DistributedDataParallel's hooks see one gradient per weight, as for any module."""

    @staticmethod
    def forward(ctx, fn: Callable[[int, int], Tensor], n: int, chunk: int, *weights: Tensor) -> Tensor:
        ctx.fn, ctx.n, ctx.chunk = fn, n, chunk
        # kept on ctx, not saved: the weights are parameters (the graph's inputs, alive anyway), and
        # saved tensors would be offered to any saved-tensor hooks as if the graph held them
        ctx.weights, ctx.versions = weights, [w._version for w in weights]
        ctx.autocast = _AutocastState.now(weights[0].device.type)
        return torch.cat([fn(start, stop) for start, stop in chunk_ranges(n, chunk)])

    @staticmethod
    def backward(ctx, grad: Tensor):
        weights = ctx.weights
        if [w._version for w in weights] != ctx.versions:
            raise RuntimeError(
                "a weight of a chunked loss was modified in place between its forward and backward pass"
            )
        sinks = {id(w): _GradSink() for w in weights if w.numel() > IN_PLACE_GRAD_ELEMENTS}
        others: list[Tensor | None] = [None] * len(weights)
        # last chunk first, as autograd's engine runs checkpointed chunks (the later first): the
        # gradients it sums add up in the same order, so they equal its sums bit for bit
        for start, stop in reversed(chunk_ranges(ctx.n, ctx.chunk)):
            # the recomputation's saved tensors are transient, not the graph's: outer saved-tensor
            # hooks do not see them (as for torch.utils.checkpoint)
            with torch.enable_grad(), ctx.autocast(), _RouteLinears(sinks), _identity_saved_tensors():
                part = ctx.fn(start, stop)
            if not part.requires_grad:
                continue
            grads = torch.autograd.grad(part, weights, grad[start:stop], allow_unused=True)
            others = [_sum_grads(a, b) for a, b in zip(others, grads, strict=True)]
            del part, grads
        summed = [_sum_grads(_sunk(sinks, w), other) for w, other in zip(weights, others, strict=True)]
        return (None, None, None, *summed)


def _sunk(sinks: dict[int, _GradSink], weight: Tensor) -> Tensor | None:
    """The gradient summed into ``weight``'s sink, if it has one."""
    sink = sinks.get(id(weight))
    return None if sink is None else sink.grad


def _identity_saved_tensors() -> torch.autograd.graph.saved_tensors_hooks:
    return torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t)


# --------------------------------------------------------------------------- totals


@dataclass(frozen=True)
class PreferenceLogps:
    """Summed response log-probs, each ``(B,)``: policy (π at α = 1) and reference."""

    policy_chosen: Tensor
    policy_rejected: Tensor
    ref_chosen: Tensor
    ref_rejected: Tensor

    def dpo(self, beta: float) -> DPOOutput:
        return dpo_loss(self.policy_chosen, self.policy_rejected, self.ref_chosen, self.ref_rejected, beta)


@dataclass(frozen=True)
class IAVWeights:
    """IAV loss weights (seed defaults)."""

    beta: float = 0.1
    kl: float = 0.1
    l2: float = 0.01


@dataclass(frozen=True)
class CALMWeights:
    """CALM loss weights (seed defaults)."""

    beta: float = 0.1
    l2: float = 0.001
    var: float = 0.01
    ent: float = 0.01


@dataclass(frozen=True)
class IAVLoss:
    """IAV total and its components (scalars) plus the per-pair DPO output."""

    loss: Tensor
    pref: Tensor
    kl: Tensor
    l2: Tensor
    dpo: DPOOutput = field(repr=False)


@dataclass(frozen=True)
class CALMLoss:
    """CALM total and its components (scalars) plus the per-pair DPO output."""

    loss: Tensor
    pref: Tensor
    l2: Tensor
    strength_var: Tensor
    entropy: Tensor
    dpo: DPOOutput = field(repr=False)


def iav_loss(
    logps: PreferenceLogps,
    kl_chosen: Tensor,
    kl_rejected: Tensor,
    align_sq_norm: Tensor,
    weights: IAVWeights = IAVWeights(),  # noqa: B008 - frozen dataclass
) -> IAVLoss:
    """``L = mean_b L_pref + λ_kl · ½(KL_chosen + KL_rejected) + λ_l2 · mean‖a_t‖²``.

    logps: ``(B,)`` summed response log-probs (policy at α = 1); kl_chosen / kl_rejected:
    scalars, mean per-token KL of the base head to the reference over the response
    prediction positions of the chosen / rejected sequences (:func:`exact_kl` or
    :func:`topk_tail_kl` then :func:`masked_mean`); align_sq_norm: scalar
    ``mean‖a_t‖²`` (:func:`mean_squared_norm` of ``W_a h_t``).
    """
    dpo = logps.dpo(weights.beta)
    pref = dpo.losses.mean()
    kl = 0.5 * (_wide(kl_chosen) + _wide(kl_rejected))
    l2 = _wide(align_sq_norm)
    loss = pref + weights.kl * kl + weights.l2 * l2
    return IAVLoss(loss=loss, pref=pref, kl=kl, l2=l2, dpo=dpo)


def calm_loss(
    logps: PreferenceLogps,
    modulation_sq_norm: Tensor,
    strength_var: Tensor,
    entropy: Tensor,
    weights: CALMWeights = CALMWeights(),  # noqa: B008 - frozen dataclass
) -> CALMLoss:
    """``L = mean_b L_pref + λ_l2 · mean‖v_t‖² − λ_var · Var(s) − λ_ent · mean H(π_t)``.

    logps: ``(B,)`` summed response log-probs (policy at α = 1); modulation_sq_norm:
    scalar ``mean‖v_t‖²``; strength_var: scalar ``Var(s_t)`` (:func:`masked_variance`);
    entropy: scalar ``mean H(π_t)`` of the policy at α = 1 (:func:`mean_entropy`), all over
    the response prediction positions.
    """
    dpo = logps.dpo(weights.beta)
    pref = dpo.losses.mean()
    l2, var, ent = _wide(modulation_sq_norm), _wide(strength_var), _wide(entropy)
    loss = pref + weights.l2 * l2 - weights.var * var - weights.ent * ent
    return CALMLoss(loss=loss, pref=pref, l2=l2, strength_var=var, entropy=ent, dpo=dpo)
