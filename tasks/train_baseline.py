"""Baseline stage: a whole copy of the LM fine-tuned on the preference pairs, for the comparison.

Two baselines, named as they appear in the sweep's `head` column:

- `genarm`: GenARM's autoregressive reward LM (reference-free loss); decoded with the base as
  ``π_base · π_r^α`` (`alignheads.models.genarm`);
- `dpo-dera`: the LM fine-tuned with DPO against the cached reference log-probs; decoded with
  the base as ``(1 − α) z_ref + α z_dpo`` (`alignheads.models.dera`).

Keyed like the heads' train stage: key = hash(baseline name + training settings, the reference
cache's key (which covers model, tokenizer and data), format version). The artifact
`<store>/baseline/<key>/` holds `model/` (transformers `save_pretrained`: config.json +
model.safetensors, no pickle) and the `train_metrics` table.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from alignheads.config import BaselineTrainConfig, DPOTrainConfig, GenARMTrainConfig
from alignheads.models import baseline_objectives as baseline_objective
from alignheads.models.dera import dera_logits
from alignheads.models.genarm import genarm_logits
from alignheads.models.losses import preference_accuracy
from alignheads.storage.artifacts import ArtifactContent, ArtifactResult, ensure_artifact
from alignheads.storage.fingerprint import artifact_key
from alignheads.storage.manifest import read_manifest
from alignheads.storage.tables import write_table
from alignheads.tasks.train import metrics_table

STAGE = "baseline"
BASELINE_VERSION = 1
MODEL_SUBDIR = "model"
# settings that change how a run is watched, not what it computes
_NOT_IN_KEY = {"enabled", "eval_every"}

# baseline name -> (section of the `train:` config, its settings class)
SECTIONS: dict[str, tuple[str, type[BaselineTrainConfig]]] = {
    "genarm": ("genarm", GenARMTrainConfig),
    "dpo-dera": ("dpo", DPOTrainConfig),
}
# baseline name -> its training objective (logits, batch, beta, nll) -> BaselineLoss
OBJECTIVES = {
    "genarm": baseline_objective.reward_lm_objective,
    "dpo-dera": baseline_objective.dpo_objective,
}
# baseline name -> how its decoder combines (base logits, fine-tuned LM logits, α)
COMBINE: dict[str, Callable[[Tensor, Tensor, float], Tensor]] = {
    "genarm": genarm_logits,
    "dpo-dera": dera_logits,
}


@dataclass(frozen=True)
class BaselinePlan:
    """One baseline's training inputs, resolved, with the artifact key they hash to (JSON-able)."""

    key: str
    kind: str
    train: dict
    refpass_path: str
    tokenize_path: str
    model: dict
    config: dict
    inputs: dict[str, str]

    @property
    def train_config(self) -> BaselineTrainConfig:
        return SECTIONS[self.kind][1].model_validate(self.train)


def plan_baseline(
    kind: str, cfg: BaselineTrainConfig, refpass_path: str | Path, model: dict[str, Any]
) -> BaselinePlan:
    """Key = hash(baseline name + training settings, the reference cache's key, version).
    `model`: name_or_path, revision, dtype, trust_remote_code of the run's model."""
    if kind not in SECTIONS:
        raise ValueError(f"unknown baseline {kind!r} (known: {', '.join(SECTIONS)})")
    refpass = read_manifest(Path(refpass_path), "refpass")
    # LoRA settings are part of the key only when LoRA is on (a full fine-tune ignores them)
    unused = {"lora_rank", "lora_alpha", "lora_targets"} if cfg.lora_rank is None else set()
    config = {"kind": kind, **cfg.model_dump(mode="json", exclude=_NOT_IN_KEY | unused)}
    inputs = {"refpass": refpass.key}
    return BaselinePlan(
        key=artifact_key(STAGE, config, inputs, BASELINE_VERSION),
        kind=kind,
        train=cfg.model_dump(mode="json"),
        refpass_path=str(refpass_path),
        tokenize_path=str(Path(refpass_path).parent.parent / "tokenize" / refpass.inputs["tokenize"]),
        model=dict(model),
        config=config,
        inputs=inputs,
    )


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _streams(plan: BaselinePlan):
    from alignheads.tasks.training.batches import BatchNeeds, PairStream

    needs = BatchNeeds(topk=False, hidden=False)
    refpass, tokenized = Path(plan.refpass_path), Path(plan.tokenize_path)
    return PairStream(refpass, tokenized, "train", needs), PairStream(refpass, tokenized, "test", needs)


def _load(plan: BaselinePlan, path: str | None = None):
    """(model, pad id): the run's model (or the fine-tuned one at `path`) and the tokenizer's pad."""
    from alignheads.loading import load_causal_lm, load_tokenizer

    m = plan.model
    source = (m["name_or_path"], m.get("revision"))
    trust = m.get("trust_remote_code", False)
    model = load_causal_lm(path or source[0], None if path else source[1], m.get("dtype", "float32"), trust)
    tok = load_tokenizer(*source, trust)
    return model.to(_device()), tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id


def objective_of(plan: BaselinePlan):
    """(logits, batch) -> BaselineLoss for this plan's baseline and settings."""
    cfg = plan.train_config
    return partial(OBJECTIVES[plan.kind], beta=cfg.beta, nll=cfg.lambda_nll)


def run_baseline(store: Path, plan: BaselinePlan, log=None, progress: bool = True) -> ArtifactResult:
    """Fine-tune the baseline's LM unless the artifact is complete."""
    from alignheads.tasks.training.finetune import as_float32, finetune_lm
    from alignheads.tasks.training.lora import trainable_lm

    def build(staging: Path) -> ArtifactContent:
        model, pad_id = _load(plan)
        dtype = next(model.parameters()).dtype
        trained, finish = trainable_lm(as_float32(model), plan.train_config)
        train, test = _streams(plan)
        result = finetune_lm(
            trained, train, test, plan.train_config, objective_of(plan), pad_id,
            log=log, progress=progress, desc=f"training {plan.kind}",
        )  # fmt: skip
        finish().to(dtype).save_pretrained(staging / MODEL_SUBDIR)
        history = result.history
        if result.eval_metrics:
            history = history + [result.eval_metrics | {"step": float(result.steps)}]
        info = {
            "kind": plan.kind,
            "steps": result.steps,
            "final": result.final_metrics,
            "eval": result.eval_metrics,
        }
        table = write_table(metrics_table(history), staging, "train_metrics")
        return ArtifactContent(tables={"train_metrics": table}, info=info)

    return ensure_artifact(store, STAGE, plan.key, BASELINE_VERSION, plan.config, plan.inputs, build)


@torch.no_grad()
def preference_accuracy_by_alpha(
    plan: BaselinePlan, model_dir: Path, alphas: list[float]
) -> dict[str, float]:
    """Held-out preference accuracy at each α (keys `str(float(α))`) of the implicit reward
    ``log π_α(y) − log π_ref(y)``, π_α the baseline's combined decoding distribution and the
    reference from the cache (α = 0 is the base itself: its margins are rounding noise, ties
    that count as half)."""
    from alignheads.models.objectives import response_logps
    from alignheads.tasks.training.batches import collate
    from alignheads.tasks.training.finetune import response_logits

    base, pad_id = _load(plan)
    tuned, _ = _load(plan, str(model_dir))
    _, test = _streams(plan)
    combine = COMBINE[plan.kind]
    device = next(base.parameters()).device
    margins = {float(a): [] for a in alphas}
    for _, records in test.micro_batches(plan.train_config.batch_size, seed=None, drop_last=False):
        batch = collate(records, test.needs, True, pad_id).to(device)
        z_base, z_tuned = response_logits(base, batch), response_logits(tuned, batch)
        b = batch.n_pairs
        for alpha in margins:
            rewards = response_logps(combine(z_base, z_tuned, alpha), batch) - batch.ref_logps
            margins[alpha].append(rewards[:b] - rewards[b:])
    return {str(a): preference_accuracy(torch.cat(m)) if m else float("nan") for a, m in margins.items()}
