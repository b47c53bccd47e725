"""How the reference pass reads a shard's token lists (numpy views of the Arrow column, sliced
tables included) and finds the first row with a token outside the vocabulary; and that the
vectorised reordering of `score_sequences` keeps sequences without scored tokens in place."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from alignheads.models.reference import BatchScores, score_sequences, segment_sums
from alignheads.tasks.refpass import _first_row_outside, _token_lists


def _rows(values: np.ndarray, offsets: np.ndarray) -> list[list[int]]:
    return [values[a:b].tolist() for a, b in zip(offsets[:-1], offsets[1:], strict=True)]


def test_token_lists_are_the_rows_of_sliced_and_chunked_columns():
    rows = [[1, 2], [], [3, 4, 5], [6], [7, 8]]
    table = pa.table({"ids": pa.array(rows, pa.list_(pa.int32()))})
    for start, stop in ((0, 5), (1, 4), (2, 5), (3, 3)):
        values, offsets = _token_lists(table.slice(start, stop - start).column("ids"))
        assert offsets[0] == 0 and offsets.dtype == np.int64
        assert _rows(values, offsets) == rows[start:stop]
    chunked = pa.chunked_array(
        [pa.array(rows[:2], pa.list_(pa.int32())).slice(1), pa.array(rows[2:], pa.list_(pa.int32()))]
    )
    values, offsets = _token_lists(chunked)
    assert _rows(values, offsets) == rows[1:]
    values, offsets = _token_lists(pa.chunked_array([], pa.list_(pa.int32())))
    assert values.size == 0 and offsets.tolist() == [0]


def test_first_row_outside_the_vocabulary():
    rows = [[1, 2], [], [3, 9, 5], [-1], [10]]
    values, offsets = _token_lists(pa.chunked_array([pa.array(rows, pa.list_(pa.int64()))]))
    assert _first_row_outside(values, offsets, 10) == 3  # -1: below the vocabulary
    assert _first_row_outside(values, offsets, 9) == 2  # 9 is one past it
    assert (
        _first_row_outside(*_token_lists(pa.chunked_array([pa.array(rows[:3], pa.list_(pa.int64()))])), 10)
        is None
    )
    assert _first_row_outside(np.zeros(0, np.int32), np.zeros(1, np.int64), 10) is None


class _TargetsReference:
    """Scores derived from the targets only (the batching cannot show)."""

    hidden_size = 1

    def score_batch(self, batch, k, store_hidden=False, hidden_dtype="float32", tail_uniforms=None):
        t = batch.targets.numpy().astype(np.float32)
        counts = batch.counts.numpy()
        return BatchScores(
            counts=counts,
            target_logprobs=-t,
            topk_ids=np.stack([t.astype(np.int32)] * k, axis=1),
            topk_logprobs=np.stack([-t] * k, axis=1),
            seq_logprobs=segment_sums(-t, counts),
            hidden=t[:, None] if store_hidden else None,
            prefix_hidden_sum=np.zeros((len(counts), 1), np.float32) if store_hidden else None,
        )


def test_sequences_without_scored_tokens_keep_their_place():
    # empty responses and an empty prompt with a one-token response: nothing scored there
    prompts = [[1], [2, 3], [], [4], [5, 6, 7], [8]]
    responses = [[10, 11], [], [12], [13, 14, 15], [], [16]]
    for batch_size in (1, 2, 4, 6):
        scores = score_sequences(
            _TargetsReference(), prompts, responses, k=2, batch_size=batch_size, store_hidden=True
        )
        assert scores.counts.tolist() == [2, 0, 0, 3, 0, 1]
        assert (-scores.target_logprobs).tolist() == [10, 11, 13, 14, 15, 16]
        assert scores.seq_logprobs.tolist() == [-21, 0, 0, -42, 0, -16]
        assert scores.hidden[:, 0].tolist() == [10, 11, 13, 14, 15, 16]
    # numpy views like the reference pass gives: the same
    as_arrays = [np.asarray(p, np.int32) for p in prompts], [np.asarray(r, np.int32) for r in responses]
    again = score_sequences(_TargetsReference(), *as_arrays, k=2, batch_size=4)
    assert (-again.target_logprobs).tolist() == [10, 11, 13, 14, 15, 16]
