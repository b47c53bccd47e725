"""The method registry: IAV, CALM, GenARM and DPO + DeRa, one entry each.

An entry says how its method trains (what it builds from the frozen LM, its loss, what it reads
from the reference cache), how the trained result is saved and loaded, how it decodes at a given
α, how its held-out implicit reward is scored at each α, and which `train:` section of the run
config it owns. The train, generate and evaluate stages serve every method through this table:
adding a method is adding one entry to `METHODS`.

Two families share the table:

* **heads** (IAV, CALM): a small trained output layer over the frozen LM; decoding installs it
  as the LM's output layer (`AlignedLM`): one LM forward per token.
* **fine-tuned LMs** (GenARM, DPO + DeRa): a whole copy of the LM (or LoRA adapters merged into
  one); decoding runs base and tuned LM side by side and combines their logits at α
  (`guided_decode`): two LM forwards per token.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from alignheads.config import (
    CALMTrainConfig,
    DPOTrainConfig,
    GenARMTrainConfig,
    HeadTrainConfig,
    IAVTrainConfig,
    PreferenceTrainConfig,
    TrainConfig,
)
from alignheads.models.dera import dera_logits
from alignheads.models.features import backbone_features, cached_features, gather_time
from alignheads.models.genarm import genarm_logits
from alignheads.models.head_base import LogitHead, SteeringOutput, lm_output_layer
from alignheads.models.losses import CALMWeights, DPOOutput, IAVWeights, dpo_loss
from alignheads.models.objectives import (
    BatchNeeds,
    PairBatch,
    calm_objective,
    dpo_objective,
    exact_kl_per_token,
    iav_objective,
    response_logps,
    reward_lm_objective,
    topk_kl_per_token,
)
from alignheads.models.registry import new_head

__all__ = [
    "METHODS",
    "Method",
    "StepLoss",
    "Trainee",
    "enabled_methods",
    "method",
    "trl_metrics",
]

# Decoding of a batch for the common-random-numbers sampling loop:
# (input_ids (B, P), attention_mask (B, P)) -> (sequences (B, P + N), recorded {name: (B, N)})
Decode = Callable[[Tensor, Tensor], tuple[Tensor, dict[str, Tensor]]]


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

    `module` is what the optimizer, `accelerate.prepare` and checkpoints see; `loss` and
    `eval_dpo` take the (possibly wrapped) module to call, so multi-process gradient sync works.
    """

    module: nn.Module
    needs: BatchNeeds
    with_sequences: bool  # whether batches carry token ids for a backbone forward

    @abstractmethod
    def loss(self, module: nn.Module, batch: PairBatch) -> StepLoss: ...

    @abstractmethod
    def eval_dpo(self, module: nn.Module, batch: PairBatch) -> DPOOutput:
        """The held-out pairs' implicit rewards and margins at α = 1 (the training objective's)."""


class HeadTrainee(Trainee):
    """A logit head over the frozen LM: features from the backbone (or the cache), frozen lm_head."""

    def __init__(self, kind: str, model: nn.Module, cfg: HeadTrainConfig, device: Any) -> None:
        model.requires_grad_(False)
        model.to(device)
        self.model, self.cfg = model, cfg
        self.frozen = lm_output_layer(model)
        # heads train in float32 whatever the LM's dtype: they are the master weights AdamW
        # updates (bf16 would lose small updates); `mixed_precision: bf16` autocasts the compute
        torch.manual_seed(cfg.seed)  # every process starts from the same weights
        self.module = new_head(kind, model, dtype=torch.float32, **head_shape(cfg)).to(device)
        self.needs, self.with_sequences = head_batches(cfg)
        self.features = head_features(cfg, model.base_model, self.module.needs_token_context, self.frozen)
        self.objective = head_objective(cfg, self.frozen)

    def loss(self, module: nn.Module, batch: PairBatch) -> StepLoss:
        hidden, ctx = self.features(batch)
        out = module(hidden, frozen_head=self.frozen, context=ctx)
        loss_obj = self.objective(out, batch, hidden)
        return StepLoss(loss_obj.loss, lambda: head_step_metrics(loss_obj, out, batch))

    def eval_dpo(self, module: nn.Module, batch: PairBatch, alpha: float = 1.0) -> DPOOutput:
        hidden, ctx = self.features(batch)
        out = module(hidden, frozen_head=self.frozen, context=ctx)
        logps = response_logps(out.logits(alpha), batch)
        b = batch.n_pairs
        return dpo_loss(logps[:b], logps[b:], batch.ref_logps[:b], batch.ref_logps[b:], self.cfg.beta)


def head_batches(cfg: HeadTrainConfig) -> tuple[BatchNeeds, bool]:
    """(cache columns read, whether batches carry token ids): IAV with `kl: topk` reads the
    cache's top-k; `features: cached` reads its hidden states and never runs the backbone."""
    topk = isinstance(cfg, IAVTrainConfig) and cfg.kl == "topk"
    return BatchNeeds(topk=topk, hidden=cfg.features == "cached"), cfg.features == "backbone"


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


def head_objective(cfg: HeadTrainConfig, frozen: nn.Module):
    """(head output, batch, hidden) -> loss object, chosen once per run (no per-step flags)."""
    if isinstance(cfg, IAVTrainConfig):
        weights = IAVWeights(beta=cfg.beta, kl=cfg.lambda_kl, l2=cfg.lambda_l2)
        if cfg.kl == "exact":

            def iav_exact(out, batch, hidden):
                with torch.no_grad():
                    ref_logits = frozen(hidden)
                kl = exact_kl_per_token(out.base_logits, ref_logits)
                return iav_objective(out, batch, kl, weights, cfg.lambda_nll)

            return iav_exact
        return lambda out, batch, hidden: iav_objective(
            out, batch, topk_kl_per_token(out.base_logits, batch), weights, cfg.lambda_nll
        )
    assert isinstance(cfg, CALMTrainConfig)
    weights = CALMWeights(beta=cfg.beta, l2=cfg.lambda_l2, var=cfg.lambda_var, ent=cfg.lambda_ent)
    return lambda out, batch, hidden: calm_objective(out, batch, weights, cfg.lambda_nll)


def head_step_metrics(loss_obj: Any, out: SteeringOutput, batch: PairBatch) -> dict[str, float]:
    """TRL-named metrics of one micro-batch, plus the head's own (l2, IAV's kl, CALM's strength)."""
    logps = response_logps(out.logits(1.0).detach(), batch)
    metrics = trl_metrics(loss_obj.loss, loss_obj.dpo, logps, batch.n_pairs) | {"l2": loss_obj.l2.item()}
    if hasattr(loss_obj, "kl"):
        metrics["kl"] = loss_obj.kl.item()
    if hasattr(out, "strength"):
        s = out.strength.detach()[batch.mask].float()
        metrics["strength/mean"] = s.mean().item()
        metrics["strength/std"] = s.std(unbiased=False).item()
    return metrics


def response_logits(model: nn.Module, batch: PairBatch) -> Tensor:
    """``(2B, R, V)`` logits of ``model`` at the positions predicting each response token: the
    backbone over the right-padded sequences, the output layer only at the gathered positions."""
    if batch.input_ids is None or batch.gather_index is None:
        raise ValueError("fine-tuning needs input_ids and gather_index in the batch")
    hidden = model.base_model(
        input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False
    ).last_hidden_state
    return model.get_output_embeddings()(gather_time(hidden, batch.gather_index)).float()


class LMTrainee(Trainee):
    """A whole copy of the LM (or its LoRA adapters) fine-tuned with a sequence-level objective."""

    needs = BatchNeeds(topk=False, hidden=False)
    with_sequences = True  # the LM itself runs over the token ids

    def __init__(self, objective, model: nn.Module, cfg: PreferenceTrainConfig, device: Any) -> None:
        from alignheads.models.lora import trainable_lm

        self.dtype = next(model.parameters()).dtype  # the trained copy is saved in it
        # AdamW on half-precision weights would lose small updates
        model = model.float() if self.dtype != torch.float32 else model
        self.module, self._finish = trainable_lm(model, cfg)
        self.module.to(device).train()
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


@dataclass(frozen=True)
class Method:
    """One method of the registry (see the module docstring)."""

    name: str  # as in the sweep's `head` column and the train manifest's `kind`
    section: str  # its settings: `train.<section>` of the run config
    settings: type[PreferenceTrainConfig]
    saved_as: str  # subdirectory of the train artifact holding the trained result
    lm_forwards_per_token: int  # decoding cost
    batches: Callable[[PreferenceTrainConfig], tuple[BatchNeeds, bool]]  # (cache columns, token ids?)
    trainee: Callable[[nn.Module, PreferenceTrainConfig, Any], Trainee]  # (frozen LM, settings, device)
    save: Callable[..., None]  # (trainee, directory, base model, training info) -> None
    load: Callable[..., Any]  # (directory, base model, model source) -> loaded
    decoder: Callable[..., tuple[Decode, Callable[[], None]]]  # (loaded, α, decoding) -> (decode, done)
    score: Callable[..., dict[float, Tensor]]  # (loaded, batch, alphas, settings) -> {α: margins (B,)}
    key_excludes: Callable[[PreferenceTrainConfig], set[str]]  # settings that do not change the result

    def settings_of(self, train: TrainConfig) -> PreferenceTrainConfig:
        return getattr(train, self.section)


# --- heads ----------------------------------------------------------------------------------------

_WATCHING = {"enabled", "resume", "eval_every", "checkpoint_every", "num_processes"}


def _save_head(trainee: HeadTrainee, directory: Path, model: nn.Module, training: dict) -> None:
    from alignheads.models.head_io import save_head

    save_head(trainee.module, directory, base_model=model, training=training)


@dataclass
class LoadedHead:
    """A trained head loaded for the base LM (not installed in it)."""

    head: LogitHead
    model: nn.Module


def _load_head(directory: Path, model: nn.Module, source: dict) -> LoadedHead:
    from alignheads.models.head_io import load_head

    return LoadedHead(load_head(directory, model).eval(), model)


def _head_decoder(loaded: LoadedHead, alpha: float, settings: dict[str, Any]):
    """Decode with the head installed as the LM's output layer at α (per-token KL to the base
    and the head's statistics recorded) through transformers' `generate`, whose own
    `generation_config.json` defaults (top-k, repetition penalty, ...) are set aside meanwhile:
    decoding follows `settings` only (top-k off; temperature and top-p only when sampling)."""
    from transformers import GenerationConfig

    from alignheads.models.aligned import AlignedLM

    hf = {k: v for k, v in settings.items() if settings["do_sample"] or k not in ("temperature", "top_p")}
    hf["top_k"] = 0
    aligned = AlignedLM(loaded.model, loaded.head, alpha=alpha)
    previous, loaded.model.generation_config = loaded.model.generation_config, GenerationConfig()

    def decode(input_ids: Tensor, mask: Tensor):
        with aligned.recording() as recorder:
            out = aligned.generate(input_ids, attention_mask=mask, alpha=alpha, **hf)
        return out, recorder.stacked()

    def done() -> None:
        loaded.model.generation_config = previous
        aligned.remove()

    return decode, done


@torch.no_grad()
def _head_score(
    loaded: LoadedHead, batch: PairBatch, alphas: list[float], cfg: HeadTrainConfig
) -> dict[float, Tensor]:
    """DPO margins ``(B,)`` of the implicit reward at each α (the reference from the cache)."""
    frozen = lm_output_layer(loaded.model)
    features = head_features(cfg, loaded.model.base_model, loaded.head.needs_token_context, frozen)
    hidden, ctx = features(batch)
    out = loaded.head(hidden, frozen_head=frozen, context=ctx)
    b = batch.n_pairs
    margins = {}
    for alpha in alphas:
        logps = response_logps(out.logits(alpha), batch)
        margins[alpha] = dpo_loss(
            logps[:b], logps[b:], batch.ref_logps[:b], batch.ref_logps[b:], cfg.beta
        ).margins
    return margins


def _head_method(name: str, settings: type[HeadTrainConfig]) -> Method:
    return Method(
        name=name,
        section=name,
        settings=settings,
        saved_as="head",
        lm_forwards_per_token=1,
        batches=head_batches,
        trainee=partial(HeadTrainee, name),
        save=_save_head,
        load=_load_head,
        decoder=_head_decoder,
        score=_head_score,
        key_excludes=lambda cfg: _WATCHING,
    )


# --- fine-tuned LMs -------------------------------------------------------------------------------


def _save_lm(trainee: LMTrainee, directory: Path, model: nn.Module, training: dict) -> None:
    """The fine-tuned LM as a plain transformers checkpoint, in the dtype the LM was loaded in."""
    trainee.finished().to(trainee.dtype).save_pretrained(directory)


@dataclass
class LoadedLM:
    """The base LM and the fine-tuned LM side by side, with the combination rule."""

    base: nn.Module
    tuned: nn.Module
    combine: Callable[[Tensor, Tensor, float], Tensor]


def _load_lm(combine, directory: Path, model: nn.Module, source: dict) -> LoadedLM:
    """The fine-tuned copy saved in `directory`, loaded like the base (dtype, remote code) onto
    the base model's device."""
    from alignheads.loading import load_causal_lm

    trust = source.get("trust_remote_code", False)
    tuned = load_causal_lm(str(directory), None, source.get("dtype", "float32"), trust)
    return LoadedLM(model, tuned.to(next(model.parameters()).device), combine)


def _lm_decoder(loaded: LoadedLM, alpha: float, settings: dict[str, Any]):
    """Decode base and tuned LM side by side (two KV caches), their logits combined at α."""
    from alignheads.models.guided import guided_decode

    combine = partial(loaded.combine, alpha=alpha)

    def decode(input_ids: Tensor, mask: Tensor):
        out = guided_decode(loaded.base, loaded.tuned, input_ids, mask, combine, **settings)
        return out.sequences, {"kl_to_base": out.kl_to_base}

    return decode, lambda: None


@torch.no_grad()
def _lm_score(
    loaded: LoadedLM, batch: PairBatch, alphas: list[float], cfg: Any = None
) -> dict[float, Tensor]:
    """Margins ``(B,)`` of ``log π_α(y) − log π_ref(y)``, π_α the combined decoding distribution
    (α = 0 is the base itself: its margins are rounding noise, ties that count as half)."""
    z_base, z_tuned = response_logits(loaded.base, batch), response_logits(loaded.tuned, batch)
    b = batch.n_pairs
    margins = {}
    for alpha in alphas:
        rewards = response_logps(loaded.combine(z_base, z_tuned, alpha), batch) - batch.ref_logps
        margins[alpha] = rewards[:b] - rewards[b:]
    return margins


def _lm_key_excludes(cfg: PreferenceTrainConfig) -> set[str]:
    # LoRA settings are part of the key only when LoRA is on (a full fine-tune ignores them)
    lora = {"lora_rank", "lora_alpha", "lora_targets"} if cfg.lora_rank is None else set()
    return {"enabled", "eval_every", "resume", "checkpoint_every", "num_processes"} | lora


def _lm_method(name: str, section: str, settings, objective, combine) -> Method:
    return Method(
        name=name,
        section=section,
        settings=settings,
        saved_as="model",
        lm_forwards_per_token=2,
        batches=lambda cfg: (BatchNeeds(topk=False, hidden=False), True),
        trainee=partial(LMTrainee, objective),
        save=_save_lm,
        load=partial(_load_lm, combine),
        decoder=_lm_decoder,
        score=_lm_score,
        key_excludes=_lm_key_excludes,
    )


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        _head_method("iav", IAVTrainConfig),
        _head_method("calm", CALMTrainConfig),
        _lm_method("genarm", "genarm", GenARMTrainConfig, reward_lm_objective, genarm_logits),
        _lm_method("dpo-dera", "dpo", DPOTrainConfig, dpo_objective, dera_logits),
    )
}


def method(name: str) -> Method:
    """The registry entry called ``name``; ValueError naming the known ones otherwise."""
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r} (known: {', '.join(METHODS)})") from None


def enabled_methods(train: TrainConfig) -> list[tuple[Method, PreferenceTrainConfig]]:
    """The methods whose `train.<section>.enabled` is set, in registry order, with their settings."""
    return [(m, m.settings_of(train)) for m in METHODS.values() if m.settings_of(train).enabled]
