"""Per-row α: one batched call gives what one AlignedLM call per α gives."""

from __future__ import annotations

import pytest
import torch
from headtest_utils import PAD, left_padded_batch, make_head, randomise, tiny_llama

from alignheads.models import AlignedLM
from alignheads.models.alpha_batch import alpha_sweep_generate, row_alphas

TOL = 1e-5
KINDS = ["iav", "calm"]
ALPHAS = [-1.0, 0.0, 0.5, 1.0, 2.5]


def model_and_head(kind: str):
    model = tiny_llama(tied=False)
    return model, randomise(make_head(kind, model), seed=3)


@pytest.mark.parametrize("kind", KINDS)
def test_row_alphas_logits_equal_one_call_per_alpha(kind: str) -> None:
    """Full forward of a left-padded batch replicated per α: row block i equals AlignedLM at α_i."""
    model, head = model_and_head(kind)
    ids, mask = left_padded_batch([6, 2, 4])
    per_row = torch.tensor(ALPHAS).repeat_interleave(3)
    with torch.no_grad(), row_alphas(model, head, per_row):
        batched = model(input_ids=ids.repeat(5, 1), attention_mask=mask.repeat(5, 1), use_cache=False).logits
    aligned = AlignedLM(model, head)
    with torch.no_grad():
        for i, alpha in enumerate(ALPHAS):
            single = aligned(input_ids=ids, attention_mask=mask, alpha=alpha, use_cache=False).logits
            assert (batched[3 * i : 3 * i + 3] - single).abs().max() <= TOL, alpha
    # teeth: the α values really give different logits
    assert (batched[:3] - batched[-3:]).abs().max() > 0.1


@pytest.mark.parametrize("kind", KINDS)
def test_alpha_sweep_generate_matches_separate_greedy_calls(kind: str) -> None:
    """KV-cached greedy decoding of all α in one generate() equals one generate() per α."""
    model, head = model_and_head(kind)
    ids, mask = left_padded_batch([7, 3, 5, 6])
    kwargs = {"max_new_tokens": 8, "min_new_tokens": 8, "do_sample": False, "pad_token_id": PAD}
    swept = alpha_sweep_generate(model, head, ids, mask, ALPHAS, **kwargs)
    assert swept.shape == (len(ALPHAS), 4, ids.shape[1] + 8)
    assert isinstance(model.get_output_embeddings(), torch.nn.Linear)  # the LM's own layer is back
    aligned = AlignedLM(model, head)
    separate = [aligned.generate(input_ids=ids, attention_mask=mask, alpha=a, **kwargs) for a in ALPHAS]
    for i, alpha in enumerate(ALPHAS):
        assert torch.equal(swept[i], separate[i]), alpha
    new = swept[:, :, ids.shape[1] :]
    assert not torch.equal(new[0], new[-1])  # the α values steer the text differently


def test_rows_must_match_the_alphas() -> None:
    """Beam search multiplies the rows: refused with a message rather than mis-assigned α."""
    model, head = model_and_head("iav")
    ids, mask = left_padded_batch([4, 4])
    with pytest.raises(ValueError, match="per-row alphas"):
        alpha_sweep_generate(
            model, head, ids, mask, [0.0, 1.0], max_new_tokens=2, num_beams=2, pad_token_id=PAD
        )
    assert isinstance(model.get_output_embeddings(), torch.nn.Linear)
    # and the CALM context hooks are gone: a plain forward works without a head
    model2, calm = model_and_head("calm")
    with row_alphas(model2, calm, torch.ones(2)):
        pass
    with torch.no_grad():
        model2(input_ids=ids, attention_mask=mask)


def test_refuses_a_model_that_already_carries_a_head() -> None:
    model, head = model_and_head("iav")
    AlignedLM(model, head)
    with pytest.raises(ValueError, match="already carries a head"), row_alphas(model, head, torch.ones(1)):
        pass
