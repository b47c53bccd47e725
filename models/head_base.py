"""What every logit head shares: ``z(α) = base_logits + α · delta``."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import torch
from pydantic import BaseModel
from torch import Tensor, nn

from alignheads.models.context import TokenContext

__all__ = ["LogitHead", "SteeringOutput", "lm_output_layer"]


def lm_output_layer(model: nn.Module) -> nn.Module:
    """The LM's own output layer, also when a head is installed in its place."""
    layer = model.get_output_embeddings()
    return getattr(layer, "frozen_head", layer)


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
