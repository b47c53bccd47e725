"""The losses on small hand-computed inputs, and the top-k + tail KL's bound as a property."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from alignheads.models.losses import (
    CALMWeights,
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
    prediction_mask,
    sequence_logprobs,
    token_logprobs,
    topk_extrapolated_kl,
    topk_sampled_kl,
    topk_tail_kl,
)

LN = math.log
T = torch.tensor


def close(a: torch.Tensor, b: float | list, tol: float = 1e-6) -> bool:
    return torch.allclose(a.double(), torch.as_tensor(b, dtype=torch.float64), atol=tol, rtol=0)


def test_sequence_logprobs_shift_by_one_and_mask_the_prompt() -> None:
    """V = 2, tokens [0, 1, 0, 1]; logits at t: [0, 0], [ln 3, 0], [0, ln 3], [9, 9].
    softmax: [½, ½], [¾, ¼], [¼, ¾]. The logits at t score token t + 1:
    t=0 → token 1: ln ½;  t=1 → token 0: ln ¾;  t=2 → token 1: ln ¾; t=3 scores nothing.
    Response = tokens 2, 3 (token 1 is prompt): ln ¾ + ln ¾ = ln(9/16) = −0.575364.
    Response = tokens 1..3: ln ½ + 2 ln ¾ = ln(9/32) = −1.268511."""
    logits = T([[[0.0, 0.0], [LN(3), 0.0], [0.0, LN(3)], [9.0, 9.0]]])
    ids = T([[0, 1, 0, 1]])
    assert close(token_logprobs(logits[:, :-1], ids[:, 1:]), [[LN(0.5), LN(0.75), LN(0.75)]])
    assert close(sequence_logprobs(logits, ids, T([[0, 0, 1, 1]])), [LN(9 / 16)])
    assert close(sequence_logprobs(logits, ids, T([[0, 1, 1, 1]])), [LN(9 / 32)])
    # padding (mask 0) is ignored even where its logits are garbage
    bad = logits.clone()
    bad[0, 0] = float("nan")
    assert close(sequence_logprobs(bad, ids, T([[0, 0, 1, 1]])), [LN(9 / 16)])
    assert prediction_mask(T([[0, 0, 1, 1]])).tolist() == [[False, True, True, False]]


def test_dpo_loss_and_rewards() -> None:
    """β = 0.1; π: chosen −1, rejected −3; ref: −2, −2.
    chosen reward = 0.1·(−1 − (−2)) = 0.1; rejected = 0.1·(−3 − (−2)) = −0.1; margin 0.2;
    loss = −ln σ(0.2) = ln(1 + e^−0.2) = ln(1.818730753) = 0.598138869.
    Second pair: all equal → margin 0 → ln 2 = 0.693147181."""
    out = dpo_loss(T([-1.0, -5.0]), T([-3.0, -5.0]), T([-2.0, -5.0]), T([-2.0, -5.0]), beta=0.1)
    assert close(out.chosen_rewards, [0.1, 0.0]) and close(out.rejected_rewards, [-0.1, 0.0])
    assert close(out.losses, [0.598138869, LN(2)])
    assert close(out.margins, [0.2, 0.0])


def test_exact_kl() -> None:
    """p = [½, ½], q = softmax([ln 3, 0]) = [¾, ¼]:
    KL = ½ ln(½/¾) + ½ ln(½/¼) = ½ ln(4/3) = 0.143841036.
    p = softmax([0, −inf]) = [1, 0] (0 · log 0 = 0), q = [½, ½]: KL = ln 2."""
    assert close(exact_kl(T([[0.0, 0.0]]), T([[LN(3), 0.0]])), [0.143841036])
    assert close(exact_kl(T([0.0, float("-inf")]), T([0.0, 0.0])), LN(2))
    assert close(exact_kl(T([1.0, 2.0, 3.0]), T([1.0, 2.0, 3.0])), 0.0)


def test_topk_tail_kl_by_hand() -> None:
    """p_ref = [.5, .25, .125, .125], q = [.25, .25, .4, .1], top-2 ids [0, 1].
    head  = .5 ln(.5/.25) + .25 ln(.25/.25)            = .5 ln 2     = 0.346574
    tail: r = .25, r_q = .4 + .1 = .5 → .25 ln(.25/.5) = −.25 ln 2   = −0.173287
    total = .25 ln 2 = 0.173287.
    Exact: .346574 + .125 ln(.125/.4) + .125 ln(.125/.1) = .346574 − .117501 = 0.229073."""
    ref_lp = torch.log(T([0.5, 0.25, 0.125, 0.125]))
    policy = torch.log(T([0.25, 0.25, 0.4, 0.1]))
    ids = T([0, 1])
    assert close(topk_tail_kl(ids, ref_lp[ids], policy), 0.25 * LN(2))
    assert close(exact_kl(ref_lp, policy), 0.229073, tol=1e-6)
    # order of the ids does not matter; k = V gives the exact KL
    assert close(topk_tail_kl(T([1, 0]), ref_lp[T([1, 0])], policy), 0.25 * LN(2))
    all_ids = T([2, 0, 3, 1])
    assert close(topk_tail_kl(all_ids, ref_lp[all_ids], policy), 0.229073)


def test_topk_tail_kl_gradients_are_finite_also_without_tail() -> None:
    policy = torch.randn(3, 5, requires_grad=True)
    ref_lp = torch.log_softmax(torch.randn(3, 5), -1)
    ids = torch.argsort(ref_lp, -1, descending=True)
    for k in (2, 5):
        policy.grad = None
        topk_tail_kl(ids[:, :k], ref_lp.gather(-1, ids[:, :k]), policy).sum().backward()
        assert torch.isfinite(policy.grad).all()


@settings(max_examples=150, deadline=None)
@given(
    vocab=st.integers(2, 12),
    data=st.data(),
    scale=st.floats(0.1, 8.0),
)
def test_topk_tail_kl_never_exceeds_exact_and_equals_it_at_full_k(vocab: int, data, scale: float) -> None:
    seed = data.draw(st.integers(0, 2**31 - 1))
    k = data.draw(st.integers(1, vocab))
    gen = torch.Generator().manual_seed(seed)
    ref = torch.randn(4, vocab, generator=gen, dtype=torch.float64) * scale
    policy = torch.randn(4, vocab, generator=gen, dtype=torch.float64) * scale
    ref_lp = torch.log_softmax(ref, -1)
    top_lp, top_ids = ref_lp.topk(k, dim=-1)
    estimate = topk_tail_kl(top_ids, top_lp, policy)
    exact = exact_kl(ref, policy)
    assert (estimate >= -1e-12).all()
    assert (estimate <= exact + 1e-9).all()
    if k == vocab:
        assert torch.allclose(estimate, exact, atol=1e-9, rtol=0)


def test_topk_extrapolated_kl_by_hand() -> None:
    """The example above: p_ref = [.5, .25, .125, .125], q = [.25, .25, .4, .1], top-2 ids [0, 1].
    P = .75 (reference mass on the ids), Q = .5 (policy's), r = .25, r_q = .5; head = .5 ln 2:
    head / P + r (ln(r/P) − ln(r_q/Q)) = ⅔ ln 2 + ¼ (ln ⅓ − ln 1) = ⅔ ln 2 − ¼ ln 3 = 0.187445.
    The same as top-k + tail (¼ ln 2) + r · KL(p̄ ‖ q̄) with p̄ = [⅔, ⅓], q̄ = [½, ½]:
    ¼ ln 2 + ¼ (⅔ ln(4/3) + ⅓ ln(2/3)) = 0.173287 + 0.014158. Exact: 0.229073 (the tail's
    own KL, ¼ KL([½, ½] ‖ [.8, .2]) = 0.055786, is larger than the top's here)."""
    ref_lp = torch.log(T([0.5, 0.25, 0.125, 0.125]))
    policy = torch.log(T([0.25, 0.25, 0.4, 0.1]))
    ids = T([0, 1])
    want = 2 / 3 * LN(2) - 0.25 * LN(3)
    assert close(topk_extrapolated_kl(ids, ref_lp[ids], policy), want)
    within = 2 / 3 * LN(4 / 3) + 1 / 3 * LN(2 / 3)
    assert close(topk_tail_kl(ids, ref_lp[ids], policy) + 0.25 * within, want)
    all_ids = T([2, 0, 3, 1])  # k = V: the exact KL
    assert close(topk_extrapolated_kl(all_ids, ref_lp[all_ids], policy), 0.229073)


def test_topk_extrapolated_kl_is_exact_when_the_tail_looks_like_the_top() -> None:
    """p ∝ [4, 2, 1.6, .8] (the tail [1.6, .8] ∝ the top [4, 2]) and q ∝ p · [e, 1, e, 1] (the same
    log-ratio pattern in both): KL(p̃ ‖ q̃) = KL(p̄ ‖ q̄), so the estimate is the exact KL,
    ln Z − Σ p ln w with Z = Σ p w = (2e + 1)/3 and Σ p ln w = 5.6/8.4 = ⅔: 0.096712; the
    top-k + tail KL misses the tail's share."""
    p = torch.tensor([4.0, 2.0, 1.6, 0.8], dtype=torch.float64) / 8.4
    q = p * torch.tensor([math.e, 1.0, math.e, 1.0], dtype=torch.float64)
    ids = torch.tensor([0, 1])
    want = math.log((2 * math.e + 1) / 3) - 2 / 3
    assert close(exact_kl(p.log(), q.log()), want, tol=1e-12)
    assert close(topk_extrapolated_kl(ids, p.log()[ids], q.log()), want, tol=1e-12)
    assert topk_tail_kl(ids, p.log()[ids], q.log()).item() < want - 0.01


def test_topk_extrapolated_kl_gradients_are_finite_also_without_tail() -> None:
    policy = torch.randn(3, 5, requires_grad=True)
    ref_lp = torch.log_softmax(torch.randn(3, 5), -1)
    ids = torch.argsort(ref_lp, -1, descending=True)
    for k in (1, 2, 5):
        policy.grad = None
        topk_extrapolated_kl(ids[:, :k], ref_lp.gather(-1, ids[:, :k]), policy).sum().backward()
        assert torch.isfinite(policy.grad).all()


@settings(max_examples=150, deadline=None)
@given(vocab=st.integers(2, 12), data=st.data(), scale=st.floats(0.1, 8.0))
def test_topk_extrapolated_kl_adds_a_non_negative_tail_part_and_is_exact_at_full_k(
    vocab: int, data, scale: float
) -> None:
    seed = data.draw(st.integers(0, 2**31 - 1))
    k = data.draw(st.integers(1, vocab))
    gen = torch.Generator().manual_seed(seed)
    ref_lp = torch.log_softmax(torch.randn(4, vocab, generator=gen, dtype=torch.float64) * scale, -1)
    policy = torch.randn(4, vocab, generator=gen, dtype=torch.float64) * scale
    top_lp, top_ids = ref_lp.topk(k, dim=-1)
    extrapolated = topk_extrapolated_kl(top_ids, top_lp, policy)
    assert (extrapolated >= topk_tail_kl(top_ids, top_lp, policy) - 1e-9).all()
    if k == vocab:
        assert torch.allclose(extrapolated, exact_kl(ref_lp, policy), atol=1e-9, rtol=0)


def test_topk_sampled_kl_by_hand() -> None:
    """The example above (top-2 ids [0, 1], r = ¼, head = ½ ln 2; the tail ids 2 and 3 each hold
    half the tail's mass): one draw of id 2 gives ½ ln 2 + ¼ ln(.125/.4) = 0.055786; one draw of
    each, which is the draws' expectation here, the exact KL 0.229073."""
    ref_lp = torch.log(T([0.5, 0.25, 0.125, 0.125]))
    policy = torch.log(T([0.25, 0.25, 0.4, 0.1]))
    ids = T([0, 1])
    one = T([2])
    assert close(topk_sampled_kl(ids, ref_lp[ids], one, ref_lp[one], policy), 0.5 * LN(2) + 0.25 * LN(0.3125))
    both = T([2, 3])
    assert close(topk_sampled_kl(ids, ref_lp[ids], both, ref_lp[both], policy), 0.229073)
    # the top k cover the vocabulary: r = 0, the exact KL whatever was drawn
    all_ids = T([2, 0, 3, 1])
    assert close(topk_sampled_kl(all_ids, ref_lp[all_ids], one, ref_lp[one], policy), 0.229073)


@settings(max_examples=100, deadline=None)
@given(vocab=st.integers(3, 12), data=st.data(), scale=st.floats(0.1, 6.0))
def test_topk_sampled_kl_is_unbiased_in_value_and_gradient(vocab: int, data, scale: float) -> None:
    """Averaged over the draw of a tail id, i ~ p̃ (the reference outside its top k), the estimate
    and its gradient in the policy's logits are the exact KL's, to float64 rounding: the weighted
    sum over every tail id of the one-draw estimate is the expectation, with no sampling noise."""
    seed = data.draw(st.integers(0, 2**31 - 1))
    k = data.draw(st.integers(1, vocab - 1))
    gen = torch.Generator().manual_seed(seed)
    ref_lp = torch.log_softmax(torch.randn(vocab, generator=gen, dtype=torch.float64) * scale, -1)
    policy = (torch.randn(vocab, generator=gen, dtype=torch.float64) * scale).requires_grad_()
    top_lp, top_ids = ref_lp.topk(k)
    tail = torch.ones(vocab, dtype=torch.bool).scatter(0, top_ids, False).nonzero().squeeze(1)
    p_tail = ref_lp[tail].exp() / ref_lp[tail].exp().sum()
    expected = sum(
        w * topk_sampled_kl(top_ids, top_lp, i.view(1), ref_lp[i].view(1), policy)
        for w, i in zip(p_tail, tail, strict=True)
    )
    exact = exact_kl(ref_lp, policy)
    assert torch.allclose(expected, exact, atol=1e-10, rtol=1e-9)
    (grad_expected,) = torch.autograd.grad(expected, policy)
    (grad_exact,) = torch.autograd.grad(exact, policy)
    assert torch.allclose(grad_expected, grad_exact, atol=1e-10, rtol=1e-9)


def test_reductions() -> None:
    """‖[3, 4]‖² = 25 (the masked-out [1, 1] is ignored).
    Var of [1, 2, 3] (100 masked out): mean 2, ((1)² + 0 + (1)²)/3 = 2/3.
    Entropy of softmax([0, 0]) = ln 2, of softmax([0, −inf]) = 0: mean ln 2 / 2 = 0.346574."""
    assert close(mean_squared_norm(T([[3.0, 4.0], [1.0, 1.0]]), T([1, 0])), 25.0)
    assert close(masked_variance(T([1.0, 2.0, 3.0, 100.0]), T([1, 1, 1, 0])), 2 / 3)
    assert close(mean_entropy(T([[0.0, 0.0], [0.0, float("-inf")]]), T([1, 1])), LN(2) / 2)
    assert close(masked_mean(T([1.0, float("nan"), 5.0]), T([1, 0, 1])), 3.0)
    assert close(masked_mean(T([1.0]), T([0])), 0.0)


def test_iav_total() -> None:
    """DPO pair from test_dpo_loss_and_rewards (0.598138869); KL_chosen .2, KL_rejected .4,
    mean‖a‖² = 3: L = .598138869 + 0.1 · ½(.2 + .4) + 0.01 · 3 = .598138869 + .03 + .03
    = 0.658138869."""
    logps = PreferenceLogps(T([-1.0]), T([-3.0]), T([-2.0]), T([-2.0]))
    out = iav_loss(logps, T(0.2), T(0.4), T(3.0))
    assert close(out.loss, 0.658138869) and close(out.kl, 0.3) and close(out.l2, 3.0)
    assert close(out.pref, 0.598138869)
    assert (out.dpo.margins > 0).float().mean().item() == 1.0
    assert out.dpo.margins.mean().item() == pytest.approx(0.2)
    custom = iav_loss(logps, T(0.2), T(0.4), T(3.0), IAVWeights(beta=0.1, kl=1.0, l2=0.0))
    assert close(custom.loss, 0.598138869 + 0.3)


def test_calm_total() -> None:
    """Same DPO pair (0.598138869); mean‖v‖² = 5, Var(s) = 2, mean H = 1.5:
    L = .598138869 + 0.001·5 − 0.01·2 − 0.01·1.5 = .598138869 + .005 − .02 − .015 = 0.568138869."""
    logps = PreferenceLogps(T([-1.0]), T([-3.0]), T([-2.0]), T([-2.0]))
    out = calm_loss(logps, T(5.0), T(2.0), T(1.5))
    assert close(out.loss, 0.568138869)
    assert close(out.pref, 0.598138869) and close(out.l2, 5.0)
    assert close(out.strength_var, 2.0) and close(out.entropy, 1.5)
    assert (out.dpo.margins > 0).float().mean().item() == 1.0
    assert CALMWeights() == CALMWeights(beta=0.1, l2=0.001, var=0.01, ent=0.01)
    assert IAVWeights() == IAVWeights(beta=0.1, kl=0.1, l2=0.01)


def test_preference_accuracy_counts_ties_as_half():
    from alignheads.models.losses import preference_accuracy

    # 2 clear wins, 1 clear loss, 1 rounding-noise margin (a tie): (2 + 0.5) / 4
    assert preference_accuracy(torch.tensor([0.3, 1e-6, -0.2, 2.0])) == 0.625
    # a policy equal to the reference (all margins rounding noise) scores exactly chance
    assert preference_accuracy(torch.tensor([1e-7, -3e-6, 0.0])) == 0.5
    assert preference_accuracy(torch.tensor([0.01, 0.02]), tie=0.015) == 0.75


def test_topk_tail_kl_zero_reference_probability_is_not_nan() -> None:
    """A cached top-k log-prob of −inf (reference probability 0) contributes 0 · log 0 = 0, as in
    exact_kl. p_ref = [½, ½, 0], q = softmax([0, 0, 0]) = [⅓, ⅓, ⅓]:
    KL = 2 · ½ ln(½ / ⅓) = ln 1.5 = 0.405465.
    With all three ids cached the tail is empty; with ids [0, 2] the tail is {1}:
    head = ½ ln(½/⅓) + 0, r = ½, r_q = ⅓, tail = ½ ln(½/⅓) → ln 1.5 again.
    Before the fix both gave NaN (0 · (−inf))."""
    neg_inf = float("-inf")
    policy = torch.zeros(3, requires_grad=True)
    ref_lp = T([LN(0.5), LN(0.5), neg_inf])
    assert close(exact_kl(ref_lp, policy.detach()), LN(1.5))
    full = topk_tail_kl(T([0, 1, 2]), ref_lp, policy)
    assert close(full, LN(1.5))
    partial_ids = T([0, 2])
    partial = topk_tail_kl(partial_ids, ref_lp[partial_ids], policy)
    assert close(partial, LN(1.5))
    # the gradient stays finite too: d/dz of KL(p ‖ softmax z) = softmax z − p = [−⅙, −⅙, ⅓]
    partial.backward()
    assert close(policy.grad, [-1 / 6, -1 / 6, 1 / 3])
    # batched, float64, and a policy that is −inf where the reference is 0 as well
    batch = topk_tail_kl(
        T([[0, 1, 2], [2, 0, 1]]),
        T([[LN(0.5), LN(0.5), neg_inf], [neg_inf, LN(0.5), LN(0.5)]], dtype=torch.float64),
        T([[0.0, 0.0, neg_inf], [0.0, 0.0, neg_inf]], dtype=torch.float64),
    )
    assert close(batch, [0.0, 0.0], tol=1e-12)
