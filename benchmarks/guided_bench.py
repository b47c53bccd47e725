"""Guided-decoding benchmark: the work `models.guided` leaves out, measured side by side.

(A script, not a module of the package: one command reproduces its BENCHMARKS.md tables.)

    .venv/bin/python benchmarks/guided_bench.py --store store   # a store the embedded default has run in
    .venv/bin/python benchmarks/guided_bench.py --dry-run       # its machinery on random tiny models

Both tables decode one sweep batch as the pipeline does (`tasks.sampling`: the sweep's first
`--rows` prompts, left-padded, each row seeded by `row_seed(0, prompt, 0)`, 48 new tokens, the
world's EOS), with the run's own models: the world's LM as the base and the GenARM reward LMs
trained in the store (the run's, then the dials'). Calls are interleaved, `--repeats` rounds after
a warm-up; the figures are medians.

1. **Finished rows leave the batch.** GenARM at α = 1 with every row kept to the end
   (``min_rows`` = the batch) against the default (rows leave once a quarter have finished, never
   below 16), and whether both give the same tokens and the same per-step KL bits.
2. **An LM no row weighs is not run.** Multi-objective GenARM with three reward LMs at the α
   vectors (0, 0, 0), (1, 0, 0), (1, 1, 0) and (1, 1, 1): the forwards each runs per token and its
   time against (1, 1, 1).
3. **Two sweeps at once: threads or processes** (`runner.kind`). `2 × --repeats` GenARM batches
   decoded one after the other in one thread, then split over two threads of one process, then
   over two processes (this script in a worker mode): each one's batches per second against the
   first's.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch
from common import machine_line, print_table, random_llama

from alignheads.models.genarm import genarm_logits, multi_genarm_logits
from alignheads.models.guided import guided_decode, multi_guided_decode
from alignheads.models.row_sampling import row_seed, seeded_decoding
from alignheads.tasks.sampling import encode_prompts, left_pad

NEW_TOKENS = 48
VECTORS = ((0.0, 0.0, 0.0), (1.0, 0.0, 0.0), (1.0, 1.0, 0.0), (1.0, 1.0, 1.0))


def store_models(store: Path, rows: int):
    """(base, [reward LMs], input_ids, mask, seeds, decoding settings) from a store's run."""
    from alignheads.loading import load_causal_lm, load_tokenizer
    from alignheads.tasks.prompts import read_prompt_set

    world = sorted((store / "world").glob("*/model"))[0]
    rewards = []
    for manifest in sorted((store / "train").glob("*/manifest.json")):
        info = json.loads(manifest.read_text())
        if info["config"].get("kind") == "genarm":
            rewards.append((info["created_at"], manifest.parent / "model"))
    if len(rewards) < 3:
        raise SystemExit(f"{store}: needs three GenARM reward LMs (the embedded default trains four)")
    sweeps = [p for p in (store / "prompts").glob("*/manifest.json") if json.loads(p.read_text())["config"]["n"] >= rows]
    prompts = read_prompt_set(sweeps[0].parent)[:rows]
    tokenizer = load_tokenizer(str(world))
    base = load_causal_lm(str(world), None, "float32", False).eval()
    lms = [load_causal_lm(str(path), None, "float32", False).eval() for _, path in sorted(rewards)[:3]]
    texts = [text for _, text in prompts]
    stops = [tokenizer.eos_token_id]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    ids, mask = left_pad(encode_prompts(tokenizer, texts, None), pad, "cpu")
    settings = {"max_new_tokens": NEW_TOKENS, "do_sample": True, "temperature": 1.0, "top_p": 1.0,
                "eos_token_id": stops, "pad_token_id": pad}  # fmt: skip
    return base, lms, ids, mask, [row_seed(0, t, 0) for t in texts], settings


def random_models(rows: int):
    """The same set-up on random tiny models (``--dry-run``): token 2 ends a row."""
    shape = {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 4, "vocab_size": 8}
    base, *lms = (random_llama(shape, 1, torch.device("cpu"), torch.float32, seed=s) for s in range(4))
    gen = torch.Generator().manual_seed(0)
    lengths = [4 + i % 5 for i in range(rows)]
    ids = torch.zeros(rows, max(lengths), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        ids[row, -n:], mask[row, -n:] = torch.randint(3, 8, (n,), generator=gen), 1
    settings = {"max_new_tokens": 12, "do_sample": True, "temperature": 1.0, "top_p": 1.0,
                "eos_token_id": [2], "pad_token_id": 0}  # fmt: skip
    return base, lms, ids, mask, list(range(rows)), settings


def timed(calls: dict, repeats: int) -> tuple[dict[str, float], dict]:
    """Median seconds of each call over `repeats` interleaved rounds after a warm-up, and its last output."""
    seconds: dict[str, list[float]] = {name: [] for name in calls}
    outputs = {name: fn() for name, fn in calls.items()}  # warm-up
    for _ in range(repeats):
        for name, fn in calls.items():
            t = time.perf_counter()
            outputs[name] = fn()
            seconds[name].append(time.perf_counter() - t)
    return {name: statistics.median(v) for name, v in seconds.items()}, outputs


def concurrency(decode, args: argparse.Namespace) -> list[list[str]]:
    """Rows of table 3: the same batch decoded 2 × repeats times in one thread, in two threads,
    and in two processes (each running ``--worker`` mode: its own load, then its share, timed)."""
    calls = 2 * args.repeats
    t = time.perf_counter()
    for _ in range(calls):
        decode()
    one = time.perf_counter() - t
    threads = [threading.Thread(target=lambda: [decode() for _ in range(args.repeats)]) for _ in range(2)]
    t = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    two_threads = time.perf_counter() - t
    command = [sys.executable, __file__, "--worker", str(args.repeats), "--rows", str(args.rows)]
    command += ["--dry-run"] if args.dry_run else ["--store", str(args.store)]
    workers = [subprocess.Popen(command, stdout=subprocess.PIPE, text=True) for _ in range(2)]
    # each worker times its own calls after loading: the slower of the two is the pair's time
    two_processes = max(float(w.communicate()[0].split()[-1]) for w in workers)
    rows = [("one thread", one), ("two threads", two_threads), ("two processes", two_processes)]
    return [[name, f"{calls / s:.2f}", f"{one / s:.2f}"] for name, s in rows]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", type=Path, help="a store the embedded default has run in")
    parser.add_argument("--rows", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dry-run", action="store_true", help="random tiny models, 1 round")
    parser.add_argument("--worker", type=int, help=argparse.SUPPRESS)  # table 3: decode N batches, print seconds
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if args.dry_run:
        base, lms, ids, mask, seeds, settings = random_models(min(args.rows, 40))
        args.repeats = 1 if args.worker is None else args.worker
    elif args.store is None:
        parser.error("--store is needed (or --dry-run)")
    else:
        base, lms, ids, mask, seeds, settings = store_models(args.store, args.rows)
    if args.worker is not None:
        decode = lambda: guided_decode(base, lms[0], ids, mask, genarm_logits, 1.0, **seeded_decoding(settings, seeds))  # noqa: E731
        decode()  # warm-up, as in the other rows
        t = time.perf_counter()
        for _ in range(args.worker):
            decode()
        print(time.perf_counter() - t)
        return
    rows = ids.shape[0]
    print(machine_line("guided decoding benchmark"))
    print(f"{rows} rows, prompts of {int(mask.sum(1).min())}-{int(mask.sum(1).max())} tokens, "
          f"at most {settings['max_new_tokens']} new tokens; median of {args.repeats} interleaved calls")  # fmt: skip

    def genarm(min_rows: int):
        return lambda: guided_decode(base, lms[0], ids, mask, genarm_logits, 1.0, min_rows=min_rows,
                                     **seeded_decoding(settings, seeds))  # fmt: skip

    seconds, out = timed({"every row to the end": genarm(rows), "finished rows leave": genarm(16)}, args.repeats)
    kept, cut = out["every row to the end"], out["finished rows leave"]
    same = torch.equal(kept.sequences, cut.sequences)
    new = kept.sequences[:, ids.shape[1] :]
    ends = [next((i + 1 for i, t in enumerate(r) if t in settings["eos_token_id"]), len(r)) for r in new.tolist()]
    same_kl = all(torch.equal(kept.kl_to_base[i, :n], cut.kl_to_base[i, :n]) for i, n in enumerate(ends))
    print(f"\nGenARM at alpha = 1: generated tokens per row mean {statistics.mean(ends):.1f}, "
          f"the batch ran {new.shape[1]} steps")  # fmt: skip
    print_table(
        [("decoding", 22), ("s/call", 8), ("x kept", 8), ("same tokens", 12), ("same KL bits", 13)],
        [[name, f"{s:.3f}", f"{seconds['every row to the end'] / s:.2f}", "yes" if same else "NO",
          "yes" if same_kl else "NO"] for name, s in seconds.items()],
    )  # fmt: skip

    def multi(vector):
        alphas = torch.tensor(vector).expand(rows, -1)
        return lambda: multi_guided_decode(base, lms, ids, mask, multi_genarm_logits, alphas,
                                           **seeded_decoding(settings, seeds))  # fmt: skip

    seconds, _ = timed({vector: multi(vector) for vector in VECTORS}, args.repeats)
    full = seconds[VECTORS[-1]]
    print("\nmulti-objective GenARM, three reward LMs: the LMs an alpha vector weighs are the only ones run")
    print_table(
        [("alpha vector", 16), ("forwards/token", 15), ("s/call", 8), ("x (1, 1, 1)", 12)],
        [[str(v), str(1 + sum(a != 0 for a in v)), f"{s:.3f}", f"{full / s:.2f}"] for v, s in seconds.items()],
    )  # fmt: skip

    print(f"\ntwo sweeps at once: {2 * args.repeats} GenARM batches (alpha = 1) in one thread, two threads, two processes")
    print_table([("decoding", 14), ("batches/s", 10), ("x one", 6)], concurrency(genarm(16), args))


if __name__ == "__main__":
    main()
