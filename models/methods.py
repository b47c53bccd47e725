"""The method registry: IAV, CALM, GenARM and DPO + DeRa, one entry each.

An entry says how its method trains (what it builds from the frozen LM, its loss, what it reads
from the reference cache), how the trained result is saved and loaded, how it decodes at a given
α, how its held-out implicit reward is scored at each α, and which `train:` section of the run
config it owns. The train, generate and evaluate stages serve every method through this table:
adding a method is adding one entry to `METHODS`.

Held-out scoring (`Method.score`) has one definition for every method: the margin of the
unscaled log-ratio implicit reward, ``(log π_α(y_w) − log π_ref(y_w)) − (log π_α(y_l) −
log π_ref(y_l))``, with π_α what the method decodes at α (soft-capped like the model's own
forward) and π_ref the cache's reference; `losses.preference_accuracy` then counts a margin
within its 1e-4 tie threshold as half. The margin is not scaled by the method's β, so the tie
threshold means the same (the policy equals its reference up to rounding) whatever β a method
trained with, and GenARM's reward-LM β (which has nothing to do with its decoding distribution)
plays no part.

Two families share the table:

* **heads** (IAV, CALM): a small trained output layer over the frozen LM; decoding installs it
  as the LM's output layer (`AlignedLM`): one LM forward per token.
* **fine-tuned LMs** (GenARM, DPO + DeRa): a whole copy of the LM (or LoRA adapters merged into
  one); decoding runs base and tuned LM side by side and combines their logits at α
  (`guided_decode`): two LM forwards per token.
"""

from __future__ import annotations

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
from alignheads.models.genarm import genarm_logits
from alignheads.models.head_base import LogitHead, final_logit_cap, lm_output_layer, soft_cap
from alignheads.models.objectives import (
    BatchNeeds,
    PairBatch,
    dpo_objective,
    response_logps,
    reward_lm_objective,
)
from alignheads.models.trainees import (
    HeadTrainee,
    LMTrainee,
    Trainee,
    head_batches,
    head_features,
    response_logits,
)

__all__ = ["METHODS", "Method", "enabled_methods", "method"]

# Decoding of a batch for the sampling loop (tasks.sampling): (input_ids (B, P), attention_mask
# (B, P), α per row (B,), seed per row [B]) -> (sequences (B, P + N), recorded {name: (B, N)}).
# Each row samples from its own seed (models.row_sampling), so rows of any α can share a batch.
Decode = Callable[[Tensor, Tensor, Tensor, list[int]], tuple[Tensor, dict[str, Tensor]]]


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
    decoder: Callable[..., tuple[Decode, Callable[[], None]]]  # (loaded, decoding) -> (decode, done)
    # (loaded, batch, alphas, settings) -> {α: unscaled log-ratio margins (B,)} (module docstring)
    score: Callable[..., dict[float, Tensor]]
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


def _head_decoder(loaded: LoadedHead, settings: dict[str, Any]):
    """Decode with the head installed as the LM's output layer, one α per row (per-token KL to
    the base and the head's statistics recorded), through transformers' `generate` with the
    model's own generation defaults set aside: decoding follows `settings` only."""
    from contextlib import ExitStack

    from alignheads.models.aligned import AlignedLM, plain_generation_config
    from alignheads.models.row_sampling import seeded_decoding

    aligned = AlignedLM(loaded.model, loaded.head, alpha=0.0)
    stack = ExitStack()
    stack.callback(aligned.remove)
    stack.enter_context(plain_generation_config(loaded.model))

    def decode(input_ids: Tensor, mask: Tensor, alphas: Tensor, seeds: list[int]):
        with aligned.recording() as recorder:
            out = aligned.generate(input_ids, attention_mask=mask, alpha=alphas, **seeded_decoding(settings, seeds))
        return out, recorder.stacked()

    return decode, stack.close


def log_ratio_margins(logps: Tensor, batch: PairBatch) -> Tensor:
    """``(B,)`` margins of the unscaled log-ratio implicit reward from the policy's summed response
    log-probs ``(2B,)`` (chosen rows first) and the batch's cached reference: the one held-out
    score of every method (module docstring)."""
    rewards = logps.double() - batch.ref_logps.double()
    b = batch.n_pairs
    return rewards[:b] - rewards[b:]


@torch.no_grad()
def _head_score(
    loaded: LoadedHead, batch: PairBatch, alphas: list[float], cfg: HeadTrainConfig
) -> dict[float, Tensor]:
    """Margins ``(B,)`` of ``log π_α(y) − log π_ref(y)`` at each α, π_α the head's soft-capped
    decoding distribution, the reference from the cache (not scaled by β: module docstring)."""
    frozen = lm_output_layer(loaded.model)
    cap = final_logit_cap(loaded.model)
    features = head_features(cfg, loaded.model.base_model, loaded.head.needs_token_context, frozen)
    hidden, ctx = features(batch)
    out = loaded.head(hidden, frozen_head=frozen, context=ctx)
    return {
        alpha: log_ratio_margins(response_logps(soft_cap(out.logits(alpha), cap), batch), batch)
        for alpha in alphas
    }


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


def _lm_decoder(loaded: LoadedLM, settings: dict[str, Any]):
    """Decode base and tuned LM side by side (two KV caches), their logits combined at each
    row's α, each row sampling from its own seed."""
    from alignheads.models.guided import guided_decode
    from alignheads.models.row_sampling import seeded_decoding

    def decode(input_ids: Tensor, mask: Tensor, alphas: Tensor, seeds: list[int]):
        combine = partial(loaded.combine, alpha=alphas.to(input_ids.device)[:, None])
        out = guided_decode(loaded.base, loaded.tuned, input_ids, mask, combine, **seeded_decoding(settings, seeds))
        return out.sequences, {"kl_to_base": out.kl_to_base}

    return decode, lambda: None


@torch.no_grad()
def _lm_score(
    loaded: LoadedLM, batch: PairBatch, alphas: list[float], cfg: Any = None
) -> dict[float, Tensor]:
    """Margins ``(B,)`` of ``log π_α(y) − log π_ref(y)``, π_α the combined decoding distribution
    (of the two models' soft-capped logits), not scaled by β (module docstring); α = 0 is the
    base itself: its margins are rounding noise, ties that count as half."""
    z_base, z_tuned = response_logits(loaded.base, batch), response_logits(loaded.tuned, batch)
    return {
        alpha: log_ratio_margins(response_logps(loaded.combine(z_base, z_tuned, alpha), batch), batch)
        for alpha in alphas
    }


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
