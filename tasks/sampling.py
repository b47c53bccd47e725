"""The sweep's sampling loop, shared by every method: prompts in, rows of the `generations`
table out, with common random numbers.

Common random numbers. Every (prompt, sample) row samples from its own seed,
``row_seed(sweep.seed, prompt text, sample index)`` (`models.row_sampling`: Gumbel-max noise from
one generator per row, decoded greedily), so it draws the same random numbers at every α, for
every method and in whatever batch it lands. Differences between α and between methods then
come from α and the method, not from sampling noise. A method's whole sweep is one pass over
the model loaded once. With a head whose Δ is zero, every α (and the plain base model) produces
identical text. The seed used is recorded per row. Batch composition changes results only
through float roundoff (padding widths, matmul blocking), which is why `batch_size` stays in
the cache key and why a batch holds one α only: an α's rows are then the same bits whichever
other α share the pass, so a resumed sweep equals an uninterrupted one exactly.

Decoding is fully determined by the sweep settings: the model's own `generation_config.json`
defaults (top-k, repetition penalty, ...) are set aside during generation, and top-k is off.
Generation stops at EOS: the tokenizer's EOS plus any EOS ids of the model's generation config
(chat models end turns with their own token).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from alignheads.config import SweepConfig
from alignheads.tasks.prompts import Prompt


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
        # KL is >= 0; a tiny negative value is float roundoff of two equal distributions
        kl = recorded["kl_to_base"][row, :n].double().clamp_min(0.0)
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

    `lm`: an `AlignedLM` (generated at `alpha`, default its current α, with per-token KL to the
    base and the head's statistics recorded) or a plain transformers causal LM (statistics null).
    Returns one dict per (prompt, sample), ordered by prompt then sample, with the generations
    table's per-row columns plus `token_ids` (the counted generated tokens).
    """
    from alignheads.models.aligned import AlignedLM, plain_generation_config
    from alignheads.models.kv_cache import with_prefix_cache
    from alignheads.models.row_sampling import seeded_decoding

    aligned = lm if isinstance(lm, AlignedLM) else None
    model = aligned.model if aligned is not None else lm
    stops = eos_ids(tokenizer, model)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    settings = decoding_settings(sweep, stops, pad_id)

    def decode(input_ids, mask, alphas, seeds):
        if aligned is None:
            kwargs = with_prefix_cache(model, seeded_decoding(settings, seeds))
            return model.generate(input_ids, attention_mask=mask, **kwargs), {}
        with aligned.recording() as recorder:
            out = aligned.generate(input_ids, attention_mask=mask, alpha=alphas, **seeded_decoding(settings, seeds))
        return out, recorder.stacked()

    at = float(alpha) if alpha is not None else (float(aligned.alpha) if aligned is not None else 0.0)
    with plain_generation_config(model):
        rows = sample_batches(decode, tokenizer, prompts, [at], sweep, stops, pad_id, model, progress, desc)
    for row in rows:
        del row["alpha"]
    return rows


def sample_batches(
    decode: Callable[[Any, Any, Any, list[int]], tuple[Any, dict[str, Any]]],
    tokenizer: Any,
    prompts: Sequence[Prompt],
    alphas: Sequence[float] | Sequence[Sequence[float]],
    sweep: SweepConfig,
    stops: list[int],
    pad_id: int,
    model: Any,
    progress: bool,
    desc: str,
) -> list[dict[str, Any]]:
    """The sweep's sampling loop, whatever decodes a batch: every (sample, prompt, α) row, its
    seed ``row_seed(sweep.seed, prompt text, sample)`` (the same at every α), in batches of at
    most `sweep.batch_size` rows of one α each (left-padded), each decoded by
    ``decode(input_ids (B, P), attention_mask (B, P), alphas (B,) or (B, K), seeds [B]) ->
    (sequences (B, P + N), recorded {name: (B, N)})``. An α is one float, or for dials a vector
    of K floats (one per dial; the rows' `alpha` is then that tuple). Returns the rows ordered by
    α, prompt, sample, with the recorded per-token statistics summarised per row."""
    import torch
    from tqdm.auto import tqdm

    from alignheads.models.row_sampling import row_seed

    device = next(model.parameters()).device
    prompts = list(prompts)
    alphas = [float(a) if isinstance(a, int | float) else tuple(float(x) for x in a) for a in alphas]
    texts = [text for _, text in prompts]
    encoded = encode_prompts(tokenizer, texts, sweep.max_prompt_length)
    seeds = {(i, sample): row_seed(sweep.seed, texts[i], sample) for sample in range(sweep.n_samples) for i in range(len(prompts))}
    # batches never mix α: an α's rows then do not depend on which other α share the pass (float
    # roundoff follows the batch shape), so a resumed or partial sweep equals a whole one bit for bit
    bs = sweep.batch_size
    batches = []
    for a in range(len(alphas)):
        jobs = [(sample, i, a, seeds[(i, sample)]) for sample in range(sweep.n_samples) for i in range(len(prompts))]
        batches += [jobs[start : start + bs] for start in range(0, len(jobs), bs)]
    rows: list[dict[str, Any]] = []
    bar = tqdm(total=sum(map(len, batches)), desc=desc, unit="response", disable=not progress, leave=False)
    eos_set = set(stops)
    with torch.inference_mode():
        for batch in batches:
            input_ids, mask = left_pad([encoded[i] for _, i, _, _ in batch], pad_id, device)
            row_alphas = torch.tensor([alphas[a] for _, _, a, _ in batch], dtype=torch.float32)
            out, recorded = decode(input_ids, mask, row_alphas.to(device), [seed for *_, seed in batch])
            generated = out[:, input_ids.shape[1] :].cpu().tolist()
            if recorded and recorded["kl_to_base"].shape[1] != len(generated[0]):
                raise RuntimeError(
                    f"recorded {recorded['kl_to_base'].shape[1]} steps for {len(generated[0])} "
                    "generated tokens: the output layer was not called once per token"
                )
            kept = []
            for row, ((sample, i, a, seed), ids) in enumerate(zip(batch, generated, strict=True)):
                counted, ended = until_eos(ids, eos_set)
                n = len(counted)
                kept.append(counted)
                rows.append(
                    {
                        "_order": (a, i, sample),
                        "alpha": alphas[a],
                        "prompt_id": prompts[i][0],
                        "sample_index": sample,
                        "seed": seed,
                        "prompt": texts[i],
                        "n_tokens": n,
                        "finish_reason": "eos" if ended else "length",
                        "token_ids": counted,
                        **_row_stats(recorded, row, n),
                    }
                )
            responses = tokenizer.batch_decode(kept, skip_special_tokens=True)
            for row, text in zip(rows[-len(kept) :], responses, strict=True):
                row["response"] = text
            bar.update(len(batch))
    bar.close()
    rows.sort(key=lambda r: r.pop("_order"))
    return rows
