"""Settings of the tiny world: corpus size, tokenizer, model shape and pretraining budget."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class WorldConfig(BaseModel):
    """The embedded default: a tiny stand-in for 'Llama-7B SFT + HH-RLHF', built on the CPU."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    build: bool = Field(True, description="Build (or reuse) the tiny world when model or data come from it")
    seed: int = Field(0, description="Seed for the corpus, tokenizer and pretraining")
    n_train_pairs: int = Field(2000, gt=0, description="Training preference pairs")
    n_test_pairs: int = Field(200, gt=0, description="Held-out preference pairs")
    vocab_size: int = Field(512, ge=64, description="BPE vocabulary size")
    hidden_size: int = Field(128, gt=0, description="Model width")
    num_layers: int = Field(3, gt=0, description="Transformer layers")
    num_heads: int = Field(4, gt=0, description="Attention heads")
    intermediate_size: int = Field(384, gt=0, description="MLP width")
    max_position_embeddings: int = Field(256, gt=0, description="Longest sequence the model handles")
    pretrain_steps: int = Field(1000, gt=0, description="Pretraining optimizer steps")
    pretrain_batch_size: int = Field(32, gt=0, description="Pretraining sequences per step")
    pretrain_lr: float = Field(2e-3, gt=0, description="Pretraining peak learning rate")
    pretrain_warmup_frac: float = Field(
        0.05, ge=0, lt=1, description="Share of pretraining steps spent warming the learning rate up"
    )
    n_pretrain_dialogues: int = Field(20000, gt=0, description="Dialogues in the pretraining corpus")
    good_fraction: float = Field(
        0.5, gt=0, lt=1, description="Share of pretraining responses in a good style (the rest are bad)"
    )
    multi_turn_prob: float = Field(
        0.15, ge=0, le=1, description="Chance that a dialogue starts with one earlier exchange"
    )
    held_out_fraction: float = Field(
        0.2, ge=0, lt=1, description="Share of questions kept out of the training pairs (test-only)"
    )
    report_samples: int = Field(
        128, gt=0, description="Test prompts sampled from the base model for the report"
    )
    report_max_new_tokens: int = Field(96, gt=0, description="Longest base-model sample in the report")
