"""The training objective's pure pieces on hand-computed numbers."""

from __future__ import annotations

import math

import pytest
import torch

from alignheads.models.calm import CALMOutput
from alignheads.models.losses import CALMWeights
from alignheads.models.objectives import PairBatch, calm_objective, chosen_nll, response_logps


def _batch() -> PairBatch:
    # 1 pair: chosen row 0 scores targets [0, 1]; rejected row 1 scores target [1] only
    return PairBatch(
        targets=torch.tensor([[0, 1], [1, 0]]),
        mask=torch.tensor([[True, True], [True, False]]),
        ref_logps=torch.tensor([math.log(0.5) * 2, math.log(0.5)]),
    )


def test_response_logps_and_chosen_nll_by_hand():
    """Uniform logits over V = 2: every token has log-prob ln ½, so the chosen row sums
    2·ln ½ and the rejected row ln ½; the chosen per-token NLL is ln 2."""
    logits = torch.zeros(2, 2, 2)
    assert torch.allclose(response_logps(logits, _batch()), torch.tensor([2 * math.log(0.5), math.log(0.5)]))
    assert chosen_nll(logits, _batch()).item() == pytest.approx(math.log(2), abs=1e-6)
    # chosen tokens [0, 1] with p = 0.8 and 0.5 (logits ln 4 vs 0, then equal): NLL = −(ln .8 + ln .5)/2
    peaked = torch.tensor([[[math.log(4), 0.0], [0.0, 0.0]], [[0.0, 0.0], [0.0, 0.0]]])
    want = -(math.log(0.8) + math.log(0.5)) / 2
    assert abs(chosen_nll(peaked, _batch()).item() - want) < 1e-6


def test_nll_anchor_adds_exactly_its_weighted_term():
    """At initialisation (v = 0) the CALM loss is ln 2 − λ_ent·H = ln 2 − 0.01·ln 2 over uniform
    logits; λ_nll = 1 adds the chosen NLL, ln 2."""
    out = CALMOutput(
        base_logits=torch.zeros(2, 2, 2), modulation=torch.zeros(2, 2, 2), strength=torch.ones(2, 2)
    )
    plain = calm_objective(out, _batch(), CALMWeights())
    anchored = calm_objective(out, _batch(), CALMWeights(), nll_weight=1.0)
    assert abs(plain.loss.item() - (math.log(2) - 0.01 * math.log(2))) < 1e-6
    assert abs(anchored.loss.item() - plain.loss.item() - math.log(2)) < 1e-6
    assert anchored.pref.item() == plain.pref.item()


def test_iav_preference_and_anchor_train_the_alignment_head_only():
    """The IAV policy is sg(W_b h) + W_a h: with λ_kl = 0 the base logits get no gradient from the
    preference loss or the NLL anchor, the alignment logits do; the KL term alone reaches the
    base logits, and the loss value is the same as without the stop-gradient."""
    from alignheads.models.iav import IAVOutput
    from alignheads.models.losses import IAVWeights
    from alignheads.models.objectives import iav_objective

    torch.manual_seed(0)
    base = torch.randn(2, 2, 2, requires_grad=True)
    align = torch.randn(2, 2, 2, requires_grad=True)
    kl = (base**2).sum(-1)  # any (2B, R) function of the base logits stands in for the KL
    no_kl = IAVWeights(kl=0.0, l2=0.0)
    loss = iav_objective(IAVOutput(base_logits=base, align_logits=align), _batch(), kl, no_kl, nll_weight=1.0)
    loss.loss.backward()
    assert base.grad is None or torch.count_nonzero(base.grad) == 0
    assert torch.count_nonzero(align.grad) > 0

    base.grad, align.grad = None, None
    kl = (base**2).sum(-1)
    only_kl = iav_objective(IAVOutput(base_logits=base, align_logits=align), _batch(), kl, IAVWeights(l2=0.0))
    (only_kl.loss - only_kl.pref).backward()  # the KL part: reaches W_b
    assert torch.count_nonzero(base.grad) > 0

    # values are those of the plain policy W_b h + W_a h
    from alignheads.models.objectives import preference_logps

    p = preference_logps((base + align).detach(), _batch())
    margin = (p.policy_chosen - p.ref_chosen) - (p.policy_rejected - p.ref_rejected)
    want = -torch.nn.functional.logsigmoid(0.1 * margin).mean()
    assert loss.pref.item() == pytest.approx(want.item(), abs=1e-6)
