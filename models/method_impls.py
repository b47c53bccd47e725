"""What the method registry's entries do (`models.methods`): save, load, decode and score a
trained head or fine-tuned LM, and build each method's trainee. Kept apart from the registry
because all of it needs torch, while reading the registry (names, sections, settings, key rules)
must not: planning a run whose every stage is cached imports the registry and nothing else.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from alignheads.config import HeadTrainConfig, PreferenceTrainConfig
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
    KLReference,
    LMTrainee,
    head_batches,
    head_features,
    response_logits,
)

__all__ = [
    "Decode",
    "LoadedHead",
    "LoadedLM",
    "dera_load",
    "dpo_trainee",
    "genarm_load",
    "genarm_trainee",
    "head_batches",
    "head_decoder",
    "head_score",
    "head_trainee",
    "lm_batches",
    "lm_decoder",
    "lm_score",
    "load_head",
    "log_ratio_margins",
    "save_head",
    "save_lm",
]

# Decoding of a batch for the sampling loop (tasks.sampling): (input_ids (B, P), attention_mask
# (B, P), α per row (B,), seed per row [B]) -> (sequences (B, P + N), recorded {name: (B, N)}).
# Each row samples from its own seed (models.row_sampling), so rows of any α can share a batch.
Decode = Callable[[Tensor, Tensor, Tensor, list[int]], tuple[Tensor, dict[str, Tensor]]]


# --- heads ----------------------------------------------------------------------------------------


def save_head(trainee: HeadTrainee, directory: Path, model: nn.Module, training: dict) -> None:
    from alignheads.models.head_io import save_head as save_head_file

    save_head_file(trainee.module, directory, base_model=model, training=training)


@dataclass
class LoadedHead:
    """A trained head loaded for the base LM (not installed in it)."""

    head: LogitHead
    model: nn.Module


def load_head(directory: Path, model: nn.Module, source: dict) -> LoadedHead:
    from alignheads.models.head_io import load_head as load_head_file

    return LoadedHead(load_head_file(directory, model).eval(), model)


def head_decoder(loaded: LoadedHead, settings: dict[str, Any]):
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
def head_score(
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


def head_trainee(
    name: str, model: nn.Module, cfg: HeadTrainConfig, device: Any, kl_reference: KLReference | None = None
) -> HeadTrainee:
    return HeadTrainee(name, model, cfg, device, kl_reference=kl_reference)


# --- fine-tuned LMs -------------------------------------------------------------------------------


def save_lm(trainee: LMTrainee, directory: Path, model: nn.Module, training: dict) -> None:
    """The fine-tuned LM as a plain transformers checkpoint, in the dtype the LM was loaded in."""
    trainee.finished().to(trainee.dtype).save_pretrained(directory)


@dataclass
class LoadedLM:
    """The base LM and the fine-tuned LM side by side, with the combination rule."""

    base: nn.Module
    tuned: nn.Module
    combine: Callable[[Tensor, Tensor | None, float | Tensor], Tensor]  # (z_base, z_tuned or None, α)


def _load_lm(combine, directory: Path, model: nn.Module, source: dict) -> LoadedLM:
    """The fine-tuned copy saved in `directory`, loaded like the base (dtype, remote code) onto
    the base model's device."""
    from alignheads.loading import load_causal_lm

    trust = source.get("trust_remote_code", False)
    tuned = load_causal_lm(str(directory), None, source.get("dtype", "float32"), trust)
    return LoadedLM(model, tuned.to(next(model.parameters()).device), combine)


def lm_decoder(loaded: LoadedLM, settings: dict[str, Any]):
    """Decode base and tuned LM side by side (two KV caches), their logits combined at each
    row's α, each row sampling from its own seed."""
    from alignheads.models.guided import guided_decode
    from alignheads.models.row_sampling import seeded_decoding

    def decode(input_ids: Tensor, mask: Tensor, alphas: Tensor, seeds: list[int]):
        out = guided_decode(
            loaded.base, loaded.tuned, input_ids, mask, loaded.combine, alphas, **seeded_decoding(settings, seeds)
        )
        return out.sequences, {"kl_to_base": out.kl_to_base}

    return decode, lambda: None


@torch.no_grad()
def lm_score(
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


genarm_load = partial(_load_lm, genarm_logits)  # (directory, base model, source) -> LoadedLM
dera_load = partial(_load_lm, dera_logits)
genarm_trainee = partial(LMTrainee, reward_lm_objective)  # (frozen LM, settings, device) -> LMTrainee
dpo_trainee = partial(LMTrainee, dpo_objective)


def lm_batches(cfg: PreferenceTrainConfig, reference_hidden: bool = False) -> tuple[BatchNeeds, bool]:
    """A fine-tuned LM reads token ids only: no top-k, no hidden states from the cache."""
    if reference_hidden:
        raise ValueError(
            "a fine-tuned LM's training reads no reference hidden states (only IAV's exact KL does)"
        )
    return BatchNeeds(topk=False, hidden=False), True
