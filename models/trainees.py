"""What the one training loop trains for each method: a `Trainee` holds the module AdamW updates
and computes its loss on a batch of preference pairs.

* `HeadTrainee` (IAV, CALM): a fresh logit head over the frozen LM; its features come from the
  frozen backbone or from the reference cache's hidden states, its logits from the frozen
  `lm_head` plus the head. IAV's base head W_b stays frozen at the LM's `lm_head` unless the
  reference is another model (`IAVTrainConfig.base_head`).
* `LMTrainee` (GenARM, DPO + DeRa): the LM itself (or LoRA adapters on it) in float32, with
  dropout off (as TRL's trainers default to).

Logits formed here from hidden states go through the model's own output transform
(`head_base.soft_cap` with the model's `final_logit_softcapping`): the heads' training and
scoring logits, the exact-KL reference and `response_logits`, as transformers' forward does to
whatever the (replaced) output layer returns, so training sees what decoding samples from.

The objectives are the pure functions of `alignheads.models.objectives`; the registry that picks a
trainee per method is `alignheads.models.methods`.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn

from alignheads.config import CALMTrainConfig, HeadTrainConfig, IAVTrainConfig, PreferenceTrainConfig
from alignheads.models.features import backbone_features, cached_features, gather_time
from alignheads.models.head_base import LogitHead, final_logit_cap, lm_output_layer, soft_cap
from alignheads.models.losses import CALMLoss, CALMWeights, DPOOutput, IAVWeights, dpo_loss
from alignheads.models.objectives import (
    CALM_TERMS,
    IAV_TERMS,
    BatchNeeds,
    HeadStepLoss,
    PairBatch,
    ScoredTokens,
    calm_chunked_objective,
    exact_kl_estimate,
    head_response_logps,
    iav_chunked_objective,
    reference_kl_estimate,
    sampled_kl_per_token,
    scored_tokens,
    sequence_sums,
    topk_kl_per_token,
)
from alignheads.models.registry import new_head


def trl_metrics(loss: Tensor, dpo: DPOOutput, logps: Tensor, n_pairs: int) -> dict[str, float]:
    """TRL-named metrics of one micro-batch: the loss, the DPO output's implicit rewards, and the
    policy's summed response log-probs ``(2B,)`` (chosen rows first)."""
    return {
        "loss": loss.item(),
        "rewards/chosen": dpo.chosen_rewards.mean().item(),
        "rewards/rejected": dpo.rejected_rewards.mean().item(),
        "rewards/accuracies": (dpo.margins > 0).float().mean().item(),
        "rewards/margins": dpo.margins.mean().item(),
        "logps/chosen": logps[:n_pairs].mean().item(),
        "logps/rejected": logps[n_pairs:].mean().item(),
    }


@dataclass
class StepLoss:
    """One micro-batch's scalar loss and (computed after backward) its metrics."""

    loss: Tensor
    metrics: Callable[[], dict[str, float]]


class Trainee(ABC):
    """What the one training loop drives for a method: the module AdamW updates and its loss.

    `module` is what the optimizer and checkpoints see (and what is saved); `step_module` is what
    `accelerate.prepare` wraps and `loss` calls, the module itself unless a trainee needs more
    inside one forward (a head: its chunked objective). `loss` takes the (possibly wrapped)
    step module, so multi-process gradient sync works; `eval_dpo` takes the plain `module`.
    """

    module: nn.Module
    needs: BatchNeeds
    with_sequences: bool  # whether batches carry token ids for a backbone forward

    @property
    def step_module(self) -> nn.Module:
        return self.module

    @abstractmethod
    def loss(self, module: nn.Module, batch: PairBatch) -> StepLoss: ...

    @abstractmethod
    def eval_dpo(self, module: nn.Module, batch: PairBatch) -> DPOOutput:
        """The held-out pairs' implicit rewards and margins at α = 1 (the training objective's)."""


@dataclass(frozen=True)
class KLReference:
    """Another reference model's output layer ``layer`` (``lm_head``: ``(V, H_ref)``) and its
    final-logit soft-cap ``cap`` (None: none): with the hidden states the reference pass cached
    for that model, IAV's exact KL to it (`kl: exact` when `refpass.reference_model` is set)."""

    layer: nn.Module
    cap: float | None = None


# (head, the batch's scored tokens, batch) -> the head's loss and per-token terms
HeadObjective = Callable[[nn.Module, ScoredTokens, PairBatch], HeadStepLoss]


class HeadStep(nn.Module):
    """A head and its training objective as one module: ``forward(tokens, batch)`` is the
    objective of the head on a batch's scored tokens (:class:`HeadStepLoss`).

    It is what the loop prepares (DistributedDataParallel in a multi-process run) and calls once
    per micro-batch: the objective goes over the tokens a chunk at a time, recomputing chunks in
    the backward pass, and gradient synchronisation needs all of that inside one forward of the
    wrapped module. Its parameters are the head's alone (the frozen lm_head is the objective's,
    not a registered submodule).
    """

    def __init__(self, head: nn.Module, objective: HeadObjective) -> None:
        super().__init__()
        self.head = head
        self.objective = objective

    def forward(self, tokens: ScoredTokens, batch: PairBatch) -> HeadStepLoss:
        return self.objective(self.head, tokens, batch)


def place_frozen_lm(model: nn.Module, cfg: HeadTrainConfig, device: Any) -> None:
    """Move to ``device`` what a head's training reads of the frozen LM: the whole LM when its
    backbone runs (`features: backbone`); with `features: cached` only its output layer (the
    frozen lm_head: IAV's base logits and exact KL, CALM's base logits). The backbone's weights
    then stay where they were loaded, or unloaded (on the "meta" device) by a caller that never
    materialised them."""
    (model if cfg.features == "backbone" else lm_output_layer(model)).to(device)


# One seeded head initialisation at a time: the draws come from torch's global RNG, which is the
# process's, and trainings run in threads (a search's trials on the task runner). Two at once
# would interleave their draws, and a trial's head would depend on what else was starting.
_SEEDED_INIT = threading.Lock()


def seeded_head(kind: str, model: nn.Module, cfg: HeadTrainConfig) -> LogitHead:
    """A new float32 head of `kind` for `model`, its random parts drawn from ``cfg.seed`` (every
    process and every thread starts from the same weights); the global RNG's state outside is
    left as it was."""
    with _SEEDED_INIT, torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        return new_head(kind, model, dtype=torch.float32, **head_shape(cfg))


class HeadTrainee(Trainee):
    """A logit head over the frozen LM: features from the backbone (or the cache), frozen lm_head.

    IAV with ``base_head`` 'frozen' (and 'auto', whose default reference is the run's own model;
    the train plan resolves 'auto' from the reference cache) keeps W_b the LM's own output layer:
    its only gradient, the KL to that same layer, is rounding noise that AdamW would turn into
    full learning-rate steps. It does not require a gradient, so the optimizer holds no state for
    it, and α = 0 stays the LM exactly.

    ``chunk``: scored tokens per chunk of the loss and the evaluation (default: from the
    vocabulary, :func:`alignheads.models.losses.chunk_tokens`). ``kl_reference``: another
    reference model's output layer, for IAV's `kl: exact` to it over its cached hidden states
    (None: the KL's reference is the run model's own ``lm_head``, or the cache's top-k).
    """

    def __init__(
        self,
        kind: str,
        model: nn.Module,
        cfg: HeadTrainConfig,
        device: Any,
        chunk: int | None = None,
        kl_reference: KLReference | None = None,
    ) -> None:
        model.requires_grad_(False)
        place_frozen_lm(model, cfg, device)
        self.model, self.cfg, self.chunk = model, cfg, chunk
        self.frozen = lm_output_layer(model)
        self.cap = final_logit_cap(model)
        # heads train in float32 whatever the LM's dtype: they are the master weights AdamW
        # updates (bf16 would lose small updates); `mixed_precision: bf16` autocasts the compute
        self.module = seeded_head(kind, model, cfg).to(device)
        if base_head_frozen(cfg):
            self.module.base.requires_grad_(False)
            share_frozen_base(self.module.base, self.frozen)
        if kl_reference is not None:
            kl_reference.layer.to(device)  # in place, as the frozen lm_head above
        self.needs, self.with_sequences = head_batches(cfg, reference_hidden=kl_reference is not None)
        self.features = head_features(cfg, model.base_model, self.module.needs_token_context, self.frozen)
        self.objective = head_objective(cfg, self.frozen, self.cap, chunk, kl_reference)
        self._step = HeadStep(self.module, self.objective)

    @property
    def step_module(self) -> nn.Module:
        return self._step

    def tokens(self, batch: PairBatch) -> ScoredTokens:
        """The batch's scored tokens with their features (and CALM's context)."""
        hidden, ctx = self.features(batch)
        return scored_tokens(batch, hidden, ctx)

    def loss(self, module: nn.Module, batch: PairBatch) -> StepLoss:
        result = module(self.tokens(batch), batch)
        return StepLoss(result.loss.loss, lambda: head_step_metrics(result, batch))

    def logits(self, module: nn.Module, batch: PairBatch, alpha: float = 1.0) -> Tensor:
        """``(2B, R, V)``: the head's logits at α where they predict the response tokens, soft-capped
        as the model caps them: what the loss, the evaluation and the scoring see, and what
        decoding with the head installed samples from."""
        hidden, ctx = self.features(batch)
        return soft_cap(module(hidden, frozen_head=self.frozen, context=ctx).logits(alpha), self.cap)

    def eval_dpo(self, module: nn.Module, batch: PairBatch, alpha: float = 1.0) -> DPOOutput:
        """Implicit rewards at α of the head ``module``, a chunk of tokens at a time."""
        logps = head_response_logps(module, self.tokens(batch), self.frozen, alpha, self.cap, self.chunk)
        b = batch.n_pairs
        return dpo_loss(logps[:b], logps[b:], batch.ref_logps[:b], batch.ref_logps[b:], self.cfg.beta)


def share_frozen_base(base: nn.Linear, frozen: nn.Module) -> None:
    """Make a frozen IAV base head ``base`` (W_b ``(V, H)``, a copy of the LM's output layer
    ``frozen``) hold the output layer's own tensors where the copy is exact (same dtype, device
    and shape): the two are then one ``V x H`` weight in memory instead of two (500 MiB at a
    7B model's 32,000 x 4,096 in float32), with the same values, so training and the saved head
    are unchanged. W_b gets its own Parameter objects (a later ``.to()`` of the head re-points
    them, never the LM's). Neither is ever written: W_b is frozen, and so is the LM. A layer in
    another dtype (a bf16 LM under a float32 head) keeps its own copy."""
    for name in ("weight", "bias"):
        mine, theirs = getattr(base, name, None), getattr(frozen, name, None)
        if mine is None or theirs is None:
            continue
        if (mine.dtype, mine.device, mine.shape) == (theirs.dtype, theirs.device, theirs.shape):
            setattr(base, name, nn.Parameter(theirs.detach(), requires_grad=False))


def base_head_frozen(cfg: HeadTrainConfig) -> bool:
    """Whether IAV's W_b stays the LM's lm_head (`base_head` 'frozen', or 'auto' unresolved: the
    default reference is the run's own model); False for CALM, which has no W_b of its own."""
    return isinstance(cfg, IAVTrainConfig) and cfg.base_head != "trained"


def head_batches(cfg: HeadTrainConfig, reference_hidden: bool = False) -> tuple[BatchNeeds, bool]:
    """(cache columns read, whether batches carry token ids): IAV with `kl: topk` reads the
    cache's top-k, with `kl: sampled` also its tail draws; `features: cached` reads its hidden
    states and never runs the backbone; ``reference_hidden`` (IAV's `kl: exact` to another
    reference model) reads the hidden states as that model's, beside the features."""
    kl = cfg.kl if isinstance(cfg, IAVTrainConfig) else None
    if reference_hidden and kl != "exact":
        raise ValueError("only IAV's kl: exact reads another reference model's hidden states")
    needs = BatchNeeds(
        topk=kl in ("topk", "sampled"),
        hidden=cfg.features == "cached",
        reference_hidden=reference_hidden,
        tail=kl == "sampled",
    )
    return needs, cfg.features == "backbone"


def head_shape(cfg: HeadTrainConfig) -> dict[str, Any]:
    """The head constructor's size settings (CALM: rank, s_max, positions; IAV: none)."""
    if isinstance(cfg, CALMTrainConfig):
        return {"rank": cfg.rank, "s_max": cfg.s_max, "max_positions": cfg.max_positions}
    return {}


def head_features(cfg: HeadTrainConfig, backbone: nn.Module, with_context: bool, frozen: nn.Module):
    """batch -> (hidden ``(2B, R, H)`` in the LM output layer's dtype, token context or None)."""
    source = cached_features if cfg.features == "cached" else partial(backbone_features, backbone)
    dtype = frozen.weight.dtype

    def features(batch: PairBatch):
        hidden, ctx = source(batch, with_context)
        return hidden.to(dtype), ctx  # the frozen lm_head (CALM's base, exact KL) takes its own dtype

    return features


def head_weights(cfg: HeadTrainConfig) -> IAVWeights | CALMWeights:
    """The loss weights of a head's settings."""
    if isinstance(cfg, IAVTrainConfig):
        return IAVWeights(beta=cfg.beta, kl=cfg.lambda_kl, l2=cfg.lambda_l2)
    assert isinstance(cfg, CALMTrainConfig)
    return CALMWeights(beta=cfg.beta, l2=cfg.lambda_l2, var=cfg.lambda_var, ent=cfg.lambda_ent)


def head_objective(
    cfg: HeadTrainConfig,
    frozen: nn.Module,
    cap: float | None = None,
    chunk: int | None = None,
    kl_reference: KLReference | None = None,
) -> HeadObjective:
    """(head, scored tokens, batch) -> loss and per-token terms, chosen once per run (no per-step
    flags). ``cap``: the model's final-logit soft-cap (None: none), applied to every logit the
    loss sees (the policy, IAV's base head and the exact-KL reference, the frozen lm_head);
    ``chunk``: tokens per chunk (None: from the vocabulary). IAV's KL: the cache's top-k
    (`kl: topk`), the top-k and its tail draws (`kl: sampled`), or exactly (`kl: exact`) to the frozen lm_head, or to ``kl_reference`` (another
    reference model's output layer) over the hidden states the cache holds for it."""
    weights = head_weights(cfg)
    if isinstance(cfg, IAVTrainConfig):
        kl = iav_kl_estimate(cfg, frozen, cap, kl_reference)
        return partial(
            iav_chunked_objective, frozen=frozen, kl=kl, weights=weights, nll_weight=cfg.lambda_nll,
            cap=cap, chunk=chunk,
        )  # fmt: skip
    return partial(
        calm_chunked_objective,
        frozen=frozen,
        weights=weights,
        nll_weight=cfg.lambda_nll,
        cap=cap,
        chunk=chunk,
    )


def iav_kl_estimate(
    cfg: IAVTrainConfig, frozen: nn.Module, cap: float | None, kl_reference: KLReference | None
) -> Callable[[Tensor, ScoredTokens], Tensor]:
    """IAV's per-token KL to the reference (:data:`alignheads.models.objectives.KLEstimate`)."""
    if cfg.kl in ("topk", "sampled"):
        if kl_reference is not None:
            raise ValueError(f"kl: {cfg.kl} reads the reference from the cache: it takes no kl_reference")
        return topk_kl_per_token if cfg.kl == "topk" else sampled_kl_per_token
    if kl_reference is not None:
        return reference_kl_estimate(kl_reference.layer, kl_reference.cap)
    return exact_kl_estimate(frozen, cap)


def head_step_metrics(result: HeadStepLoss, batch: PairBatch) -> dict[str, float]:
    """TRL-named metrics of one micro-batch, plus the head's own (l2, IAV's kl, CALM's strength),
    from the loss and its per-token terms (no ``V``-sized tensor)."""
    loss_obj, terms, mask = result.loss, result.terms.detach(), batch.mask
    columns = CALM_TERMS if isinstance(loss_obj, CALMLoss) else IAV_TERMS
    logps = sequence_sums(terms[..., columns.index("logp")], mask)
    metrics = trl_metrics(loss_obj.loss, loss_obj.dpo, logps, batch.n_pairs) | {"l2": loss_obj.l2.item()}
    if hasattr(loss_obj, "kl"):
        metrics["kl"] = loss_obj.kl.item()
    if isinstance(loss_obj, CALMLoss):
        s = terms[..., columns.index("strength")][mask]
        metrics["strength/mean"] = s.mean().item()
        metrics["strength/std"] = s.std(unbiased=False).item()
    return metrics


def response_logits(model: nn.Module, batch: PairBatch) -> Tensor:
    """``(2B, R, V)`` logits of ``model`` at the positions predicting each response token: the
    backbone over the right-padded sequences, the output layer only at the gathered positions,
    then the model's own final-logit soft-cap (as its forward, and so its decoding, applies it)."""
    if batch.input_ids is None or batch.gather_index is None:
        raise ValueError("fine-tuning needs input_ids and gather_index in the batch")
    hidden = model.base_model(
        input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False
    ).last_hidden_state
    logits = model.get_output_embeddings()(gather_time(hidden, batch.gather_index))
    return soft_cap(logits, final_logit_cap(model)).float()


def disable_dropout(model: nn.Module) -> nn.Module:
    """Turn every dropout of ``model`` off in place, as TRL's trainers do by default
    (``disable_dropout=True``), so training mode changes nothing but what needs a gradient.

    Dropout modules get ``p = 0``; so do the float dropout rates attention layers apply
    functionally in training mode (transformers' ``attention_dropout``, ``dropout``, ...), which
    TRL's module-only switch misses. The model's config is left as it was (a saved checkpoint
    keeps its own settings).
    """
    from torch.nn.modules.dropout import _DropoutNd

    for module in model.modules():
        if isinstance(module, _DropoutNd):
            module.p = 0.0
        for name, value in list(vars(module).items()):
            if "dropout" in name and isinstance(value, float) and value:
                setattr(module, name, 0.0)
    return model


class LMTrainee(Trainee):
    """A whole copy of the LM (or its LoRA adapters) fine-tuned with a sequence-level objective."""

    needs = BatchNeeds(topk=False, hidden=False)
    with_sequences = True  # the LM itself runs over the token ids

    def __init__(
        self,
        objective,
        model: nn.Module,
        cfg: PreferenceTrainConfig,
        device: Any,
        kl_reference: KLReference | None = None,
    ) -> None:
        from alignheads.models.lora import trainable_lm

        if kl_reference is not None:  # a fine-tuned LM's objectives read the cache's log-probs only
            raise ValueError("a fine-tuned LM's training takes no kl_reference (only IAV's exact KL does)")

        self.dtype = next(model.parameters()).dtype  # the trained copy is saved in it
        # AdamW on half-precision weights would lose small updates
        model = model.float() if self.dtype != torch.float32 else model
        self.module, self._finish = trainable_lm(model, cfg)
        disable_dropout(self.module).to(device).train()
        if not any(p.requires_grad for p in self.module.parameters()):
            raise ValueError("no weight of the model requires a gradient: nothing to fine-tune")
        self.objective = partial(objective, beta=cfg.beta, nll=cfg.lambda_nll)

    def loss(self, module: nn.Module, batch: PairBatch) -> StepLoss:
        out = self.objective(response_logits(module, batch), batch)
        return StepLoss(out.loss, lambda: trl_metrics(out.loss, out.dpo, out.logps, batch.n_pairs))

    def eval_dpo(self, module: nn.Module, batch: PairBatch) -> DPOOutput:
        return self.objective(response_logits(module, batch), batch).dpo

    def finished(self) -> nn.Module:
        """The plain causal LM with what was learnt (LoRA adapters merged in), frozen, in eval mode."""
        model = self._finish()
        model.eval().requires_grad_(False)
        return model
