"""GenARM-style guided decoding: a base LM steered by an autoregressive reward LM.

The reward LM ``π_r`` is a copy of the base LM fine-tuned on preference pairs with the
reference-free loss ``−log σ(β(log π_r(y_w) − log π_r(y_l)))`` (response tokens only;
`alignheads.models.objectives.reward_lm_loss`). Its per-token log-probs are a
token-level reward, and decoding samples from ``π_α ∝ π_base · π_r^α``: α = 0 is the base,
larger α leans harder on the reward LM.

Multi-objective GenARM: K reward LMs (one per objective), one α each, decoding from
``π_α ∝ π_base · Π_i π_r_i^α_i`` (K + 1 forwards per token); the one-reward rule is its K = 1 case.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from alignheads.models.guided import guided_decode, multi_guided_decode

__all__ = ["genarm_generate", "genarm_logits", "multi_genarm_generate", "multi_genarm_logits"]


def genarm_logits(base_logits: Tensor, reward_logits: Tensor | None, alpha: float | Tensor) -> Tensor:
    """Logits of ``π_α ∝ π_base · π_r^α``: ``log_softmax(z_base) + α · log_softmax(z_r)``.

    base_logits, reward_logits: ``(..., V)`` (any float dtype); `alpha`: a float, or a tensor
    broadcasting against ``(..., 1)`` (one α per row: ``(B, 1)`` for ``(B, V)`` logits). Returns
    ``(..., V)`` float32 (or float64 for float64 inputs), unnormalised (softmax of it is ``π_α``).
    Where α = 0 it is ``log_softmax(z_base)`` exactly, even where ``z_r`` is −inf (``0 · −inf``
    would be NaN); ``reward_logits`` may then be None (the reward LM was not run). The K = 1 case
    of :func:`multi_genarm_logits`.
    """
    # a tensor α's last (size-1) axis is the one reward LM's
    return multi_genarm_logits(base_logits, [reward_logits], alpha if isinstance(alpha, Tensor) else [alpha])


def multi_genarm_logits(
    base_logits: Tensor, reward_logits: Sequence[Tensor | None], alphas: Sequence[float] | Tensor
) -> Tensor:
    """Logits of ``π_α ∝ π_base · Π_i π_r_i^α_i``: ``log_softmax(z_base) + Σ_i α_i · log_softmax(z_r_i)``.

    base_logits: ``(B, V)`` (or any ``(..., V)``; any float dtype); reward_logits: K tensors of that
    shape; alphas: K numbers or a tensor ``(K,)`` (one α per reward LM), or ``(B, K)`` (per row;
    generally ``(..., K)`` broadcasting against the logits' leading dimensions). Returns ``(B, V)``
    float32 (float64 for float64 inputs), unnormalised. A term whose α is 0 adds exactly nothing,
    even where its ``z_r`` is −inf (``0 · −inf`` would be NaN): all α = 0 is ``log_softmax(z_base)``.
    A reward LM whose α is 0 everywhere is not read: its logits may be None (it was not run).
    """
    dtype = torch.float64 if base_logits.dtype == torch.float64 else torch.float32
    out = torch.log_softmax(base_logits.to(dtype), dim=-1)
    if isinstance(alphas, Tensor) and alphas.dim() == 0:
        alphas = alphas.reshape(1)
    if len(reward_logits) != (alphas.shape[-1] if isinstance(alphas, Tensor) else len(alphas)):
        raise ValueError(f"{len(reward_logits)} reward LMs' logits but alphas of shape {_shape(alphas)}")
    for i, logits in enumerate(reward_logits):
        if logits is None:
            if bool((alphas[..., i] if isinstance(alphas, Tensor) else torch.tensor(alphas[i])).ne(0).any()):
                raise ValueError(f"reward LM {i} was not run, but its α is not 0 everywhere")
            continue
        if not isinstance(alphas, Tensor):
            if alphas[i] != 0:  # exact: π_r^0 = 1 also where π_r = 0
                out = out + alphas[i] * torch.log_softmax(logits.to(dtype), dim=-1)
            continue
        alpha = alphas[..., i, None].to(device=out.device, dtype=dtype)
        term = alpha * torch.log_softmax(logits.to(dtype), dim=-1)
        out = torch.where(alpha == 0, out, out + term)
    return out


def _shape(alphas: Sequence[float] | Tensor) -> tuple[int, ...]:
    return tuple(alphas.shape) if isinstance(alphas, Tensor) else (len(alphas),)


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
    return guided_decode(base, reward_lm, input_ids, attention_mask, genarm_logits, alpha, **decoding).sequences


def multi_genarm_generate(
    base: nn.Module,
    reward_lms: Sequence[nn.Module],
    input_ids: Tensor,
    attention_mask: Tensor,
    *,
    alphas: Sequence[float] | Tensor,
    **decoding: Any,
) -> Tensor:
    """Sample (or greedily decode) from ``π_base · Π_i π_r_i^α_i`` with every model's KV cache
    (K + 1 forwards per token).

    reward_lms: the K reward LMs; alphas: K numbers, ``(K,)`` or ``(B, K)`` (one row per prompt).
    input_ids, attention_mask: ``(B, P)`` left-padded prompts. ``decoding``: the options of
    :func:`alignheads.models.guided.multi_guided_decode`. Returns ``(B, P + N)`` ids,
    ``N ≤ max_new_tokens``.
    """
    return multi_guided_decode(
        base, reward_lms, input_ids, attention_mask, multi_genarm_logits, alphas, **decoding
    ).sequences
