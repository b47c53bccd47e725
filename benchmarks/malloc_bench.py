"""Allocator benchmark: one sweep batch sampled under glibc's default malloc and under the training
loop's mapping threshold (`tasks.training.loop.mmap_large_allocations`), side by side.

(A script, not a module of the package: one command reproduces its BENCHMARKS.md table.)

    .venv/bin/python benchmarks/malloc_bench.py            # the tiny world's shape, GenARM at 128 rows
    .venv/bin/python benchmarks/malloc_bench.py --dry-run  # its set-up at tiny sizes

The threshold is a setting of the whole process: once the first training has started, every later
allocation of the pipeline's process (the method sweeps, the dials beside the trainings) is
served under it. Blocks at or above it get a mapping of their own, which the kernel zero-fills
page by page at first touch and unmaps when freed; below it they come from the heap and are
reused. A sweep batch allocates its prefill activations and its KV-cache buffers, 1-18 MiB each
at the tiny world's shape, on every call.

Each setting runs in a fresh process (the setting cannot be undone in one), alternating, and the
same batch is decoded `--calls` times after a warm-up call: GenARM (`models.genarm`: the base and
a reward LM of the same shape, in-place KV cache), 128 left-padded rows of 32-96 random prompt
tokens, 48 new tokens, each row with its own seed, as the sweep decodes. Per call: wall time, the
process's user and system CPU time and its minor page faults (getrusage); the check: the same
tokens under every setting.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

from common import machine_line, print_table

HERE = Path(__file__).resolve().parent
# (label, threshold in bytes; 0 = glibc's default, a threshold that follows the largest block freed)
SETTINGS = (("glibc default", 0), ("1 MiB (before)", 1 << 20), ("the loop's", None))

CHILD = """
import json, resource, sys, time
import torch
sys.path.insert(0, {here!r})
from common import random_llama, tiny_world_shape
from kv_cache_bench import prompts
from alignheads.models.genarm import genarm_generate
from alignheads.models.row_sampling import seeded_decoding
from alignheads.tasks.training.loop import MMAP_THRESHOLD_BYTES, mmap_large_allocations

torch.set_num_threads(1)
threshold = {threshold}
threshold = MMAP_THRESHOLD_BYTES if threshold is None else threshold
if threshold:
    mmap_large_allocations(threshold)
shape, layers = tiny_world_shape()
if {dry_run}:
    shape, layers = {{"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 4, "vocab_size": 64}}, 1
rows, new_tokens = {rows}, {new_tokens}
base = random_llama(shape, layers, torch.device("cpu"), torch.float32, seed=0)
reward = random_llama(shape, layers, torch.device("cpu"), torch.float32, seed=1)
ids, mask = prompts(rows, shape["vocab_size"], torch.device("cpu"))
settings = {{"max_new_tokens": new_tokens, "do_sample": True, "temperature": 1.0, "top_p": 1.0,
            "eos_token_id": None, "pad_token_id": 0}}

def call():
    return genarm_generate(base, reward, ids, mask, alpha=1.0, **seeded_decoding(settings, list(range(rows))))  # (B, P + N)

tokens = call()
out = []
for _ in range({calls}):
    r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    same = torch.equal(call(), tokens)
    t1, r1 = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
    out.append({{"wall": t1 - t0, "user": r1.ru_utime - r0.ru_utime, "sys": r1.ru_stime - r0.ru_stime,
                "faults": r1.ru_minflt - r0.ru_minflt, "same": same}})
print(json.dumps({{"threshold": threshold, "calls": out, "tokens": tokens.sum().item()}}))
"""


def run_setting(threshold: int | None, args: argparse.Namespace) -> dict:
    """One fresh process decoding the batch under `threshold` (None: the training loop's)."""
    code = CHILD.format(here=str(HERE), threshold=threshold, dry_run=args.dry_run, rows=args.rows,
                        new_tokens=args.new_tokens, calls=args.calls)  # fmt: skip
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=3, help="processes per setting, alternating")
    parser.add_argument("--calls", type=int, default=3, help="timed calls per process (after one warm-up)")
    parser.add_argument(
        "--dry-run", action="store_true", help="tiny sizes, 1 round of 1 call: the set-up only"
    )
    args = parser.parse_args(argv)
    args.rows, args.new_tokens = (4, 4) if args.dry_run else (128, 48)
    if args.dry_run:
        args.rounds, args.calls = 1, 1
    results: dict[str, list[dict]] = {label: [] for label, _ in SETTINGS}
    thresholds: dict[str, int] = {}
    tokens: set[int] = set()
    for _ in range(args.rounds):
        for label, threshold in SETTINGS:
            run = run_setting(threshold, args)
            results[label] += run["calls"]
            thresholds[label] = run["threshold"]
            tokens.add(run["tokens"])
    print(machine_line(f"allocator benchmark{' (dry run)' if args.dry_run else ''}"))
    print(f"GenARM sweep batch: {args.rows} rows, prompts of 32-96 tokens, {args.new_tokens} new tokens, the tiny "
          f"world's shape{' (dry run: tiny)' if args.dry_run else ''}; {args.rounds} processes per setting, "
          f"alternating, {args.calls} timed calls each")  # fmt: skip
    base = statistics.median(c["wall"] for c in results["glibc default"])
    rows = []
    for label, calls in results.items():
        wall = statistics.median(c["wall"] for c in calls)
        rows.append([label, f"{thresholds[label] / 2**20:g} MiB" if thresholds[label] else "dynamic",
                     f"{wall:.3f}", f"{statistics.median(c['user'] for c in calls):.3f}",
                     f"{statistics.median(c['sys'] for c in calls):.3f}",
                     f"{statistics.median(c['faults'] for c in calls):.0f}", f"{wall / base:.3f}",
                     "yes" if all(c["same"] for c in calls) else "NO"])  # fmt: skip
    columns = [("malloc", 14), ("threshold", 9), ("s/call", 7), ("user s", 7), ("sys s", 6),
               ("page faults", 11), ("x default", 9), ("same tokens", 11)]  # fmt: skip
    print_table(columns, rows)
    print(f"medians over the calls; x default: wall time against glibc's default; one token sum under every "
          f"setting: {'yes' if len(tokens) == 1 else 'NO'}")  # fmt: skip


if __name__ == "__main__":
    main()
