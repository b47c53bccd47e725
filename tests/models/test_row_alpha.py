"""Per-row α: one batched call gives what one AlignedLM call per α gives."""

from __future__ import annotations

import pytest
import torch

from alignheads.models import AlignedLM
from tests.helpers.tiny_models import PAD, left_padded_batch, make_head, randomise, tiny_llama

TOL = 1e-5
KINDS = ["iav", "calm"]
ALPHAS = [-1.0, 0.0, 0.5, 1.0, 2.5]


def model_and_head(kind: str):
    model = tiny_llama(tied=False)
    return model, randomise(make_head(kind, model), seed=3)


def hooks_of(model: torch.nn.Module) -> int:
    backbone = model.base_model
    return len(model._forward_pre_hooks) + len(backbone._forward_pre_hooks) + len(backbone._forward_hooks)


@pytest.mark.parametrize("kind", KINDS)
def test_row_alphas_logits_equal_one_call_per_alpha(kind: str) -> None:
    """Full forward of a left-padded batch replicated per α: row block i equals AlignedLM at α_i."""
    model, head = model_and_head(kind)
    aligned = AlignedLM(model, head)
    ids, mask = left_padded_batch([6, 2, 4])
    per_row = torch.tensor(ALPHAS).repeat_interleave(3)
    with torch.no_grad():
        batched = aligned(
            input_ids=ids.repeat(5, 1), attention_mask=mask.repeat(5, 1), alpha=per_row, use_cache=False
        ).logits
        for i, alpha in enumerate(ALPHAS):
            single = aligned(input_ids=ids, attention_mask=mask, alpha=alpha, use_cache=False).logits
            assert (batched[3 * i : 3 * i + 3] - single).abs().max() <= TOL, alpha
    assert aligned.alpha == 1.0 and isinstance(aligned.alpha, float)  # α set for that call only
    # teeth: the α values really give different logits
    assert (batched[:3] - batched[-3:]).abs().max() > 0.1


@pytest.mark.parametrize("kind", KINDS)
def test_float_alpha_keeps_the_head_arithmetic(kind: str) -> None:
    """A float α gives exactly the head's own z(α) (bit for bit), recording or not."""
    model, head = model_and_head(kind)
    aligned = AlignedLM(model, head)
    ids, mask = left_padded_batch([6, 2, 4])
    with torch.no_grad():
        hidden = aligned.backbone(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
        output = aligned.outputs_for_hidden(hidden, mask)
        got = aligned(input_ids=ids, attention_mask=mask, alpha=1.5, use_cache=False).logits
        with aligned.recording():
            recorded = aligned(input_ids=ids, attention_mask=mask, alpha=1.5, use_cache=False).logits
    want = output.base_logits + 1.5 * output.delta
    assert torch.equal(recorded, want)
    if kind == "iav":  # no token context: the output layer's call is the head's own logits()
        assert torch.equal(got, head.logits(hidden, 1.5, frozen_head=aligned.frozen_head))
    assert (got - want).abs().max() <= TOL


@pytest.mark.parametrize("kind", KINDS)
def test_alpha_sweep_generate_matches_separate_greedy_calls(kind: str) -> None:
    """KV-cached greedy decoding of all α in one generate() equals one generate() per α."""
    model, head = model_and_head(kind)
    aligned = AlignedLM(model, head)
    ids, mask = left_padded_batch([7, 3, 5, 6])
    kwargs = {"max_new_tokens": 8, "min_new_tokens": 8, "do_sample": False, "pad_token_id": PAD}
    swept = aligned.alpha_sweep_generate(ids, mask, ALPHAS, **kwargs)
    assert swept.shape == (len(ALPHAS), 4, ids.shape[1] + 8)
    assert aligned.alpha == 1.0 and isinstance(aligned.alpha, float)  # the wrapper's own α is back
    separate = [aligned.generate(input_ids=ids, attention_mask=mask, alpha=a, **kwargs) for a in ALPHAS]
    for i, alpha in enumerate(ALPHAS):
        assert torch.equal(swept[i], separate[i]), alpha
    new = swept[:, :, ids.shape[1] :]
    assert not torch.equal(new[0], new[-1])  # the α values steer the text differently


@pytest.mark.parametrize("kind", KINDS)
def test_recording_per_row_matches_separate_calls(kind: str) -> None:
    """KL to the base and the head's statistics are recorded row by row under a per-row α."""
    model, head = model_and_head(kind)
    aligned = AlignedLM(model, head)
    ids, mask = left_padded_batch([5, 3])
    kwargs = {"max_new_tokens": 4, "min_new_tokens": 4, "do_sample": False, "pad_token_id": PAD}
    with aligned.recording() as recorder:
        aligned.alpha_sweep_generate(ids, mask, ALPHAS, **kwargs)
    swept = recorder.stacked()
    assert swept["kl_to_base"].shape == (len(ALPHAS) * 2, 4)
    stats = {"align_norm"} if kind == "iav" else {"strength", "modulation_norm"}
    assert set(swept) == {"kl_to_base"} | stats
    for i, alpha in enumerate(ALPHAS):
        with aligned.recording() as single:
            aligned.generate(input_ids=ids, attention_mask=mask, alpha=alpha, **kwargs)
        for name, values in single.stacked().items():
            assert (swept[name][2 * i : 2 * i + 2] - values).abs().max() <= 1e-4, (name, alpha)
    kl = swept["kl_to_base"]
    assert not torch.allclose(kl[:2], kl[-2:])  # teeth: α = -1 and α = 2.5 move differently


def test_rows_must_match_the_alphas() -> None:
    """Beam search and num_return_sequences multiply the rows: refused rather than mis-assigned α."""
    model, head = model_and_head("iav")
    aligned = AlignedLM(model, head)
    ids, mask = left_padded_batch([4, 4])
    with pytest.raises(ValueError, match="per-row alphas"):
        aligned.alpha_sweep_generate(ids, mask, [0.0, 1.0], max_new_tokens=2, num_beams=2, pad_token_id=PAD)
    with pytest.raises(ValueError, match="per-row alphas"):
        aligned.generate(
            input_ids=ids,
            attention_mask=mask,
            alpha=[0.0, 1.0],
            max_new_tokens=2,
            do_sample=True,
            num_return_sequences=2,
            pad_token_id=PAD,
        )
    assert aligned.alpha == 1.0 and isinstance(aligned.alpha, float)  # restored after the error
    with torch.no_grad():  # and a float α still serves any number of rows
        aligned(input_ids=ids.repeat(3, 1), attention_mask=mask.repeat(3, 1))


def test_context_hooks_are_removed() -> None:
    """CALM's context hooks go with remove(): a plain forward works without a head."""
    model, calm = model_and_head("calm")
    ids, mask = left_padded_batch([4, 4])
    aligned = AlignedLM(model, calm)
    assert hooks_of(model) == 3
    aligned.alpha_sweep_generate(ids, mask, [0.0, 1.0], max_new_tokens=2, pad_token_id=PAD)
    assert aligned.remove() is model
    assert isinstance(model.get_output_embeddings(), torch.nn.Linear)
    assert hooks_of(model) == 0
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)


@pytest.mark.parametrize("bad", [torch.ones(2, 2), [], [[1.0]], torch.tensor([True, False])])
def test_refuses_alphas_that_are_not_one_per_row(bad: object) -> None:
    model, head = model_and_head("iav")
    aligned = AlignedLM(model, head)
    with pytest.raises(ValueError, match="one α per batch row"):
        aligned.alpha = bad
    assert aligned.alpha == 1.0
    ids, mask = left_padded_batch([4])
    with pytest.raises(ValueError, match="alphas must be"):
        aligned.alpha_sweep_generate(ids, mask, torch.ones(2, 2), max_new_tokens=1, pad_token_id=PAD)


def test_alpha_forms() -> None:
    """Numbers and 0-d tensors are one α; lists, tuples and 1-D tensors one α per row."""
    model, head = model_and_head("iav")
    aligned = AlignedLM(model, head, alpha=torch.tensor(0.5))
    assert aligned.alpha == 0.5 and isinstance(aligned.alpha, float)
    with aligned.use_alpha((0.0, 2.0)):
        assert torch.equal(aligned.alpha, torch.tensor([0.0, 2.0]))
    assert aligned.alpha == 0.5 and isinstance(aligned.alpha, float)
    aligned.alpha = torch.tensor([1, 2])
    assert torch.equal(aligned.alpha, torch.tensor([1, 2]))


def test_refuses_a_model_that_already_carries_a_head() -> None:
    model, head = model_and_head("iav")
    AlignedLM(model, head)
    with pytest.raises(ValueError, match="already carries a head"):
        AlignedLM(model, head)
