"""Reference scoring and the refcache row layout, on hand-computed numbers (and one tiny model
built on the fly for the hidden-state prefix sums)."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pyarrow as pa
import pytest
import torch

from alignheads.models.reference import (
    BatchScores,
    draw_tail,
    length_sorted_batches,
    pack_batch,
    prefix_hidden_sums,
    score_sequences,
    scored_token_keys,
    segment_sums,
    token_uniforms,
    topk_reference,
)
from alignheads.storage.refcache import build_rows, refcache_schema, token_matrix, token_vector


def test_pack_batch_right_pads_and_indexes_the_response():
    b = pack_batch([[5, 6], [7]], [[8, 9, 2], [2]], pad_id=0)
    assert b.input_ids.tolist() == [[5, 6, 8, 9, 2], [7, 2, 0, 0, 0]]
    assert b.attention_mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]
    # the logits at position t score the token at t + 1
    assert b.rows.tolist() == [0, 0, 0, 1] and b.cols.tolist() == [1, 2, 3, 0]
    assert b.targets.tolist() == [8, 9, 2, 2] and b.counts.tolist() == [3, 1]
    # real tokens before the first predicting position (1 and 0 above)
    assert b.prefix_lens.tolist() == [1, 0]


def test_pack_batch_without_prompt_skips_the_first_response_token():
    b = pack_batch([[]], [[4, 5, 6]], pad_id=0)
    assert b.cols.tolist() == [0, 1] and b.targets.tolist() == [5, 6] and b.counts.tolist() == [2]
    assert b.prefix_lens.tolist() == [0]
    with pytest.raises(ValueError):
        pack_batch([], [], pad_id=0)


def test_topk_reference_on_hand_numbers():
    logits = torch.log(torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.25, 0.25, 0.25, 0.25]])) + 3.0
    target_lp, ids, lps = topk_reference(logits, torch.tensor([1, 3]), k=2)
    assert target_lp.tolist() == pytest.approx([math.log(0.2), math.log(0.25)], abs=1e-6)
    assert ids.dtype == torch.int32 and ids[0].tolist() == [3, 2]
    assert lps[0].tolist() == pytest.approx([math.log(0.4), math.log(0.3)], abs=1e-6)
    assert lps[1].tolist() == pytest.approx([math.log(0.25)] * 2, abs=1e-6)  # normalised over V, not over k
    with pytest.raises(ValueError, match="vocabulary size 4"):
        topk_reference(logits, torch.tensor([0, 0]), k=5)


def test_prefix_hidden_sums_on_hand_numbers():
    hidden = torch.arange(2 * 4 * 3, dtype=torch.float32).reshape(2, 4, 3).to(torch.bfloat16)
    sums = prefix_hidden_sums(hidden, torch.tensor([3, 0]))
    assert sums.dtype == torch.float32
    assert sums.tolist() == [[0 + 3 + 6, 1 + 4 + 7, 2 + 5 + 8], [0, 0, 0]]
    with pytest.raises(ValueError, match="outside 0..4"):
        prefix_hidden_sums(hidden, torch.tensor([5, 0]))


def test_segment_sums_and_length_sorting():
    assert segment_sums(np.array([1.0, 2.0, 3.0, 4.0], np.float32), np.array([1, 0, 3])).tolist() == [1, 0, 9]
    assert length_sorted_batches([3, 5, 5, 1], 2) == [[1, 2], [0, 3]]
    with pytest.raises(ValueError):
        length_sorted_batches([1], 0)


SCORE_FIELDS = (
    "counts",
    "target_logprobs",
    "topk_ids",
    "topk_logprobs",
    "seq_logprobs",
    "hidden",
    "prefix_hidden_sum",
)


class StubReference:
    """Scores derived from the targets only: any batching must give the same per-sequence result."""

    hidden_size = 2

    def score_batch(self, batch, k, store_hidden=False, hidden_dtype="float32", tail_uniforms=None):
        t = batch.targets.numpy().astype(np.float32)
        counts = batch.counts.numpy()
        # per sequence: its first prompt token and its prefix length, whatever the batch
        firsts = batch.input_ids[:, 0].numpy().astype(np.float32)
        prefix = np.stack([firsts, batch.prefix_lens.numpy().astype(np.float32)], axis=1)
        return BatchScores(
            counts=counts,
            target_logprobs=-t,
            topk_ids=np.stack([t.astype(np.int32)] * k, axis=1),
            topk_logprobs=np.stack([-t] * k, axis=1),
            seq_logprobs=segment_sums(-t, counts),
            hidden=np.stack([t, -t], axis=1).astype(hidden_dtype) if store_hidden else None,
            prefix_hidden_sum=prefix if store_hidden else None,
            # the token's own uniforms: what any batching must hand each token
            tail_ids=None if tail_uniforms is None else (tail_uniforms * 2**31).astype(np.int32),
            tail_logprobs=None if tail_uniforms is None else tail_uniforms.astype(np.float32),
        )


def test_score_sequences_returns_input_order_for_any_batching():
    prompts = [[1], [1, 2], [3], [4, 4, 4], [5]]
    responses = [[10, 11], [12], [13, 14, 15], [16], [17, 18, 19, 20]]
    one = score_sequences(StubReference(), prompts, responses, k=2, batch_size=1, store_hidden=True)
    three = score_sequences(StubReference(), prompts, responses, k=2, batch_size=3, store_hidden=True)
    assert one.counts.tolist() == [2, 1, 3, 1, 4]
    assert (-one.target_logprobs).tolist() == [10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20]
    assert one.seq_logprobs.tolist() == [-21, -12, -42, -16, -74]
    assert one.prefix_hidden_sum.tolist() == [[1, 0], [1, 1], [3, 0], [4, 2], [5, 0]]
    for name in SCORE_FIELDS:
        assert np.array_equal(getattr(one, name), getattr(three, name)), name
    plain = score_sequences(StubReference(), prompts, responses, k=2, batch_size=2)
    assert plain.hidden is None and plain.prefix_hidden_sum is None
    assert plain.tail_ids is None and plain.tail_logprobs is None
    # tail draws: each token gets the uniforms of its own key (sequence key, rank), however batched
    keys = [40, 41, 7, 9, 12]
    draws = [
        score_sequences(StubReference(), prompts, responses, k=2, batch_size=size, tail_draws=3, sequence_keys=keys)
        for size in (1, 3)
    ]
    want = token_uniforms(scored_token_keys(np.array(keys), one.counts), 3)
    for scored in draws:
        assert scored.tail_ids.shape == (11, 3)
        assert np.array_equal(scored.tail_logprobs, want.astype(np.float32))
        assert np.array_equal(scored.tail_ids, (want * 2**31).astype(np.int32))


def test_token_keys_and_uniforms():
    """A token's key is its sequence's key · 2^20 + its rank in the sequence; its uniforms are a
    hash of that key alone, in [0, 1), the same on every call."""
    keys = scored_token_keys(np.array([3, 0, 5]), np.array([2, 0, 3]))
    assert keys.tolist() == [3 << 20, (3 << 20) + 1, 5 << 20, (5 << 20) + 1, (5 << 20) + 2]
    u = token_uniforms(keys, 4)
    assert u.shape == (5, 4) and u.dtype == np.float64
    assert np.array_equal(u, token_uniforms(keys, 4)) and np.array_equal(u[2:3], token_uniforms(keys[2:3], 4))
    assert len(np.unique(u)) == u.size
    many = token_uniforms(np.arange(20_000), 5)
    assert ((many >= 0) & (many < 1)).all()
    # uniform: each tenth of [0, 1) holds 10 % of 100,000 draws, to 4 standard errors (0.38 %)
    counts = np.bincount((many * 10).astype(int).ravel(), minlength=10) / many.size
    assert np.abs(counts - 0.1).max() < 0.004
    with pytest.raises(ValueError, match="at most"):
        scored_token_keys(np.array([1]), np.array([1 << 20]))


def test_draw_tail_draws_the_reference_outside_its_top_k():
    """Inverse-CDF draws: never one of the top k, each tail id as often as its share of the tail's
    mass (40,000 draws of a 12-token vocabulary, to 4 standard errors), log-probs normalised over
    the whole vocabulary; a row whose top k hold everything gets its most likely id."""
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -0.5, -1.0, 1.5, 0.2, -2.0, 0.7, -0.3, 0.1]])
    k = 3
    _, ids, _ = topk_reference(logits, torch.tensor([0]), k)
    uniforms = torch.from_numpy(token_uniforms(np.array([11]), 40_000))
    drawn, logprobs = draw_tail(logits, ids, uniforms)
    assert drawn.dtype == torch.int32 and drawn.shape == (1, 40_000)
    assert not torch.isin(drawn, ids).any()
    lp = torch.log_softmax(logits, -1)
    torch.testing.assert_close(logprobs, lp[0, drawn.long()], atol=1e-6, rtol=0)
    tail = lp.exp()[0].scatter(0, ids[0].long(), 0.0)
    share = tail / tail.sum()
    freq = torch.bincount(drawn[0].long(), minlength=12).double() / drawn.shape[1]
    sd = (share * (1 - share) / drawn.shape[1]).sqrt()
    assert ((freq - share).abs() <= 4 * sd + 1e-12).all()
    everything = torch.arange(12).flip(0).unsqueeze(0)  # k = V: no tail
    drawn, logprobs = draw_tail(logits, everything, uniforms[:, :5])
    assert drawn.tolist() == [[11] * 5] and torch.allclose(logprobs, lp[:, 11:12].expand(1, 5))


def _tiny_reference():
    from transformers import LlamaConfig, LlamaForCausalLM

    from alignheads.models.reference import ReferenceModel

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=40,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return ReferenceModel(LlamaForCausalLM(cfg).float())


def test_prefix_hidden_sums_equal_a_direct_backbone_forward():
    """The cached prefix sum of each sequence is the float32 sum of the backbone's last hidden
    states at positions 0 .. P-2 of that sequence run alone (no padding, no batch-mates), and
    the cached hidden states continue it at P-1, P, ... (their running mean is CALM's context)."""
    reference = _tiny_reference()
    prompts = [[5, 6, 7, 8, 9], [], [3], [11, 12], [13, 14, 15, 16, 17, 18, 19]]
    responses = [[20, 21], [22, 23, 24], [25], [26, 27, 28, 29], [30]]
    scores = score_sequences(reference, prompts, responses, k=4, batch_size=3, store_hidden=True)
    assert scores.prefix_hidden_sum.shape == (5, 16) and scores.prefix_hidden_sum.dtype == np.float32
    starts = np.concatenate([[0], np.cumsum(scores.counts)])
    for b, (p, r) in enumerate(zip(prompts, responses, strict=True)):
        with torch.inference_mode():
            h = reference.backbone(input_ids=torch.tensor([p + r]), use_cache=False).last_hidden_state[0]
        first = max(len(p), 1) - 1  # the first predicting position
        want = h[:first].sum(0)
        got = torch.from_numpy(scores.prefix_hidden_sum[b])
        if first == 0:
            assert torch.equal(got, torch.zeros(16))  # nothing before it: exactly zero
        # float32 throughout: only the padded batch's kernel rounding separates the two
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        cached = torch.from_numpy(scores.hidden[starts[b] : starts[b + 1]]).float()
        torch.testing.assert_close(cached, h[first : first + len(cached)], atol=5e-3, rtol=1e-3)  # float16


def _pairs() -> pa.Table:
    return pa.table(
        {
            "id": ["a", "b"],
            "split": ["train", "test"],
            "prompt_len": pa.array([2, 3], pa.int32()),
            "chosen_len": pa.array([2, 1], pa.int32()),
            "rejected_len": pa.array([1, 3], pa.int32()),
        }
    )


def test_build_rows_layout_and_round_trip():
    counts = np.array([2, 1, 1, 3])
    n = int(counts.sum())
    scores = BatchScores(
        counts=counts,
        target_logprobs=-np.arange(n, dtype=np.float32) / 3,
        topk_ids=np.arange(2 * n, dtype=np.int32).reshape(n, 2),
        topk_logprobs=-np.arange(2 * n, dtype=np.float32).reshape(n, 2) / 7,
        seq_logprobs=np.array([-1.0, -2.0, -3.0, -4.0]),
        hidden=np.ones((n, 3), np.float16),
        prefix_hidden_sum=np.arange(4 * 3, dtype=np.float32).reshape(4, 3) / 3,
    )
    table = build_rows(_pairs(), 10, scores, k=2, dtype="float16")
    assert table.schema.equals(refcache_schema(2, "float16", hidden_size=3))
    assert table.column("pair_index").to_pylist() == [10, 10, 11, 11]
    assert table.column("side").to_pylist() == ["chosen", "rejected", "chosen", "rejected"]
    assert table.column("id").to_pylist() == ["a", "a", "b", "b"]
    assert table.column("response_len").to_pylist() == [2, 1, 1, 3]
    assert table.column("prompt_len").to_pylist() == [2, 2, 3, 3]
    assert [len(x) for x in table.column("topk_ids").to_pylist()] == [2, 1, 1, 3]
    assert np.array_equal(token_matrix(table.column("topk_ids")), scores.topk_ids)
    assert np.array_equal(token_vector(table.column("token_logprobs")), scores.target_logprobs)
    lp = token_matrix(table.column("topk_logprobs"))
    assert lp.dtype == np.float16 and np.array_equal(lp, scores.topk_logprobs.astype(np.float16))
    # a slice (one pair) flattens to its own tokens
    assert token_matrix(table.slice(2, 2).column("topk_ids")).tolist() == scores.topk_ids[3:].tolist()
    assert refcache_schema(2, "float32").field("topk_logprobs").type.value_type.value_type == pa.float32()
    # one float32 vector per row (per sequence), not per token
    assert table.schema.field("prefix_hidden_sum").type == pa.list_(pa.float32(), 3)
    assert np.array_equal(
        np.array(table.column("prefix_hidden_sum").to_pylist(), np.float32), scores.prefix_hidden_sum
    )
    assert "prefix_hidden_sum" not in refcache_schema(2, "float16").names
    assert "tail_ids" not in table.schema.names
    # tail draws: per token, like the top k, their log-probs rounded to the top-k dtype
    tail_ids = np.arange(3 * n, dtype=np.int32).reshape(n, 3) + 100
    tail_lps = -np.arange(3 * n, dtype=np.float32).reshape(n, 3) / 11
    drawn = build_rows(
        _pairs(), 10, dataclasses.replace(scores, tail_ids=tail_ids, tail_logprobs=tail_lps), k=2, dtype="float16"
    )
    assert drawn.schema.equals(refcache_schema(2, "float16", hidden_size=3, tail_draws=3))
    assert [len(x) for x in drawn.column("tail_ids").to_pylist()] == [2, 1, 1, 3]
    assert np.array_equal(token_matrix(drawn.column("tail_ids")), tail_ids)
    assert np.array_equal(token_matrix(drawn.column("tail_logprobs")), tail_lps.astype(np.float16))
    with pytest.raises(ValueError, match="prefix_hidden_sum"):
        build_rows(
            _pairs(), 0, BatchScores(*(getattr(scores, f) for f in SCORE_FIELDS[:-1])), k=2, dtype="float16"
        )
    with pytest.raises(ValueError, match="3 scored sequences for 2 pairs"):
        build_rows(_pairs(), 0, BatchScores(counts[:3], *(None,) * 4, None), k=2, dtype="float16")


def test_the_soft_cap_helper_is_what_a_gemma2_forward_does():
    """`head_base.soft_cap` (used wherever logits are formed from hidden states outside the model's
    forward) gives exactly the logits of transformers' Gemma-2 forward, and the reference pass
    uses it: its split path matches the forward and its statistics are of capped logits."""
    from alignheads.models.head_base import final_logit_cap, soft_cap
    from alignheads.models.reference import ReferenceModel
    from tests.helpers.tiny_models import tiny_gemma2, tiny_llama

    model = tiny_gemma2(cap=3.0)
    assert final_logit_cap(model) == 3.0
    ids = torch.tensor([[1, 5, 9, 33, 70, 2]])
    with torch.no_grad():
        hidden = model.base_model(input_ids=ids).last_hidden_state
        raw = model.get_output_embeddings()(hidden)
        assert raw.abs().max() > 6.0  # well past the cap
        assert torch.equal(soft_cap(raw, 3.0), model(input_ids=ids).logits)
        assert torch.equal(soft_cap(raw, None), raw)
    reference = ReferenceModel(model)  # the split path passes its check against the forward
    with torch.inference_mode():
        assert torch.equal(reference.output_logits(hidden), soft_cap(raw, 3.0))
    assert final_logit_cap(tiny_llama(tied=False)) is None
