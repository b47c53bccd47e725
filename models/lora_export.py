"""IAV's alignment head as a LoRA adapter on the base model's ``lm_head``: the maths of the export.

IAV decodes ``z(α) = W_b h + α W_a h`` (then the model's own final-logit cap, if it has one). A
LoRA adapter on ``lm_head`` computes ``lm_head(h) + scaling · B (A h)``, and the model's forward
caps that sum the same way. So when ``W_b`` *is* ``lm_head`` (weights and bias, as IAV keeps it
whenever the reference is the run's own model) the adapter reproduces the head exactly with

    B A = W_a        (truncated SVD: W_a = U S Vᵀ, B = U_r √S_r, A = √S_r V_rᵀ)
    scaling = lora_alpha / r = α      (so lora_alpha = α · r; rsLoRA off)

at full rank ``r = min(V, H)``; at a lower rank ``B A`` is the best rank-r approximation of
``W_a`` in the Frobenius and spectral norms (Eckart–Young), with relative Frobenius error
``√(Σ_{i>r} s_i²) / √(Σ_i s_i²)``. A head whose ``W_b`` was trained (``base_head: trained``)
differs from ``lm_head`` by a matrix α does not scale, so it is refused here
(:class:`NotALoraError`); ``alignheads merge`` folds such a head at one α. CALM is refused too: its
``s · v`` is gated by the running context mean and the token's position, not a linear map of ``h``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from alignheads.models.head_base import LogitHead
from alignheads.models.iav import IAVHead

__all__ = [
    "LoraFactors",
    "NotALoraError",
    "alignment_weight",
    "lora_alpha_for",
    "lora_factors",
    "require_iav",
]


class NotALoraError(ValueError):
    """A head that no LoRA adapter on ``lm_head`` reproduces; the message says why."""


@dataclass(frozen=True)
class LoraFactors:
    """``B A ≈ W``: ``A`` (r, H) and ``B`` (V, r) in float32, the rank, and how close they are."""

    A: Tensor
    B: Tensor
    rank: int
    full_rank: int
    singular_values: Tensor  # all of W's singular values, descending (float64)
    relative_error: float  # ‖W − B A‖_F / ‖W‖_F, from the dropped singular values


def lora_factors(weight: Tensor, rank: int | None = None) -> LoraFactors:
    """The rank-``rank`` factors of ``weight`` (V, H) by truncated SVD, computed in float64.

    ``rank`` None (or ≥ min(V, H)) is full rank, where ``B A`` equals ``weight`` up to rounding.
    The singular values are split evenly (``√S`` on each side), so neither factor dominates the
    adapter's float32 rounding.
    """
    if weight.ndim != 2:
        raise ValueError(f"expected a (V, H) matrix, got shape {tuple(weight.shape)}")
    full = min(weight.shape)
    if rank is not None and rank < 1:
        raise ValueError(f"rank must be >= 1 (or None for full rank), got {rank}")
    r = full if rank is None else min(int(rank), full)
    w = weight.detach().to("cpu", torch.float64)
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    root = s[:r].sqrt()
    b = (u[:, :r] * root).to(torch.float32).contiguous()
    a = (root[:, None] * vh[:r]).to(torch.float32).contiguous()
    total = float(s.square().sum())
    dropped = float(s[r:].square().sum())
    error = math.sqrt(dropped / total) if total > 0 else 0.0
    return LoraFactors(A=a, B=b, rank=r, full_rank=full, singular_values=s, relative_error=error)


def lora_alpha_for(alpha: float, rank: int) -> float:
    """PEFT's ``lora_alpha`` that makes the adapter's scale ``lora_alpha / r`` equal IAV's α."""
    return float(alpha) * int(rank)


def require_iav(head_type: str) -> None:
    """Raise :class:`NotALoraError` saying why, unless ``head_type`` is IAV's."""
    if head_type == IAVHead.head_type:
        return
    why = (
        "CALM's modulation s·v, with s = s_max·σ(g(c)) gated by the running context mean c and "
        "v = U(D(h + p_pos)) depending on the token's position, is not a fixed linear map of the hidden "
        "state, which is all a LoRA on lm_head can add"
        if head_type == "calm"
        else "only IAV's W_a is a linear map of the hidden state that a LoRA on lm_head can carry"
    )
    raise NotALoraError(
        f"a {head_type} head cannot be exported as a PEFT LoRA adapter: {why}. Only IAV heads "
        "(W_b h + α W_a h) export to PEFT; serve a CALM head with `alignheads generate` or its MLflow model"
    )


def alignment_weight(head: LogitHead, lm_head: nn.Module) -> Tensor:
    """``W_a`` of an IAV ``head`` whose base head is exactly the model's ``lm_head`` (weights and bias,
    compared in ``lm_head``'s dtype), so that ``lm_head + LoRA(W_a)`` is the head; otherwise
    :class:`NotALoraError` saying why."""
    require_iav(head.head_type)
    if not isinstance(head, IAVHead):  # pragma: no cover (a head class registered as "iav")
        raise NotALoraError(f"{type(head).__name__} is not an IAVHead")
    weight = getattr(lm_head, "weight", None)
    if weight is None or tuple(weight.shape) != tuple(head.base.weight.shape):
        shape = None if weight is None else tuple(weight.shape)
        raise NotALoraError(
            f"the model's output layer has weight shape {shape}, the head's base head "
            f"{tuple(head.base.weight.shape)}: not the model this head was trained on"
        )
    with torch.no_grad():
        w_b = head.base.weight.detach().to(weight.device, weight.dtype)
        gap = (w_b.float() - weight.detach().float()).abs().max().item()
        bias, head_bias = getattr(lm_head, "bias", None), head.base.bias
        if (bias is None) != (head_bias is None):
            raise NotALoraError("the head's base head and the model's lm_head differ in having a bias")
        if bias is not None:
            gap = max(
                gap, (head_bias.detach().float().to(bias.device) - bias.detach().float()).abs().max().item()
            )
    if gap != 0.0:
        raise NotALoraError(
            f"the head's base head W_b differs from the model's lm_head (max |ΔW| = {gap:.3g}; it was "
            "trained, train.iav.base_head: trained, against another reference model): a LoRA on lm_head "
            "adds α·W_a h to lm_head(h), so it reproduces W_b h + α W_a h only when W_b is lm_head. "
            "Use `alignheads merge` for a checkpoint at one α"
        )
    return head.align.weight.detach()
