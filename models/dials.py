"""Several dials on one backbone: ``z = z_LM + Σ_i α_i · Δ_i(h)``.

K trained heads (any mix of IAV and CALM) read the same last hidden state ``h`` of one frozen
LM, each with its own α. ``z_LM`` is the LM's own ``lm_head`` output and ``Δ_i`` the head's
``delta`` (IAV: ``W_a h``; CALM: ``s · v``). An IAV dial must keep the LM's ``lm_head`` as its
``W_b`` (a trained ``W_b`` is a different base, which would not compose with the others).
``AlignedLM(model, {"helpful": h1, "polite": h2})`` installs :class:`DialLMHead` as the LM's
output layer, so transformers' ``generate()`` works as with one head (KV cache, sampling, beam
search with a uniform α, left padding, streamers); one ``ContextTracker`` serves every CALM dial.

α (:func:`dial_alpha`): a mapping name → α (missing names 0, unknown names refused), a number
(every dial), a vector ``(K,)`` in the dials' order (``aligned.dial_names``), or ``(B, K)`` one
row per batch row. Every α zero gives the LM's logits exactly (bit for bit), so a zero row of a
sweep reproduces the base text.

Per step the dials cost about one head (the fused maths below; each a pure function):

* IAV, one α per call: ``Σ_i α_i W_a_i`` folded into one ``(V, H)`` matrix (:func:`fold_weights`,
  cached per α), so any number of IAV dials costs one extra H→V matmul;
* IAV, α per row ``(B, K)``: the ``W_a`` stacked into one ``(K·V, H)`` matmul
  (:func:`iav_dial_logits`) combined with α (:func:`combine_dials`);
* CALM: the ``D`` stacked into one H→ΣR map, the ``U`` into one ΣR→V map applied to the gated,
  α-scaled low-rank codes, the gates into one H→K map (:func:`stack_calm`, :func:`calm_codes`,
  :func:`calm_dials_delta`).

Stacked and folded weights are cached and rebuilt when a head's weights change (in-place edits,
``.to()``, ``load_state_dict``); the heads' modules themselves stay as installed. The layer is for
decoding: it does not carry gradients into the heads.

Recording (``aligned.recording()``): ``kl_to_base`` ``(B, N)`` of the combined distribution to the
LM's, plus per dial ``align_norm/<name>`` (IAV: ``‖W_a_i h‖``) or ``strength/<name>`` (CALM:
``s_i``), each ``(B, N)``, whatever the dial's α.

Decoders for the sweep (the interface of `tasks.sampling.sample_batches`, α ``(B, K)``):
:func:`dial_head_decoder` (the dials installed in the LM) and :func:`multi_genarm_decoder` (K
reward LMs next to the base, `models.genarm.multi_genarm_logits`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from alignheads.models.aligned import (
    AlignedLM,
    DialAlphaLike,
    SteeringLayer,
    check_head_size,
    plain_generation_config,
)
from alignheads.models.calm import CALMHead
from alignheads.models.context import TokenContext
from alignheads.models.genarm import multi_genarm_logits
from alignheads.models.guided import multi_guided_decode
from alignheads.models.head_base import LogitHead, soft_cap
from alignheads.models.iav import IAVHead
from alignheads.models.row_sampling import seeded_decoding

__all__ = [
    "CALMStack",
    "DialDecode",
    "DialLMHead",
    "calm_codes",
    "calm_dials_delta",
    "check_iav_dial",
    "combine_dials",
    "dial_alpha",
    "dial_head_decoder",
    "fold_weights",
    "iav_dial_logits",
    "multi_genarm_decoder",
    "stack_calm",
]

DialDecode = Callable[[Tensor, Tensor, Tensor, list[int]], tuple[Tensor, dict[str, Tensor]]]
"""``decode(input_ids (B, P), attention_mask (B, P), alphas (B, K), seeds [B]) -> (sequences
(B, P + N), {"kl_to_base": (B, N), ...})``."""


# --------------------------------------------------------------------------- α


def dial_alpha(value: DialAlphaLike, names: Sequence[str]) -> Tensor:
    """α of the dials ``names`` (K of them) as a float32 CPU tensor: ``(K,)`` one α per dial, or
    ``(B, K)`` one row per batch row.

    ``value``: a mapping name → α (missing names 0; unknown names: ValueError naming them), a
    number or 0-d tensor (every dial), a vector ``(K,)`` in ``names`` order, or ``(B, K)``.
    """
    k = len(names)
    if isinstance(value, Mapping):
        unknown = [name for name in value if name not in names]
        if unknown:
            raise ValueError(f"unknown dial(s) {unknown}; the dials are {list(names)}")
        return torch.tensor([float(value.get(name, 0.0)) for name in names], dtype=torch.float32)
    if isinstance(value, Tensor):
        if value.dtype == torch.bool or value.is_complex():
            raise ValueError(f"dial α must be real numbers, got {value.dtype}")
        alpha = value.detach().to(device="cpu", dtype=torch.float32).clone()
    else:
        alpha = torch.tensor(value, dtype=torch.float32)
    if alpha.dim() == 0:
        return alpha.expand(k).clone()
    if (alpha.dim() == 1 and alpha.shape[0] == k) or (
        alpha.dim() == 2 and alpha.shape[1] == k and len(alpha)
    ):
        return alpha
    raise ValueError(
        f"dial α must be a mapping name -> α, a number, one α per dial ({k},) in the order "
        f"{list(names)}, or one row of {k} per batch row (B, {k}); got shape {tuple(alpha.shape)}"
    )


def _check_row_alphas(alphas: Tensor, rows: int, names: Sequence[str]) -> None:
    """ValueError unless ``alphas`` is ``(rows, K)``: one α per dial for every batch row."""
    if alphas.dim() != 2 or tuple(alphas.shape) != (rows, len(names)):
        raise ValueError(
            f"alphas must be (B, K) = ({rows}, {len(names)}), one α per dial {list(names)} for each row; "
            f"got shape {tuple(alphas.shape)}"
        )


# --------------------------------------------------------------------------- fused maths


def fold_weights(weights: Sequence[Tensor], coefs: Sequence[float]) -> Tensor:
    """``Σ_i c_i W_i`` summed in float32 (float64 for float64 weights): ``weights`` K tensors of one
    shape on one device (IAV's ``W_a``: ``(V, H)``), ``coefs`` K numbers (terms with ``c_i = 0`` are
    skipped). Returns that shape in the summing dtype."""
    dtype = _summing_dtype(weights[0].dtype)
    total = torch.zeros(weights[0].shape, dtype=dtype, device=weights[0].device)
    for weight, coef in zip(weights, coefs, strict=True):
        if coef != 0:
            total.add_(weight.to(dtype), alpha=float(coef))
    return total


def _summing_dtype(dtype: torch.dtype) -> torch.dtype:
    """At least float32: bf16 / fp16 weights are summed in float32, float64 stays float64."""
    return torch.promote_types(dtype, torch.float32)


def iav_dial_logits(hidden: Tensor, stacked: Tensor, n_dials: int) -> Tensor:
    """Every IAV dial's ``W_a_i h`` in one matmul: ``hidden (B, T, H)``, ``stacked (K·V, H)`` (the
    ``W_a`` one below the other) → ``(B, T, K, V)``."""
    return F.linear(hidden, stacked).unflatten(-1, (n_dials, -1))


def combine_dials(per_dial: Tensor, alpha: Tensor) -> Tensor:
    """``Σ_k α[b, k] · per_dial[b, t, k]``: ``per_dial (B, T, K, V)``, ``alpha (B, K)`` → ``(B, T, V)``
    in ``per_dial``'s dtype. A row whose α is all zero gets exact zeros."""
    return torch.einsum("btkv,bk->btv", per_dial, alpha.to(per_dial.dtype))


@dataclass(frozen=True)
class CALMStack:
    """K CALM dials side by side (ΣR = the sum of their ranks):

    down ``(ΣR, H)``: the ``D_i`` one below the other; up ``(V, ΣR)``: the ``U_i`` side by side;
    positions ``(P, ΣR)``: ``D_i p_i[pos]`` for every true position (P = the longest table; a dial's
    rows past its own table repeat its last one, as its clamp does); gate_weight ``(K, H)``,
    gate_bias ``(K,)``, s_max ``(K,)``: the gates; owner ``(ΣR,)`` int64: the dial of each code.
    """

    down: Tensor
    up: Tensor
    positions: Tensor
    gate_weight: Tensor
    gate_bias: Tensor
    s_max: Tensor
    owner: Tensor


def stack_calm(heads: Sequence[CALMHead]) -> CALMStack:
    """Stack CALM heads (one dtype and device) for :func:`calm_codes` / :func:`calm_dials_delta`."""
    first = heads[0].down.weight
    longest = max(head.config.max_positions for head in heads)
    tables = []
    for head in heads:
        # D(h + p) = D h + D p: the position's part of the codes, precomputed per position
        wide = _summing_dtype(first.dtype)
        table = F.linear(head.position.weight.to(wide), head.down.weight.to(wide))
        tables.append(torch.cat([table, table[-1:].expand(longest - len(table), -1)]))
    ranks = torch.tensor([head.config.rank for head in heads], device=first.device)
    return CALMStack(
        down=torch.cat([head.down.weight for head in heads]),
        up=torch.cat([head.up.weight for head in heads], dim=1),
        positions=torch.cat(tables, dim=1).to(first.dtype),
        gate_weight=torch.cat([head.gate.weight for head in heads]),
        gate_bias=torch.cat([head.gate.bias for head in heads]),
        s_max=torch.tensor([head.config.s_max for head in heads], dtype=first.dtype, device=first.device),
        owner=torch.repeat_interleave(torch.arange(len(heads), device=first.device), ranks),
    )


def calm_codes(stack: CALMStack, hidden: Tensor, context: TokenContext) -> tuple[Tensor, Tensor]:
    """Every CALM dial's low-rank code ``D_i(h + p_i)``, side by side ``(B, T, ΣR)``, and strength
    ``s_i = s_max_i · σ(g_i(c))`` ``(B, T, K)``, for ``hidden (B, T, H)`` (in the stack's dtype) and
    its token context."""
    positions = context.positions.to(hidden.device).clamp(max=stack.positions.shape[0] - 1)
    codes = F.linear(hidden, stack.down) + F.embedding(positions, stack.positions)
    ctx = context.context.to(device=hidden.device, dtype=hidden.dtype)
    return codes, stack.s_max * torch.sigmoid(F.linear(ctx, stack.gate_weight, stack.gate_bias))


def calm_dials_delta(stack: CALMStack, codes: Tensor, strength: Tensor, alpha: Tensor) -> Tensor:
    """``Σ_i α_i s_i U_i(code_i)`` in one ΣR→V matmul: ``codes (B, T, ΣR)``, ``strength (B, T, K)``
    (:func:`calm_codes`), ``alpha`` ``(K,)`` one per dial or ``(B, K)`` per row → ``(B, T, V)``.
    A row whose α is all zero gets exact zeros."""
    alpha = alpha.to(strength.dtype)
    scale = (alpha if alpha.dim() == 1 else alpha[:, None, :]) * strength
    return F.linear(codes * scale.index_select(-1, stack.owner), stack.up)


def check_iav_dial(name: str, head: IAVHead, lm_head: nn.Module) -> None:
    """ValueError unless the IAV dial's base head ``W_b`` (and bias) is the LM's own ``lm_head``
    (compared in the coarser of the two dtypes): a trained ``W_b`` is another base."""
    bias, lm_bias = head.base.bias, getattr(lm_head, "bias", None)
    same = _equal(head.base.weight, lm_head.weight) and (
        (bias is None and lm_bias is None)
        or (bias is not None and lm_bias is not None and _equal(bias, lm_bias))
    )
    if not same:
        raise ValueError(
            f"IAV dial {name!r} has a trained base head W_b (not the LM's own lm_head): its base would not "
            "compose with the other dials' (z = z_LM + Σ α_i W_a_i h); use a head trained with the LM as "
            "its reference (train.iav.base_head frozen)"
        )


def _equal(a: Tensor, b: Tensor) -> bool:
    if a.shape != b.shape:
        return False
    dtype = a.dtype if torch.finfo(a.dtype).eps >= torch.finfo(b.dtype).eps else b.dtype
    return torch.equal(a.detach().to(device=b.device, dtype=dtype), b.detach().to(dtype))


def _checked_dials(heads: Mapping[str, LogitHead], lm_head: nn.Module) -> dict[str, LogitHead]:
    """The dials, checked: named, IAV or CALM, sized for the LM, IAV on the LM's lm_head, one dtype."""
    named = dict(heads)
    if not named:
        raise ValueError("no dials given: pass a mapping name -> head with at least one head")
    for name, head in named.items():
        if not isinstance(name, str) or not name or "." in name:
            raise ValueError(f"dial names must be non-empty strings without '.', got {name!r}")
        if not isinstance(head, IAVHead | CALMHead):
            raise TypeError(
                f"dial {name!r}: a {type(head).__name__} has no fused dial maths (IAV and CALM do)"
            )
        check_head_size(head, lm_head, name)
        if isinstance(head, IAVHead):
            check_iav_dial(name, head, lm_head)
    dtypes = {name: head.dtype for name, head in named.items()}
    if len(set(dtypes.values())) > 1:
        raise ValueError(f"the dials must share one dtype, got {dtypes}")
    return named


# --------------------------------------------------------------------------- the output layer


class DialLMHead(SteeringLayer):
    """Stands in for the LM's output layer: hidden ``(B, T, H)`` → ``z_LM + Σ_i α_i Δ_i`` ``(B, T, V)``.

    ``heads``: name → IAV or CALM head (the dials, in α order); ``alpha``: see :func:`dial_alpha`.
    With a per-row α ``(B, K)`` the batch must have exactly B rows (beam search and
    ``num_return_sequences > 1`` multiply the rows, and are refused); a ``(K,)`` α serves any.
    """

    def __init__(
        self,
        heads: Mapping[str, LogitHead],
        frozen_head: nn.Module,
        context_source: Callable[[int], TokenContext] | None,
        alpha: DialAlphaLike = 1.0,
        cap: float | None = None,
    ) -> None:
        super().__init__(frozen_head, context_source, cap)
        named = _checked_dials(heads, frozen_head)
        self.dials = nn.ModuleDict(named)
        self.dial_names = tuple(named)
        kinds = list(named.values())
        self._iav = [i for i, head in enumerate(kinds) if isinstance(head, IAVHead)]
        self._calm = [i for i, head in enumerate(kinds) if isinstance(head, CALMHead)]
        self._iav_heads: list[IAVHead] = [kinds[i] for i in self._iav]
        self._calm_heads: list[CALMHead] = [kinds[i] for i in self._calm]
        # the layers whose weights the caches are built from, found once: their parameters are
        # read afresh every step (walking the heads' module trees would cost ~20 µs a step)
        self._iav_layers = [head.align for head in self._iav_heads]
        self._calm_layers = [
            m for head in self._calm_heads for m in (head.down, head.up, head.position, head.gate)
        ]
        # the dials' dtype, read from a weight each step: it follows the model's .to(dtype)
        self._dtype_layers = self._iav_layers or self._calm_layers
        self._stat_names = [
            f"{'align_norm' if isinstance(head, IAVHead) else 'strength'}/{name}"
            for name, head in named.items()
        ]
        self._memo: dict[str, tuple[Any, Any]] = {}
        self.alpha = alpha

    # ------------------------------------------------------------------ α
    @property
    def alpha(self) -> Tensor:
        """A copy of α: ``(K,)`` one per dial, or ``(B, K)`` per row (float32)."""
        return self._alpha.clone()

    @alpha.setter
    def alpha(self, value: DialAlphaLike) -> None:
        alpha = dial_alpha(value, self.dial_names)
        self._alpha = alpha
        active = alpha.ne(0).reshape(-1, len(self.dial_names)).any(0)  # (K,): some row turns it
        self._iav_on = bool(active[self._iav].any())
        self._calm_on = bool(active[self._calm].any())
        # the IAV fold's cache key: the IAV dials' α of a uniform α (None per row)
        self._iav_key = tuple(alpha[self._iav].tolist()) if alpha.dim() == 1 else None
        self._on_device: dict[torch.device, tuple[Tensor, Tensor]] = {}

    def _alphas_on(self, device: torch.device) -> tuple[Tensor, Tensor]:
        """(IAV dials' α, CALM dials' α) on ``device``, each ``(K_kind,)`` or ``(B, K_kind)``."""
        split = self._on_device.get(device)
        if split is None:
            alpha = self._alpha.to(device)
            split = self._on_device[device] = (alpha[..., self._iav], alpha[..., self._calm])
        return split

    def named_heads(self) -> dict[str, LogitHead]:
        return dict(self.dials.items())

    def sweep_alphas(self, alphas: Sequence[Any] | Tensor) -> Tensor:
        """``(A, K)`` float32 from A sweep points, each any uniform dial α (a mapping, a number, ``(K,)``)."""
        points = [dial_alpha(point, self.dial_names) for point in alphas]
        if not points or any(point.dim() != 1 for point in points):
            raise ValueError(
                f"alphas must be a non-empty list of sweep points, each one α per dial {list(self.dial_names)}"
            )
        return torch.stack(points)

    # ------------------------------------------------------------------ the step
    def forward(self, hidden: Tensor) -> Tensor:
        alpha = self._alpha
        if alpha.dim() == 2 and hidden.shape[0] != alpha.shape[0]:
            raise ValueError(
                f"the model was called with {hidden.shape[0]} rows but {alpha.shape[0]} per-row alphas "
                "were given (beam search and num_return_sequences > 1 multiply the rows: replicate "
                "the prompts instead)"
            )
        context = self.token_context(hidden.shape[1]) if self._calm else None
        base = self.frozen_head(hidden)
        record = self.recorder is not None
        h = hidden.to(self._dtype_layers[0].weight.dtype)
        iav_alpha, calm_alpha = self._alphas_on(h.device)
        iav_delta, iav_stats = self._iav_part(h, iav_alpha, record)
        calm_delta, calm_stats = self._calm_part(h, context, calm_alpha, record)
        delta = _plus(iav_delta, calm_delta)
        logits = base if delta is None else base + delta.to(base.dtype)
        if record:
            stats = iav_stats | calm_stats
            stats = {name: stats[name] for name in self._stat_names}  # in the dials' order
            self.recorder.observe_stats(stats, soft_cap(logits, self._cap), soft_cap(base, self._cap))
        return logits

    def _iav_part(self, h: Tensor, alpha: Tensor, record: bool) -> tuple[Tensor | None, dict[str, Tensor]]:
        """The IAV dials' ``Σ α_i W_a_i h`` ``(B, T, V)`` (None when all their α are 0) and, when
        recording, their ``align_norm/<name>`` ``(B, T)``."""
        if not self._iav:
            return None, {}
        per_row = alpha.dim() == 2
        per_dial = None
        if record or (per_row and self._iav_on):
            per_dial = iav_dial_logits(h, self._stacked_iav(), len(self._iav))
        delta = None
        if self._iav_on:
            delta = combine_dials(per_dial, alpha) if per_row else F.linear(h, self._folded_iav())
        if not record:
            return delta, {}
        norms = per_dial.float().norm(dim=-1)
        return delta, {f"align_norm/{self.dial_names[i]}": norms[..., j] for j, i in enumerate(self._iav)}

    def _calm_part(
        self, h: Tensor, context: TokenContext | None, alpha: Tensor, record: bool
    ) -> tuple[Tensor | None, dict[str, Tensor]]:
        """The CALM dials' ``Σ α_i s_i v_i`` ``(B, T, V)`` (None when all their α are 0) and, when
        recording, their ``strength/<name>`` ``(B, T)``."""
        if not self._calm or not (self._calm_on or record):
            return None, {}
        stack = self._stacked_calm()
        codes, strength = calm_codes(stack, h, context)
        delta = calm_dials_delta(stack, codes, strength, alpha) if self._calm_on else None
        if not record:
            return delta, {}
        return delta, {f"strength/{self.dial_names[i]}": strength[..., j] for j, i in enumerate(self._calm)}

    # ------------------------------------------------------------------ cached weights
    def _folded_iav(self) -> Tensor:
        """``Σ α_i W_a_i`` ``(V, H)`` of the IAV dials at the current uniform α."""
        key = self._iav_key

        def build() -> Tensor:
            weights = [head.align.weight for head in self._iav_heads]
            return fold_weights(weights, key).to(weights[0].dtype)

        return self._memoised("iav_fold", self._iav_layers, key, build)

    def _stacked_iav(self) -> Tensor:
        """The IAV dials' ``W_a`` stacked ``(K·V, H)``."""
        weights = [head.align.weight for head in self._iav_heads]
        return self._memoised("iav_stack", self._iav_layers, None, partial(torch.cat, weights))

    def _stacked_calm(self) -> CALMStack:
        return self._memoised("calm_stack", self._calm_layers, None, lambda: stack_calm(self._calm_heads))

    def _memoised(self, name: str, layers: list[nn.Module], extra: Any, build: Callable[[], Any]) -> Any:
        """``build()``, cached under ``name`` until ``extra`` or a parameter of ``layers`` changes
        (edited in place, moved, or replaced, as ``load_state_dict(assign=True)`` does)."""
        params = [p for layer in layers for p in layer._parameters.values() if p is not None]
        key = (extra, tuple((p.device, p.data_ptr(), p._version) for p in params))
        hit = self._memo.get(name)
        if hit is not None and hit[0] == key:
            return hit[1]
        # plain tensors (not inference tensors), so the cache also serves calls outside inference mode
        with torch.inference_mode(False), torch.no_grad():
            value = build()
        self._memo[name] = (key, value)
        return value


def _plus(a: Tensor | None, b: Tensor | None) -> Tensor | None:
    """``a + b``, where None is no term (so an absent term costs no addition)."""
    return b if a is None else a if b is None else a + b


# --------------------------------------------------------------------------- sweep decoders


def dial_head_decoder(
    model: nn.Module, heads: Mapping[str, LogitHead], settings: dict[str, Any]
) -> tuple[DialDecode, Callable[[], None]]:
    """Decode with the dials installed as the LM's output layer, one α per dial per row
    (``alphas (B, K)`` in ``heads``' order), each row sampling from its own seed
    (`row_sampling.seeded_decoding` of the sweep's ``settings``), through transformers' `generate`
    with the model's own generation defaults set aside. Records ``kl_to_base`` and the per-dial
    statistics (module docstring). ``done()`` removes the dials from ``model``."""
    aligned = AlignedLM(model, heads, alpha=0.0)
    stack = ExitStack()
    stack.callback(aligned.remove)
    stack.enter_context(plain_generation_config(model))
    names = aligned.dial_names

    def decode(input_ids: Tensor, mask: Tensor, alphas: Tensor, seeds: list[int]):
        _check_row_alphas(alphas, input_ids.shape[0], names)
        with aligned.recording() as recorder:
            out = aligned.generate(
                input_ids, attention_mask=mask, alpha=alphas, **seeded_decoding(settings, seeds)
            )
        return out, recorder.stacked()

    return decode, stack.close


def multi_genarm_decoder(
    base: nn.Module, reward_lms: Mapping[str, nn.Module], settings: dict[str, Any]
) -> tuple[DialDecode, Callable[[], None]]:
    """Decode from ``π_base · Π_i π_r_i^α_i`` (`genarm.multi_genarm_logits`), the base and the K
    reward LMs side by side (one KV cache each: K + 1 forwards per token), one α per reward LM per
    row (``alphas (B, K)`` in ``reward_lms``' order), each row sampling from its own seed. Records
    ``kl_to_base`` ``(B, N)``. ``done()`` has nothing to undo."""
    names, models = tuple(reward_lms), list(reward_lms.values())
    if not models:
        raise ValueError("no reward LMs given: pass a mapping name -> reward LM with at least one")

    def decode(input_ids: Tensor, mask: Tensor, alphas: Tensor, seeds: list[int]):
        _check_row_alphas(alphas, input_ids.shape[0], names)
        out = multi_guided_decode(
            base, models, input_ids, mask, multi_genarm_logits, alphas, **seeded_decoding(settings, seeds)
        )
        return out.sequences, {"kl_to_base": out.kl_to_base}

    return decode, lambda: None
