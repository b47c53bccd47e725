"""One readable training loop for both heads: AdamW, warm-up + decay, accumulation, clipping,
evaluation, resumable checkpoints, a non-finite guard, and multi-process training via accelerate.

The frozen backbone is moved to the device by hand and never given to `accelerate.prepare`,
so checkpoints and gradients only ever hold the head.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from alignheads.config import CALMTrainConfig, HeadTrainConfig, IAVTrainConfig
from alignheads.models.features import backbone_features, cached_features
from alignheads.models.head_base import LogitHead, SteeringOutput, lm_output_layer
from alignheads.models.losses import CALMWeights, IAVWeights, dpo_loss, preference_accuracy
from alignheads.models.objectives import (
    PairBatch,
    calm_objective,
    exact_kl_per_token,
    iav_objective,
    response_logps,
    topk_kl_per_token,
)
from alignheads.models.registry import new_head
from alignheads.tasks.training.batches import BatchNeeds, PairStream, collate
from alignheads.tasks.training.checkpoint import (
    DataPosition,
    latest_checkpoint,
    load_checkpoint,
    prune_checkpoints,
    save_checkpoint,
)

MetricsSink = Callable[[dict[str, float], int], None]


class NonFiniteError(RuntimeError):
    """The loss or gradient became NaN/inf; the message names the step and the last good checkpoint."""


@dataclass
class TrainJob:
    """Everything one head's training needs; `model` is the frozen LM (already on its device)."""

    kind: str
    cfg: HeadTrainConfig
    model: nn.Module
    train: PairStream
    eval: PairStream | None
    checkpoint_dir: Path
    pad_id: int
    log: MetricsSink = field(default=lambda metrics, step: None)
    progress: bool = True


@dataclass
class TrainResult:
    head: LogitHead
    steps: int
    resumed_from: int
    final_metrics: dict[str, float]
    eval_metrics: dict[str, float]
    history: list[dict[str, float]]


def batch_needs(kind: str, cfg: HeadTrainConfig) -> BatchNeeds:
    """IAV with `kl: topk` reads the cache's top-k; `features: cached` reads its hidden states."""
    topk = isinstance(cfg, IAVTrainConfig) and cfg.kl == "topk"
    return BatchNeeds(topk=topk, hidden=cfg.features == "cached")


def build_head(kind: str, model: nn.Module, cfg: HeadTrainConfig) -> LogitHead:
    """A fresh head from the LM (seeded, so every process starts from the same weights).

    Heads train in float32 whatever the LM's dtype: they are the master weights AdamW
    updates (bf16 would lose small updates); `mixed_precision: bf16` autocasts the compute."""
    torch.manual_seed(cfg.seed)
    if isinstance(cfg, CALMTrainConfig):
        return new_head(
            kind, model, rank=cfg.rank, s_max=cfg.s_max, max_positions=cfg.max_positions, dtype=torch.float32
        )
    return new_head(kind, model, dtype=torch.float32)


def lr_lambda(schedule: str, warmup: int, total: int) -> Callable[[int], float]:
    """Linear warm-up for `warmup` steps, then cosine / linear decay to 0 at `total`, or constant."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return 0.5 * (1 + math.cos(math.pi * progress)) if schedule == "cosine" else 1.0 - progress

    return factor


def features_fn(cfg: HeadTrainConfig, backbone: nn.Module, with_context: bool, dtype: torch.dtype):
    """batch -> (hidden ``(2B, R, H)`` in the LM output layer's dtype, token context or None)."""
    source = cached_features if cfg.features == "cached" else partial(backbone_features, backbone)

    def features(batch: PairBatch):
        hidden, ctx = source(batch, with_context)
        return hidden.to(dtype), ctx  # the frozen lm_head (CALM's base, exact KL) takes its own dtype

    return features


def objective_fn(cfg: HeadTrainConfig, frozen: nn.Module):
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


def trl_metrics(loss: Tensor, dpo: Any, logps: Tensor, n_pairs: int) -> dict[str, float]:
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


def step_metrics(loss_obj: Any, out: SteeringOutput, batch: PairBatch) -> dict[str, float]:
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


def mean_metrics(items: list[dict[str, float]]) -> dict[str, float]:
    keys = items[0].keys()
    return {k: sum(m[k] for m in items) / len(items) for k in keys}


@torch.no_grad()
def evaluate(
    head: nn.Module,
    frozen: nn.Module,
    stream: PairStream,
    features,
    with_sequences: bool,
    pad_id: int,
    beta: float,
    micro: int,
    alpha: float = 1.0,
) -> dict[str, float]:
    """Held-out preference accuracy of the implicit reward at α, and reward margins."""
    margins, chosen, rejected = [], [], []
    for _, records in stream.micro_batches(micro, seed=None, drop_last=False):
        batch = collate(records, stream.needs, with_sequences, pad_id).to(_device_of(head))
        hidden, ctx = features(batch)
        out = head(hidden, frozen_head=frozen, context=ctx)
        logps = response_logps(out.logits(alpha), batch)
        b = batch.n_pairs
        dpo = dpo_loss(logps[:b], logps[b:], batch.ref_logps[:b], batch.ref_logps[b:], beta)
        margins.append(dpo.margins)
        chosen.append(dpo.chosen_rewards)
        rejected.append(dpo.rejected_rewards)
    return eval_metrics_of(margins, chosen, rejected)


def eval_metrics_of(margins: list[Tensor], chosen: list[Tensor], rejected: list[Tensor]) -> dict[str, float]:
    """TRL-named held-out metrics from per-batch DPO margins and implicit rewards, each ``(B,)``."""
    if not margins:
        return {}
    m = torch.cat(margins)
    return {
        "eval/rewards/accuracies": preference_accuracy(m),
        "eval/rewards/margins": m.mean().item(),
        "eval/rewards/chosen": torch.cat(chosen).mean().item(),
        "eval/rewards/rejected": torch.cat(rejected).mean().item(),
        "eval/pairs": float(m.numel()),
    }


def _device_of(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


def new_accelerator(mixed_precision: str) -> Any:
    """An Accelerator for one head's training. accelerate keeps one process-wide state and
    refuses a second mixed-precision setting, but a pipeline trains several heads (each with
    its own setting) in one process: clear that state first, keeping the process group."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()
    return Accelerator(mixed_precision=mixed_precision, cpu=not torch.cuda.is_available())


def train_head(job: TrainJob, accelerator: Any | None = None) -> TrainResult:
    """Train one head to completion (resuming from the latest checkpoint when allowed)."""
    cfg = job.cfg
    accelerator = accelerator or new_accelerator(cfg.mixed_precision)
    world, rank = accelerator.num_processes, accelerator.process_index
    if cfg.batch_size % (world * cfg.grad_accum):
        raise ValueError(
            f"train batch_size {cfg.batch_size} must be a multiple of processes ({world}) x grad_accum ({cfg.grad_accum})"
        )
    micro = cfg.batch_size // (world * cfg.grad_accum)
    job.model.requires_grad_(False)
    job.model.to(accelerator.device)
    frozen = lm_output_layer(job.model)
    head = build_head(job.kind, job.model, cfg).to(accelerator.device)
    steps_per_epoch = job.train.count_pairs() // cfg.batch_size
    if steps_per_epoch == 0:
        raise ValueError(
            f"{job.train.count_pairs()} training pairs are fewer than one batch of {cfg.batch_size}"
        )
    total = (
        steps_per_epoch * cfg.epochs
        if cfg.max_steps is None
        else min(cfg.max_steps, steps_per_epoch * cfg.epochs)
    )
    optimizer = torch.optim.AdamW(head.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    warmup = int(round(cfg.warmup_ratio * total))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg.schedule, warmup, total))

    step, position, resumed = 0, DataPosition(0, 0), {}
    latest = latest_checkpoint(job.checkpoint_dir) if cfg.resume else None
    if latest is not None:
        step, position, resumed = load_checkpoint(latest, head, optimizer, scheduler)
    resumed_from = step
    model_head, optimizer = accelerator.prepare(head, optimizer)

    with_context = head.needs_token_context
    features = features_fn(cfg, job.model.base_model, with_context, frozen.weight.dtype)
    objective = objective_fn(cfg, frozen)
    with_sequences = cfg.features == "backbone"
    # a resumed run carries the metrics of the steps before its checkpoint: its history (and the
    # train_metrics table) equals an uninterrupted run's
    history: list[dict[str, float]] = list(resumed.get("history", []))
    eval_metrics: dict[str, float] = dict(resumed.get("eval_metrics", {}))
    bar = tqdm(
        total=total,
        initial=step,
        desc=f"training {job.kind}",
        disable=not (job.progress and accelerator.is_main_process),
    )

    def checkpoint(at: int, pos: DataPosition) -> Path | None:
        if accelerator.is_main_process:
            path = save_checkpoint(
                job.checkpoint_dir,
                at,
                accelerator.unwrap_model(model_head),
                optimizer.optimizer,
                scheduler,
                pos,
                extra={"history": history, "eval_metrics": eval_metrics},
            )
            prune_checkpoints(job.checkpoint_dir)
            return path
        return None

    epoch = position.epoch
    start = position.micro_batch
    while step < total and epoch < cfg.epochs:
        stream = job.train.micro_batches(micro, cfg.seed, epoch, start=start, rank=rank, world=world)
        pending: list[dict[str, float]] = []
        steps_this_epoch = 0
        for _index, records in stream:
            batch = collate(records, job.train.needs, with_sequences, job.pad_id).to(accelerator.device)
            last_of_step = len(pending) + 1 == cfg.grad_accum
            # gradients are all-reduced only on the last micro-batch of a step
            sync = contextlib.nullcontext() if last_of_step else accelerator.no_sync(model_head)
            with sync:
                with accelerator.autocast():
                    hidden, ctx = features(batch)
                    out = model_head(hidden, frozen_head=frozen, context=ctx)
                    loss_obj = objective(out, batch, hidden)
                if not torch.isfinite(loss_obj.loss):
                    raise NonFiniteError(_non_finite_message(step + 1, "loss", job.checkpoint_dir))
                accelerator.backward(loss_obj.loss / cfg.grad_accum)
            pending.append(step_metrics(loss_obj, out, batch))
            if not last_of_step:
                continue
            grad_norm = accelerator.clip_grad_norm_(model_head.parameters(), cfg.max_grad_norm)
            if not torch.isfinite(torch.as_tensor(grad_norm)):
                raise NonFiniteError(_non_finite_message(step + 1, "gradient", job.checkpoint_dir))
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            steps_this_epoch += 1
            # every process has now handled its share: world x grad_accum micro-batches per step
            next_index = start + steps_this_epoch * world * cfg.grad_accum
            metrics = mean_metrics(pending) | {
                "learning_rate": scheduler.get_last_lr()[0],
                "grad_norm": float(grad_norm),
            }
            pending = []
            history.append(metrics | {"step": float(step)})
            if accelerator.is_main_process:
                job.log(metrics, step)
            bar.update(1)
            bar.set_postfix(loss=f"{metrics['loss']:.4f}", acc=f"{metrics['rewards/accuracies']:.2f}")
            if job.eval is not None and (step % cfg.eval_every == 0 or step == total):
                eval_metrics = evaluate(
                    accelerator.unwrap_model(model_head),
                    frozen,
                    job.eval,
                    features,
                    with_sequences,
                    job.pad_id,
                    cfg.beta,
                    micro,
                )
                if accelerator.is_main_process and eval_metrics:
                    job.log(eval_metrics, step)
            if step % cfg.checkpoint_every == 0 or step == total:
                checkpoint(step, DataPosition(epoch, next_index))
            if step >= total:
                break
        epoch += 1
        start = 0
    bar.close()
    accelerator.wait_for_everyone()
    final = history[-1] if history else {}
    return TrainResult(accelerator.unwrap_model(model_head), step, resumed_from, final, eval_metrics, history)


def _non_finite_message(step: int, what: str, checkpoint_dir: Path) -> str:
    latest = latest_checkpoint(checkpoint_dir)
    kept = f"the last good checkpoint is {latest}" if latest else "no checkpoint was saved before it"
    return f"non-finite {what} at step {step}; training stopped ({kept}); lower lr or check the data"
