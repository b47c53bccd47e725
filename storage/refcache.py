"""The `refcache` table: its row layout, building rows from scores, reading them back as arrays.

Row layout — one row per (pair, side), the chosen row of a pair directly followed by its
rejected row, pairs in the order of the `tokenized` table (a shard holds a contiguous range
of its rows). A DPO batch is therefore two consecutive rows, and a shard can be zipped with
the same rows of `tokenized` without a join. Columns:

| column | type | meaning |
|---|---|---|
| pair_index | int64 | row of the pair in the `tokenized` table |
| id, split | string | the pair's id and split (as in `pairs` / `tokenized`) |
| side | string | `chosen` or `rejected` |
| prompt_len, response_len | int32 | tokens of the prompt and of the response (incl. EOS) |
| seq_logprob | float64 | Σ of `token_logprobs`: the reference's summed response log-prob |
| token_logprobs | list<float32> | per scored response token: log p_ref(actual token) |
| topk_ids | list<fixed_size_list<int32>[K]> | per scored token: the K most likely ids, most likely first |
| topk_logprobs | list<fixed_size_list<float16 or float32>[K]> | their log-probs, normalised over the full vocabulary |
| hidden (optional) | list<fixed_size_list<float32 or float16>[H]> | the last hidden state that predicts each scored token (`refpass.hidden_dtype`; float32 holds exactly the states every reference value here comes from) |
| prefix_hidden_sum (with hidden) | fixed_size_list<float32>[H] | Σ of the last hidden states at positions 0 … prompt_len−2: every real token before the first predicting position (zeros when prompt_len ≤ 1) |
| tail_ids (optional) | list<fixed_size_list<int32>[M]> | per scored token: M ids drawn with replacement from the reference's distribution outside its top K (`refpass.tail_draws`; the most likely id where the top K hold all the mass) |
| tail_logprobs (with tail_ids) | list<fixed_size_list<float16 or float32>[M]> | their log-probs, normalised over the full vocabulary, in the top-k log-probs' dtype |

"Scored" response tokens are all of them, except a first response token at position 0 (an
empty prompt), which nothing predicts; the list length is the number of scored tokens.
The predicting positions are ``prompt_len − 1 …`` (``0 …`` for an empty prompt), one per
scored token, so with `hidden` and `prefix_hidden_sum` CALM's causal context mean at the
j-th one is ``(prefix_hidden_sum + Σ_{u≤j} hidden_u) / (max(prompt_len − 1, 0) + j + 1)``
without running the model.
Parquet stores the lists column by column, so a reader that asks for `seq_logprob` only never
reads the top-k or hidden columns.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa

if TYPE_CHECKING:  # scores come from the reference pass; reading the cache needs no torch
    from alignheads.models.reference import BatchScores

__all__ = [
    "SIDES",
    "TABLE",
    "build_rows",
    "refcache_schema",
    "rounded",
    "token_matrix",
    "token_vector",
]

TABLE = "refcache"
SIDES = ("chosen", "rejected")
_VALUE_TYPES = {"float16": pa.float16(), "float32": pa.float32()}
_NUMPY = {"float16": np.float16, "float32": np.float32}


def refcache_schema(
    k: int, dtype: str, hidden_size: int | None = None, hidden_dtype: str = "float16", tail_draws: int = 0
) -> pa.Schema:
    """Schema of the refcache table for top-k ``k``, top-k storage ``dtype`` and, when
    ``hidden_size`` is given, a ``hidden`` column in ``hidden_dtype`` (float16 or float32; the
    reference pass's default, `refpass.hidden_dtype`, is float32 and :func:`build_rows` passes the
    dtype of the states it is given) and a float32 ``prefix_hidden_sum`` column of that width;
    with ``tail_draws`` M > 0, the ``tail_ids`` and ``tail_logprobs`` (in ``dtype``) of M draws."""
    fields = [
        ("pair_index", pa.int64()),
        ("id", pa.string()),
        ("split", pa.string()),
        ("side", pa.string()),
        ("prompt_len", pa.int32()),
        ("response_len", pa.int32()),
        ("seq_logprob", pa.float64()),
        ("token_logprobs", pa.list_(pa.float32())),
        ("topk_ids", pa.list_(pa.list_(pa.int32(), k))),
        ("topk_logprobs", pa.list_(pa.list_(_VALUE_TYPES[dtype], k))),
    ]
    if hidden_size is not None:
        fields.append(("hidden", pa.list_(pa.list_(_VALUE_TYPES[hidden_dtype], hidden_size))))
        fields.append(("prefix_hidden_sum", pa.list_(pa.float32(), hidden_size)))
    if tail_draws:
        fields.append(("tail_ids", pa.list_(pa.list_(pa.int32(), tail_draws))))
        fields.append(("tail_logprobs", pa.list_(pa.list_(_VALUE_TYPES[dtype], tail_draws))))
    return pa.schema(fields)


def _per_token(offsets: pa.Array, values: np.ndarray, arrow_type: pa.DataType) -> pa.Array:
    """A list-per-row column from flat per-token values ``(N,)`` or ``(N, W)``."""
    if values.ndim == 1:
        inner = pa.array(values, type=arrow_type.value_type)
    else:
        fixed = arrow_type.value_type
        inner = pa.FixedSizeListArray.from_arrays(
            pa.array(values.reshape(-1), type=fixed.value_type), fixed.list_size
        )
    return pa.ListArray.from_arrays(offsets, inner, type=arrow_type)


def rounded(values: np.ndarray, dtype: str) -> np.ndarray:
    """float32 ``values`` (any shape) in the top-k storage ``dtype`` (float16 or float32).

    float16 goes through torch's vectorised cast: numpy's float32 → float16 cast is scalar
    (~25x slower, the largest cost of building a shard's rows), and both round to nearest,
    ties to even, subnormals and overflow to ±inf included: the same bits for every float32
    but the signalling NaNs (checked over all 2^32 bit patterns), which no arithmetic makes
    and so never reach here (the values are log-probs, ``z − logsumexp z``).
    """
    if dtype == "float16" and values.dtype == np.float32:  # (float64 would round twice in torch)
        import torch

        return torch.from_numpy(np.ascontiguousarray(values)).to(torch.float16).numpy()
    return values.astype(_NUMPY[dtype])


def build_rows(
    pairs: pa.Table,
    pair_offset: int,
    scores: BatchScores,
    k: int,
    dtype: str,
) -> pa.Table:
    """The refcache rows of a range of pairs.

    pairs: `tokenized` rows (id, split, prompt_len, chosen_len, rejected_len), ``P`` of them,
    whose first row is row ``pair_offset`` of the table; scores: the ``2P`` sequences in row
    order (chosen of pair 0, rejected of pair 0, chosen of pair 1, ...). Top-k (and tail-draw)
    log-probs are rounded to ``dtype`` here, nowhere else; hidden states are stored in the dtype they come in
    (float32 or float16, `refpass.hidden_dtype`).
    """
    n = pairs.num_rows
    if scores.counts.shape[0] != 2 * n:
        raise ValueError(f"{scores.counts.shape[0]} scored sequences for {n} pairs (need {2 * n})")
    hidden_size = scores.hidden.shape[1] if scores.hidden is not None else None
    if hidden_size is not None and (
        scores.prefix_hidden_sum is None or scores.prefix_hidden_sum.shape != (2 * n, hidden_size)
    ):
        got = None if scores.prefix_hidden_sum is None else scores.prefix_hidden_sum.shape
        raise ValueError(f"hidden states need prefix_hidden_sum of shape {(2 * n, hidden_size)}, got {got}")
    hidden_dtype = None if scores.hidden is None else np.dtype(scores.hidden.dtype).name
    if hidden_dtype is not None and hidden_dtype not in _VALUE_TYPES:
        raise ValueError(f"hidden states must be float32 or float16, got {hidden_dtype}")
    tail_draws = 0 if scores.tail_ids is None else scores.tail_ids.shape[1]
    schema = refcache_schema(k, dtype, hidden_size, hidden_dtype or "float16", tail_draws)
    offsets = pa.array(np.concatenate([[0], np.cumsum(scores.counts)]), type=pa.int32())

    def twice(name: str) -> np.ndarray:
        return np.repeat(np.asarray(pairs.column(name).to_numpy(zero_copy_only=False)), 2)

    response_len = np.stack(
        [pairs.column("chosen_len").to_numpy(), pairs.column("rejected_len").to_numpy()], axis=1
    ).reshape(-1)
    columns = {
        "pair_index": pa.array(np.repeat(np.arange(pair_offset, pair_offset + n, dtype=np.int64), 2)),
        "id": pa.array(twice("id"), type=pa.string()),
        "split": pa.array(twice("split"), type=pa.string()),
        "side": pa.array(np.tile(np.array(SIDES, dtype=object), n), type=pa.string()),
        "prompt_len": pa.array(twice("prompt_len"), type=pa.int32()),
        "response_len": pa.array(response_len, type=pa.int32()),
        "seq_logprob": pa.array(scores.seq_logprobs, type=pa.float64()),
        "token_logprobs": _per_token(offsets, scores.target_logprobs, schema.field("token_logprobs").type),
        "topk_ids": _per_token(offsets, scores.topk_ids, schema.field("topk_ids").type),
        "topk_logprobs": _per_token(
            offsets, rounded(scores.topk_logprobs, dtype), schema.field("topk_logprobs").type
        ),
    }
    if hidden_size is not None:
        columns["hidden"] = _per_token(offsets, scores.hidden, schema.field("hidden").type)
        columns["prefix_hidden_sum"] = pa.FixedSizeListArray.from_arrays(
            pa.array(scores.prefix_hidden_sum.astype(np.float32).reshape(-1), type=pa.float32()), hidden_size
        )
    if tail_draws:
        columns["tail_ids"] = _per_token(offsets, scores.tail_ids, schema.field("tail_ids").type)
        columns["tail_logprobs"] = _per_token(
            offsets, rounded(scores.tail_logprobs, dtype), schema.field("tail_logprobs").type
        )
    return pa.Table.from_pydict(columns, schema=schema)


def token_vector(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """A ``list<x>`` column flattened over rows: ``(N,)``, the rows' tokens one after another
    (a writable copy, ready for ``torch.from_numpy``)."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    return arr.flatten().to_numpy(zero_copy_only=False, writable=True)


def token_matrix(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """A ``list<fixed_size_list<x>[W]>`` column flattened over rows: ``(N, W)`` (a writable copy)."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    width = arr.type.value_type.list_size
    inner = arr.flatten()
    return inner.flatten().to_numpy(zero_copy_only=False, writable=True).reshape(-1, width)
