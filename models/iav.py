"""IAV (Inherent Alignment Vectors): ``z(α) = W_b h + α · W_a h``.

``W_b`` (the base head) starts as a copy of the LM's own ``lm_head``. When the reference is the
LM itself (the default) it stays that copy, frozen, so α = 0 is the LM exactly; only when the
reference is another model is it trained, with a KL leash to that reference
(`IAVTrainConfig.base_head`). ``W_a`` (the alignment head) starts at zero, so a fresh head leaves
the LM's logits exactly unchanged for every α. A Gemma-2-style model soft-caps whatever its
output layer returns, so decoding samples from ``soft_cap(z(α))``; training applies the same cap
(:func:`alignheads.models.head_base.soft_cap`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from alignheads.models.context import TokenContext
from alignheads.models.head_base import LogitHead, SteeringOutput, lm_output_layer

__all__ = ["IAVConfig", "IAVHead", "IAVOutput"]


class IAVConfig(BaseModel):
    """IAV hyperparameters (sizes come from the base model)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    hidden_size: int = Field(..., gt=0, description="Width of the LM's last hidden state")
    vocab_size: int = Field(..., gt=0, description="Rows of the LM's output layer")
    bias: bool = Field(False, description="Whether the base head has a bias (copied from the LM's lm_head)")


@dataclass(frozen=True)
class IAVOutput(SteeringOutput):
    """base_logits ``W_b h`` and align_logits ``a = W_a h``, both ``(B, T, V)``."""

    base_logits: Tensor
    align_logits: Tensor

    @property
    def delta(self) -> Tensor:
        return self.align_logits

    def token_stats(self) -> dict[str, Tensor]:
        return {"align_norm": self.align_logits.float().norm(dim=-1)}


class IAVHead(LogitHead):
    """Two ``H → V`` linear maps of the last hidden state: ``base`` (W_b) and ``align`` (W_a)."""

    head_type: ClassVar[str] = "iav"
    needs_token_context: ClassVar[bool] = False

    def __init__(self, config: IAVConfig, *, dtype: torch.dtype | None = None, device=None) -> None:
        super().__init__()
        self.config = config
        kw = {"dtype": dtype, "device": device}
        self.base = nn.Linear(config.hidden_size, config.vocab_size, bias=config.bias, **kw)
        self.align = nn.Linear(config.hidden_size, config.vocab_size, bias=False, **kw)
        nn.init.zeros_(self.align.weight)

    @classmethod
    def config_class(cls) -> type[IAVConfig]:
        return IAVConfig

    @classmethod
    def from_base_model(cls, model: nn.Module, *, dtype: torch.dtype | None = None) -> IAVHead:
        """A fresh head for ``model``: ``W_b`` = copy of its output layer, ``W_a`` = 0.

        The copy is untied from the model (training W_b never touches the LM's embeddings).
        ``dtype`` defaults to the output layer's.
        """
        lm_head = lm_output_layer(model)
        weight = lm_head.weight
        bias = getattr(lm_head, "bias", None)
        config = IAVConfig(hidden_size=weight.shape[1], vocab_size=weight.shape[0], bias=bias is not None)
        head = cls(config, dtype=dtype or weight.dtype, device=weight.device)
        with torch.no_grad():
            head.base.weight.copy_(weight)
            if bias is not None:
                head.base.bias.copy_(bias)
        return head

    def forward(
        self, hidden: Tensor, *, frozen_head: nn.Module | None = None, context: TokenContext | None = None
    ) -> IAVOutput:
        h = hidden.to(self.dtype)
        return IAVOutput(base_logits=self.base(h), align_logits=self.align(h))

    def logits(
        self,
        hidden: Tensor,
        alpha: float,
        *,
        frozen_head: nn.Module | None = None,
        context: TokenContext | None = None,
    ) -> Tensor:
        h = hidden.to(self.dtype)
        base = self.base(h)
        if alpha == 0:
            return base
        return base + alpha * self.align(h)
