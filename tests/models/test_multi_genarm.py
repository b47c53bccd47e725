"""Multi-objective GenARM: K reward LMs, ``log π_base + Σ_i α_i log π_r_i`` per step, one KV cache each."""

from __future__ import annotations

import math
from functools import partial

import pytest
import torch

from alignheads.models import multi_genarm_decoder, multi_genarm_generate, multi_genarm_logits
from alignheads.models.aligned import plain_generation_config
from alignheads.models.genarm import genarm_logits
from alignheads.models.guided import multi_guided_decode
from alignheads.models.losses import exact_kl
from alignheads.models.row_sampling import seeded_decoding
from tests.helpers.tiny_models import PAD, left_padded_batch, tiny_llama

LN = math.log


def test_rule_on_hand_computed_logits() -> None:
    """π_base = (1/2, 1/2), π_r1 = (3/4, 1/4), π_r2 = (1/4, 3/4); α = (2, 1):
    π ∝ (1/2 · 9/16 · 1/4, 1/2 · 1/16 · 3/4) ∝ (3/4, 1/4)."""
    base = torch.tensor([[0.0, 0.0]])
    rewards = [torch.tensor([[LN(3.0), 0.0]]), torch.tensor([[0.0, LN(3.0)]])]
    out = multi_genarm_logits(base, rewards, [2.0, 1.0])
    expected = torch.tensor([[LN(0.5) + 2 * LN(0.75) + LN(0.25), LN(0.5) + 2 * LN(0.25) + LN(0.75)]])
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(torch.softmax(out, -1), torch.tensor([[0.75, 0.25]]))
    # the same α as a tensor (K,), and per row (B, K); each model's logit offset plays no part
    torch.testing.assert_close(
        multi_genarm_logits(base + 4.0, [r - 2.0 for r in rewards], torch.tensor([2.0, 1.0])), expected
    )
    two = multi_genarm_logits(
        base.repeat(2, 1), [r.repeat(2, 1) for r in rewards], torch.tensor([[2.0, 1.0], [0.0, 1.0]])
    )
    torch.testing.assert_close(two[0], expected[0])
    torch.testing.assert_close(two[1], torch.tensor([LN(0.5) + LN(0.25), LN(0.5) + LN(0.75)]))
    assert multi_genarm_logits(base.half(), [r.half() for r in rewards], [1.0, 1.0]).dtype == torch.float32
    with pytest.raises(ValueError, match="2 reward LMs' logits but alphas of shape \\(3,\\)"):
        multi_genarm_logits(base, rewards, [1.0, 1.0, 1.0])


def test_zero_alphas_are_the_base_exactly_even_where_a_reward_is_minus_inf() -> None:
    """0 · (−inf) would be NaN: a term whose α is 0 adds nothing, per call and per row."""
    base = torch.tensor([[0.0, LN(3.0)], [0.0, LN(3.0)]])
    rewards = [torch.tensor([[0.0, float("-inf")]] * 2), torch.tensor([[1.0, 0.0]] * 2)]
    log_base = torch.log_softmax(base, -1)
    assert torch.equal(multi_genarm_logits(base, rewards, [0.0, 0.0]), log_base)
    per_row = multi_genarm_logits(base, rewards, torch.tensor([[0.0, 0.0], [0.0, 1.0]]))
    assert torch.equal(per_row[0], log_base[0])
    assert not per_row.isnan().any()
    torch.testing.assert_close(per_row[1], log_base[1] + torch.log_softmax(rewards[1][1], -1))


def test_one_reward_lm_is_genarm() -> None:
    gen = torch.Generator().manual_seed(0)
    base, reward = torch.randn(3, 7, generator=gen), torch.randn(3, 7, generator=gen)
    alpha = torch.tensor([[0.0], [1.5], [-0.5]])
    assert torch.equal(genarm_logits(base, reward, alpha), multi_genarm_logits(base, [reward], alpha))
    assert torch.equal(genarm_logits(base, reward, 1.5), multi_genarm_logits(base, [reward], [1.5]))


@pytest.fixture(scope="module")
def models():
    return tiny_llama(tied=False, seed=0), [tiny_llama(tied=False, seed=s) for s in (1, 2, 3)]


def _recompute(base, others, ids, mask, combine, steps):
    """Greedy decoding without KV caches: every model re-runs over the whole sequence each step."""
    kls = []
    for _ in range(steps):
        pos = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
        zb = base(input_ids=ids, attention_mask=mask, position_ids=pos).logits[:, -1].float()
        zs = [m(input_ids=ids, attention_mask=mask, position_ids=pos).logits[:, -1].float() for m in others]
        scores = combine(zb, zs)
        kls.append(exact_kl(scores, zb))
        ids = torch.cat([ids, scores.argmax(-1, keepdim=True)], dim=-1)
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=-1)
    return ids, torch.stack(kls, 1)


@torch.no_grad()
def test_cached_decoding_equals_full_recomputation(models) -> None:
    base, rewards = models
    ids, mask = left_padded_batch([3, 7, 5], seed=3)
    alphas = torch.tensor([[1.0, 0.5, 1.0], [0.0, 2.0, 0.0], [0.5, 0.5, -0.5]])
    combine = partial(multi_genarm_logits, alphas=alphas)
    out = multi_guided_decode(base, rewards, ids, mask, multi_genarm_logits, alphas, max_new_tokens=8)
    expected, kl = _recompute(base, rewards, ids, mask, combine, 8)
    assert torch.equal(out.sequences, expected)
    torch.testing.assert_close(out.kl_to_base, kl, atol=1e-5, rtol=1e-4)
    assert (out.kl_to_base > 0).all()
    seqs = multi_genarm_generate(base, rewards, ids, mask, alphas=alphas, max_new_tokens=8)
    assert torch.equal(seqs, out.sequences)
    # a lone prompt decodes as it does inside the batch
    alone = multi_genarm_generate(
        base, rewards, ids[1:2, -7:], mask[1:2, -7:], alphas=alphas[1:2], max_new_tokens=8
    )
    assert torch.equal(alone[0], out.sequences[1, -15:])


SETTINGS = {
    "max_new_tokens": 10,
    "do_sample": True,
    "temperature": 0.8,
    "top_p": 0.9,
    "eos_token_id": [62, 5],  # frequent words: rows finish at different steps and get padded
    "pad_token_id": PAD,
}


def same_row(a: torch.Tensor, b: torch.Tensor) -> bool:
    """The same tokens, the longer row (a batch that ran longer) padded past the shorter's end."""
    n = min(len(a), len(b))
    longer = a if len(a) > n else b
    return torch.equal(a[:n], b[:n]) and bool((longer[n:] == PAD).all())


@torch.no_grad()
@pytest.mark.parametrize("do_sample", [False, True], ids=["greedy", "seeded-sampling"])
def test_zero_alphas_reproduce_the_base(models, do_sample: bool) -> None:
    base, rewards = models
    ids, mask = left_padded_batch([4, 6, 2, 5], seed=5)
    seeds = [21, 22, 23, 24]
    settings = SETTINGS | {"do_sample": do_sample}
    with plain_generation_config(base):
        want = base.generate(ids, attention_mask=mask, **seeded_decoding(settings, seeds))
    got = multi_genarm_generate(
        base, rewards, ids, mask, alphas=[0.0, 0.0, 0.0], **seeded_decoding(settings, seeds)
    )
    assert torch.equal(got, want)
    steered = multi_genarm_generate(
        base, rewards, ids, mask, alphas=[2.0, 1.0, 2.0], **seeded_decoding(settings, seeds)
    )
    assert not all(same_row(a, b) for a, b in zip(steered, want, strict=True))  # teeth


@torch.no_grad()
def test_decoder_rows_follow_their_own_alpha_and_seed(models) -> None:
    """The sweep's decoder: α = 0 rows are the base's seeded samples with KL 0; a row's output
    does not depend on the other rows' α."""
    base, rewards = models
    ids, mask = left_padded_batch([4, 6, 2, 5], seed=5)
    seeds = [31, 32, 33, 34]
    with plain_generation_config(base):
        want = base.generate(ids, attention_mask=mask, **seeded_decoding(SETTINGS, seeds))
    decode, done = multi_genarm_decoder(
        base, dict(zip(("helpful", "polite", "brief"), rewards, strict=True)), SETTINGS
    )
    alphas = torch.tensor([[0.0, 0.0, 0.0], [1.0, 0.5, 1.0], [0.0, 0.0, 0.0], [2.0, -1.0, 0.0]])
    out, recorded = decode(ids, mask, alphas, seeds)
    others = alphas.clone()
    others[1], others[3] = torch.tensor([-1.0, 2.0, 0.5]), torch.zeros(3)
    out_other, _ = decode(ids, mask, others, seeds)
    assert same_row(out[0], want[0]) and same_row(out[2], want[2])
    assert not same_row(out[1], want[1])
    assert same_row(out_other[0], out[0]) and same_row(out_other[2], out[2])
    assert same_row(out_other[3], want[3])
    assert set(recorded) == {"kl_to_base"} and recorded["kl_to_base"].shape == (
        4,
        out.shape[1] - ids.shape[1],
    )
    # log_softmax(z_base) against z_base: equal distributions, up to rounding
    assert (recorded["kl_to_base"][[0, 2]].abs() <= 1e-6).all() and (recorded["kl_to_base"][1] > 1e-3).any()
    with pytest.raises(ValueError, match=r"alphas must be \(B, K\) = \(4, 3\)"):
        decode(ids, mask, torch.zeros(4, 2), seeds)
    done()
