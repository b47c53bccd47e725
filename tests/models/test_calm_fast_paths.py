"""The decoding fast paths equal the general maths: the one-token context step, the fused CALM logits."""

from __future__ import annotations

import pytest
import torch

from alignheads.models.calm import CALMHead, gate_activation, modulated_logits
from alignheads.models.context import RunningContext, continue_context, step_context, token_context
from tests.helpers.tiny_models import make_head, randomise, tiny_llama

B, H = 5, 16


def _state(seed: int, batch: int = B, width: int = H) -> RunningContext:
    """A state as a prefix leaves it: whole-number counts (some rows still 0: all padding so far)."""
    gen = torch.Generator().manual_seed(seed)
    count = torch.randint(0, 9, (batch,), generator=gen).float()
    hidden_sum = torch.randn(batch, width, generator=gen) * count.unsqueeze(-1)
    return RunningContext(hidden_sum, count, seen=8)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mask_kind", ["none", "long", "bool", "float"])
def test_step_context_equals_continue_context_bit_for_bit(dtype: torch.dtype, mask_kind: str) -> None:
    """One new token (some rows masked out, some with no real token yet): the same positions,
    context means and state as the general cumulative-sum path, exactly."""
    state = _state(0)
    hidden = torch.randn(B, 1, H, generator=torch.Generator().manual_seed(1)).to(dtype)
    column = torch.tensor([[1], [0], [1], [0], [1]])
    mask = {"none": None, "long": column, "bool": column.bool(), "float": column.float()}[mask_kind]
    want_ctx, want_state = continue_context(hidden, mask, state)
    got_ctx, got_state = step_context(hidden, mask, state)
    assert got_ctx.positions.dtype == want_ctx.positions.dtype == torch.int64
    assert torch.equal(got_ctx.positions, want_ctx.positions)
    assert got_ctx.context.dtype == want_ctx.context.dtype
    assert torch.equal(got_ctx.context, want_ctx.context)
    assert torch.equal(got_state.hidden_sum, want_state.hidden_sum)
    assert torch.equal(got_state.count, want_state.count)
    assert got_state.seen == want_state.seen == 9
    # teeth: the masked-out rows kept their sums, the others moved
    moved = (got_state.hidden_sum != state.hidden_sum).any(-1)
    assert moved.tolist() == [True, False, True, False, True] or mask is None


def test_step_context_chain_equals_the_general_chain() -> None:
    """Prefill, then steps one token at a time: every step equals the general path's step bit for
    bit, and the full sequence's token_context at that position (left padding included) up to the
    summation order of a cumulative sum over the whole sequence."""
    gen = torch.Generator().manual_seed(3)
    hidden = torch.randn(3, 9, H, generator=gen)
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[1, :4] = 0
    mask[2, :6] = 0
    full = token_context(hidden, mask)
    _ctx, fast = continue_context(hidden[:, :5], mask[:, :5], None)
    general = fast
    for t in range(5, 9):
        ctx, fast = step_context(hidden[:, t : t + 1], mask[:, t : t + 1], fast)
        want, general = continue_context(hidden[:, t : t + 1], mask[:, t : t + 1], general)
        assert torch.equal(ctx.positions, want.positions) and torch.equal(ctx.context, want.context), t
        assert torch.equal(fast.hidden_sum, general.hidden_sum) and torch.equal(fast.count, general.count)
        assert torch.equal(ctx.positions, full.positions[:, t : t + 1]), t
        torch.testing.assert_close(ctx.context, full.context[:, t : t + 1], rtol=1e-6, atol=1e-6)


def test_step_context_refuses_what_it_does_not_cover() -> None:
    state = _state(0)
    with pytest.raises(ValueError, match="one new token"):
        step_context(torch.zeros(B, 2, H), None, state)
    with pytest.raises(ValueError, match="rows"):
        step_context(torch.zeros(B + 1, 1, H), None, state)


def test_step_context_state_is_detached() -> None:
    hidden = torch.randn(B, 1, H, requires_grad=True)
    _ctx, state = step_context(hidden, None, _state(0))
    assert not state.hidden_sum.requires_grad and not state.count.requires_grad


def _calm_and_inputs(seed: int = 4, dtype: torch.dtype = torch.float32):
    model = tiny_llama(tied=False)
    head = randomise(make_head("calm", model), seed=seed)
    assert isinstance(head, CALMHead)
    head = head.to(dtype)
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(3, 6, head.config.hidden_size, generator=gen)
    mask = torch.ones(3, 6, dtype=torch.long)
    mask[0, :2] = 0
    return model.get_output_embeddings(), head, hidden, token_context(hidden, mask)


@pytest.mark.parametrize("alpha", [1.0, -2.0, 0.37])
def test_fused_logits_equal_the_unfused_formula(alpha: float) -> None:
    """``CALMHead.logits`` (one addmm on the gated codes) equals ``base + α · (s · v)`` from the head's
    own outputs, up to float rounding."""
    frozen, head, hidden, ctx = _calm_and_inputs()
    with torch.no_grad():
        out = head(hidden, frozen_head=frozen, context=ctx)
        want = out.base_logits + alpha * (out.strength.unsqueeze(-1) * out.modulation)
        got = head.logits(hidden, alpha, frozen_head=frozen, context=ctx)
    assert got.shape == want.shape and got.dtype == want.dtype
    scale = want.abs().max().clamp(min=1)
    assert ((got - want).abs().max() / scale) <= 1e-6
    assert (want - out.base_logits).abs().max() > 0.1  # teeth: the head moves the logits


def test_fused_logits_at_alpha_zero_are_the_lm_logits_bit_for_bit() -> None:
    frozen, head, hidden, ctx = _calm_and_inputs()
    with torch.no_grad():
        assert torch.equal(head.logits(hidden, 0.0, frozen_head=frozen, context=ctx), frozen(hidden))


def test_modulated_logits_is_one_matmul_add_of_the_gated_codes() -> None:
    """The pure function on hand-made tensors, against the same maths written out; also with the
    base in another dtype (computed in the wider one)."""
    gen = torch.Generator().manual_seed(5)
    base = torch.randn(2, 3, 7, generator=gen)
    codes = torch.randn(2, 3, 4, generator=gen)
    gate = torch.rand(2, 3, 1, generator=gen)
    up = torch.randn(7, 4, generator=gen)
    want = base + 2.5 * ((gate * codes) @ up.t())
    torch.testing.assert_close(modulated_logits(base, codes, gate, up, 2.5), want, rtol=1e-6, atol=1e-6)
    wide = modulated_logits(base, codes.double(), gate.double(), up.double(), 2.5)
    assert wide.dtype == torch.float64
    torch.testing.assert_close(wide, want.double(), rtol=1e-6, atol=1e-6)


def test_gate_activation_times_s_max_is_the_strength() -> None:
    frozen, head, hidden, ctx = _calm_and_inputs()
    with torch.no_grad():
        _v, strength = head.modulation(hidden, ctx)
        gate = gate_activation(ctx.context, head.gate.weight, head.gate.bias)
    assert torch.equal(strength, (head.config.s_max * gate).squeeze(-1))
