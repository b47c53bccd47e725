"""GenARM-style guided decoding: a base LM steered by an autoregressive reward LM.

The reward LM ``π_r`` is a copy of the base LM fine-tuned on preference pairs with the
reference-free loss ``−log σ(β(log π_r(y_w) − log π_r(y_l)))`` (response tokens only;
`alignheads.models.objectives.reward_lm_loss`). Its per-token log-probs are a
token-level reward, and decoding samples from ``π_α ∝ π_base · π_r^α``: α = 0 is the base,
larger α leans harder on the reward LM.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
from torch import Tensor, nn

from alignheads.models.guided import guided_decode

__all__ = ["genarm_generate", "genarm_logits"]


def genarm_logits(base_logits: Tensor, reward_logits: Tensor, alpha: float | Tensor) -> Tensor:
    """Logits of ``π_α ∝ π_base · π_r^α``: ``log_softmax(z_base) + α · log_softmax(z_r)``.

    base_logits, reward_logits: ``(..., V)`` (any float dtype); `alpha`: a float, or a tensor
    broadcasting against ``(..., 1)`` (one α per row: ``(B, 1)`` for ``(B, V)`` logits). Returns
    ``(..., V)`` float32 (or float64 for float64 inputs), unnormalised (softmax of it is ``π_α``).
    Where α = 0 it is ``log_softmax(z_base)`` exactly, even where ``z_r`` is −inf (``0 · −inf``
    would be NaN).
    """
    dtype = torch.float64 if base_logits.dtype == torch.float64 else torch.float32
    base = torch.log_softmax(base_logits.to(dtype), dim=-1)
    if not isinstance(alpha, Tensor) and alpha == 0:  # exact: π_r^0 = 1 also where π_r = 0
        return base
    reward = torch.log_softmax(reward_logits.to(dtype), dim=-1)
    if not isinstance(alpha, Tensor):
        return base + alpha * reward
    alpha = alpha.to(device=base.device, dtype=dtype)
    return torch.where(alpha == 0, base, base + alpha * reward)


def genarm_generate(
    base: nn.Module,
    reward_lm: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    *,
    alpha: float,
    **decoding: Any,
) -> Tensor:
    """Sample (or greedily decode) from ``π_base · π_r^α`` with both models' KV caches.

    input_ids, attention_mask: ``(B, P)`` left-padded prompts. ``decoding``: the options of
    :func:`alignheads.models.guided.guided_decode` (max_new_tokens, do_sample, temperature, top_p,
    eos_token_id, pad_token_id, generator). Returns ``(B, P + N)`` ids, ``N ≤ max_new_tokens``
    (rows that finished early are padded with ``pad_token_id``).
    """
    combine = partial(genarm_logits, alpha=alpha)
    return guided_decode(base, reward_lm, input_ids, attention_mask, combine, **decoding).sequences
