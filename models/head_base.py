"""What every logit head shares: ``z(α) = base_logits + α · delta``."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import torch
from pydantic import BaseModel
from torch import Tensor, nn

from alignheads.models.context import TokenContext

__all__ = ["LogitHead", "SteeringOutput", "final_logit_cap", "lm_output_layer", "soft_cap"]


def lm_output_layer(model: nn.Module) -> nn.Module:
    """The LM's own output layer, also when a head is installed in its place."""
    layer = model.get_output_embeddings()
    return getattr(layer, "frozen_head", layer)


def final_logit_cap(model: nn.Module) -> float | None:
    """The cap a Gemma-2-style model puts on its final logits (``final_logit_softcapping`` of its
    text config), or None when its forward returns ``lm_head``'s output unchanged."""
    config = getattr(model, "config", None)
    if config is None:
        return None
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    cap = getattr(text, "final_logit_softcapping", None)
    return None if cap is None else float(cap)


def soft_cap(logits: Tensor, cap: float | None) -> Tensor:
    """The model's own output transform, ``z → cap · tanh(z / cap)`` (identity when ``cap`` is None).

    transformers' Gemma-2 forward applies it to whatever its output layer returns (divide, tanh,
    multiply, in the logits' dtype; the same ops in the same order here), so with a head installed
    (`AlignedLM`) generation samples from ``soft_cap(z(α))``. Everything that forms logits from
    hidden states outside that forward (the heads' training and scoring logits, the frozen
    ``lm_head`` reference, the reference pass, the baselines' ``response_logits``) goes through
    this one function, so training sees the distribution that is decoded.
    """
    if cap is None:
        return logits
    return torch.tanh(logits / cap) * cap


class SteeringOutput(ABC):
    """A head's output for hidden states ``(B, T, H)``: base logits and the steering direction."""

    base_logits: Tensor

    @property
    @abstractmethod
    def delta(self) -> Tensor:
        """``(B, T, V)``: what α multiplies."""

    def logits(self, alpha: float) -> Tensor:
        """``z(α) = base_logits + α · delta``; α = 0 returns ``base_logits`` itself."""
        if alpha == 0:
            return self.base_logits
        return self.base_logits + alpha * self.delta

    @abstractmethod
    def token_stats(self) -> dict[str, Tensor]:
        """Per-position ``(B, T)`` summaries of the modulation (for generation records)."""


class LogitHead(nn.Module, ABC):
    """A trainable head computing steered logits from a causal LM's last hidden states.

    ``frozen_head`` is the LM's own (frozen) output layer; ``context`` the tokens' causal
    context (:mod:`alignheads.models.context`), required when ``needs_token_context``.
    """

    head_type: ClassVar[str]
    needs_token_context: ClassVar[bool]
    config: BaseModel

    @classmethod
    @abstractmethod
    def config_class(cls) -> type[BaseModel]:
        """The pydantic model holding this head's hyperparameters."""

    @abstractmethod
    def forward(
        self, hidden: Tensor, *, frozen_head: nn.Module | None = None, context: TokenContext | None = None
    ) -> SteeringOutput:
        """All of the head's outputs for ``hidden (B, T, H)`` (training, recording)."""

    @abstractmethod
    def logits(
        self,
        hidden: Tensor,
        alpha: float,
        *,
        frozen_head: nn.Module | None = None,
        context: TokenContext | None = None,
    ) -> Tensor:
        """``z(α)`` for ``hidden (B, T, H)`` → ``(B, T, V)``, skipping work that α = 0 does not need."""

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device
