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
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from alignheads.models.context import TokenContext
from alignheads.models.head_base import LogitHead, SteeringOutput, lm_output_layer

__all__ = ["CALMConfig", "CALMHead", "CALMOutput", "calm_codes", "gate_activation", "modulated_logits"]


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
        h = self._checked_hidden(hidden, context)
        down, up, table, gate_weight, gate_bias = self._weights()
        v = F.linear(calm_codes(h, context.positions, down, table), up)
        gate = gate_activation(context.context.to(device=h.device, dtype=h.dtype), gate_weight, gate_bias)
        return v, (self.config.s_max * gate).squeeze(-1)

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
        """``z(α) = base + α · s · v`` ``(B, T, V)``, computed as ``base + α s_max · U(σ(g(c)) · D(h + p))``
        in one matmul-add (:func:`modulated_logits`): the rank-R codes are gated, not the V-wide
        modulation, so no ``(B, T, V)`` intermediate is made. α = 0 gives the frozen head's logits."""
        base = _frozen_logits(frozen_head, hidden)
        if alpha == 0:
            return base
        h = self._checked_hidden(hidden, context)
        down, up, table, gate_weight, gate_bias = self._weights()
        codes = calm_codes(h, context.positions, down, table)
        gate = gate_activation(context.context.to(device=h.device, dtype=h.dtype), gate_weight, gate_bias)
        return modulated_logits(base, codes, gate, up, alpha * self.config.s_max)

    def _checked_hidden(self, hidden: Tensor, context: TokenContext | None) -> Tensor:
        """``hidden (B, T, H)`` in the head's dtype, once ``context`` is known to cover it."""
        if context is None:
            raise ValueError(
                "CALMHead needs the tokens' causal context (positions and prefix means): "
                "compute it with alignheads.models.context.token_context(hidden, attention_mask), "
                "or call the model through AlignedLM, which tracks it"
            )
        if context.length != hidden.shape[1]:
            raise ValueError(f"context covers {context.length} positions but hidden has {hidden.shape[1]}")
        return hidden.to(self._weights()[0].dtype)

    def _weights(self) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor | None]:
        """``(D (R, H), U (V, R), position table (P, H), gate weight (1, H), gate bias (1,))``.

        Read from the layers' parameter dicts and used through ``torch.nn.functional`` (the same
        maths as calling the layers): a decoding step needs them every token, and each
        ``self.up.weight`` costs two ``nn.Module.__getattr__`` look-ups (~1 µs each)."""
        layers = self._modules
        gate = layers["gate"]._parameters
        return (
            layers["down"]._parameters["weight"],
            layers["up"]._parameters["weight"],
            layers["position"]._parameters["weight"],
            gate["weight"],
            gate["bias"],
        )


def calm_codes(hidden: Tensor, positions: Tensor, down: Tensor, position_table: Tensor) -> Tensor:
    """``D(h + p[pos])`` ``(B, T, R)``: ``hidden (B, T, H)``, true ``positions (B, T)`` (past the
    table's ``P`` rows they share the last one), ``down (R, H)``, ``position_table (P, H)``."""
    positions = positions.to(hidden.device).clamp(max=position_table.shape[0] - 1)
    return F.linear(hidden + F.embedding(positions, position_table), down)


def gate_activation(context: Tensor, gate_weight: Tensor, gate_bias: Tensor | None) -> Tensor:
    """``σ(w · c + b)`` ``(B, T, 1)`` for the context means ``context (B, T, H)``, ``gate_weight (1, H)``,
    ``gate_bias (1,)``; the strength is ``s = s_max ·`` this."""
    return torch.sigmoid(F.linear(context, gate_weight, gate_bias))


def modulated_logits(base: Tensor, codes: Tensor, gate: Tensor, up: Tensor, coefficient: float) -> Tensor:
    """``base + coefficient · U(gate · codes)`` ``(B, T, V)`` in one ``addmm``: ``base (B, T, V)``,
    ``codes (B, T, R)``, ``gate (B, T, 1)``, ``up (V, R)``, ``coefficient`` = α · s_max; computed in the
    wider of ``base``'s and the codes' dtypes.

    Equal to ``base + α · (s · U codes)`` up to float rounding: gating the R-wide codes before ``U``
    instead of the V-wide result, and scaling and adding inside the matmul, reorders the products."""
    scaled = codes * gate
    if scaled.dtype != base.dtype:  # a head kept in another dtype than the LM's output layer
        dtype = torch.promote_types(base.dtype, scaled.dtype)
        base, scaled, up = base.to(dtype), scaled.to(dtype), up.to(dtype)
    flat = torch.addmm(
        base.reshape(-1, base.shape[-1]), scaled.view(-1, scaled.shape[-1]), up.t(), alpha=coefficient
    )
    return flat.view(base.shape)


def _frozen_logits(frozen_head: nn.Module | None, hidden: Tensor) -> Tensor:
    if frozen_head is None:
        raise ValueError(
            "CALMHead needs the LM's frozen output layer (frozen_head=model.get_output_embeddings())"
        )
    return frozen_head(hidden)
