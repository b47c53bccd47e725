"""Decoding from several causal LMs at once: each step's next-token logits are a combination of theirs.

GenARM (base LM guided by an autoregressive reward LM, or by K of them: multi-objective GenARM)
and DeRa (decoding-time realignment of a DPO model against its reference) differ only in how
they combine the models' logits, so the loop lives here once (:func:`multi_guided_decode`) and
takes the combination rule as a function ``combine(base_logits (B, V), [other_logits (B, V) or
None] * K, alphas (B, K)) -> (B, V)``, with one α per row for each other LM.
:func:`guided_decode` is its two-model case (K = 1), with the rule ``combine(base_logits (B, V),
other_logits (B, V) or None, alpha (B, 1)) -> (B, V)``.

Each model keeps its own KV cache (`models.kv_cache.prefix_cache`, with room for every new token
reserved up front): the prompt is prefilled once, then every step feeds each model only the new
token (K + 1 forwards per token). Positions follow the left padding as in
transformers' `generate()` (``cumsum(mask) − 1``), so a left-padded batch decodes like each
prompt alone.

Token selection follows transformers' sampling loop exactly (float32 scores, temperature then
top-p warpers, softmax, one ``torch.multinomial`` draw per row per step, finished rows padded):
with the same seed and a rule that returns the base logits, this samples what
``base.generate()`` samples, so the sweep's common random numbers carry over to these methods.

Two kinds of work are left out, and neither changes a bit of what is decoded:

- **An LM no row weighs.** The rules read nothing from an LM whose α is 0 (``π_r^0 = 1`` for
  GenARM, ``z_ref`` alone for DeRa at α = 0), so an LM whose α is 0 on every row of the batch is
  not run at all, and the rule gets ``None`` for its logits. The α = 0 batches of a GenARM or
  DeRa sweep then cost one forward per token, and a dial vector that leaves some dials at 0 runs
  only the other dials' reward LMs.
- **Rows that have finished.** A batch runs until its longest row ends, and most rows end well
  before that. Once a quarter of the rows still in the batch have produced an EOS, those rows
  leave it: the KV caches, the mask, the positions, the α and the per-row sampler state are cut
  to the rows that go on. The batch never shrinks below ``min_rows`` rows (16; finished rows stay
  as filler). On the CPU, matrix products of fewer rows use other kernels, whose rounding differs,
  whereas from 16 rows up each row's values are the same bits as in the whole batch (a test decodes
  both ways and compares). Rows leave only when no row's draw depends on the others': greedy
  decoding, which includes the per-row seeded sampling of `models.row_sampling`. With
  ``do_sample`` every row draws from one shared generator, as in transformers, and every row stays
  to the end.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from alignheads.models.kv_cache import prefix_cache
from alignheads.models.losses import exact_kl
from alignheads.models.row_sampling import warpers as sampling_warpers

__all__ = [
    "MIN_ROWS",
    "CombineRule",
    "GuidedOutput",
    "MultiCombineRule",
    "guided_decode",
    "multi_guided_decode",
    "row_alphas",
]

# (base logits (B, V), other logits (B, V) or None where no row weighs it, alpha (B, 1)) -> (B, V)
CombineRule = Callable[[Tensor, Tensor | None, Tensor], Tensor]
# (base logits (B, V), K × (other logits (B, V) or None), alphas (B, K)) -> (B, V)
MultiCombineRule = Callable[[Tensor, list[Tensor | None], Tensor], Tensor]

MIN_ROWS = 16  # the fewest rows a batch is cut down to (module docstring: the CPU's kernels)
_LEAVE_SHARE = 4  # finished rows leave once they are a quarter of the batch: each cut copies the caches


@dataclass(frozen=True)
class GuidedOutput:
    """sequences: ``(B, P + N)`` prompt then generated ids (finished rows padded);
    kl_to_base: ``(B, N)`` float32 ``KL(π_combined ‖ π_base)`` of each step's next-token
    distributions before temperature / top-p (after a row's end: the rounding noise of the steps
    it stayed as filler, or 0 once it left the batch; mask them)."""

    sequences: Tensor
    kl_to_base: Tensor


def _positions(mask: Tensor) -> Tensor:
    """Position ids of a left-padded mask ``(B, T)``: 0 at each row's first real token."""
    return (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 1)


def _step(model: nn.Module, ids: Tensor, mask: Tensor, positions: Tensor, cache: Any) -> tuple[Tensor, Any]:
    """One forward of ``ids (B, t)`` continuing ``cache``; returns last-position logits ``(B, V)`` float32."""
    out = model(
        input_ids=ids,
        attention_mask=mask,
        position_ids=positions,
        past_key_values=cache,
        use_cache=True,
        logits_to_keep=1,
    )
    return out.logits[:, -1].float(), out.past_key_values


def row_alphas(alphas: Sequence[float] | Tensor, batch: int, k: int, device: torch.device) -> Tensor:
    """``(B, K)`` float32 α on `device` from K numbers (the same for every row), a ``(K,)`` tensor or a
    ``(B, K)`` one (one row per sequence)."""
    table = torch.as_tensor(alphas, dtype=torch.float32, device=device)
    if table.dim() == 1:
        table = table.expand(batch, -1) if table.shape[0] == k else table
    if table.dim() != 2 or table.shape != (batch, k):
        raise ValueError(
            f"alphas of shape {tuple(table.shape)} for {batch} rows and {k} other LMs: give K or (B, K)"
        )
    return table


def guided_decode(
    base: nn.Module,
    other: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    combine: CombineRule,
    alpha: float | Tensor,
    **decoding: Any,
) -> GuidedOutput:
    """Decode ``input_ids (B, P)`` (left-padded, ``attention_mask (B, P)``) from
    ``combine(base logits (B, V), other logits (B, V) or None, alpha (B, 1))`` at each step:
    :func:`multi_guided_decode` with one other model. `alpha`: one number, or ``(B,)`` / ``(B, 1)``
    (one per row). ``decoding``: its options (max_new_tokens, do_sample, temperature, top_p,
    eos_token_id, pad_token_id, generator, logits_processor, min_rows)."""
    batch = input_ids.shape[0]
    alphas = torch.as_tensor(alpha, dtype=torch.float32, device=input_ids.device).reshape(-1, 1)
    return multi_guided_decode(
        base,
        [other],
        input_ids,
        attention_mask,
        lambda z_base, others, a: combine(z_base, others[0], a),
        alphas.expand(batch, 1) if alphas.shape[0] == 1 else alphas,
        **decoding,
    )


def _leaving(unfinished: Tensor, min_rows: int) -> Tensor | None:
    """Which of the batch's rows go on (indices, ascending) once enough of them have finished, or
    None to keep them all. unfinished: ``(B,)`` bool. Finished rows fill the batch up to
    ``min_rows``."""
    rows = unfinished.shape[0]
    going_on = int(unfinished.sum())
    if rows <= min_rows or (rows - going_on) * _LEAVE_SHARE < rows:
        return None
    # the rows that go on first, then finished ones as filler; each group in batch order
    order = torch.argsort((~unfinished).to(torch.int8), stable=True)
    return order[: max(going_on, min_rows)].sort().values


@torch.inference_mode()
def multi_guided_decode(
    base: nn.Module,
    others: Sequence[nn.Module],
    input_ids: Tensor,
    attention_mask: Tensor,
    combine: MultiCombineRule,
    alphas: Sequence[float] | Tensor,
    *,
    max_new_tokens: int,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int | None = None,
    generator: torch.Generator | None = None,
    logits_processor: Sequence[Callable[[Tensor, Tensor], Tensor]] = (),
    min_rows: int = MIN_ROWS,
) -> GuidedOutput:
    """Decode ``input_ids (B, P)`` (left-padded, ``attention_mask (B, P)``) for at most
    ``max_new_tokens`` steps, each from ``combine(base logits (B', V), [logits (B', V) of each of
    others, None for those no row weighs], alphas (B', K))``, every model continuing its own KV
    cache; ``B'`` is the rows still in the batch (module docstring).

    `alphas`: K numbers (the same for every row) or ``(B, K)``, the rule's weight of each other LM.
    Stops early once every row has produced an EOS (any of ``eos_token_id``); later tokens of a
    finished row are ``pad_token_id``. ``generator``: the RNG of the multinomial draws (None: the
    global one, as transformers uses). ``logits_processor``: called as ``p(sequences (B', T),
    scores (B', V)) -> (B', V)`` after the warpers, as in `generate()` (a
    `models.row_sampling.RowSeededSampler` with ``do_sample=False`` samples with one seed per row);
    one that keeps per-row state must have ``select_rows(index)``, called when rows leave.
    ``min_rows``: the fewest rows the batch is cut down to; ``B`` or more keeps every row.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    eos = (
        []
        if eos_token_id is None
        else ([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id))
    )
    if eos and pad_token_id is None:
        raise ValueError("pad_token_id is needed to pad rows that finished (eos_token_id is set)")
    batch, prompt = input_ids.shape
    device = input_ids.device
    alphas = row_alphas(alphas, batch, len(others), device)
    weighed = [i for i in range(len(others)) if bool((alphas[:, i] != 0).any())]  # the LMs that run
    warpers = [*(sampling_warpers(temperature, top_p) if do_sample else []), *logits_processor]
    eos_ids = torch.tensor(eos, dtype=torch.long, device=device)
    mask = attention_mask.long()
    positions = _positions(mask)
    # each model's cache has room for the new tokens up front: no re-concatenation per step
    base_logits, base_cache = _step(base, input_ids, mask, positions, prefix_cache(base, max_new_tokens))
    steps = [
        _step(others[i], input_ids, mask, positions, prefix_cache(others[i], max_new_tokens)) for i in weighed
    ]
    fill = 0 if pad_token_id is None else pad_token_id
    sequences = torch.cat([input_ids, input_ids.new_full((batch, max_new_tokens), fill)], dim=-1)
    kl_to_base = torch.zeros(batch, max_new_tokens, device=device)
    rows = torch.arange(batch, device=device)  # the batch's rows still decoded, ascending
    unfinished = torch.ones(batch, dtype=torch.bool, device=device)  # of those rows
    row_alpha = alphas
    for step in range(max_new_tokens):
        logits: list[Tensor | None] = [None] * len(others)
        for i, (z, _) in zip(weighed, steps, strict=True):
            logits[i] = z
        scores = combine(base_logits, logits, row_alpha).float()
        kl_to_base[rows, step] = exact_kl(scores, base_logits)
        so_far = sequences[rows, : prompt + step]
        for warp in warpers:
            scores = warp(so_far, scores)
        if do_sample:
            probs = torch.softmax(scores, dim=-1)
            tokens = torch.multinomial(probs, num_samples=1, generator=generator).squeeze(1)
        else:
            tokens = scores.argmax(dim=-1)
        if eos:
            tokens = torch.where(unfinished, tokens, torch.full_like(tokens, pad_token_id))
            unfinished = unfinished & ~torch.isin(tokens, eos_ids)
        sequences[rows, prompt + step] = tokens
        if not unfinished.any() or step + 1 == max_new_tokens:
            return GuidedOutput(sequences[:, : prompt + step + 1], kl_to_base[:, : step + 1].cpu())
        keep = None if do_sample else _leaving(unfinished, min_rows)
        if keep is not None:
            rows, unfinished, row_alpha = rows[keep], unfinished[keep], row_alpha[keep]
            tokens, mask, positions = tokens[keep], mask[keep], positions[keep]
            for cache in (base_cache, *(cache for _, cache in steps)):
                cache.batch_select_indices(keep)
            for processor in logits_processor:
                if hasattr(processor, "select_rows"):
                    processor.select_rows(keep)
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=-1)
        positions = positions[:, -1:] + 1
        base_logits, base_cache = _step(base, tokens[:, None], mask, positions, base_cache)
        steps = [
            _step(others[i], tokens[:, None], mask, positions, cache)
            for i, (_, cache) in zip(weighed, steps, strict=True)
        ]
    raise AssertionError("unreachable: the loop returns at its last step")
