"""Training settings for the heads and the baselines (the `train:` section of a run config)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class PreferenceTrainConfig(_Section):
    """What every method trained on the preference pairs shares: batching, optimizer, schedule,
    evaluation and the preference loss's β and NLL anchor."""

    batch_size: int = Field(
        8, gt=0, description="Pairs per optimizer step, over all processes and accumulation"
    )
    grad_accum: int = Field(1, gt=0, description="Micro-batches accumulated per optimizer step")
    epochs: int = Field(1, gt=0, description="Passes over the training pairs")
    max_steps: int | None = Field(None, gt=0, description="Stop after this many optimizer steps")
    lr: float = Field(1e-5, gt=0, description="Peak learning rate (AdamW)")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay")
    warmup_ratio: float = Field(0.1, ge=0, lt=1, description="Share of steps with linear warm-up")
    schedule: Literal["cosine", "linear", "constant"] = Field("cosine", description="Decay after warm-up")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping (global L2 norm)")
    seed: int = Field(0, description="Seed for initialisation, data order and dropout")
    eval_every: int = Field(50, gt=0, description="Evaluate on the held-out pairs every N steps")
    beta: float = Field(0.1, gt=0, description="DPO temperature β (the preference loss's β)")
    lambda_nll: float = Field(
        0.0,
        ge=0,
        description="Weight of the chosen responses' per-token NLL (an RPO-style anchor against DPO "
        "lowering the chosen likelihood too); 0 is the plain objective of DESIGN.md",
    )


class HeadTrainConfig(PreferenceTrainConfig):
    """What both heads' training loops share."""

    enabled: bool = Field(True, description="Train this head")
    features: Literal["backbone", "cached"] = Field(
        "backbone",
        description="'backbone' runs the frozen LM each step; 'cached' reads the reference pass's "
        "hidden states (needs refpass.store_hidden) and never runs the LM",
    )
    mixed_precision: Literal["no", "bf16"] = Field("no", description="bf16 autocast (CPU or GPU)")
    num_processes: int = Field(
        1,
        gt=0,
        description="Processes for `accelerate launch` (GPUs, or CPU processes with gloo); 1 trains in-process",
    )
    checkpoint_every: int = Field(50, gt=0, description="Save a resumable checkpoint every N steps")
    resume: bool = Field(True, description="Continue from the latest checkpoint of the same run key")


class IAVTrainConfig(HeadTrainConfig):
    """IAV: base head (from lm_head) + zero-initialised alignment head."""

    lr: float = Field(1e-4, gt=0, description="Peak learning rate (AdamW)")
    kl: Literal["topk", "exact"] = Field(
        "topk",
        description="KL of the base head to the reference: 'topk' from the cache (top-k + tail), "
        "'exact' from the backbone's own head (reference = the run's model)",
    )
    lambda_kl: float = Field(0.1, ge=0, description="Weight of the KL to the reference")
    lambda_l2: float = Field(0.01, ge=0, description="Weight of mean ‖W_a h‖²")


class CALMTrainConfig(HeadTrainConfig):
    """CALM: frozen lm_head + gated low-rank modulation."""

    rank: int = Field(32, gt=0, description="Rank R of the modulation")
    s_max: float = Field(5.0, gt=0, description="Largest gate strength")
    max_positions: int = Field(2048, gt=0, description="Rows of the position embedding")
    lambda_l2: float = Field(0.001, ge=0, description="Weight of mean ‖v‖²")
    lambda_var: float = Field(0.01, ge=0, description="Reward for strength variance (subtracted)")
    lambda_ent: float = Field(0.01, ge=0, description="Reward for policy entropy (subtracted)")


class BaselineTrainConfig(PreferenceTrainConfig):
    """A baseline that fine-tunes a whole copy of the LM (GenARM's reward LM, DPO for DeRa)."""

    enabled: bool = Field(False, description="Train this baseline and add it to the α sweep")
    batch_size: int = Field(16, gt=0, description="Pairs per optimizer step (over accumulation)")
    lr: float = Field(1e-4, gt=0, description="Peak learning rate (AdamW, every weight of the LM)")
    lora_rank: int | None = Field(
        None,
        gt=0,
        description="LoRA rank (peft) for large models: train adapters on lora_targets, merged into "
        "the weights after training; empty fine-tunes every weight",
    )
    lora_alpha: float = Field(16.0, gt=0, description="LoRA scaling numerator (the update is alpha/r · BA)")
    lora_targets: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"],
        min_length=1,
        description="Names of the linear layers that get LoRA adapters (Llama's attention projections)",
    )


class GenARMTrainConfig(BaselineTrainConfig):
    """GenARM-style: an autoregressive reward LM trained with −log σ(β(log π_r(y_w) − log π_r(y_l)))."""


class DPOTrainConfig(BaselineTrainConfig):
    """DPO + DeRa: the whole LM fine-tuned with DPO against the cached reference log-probs."""


class TrainConfig(_Section):
    """The heads' and the baselines' training settings."""

    iav: IAVTrainConfig = Field(default_factory=IAVTrainConfig)
    calm: CALMTrainConfig = Field(default_factory=CALMTrainConfig)
    genarm: GenARMTrainConfig = Field(default_factory=GenARMTrainConfig)
    dpo: DPOTrainConfig = Field(default_factory=DPOTrainConfig)
