"""The guided decoder leaves out work that changes nothing: an LM no row weighs is not run, and
finished rows leave the batch (`models.guided`, module docstring)."""

from __future__ import annotations

import pytest
import torch

from alignheads.models.dera import dera_generate, dera_logits
from alignheads.models.genarm import genarm_logits, multi_genarm_logits
from alignheads.models.guided import MIN_ROWS, guided_decode, multi_guided_decode
from alignheads.models.row_sampling import RowSeededSampler, seeded_decoding
from tests.helpers.tiny_models import PAD, left_padded_batch, tiny_llama

ROWS = 48
# two frequent words as end tokens: rows finish at many different steps
SAMPLED = {
    "max_new_tokens": 40,
    "do_sample": True,
    "temperature": 1.0,
    "top_p": 1.0,
    "eos_token_id": [62, 5],
    "pad_token_id": PAD,
}


@pytest.fixture(scope="module")
def models():
    return tiny_llama(tied=False, seed=0), [tiny_llama(tied=False, seed=s) for s in (1, 2, 3)]


class Calls:
    """The batch size of every forward of `model` while the context is open."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model, self.rows = model, []

    def __enter__(self) -> Calls:
        self.handle = self.model.register_forward_pre_hook(
            lambda _, args, kwargs: self.rows.append(kwargs["input_ids"].shape[0]), with_kwargs=True
        )
        return self

    def __exit__(self, *exc: object) -> None:
        self.handle.remove()


def batch(rows: int = ROWS, seed: int = 4) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    lengths = [3 + (7 * i) % 9 for i in range(rows)]
    ids, mask = left_padded_batch(lengths, seed=seed)
    return ids, mask, [1000 + i for i in range(rows)]


def real_steps(sequences: torch.Tensor, prompt: int) -> list[int]:
    """Each row's generated tokens up to and including its first end token."""
    out = []
    for row in sequences[:, prompt:].tolist():
        end = next((i + 1 for i, t in enumerate(row) if t in (62, 5)), len(row))
        out.append(end)
    return out


@torch.no_grad()
def test_finished_rows_leave_the_batch_and_every_row_decodes_the_same(models) -> None:
    """Seeded sampling over 48 rows with frequent end tokens: once rows finish, the batch shrinks
    (never below 16 rows), and every row gets the tokens and per-step KL it gets when all rows
    stay to the end."""
    base, rewards = models
    ids, mask, seeds = batch()
    alphas = torch.linspace(0.0, 2.0, ROWS)[:, None]
    with Calls(base) as cut:
        got = guided_decode(
            base, rewards[0], ids, mask, genarm_logits, alphas, **seeded_decoding(SAMPLED, seeds)
        )
    with Calls(base) as whole:
        want = guided_decode(
            base,
            rewards[0],
            ids,
            mask,
            genarm_logits,
            alphas,
            min_rows=ROWS,
            **seeded_decoding(SAMPLED, seeds),
        )
    with Calls(base) as floored:
        at_32 = guided_decode(
            base, rewards[0], ids, mask, genarm_logits, alphas, min_rows=32, **seeded_decoding(SAMPLED, seeds)
        )
    assert set(whole.rows) == {ROWS}
    assert cut.rows[0] == ROWS and MIN_ROWS <= min(cut.rows) < 32  # rows left (teeth), not below 16
    assert cut.rows == sorted(cut.rows, reverse=True)
    assert min(floored.rows) == 32  # finished rows stay as filler at the floor
    assert torch.equal(got.sequences, want.sequences)
    assert torch.equal(at_32.sequences, want.sequences)
    steps = real_steps(want.sequences, ids.shape[1])
    assert len(set(steps)) > 5 and max(steps) > 2 * min(steps)  # rows end at many different steps
    for row, n in enumerate(steps):
        torch.testing.assert_close(got.kl_to_base[row, :n], want.kl_to_base[row, :n], rtol=1e-6, atol=1e-7)


@torch.no_grad()
def test_rows_stay_when_they_share_one_generator(models) -> None:
    """With ``do_sample`` every row draws from one shared stream, so none may leave: the decoder
    samples exactly what it samples with every row kept."""
    base, rewards = models
    ids, mask, _ = batch()
    settings = {k: v for k, v in SAMPLED.items()}
    torch.manual_seed(7)
    with Calls(base) as calls:
        got = guided_decode(base, rewards[0], ids, mask, genarm_logits, 1.0, **settings)
    torch.manual_seed(7)
    want = guided_decode(base, rewards[0], ids, mask, genarm_logits, 1.0, min_rows=ROWS, **settings)
    assert set(calls.rows) == {ROWS}
    assert torch.equal(got.sequences, want.sequences)


@torch.no_grad()
def test_an_lm_no_row_weighs_is_not_run(models) -> None:
    """A reward LM whose α is 0 on every row is never called, and the batch decodes what it decodes
    without that LM; one with α ≠ 0 on a single row runs."""
    base, rewards = models
    ids, mask, seeds = batch(rows=6)
    alphas = torch.tensor([[1.0, 0.0, 0.5], [0.0, 0.0, 2.0], [0.5, 0.0, 0.0]] * 2)
    with Calls(rewards[0]) as first, Calls(rewards[1]) as idle, Calls(rewards[2]) as third:
        got = multi_guided_decode(
            base, rewards, ids, mask, multi_genarm_logits, alphas, **seeded_decoding(SAMPLED, seeds)
        )
    assert idle.rows == [] and first.rows and third.rows
    without = multi_guided_decode(
        base,
        [rewards[0], rewards[2]],
        ids,
        mask,
        multi_genarm_logits,
        alphas[:, [0, 2]],
        **seeded_decoding(SAMPLED, seeds),
    )
    assert torch.equal(got.sequences, without.sequences)
    assert torch.equal(got.kl_to_base, without.kl_to_base)


@torch.no_grad()
def test_alpha_zero_runs_the_base_alone(models) -> None:
    """GenARM and DeRa at α = 0 on every row: one forward per token, the base's own decoding."""
    base, rewards = models
    ids, mask, seeds = batch(rows=5)
    with Calls(rewards[0]) as reward, Calls(base) as calls:
        got = guided_decode(
            base, rewards[0], ids, mask, genarm_logits, 0.0, **seeded_decoding(SAMPLED, seeds)
        )
    assert reward.rows == [] and calls.rows
    assert got.kl_to_base.abs().max() < 1e-6  # log_softmax of log-probs: rounding only
    with Calls(rewards[0]) as dpo:
        dera = dera_generate(base, rewards[0], ids, mask, alpha=0.0, **seeded_decoding(SAMPLED, seeds))
    assert dpo.rows == []
    assert torch.equal(dera, got.sequences)  # DeRa at 0 is its reference, GenARM at 0 its base: the same LM


def test_rules_refuse_a_missing_lm_they_would_read() -> None:
    z = torch.randn(2, 7)
    assert torch.equal(genarm_logits(z, None, 0.0), torch.log_softmax(z, -1))
    assert torch.equal(multi_genarm_logits(z, [None, z], torch.tensor([[0.0, 1.0], [0.0, 0.5]])),
                       multi_genarm_logits(z, [z, z], torch.tensor([[0.0, 1.0], [0.0, 0.5]])))  # fmt: skip
    assert torch.equal(dera_logits(z, None, torch.zeros(2, 1)), z)
    with pytest.raises(ValueError, match="reward LM 0 was not run"):
        genarm_logits(z, None, torch.tensor([[0.0], [1.0]]))
    with pytest.raises(ValueError, match="DPO model was not run"):
        dera_logits(z, None, 0.5)


def test_a_sampler_keeps_each_rows_stream_when_rows_leave() -> None:
    whole, cut = RowSeededSampler([5, 6, 7, 8]), RowSeededSampler([5, 6, 7, 8])
    scores = torch.zeros(4, 9)
    whole(None, scores), cut(None, scores)
    cut.select_rows(torch.tensor([1, 3]))
    assert torch.equal(cut(None, scores[:2]), whole(None, scores)[[1, 3]])
    with pytest.raises(ValueError, match="4 rows for 2 row seeds"):
        cut(None, scores)
