"""CALM's per-step cost at decoding, taken apart: the head's own work eager and under torch.compile,
beside the base model's output layer and a whole decode step, side by side in one run.

(A script, not a module of the package, like the other benchmarks.)

    .venv/bin/python benchmarks/calm_step_bench.py             # the tiny world's shape, CPU
    .venv/bin/python benchmarks/calm_step_bench.py --dry-run   # fewer calls, no compile: checks the set-up

What one decoding step costs, per call, at batch 1 and 16 (µs, best and median of interleaved rounds):

- lm_head: the frozen output layer on the step's hidden state (what the base model pays);
- calm eager: the running context's one-token update (`context.step_context`) plus the head's
  logits (`CALMHead.logits`: the frozen output layer, the rank-R codes, the gate, one `addmm`),
  i.e. everything CALM runs per step outside the backbone, as `AlignedLM` runs it;
- calm compiled: the same function through `torch.compile` (inductor's C++ kernels on the CPU),
  where a compiler is installed; its logits are checked against the eager ones;
- compile floor: a compiled `x + 1` against the eager one, the fixed cost of entering a compiled
  graph (guards, wrapper) that no fusion inside it can remove;
- decode step: the base model's `generate()` time per new token (prompt 128 + 128 new tokens),
  which sets what a fixed per-step cost weighs.

The implied speed is `step / (step + calm − lm_head)`: what CALM decoding would reach if the head's
work were its only cost (the hooks that track the context come on top; `decode_bench.py`'s calm@0
row measures them).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from common import best_and_median, interleaved, machine_line, print_table, random_llama, tiny_world_shape
from torch import Tensor, nn

from alignheads.models import new_head
from alignheads.models.context import RunningContext, step_context
from alignheads.models.kv_cache import with_prefix_cache

ALPHA = 1.0
PREFIX = 128  # tokens already in the running context: the step after a 128-token prompt


def calm_step(head: nn.Module, frozen: nn.Module) -> Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]:
    """``(hidden (B, 1, H), mask (B, 1), hidden_sum (B, H), count (B,)) -> logits (B, 1, V)``: one
    decoding step's head work, the context update included."""

    def step(hidden: Tensor, mask: Tensor, hidden_sum: Tensor, count: Tensor) -> Tensor:
        context, _state = step_context(hidden, mask, RunningContext(hidden_sum, count, PREFIX))
        return head.logits(hidden, ALPHA, frozen_head=frozen, context=context)

    return step


def repeated(fn: Callable[[], object], calls: int) -> Callable[[], None]:
    def run() -> None:
        for _ in range(calls):
            fn()

    return run


def decode_step_seconds(model: nn.Module, batch: int, rounds: int) -> float:
    """Median seconds per new token of the base model's greedy ``generate()`` (prompt 128 + 128 new)."""
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, model.config.vocab_size, (batch, PREFIX), generator=gen)
    kw = {"max_new_tokens": 128, "do_sample": False, "use_cache": True, "pad_token_id": 0}
    model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **with_prefix_cache(model, kw))  # warm-up
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **with_prefix_cache(model, kw))
        times.append((time.perf_counter() - t) / 128)
    return sorted(times)[len(times) // 2]


def measure(model: nn.Module, head: nn.Module, batch: int, args: argparse.Namespace) -> list[list[str]]:
    frozen = model.get_output_embeddings()
    width = frozen.weight.shape[1]
    gen = torch.Generator().manual_seed(batch)
    hidden = torch.randn(batch, 1, width, generator=gen)
    mask = torch.ones(batch, 1, dtype=torch.long)
    hidden_sum = torch.randn(batch, width, generator=gen) * PREFIX
    count = torch.full((batch,), float(PREFIX))
    step = calm_step(head, frozen)
    runs: dict[str, Callable[[], None]] = {
        "lm_head": repeated(lambda: frozen(hidden), args.calls),
        "calm eager": repeated(lambda: step(hidden, mask, hidden_sum, count), args.calls),
    }
    notes = []
    if args.compile:
        compiled = torch.compile(step, dynamic=False)
        started = time.perf_counter()
        out = compiled(hidden, mask, hidden_sum, count)
        compile_s = time.perf_counter() - started
        diff = (out - step(hidden, mask, hidden_sum, count)).abs().max().item()
        notes.append(f"compiled in {compile_s:.1f} s, max |compiled - eager| logit {diff:.2e}")
        runs["calm compiled"] = repeated(lambda: compiled(hidden, mask, hidden_sum, count), args.calls)
        plus_one = torch.compile(lambda x: x + 1, dynamic=False)
        plus_one(hidden)
        runs["x + 1 eager"] = repeated(lambda: hidden + 1, args.calls)
        runs["x + 1 compiled"] = repeated(lambda: plus_one(hidden), args.calls)
    for fn in runs.values():  # warm-up
        fn()
    times = interleaved(runs, args.rounds)
    micro = {name: [t / args.calls * 1e6 for t in ts] for name, ts in times.items()}
    step_us = decode_step_seconds(model, batch, args.decode_rounds) * 1e6
    rows = []
    for name, us in micro.items():
        best, median = best_and_median(us)
        implied = ""
        if name.startswith("calm"):
            extra = median - statistics.median(micro["lm_head"])
            implied = f"{step_us / (step_us + extra):.3f}"
        rows.append([name, str(batch), f"{best:.1f}", f"{median:.1f}", implied])
    rows.append(["decode step", str(batch), "", f"{step_us:.1f}", "1.000"])
    for note in notes:
        print(f"batch {batch}: {note}")
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", default="1,16", help="batch sizes, comma-separated")
    parser.add_argument("--calls", type=int, default=2000, help="calls per timed round")
    parser.add_argument("--rounds", type=int, default=7, help="interleaved rounds")
    parser.add_argument("--decode-rounds", type=int, default=5, help="generate() calls for the decode step")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--no-compile", dest="compile", action="store_false", help="skip torch.compile")
    parser.add_argument("--dry-run", action="store_true", help="50 calls, 1 round, no compile")
    args = parser.parse_args(argv)
    if args.dry_run:
        args.calls, args.rounds, args.decode_rounds, args.compile = 50, 1, 1, False
    torch.set_num_threads(args.threads)

    shape, layers = tiny_world_shape()
    model = random_llama(shape, layers, torch.device("cpu"), torch.float32, seed=0)
    model.generation_config.eos_token_id = None  # every row decodes all its new tokens
    head = new_head("calm", model)
    with torch.no_grad():  # a trained head's U is not zero; the cost is the same
        head.up.weight.copy_(torch.randn(head.up.weight.shape, generator=torch.Generator().manual_seed(2)) * 0.02)
    head.eval().requires_grad_(False)

    print(machine_line("CALM step benchmark"))
    print(
        f"tiny world's shape, random Llama: {layers} layers, H = {shape['hidden_size']}, "
        f"V = {shape['vocab_size']}, float32; CALM rank {head.config.rank}; alpha = {ALPHA}; "
        f"{args.calls} calls x {args.rounds} interleaved rounds"
    )
    rows = []
    with torch.inference_mode():
        for batch in (int(b) for b in args.batches.split(",")):
            rows += measure(model, head, batch, args)
    columns = [("work per step", 14), ("batch", 5), ("us best", 8), ("us median", 9), ("implied x base", 14)]
    print_table(columns, rows)
    print("implied x base = decode step / (decode step + calm - lm_head), medians: the head's work only")


if __name__ == "__main__":
    main()
