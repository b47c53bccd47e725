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
    hidden_size: int = Field(64, gt=0, description="Model width")
    num_layers: int = Field(2, gt=0, description="Transformer layers")
    num_heads: int = Field(4, gt=0, description="Attention heads")
    intermediate_size: int = Field(256, gt=0, description="MLP width")
    max_position_embeddings: int = Field(256, gt=0, description="Longest sequence the model handles")
    pretrain_steps: int = Field(600, gt=0, description="Pretraining optimizer steps")
    pretrain_batch_size: int = Field(32, gt=0, description="Pretraining sequences per step")
    pretrain_lr: float = Field(3e-3, gt=0, description="Pretraining peak learning rate")
