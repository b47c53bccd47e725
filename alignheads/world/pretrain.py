"""The tiny world's base LM: a small Llama pretrained from scratch on the dialogue corpus.

Pretraining reads the whole text (prompt and response) with EOS appended after each response,
so the model learns the HH format, both good and bad answering behaviour, and when to stop.
No BOS is prepended: the tokenizer adds no special tokens, and downstream stages feed the
model prompt tokens as they come out of the tokenizer, so training sees what inference sees.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from tqdm.auto import tqdm
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerBase

from alignheads.config import WorldConfig
from alignheads.loading import MODEL_LOADING


def make_model(cfg: WorldConfig, tokenizer: PreTrainedTokenizerBase) -> LlamaForCausalLM:
    """A freshly initialised Llama sized by ``cfg`` (weights drawn from ``cfg.seed``).

    Embeddings are untied: later stages initialise a trainable head from ``lm_head``.
    """
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    # Seed a private copy of the RNG so the caller's global torch state is left untouched.
    # MODEL_LOADING: no other thread's from_pretrained may have the init functions swapped out
    with MODEL_LOADING, torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = LlamaForCausalLM(config)
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def encode_corpus(
    texts: Sequence[str], tokenizer: PreTrainedTokenizerBase, max_length: int
) -> list[list[int]]:
    """Token ids of each dialogue plus EOS, truncated from the left to ``max_length``.

    Left truncation keeps the end (the response and its EOS), which is what the model must learn.
    """
    eos = tokenizer.eos_token_id
    # verbose=False: over-long dialogues are expected here and truncated just below.
    ids = tokenizer(list(texts), add_special_tokens=False, verbose=False)["input_ids"]
    return [(seq + [eos])[-max_length:] for seq in ids]


def collate(batch: Sequence[Sequence[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids``/``attention_mask``/``labels`` (padding excluded from the loss)."""
    width = max(len(s) for s in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, seq in enumerate(batch):
        input_ids[i, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        mask[i, : len(seq)] = 1
    labels = input_ids.masked_fill(mask == 0, -100)
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def lr_lambda(step: int, total: int, warmup: int, floor: float = 0.1) -> float:
    """Linear warm-up to 1, then cosine decay to ``floor`` (a multiplier of the peak rate)."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def batches(
    lengths: Sequence[int], batch_size: int, steps: int, seed: int, bucket: int = 32
) -> list[list[int]]:
    """``steps`` batches of item indices from epochs of seeded shuffles.

    Within each window of ``bucket`` batches, items are sorted by length before being cut into
    batches (and the batches shuffled again), so a batch pads to a similar length instead of
    to the longest rambling dialogue: about three times less padding, same data.
    """
    rng = random.Random(f"alignheads-world:{seed}:batches")
    order: list[int] = []
    while len(order) < steps * batch_size:
        perm = list(range(len(lengths)))
        rng.shuffle(perm)
        order.extend(perm)
    order = order[: steps * batch_size]
    out: list[list[int]] = []
    window = batch_size * bucket
    for start in range(0, len(order), window):
        chunk = sorted(order[start : start + window], key=lambda i: lengths[i])
        group = [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
        rng.shuffle(group)
        out.extend(group)
    return out


@contextmanager
def one_thread() -> Iterator[None]:
    """Run torch's CPU kernels on one thread inside the block, then restore the caller's count.

    A float reduction split over several threads adds in another order, so the pretrained weights
    (and the world's samples) would depend on OMP_NUM_THREADS while the world's key does not: one
    key, two models. One thread is also the fastest for a model this small (see scripts/dev.sh).
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def pretrain(
    model: LlamaForCausalLM,
    sequences: Sequence[Sequence[int]],
    cfg: WorldConfig,
    pad_id: int,
    progress: bool = True,
) -> list[float]:
    """Train ``model`` in place on ``sequences`` with AdamW and warm-up/cosine; returns step losses.

    Deterministic on the CPU for a given seed: batches come from a seeded ``random.Random``,
    and the model has no dropout.
    """
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.pretrain_lr, betas=(0.9, 0.95), weight_decay=0.01)
    warmup = max(1, int(cfg.pretrain_warmup_frac * cfg.pretrain_steps))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_lambda(s, cfg.pretrain_steps, warmup))
    losses: list[float] = []
    plan = batches([len(s) for s in sequences], cfg.pretrain_batch_size, cfg.pretrain_steps, cfg.seed)
    bar = tqdm(plan, desc="pretraining the tiny world", disable=not progress, leave=False)
    for idx in bar:
        batch = collate([sequences[i] for i in idx], pad_id)
        loss = model(**batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.detach().item())
        if len(losses) % 10 == 0:
            bar.set_postfix(loss=f"{sum(losses[-10:]) / 10:.3f}")
    model.eval()
    return losses
