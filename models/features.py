"""The hidden states (and CALM's token context) that predict a batch's response tokens.

Two sources: the frozen backbone run on the full sequences (`backbone_features`) or the
reference pass's cached hidden states (`cached_features`). Both return the compact layout of
:class:`PairBatch`: ``(2B, R, H)`` float32. They give the same tensors (up to the kernels'
rounding of differently padded batches) when the cache holds its states in float32
(`refpass.hidden_dtype: float32`, the default): those are the very states the cache's
reference log-probs and top-k were computed from, so a fresh head starts exactly at the
reference either way. A `hidden_dtype: float16` cache holds those states rounded to float16;
its reference values are still the full-precision model's, so cached features then sit up to
a float16 rounding off the backbone's (a fresh head starts ~1e-4 off ``ln 2``).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from alignheads.models.context import TokenContext, token_context
from alignheads.models.objectives import PairBatch


def gather_time(values: Tensor, index: Tensor) -> Tensor:
    """``values (N, T, ...)`` at time indices ``index (N, R)`` → ``(N, R, ...)``."""
    shape = index.shape + values.shape[2:]
    flat = index.reshape(index.shape[0], index.shape[1], *([1] * (values.dim() - 2))).expand(shape)
    return values.gather(1, flat)


@torch.no_grad()
def backbone_features(
    backbone: nn.Module, batch: PairBatch, with_context: bool
) -> tuple[Tensor, TokenContext | None]:
    """Run the frozen backbone once over all 2B sequences; keep the predicting positions.

    Returns hidden ``(2B, R, H)`` float32 and, when ``with_context``, the token context of
    the full sequences at those positions (true positions, causal prefix means).
    """
    if batch.input_ids is None or batch.gather_index is None:
        raise ValueError("features: backbone needs input_ids and gather_index in the batch")
    out = backbone(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
    hidden = out.last_hidden_state.float()
    picked = gather_time(hidden, batch.gather_index)
    if not with_context:
        return picked, None
    ctx = token_context(hidden, batch.attention_mask)
    return picked, TokenContext(
        gather_time(ctx.positions, batch.gather_index), gather_time(ctx.context, batch.gather_index)
    )


def cached_features(batch: PairBatch, with_context: bool) -> tuple[Tensor, TokenContext | None]:
    """The cached hidden states ``(2B, R, H)`` as float32 (exactly the stored values) and, when
    ``with_context``, CALM's token context rebuilt from them:
    ``(prefix_sum + Σ_{u≤j} h_u) / (prefix_count + j + 1)``."""
    if batch.hidden is None:
        raise ValueError(
            "features: cached needs hidden states in the reference cache (set refpass.store_hidden: true)"
        )
    hidden = batch.hidden.float()
    if not with_context:
        return hidden, None
    if batch.positions is None or batch.prefix_sum is None or batch.prefix_count is None:
        raise ValueError("features: cached for CALM needs positions and prefix sums from the cache")
    mask = batch.mask.float()
    sums = batch.prefix_sum.float().unsqueeze(1) + (hidden * mask.unsqueeze(-1)).cumsum(dim=1)
    counts = batch.prefix_count.float().unsqueeze(1) + mask.cumsum(dim=1)
    return hidden, TokenContext(batch.positions.long(), sums / counts.clamp(min=1).unsqueeze(-1))
