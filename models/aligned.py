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

Several dials: ``AlignedLM(model, {"helpful": head1, "polite": head2})`` installs K heads (any
mix of IAV and CALM) as one output layer, :class:`alignheads.models.dials.DialLMHead`, giving
``z = z_LM + Σ_i α_i · Δ_i(h)`` with one α per dial: a mapping name → float (missing names 0), a
vector ``(K,)`` in :attr:`AlignedLM.dial_names` order, or ``(B, K)`` per row. A single head keeps
the behaviour above.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, TypeAlias

import torch
from torch import Tensor, nn

from alignheads.models.context import TokenContext, token_context
from alignheads.models.context_hooks import ContextTracker
from alignheads.models.head_base import LogitHead, SteeringOutput, final_logit_cap, soft_cap
from alignheads.models.recording import StepRecorder

__all__ = [
    "Alpha",
    "AlphaLike",
    "AlignedLM",
    "DialAlphaLike",
    "SteeredLMHead",
    "SteeringLayer",
    "as_alpha",
    "check_head_size",
]

Alpha: TypeAlias = float | Tensor
"""A stored α: one float for the whole batch, or a vector ``(B,)`` with one α per batch row."""

AlphaLike: TypeAlias = float | Sequence[float] | Tensor
"""What α may be given as: a number (0-d tensors included) or a 1-D sequence/tensor ``(B,)``."""

DialAlphaLike: TypeAlias = float | Mapping[str, float] | Sequence[float] | Sequence[Sequence[float]] | Tensor
"""α of several dials: a number (every dial), a mapping name → α (missing names 0), a vector
``(K,)`` in the dials' order, or ``(B, K)`` one row of K α per batch row."""


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


class SteeringLayer(nn.Module):
    """What :class:`AlignedLM` installs as the LM's output layer: hidden ``(B, T, H)`` → steered
    logits ``(B, T, V)``. Holds the LM's own output layer (``frozen_head``), where the token context
    comes from, the model's final-logit cap and the optional recorder; subclasses hold the heads
    and the α (:class:`SteeredLMHead`: one head; `models.dials.DialLMHead`: several dials)."""

    dial_names: tuple[str, ...] = ()  # the dials' names, in α order (none for one head)

    def __init__(
        self,
        frozen_head: nn.Module,
        context_source: Callable[[int], TokenContext] | None,
        cap: float | None,
    ) -> None:
        super().__init__()
        self.frozen_head = frozen_head
        self._context_source = context_source
        # the model's final-logit soft-cap: its forward caps what this layer returns, so the
        # recorded KL compares the capped distributions, the ones decoding samples from
        self._cap = cap
        self.recorder: StepRecorder | None = None

    def token_context(self, n_positions: int) -> TokenContext | None:
        """The context of this call's ``n_positions`` hidden states (None when no head needs it)."""
        return self._context_source(n_positions) if self._context_source is not None else None

    def named_heads(self) -> dict[str, LogitHead]:
        """The installed heads by name."""
        raise NotImplementedError

    def sweep_alphas(self, alphas: Any) -> Tensor:
        """An α-sweep's points as a tensor ``(A, ...)``, one row per point, each a per-row α."""
        raise NotImplementedError


class SteeredLMHead(SteeringLayer):
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
        super().__init__(frozen_head, context_source, cap)
        self.head = head
        self.alpha = alpha

    @property
    def alpha(self) -> Alpha:
        return self._alpha

    @alpha.setter
    def alpha(self, value: AlphaLike) -> None:
        self._alpha = as_alpha(value)

    def named_heads(self) -> dict[str, LogitHead]:
        """``{head_type: head}``."""
        return {self.head.head_type: self.head}

    def sweep_alphas(self, alphas: Sequence[float] | Tensor) -> Tensor:
        """``(A,)`` float32 from a non-empty list of α values."""
        sweep = torch.as_tensor(alphas, dtype=torch.float32)
        if sweep.dim() != 1 or sweep.numel() == 0:
            raise ValueError(f"alphas must be a non-empty list of α values, got shape {tuple(sweep.shape)}")
        return sweep

    def forward(self, hidden: Tensor) -> Tensor:
        alpha = self._alpha
        if isinstance(alpha, Tensor) and hidden.shape[0] != alpha.shape[0]:
            raise ValueError(
                f"the model was called with {hidden.shape[0]} rows but {alpha.shape[0]} per-row alphas "
                "were given (beam search and num_return_sequences > 1 multiply the rows: replicate "
                "the prompts instead)"
            )
        context = self.token_context(hidden.shape[1])
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


def check_head_size(head: LogitHead, layer: nn.Module, name: str | None = None) -> None:
    """ValueError unless ``head`` is sized for the output layer ``layer`` (vocabulary x hidden)."""
    vocab, hidden = layer.weight.shape[0], layer.weight.shape[1]
    cfg = head.config
    if (cfg.vocab_size, cfg.hidden_size) != (vocab, hidden):
        which = "head" if name is None else f"dial {name!r}"
        raise ValueError(
            f"{which} sized for vocabulary {cfg.vocab_size} x hidden {cfg.hidden_size}, "
            f"but the model's output layer is vocabulary {vocab} x hidden {hidden}"
        )


class AlignedLM(nn.Module):
    """A causal LM (``transformers`` ``PreTrainedModel``) steered by ``head``.

    Building it installs the head into ``model`` in place (``model.get_output_embeddings()``
    becomes the :class:`SteeredLMHead`); :meth:`remove` puts the original layer back.
    ``aligned.model`` is the transformers model: use its ``generate()`` directly, or
    :meth:`generate` here to choose α per call.

    ``head`` may also be a mapping name → head: several dials on one LM, installed as one
    `models.dials.DialLMHead` (``z = z_LM + Σ_i α_i Δ_i``; α as in :data:`DialAlphaLike`, a number
    setting every dial; IAV dials must keep the LM's own ``lm_head`` as ``W_b``). One
    :class:`ContextTracker` serves every head that needs the token context.
    """

    def __init__(
        self,
        model: nn.Module,
        head: LogitHead | Mapping[str, LogitHead],
        *,
        alpha: AlphaLike | DialAlphaLike = 1.0,
    ) -> None:
        super().__init__()
        original = model.get_output_embeddings()
        if isinstance(original, SteeringLayer):
            raise ValueError("this model already carries a head; call .remove() on its AlignedLM first")
        cap = final_logit_cap(model)
        if isinstance(head, LogitHead):
            check_head_size(head, original)
            source = self._take_context if head.needs_token_context else None
            layer: SteeringLayer = SteeredLMHead(head, original, source, alpha, cap)
        else:
            from alignheads.models.dials import DialLMHead  # dials builds on this module

            layer = DialLMHead(head, original, self._take_context, alpha, cap)
        needs_context = any(one.needs_token_context for one in layer.named_heads().values())
        # hooked only once the layer stands: a refused head leaves the model untouched
        self._tracker = ContextTracker(model) if needs_context else None
        self.model = model
        # reachable as self.model's output layer; kept out of this module's own registry so
        # its parameters are not listed twice in state_dict()
        self.__dict__["steered"] = layer
        model.set_output_embeddings(layer)

    def _take_context(self, n_positions: int) -> TokenContext:
        return self._tracker.take(n_positions)

    # ------------------------------------------------------------------ parts
    @property
    def head(self) -> LogitHead:
        """The head (one head installed; with several dials use :attr:`heads`)."""
        if self.dial_names:
            raise TypeError(
                f"this AlignedLM carries {len(self.dial_names)} dials {list(self.dial_names)}: use .heads[name]"
            )
        return self.steered.head

    @property
    def heads(self) -> dict[str, LogitHead]:
        """The installed heads by name: the dials, or ``{head_type: head}`` for one head."""
        return self.steered.named_heads()

    @property
    def dial_names(self) -> tuple[str, ...]:
        """The dials' names in the order of a ``(K,)`` or ``(B, K)`` α; ``()`` for one head."""
        return self.steered.dial_names

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
        """One float for the whole batch, or a vector ``(B,)`` with one α per batch row; with
        dials a float32 tensor ``(K,)`` (one α per dial) or ``(B, K)`` (per row)."""
        return self.steered.alpha

    @alpha.setter
    def alpha(self, value: AlphaLike | DialAlphaLike) -> None:
        self.steered.alpha = value

    @contextmanager
    def use_alpha(self, alpha: AlphaLike | DialAlphaLike | None) -> Iterator[AlignedLM]:
        """Set α inside the block (``None`` keeps the current one) and restore it after.

        ``alpha``: a float, or one α per batch row ``(B,)`` (see :class:`SteeredLMHead`); with
        dials any :data:`DialAlphaLike` (see `models.dials.DialLMHead`).
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
    def forward(self, *args: Any, alpha: AlphaLike | DialAlphaLike | None = None, **kwargs: Any) -> Any:
        """``self.model(*args, **kwargs)`` at ``alpha`` (default: the current α; float or ``(B,)``;
        dials: ``(K,)``, ``(B, K)`` or a mapping)."""
        with self.use_alpha(alpha):
            return self.model(*args, **kwargs)

    def generate(self, *args: Any, alpha: AlphaLike | DialAlphaLike | None = None, **kwargs: Any) -> Any:
        """``self.model.generate(*args, **kwargs)`` at ``alpha`` (default: the current α).

        A per-row ``alpha (B,)`` (dials: ``(B, K)``) needs a batch of B rows throughout: beam
        search and ``num_return_sequences > 1`` are refused (ValueError); a uniform α serves any.
        Unless the call chooses its cache, the KV cache is `models.kv_cache.prefix_cache`.
        """
        from alignheads.models.kv_cache import with_prefix_cache

        with self.use_alpha(alpha):
            # a KV cache written in place (bit-identical to transformers' default, fewer copies)
            return self.model.generate(*args, **with_prefix_cache(self.model, kwargs))

    def alpha_sweep_generate(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        alphas: Sequence[float] | Sequence[Any] | Tensor,
        **generate_kwargs: Any,
    ) -> Tensor:
        """Decode the prompts ``input_ids (B, P)`` (left-padded, ``attention_mask (B, P)``) once per α,
        all in one ``generate()`` call; returns ids ``(A, B, P + N)``, ``[i]`` for ``alphas[i]`` ``(A,)``.

        With dials each sweep point is one α per dial: ``alphas`` ``(A, K)``, or A mappings
        name → α. The prompts are replicated A times (α-major: rows ``i·B … i·B + B - 1`` carry
        ``alphas[i]``) and decoded with a per-row α ``(A·B,)`` (dials: ``(A·B, K)``); the current α is
        restored afterwards. ``generate_kwargs`` go to ``generate()`` (greedy or sampling;
        ``max_new_tokens`` etc.); it must return plain sequences. With sampling, each row draws from
        the one global RNG stream, so rows do not reproduce separate per-α calls draw for draw;
        greedy decoding does (up to float noise).
        """
        sweep = self.steered.sweep_alphas(alphas)
        n_alpha, rows = sweep.shape[0], input_ids.shape[0]
        out = self.generate(
            input_ids=input_ids.repeat(n_alpha, 1),
            attention_mask=attention_mask.repeat(n_alpha, 1),
            alpha=sweep.repeat_interleave(rows, dim=0),
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
        """Record per-step head statistics and KL to the LM inside the block (see StepRecorder;
        dials record per-dial statistics, ``strength/<name>``, ``align_norm/<name>``)."""
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
