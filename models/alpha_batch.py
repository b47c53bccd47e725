"""Several α in one batched call: every row of the batch carries its own α.

:class:`~alignheads.models.aligned.AlignedLM` holds one float α for the whole batch, so an
α-sweep of A values costs A decoding calls. Replicating each prompt once per α and giving every
row its own α decodes them all in one ``generate()`` call instead (the backbone runs once over an
A× larger batch, which a GPU processes in about the time of one).

:class:`RowAlphaLMHead` stands in for the LM's output layer like ``SteeredLMHead`` but with a
vector of α: ``z_b = base_logits_b + α_b · delta_b``; the head itself is unchanged (its
``forward`` gives both terms). Token context (CALM) is tracked with the same
:class:`~alignheads.models.context_hooks.ContextTracker` as ``AlignedLM``'s, so KV-cached decoding sees
what training saw.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from alignheads.models.context import TokenContext
from alignheads.models.context_hooks import ContextTracker
from alignheads.models.head_base import LogitHead

__all__ = ["RowAlphaLMHead", "alpha_sweep_generate", "row_alphas"]


class RowAlphaLMHead(nn.Module):
    """Output layer with one α per batch row: hidden ``(B, T, H)`` → ``z(α_b)`` ``(B, T, V)``.

    alphas: ``(B,)``; the batch the model is called with must have exactly B rows (beam search
    and ``num_return_sequences > 1`` multiply the rows, and are refused).
    """

    def __init__(
        self,
        head: LogitHead,
        frozen_head: nn.Module,
        context_source: Callable[[int], TokenContext] | None,
        alphas: Tensor,
    ) -> None:
        super().__init__()
        if alphas.dim() != 1:
            raise ValueError(f"alphas must be a vector (one α per row), got shape {tuple(alphas.shape)}")
        self.head = head
        self.frozen_head = frozen_head
        self.alphas = alphas
        self._context_source = context_source

    def forward(self, hidden: Tensor) -> Tensor:
        rows = hidden.shape[0]
        if rows != self.alphas.shape[0]:
            raise ValueError(
                f"the model was called with {rows} rows but {self.alphas.shape[0]} per-row alphas were given "
                "(beam search and num_return_sequences > 1 multiply the rows: replicate the prompts instead)"
            )
        context = self._context_source(hidden.shape[1]) if self._context_source is not None else None
        out = self.head(hidden, frozen_head=self.frozen_head, context=context)
        base = out.base_logits
        alpha = self.alphas.to(device=base.device, dtype=base.dtype).view(rows, 1, 1)
        return base + alpha * out.delta


@contextmanager
def row_alphas(model: nn.Module, head: LogitHead, alphas: Tensor) -> Iterator[nn.Module]:
    """Inside the block, ``model``'s output layer gives row b the logits ``z(alphas[b])`` of ``head``.

    ``model`` is a plain causal LM (no ``AlignedLM`` installed); its own output layer is put
    back, and the context hooks removed, when the block ends.
    """
    original = model.get_output_embeddings()
    if hasattr(original, "frozen_head"):
        raise ValueError("this model already carries a head; remove it (AlignedLM.remove()) first")
    tracker = ContextTracker(model) if head.needs_token_context else None
    layer = RowAlphaLMHead(head, original, tracker.take if tracker is not None else None, alphas)
    model.set_output_embeddings(layer)
    try:
        yield model
    finally:
        model.set_output_embeddings(original)
        if tracker is not None:
            tracker.remove()


def alpha_sweep_generate(
    model: nn.Module,
    head: LogitHead,
    input_ids: Tensor,
    attention_mask: Tensor,
    alphas: Sequence[float],
    **generate_kwargs: Any,
) -> Tensor:
    """Decode the prompts ``input_ids (B, P)`` (left-padded, ``attention_mask (B, P)``) once per α,
    all in one ``model.generate()`` call; returns ids ``(A, B, P + N)``, ``[i]`` for ``alphas[i]``.

    ``generate_kwargs`` go to ``generate()`` (greedy or sampling; ``max_new_tokens`` etc.); it must
    return plain sequences. With sampling, each row draws from the one global RNG stream, so rows
    do not reproduce separate per-α calls draw for draw; greedy decoding does (up to float noise).
    """
    n_alpha, rows = len(alphas), input_ids.shape[0]
    per_row = torch.tensor([float(a) for a in alphas]).repeat_interleave(rows)
    with row_alphas(model, head, per_row):
        out = model.generate(
            input_ids=input_ids.repeat(n_alpha, 1),
            attention_mask=attention_mask.repeat(n_alpha, 1),
            **generate_kwargs,
        )
    return out.view(n_alpha, rows, -1)
