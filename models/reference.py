"""Scoring response tokens with a frozen reference model: log-prob of each actual token, top-k.

Shapes: ``B`` sequences in a batch, ``T`` padded length, ``N`` scored tokens in the batch
(all response tokens that have a predicting position), ``V`` vocabulary, ``H`` hidden size,
``K`` top-k. A sequence is ``prompt + response``; the hidden state at position ``t`` predicts
the token at ``t + 1`` (docs/architecture.md), so a response token at ``t`` is scored by the logits at
``t − 1``, and a response token at position 0 (empty prompt) has none and is not scored.

Batches are right-padded: with a causal model the real tokens never see the padding and their
position ids are the plain ``0..n−1``, so no position-id bookkeeping is needed. The output
layer runs only on the ``N`` scoring positions (not on prompt or padding positions), which is
what keeps the reference pass as fast as a bare forward pass.

With ``store_hidden`` the pass also keeps what a head trained without the backbone needs
(``features: cached``): the hidden states at the ``N`` predicting positions, in
``hidden_dtype`` (float32 by default: the very states the reference's log-probs and top-k come
from, so cached features train exactly like the backbone's; float16 halves the size, and the
cached states are then the rounded ones while every cached reference value stays the
full-precision model's), and per sequence the float32 sum of the hidden states at the real
tokens *before* its first predicting position (positions ``0 .. P − 2`` for a prompt of
``P ≥ 1`` tokens; none for ``P ≤ 1``). The running context mean
at predicting position ``p`` is then ``(prefix sum + Σ of the cached states up to p) / (p + 1)``.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

__all__ = [
    "BatchScores",
    "PackedBatch",
    "ReferenceModel",
    "draw_tail",
    "length_sorted_batches",
    "load_reference",
    "pack_batch",
    "partition_topk",
    "prefix_hidden_sums",
    "ranks_in_sequences",
    "resolve_device",
    "score_sequences",
    "scored_token_keys",
    "segment_sums",
    "sorted_topk",
    "token_uniforms",
    "topk_reference",
    "untied_topk",
]


# --------------------------------------------------------------------------- pure functions


@dataclass(frozen=True)
class PackedBatch:
    """Right-padded sequences and where their scored response tokens are.

    input_ids, attention_mask: ``(B, T)``; rows, cols: ``(N,)`` the predicting positions
    (sequence-major, ascending position); targets: ``(N,)`` the token each one predicts;
    counts: ``(B,)`` scored tokens per sequence (sums to ``N``); prefix_lens: ``(B,)`` the
    real tokens before each sequence's first predicting position, ``max(P − 1, 0)``.
    """

    input_ids: Tensor
    attention_mask: Tensor
    rows: Tensor
    cols: Tensor
    targets: Tensor
    counts: Tensor
    prefix_lens: Tensor


def pack_batch(
    prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], pad_id: int
) -> PackedBatch:
    """Concatenate each prompt with its response, right-pad to the longest, index the response.

    For a prompt of ``P`` tokens and a response of ``L``, the scored targets are the tokens at
    positions ``max(P, 1) .. P + L − 1``, predicted from positions one earlier.
    """
    if len(prompts) != len(responses) or not prompts:
        raise ValueError(f"need matching, non-empty prompts and responses ({len(prompts)}, {len(responses)})")
    n_prompt = np.array([len(p) for p in prompts], dtype=np.int64)
    total = n_prompt + np.array([len(r) for r in responses], dtype=np.int64)
    ids = np.full((len(prompts), max(int(total.max()), 1)), pad_id, dtype=np.int64)
    for b, (prompt, response) in enumerate(zip(prompts, responses, strict=True)):
        ids[b, : n_prompt[b]] = prompt
        ids[b, n_prompt[b] : total[b]] = response
    mask = (np.arange(ids.shape[1]) < total[:, None]).astype(np.int64)
    first = np.maximum(n_prompt, 1)  # first scored target position of each sequence
    counts = np.maximum(total - first, 0)
    rows = np.repeat(np.arange(len(prompts)), counts)
    # position of each target: first[row] + its rank inside its sequence
    targets_at = np.repeat(first, counts) + ranks_in_sequences(counts)
    return PackedBatch(
        input_ids=torch.from_numpy(ids),
        attention_mask=torch.from_numpy(mask),
        rows=torch.from_numpy(rows),
        cols=torch.from_numpy(targets_at - 1),
        targets=torch.from_numpy(ids[rows, targets_at]),
        counts=torch.from_numpy(counts),
        # the first predicting position is max(P, 1) - 1: every real token before it
        prefix_lens=torch.from_numpy(first - 1),
    )


def ranks_in_sequences(counts: np.ndarray) -> np.ndarray:
    """Each scored token's rank inside its sequence: counts ``(B,)`` tokens per sequence →
    ``(N,)`` ``0 .. counts[b] − 1`` for each sequence in turn, ``N = Σ counts``."""
    return np.arange(int(counts.sum())) - np.repeat(np.cumsum(counts) - counts, counts)


def _order_keys(values: np.ndarray) -> np.ndarray:
    """int32 keys, same shape, that order like the float32 ``values`` (NaN aside): a non-negative
    float's bits as they are, a negative one's with all but the sign bit flipped (−0.0 then
    sorts just below +0.0). The map is its own inverse: keys → float32 bits."""
    bits = values.view(np.int32)
    return bits ^ ((bits >> 31) & np.int32(0x7FFFFFFF))


def untied_topk(x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The k largest entries of each row of ``x`` (N, V) float32, largest first, for the rows
    where they are unique; a partition and a sort of k keys instead of a selection over
    (value, id) pairs (what makes it ~3x faster than ``torch.topk`` on the CPU).

    Returns ``(values (N, K) float32, ids (N, K) int32, tied (N,) bool)``. ``tied`` marks the
    rows where the answer depends on how ties are broken (two equal values among the k largest,
    a value equal to the k-th outside them, −0.0 next to +0.0) or that hold a NaN; their values
    and ids are placeholders. Every other row holds exactly what ``torch.topk(sorted=True)``
    gives: the k largest are then a unique set in a unique order, and values are copied, never
    computed.
    """
    n, v = x.shape
    x = np.ascontiguousarray(x)
    kth = np.partition(x, v - k, axis=-1)[:, v - k]  # the k-th largest of each row
    top = x >= kth[:, None]
    flat = np.flatnonzero(top)  # row-major: each row's ids at or above its k-th, ascending
    # per-row counts from where each row starts in `flat` (cheaper than summing the mask):
    # more than k at the k-th value is a tie at the boundary, fewer a NaN (never >= anything)
    tied = np.diff(np.searchsorted(flat, np.arange(n + 1, dtype=np.int64) * v)) != k
    if tied.any():  # placeholder: the first k ids, so that every row has k
        top[tied] = False
        top[tied, :k] = True
        flat = np.flatnonzero(top)
    cols = flat.reshape(n, k) - (np.arange(n, dtype=np.int64) * v)[:, None]
    # one int64 key per entry, (value, id): a plain sort orders the k by value
    keys = (_order_keys(x.reshape(-1)[flat]).astype(np.int64) << 32).reshape(n, k) | cols
    keys.sort(axis=-1)
    keys = np.ascontiguousarray(keys[:, ::-1])  # largest first
    values = _order_keys((keys >> 32).astype(np.int32)).view(np.float32)
    tied |= (values[:, 1:] == values[:, :-1]).any(axis=-1)  # equal values: their order is a tie-break
    return values, (keys & 0xFFFFFFFF).astype(np.int32), tied


def partition_topk(logits: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """``torch.topk(logits, k, dim=-1, sorted=True)`` bit for bit, tie order included, for CPU
    float32 logits ``(N, V)``: the rows without ties from :func:`untied_topk`, the tied ones
    (rare: two float32 logits seldom coincide among the top k) from ``torch.topk``, which treats
    each row on its own, so the result is that of one ``torch.topk`` over all rows. Returns
    ``(values (N, K) float32, ids (N, K) int32)``."""
    values, ids, tied = untied_topk(logits.detach().numpy(), k)
    values, ids = torch.from_numpy(values), torch.from_numpy(ids)
    if tied.any():
        rows = torch.from_numpy(np.flatnonzero(tied))
        tied_values, tied_ids = logits[rows].topk(k, dim=-1, sorted=True)
        values[rows] = tied_values
        ids[rows] = tied_ids.to(torch.int32)
    return values, ids


# torch.topk's partial sort (a heap of the k best) beats the partition where few entries ever
# enter the heap, k a small share of V (on a 2-core x86 CPU: k ≤ V / 256, e.g. top-64 of a
# 32,000 vocabulary); the partition wins where the k are a sizable share (top-64 of 512: ~2x).
# Both give the same bits, so this picks the speed only.
_HEAP_TOPK_SHARE = 256


def sorted_topk(logits: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """``torch.topk(logits, k, dim=-1, sorted=True)`` bit for bit, tie order included, with the
    ids as int32, by the faster of two exact ways: :func:`partition_topk` for CPU float32 logits
    whose k are more than 1/256 of the vocabulary, ``torch.topk`` itself otherwise (on a GPU,
    and for large vocabularies). logits: ``(N, V)``. Returns ``(values (N, K), ids (N, K) int32)``.
    """
    cpu_float32 = logits.device.type == "cpu" and logits.dtype == torch.float32 and logits.dim() == 2
    if cpu_float32 and k * _HEAP_TOPK_SHARE > logits.shape[-1]:
        return partition_topk(logits, k)
    values, ids = logits.topk(k, dim=-1, sorted=True)
    return values, ids.to(torch.int32)


def topk_reference(logits: Tensor, targets: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """Reference statistics of each scored position.

    logits: ``(N, V)``; targets: ``(N,)``. Returns ``(target_logprobs (N,) float32,
    topk_ids (N, K) int32, topk_logprobs (N, K) float32)``: the log-prob of the actual token
    (``z[y] − logsumexp z``, as :func:`alignheads.models.losses.token_logprobs` computes it), and the K
    most likely ids with their log-probs normalised over the full vocabulary, most likely
    first (the inputs of :func:`alignheads.models.losses.topk_tail_kl`), exactly as
    ``torch.topk`` orders them (:func:`sorted_topk`).
    """
    if not 1 <= k <= logits.shape[-1]:
        raise ValueError(f"k = {k} must be between 1 and the vocabulary size {logits.shape[-1]}")
    logits = logits.float()
    # top-k of the logits, then normalise only those k: no (N, V) log-softmax is materialised
    values, ids = sorted_topk(logits, k)
    # logsumexp reusing the row maximum topk has just found (the first value): the same ops as
    # torch.logsumexp after its own max pass (amax, exp of the difference, sum, log, add), so
    # bit-identical, one pass over the (N, V) logits fewer
    top = values[:, :1]
    lse = (logits - top).exp_().sum(-1).log_().add_(top.squeeze(-1))
    target_lp = logits.gather(-1, targets.long().unsqueeze(-1)).squeeze(-1) - lse
    return target_lp, ids, values - lse.unsqueeze(-1)


def token_uniforms(keys: np.ndarray, m: int, seed: int = 0) -> np.ndarray:
    """``m`` uniforms in [0, 1) per token from its 64-bit ``keys (N,)``: ``(N, m)`` float64, the
    SplitMix64 hash of ``key · m + j`` (XOR ``seed``). A token's draws depend on its key alone, not
    on the batch or the shard it is scored in."""
    with np.errstate(over="ignore"):  # uint64 arithmetic wraps, as the hash intends
        z = (keys.astype(np.uint64)[:, None] * np.uint64(m) + np.arange(m, dtype=np.uint64)) ^ np.uint64(seed)
        z = z + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) / float(2**53)


def draw_tail(logits: Tensor, topk_ids: Tensor, uniforms: Tensor) -> tuple[Tensor, Tensor]:
    """Draws from the reference's distribution outside its top k, by inverse CDF.

    logits: ``(N, V)``; topk_ids: ``(N, K)`` the ids left out; uniforms: ``(N, M)`` in [0, 1) (see
    :func:`token_uniforms`). Returns ``(ids (N, M) int32, log-probs (N, M) float32)``: id ``i``
    with probability ``p_i / r`` (``r`` the mass outside the top k), and ``log p_i`` normalised
    over the full vocabulary with the log-sum-exp :func:`topk_reference` computes (the same ops).
    A row whose top k hold all the mass (``r = 0``: no tail) gets its first top-k id (the most
    likely, as :func:`topk_reference` orders them) and its log-prob, which the KL estimate weighs
    by ``r = 0``.
    """
    logits = logits.float()
    top = logits.amax(-1, keepdim=True)
    # the softmax's numerators and denominator, in the order topk_reference's log-sum-exp uses
    probs = (logits - top).exp_()
    total = probs.sum(-1)
    lse = total.log().add_(top.squeeze(-1))
    probs.div_(total.unsqueeze(-1)).scatter_(-1, topk_ids.long(), 0.0)
    cdf = probs.cumsum_(-1)
    tail_mass = cdf[:, -1:]
    target = uniforms.to(device=cdf.device, dtype=torch.float64).mul(tail_mass.double()).float()
    # below the tail's whole mass even where rounding reached it, so that some id's cumulative mass
    # exceeds it; `right`: the first such id, so an id of zero mass (the top k) is never drawn
    target = torch.minimum(target, torch.nextafter(tail_mass, torch.zeros_like(tail_mass)))
    ids = torch.searchsorted(cdf, target, right=True).clamp_(max=logits.shape[-1] - 1)
    empty = (tail_mass <= 0).expand_as(ids)
    ids = torch.where(empty, topk_ids[:, :1].long().expand_as(ids), ids)
    return ids.to(torch.int32), logits.gather(-1, ids) - lse.unsqueeze(-1)


def prefix_hidden_sums(hidden: Tensor, prefix_lens: Tensor) -> Tensor:
    """Per sequence, the float32 sum of its first ``prefix_lens[b]`` hidden states.

    hidden: ``(B, T, H)`` any float dtype; prefix_lens: ``(B,)``. Returns ``(B, H)`` float32,
    zeros where ``prefix_lens[b] == 0``. Each row is summed on its own (one sequence at a
    time, so no ``(B, T, H)`` float32 copy is made and the result does not depend on which
    sequences share the batch).
    """
    if hidden.dim() != 3 or prefix_lens.shape != hidden.shape[:1]:
        raise ValueError(
            f"hidden {tuple(hidden.shape)} and prefix_lens {tuple(prefix_lens.shape)} do not match"
        )
    out = torch.zeros(hidden.shape[0], hidden.shape[2], dtype=torch.float32, device=hidden.device)
    for b, n in enumerate(prefix_lens.tolist()):
        if not 0 <= n <= hidden.shape[1]:
            raise ValueError(f"prefix length {n} of sequence {b} outside 0..{hidden.shape[1]}")
        if n:
            out[b] = hidden[b, :n].float().sum(dim=0)
    return out


def segment_sums(values: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Sum of each consecutive segment: values ``(N,)``, counts ``(B,)`` → ``(B,)`` float64.

    Summed in float64 so that the per-sequence total does not depend on how the sequences
    were batched.
    """
    ends = np.cumsum(counts)
    totals = np.concatenate([[0.0], np.cumsum(values.astype(np.float64))])
    return totals[ends] - totals[ends - counts]


def length_sorted_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of similar length, longest first (padding stays small and an
    out-of-memory error shows on the first batch). Ties keep input order (deterministic)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


# --------------------------------------------------------------------------- the model

# storage dtypes of the cached hidden states (`refpass.hidden_dtype`)
_HIDDEN_DTYPES = {"float32": torch.float32, "float16": torch.float16}


@dataclass(frozen=True)
class BatchScores:
    """Scores of sequences, in the order they were given (numpy, on the CPU).

    counts ``(B,)`` scored tokens per sequence; target_logprobs ``(N,)`` float32;
    topk_ids ``(N, K)`` int32; topk_logprobs ``(N, K)`` float32; seq_logprobs ``(B,)``
    float64; hidden ``(N, H)`` float32 or float16 (the stored ``hidden_dtype``) or None;
    prefix_hidden_sum ``(B, H)`` float32 (the sum of the hidden states before each sequence's
    first predicting position, see :func:`prefix_hidden_sums`), present exactly when hidden is;
    tail_ids ``(N, M)`` int32 and tail_logprobs ``(N, M)`` float32: ids drawn from the reference
    outside its top k and their log-probs (:func:`draw_tail`), or None.
    """

    counts: np.ndarray
    target_logprobs: np.ndarray
    topk_ids: np.ndarray
    topk_logprobs: np.ndarray
    seq_logprobs: np.ndarray
    hidden: np.ndarray | None
    prefix_hidden_sum: np.ndarray | None = None
    tail_ids: np.ndarray | None = None
    tail_logprobs: np.ndarray | None = None


class ReferenceModel:
    """A frozen causal LM used as the reference: its backbone, then its own output layer on the
    scoring positions only.

    At construction the split path (backbone → output layer) is checked against the model's own
    forward on a short probe, so a model whose logits are not ``lm_head(last hidden state)``
    (e.g. extra logit scaling) is refused instead of cached wrongly.
    """

    def __init__(self, model: nn.Module, device: str | torch.device = "cpu", check: bool = True) -> None:
        from alignheads.models.head_base import final_logit_cap, lm_output_layer

        self.model = model.eval().to(device)
        self.device = torch.device(device)
        backbone = getattr(model, "base_model", None)
        if backbone is None or backbone is model:
            raise TypeError(f"{type(model).__name__} has no separate backbone (model.base_model)")
        self.backbone = backbone
        self.output_layer = lm_output_layer(model)
        cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        self.vocab_size = int(self.output_layer.weight.shape[0])
        self.hidden_size = int(cfg.hidden_size)
        self.softcap = final_logit_cap(model)
        if check:
            self._check_split_path()

    def output_logits(self, hidden: Tensor) -> Tensor:
        """Logits ``(..., V)`` of last hidden states ``(..., H)``, as the model's forward makes them."""
        from alignheads.models.head_base import soft_cap

        return soft_cap(self.output_layer(hidden), self.softcap)

    @torch.inference_mode()
    def _check_split_path(self) -> None:
        probe = (torch.arange(8, device=self.device) * 7 + 3) % self.vocab_size
        probe = probe.unsqueeze(0)
        full = self.model(input_ids=probe, use_cache=False).logits.float()
        hidden = self.backbone(input_ids=probe, use_cache=False).last_hidden_state
        split = self.output_logits(hidden).float()
        # same ops either way; the tolerance only absorbs kernel differences in low precision
        tol = 1e-4 if self.output_layer.weight.dtype == torch.float32 else 5e-2
        if not torch.allclose(full, split, atol=tol, rtol=tol):
            worst = (full - split).abs().max().item()
            raise ValueError(
                f"{type(self.model).__name__}: its logits are not lm_head(last hidden state) "
                f"(max difference {worst:.3g}); this model cannot be used as a cached reference"
            )

    @torch.inference_mode()
    def forward_hidden(self, batch: PackedBatch, with_prefix: bool = False) -> tuple[Tensor, Tensor | None]:
        """Last hidden states at the batch's N scoring positions, ``(N, H)``, on the model's device,
        and with ``with_prefix`` the ``(B, H)`` float32 sums of the states before each sequence's
        first scoring position (:func:`prefix_hidden_sums`), from the same forward."""
        ids = batch.input_ids.to(self.device)
        mask = batch.attention_mask.to(self.device)
        hidden = self.backbone(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
        # one index_select over the (B·T, H) rows: the same states as hidden[rows, cols], copied
        # without advanced indexing's per-call overhead
        flat = (batch.rows * hidden.shape[1] + batch.cols).to(self.device)
        picked = hidden.reshape(-1, hidden.shape[-1]).index_select(0, flat)
        return picked, prefix_hidden_sums(hidden, batch.prefix_lens) if with_prefix else None

    @torch.inference_mode()
    def extract(
        self,
        picked: Tensor,
        batch: PackedBatch,
        k: int,
        store_hidden: bool = False,
        prefix: Tensor | None = None,
        hidden_dtype: str = "float32",
        tail_uniforms: np.ndarray | None = None,
    ) -> BatchScores:
        """Output layer on the hidden states ``picked (N, H)``, then the statistics, on the CPU
        (with ``store_hidden``, also the hidden states in ``hidden_dtype`` and the prefix sums
        ``prefix (B, H)``; with ``tail_uniforms (N, M)``, M draws per token from the reference
        outside its top k, :func:`draw_tail`). The statistics always come from ``picked`` as the
        model computed it."""
        if store_hidden and prefix is None:
            raise ValueError("store_hidden needs the prefix hidden sums of the same forward")
        logits = self.output_logits(picked)
        target_lp, topk_ids, topk_lp = topk_reference(logits, batch.targets.to(picked.device), k)
        tail = None
        if tail_uniforms is not None:
            tail = draw_tail(logits, topk_ids, torch.from_numpy(tail_uniforms))
        del logits  # (N, V): the batch's largest tensor
        counts = batch.counts.numpy()
        target_np = target_lp.cpu().numpy()
        return BatchScores(
            counts=counts,
            target_logprobs=target_np,
            topk_ids=topk_ids.cpu().numpy(),
            topk_logprobs=topk_lp.cpu().numpy(),
            seq_logprobs=segment_sums(target_np, counts),
            hidden=picked.to(_HIDDEN_DTYPES[hidden_dtype]).cpu().numpy() if store_hidden else None,
            prefix_hidden_sum=prefix.float().cpu().numpy() if store_hidden else None,
            tail_ids=None if tail is None else tail[0].cpu().numpy(),
            tail_logprobs=None if tail is None else tail[1].cpu().numpy(),
        )

    def score_batch(
        self,
        batch: PackedBatch,
        k: int,
        store_hidden: bool = False,
        hidden_dtype: str = "float32",
        tail_uniforms: np.ndarray | None = None,
    ) -> BatchScores:
        """Score one packed batch: the backbone, then the output layer on the N positions only."""
        picked, prefix = self.forward_hidden(batch, with_prefix=store_hidden)
        return self.extract(picked, batch, k, store_hidden, prefix, hidden_dtype, tail_uniforms)


def score_sequences(
    reference: ReferenceModel,
    prompts: Sequence[Sequence[int]],
    responses: Sequence[Sequence[int]],
    k: int,
    batch_size: int,
    pad_id: int = 0,
    store_hidden: bool = False,
    hidden_dtype: str = "float32",
    tail_draws: int = 0,
    sequence_keys: Sequence[int] | None = None,
) -> BatchScores:
    """Score every (prompt, response) in length-sorted batches; results in the input order
    (with ``store_hidden``, the hidden states kept in ``hidden_dtype``: float32 or float16; with
    ``tail_draws`` M > 0, M draws per scored token from the reference outside its top k, seeded by
    the token: ``sequence_keys[i]`` identifies sequence i (default: i) and the token's rank in it
    completes the key, :func:`scored_token_keys`)."""
    lengths = [len(p) + len(r) for p, r in zip(prompts, responses, strict=True)]
    keys = np.asarray(sequence_keys if sequence_keys is not None else range(len(lengths)), dtype=np.int64)
    if keys.shape != (len(lengths),):
        raise ValueError(f"{keys.shape[0]} sequence keys for {len(lengths)} sequences")
    parts: list[tuple[list[int], BatchScores]] = []
    for idx in length_sorted_batches(lengths, batch_size):
        batch = pack_batch([prompts[i] for i in idx], [responses[i] for i in idx], pad_id)
        uniforms = None
        if tail_draws:
            uniforms = token_uniforms(scored_token_keys(keys[idx], batch.counts.numpy()), tail_draws)
        parts.append((idx, reference.score_batch(batch, k, store_hidden, hidden_dtype, uniforms)))
    hidden_size = reference.hidden_size if store_hidden else None
    return _restore_order(parts, len(lengths), k, hidden_size, _HIDDEN_DTYPES[hidden_dtype], tail_draws)


# the rank of a scored token inside its sequence takes the key's low bits
_RANK_BITS = 20


def scored_token_keys(sequence_keys: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """One key per scored token: ``sequence key · 2^20 + rank`` of the token in its sequence.
    sequence_keys, counts: ``(B,)``; returns ``(N,)`` int64, ``N = Σ counts``."""
    if counts.size and int(counts.max()) >= 1 << _RANK_BITS:
        raise ValueError(
            f"a sequence with {int(counts.max())} scored tokens: at most {(1 << _RANK_BITS) - 1}"
        )
    return (np.repeat(sequence_keys.astype(np.int64), counts) << _RANK_BITS) + ranks_in_sequences(counts)


def _restore_order(
    parts: list[tuple[list[int], BatchScores]],
    n: int,
    k: int,
    hidden_size: int | None,
    hidden_dtype: torch.dtype = torch.float32,
    tail_draws: int = 0,
) -> BatchScores:
    """Concatenate per-batch scores and permute tokens back to the sequences' input order."""
    if not parts:
        empty = np.zeros((0,), np.float32)
        return BatchScores(
            counts=np.zeros(0, np.int64),
            target_logprobs=empty,
            topk_ids=np.zeros((0, k), np.int32),
            topk_logprobs=np.zeros((0, k), np.float32),
            seq_logprobs=np.zeros(0, np.float64),
            hidden=torch.zeros(0, hidden_size, dtype=hidden_dtype).numpy() if hidden_size else None,
            prefix_hidden_sum=np.zeros((0, hidden_size), np.float32) if hidden_size else None,
            tail_ids=np.zeros((0, tail_draws), np.int32) if tail_draws else None,
            tail_logprobs=np.zeros((0, tail_draws), np.float32) if tail_draws else None,
        )
    order = np.concatenate([np.asarray(idx, dtype=np.int64) for idx, _ in parts])  # batch pos -> input index
    counts_sorted = np.concatenate([s.counts for _, s in parts])
    starts_sorted = np.concatenate([[0], np.cumsum(counts_sorted)[:-1]])
    counts = np.empty(n, np.int64)
    counts[order] = counts_sorted
    starts = np.empty(n, np.int64)
    starts[order] = starts_sorted
    # token gather index: for each sequence in input order, its token range in the sorted layout
    # (token j of the output, of sequence i, is token j − out_start[i] of i's range at starts[i])
    out_start = np.cumsum(counts) - counts
    take = np.arange(int(counts.sum()), dtype=np.int64) + np.repeat(starts - out_start, counts)

    def cat(name: str) -> np.ndarray:
        return np.concatenate([getattr(s, name) for _, s in parts])[take]

    seq = np.empty(n, np.float64)
    seq[order] = np.concatenate([s.seq_logprobs for _, s in parts])
    prefix = None
    if hidden_size:  # per sequence, like seq_logprobs
        prefix = np.empty((n, hidden_size), np.float32)
        prefix[order] = np.concatenate([s.prefix_hidden_sum for _, s in parts])
    return BatchScores(
        counts=counts,
        target_logprobs=cat("target_logprobs"),
        topk_ids=cat("topk_ids"),
        topk_logprobs=cat("topk_logprobs"),
        seq_logprobs=seq,
        hidden=cat("hidden") if hidden_size else None,
        prefix_hidden_sum=prefix,
        tail_ids=cat("tail_ids") if tail_draws else None,
        tail_logprobs=cat("tail_logprobs") if tail_draws else None,
    )


# --------------------------------------------------------------------------- loading, once per process

_LOADED: dict[tuple, ReferenceModel] = {}
_LOAD_LOCK = threading.Lock()


def resolve_device(device: str) -> str:
    """'auto' → 'cuda' when a GPU is visible, else 'cpu'; anything else as given."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def load_reference(
    name_or_path: str,
    revision: str | None = None,
    dtype: str = "float32",
    trust_remote_code: bool = False,
    device: str = "auto",
) -> ReferenceModel:
    """The reference model, loaded once per process and shared by every shard task in it
    (threads of one process must not each hold a copy of a 7B model)."""
    from alignheads.loading import load_causal_lm

    key = (name_or_path, revision, dtype, trust_remote_code, resolve_device(device))
    with _LOAD_LOCK:
        if key not in _LOADED:
            model = load_causal_lm(name_or_path, revision, dtype, trust_remote_code)
            model.requires_grad_(False)
            _LOADED[key] = ReferenceModel(model, key[-1])
        return _LOADED[key]
