"""GenARM-style decoding and the reward LM's loss: the combination rule on hand-computed logits,
the two-model decoder (KV caches vs a full recomputation, sampling parity with `generate()`)."""

from __future__ import annotations

import math
from functools import partial

import pytest
import torch

from alignheads.models.genarm import genarm_generate, genarm_logits
from alignheads.models.guided import guided_decode
from alignheads.models.losses import exact_kl
from alignheads.models.objectives import (
    PairBatch,
    dpo_objective,
    reward_lm_loss,
    reward_lm_objective,
)
from tests.helpers.tiny_models import EOS, PAD, left_padded_batch, tiny_llama


def test_genarm_rule_on_hand_computed_logits():
    base = torch.tensor([[0.0, 0.0]])  # π_base = (1/2, 1/2)
    reward = torch.tensor([[math.log(3.0), 0.0]])  # π_r = (3/4, 1/4)
    out = genarm_logits(base, reward, alpha=2.0)
    # log(1/2) + 2 log(3/4), log(1/2) + 2 log(1/4)  ->  π ∝ (9/16, 1/16) = (0.9, 0.1)
    expected = torch.tensor([[math.log(0.5) + 2 * math.log(0.75), math.log(0.5) + 2 * math.log(0.25)]])
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(torch.softmax(out, -1), torch.tensor([[0.9, 0.1]]))
    # α = 0 is the base distribution; the rule ignores each model's logit offset
    torch.testing.assert_close(
        torch.softmax(genarm_logits(base, reward, 0.0), -1), torch.tensor([[0.5, 0.5]])
    )
    torch.testing.assert_close(genarm_logits(base + 7.0, reward - 3.0, 2.0), expected)
    assert genarm_logits(base.half(), reward.half(), 1.0).dtype == torch.float32


def test_genarm_rule_at_alpha_zero_with_minus_inf_reward_logits():
    """α = 0 is the base exactly, even where the reward LM's logit is −inf (π_r = 0 there):
    0 · (−inf) would be NaN. base (0, ln 3) → log π_base = (ln ¼, ln ¾); reward (0, −inf).
    Before the fix the second entry came out NaN."""
    base = torch.tensor([[0.0, math.log(3.0)]])
    reward = torch.tensor([[0.0, float("-inf")]])
    expected = torch.tensor([[math.log(0.25), math.log(0.75)]])
    torch.testing.assert_close(genarm_logits(base, reward, 0.0), expected)
    torch.testing.assert_close(genarm_logits(base.double(), reward.double(), 0.0), expected.double())
    assert genarm_logits(base.half(), reward.half(), 0.0).dtype == torch.float32
    # α = 1: log ¼ + 0, log ¾ − inf → π = (1, 0), no NaN
    out = genarm_logits(base, reward, 1.0)
    assert out[0, 0] == pytest.approx(math.log(0.25)) and out[0, 1] == float("-inf")
    torch.testing.assert_close(torch.softmax(out, -1), torch.tensor([[1.0, 0.0]]))


def test_reward_lm_loss_on_hand_computed_logprobs():
    out = reward_lm_loss(torch.tensor([-2.0, -4.0]), torch.tensor([-5.0, -3.0]), beta=0.5)
    # margins 0.5·3 = 1.5 and 0.5·(−1) = −0.5; loss = log(1 + e^{−margin})
    torch.testing.assert_close(
        out.losses, torch.tensor([math.log1p(math.exp(-1.5)), math.log1p(math.exp(0.5))])
    )
    torch.testing.assert_close(out.chosen_rewards, torch.tensor([-1.0, -2.0]))


def _one_pair_batch() -> PairBatch:
    """One pair, one response token each, vocabulary 2: chosen takes token 0 under logits
    (ln 3, 0) -> log 3/4; rejected takes token 1 under (0, 0) -> log 1/2."""
    return PairBatch(
        targets=torch.tensor([[0], [1]]),
        mask=torch.ones(2, 1, dtype=torch.bool),
        ref_logps=torch.tensor([math.log(0.25), math.log(0.5)]),
    )


def test_reward_lm_and_dpo_objectives_on_hand_computed_logits():
    batch = _one_pair_batch()
    logits = torch.tensor([[[math.log(3.0), 0.0]], [[0.0, 0.0]]])
    beta = 0.5
    arm = reward_lm_objective(logits, batch, beta)  # reference-free: β(ln 3/4 − ln 1/2) = β ln 1.5
    torch.testing.assert_close(arm.dpo.margins, torch.tensor([beta * math.log(1.5)]))
    torch.testing.assert_close(arm.loss, torch.tensor(math.log1p(1.5**-beta)))
    dpo = dpo_objective(logits, batch, beta)  # β[(ln 3/4 − ln 1/4) − (ln 1/2 − ln 1/2)] = β ln 3
    torch.testing.assert_close(dpo.dpo.margins, torch.tensor([beta * math.log(3.0)]))
    torch.testing.assert_close(dpo.loss, torch.tensor(math.log1p(3.0**-beta)))
    anchored = dpo_objective(logits, batch, beta, nll=2.0)  # + 2 · (−ln 3/4)
    torch.testing.assert_close(anchored.loss, dpo.loss - 2.0 * math.log(0.75))


@pytest.fixture(scope="module")
def models():
    return tiny_llama(tied=False, seed=0), tiny_llama(tied=False, seed=1)


def _recompute(base, other, ids, mask, combine, steps):
    """Greedy decoding without KV caches: both models re-run over the whole sequence each step."""
    kls = []
    for _ in range(steps):
        pos = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
        zb = base(input_ids=ids, attention_mask=mask, position_ids=pos).logits[:, -1].float()
        zo = other(input_ids=ids, attention_mask=mask, position_ids=pos).logits[:, -1].float()
        scores = combine(zb, zo)
        kls.append(exact_kl(scores, zb))
        ids = torch.cat([ids, scores.argmax(-1, keepdim=True)], dim=-1)
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=-1)
    return ids, torch.stack(kls, 1)


@torch.no_grad()
def test_cached_decoding_equals_full_recomputation(models):
    base, reward_lm = models
    ids, mask = left_padded_batch([3, 7, 5], seed=3)
    combine = partial(genarm_logits, alpha=1.5)
    out = guided_decode(base, reward_lm, ids, mask, genarm_logits, 1.5, max_new_tokens=8)
    expected, kl = _recompute(base, reward_lm, ids, mask, combine, 8)
    assert torch.equal(out.sequences, expected)
    torch.testing.assert_close(out.kl_to_base, kl, atol=1e-5, rtol=1e-4)
    assert (out.kl_to_base > 0).all()
    # genarm_generate is the same decoder; a lone prompt decodes as it does inside the batch
    seqs = genarm_generate(base, reward_lm, ids, mask, alpha=1.5, max_new_tokens=8)
    assert torch.equal(seqs, out.sequences)
    alone = genarm_generate(base, reward_lm, ids[1:2, -7:], mask[1:2, -7:], alpha=1.5, max_new_tokens=8)
    assert torch.equal(alone[0], out.sequences[1, -15:])


@torch.no_grad()
def test_sampling_matches_generate_with_the_same_seed(models):
    """With a rule that returns the base logits, the decoder samples exactly what `generate()`
    samples from the same seed (temperature, top-p, EOS, padding): the sweep's common random
    numbers hold across heads and baselines."""
    base, other = models
    ids, mask = left_padded_batch([4, 6, 2, 5], seed=5)
    # two frequent words as end tokens, so rows finish at different steps and get padded
    settings = {"max_new_tokens": 12, "do_sample": True, "temperature": 0.8, "top_p": 0.9}
    stop = {"eos_token_id": [62, 5], "pad_token_id": PAD}
    torch.manual_seed(123)
    ours = guided_decode(base, other, ids, mask, lambda zb, zo, a: zb, 0.0, **stop, **settings).sequences
    torch.manual_seed(123)
    theirs = base.generate(ids, attention_mask=mask, top_k=0, **stop, **settings)
    assert torch.equal(ours, theirs)
    new = ours[:, ids.shape[1] :]
    assert ((new == 62) | (new == 5)).any(dim=1).all() and (new == PAD).any()


def test_decoder_rejects_bad_settings(models):
    base, other = models
    ids, mask = left_padded_batch([3], seed=0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        guided_decode(base, other, ids, mask, genarm_logits, 1.0, max_new_tokens=0)
    with pytest.raises(ValueError, match="pad_token_id"):
        guided_decode(base, other, ids, mask, genarm_logits, 1.0, max_new_tokens=2, eos_token_id=EOS)
