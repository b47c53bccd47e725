"""KV-cache benchmark: transformers' `DynamicCache` against the in-place cache (`models.kv_cache`), side by side.

(A script, not a module of the package: one command reproduces its BENCHMARKS.md table.)

    .venv/bin/python benchmarks/kv_cache_bench.py                        # CPU preset: the tiny world's shape
    .venv/bin/python benchmarks/kv_cache_bench.py --preset gpu           # 7B-shaped random Llama, bf16
    .venv/bin/python benchmarks/kv_cache_bench.py --dry-run              # its set-up at tiny sizes

What the sweeps decode: left-padded prompts of 32–96 random tokens, 48 new tokens (no EOS stops a
row early), each row sampling from its own seed (`models.row_sampling`), at batch 1, 16 and 128
(the sweep's `batch_size`). Two decoders, each with either cache:

- generate: the plain LM's `generate()` (what a head's decoding runs, with the head installed);
- genarm: `models.genarm.genarm_generate`, the base and an equally sized reward LM, one cache each
  (GenARM's and DPO + DeRa's loop, `models.guided`).

`DynamicCache` concatenates every layer's keys and values with each new token, copying the whole
cache; the in-place cache writes into room reserved at the prefill. The two are interleaved in
every repeat, and the ratio is the median of the per-repeat ratios. The check printed with each
row: both caches sampled the same tokens.
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from unittest import mock

import torch
from common import (
    LLAMA_7B,
    best_and_median,
    interleaved,
    machine_line,
    print_table,
    random_llama,
    tiny_world_shape,
)
from torch import Tensor, nn
from transformers import DynamicCache

from alignheads.models import guided
from alignheads.models.genarm import genarm_generate
from alignheads.models.kv_cache import with_prefix_cache
from alignheads.models.row_sampling import seeded_decoding

PAD = 0
PRESETS = {
    "cpu": {"batches": (1, 16, 128), "new_tokens": 48, "repeats": 7, "dtype": torch.float32},
    "gpu": {"batches": (1, 16, 64), "new_tokens": 128, "repeats": 5, "dtype": torch.bfloat16},
}


@contextmanager
def dynamic_cache_in_guided_decoding() -> Iterator[None]:
    """Guided decoding with transformers' own cache (the baseline): its prefill then creates a
    `DynamicCache` as it would without one passed."""
    with mock.patch.object(guided, "prefix_cache", lambda model, reserve: DynamicCache(config=model.config)):
        yield


def prompts(batch: int, vocab: int, device: torch.device, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Left-padded random prompts of 32–96 tokens ``(B, P)`` and their mask."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(32, 97, (batch,), generator=gen).tolist()
    width = max(lengths)
    ids = torch.full((batch, width), PAD, dtype=torch.long)
    mask = torch.zeros((batch, width), dtype=torch.long)
    for row, n in enumerate(lengths):
        ids[row, width - n :] = torch.randint(3, vocab, (n,), generator=gen)
        mask[row, width - n :] = 1
    return ids.to(device), mask.to(device)


def decoders(base: nn.Module, reward: nn.Module, new_tokens: int, batch: int) -> dict[str, Callable[..., Tensor]]:
    """name -> (ids, mask) -> sequences; `dynamic` and `in-place` of each decoder."""
    settings = {"max_new_tokens": new_tokens, "do_sample": True, "temperature": 1.0, "top_p": 1.0,
                "eos_token_id": None, "pad_token_id": PAD}  # fmt: skip
    seeds = list(range(1000, 1000 + batch))

    def generate(cache: str) -> Callable[..., Tensor]:
        def run(ids: Tensor, mask: Tensor) -> Tensor:
            kwargs = seeded_decoding(settings, seeds)
            if cache == "dynamic":
                kwargs["past_key_values"] = DynamicCache(config=base.config)
            with torch.inference_mode():
                return base.generate(ids, attention_mask=mask, **with_prefix_cache(base, kwargs))

        return run

    def genarm(cache: str) -> Callable[..., Tensor]:
        def run(ids: Tensor, mask: Tensor) -> Tensor:
            kwargs = seeded_decoding(settings, seeds)
            if cache == "dynamic":
                with dynamic_cache_in_guided_decoding():
                    return genarm_generate(base, reward, ids, mask, alpha=1.0, **kwargs)
            return genarm_generate(base, reward, ids, mask, alpha=1.0, **kwargs)

        return run

    return {f"{name} {cache}": fn(cache) for name, fn in (("generate", generate), ("genarm", genarm))
            for cache in ("dynamic", "in-place")}  # fmt: skip


def measure(base: nn.Module, reward: nn.Module, batches: tuple[int, ...], new_tokens: int, repeats: int,
            device: torch.device) -> list[list[str]]:  # fmt: skip
    rows = []
    for batch in batches:
        ids, mask = prompts(batch, base.config.vocab_size, device)
        runs = decoders(base, reward, new_tokens, batch)
        outputs = {name: fn(ids, mask) for name, fn in runs.items()}  # warm-up, and the tokens compared
        times = interleaved({name: partial(fn, ids, mask) for name, fn in runs.items()}, repeats, device)
        for decoder in ("generate", "genarm"):
            dyn, ours = times[f"{decoder} dynamic"], times[f"{decoder} in-place"]
            ratio = statistics.median(d / o for d, o in zip(dyn, ours, strict=True))
            same = torch.equal(outputs[f"{decoder} dynamic"], outputs[f"{decoder} in-place"])
            for cache, seconds in (("dynamic", dyn), ("in-place", ours)):
                best, median = best_and_median(seconds)
                tokens = batch * new_tokens
                rows.append([f"{decoder} {cache}", str(batch), f"{tokens / best:.0f}", f"{tokens / median:.0f}",
                             f"{ratio:.3f}" if cache == "in-place" else "1.000",
                             ("yes" if same else "NO") if cache == "in-place" else ""])  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes, 1 repeat: the set-up only")
    args = parser.parse_args(argv)
    preset = PRESETS[args.preset]
    device = torch.device("cuda" if args.preset == "gpu" and not args.dry_run else "cpu")
    if args.dry_run:
        shape, layers = {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 4, "vocab_size": 64}, 1
        batches, new_tokens, repeats, dtype = (1, 4), 4, 1, torch.float32
    elif args.preset == "gpu":
        shape, layers = LLAMA_7B, 32
        batches, new_tokens, repeats, dtype = preset["batches"], preset["new_tokens"], preset["repeats"], preset["dtype"]
    else:
        shape, layers = tiny_world_shape()
        batches, new_tokens, repeats, dtype = preset["batches"], preset["new_tokens"], preset["repeats"], preset["dtype"]
    repeats = args.repeats or repeats
    base = random_llama(shape, layers, device, dtype, seed=0)
    reward = random_llama(shape, layers, device, dtype, seed=1)
    print(machine_line(f"KV-cache benchmark, preset {args.preset}{' (dry run)' if args.dry_run else ''}", device))
    print(f"random Llama: {layers} layers, H = {shape['hidden_size']}, V = {shape['vocab_size']}, {dtype}; "
          f"prompts of 32-96 tokens left-padded, {new_tokens} new tokens, seeded sampling; {repeats} interleaved repeats")  # fmt: skip
    columns = [("decoder, cache", 18), ("batch", 5), ("tok/s best", 10), ("tok/s median", 12),
               ("x dynamic (median)", 18), ("same tokens", 11)]  # fmt: skip
    print_table(columns, measure(base, reward, batches, new_tokens, repeats, device))
    print("x dynamic: DynamicCache's time / the in-place cache's, the median of the per-repeat ratios")


if __name__ == "__main__":
    main()
