"""A fresh head changes nothing: logits equal the base's exactly for any α; DPO loss is ln 2."""

from __future__ import annotations

import math

import pytest
import torch

from alignheads.models import AlignedLM, SteeredLMHead
from alignheads.models.losses import (
    PreferenceLogps,
    dpo_loss,
    exact_kl,
    iav_loss,
    mean_squared_norm,
    prediction_mask,
    sequence_logprobs,
)
from tests.helpers.tiny_models import left_padded_batch, make_head, randomise, tiny_llama

LN2 = torch.tensor(math.log(2.0), dtype=torch.float32)


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("kind", ["iav", "calm"])
def test_fresh_head_gives_base_logits_exactly(kind: str, tied: bool) -> None:
    model = tiny_llama(tied=tied)
    ids, mask = left_padded_batch([7, 4, 6])
    with torch.no_grad():
        base = model(input_ids=ids, attention_mask=mask).logits
        aligned = AlignedLM(model, make_head(kind, model))
        assert isinstance(model.get_output_embeddings(), SteeredLMHead)
        for alpha in (0.0, 1.0, -2.5, 7.25, 1e6):
            steered = aligned(input_ids=ids, attention_mask=mask, alpha=alpha).logits
            assert torch.equal(steered, base), alpha
        out = aligned.head_outputs(ids, mask)
        assert torch.equal(out.logits(3.0), base)
        assert not out.delta.any()


@pytest.mark.parametrize("kind", ["iav", "calm"])
def test_fresh_head_dpo_loss_is_ln2(kind: str) -> None:
    """Chosen and rejected share the prompt; π (α = 1) = reference, so every margin is 0 and
    −log σ(0) = ln 2. For IAV the KL and L2 terms are exactly 0 too, so the total is ln 2."""
    model = tiny_llama(tied=True)
    prompt, _ = left_padded_batch([5, 5], seed=3)
    chosen_resp, _ = left_padded_batch([4, 4], seed=4)
    rejected_resp, _ = left_padded_batch([4, 4], seed=5)
    chosen = torch.cat([prompt, chosen_resp], 1)
    rejected = torch.cat([prompt, rejected_resp], 1)
    both = torch.cat([chosen, rejected])
    response = torch.zeros_like(both, dtype=torch.bool)
    response[:, 5:] = True
    with torch.no_grad():
        ref_logits = model(input_ids=both).logits
        aligned = AlignedLM(model, make_head(kind, model))
        out = aligned.head_outputs(both)
        pol_logits = out.logits(1.0)
    ref = sequence_logprobs(ref_logits, both, response)
    pol = sequence_logprobs(pol_logits, both, response)
    dpo = dpo_loss(pol[:2], pol[2:], ref[:2], ref[2:], beta=0.1)
    assert torch.equal(dpo.losses, LN2.expand(2))
    assert not dpo.chosen_rewards.any() and not dpo.rejected_rewards.any()
    if kind == "iav":
        pred = prediction_mask(response)
        kl = exact_kl(ref_logits, out.base_logits)
        total = iav_loss(
            PreferenceLogps(pol[:2], pol[2:], ref[:2], ref[2:]),
            kl_chosen=kl[:2][pred[:2]].mean(),
            kl_rejected=kl[2:][pred[2:]].mean(),
            align_sq_norm=mean_squared_norm(out.align_logits, pred),
        )
        assert total.kl.item() == 0.0 and total.l2.item() == 0.0
        assert torch.equal(total.loss, LN2)


def test_head_must_fit_the_model() -> None:
    small = tiny_llama(tied=False, vocab=90)
    head = make_head("iav", tiny_llama(tied=False))
    with pytest.raises(ValueError, match="vocabulary 100 x hidden 32.*vocabulary 90 x hidden 32"):
        AlignedLM(small, head)


def test_remove_restores_the_plain_model() -> None:
    model = tiny_llama(tied=False)
    original = model.get_output_embeddings()
    ids, mask = left_padded_batch([6, 3])
    with torch.no_grad():
        base = model(input_ids=ids, attention_mask=mask).logits
        aligned = AlignedLM(model, randomise(make_head("calm", model)))
        assert not torch.allclose(aligned(input_ids=ids, attention_mask=mask).logits, base)
        with aligned.original_lm() as lm:
            assert torch.equal(lm(input_ids=ids, attention_mask=mask).logits, base)
        assert torch.equal(aligned.base_logits(ids, mask), base)
        plain = aligned.remove()
        assert plain.get_output_embeddings() is original
        assert torch.equal(plain(input_ids=ids, attention_mask=mask).logits, base)
        again = AlignedLM(plain, make_head("iav", plain))
        with pytest.raises(ValueError, match="already carries a head"):
            AlignedLM(plain, make_head("iav", plain))
        assert again.remove().get_output_embeddings() is original
