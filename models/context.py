"""Causal token context: true positions and running means of the non-padding prefix.

For every token the CALM head needs

* its *true position*: the number of non-padding tokens before it (left padding does
  not shift it), and
* its *context vector*: the mean of the hidden states of the non-padding tokens up to
  and including it (causal: no future tokens, no padding).

:func:`token_context` computes both for whole sequences (training, full forward passes).
:func:`continue_context` does the same for a chunk of new tokens given the
:class:`RunningContext` left by the previous chunk, so that KV-cached decoding sees exactly
what a full forward pass over the same tokens sees. :func:`step_context` is its special case
for one new token (each step of cached decoding), with a handful of small ops instead of the
cumulative sums: at the tiny model's size every op of a step is a measurable share of it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["RunningContext", "TokenContext", "continue_context", "step_context", "token_context"]


@dataclass(frozen=True)
class TokenContext:
    """Per-token inputs of CALM's position embedding and gate.

    positions: ``(B, T)`` int64 true positions (0 for left padding);
    context: ``(B, T, H)`` float32 causal means of the non-padding hidden states
    (zeros where no real token has been seen yet).
    """

    positions: Tensor
    context: Tensor

    @property
    def length(self) -> int:
        return self.positions.shape[1]

    def select(self, index: slice | Tensor) -> TokenContext:
        """The same context for a subset of the time positions (dim 1)."""
        return TokenContext(self.positions[:, index], self.context[:, index])


@dataclass(frozen=True)
class RunningContext:
    """State carried across decoding steps, one row per sequence.

    hidden_sum: ``(B, H)`` float32 sum of the non-padding hidden states seen so far;
    count: ``(B,)`` float32 number of non-padding tokens seen so far;
    seen: total number of token positions seen (padding included), for consistency checks.
    """

    hidden_sum: Tensor
    count: Tensor
    seen: int

    @property
    def batch_size(self) -> int:
        return self.count.shape[0]

    def select_rows(self, index: Tensor) -> RunningContext:
        """Rows picked by ``index`` (beam-search reordering, batch selection)."""
        index = index.to(self.count.device).long()
        return RunningContext(
            self.hidden_sum.index_select(0, index), self.count.index_select(0, index), self.seen
        )

    def repeat_rows(self, repeats: int) -> RunningContext:
        """Each row repeated ``repeats`` times in place (``repeat_interleave``)."""
        return RunningContext(
            self.hidden_sum.repeat_interleave(repeats, dim=0),
            self.count.repeat_interleave(repeats, dim=0),
            self.seen,
        )


def continue_context(
    hidden: Tensor, attention_mask: Tensor | None, state: RunningContext | None
) -> tuple[TokenContext, RunningContext]:
    """Context of a chunk of tokens following ``state`` (``None``: the chunk starts the sequence).

    hidden: ``(B, T, H)`` last hidden states of the chunk; attention_mask: ``(B, T)`` the
    chunk's own columns of the padding mask (1 = real token), ``None`` = all real.
    Returns the chunk's :class:`TokenContext` and the state after it (detached).

    With ``m`` the mask, ``S_t = Σ_{u≤t} m_u h_u`` and ``N_t = Σ_{u≤t} m_u`` (both
    continuing from ``state``), position ``= max(N_t − 1, 0)`` and context
    ``= S_t / max(N_t, 1)``.
    """
    batch, length, width = hidden.shape
    h = hidden.float()
    mask = (
        torch.ones(batch, length, device=h.device)
        if attention_mask is None
        else attention_mask.to(h.device).float()
    )
    if state is None:
        prev_sum = torch.zeros(batch, width, device=h.device)
        prev_count = torch.zeros(batch, device=h.device)
        prev_seen = 0
    else:
        if state.batch_size != batch:
            raise ValueError(f"running context has {state.batch_size} rows but the new chunk has {batch}")
        prev_sum, prev_count, prev_seen = state.hidden_sum.to(h.device), state.count.to(h.device), state.seen
    sums = (h * mask.unsqueeze(-1)).cumsum(dim=1) + prev_sum.unsqueeze(1)
    counts = mask.cumsum(dim=1) + prev_count.unsqueeze(1)
    context = sums / counts.clamp(min=1).unsqueeze(-1)
    positions = (counts - 1).clamp(min=0).round().long()
    new_state = RunningContext(sums[:, -1].detach(), counts[:, -1].detach(), prev_seen + length)
    return TokenContext(positions, context), new_state


def step_context(
    hidden: Tensor, attention_mask: Tensor | None, state: RunningContext
) -> tuple[TokenContext, RunningContext]:
    """:func:`continue_context` for one new token following ``state`` (a decoding step), equal to it
    bit for bit for a 0/1 mask.

    hidden: ``(B, 1, H)``; attention_mask: ``(B, 1)`` the token's mask column, ``None`` = real.
    Returns the token's :class:`TokenContext` (positions ``(B, 1)``, context ``(B, 1, H)``) and the
    state after it (detached).

    The same float ops on the same values as the general path (a cumulative sum over one token is
    that token; ``m · h`` is exact for ``m`` in {0, 1}, so ``S + m · h`` in one ``addcmul`` rounds
    alike), without its allocations; the position ``max(N − 1, 0)`` is read off the denominator
    ``max(N, 1)`` as ``max(N, 1) − 1`` (the counts are whole numbers: no rounding needed).
    """
    batch, length, _width = hidden.shape
    if length != 1:
        raise ValueError(f"step_context takes one new token, got {length}")
    if state.batch_size != batch:
        raise ValueError(f"running context has {state.batch_size} rows but the new chunk has {batch}")
    h = hidden[:, 0].float()
    prev_sum, prev_count = state.hidden_sum.to(h.device), state.count.to(h.device)
    if attention_mask is None:
        hidden_sum, count = prev_sum + h, prev_count + 1
    else:
        mask = attention_mask.to(device=h.device, dtype=h.dtype)  # once: mixed-dtype ops cost more
        hidden_sum, count = torch.addcmul(prev_sum, h, mask), prev_count + mask.view(-1)
    denominator = count.clamp(min=1).unsqueeze(-1)  # (B, 1)
    context = (hidden_sum / denominator).unsqueeze(1)
    positions = (denominator - 1).long()
    new_state = RunningContext(_detached(hidden_sum), _detached(count), state.seen + 1)
    return TokenContext(positions, context), new_state


def _detached(tensor: Tensor) -> Tensor:
    """``tensor`` cut from the autograd graph; as is when no graph holds it (decoding: no op)."""
    return tensor.detach() if tensor.requires_grad else tensor


def token_context(hidden: Tensor, attention_mask: Tensor | None = None) -> TokenContext:
    """Context of whole sequences: ``hidden (B, T, H)``, ``attention_mask (B, T)`` or ``None``."""
    return continue_context(hidden, attention_mask, None)[0]
