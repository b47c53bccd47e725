"""Full fine-tuning of a causal LM on preference pairs (the baselines: GenARM's reward LM, DPO).

The same batches as the heads' loop (`PairStream` over the reference cache, chosen and rejected
rows in one forward) and the same schedule (`lr_lambda`), but every weight of the LM trains,
in float32, in one process. No resumable checkpoints: on the tiny world a baseline trains in
well under a minute; a killed run starts it again.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from alignheads.config import BaselineTrainConfig
from alignheads.models.baseline_objectives import BaselineLoss
from alignheads.models.features import _gather_time
from alignheads.models.objectives import PairBatch
from alignheads.tasks.training.batches import PairStream, collate
from alignheads.tasks.training.loop import (
    NonFiniteError,
    eval_metrics_of,
    lr_lambda,
    mean_metrics,
    trl_metrics,
)

Objective = Callable[[Tensor, PairBatch], BaselineLoss]
MetricsSink = Callable[[dict[str, float], int], None]


@dataclass
class FinetuneResult:
    steps: int
    final_metrics: dict[str, float]
    eval_metrics: dict[str, float]
    history: list[dict[str, float]]


def response_logits(model: nn.Module, batch: PairBatch) -> Tensor:
    """``(2B, R, V)`` logits of ``model`` at the positions predicting each response token: the
    backbone over the right-padded sequences, the output layer only at the gathered positions."""
    if batch.input_ids is None or batch.gather_index is None:
        raise ValueError("fine-tuning needs input_ids and gather_index in the batch")
    hidden = model.base_model(
        input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False
    ).last_hidden_state
    return model.get_output_embeddings()(_gather_time(hidden, batch.gather_index)).float()


@torch.no_grad()
def evaluate_lm(
    model: nn.Module, stream: PairStream, objective: Objective, pad_id: int, micro: int
) -> dict[str, float]:
    """Held-out preference accuracy and mean margin of the objective's implicit reward."""
    device = next(model.parameters()).device
    margins, chosen, rejected = [], [], []
    for _, records in stream.micro_batches(micro, seed=None, drop_last=False):
        batch = collate(records, stream.needs, True, pad_id).to(device)
        out = objective(response_logits(model, batch), batch)
        margins.append(out.dpo.margins)
        chosen.append(out.dpo.chosen_rewards)
        rejected.append(out.dpo.rejected_rewards)
    return eval_metrics_of(margins, chosen, rejected)


def finetune_lm(
    model: nn.Module,
    train: PairStream,
    eval_stream: PairStream | None,
    cfg: BaselineTrainConfig,
    objective: Objective,
    pad_id: int,
    *,
    log: MetricsSink | None = None,
    progress: bool = True,
    desc: str = "fine-tuning",
) -> FinetuneResult:
    """Train the weights of ``model`` that require a gradient (float32, already on its device;
    see `alignheads.tasks.training.lora.trainable_lm`) with ``objective``."""
    log = log or (lambda metrics, step: None)
    micro = cfg.batch_size // cfg.grad_accum
    if micro * cfg.grad_accum != cfg.batch_size:
        raise ValueError(f"batch_size {cfg.batch_size} must be a multiple of grad_accum {cfg.grad_accum}")
    steps_per_epoch = train.count_pairs() // cfg.batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"{train.count_pairs()} training pairs are fewer than one batch of {cfg.batch_size}")
    total = (
        steps_per_epoch * cfg.epochs
        if cfg.max_steps is None
        else min(cfg.max_steps, steps_per_epoch * cfg.epochs)
    )
    torch.manual_seed(cfg.seed)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("no weight of the model requires a gradient: nothing to fine-tune")
    model.train()
    device = next(model.parameters()).device
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    warmup = int(round(cfg.warmup_ratio * total))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg.schedule, warmup, total))
    history: list[dict[str, float]] = []
    eval_metrics: dict[str, float] = {}
    bar = tqdm(total=total, desc=desc, disable=not progress, leave=False)
    step = 0
    for epoch in range(cfg.epochs):
        pending: list[dict[str, float]] = []
        for _, records in train.micro_batches(micro, cfg.seed, epoch):
            batch = collate(records, train.needs, True, pad_id).to(device)
            out = objective(response_logits(model, batch), batch)
            if not torch.isfinite(out.loss):
                raise NonFiniteError(f"non-finite loss at step {step + 1}; lower lr or check the data")
            (out.loss / cfg.grad_accum).backward()
            pending.append(trl_metrics(out.loss, out.dpo, out.logps, batch.n_pairs))
            if len(pending) < cfg.grad_accum:
                continue
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            if not torch.isfinite(grad_norm):
                raise NonFiniteError(f"non-finite gradient at step {step + 1}; lower lr or check the data")
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            metrics = mean_metrics(pending)
            metrics |= {"learning_rate": scheduler.get_last_lr()[0], "grad_norm": float(grad_norm)}
            pending = []
            history.append(metrics | {"step": float(step)})
            log(metrics, step)
            bar.update(1)
            bar.set_postfix(loss=f"{metrics['loss']:.4f}", acc=f"{metrics['rewards/accuracies']:.2f}")
            if eval_stream is not None and (step % cfg.eval_every == 0 or step == total):
                model.eval()
                eval_metrics = evaluate_lm(model, eval_stream, objective, pad_id, micro)
                model.train()
                if eval_metrics:
                    log(eval_metrics, step)
            if step >= total:
                break
        if step >= total:
            break
    bar.close()
    model.eval()
    model.requires_grad_(False)
    return FinetuneResult(step, history[-1] if history else {}, eval_metrics, history)


def as_float32(model: nn.Module) -> Any:
    """The model in float32 (AdamW on half-precision weights would lose small updates)."""
    return model.float() if next(model.parameters()).dtype != torch.float32 else model
