"""Which weights a baseline fine-tunes: all of them, or LoRA adapters (peft) for large models.

The baselines' training loop (`alignheads.tasks.training.loop.train`, through `LMTrainee` in `alignheads.models.methods`) trains the parameters
that require a gradient. With ``lora_rank`` set, peft injects rank-r adapters into the listed
projections of the model in place and freezes everything else; after training the adapters are
merged into the weights, so the saved baseline is a plain transformers checkpoint that decodes
(and loads) exactly like a fully fine-tuned one.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from alignheads.config import BaselineTrainConfig


def trainable_lm(model: nn.Module, cfg: BaselineTrainConfig) -> tuple[nn.Module, Callable[[], nn.Module]]:
    """``(module to train, finish)``: train the first, then ``finish()`` gives the plain causal LM
    with what was learnt (the same module, or a copy with the LoRA adapters merged in)."""
    if cfg.lora_rank is None:
        model.requires_grad_(True)
        return model, lambda: model
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(
        r=cfg.lora_rank,
        lora_alpha=cfg.lora_alpha,
        target_modules=list(cfg.lora_targets),
        lora_dropout=0.0,
        bias="none",
    )
    wrapped = get_peft_model(model, lora)
    # the wrapped causal LM, adapters injected in place: the loop calls its backbone and output layer
    return wrapped.get_base_model(), wrapped.merge_and_unload
