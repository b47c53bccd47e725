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

The table itself is plain data and imports no torch: each entry's callables import
`models.method_impls`, where they are implemented, on their first call, so that a run can plan
(names, sections, settings, key rules) without loading the model libraries.

Two families share the table:

* **heads** (IAV, CALM): a small trained output layer over the frozen LM; decoding installs it
  as the LM's output layer (`AlignedLM`): one LM forward per token.
* **fine-tuned LMs** (GenARM, DPO + DeRa): a whole copy of the LM (or LoRA adapters merged into
  one); decoding runs base and tuned LM side by side and combines their logits at α
  (`guided_decode`): two LM forwards per token.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

from alignheads.config import (
    CALMTrainConfig,
    DPOTrainConfig,
    GenARMTrainConfig,
    HeadTrainConfig,
    IAVTrainConfig,
    PreferenceTrainConfig,
    TrainConfig,
)

__all__ = ["METHODS", "Method", "enabled_methods", "method"]


def _impl(name: str) -> Callable[..., Any]:
    """`models.method_impls.<name>`, imported on the first call. Reading an entry (its name,
    section, settings, key rules) then needs no torch: a re-run whose stages are all cached plans
    with the registry and computes nothing (2 s of torch's import saved)."""

    def call(*args: Any, **kwargs: Any) -> Any:
        return getattr(importlib.import_module("alignheads.models.method_impls"), name)(*args, **kwargs)

    call.__name__ = call.__qualname__ = name
    return call


@dataclass(frozen=True)
class Method:
    """One method of the registry (see the module docstring); the callables' implementations are
    in `models.method_impls`."""

    name: str  # as in the sweep's `head` column and the train manifest's `kind`
    section: str  # its settings: `train.<section>` of the run config
    settings: type[PreferenceTrainConfig]
    saved_as: str  # subdirectory of the train artifact holding the trained result
    lm_forwards_per_token: int  # decoding cost
    # (settings, reference_hidden=False) -> (cache columns: BatchNeeds, token ids?); reference_hidden:
    # also another reference model's cached hidden states (IAV's exact KL to it)
    batches: Callable[..., tuple[Any, bool]]
    trainee: Callable[..., Any]  # (frozen LM, settings, device, kl_reference=None) -> Trainee
    save: Callable[..., None]  # (trainee, directory, base model, training info) -> None
    load: Callable[..., Any]  # (directory, base model, model source) -> loaded
    decoder: Callable[..., tuple[Any, Callable[[], None]]]  # (loaded, decoding) -> (Decode, done)
    # (loaded, batch, alphas, settings) -> {α: unscaled log-ratio margins (B,)} (module docstring)
    score: Callable[..., dict[float, Any]]
    key_excludes: Callable[[PreferenceTrainConfig], set[str]]  # settings that do not change the result

    def settings_of(self, train: TrainConfig) -> PreferenceTrainConfig:
        return getattr(train, self.section)


_WATCHING = {"enabled", "resume", "eval_every", "checkpoint_every", "num_processes"}


def _head_method(name: str, settings: type[HeadTrainConfig]) -> Method:
    return Method(
        name=name,
        section=name,
        settings=settings,
        saved_as="head",
        lm_forwards_per_token=1,
        batches=_impl("head_batches"),
        trainee=partial(_impl("head_trainee"), name),
        save=_impl("save_head"),
        load=_impl("load_head"),
        decoder=_impl("head_decoder"),
        score=_impl("head_score"),
        key_excludes=lambda cfg: _WATCHING,
    )


def _lm_key_excludes(cfg: PreferenceTrainConfig) -> set[str]:
    # LoRA settings are part of the key only when LoRA is on (a full fine-tune ignores them)
    lora = {"lora_rank", "lora_alpha", "lora_targets"} if cfg.lora_rank is None else set()
    return {"enabled", "eval_every", "resume", "checkpoint_every", "num_processes"} | lora


def _lm_method(name: str, section: str, settings, trainee: str, load: str) -> Method:
    return Method(
        name=name,
        section=section,
        settings=settings,
        saved_as="model",
        lm_forwards_per_token=2,
        batches=_impl("lm_batches"),
        trainee=_impl(trainee),
        save=_impl("save_lm"),
        load=_impl(load),
        decoder=_impl("lm_decoder"),
        score=_impl("lm_score"),
        key_excludes=_lm_key_excludes,
    )


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        _head_method("iav", IAVTrainConfig),
        _head_method("calm", CALMTrainConfig),
        # GenARM: a reward LM (loss -log σ(β (log π_r(y_w) − log π_r(y_l)))), decoded with genarm_logits
        _lm_method("genarm", "genarm", GenARMTrainConfig, "genarm_trainee", "genarm_load"),
        # DPO + DeRa: the LM fine-tuned with DPO, decoded with dera_logits
        _lm_method("dpo-dera", "dpo", DPOTrainConfig, "dpo_trainee", "dera_load"),
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
