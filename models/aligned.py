"""The aligned LM: a Hugging Face causal LM whose output layer is a trained head with a dial α.

``AlignedLM(model, head)`` replaces ``model``'s output layer (``lm_head``) by a
:class:`SteeredLMHead` computing ``z(α)``; the model object stays a normal transformers
model, so its own ``generate()`` works unchanged (KV cache, greedy, sampling, beam search,
left-padded batches, streamers). α is any float: 0 gives the head's base logits (for a
fresh head, and always for CALM, the LM's own logits exactly), negative values steer away.
α is a plain attribute of the wrapper: set it, use :meth:`AlignedLM.use_alpha`, or pass
``alpha=`` to :meth:`AlignedLM.generate` / :meth:`AlignedLM.forward`. α and the per-call
bookkeeping of the token context are shared by all threads: run one forward/generate at a
time per wrapper (a streamer's generate thread is fine).

α may also be a vector ``(B,)``, one α per batch row: row b gets ``z(α_b)``. Replicating the
prompts once per α then decodes a whole α-sweep in one ``generate()`` call
(:meth:`AlignedLM.alpha_sweep_generate`); the backbone runs once over an A× larger batch, which
a GPU processes in about the time of one.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, TypeAlias

import torch
from torch import Tensor, nn

from alignheads.models.context import TokenContext, token_context
from alignheads.models.context_hooks import ContextTracker
from alignheads.models.head_base import LogitHead, SteeringOutput, final_logit_cap, soft_cap
from alignheads.models.recording import StepRecorder

__all__ = ["Alpha", "AlphaLike", "AlignedLM", "SteeredLMHead", "as_alpha"]

Alpha: TypeAlias = float | Tensor
"""A stored α: one float for the whole batch, or a vector ``(B,)`` with one α per batch row."""

AlphaLike: TypeAlias = float | Sequence[float] | Tensor
"""What α may be given as: a number (0-d tensors included) or a 1-D sequence/tensor ``(B,)``."""


def as_alpha(value: AlphaLike) -> Alpha:
    """``value`` as a float (numbers, 0-d tensors) or as a per-row vector ``(B,)`` (1-D tensors,
    sequences of numbers); anything else is refused (ValueError)."""
    if isinstance(value, Tensor):
        vector = value.detach()
    elif (isinstance(value, Sequence) and not isinstance(value, str)) or hasattr(value, "__array__"):
        vector = torch.as_tensor(value, dtype=torch.float32)
    else:
        return float(value)
    if vector.dim() == 0:
        return float(vector)
    if vector.dim() != 1 or vector.numel() == 0 or vector.dtype == torch.bool or vector.is_complex():
        raise ValueError(
            "alpha must be a number or a non-empty vector of numbers with one α per batch row, "
            f"got {vector.dtype} of shape {tuple(vector.shape)}"
        )
    return vector


class SteeredLMHead(nn.Module):
    """Stands in for the LM's output layer: hidden ``(B, T, H)`` → ``z(α)`` ``(B, T, V)``.

    ``alpha`` is one float for the whole batch, or a vector ``(B,)`` giving row b the logits
    ``base_b + α_b · delta_b``; with a vector the batch must have exactly B rows (beam search
    and ``num_return_sequences > 1`` multiply the rows, and are refused).
    """

    def __init__(
        self,
        head: LogitHead,
        frozen_head: nn.Module,
        context_source: Callable[[int], TokenContext] | None,
        alpha: AlphaLike = 1.0,
        cap: float | None = None,
    ) -> None:
        super().__init__()
        self.head = head
        self.frozen_head = frozen_head
        self.alpha = alpha
        self._context_source = context_source
        # the model's final-logit soft-cap: its forward caps what this layer returns, so the
        # recorded KL compares the capped distributions, the ones decoding samples from
        self._cap = cap
        self.recorder: StepRecorder | None = None

    @property
    def alpha(self) -> Alpha:
        return self._alpha

    @alpha.setter
    def alpha(self, value: AlphaLike) -> None:
        self._alpha = as_alpha(value)

    def forward(self, hidden: Tensor) -> Tensor:
        alpha = self._alpha
        if isinstance(alpha, Tensor) and hidden.shape[0] != alpha.shape[0]:
            raise ValueError(
                f"the model was called with {hidden.shape[0]} rows but {alpha.shape[0]} per-row alphas "
                "were given (beam search and num_return_sequences > 1 multiply the rows: replicate "
                "the prompts instead)"
            )
        context = self._context_source(hidden.shape[1]) if self._context_source is not None else None
        if self.recorder is None and not isinstance(alpha, Tensor):
            return self.head.logits(hidden, alpha, frozen_head=self.frozen_head, context=context)
        output = self.head(hidden, frozen_head=self.frozen_head, context=context)
        logits = _steered_logits(output, alpha)
        if self.recorder is not None:
            self.recorder.observe(
                output, soft_cap(logits, self._cap), soft_cap(self.frozen_head(hidden), self._cap)
            )
        return logits


def _steered_logits(output: SteeringOutput, alpha: Alpha) -> Tensor:
    """``z(α)`` ``(B, T, V)`` from a head's output; a vector α ``(B,)`` is broadcast over rows."""
    if not isinstance(alpha, Tensor):
        return output.logits(alpha)
    base = output.base_logits
    return base + alpha.to(device=base.device, dtype=base.dtype).view(-1, 1, 1) * output.delta


def _sizes(module: nn.Module) -> tuple[int, int]:
    weight = module.weight
    return weight.shape[0], weight.shape[1]


class AlignedLM(nn.Module):
    """A causal LM (``transformers`` ``PreTrainedModel``) steered by ``head``.

    Building it installs the head into ``model`` in place (``model.get_output_embeddings()``
    becomes the :class:`SteeredLMHead`); :meth:`remove` puts the original layer back.
    ``aligned.model`` is the transformers model: use its ``generate()`` directly, or
    :meth:`generate` here to choose α per call.
    """

    def __init__(self, model: nn.Module, head: LogitHead, *, alpha: AlphaLike = 1.0) -> None:
        super().__init__()
        original = model.get_output_embeddings()
        if isinstance(original, SteeredLMHead):
            raise ValueError("this model already carries a head; call .remove() on its AlignedLM first")
        vocab, hidden = _sizes(original)
        cfg = head.config
        if (cfg.vocab_size, cfg.hidden_size) != (vocab, hidden):
            raise ValueError(
                f"head sized for vocabulary {cfg.vocab_size} x hidden {cfg.hidden_size}, "
                f"but the model's output layer is vocabulary {vocab} x hidden {hidden}"
            )
        self._tracker = ContextTracker(model) if head.needs_token_context else None
        source = self._tracker.take if self._tracker is not None else None
        self.model = model
        # reachable as self.model's output layer; kept out of this module's own registry so
        # its parameters are not listed twice in state_dict()
        self.__dict__["steered"] = SteeredLMHead(head, original, source, alpha, final_logit_cap(model))
        model.set_output_embeddings(self.steered)

    # ------------------------------------------------------------------ parts
    @property
    def head(self) -> LogitHead:
        return self.steered.head

    @property
    def frozen_head(self) -> nn.Module:
        """The LM's own output layer (what α = 0 gives for CALM)."""
        return self.steered.frozen_head

    @property
    def backbone(self) -> nn.Module:
        """The transformer whose last hidden states feed the output layer."""
        return self.model.base_model

    # ------------------------------------------------------------------ α
    @property
    def alpha(self) -> Alpha:
        """One float for the whole batch, or a vector ``(B,)`` with one α per batch row."""
        return self.steered.alpha

    @alpha.setter
    def alpha(self, value: AlphaLike) -> None:
        self.steered.alpha = value

    @contextmanager
    def use_alpha(self, alpha: AlphaLike | None) -> Iterator[AlignedLM]:
        """Set α inside the block (``None`` keeps the current one) and restore it after.

        ``alpha``: a float, or one α per batch row ``(B,)`` (see :class:`SteeredLMHead`).
        """
        previous = self.alpha
        if alpha is not None:
            self.alpha = alpha
        try:
            yield self
        finally:
            self.alpha = previous

    @contextmanager
    def original_lm(self) -> Iterator[nn.Module]:
        """Inside the block ``self.model`` is the plain LM (its own output layer)."""
        self.model.set_output_embeddings(self.frozen_head)
        try:
            yield self.model
        finally:
            self.model.set_output_embeddings(self.steered)

    # ------------------------------------------------------------------ running
    def forward(self, *args: Any, alpha: AlphaLike | None = None, **kwargs: Any) -> Any:
        """``self.model(*args, **kwargs)`` at ``alpha`` (default: the current α; float or ``(B,)``)."""
        with self.use_alpha(alpha):
            return self.model(*args, **kwargs)

    def generate(self, *args: Any, alpha: AlphaLike | None = None, **kwargs: Any) -> Any:
        """``self.model.generate(*args, **kwargs)`` at ``alpha`` (default: the current α).

        A per-row ``alpha (B,)`` needs a batch of B rows throughout: beam search and
        ``num_return_sequences > 1`` are refused (ValueError).
        """
        with self.use_alpha(alpha):
            return self.model.generate(*args, **kwargs)

    def alpha_sweep_generate(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        alphas: Sequence[float] | Tensor,
        **generate_kwargs: Any,
    ) -> Tensor:
        """Decode the prompts ``input_ids (B, P)`` (left-padded, ``attention_mask (B, P)``) once per α,
        all in one ``generate()`` call; returns ids ``(A, B, P + N)``, ``[i]`` for ``alphas[i]`` ``(A,)``.

        The prompts are replicated A times (α-major: rows ``i·B … i·B + B - 1`` carry ``alphas[i]``)
        and decoded with a per-row α ``(A·B,)``; the current α is restored afterwards.
        ``generate_kwargs`` go to ``generate()`` (greedy or sampling; ``max_new_tokens`` etc.); it must
        return plain sequences. With sampling, each row draws from the one global RNG stream, so rows
        do not reproduce separate per-α calls draw for draw; greedy decoding does (up to float noise).
        """
        sweep = torch.as_tensor(alphas, dtype=torch.float32)
        if sweep.dim() != 1 or sweep.numel() == 0:
            raise ValueError(f"alphas must be a non-empty list of α values, got shape {tuple(sweep.shape)}")
        n_alpha, rows = sweep.shape[0], input_ids.shape[0]
        out = self.generate(
            input_ids=input_ids.repeat(n_alpha, 1),
            attention_mask=attention_mask.repeat(n_alpha, 1),
            alpha=sweep.repeat_interleave(rows),
            **generate_kwargs,
        )
        if not isinstance(out, Tensor):
            raise TypeError(
                f"generate() returned a {type(out).__name__}; alpha_sweep_generate needs plain "
                "sequences (leave return_dict_in_generate unset)"
            )
        return out.view(n_alpha, rows, -1)

    @contextmanager
    def recording(self) -> Iterator[StepRecorder]:
        """Record per-step head statistics and KL to the LM inside the block (see StepRecorder)."""
        recorder = StepRecorder()
        self.steered.recorder = recorder
        try:
            yield recorder
        finally:
            self.steered.recorder = None

    def head_outputs(
        self, input_ids: Tensor, attention_mask: Tensor | None = None, **kwargs: Any
    ) -> SteeringOutput:
        """All head outputs at every position of full sequences (training, analysis).

        Runs the (frozen) backbone once without gradients and without a KV cache, then the
        head (with gradients, when enabled) on ``input_ids (B, T)``; ``.logits(α)`` of the
        result gives ``z(α)`` ``(B, T, V)`` for any α.
        """
        with torch.no_grad():
            outputs = self.backbone(
                input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **kwargs
            )
        return self.outputs_for_hidden(outputs.last_hidden_state, attention_mask)

    def outputs_for_hidden(self, hidden: Tensor, attention_mask: Tensor | None = None) -> SteeringOutput:
        """The head's outputs for last hidden states ``(B, T, H)`` of full sequences
        (e.g. cached by the reference pass); ``attention_mask (B, T)`` marks real tokens."""
        context = token_context(hidden, attention_mask) if self.head.needs_token_context else None
        return self.head(hidden, frozen_head=self.frozen_head, context=context)

    # ------------------------------------------------------------------ undo
    def remove(self) -> nn.Module:
        """Put the LM's own output layer back, unhook, and return the plain model."""
        if self._tracker is not None:
            self._tracker.remove()
            self._tracker = None
        self.model.set_output_embeddings(self.frozen_head)
        return self.model

    @torch.no_grad()
    def base_logits(self, input_ids: Tensor, attention_mask: Tensor | None = None, **kwargs: Any) -> Tensor:
        """Logits of the plain LM (its own output layer) for ``input_ids (B, T)`` → ``(B, T, V)``."""
        with self.original_lm() as lm:
            return lm(input_ids=input_ids, attention_mask=attention_mask, **kwargs).logits


@contextmanager
def plain_generation_config(model: nn.Module) -> Iterator[None]:
    """Inside the block the model's own `generation_config.json` defaults (top-k, repetition
    penalty, ...) are set aside, so decoding follows the caller's settings only."""
    from transformers import GenerationConfig

    previous = model.generation_config
    model.generation_config = GenerationConfig()
    try:
        yield
    finally:
        model.generation_config = previous
