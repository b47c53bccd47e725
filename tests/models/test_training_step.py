"""The heads train through the pure losses the way the trainer uses them (frozen LM, α = 1)."""

from __future__ import annotations

import math

import pytest
import torch

from alignheads.models import AlignedLM, CALMOutput, IAVOutput
from alignheads.models.losses import (
    PreferenceLogps,
    calm_loss,
    exact_kl,
    iav_loss,
    masked_mean,
    masked_variance,
    mean_entropy,
    mean_squared_norm,
    prediction_mask,
    sequence_logprobs,
)
from tests.helpers.tiny_models import left_padded_batch, make_head, tiny_llama


def preference_batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """4 pairs: left-padded prompts (lengths 5, 3, 4, 2) + 4-token chosen / rejected responses,
    chosen rows first. Returns ids (8, T), attention mask, response mask."""
    prompt, prompt_mask = left_padded_batch([5, 3, 4, 2], seed=21)
    chosen, _ = left_padded_batch([4] * 4, seed=22)
    rejected, _ = left_padded_batch([4] * 4, seed=23)
    ids = torch.cat([torch.cat([prompt, chosen], 1), torch.cat([prompt, rejected], 1)])
    mask = torch.cat([prompt_mask, torch.ones_like(chosen)], 1).repeat(2, 1)
    response = torch.zeros_like(mask, dtype=torch.bool)
    response[:, prompt.shape[1] :] = True
    return ids, mask, response


@pytest.mark.parametrize("kind", ["iav", "calm"])
def test_a_few_steps_lower_the_preference_loss(kind: str) -> None:
    model = tiny_llama(tied=True).requires_grad_(False)
    aligned = AlignedLM(model, make_head(kind, model))
    ids, mask, response = preference_batch()
    pred = prediction_mask(response)
    with torch.no_grad():
        hidden = aligned.backbone(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
        ref_logits = aligned.base_logits(ids, mask)
    ref = sequence_logprobs(ref_logits, ids, response)
    optimiser = torch.optim.Adam(aligned.head.parameters(), lr=2e-2)
    losses = []
    for _ in range(25):
        out = aligned.outputs_for_hidden(hidden, mask)
        logits = out.logits(1.0)
        pol = sequence_logprobs(logits, ids, response)
        logps = PreferenceLogps(pol[:4], pol[4:], ref[:4], ref[4:])
        if isinstance(out, IAVOutput):
            kl = exact_kl(ref_logits, out.base_logits)
            total = iav_loss(
                logps,
                masked_mean(kl[:4], pred[:4]),
                masked_mean(kl[4:], pred[4:]),
                mean_squared_norm(out.align_logits, pred),
            )
        else:
            assert isinstance(out, CALMOutput)
            total = calm_loss(
                logps,
                mean_squared_norm(out.modulation, pred),
                masked_variance(out.strength, pred),
                mean_entropy(logits, pred),
            )
        optimiser.zero_grad()
        total.loss.backward()
        optimiser.step()
        losses.append(total.pref.item())
    assert losses[0] == pytest.approx(math.log(2), abs=1e-6)
    assert losses[-1] < 0.6
    assert (total.dpo.margins > 0).float().mean().item() == 1.0  # every pair ranked right
    lm_params = [*aligned.backbone.parameters(), *aligned.frozen_head.parameters()]
    assert all(p.grad is None for p in lm_params)  # the LM stays frozen
    assert all(p.grad is not None for p in aligned.head.parameters())
