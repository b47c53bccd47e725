"""DeRa: the combination rule, and with real tiny models α = 0 is the reference, α = 1 the DPO model."""

from __future__ import annotations

import pytest
import torch

from alignheads.models.dera import dera_generate, dera_logits
from alignheads.models.guided import guided_decode
from tests.helpers.tiny_models import EOS, PAD, left_padded_batch, tiny_llama


def test_dera_rule_on_hand_computed_logits():
    ref, dpo = torch.tensor([1.0, 3.0]), torch.tensor([3.0, 1.0])
    torch.testing.assert_close(dera_logits(ref, dpo, 0.5), torch.tensor([2.0, 2.0]))
    torch.testing.assert_close(dera_logits(ref, dpo, 2.0), torch.tensor([5.0, -1.0]))  # extrapolates
    torch.testing.assert_close(dera_logits(ref, dpo, -1.0), torch.tensor([-1.0, 5.0]))
    masked = torch.tensor([0.0, float("-inf")])  # exact ends, even with -inf logits
    assert torch.equal(dera_logits(ref, masked, 0.0), ref)
    assert torch.equal(dera_logits(masked, dpo, 1.0), dpo)


@pytest.fixture(scope="module")
def models():
    return tiny_llama(tied=False, seed=0), tiny_llama(tied=False, seed=2)


@torch.no_grad()
def test_alpha_zero_is_the_reference_and_one_the_dpo_model(models):
    reference, dpo = models
    ids, mask = left_padded_batch([5, 3, 6], seed=1)
    pos = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
    z_ref = reference(input_ids=ids, attention_mask=mask, position_ids=pos).logits
    z_dpo = dpo(input_ids=ids, attention_mask=mask, position_ids=pos).logits
    assert torch.equal(dera_logits(z_ref, z_dpo, 0.0), z_ref)
    assert torch.equal(dera_logits(z_ref, z_dpo, 1.0), z_dpo)
    settings = {"max_new_tokens": 8, "eos_token_id": EOS, "pad_token_id": PAD}
    for alpha, alone in ((0.0, reference), (1.0, dpo)):
        ours = dera_generate(reference, dpo, ids, mask, alpha=alpha, **settings)
        theirs = alone.generate(ids, attention_mask=mask, do_sample=False, **settings)
        assert torch.equal(ours, theirs), alpha
    at0 = guided_decode(reference, dpo, ids, mask, dera_logits, 0.0, max_new_tokens=6)
    assert torch.equal(at0.kl_to_base, torch.zeros_like(at0.kl_to_base))  # KL to the base is 0 at α = 0
    at1 = guided_decode(reference, dpo, ids, mask, dera_logits, 1.0, max_new_tokens=6)
    assert (at1.kl_to_base > 0).all()
