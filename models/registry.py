"""Head types by name (as written in ``head_config.json``)."""

from __future__ import annotations

from typing import Any

from torch import nn

from alignheads.models.calm import CALMHead
from alignheads.models.head_base import LogitHead
from alignheads.models.iav import IAVHead

__all__ = ["HEAD_TYPES", "head_class", "new_head"]

HEAD_TYPES: dict[str, type[LogitHead]] = {IAVHead.head_type: IAVHead, CALMHead.head_type: CALMHead}


def head_class(head_type: str) -> type[LogitHead]:
    """The head class called ``head_type`` (``"iav"`` or ``"calm"``)."""
    try:
        return HEAD_TYPES[head_type]
    except KeyError:
        raise ValueError(f"unknown head type {head_type!r}; known: {', '.join(sorted(HEAD_TYPES))}") from None


def new_head(head_type: str, model: nn.Module, **hyperparameters: Any) -> LogitHead:
    """A freshly initialised head of ``head_type`` for ``model`` (leaves its logits unchanged).

    IAV takes ``dtype``; CALM takes ``rank``, ``s_max``, ``max_positions`` and ``dtype``.
    """
    return head_class(head_type).from_base_model(model, **hyperparameters)
