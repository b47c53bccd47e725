"""Decoding from several causal LMs at once: each step's next-token logits are a combination of theirs.

GenARM (base LM guided by an autoregressive reward LM, or by K of them: multi-objective GenARM)
and DeRa (decoding-time realignment of a DPO model against its reference) differ only in how
they combine the models' logits, so the loop lives here once (:func:`multi_guided_decode`) and
takes the combination rule as a function ``combine(base_logits (B, V), [other_logits (B, V)] * K)
-> (B, V)``. :func:`guided_decode` is its two-model case (K = 1), with the rule
``combine(base_logits (B, V), other_logits (B, V)) -> (B, V)``.

Each model keeps its own KV cache (`models.kv_cache.prefix_cache`, with room for every new token
reserved up front): the prompt is prefilled once, then every step feeds each model only the new
token (K + 1 forwards per token). Positions follow the left padding as in
transformers' `generate()` (``cumsum(mask) − 1``), so a left-padded batch decodes like each
prompt alone.

Token selection follows transformers' sampling loop exactly (float32 scores, temperature then
top-p warpers, softmax, one ``torch.multinomial`` draw per row per step, finished rows padded):
with the same seed and a rule that returns the base logits, this samples what
``base.generate()`` samples, so the sweep's common random numbers carry over to these methods.
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

__all__ = ["CombineRule", "GuidedOutput", "MultiCombineRule", "guided_decode", "multi_guided_decode"]

CombineRule = Callable[[Tensor, Tensor], Tensor]
MultiCombineRule = Callable[[Tensor, list[Tensor]], Tensor]


@dataclass(frozen=True)
class GuidedOutput:
    """sequences: ``(B, P + N)`` prompt then generated ids (finished rows padded);
    kl_to_base: ``(B, N)`` float32 ``KL(π_combined ‖ π_base)`` of each step's next-token
    distributions before temperature / top-p (steps after a row finished included: mask them)."""

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


def guided_decode(
    base: nn.Module,
    other: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    combine: CombineRule,
    **decoding: Any,
) -> GuidedOutput:
    """Decode ``input_ids (B, P)`` (left-padded, ``attention_mask (B, P)``) from
    ``combine(base logits (B, V), other logits (B, V))`` at each step: :func:`multi_guided_decode`
    with one other model. ``decoding``: its options (max_new_tokens, do_sample, temperature, top_p,
    eos_token_id, pad_token_id, generator, logits_processor)."""
    return multi_guided_decode(
        base,
        [other],
        input_ids,
        attention_mask,
        lambda z_base, others: combine(z_base, others[0]),
        **decoding,
    )


@torch.inference_mode()
def multi_guided_decode(
    base: nn.Module,
    others: Sequence[nn.Module],
    input_ids: Tensor,
    attention_mask: Tensor,
    combine: MultiCombineRule,
    *,
    max_new_tokens: int,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int | None = None,
    generator: torch.Generator | None = None,
    logits_processor: Sequence[Callable[[Tensor, Tensor], Tensor]] = (),
) -> GuidedOutput:
    """Decode ``input_ids (B, P)`` (left-padded, ``attention_mask (B, P)``) for at most
    ``max_new_tokens`` steps, each from ``combine(base logits (B, V), [logits (B, V) of each of
    others])``, every model continuing its own KV cache.

    Stops early once every row has produced an EOS (any of ``eos_token_id``); later tokens of a
    finished row are ``pad_token_id``. ``generator``: the RNG of the multinomial draws (None: the
    global one, as transformers uses). ``logits_processor``: called as ``p(sequences (B, T),
    scores (B, V)) -> (B, V)`` after the warpers, as in `generate()` (a
    `models.row_sampling.RowSeededSampler` with ``do_sample=False`` samples with one seed per row).
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
    warpers = [*(sampling_warpers(temperature, top_p) if do_sample else []), *logits_processor]
    eos_ids = torch.tensor(eos, dtype=torch.long, device=input_ids.device)
    mask = attention_mask.long()
    positions = _positions(mask)
    # each model's cache has room for the new tokens up front: no re-concatenation per step
    base_logits, base_cache = _step(base, input_ids, mask, positions, prefix_cache(base, max_new_tokens))
    steps = [_step(model, input_ids, mask, positions, prefix_cache(model, max_new_tokens)) for model in others]
    sequences = input_ids
    unfinished = torch.ones(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    kls: list[Tensor] = []
    for step in range(max_new_tokens):
        scores = combine(base_logits, [logits for logits, _ in steps]).float()
        kls.append(exact_kl(scores, base_logits).cpu())
        for warp in warpers:
            scores = warp(sequences, scores)
        if do_sample:
            probs = torch.softmax(scores, dim=-1)
            tokens = torch.multinomial(probs, num_samples=1, generator=generator).squeeze(1)
        else:
            tokens = scores.argmax(dim=-1)
        if eos:
            tokens = torch.where(unfinished, tokens, torch.full_like(tokens, pad_token_id))
            unfinished = unfinished & ~torch.isin(tokens, eos_ids)
        sequences = torch.cat([sequences, tokens[:, None]], dim=-1)
        if not unfinished.any() or step + 1 == max_new_tokens:
            break
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=-1)
        positions = positions[:, -1:] + 1
        base_logits, base_cache = _step(base, tokens[:, None], mask, positions, base_cache)
        steps = [
            _step(model, tokens[:, None], mask, positions, cache)
            for model, (_, cache) in zip(others, steps, strict=True)
        ]
    return GuidedOutput(sequences=sequences, kl_to_base=torch.stack(kls, dim=1))
