"""DeRa (decoding-time realignment) of a DPO-fine-tuned LM against its reference.

The whole base LM is fine-tuned with DPO (reference = the base, from the reference cache);
its α dial mixes the two models' logits per token: ``(1 − α) · z_ref + α · z_dpo``. α = 0 is
the reference, α = 1 the DPO model, α > 1 extrapolates past it (as DPO at a smaller β would).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from alignheads.models.guided import guided_decode

__all__ = ["dera_generate", "dera_logits"]


def dera_logits(ref_logits: Tensor, dpo_logits: Tensor | None, alpha: float | Tensor) -> Tensor:
    """``(1 − α) · z_ref + α · z_dpo``. ref_logits, dpo_logits: ``(..., V)``; `alpha`: a float or
    a tensor broadcasting against ``(..., 1)`` (one α per row). Returns ``(..., V)`` float32
    (float64 for float64 inputs). Where α = 0 it is ``z_ref`` exactly, where α = 1 ``z_dpo``.
    ``dpo_logits`` may be None where α is 0 everywhere (the DPO model was not run)."""
    dtype = torch.float64 if ref_logits.dtype == torch.float64 else torch.float32
    if dpo_logits is None:
        if bool(torch.as_tensor(alpha).ne(0).any()):
            raise ValueError("the DPO model was not run, but α is not 0 everywhere")
        return ref_logits.to(dtype)
    ref, dpo = ref_logits.to(dtype), dpo_logits.to(dtype)
    if isinstance(alpha, Tensor):
        alpha = alpha.to(device=ref.device, dtype=dtype)
        mixed = torch.where(alpha == 1, dpo, (1.0 - alpha) * ref + alpha * dpo)
        return torch.where(alpha == 0, ref, mixed)  # exact, even where z_dpo is -inf
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
    **decoding: Any,
) -> Tensor:
    """Decode from ``(1 − α) z_ref + α z_dpo`` with both models' KV caches.

    input_ids, attention_mask: ``(B, P)`` left-padded prompts. ``decoding``: the options of
    :func:`alignheads.models.guided.guided_decode`. Returns ``(B, P + N)`` ids.
    """
    return guided_decode(reference, dpo_model, input_ids, attention_mask, dera_logits, alpha, **decoding).sequences
