"""The one training loop of every method (heads and fine-tuned baselines alike): AdamW, warm-up
+ decay, accumulation, clipping, evaluation, resumable checkpoints, a non-finite guard, and
multi-process training via accelerate.

What trains is the method's `Trainee` (alignheads.models.methods): a head over the frozen LM, or
the LM itself. `accelerate.prepare` gets the trainee's `step_module` (the LM; for a head, the head
with its objective, :class:`alignheads.models.trainees.HeadStep`), whose parameters are what
trains: a head's frozen LM (what of it the head reads: the whole LM, or only its output layer
with cached features) is moved to the device by the trainee and never prepared, so checkpoints and
gradients only ever hold the head. Checkpoints, evaluation and the result use `trainee.module`.
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from alignheads.config import PreferenceTrainConfig
from alignheads.models.losses import LOGITS_PER_CHUNK, preference_accuracy
from alignheads.models.methods import Method
from alignheads.models.trainees import KLReference, Trainee
from alignheads.tasks.training.batches import PairStream, collate
from alignheads.tasks.training.checkpoint import (
    DataPosition,
    latest_checkpoint,
    load_checkpoint,
    prune_checkpoints,
    save_checkpoint,
)

MetricsSink = Callable[[dict[str, float], int], None]

# Held-out metrics kept in the results (the artifact's info and `train_metrics`) but not sent to
# the metrics sink (MLflow) at every evaluation: `eval/pairs`, the held-out set's size, is the
# same number each time.
NOT_LOGGED = frozenset({"eval/pairs"})


class NonFiniteError(RuntimeError):
    """The loss or gradient became NaN/inf; the message names the step and the last good checkpoint."""


@dataclass
class TrainJob:
    """Everything one method's training needs; `model` is the run's LM as loaded; `kl_reference`:
    another reference model's output layer, for IAV's exact KL to it (None: none)."""

    method: Method
    cfg: PreferenceTrainConfig
    model: nn.Module
    train: PairStream
    eval: PairStream | None
    checkpoint_dir: Path
    pad_id: int
    log: MetricsSink = field(default=lambda metrics, step: None)
    progress: bool = True
    kl_reference: KLReference | None = None


@dataclass
class TrainResult:
    trainee: Trainee
    steps: int
    resumed_from: int
    final_metrics: dict[str, float]
    eval_metrics: dict[str, float]
    history: list[dict[str, float]]

    @property
    def trained(self) -> nn.Module:
        """The trained module (the head, or the fine-tuned LM before LoRA merging)."""
        return self.trainee.module


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


def adamw(params: list[nn.Parameter], cfg: PreferenceTrainConfig) -> torch.optim.AdamW:
    """The loop's AdamW, fused: one kernel per step that updates the weights in place. The
    per-tensor implementation (the CPU default) allocates two temporaries the size of each weight
    for ``sqrt(v̂) + ε`` (+1 GB at a 32,000 x 4,096 IAV W_a), and the multi-tensor one (the CUDA
    default) as much for all of them at once."""
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)


# glibc's mallopt parameter for the size from which malloc maps memory of its own (malloc.h)
M_MMAP_THRESHOLD = -3
# blocks this large and larger get their own mapping: half a chunk's float32 logits (8 MiB), so every
# logits-sized tensor of a chunked loss (a chunk holds LOGITS_PER_CHUNK logits, less than one row of
# V) and every weight-sized one. Smaller blocks stay in the heap, which reuses them: the setting is
# the whole process's, and the sampling that runs beside and after the trainings allocates a batch's
# prefill activations and KV-cache buffers of 1-8 MiB per call; mapped on their own (a 1 MiB
# threshold) every one of them was zero-filled again, and a GenARM sweep batch sampled ~20 % slower
# (benchmarks/malloc_bench.py)
MMAP_THRESHOLD_BYTES = LOGITS_PER_CHUNK * 4 // 2


def mmap_large_allocations(threshold: int = MMAP_THRESHOLD_BYTES) -> bool:
    """Have glibc's malloc map every block of ``threshold`` bytes or more on its own, so that
    freeing it returns the memory at once; returns whether the setting took (False: not glibc).

    By default glibc raises that threshold to the largest block freed so far (up to 32 MiB): once
    a chunk's 16 MiB logits have been freed, the next chunks' come from the heap, whose free
    holes fragment and are kept, and the resident set grows step after step (benchmarks/train_bench.py
    --preset memory, H = 4,096, V = 32,000: CALM's high-water mark ~990 -> ~840 MiB, IAV's ~2,760 ->
    ~2,650). The cost is a fresh mapping, zero-filled by the kernel, per large block. The setting is
    the process's; the values computed do not change."""
    import ctypes
    import ctypes.util
    import platform

    if platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    return bool(libc.mallopt(M_MMAP_THRESHOLD, threshold))


def mean_metrics(items: list[dict[str, float]]) -> dict[str, float]:
    keys = items[0].keys()
    return {k: sum(m[k] for m in items) / len(items) for k in keys}


@torch.no_grad()
def evaluate(
    trainee: Trainee, module: nn.Module, stream: PairStream, pad_id: int, micro: int
) -> dict[str, float]:
    """Held-out preference accuracy of the implicit reward at α = 1, and reward margins."""
    margins, chosen, rejected = [], [], []
    device = next(module.parameters()).device
    for _, records in stream.micro_batches(micro, seed=None, drop_last=False):
        batch = collate(records, trainee.needs, trainee.with_sequences, pad_id).to(device)
        dpo = trainee.eval_dpo(module, batch)
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


# accelerate's process-wide state is read by every training in the process while it steps
_ACCELERATOR_STATE = threading.Lock()


def new_accelerator(mixed_precision: str) -> Any:
    """An Accelerator for one head's training. accelerate keeps one process-wide state and
    refuses a second mixed-precision setting, but a pipeline trains several heads (each with
    its own setting) in one process: that state is cleared first, keeping the process group,
    unless it already holds this setting. Trainings running in threads at once (a search's
    trials) then share the state as it is instead of seeing it cleared under them."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    cpu = not torch.cuda.is_available()
    with _ACCELERATOR_STATE:
        held = AcceleratorState._shared_state
        if not held or held.get("_mixed_precision") != mixed_precision:
            AcceleratorState._reset_state(reset_partial_state=False)
            GradientState._reset_state()
        return Accelerator(mixed_precision=mixed_precision, cpu=cpu)


def train(job: TrainJob, accelerator: Any | None = None) -> TrainResult:
    """Train one method to completion (resuming from the latest checkpoint when allowed)."""
    cfg = job.cfg
    mmap_large_allocations()
    accelerator = accelerator or new_accelerator(cfg.mixed_precision)
    world, rank = accelerator.num_processes, accelerator.process_index
    if cfg.batch_size % (world * cfg.grad_accum):
        raise ValueError(
            f"train batch_size {cfg.batch_size} must be a multiple of processes ({world}) x grad_accum ({cfg.grad_accum})"
        )
    micro = cfg.batch_size // (world * cfg.grad_accum)
    trainee = job.method.trainee(job.model, cfg, accelerator.device, kl_reference=job.kl_reference)
    module = trainee.module
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
    params = [p for p in module.parameters() if p.requires_grad]
    optimizer = adamw(params, cfg)
    warmup = int(round(cfg.warmup_ratio * total))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg.schedule, warmup, total))

    step, position, resumed = 0, DataPosition(0, 0), {}
    latest = latest_checkpoint(job.checkpoint_dir) if cfg.resume else None
    if latest is not None:
        step, position, resumed = load_checkpoint(latest, module, optimizer, scheduler)
    resumed_from = step
    prepared, optimizer = accelerator.prepare(trainee.step_module, optimizer)
    # a resumed run carries the metrics of the steps before its checkpoint: its history (and the
    # train_metrics table) equals an uninterrupted run's
    history: list[dict[str, float]] = list(resumed.get("history", []))
    eval_metrics: dict[str, float] = dict(resumed.get("eval_metrics", {}))
    bar = tqdm(
        total=total,
        initial=step,
        desc=f"training {job.method.name}",
        disable=not (job.progress and accelerator.is_main_process),
    )

    def checkpoint(at: int, pos: DataPosition) -> Path | None:
        if accelerator.is_main_process:
            path = save_checkpoint(
                job.checkpoint_dir,
                at,
                module,
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
    # An epoch is `steps_per_epoch` whole optimizer steps of world x grad_accum micro-batches; the
    # micro-batches past them (fewer than one step's worth) are dropped, never run: their
    # gradients would otherwise land in the next epoch's first step, and ranks dealt micro-batches
    # by index would disagree on the number of steps.
    used = steps_per_epoch * world * cfg.grad_accum
    while step < total and epoch < cfg.epochs:
        stream = job.train.micro_batches(micro, cfg.seed, epoch, start=start, rank=rank, world=world)
        pending: list[dict[str, float]] = []
        steps_this_epoch = 0
        for index, records in stream:
            if index >= used:
                break
            batch = collate(records, trainee.needs, trainee.with_sequences, job.pad_id).to(accelerator.device)
            last_of_step = len(pending) + 1 == cfg.grad_accum
            # gradients are all-reduced only on the last micro-batch of a step
            sync = contextlib.nullcontext() if last_of_step else accelerator.no_sync(prepared)
            with sync:
                with accelerator.autocast():
                    step_loss = trainee.loss(prepared, batch)
                if not torch.isfinite(step_loss.loss):
                    raise NonFiniteError(_non_finite_message(step + 1, "loss", job.checkpoint_dir))
                accelerator.backward(step_loss.loss / cfg.grad_accum)
            pending.append(step_loss.metrics())
            if not last_of_step:
                continue
            grad_norm = accelerator.clip_grad_norm_(params, cfg.max_grad_norm)
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
                module.eval()
                eval_metrics = evaluate(trainee, module, job.eval, job.pad_id, micro)
                module.train()
                if accelerator.is_main_process and eval_metrics:
                    job.log({k: v for k, v in eval_metrics.items() if k not in NOT_LOGGED}, step)
            if step % cfg.checkpoint_every == 0 or step == total:
                checkpoint(step, DataPosition(epoch, next_index))
            if step >= total:
                break
        epoch += 1
        start = 0
    bar.close()
    accelerator.wait_for_everyone()
    final = history[-1] if history else {}
    return TrainResult(trainee, step, resumed_from, final, eval_metrics, history)


def _non_finite_message(step: int, what: str, checkpoint_dir: Path) -> str:
    latest = latest_checkpoint(checkpoint_dir)
    kept = f"the last good checkpoint is {latest}" if latest else "no checkpoint was saved before it"
    return f"non-finite {what} at step {step}; training stopped ({kept}); lower lr or check the data"
