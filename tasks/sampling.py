"""The sweep's sampling loop, shared by every method: prompts in, rows of the `generations`
table out, with common random numbers.

Common random numbers. Every (prompt, sample) gets the same random draws at every α and for
every head, so that differences between α come from α, not from sampling noise. Hugging Face
`generate` has no per-row seeds, so the batches are made identical instead: prompts in a fixed
order, fixed batch boundaries (`batch_size`), the same left padding, and
`torch.manual_seed(batch_seed(seed, sample_index, batch_index))` right before each batch's
`generate` call. Sampling draws the same number of random numbers per step whatever the
probabilities are, so with a head whose Δ is zero every α (and the plain base model) produces
identical text. The seed used is recorded per row.

Decoding is fully determined by the sweep settings: the model's own `generation_config.json`
defaults (top-k, repetition penalty, ...) are set aside during generation, and top-k is off.
Generation stops at EOS: the tokenizer's EOS plus any EOS ids of the model's generation config
(chat models end turns with their own token).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Any

from alignheads.config import SweepConfig
from alignheads.storage.fingerprint import fingerprint
from alignheads.tasks.prompts import Prompt

# Sampling draws from torch's global RNG (transformers' generate takes no generator). Generation
# tasks running in threads of one process (the threads runner, an in-process Dask cluster) would
# interleave their draws and break common random numbers, so seeding and decoding a batch hold
# this lock; separate processes (Dask workers on a cluster) still decode in parallel.
SAMPLING_LOCK = threading.Lock()


def batch_seed(seed: int, sample_index: int, batch_index: int) -> int:
    """The seed of one generate() call: depends only on these three numbers (< 2**60)."""
    return int(fingerprint({"seed": seed, "sample": sample_index, "batch": batch_index})[:15], 16)


def decoding_settings(sweep: SweepConfig, stops: list[int], pad_id: int) -> dict[str, Any]:
    """What every method's decoder takes: length, sampling, and where to stop and pad."""
    return {
        "max_new_tokens": sweep.max_new_tokens,
        "do_sample": sweep.do_sample,
        "temperature": sweep.temperature,
        "top_p": sweep.top_p,
        "eos_token_id": stops,
        "pad_token_id": pad_id,
    }


def encode_prompts(tokenizer: Any, texts: list[str], max_prompt_length: int | None) -> list[list[int]]:
    """Token ids as the tokenize stage makes them (BOS not doubled), optionally left-truncated."""
    from alignheads.tasks.tokenize import _encode_prompts, truncate_prompt

    ids = [list(x) for x in _encode_prompts(tokenizer, texts)]
    if max_prompt_length is not None:
        ids = [truncate_prompt(x, max_prompt_length, tokenizer.bos_token_id)[0] for x in ids]
    for text, x in zip(texts, ids, strict=True):
        if not x:
            raise ValueError(f"prompt {text!r} tokenizes to no tokens")
    return ids


def left_pad(ids: list[list[int]], pad_id: int, device: Any):
    """Token id lists → left-padded ``(input_ids (B, P), attention_mask (B, P))`` on `device`."""
    import torch

    width = max(len(x) for x in ids)
    input_ids = torch.full((len(ids), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for row, x in enumerate(ids):
        input_ids[row, width - len(x) :] = torch.tensor(x, dtype=torch.long)
        mask[row, width - len(x) :] = 1
    return input_ids.to(device), mask.to(device)


def eos_ids(tokenizer: Any, model: Any) -> list[int]:
    """Where generation stops: the tokenizer's EOS plus any EOS ids of the model's generation
    config (chat models end turns with their own token)."""
    ids = [] if tokenizer.eos_token_id is None else [int(tokenizer.eos_token_id)]
    extra = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for i in extra if isinstance(extra, list) else [extra]:
        if i is not None and int(i) not in ids:
            ids.append(int(i))
    return ids


def until_eos(ids: list[int], stop: set[int]) -> tuple[list[int], bool]:
    """The generated ids up to and including the first stop id, and whether one was reached."""
    end = next((i + 1 for i, t in enumerate(ids) if t in stop), None)
    return (ids[:end], True) if end is not None else (ids, False)


def _row_stats(recorded: dict, row: int, n: int) -> dict[str, float | None]:
    from alignheads.models.modstats import strength_stats

    stats: dict[str, float | None] = dict.fromkeys(
        ("kl_mean", "kl_sum", "strength_mean", "strength_max", "utilisation", "align_norm_mean")
    )
    if "kl_to_base" in recorded:
        kl = recorded["kl_to_base"][row, :n].double()
        stats["kl_sum"] = kl.sum().item()
        stats["kl_mean"] = kl.mean().item()
    if "strength" in recorded:
        s = strength_stats(recorded["strength"][row, :n])
        stats |= {"strength_mean": s.mean, "strength_max": s.max, "utilisation": s.utilisation}
    if "align_norm" in recorded:
        stats["align_norm_mean"] = recorded["align_norm"][row, :n].double().mean().item()
    return stats


def sample_responses(
    lm: Any,
    tokenizer: Any,
    prompts: Sequence[Prompt],
    sweep: SweepConfig,
    *,
    alpha: float | None = None,
    progress: bool = False,
    desc: str = "generating",
) -> list[dict[str, Any]]:
    """Responses to `prompts` with common random numbers (see the module docstring).

    `lm`: an `AlignedLM` (generated at `alpha`, with per-token KL to the base and the head's
    statistics recorded) or a plain transformers causal LM (statistics null). Returns one dict
    per (prompt, sample), ordered by prompt then sample, with the generations table's
    per-row columns plus `token_ids` (the counted generated tokens).
    """
    from alignheads.models.aligned import AlignedLM, generate_kwargs, plain_generation_config

    aligned = lm if isinstance(lm, AlignedLM) else None
    model = aligned.model if aligned is not None else lm
    stops = eos_ids(tokenizer, model)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    settings = generate_kwargs(decoding_settings(sweep, stops, pad_id))

    def decode(input_ids, mask):
        if aligned is None:
            return model.generate(input_ids, attention_mask=mask, **settings), {}
        with aligned.recording() as recorder:
            out = aligned.generate(input_ids, attention_mask=mask, alpha=alpha, **settings)
        return out, recorder.stacked()

    with plain_generation_config(model):
        return sample_batches(decode, tokenizer, prompts, sweep, stops, pad_id, model, progress, desc)


def sample_batches(
    decode: Callable[[Any, Any], tuple[Any, dict[str, Any]]],
    tokenizer: Any,
    prompts: Sequence[Prompt],
    sweep: SweepConfig,
    stops: list[int],
    pad_id: int,
    model: Any,
    progress: bool,
    desc: str,
) -> list[dict[str, Any]]:
    """The sweep's sampling loop, whatever decodes a batch: for each sample index and batch of
    prompts (left-padded), seed torch from (seed, sample, batch) and call ``decode(input_ids
    (B, P), attention_mask (B, P)) -> (sequences (B, P + N), recorded {name: (B, N)})``; the
    rows of `sample_responses`, with the recorded per-token statistics summarised per row."""
    import torch
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    prompts = list(prompts)
    texts = [text for _, text in prompts]
    encoded = encode_prompts(tokenizer, texts, sweep.max_prompt_length)
    bs = sweep.batch_size
    starts = list(range(0, len(prompts), bs))
    rows: list[dict[str, Any]] = []
    bar = tqdm(total=sweep.n_samples * len(starts), desc=desc, disable=not progress, leave=False)
    eos_set = set(stops)
    with torch.inference_mode():
        for sample in range(sweep.n_samples):
            for batch_index, start in enumerate(starts):
                input_ids, mask = left_pad(encoded[start : start + bs], pad_id, device)
                seed = batch_seed(sweep.seed, sample, batch_index)
                with SAMPLING_LOCK:
                    torch.manual_seed(seed)
                    out, recorded = decode(input_ids, mask)
                generated = out[:, input_ids.shape[1] :].cpu().tolist()
                if recorded and recorded["kl_to_base"].shape[1] != len(generated[0]):
                    raise RuntimeError(
                        f"recorded {recorded['kl_to_base'].shape[1]} steps for {len(generated[0])} "
                        "generated tokens: the output layer was not called once per token"
                    )
                kept = []
                for row, ids in enumerate(generated):
                    counted, ended = until_eos(ids, eos_set)
                    n = len(counted)
                    kept.append(counted)
                    rows.append(
                        {
                            "_order": (start + row, sample),
                            "prompt_id": prompts[start + row][0],
                            "sample_index": sample,
                            "seed": seed,
                            "prompt": texts[start + row],
                            "n_tokens": n,
                            "finish_reason": "eos" if ended else "length",
                            "token_ids": counted,
                            **_row_stats(recorded, row, n),
                        }
                    )
                responses = tokenizer.batch_decode(kept, skip_special_tokens=True)
                for row, text in zip(rows[-len(kept) :], responses, strict=True):
                    row["response"] = text
                bar.update(1)
    bar.close()
    rows.sort(key=lambda r: r.pop("_order"))
    return rows
