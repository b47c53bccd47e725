"""CALM (Controllable Alignment via Logit Modulation): ``z(α) = z_base + α · s · v``.

The LM's ``lm_head`` stays frozen (``z_base``). The modulation ``v = U(D(h + p_pos))`` is a
rank-R map ``H → R → V`` with ``U`` zero-initialised (so a fresh head changes nothing) and
``p_pos`` a learned embedding of the token's *true* position (non-padding tokens before
it). The strength ``s = s_max · σ(g(c))`` gates on the causal context vector ``c``, the
mean hidden state of the non-padding prefix up to the token (:mod:`.context`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from alignheads.models.context import TokenContext
from alignheads.models.head_base import LogitHead, SteeringOutput, lm_output_layer

__all__ = ["CALMConfig", "CALMHead", "CALMOutput"]


class CALMConfig(BaseModel):
    """CALM hyperparameters (sizes come from the base model)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    hidden_size: int = Field(..., gt=0, description="Width of the LM's last hidden state")
    vocab_size: int = Field(..., gt=0, description="Rows of the LM's output layer")
    rank: int = Field(32, gt=0, description="Rank R of the modulation U·D")
    s_max: float = Field(5.0, gt=0, description="Upper bound of the gated strength s")
    max_positions: int = Field(
        2048, gt=0, description="Rows of the position embedding; later positions share the last row"
    )


@dataclass(frozen=True)
class CALMOutput(SteeringOutput):
    """base_logits ``(B, T, V)`` (frozen lm_head), modulation ``v (B, T, V)``, strength ``s (B, T)``."""

    base_logits: Tensor
    modulation: Tensor
    strength: Tensor

    @property
    def delta(self) -> Tensor:
        return self.strength.unsqueeze(-1) * self.modulation

    def token_stats(self) -> dict[str, Tensor]:
        return {"strength": self.strength.float(), "modulation_norm": self.modulation.float().norm(dim=-1)}


class CALMHead(LogitHead):
    """``down`` D: H→R, ``up`` U: R→V (zero init), ``position`` p_pos, ``gate`` g: H→1."""

    head_type: ClassVar[str] = "calm"
    needs_token_context: ClassVar[bool] = True

    def __init__(self, config: CALMConfig, *, dtype: torch.dtype | None = None, device=None) -> None:
        super().__init__()
        self.config = config
        kw = {"dtype": dtype, "device": device}
        self.down = nn.Linear(config.hidden_size, config.rank, bias=False, **kw)
        self.up = nn.Linear(config.rank, config.vocab_size, bias=False, **kw)
        self.position = nn.Embedding(config.max_positions, config.hidden_size, **kw)
        self.gate = nn.Linear(config.hidden_size, 1, **kw)
        nn.init.zeros_(self.up.weight)
        nn.init.normal_(self.position.weight, std=0.02)

    @classmethod
    def config_class(cls) -> type[CALMConfig]:
        return CALMConfig

    @classmethod
    def from_base_model(
        cls,
        model: nn.Module,
        *,
        rank: int = 32,
        s_max: float = 5.0,
        max_positions: int = 2048,
        dtype: torch.dtype | None = None,
    ) -> CALMHead:
        """A fresh head sized for ``model``'s output layer (dtype defaults to that layer's)."""
        weight = lm_output_layer(model).weight
        config = CALMConfig(
            hidden_size=weight.shape[1],
            vocab_size=weight.shape[0],
            rank=rank,
            s_max=s_max,
            max_positions=max_positions,
        )
        return cls(config, dtype=dtype or weight.dtype, device=weight.device)

    def modulation(self, hidden: Tensor, context: TokenContext) -> tuple[Tensor, Tensor]:
        """``(v (B, T, V), s (B, T))`` for ``hidden (B, T, H)`` and its token context."""
        if context is None:
            raise ValueError(
                "CALMHead needs the tokens' causal context (positions and prefix means): "
                "compute it with alignheads.models.context.token_context(hidden, attention_mask), "
                "or call the model through AlignedLM, which tracks it"
            )
        if context.length != hidden.shape[1]:
            raise ValueError(f"context covers {context.length} positions but hidden has {hidden.shape[1]}")
        h = hidden.to(self.dtype)
        positions = context.positions.to(h.device).clamp(max=self.config.max_positions - 1)
        v = self.up(self.down(h + self.position(positions)))
        s = self.config.s_max * torch.sigmoid(self.gate(context.context.to(device=h.device, dtype=h.dtype)))
        return v, s.squeeze(-1)

    def forward(
        self, hidden: Tensor, *, frozen_head: nn.Module | None = None, context: TokenContext | None = None
    ) -> CALMOutput:
        v, s = self.modulation(hidden, context)
        return CALMOutput(base_logits=_frozen_logits(frozen_head, hidden), modulation=v, strength=s)

    def logits(
        self,
        hidden: Tensor,
        alpha: float,
        *,
        frozen_head: nn.Module | None = None,
        context: TokenContext | None = None,
    ) -> Tensor:
        base = _frozen_logits(frozen_head, hidden)
        if alpha == 0:
            return base
        v, s = self.modulation(hidden, context)
        return base + alpha * (s.unsqueeze(-1) * v)


def _frozen_logits(frozen_head: nn.Module | None, hidden: Tensor) -> Tensor:
    if frozen_head is None:
        raise ValueError(
            "CALMHead needs the LM's frozen output layer (frozen_head=model.get_output_embeddings())"
        )
    return frozen_head(hidden)
