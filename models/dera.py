"""DeRa (decoding-time realignment) of a DPO-fine-tuned LM against its reference.

The whole base LM is fine-tuned with DPO (reference = the base, from the reference cache);
its α dial mixes the two models' logits per token: ``(1 − α) · z_ref + α · z_dpo``. α = 0 is
the reference, α = 1 the DPO model, α > 1 extrapolates past it (as DPO at a smaller β would).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import torch
from torch import Tensor, nn

from alignheads.models.guided import guided_decode

__all__ = ["dera_generate", "dera_logits"]


def dera_logits(ref_logits: Tensor, dpo_logits: Tensor, alpha: float) -> Tensor:
    """``(1 − α) · z_ref + α · z_dpo``. ref_logits, dpo_logits: ``(..., V)``; returns ``(..., V)``
    float32 (float64 for float64 inputs). At α = 0 it is ``z_ref`` exactly, at α = 1 ``z_dpo``."""
    dtype = torch.float64 if ref_logits.dtype == torch.float64 else torch.float32
    ref, dpo = ref_logits.to(dtype), dpo_logits.to(dtype)
    if alpha == 0:  # exact, even where z_dpo is -inf (0 · -inf would be NaN)
        return ref
    if alpha == 1:
        return dpo
    return (1.0 - alpha) * ref + alpha * dpo


def dera_generate(
    reference: nn.Module,
    dpo_model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    *,
    alpha: float,
    max_new_tokens: int,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Decode from ``(1 − α) z_ref + α z_dpo`` with both models' KV caches.

    input_ids, attention_mask: ``(B, P)`` left-padded prompts. Returns ``(B, P + N)`` ids.
    """
    return guided_decode(
        reference,
        dpo_model,
        input_ids,
        attention_mask,
        partial(dera_logits, alpha=alpha),
        max_new_tokens=max_new_tokens,
        do_sample=do_sample,
        temperature=temperature,
        top_p=top_p,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
        generator=generator,
    ).sequences
