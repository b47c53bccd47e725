"""Reference-pass benchmark on the tiny world: cache size, KL accuracy and throughput per k.

    .venv/bin/python benchmarks/refpass_bench.py                # builds a test-size world in a temp dir
    .venv/bin/python benchmarks/refpass_bench.py --store store  # reuses (or builds) the world in a store

For k in 8, 16, 64, 256 it runs the real reference-pass stage (float16 top-k) and prints one
table with, per k:
- bytes per response token of the refcache on disk (all its Parquet shards over all scored
  tokens), the issue's bound 7k + 16, and dense float16 logits (2V bytes) at the world's
  vocabulary; plus the ratio against dense float16 at Llama's V = 32,000 for the uncompressed
  layout (4-byte id + 2-byte value per entry + 4-byte token log-prob), which does not profit
  from the tiny vocabulary's better compression;
- the relative error of the mean top-k + tail KL (from the cache) against the mean exact KL,
  for a non-trivial head: an IAV base head whose weights are the LM head's plus noise;
- the reference pass's tokens/s divided by a bare forward pass's (model(...).logits) tokens/s
  over the same length-sorted batches: compute only, and compute + Parquet write.

The tiny world's backbone is so small (2 layers, width 48) that the per-token work the cache
adds (log-sum-exp and top-k over the vocabulary) weighs as much as the model itself; the last
line therefore times that work at Llama size (H = 4096, V = 32,000) against the output-layer
matmul alone, which is itself a few percent of a 7B forward pass.
"""

from __future__ import annotations

import argparse
import datetime as dt
import platform
import tempfile
import time
from pathlib import Path

import torch
from common import prepare_tiny_world

from alignheads.config import ModelConfig, RefPassConfig
from alignheads.models.losses import exact_kl, topk_tail_kl
from alignheads.models.reference import load_reference, pack_batch
from alignheads.storage.refcache import TABLE, token_matrix
from alignheads.storage.sharded_artifact import shard_path
from alignheads.storage.tables import read_table, read_table_rows, write_shard
from alignheads.tasks.refpass import compute_refpass_shard, plan_refpass, run_refpass

KS = (8, 16, 64, 256)
LLAMA_VOCAB = 32_000


def cache_bytes(path: Path, n_shards: int) -> int:
    return sum((path / shard_path(TABLE, i)).stat().st_size for i in range(n_shards))


def response_hidden(reference, table, tokenized, batch_size: int = 32) -> torch.Tensor:
    """Last hidden states ``(N, H)`` at every scored position, in the refcache's token order."""
    rows = table.select(["pair_index", "side"]).to_pylist()
    prompts = [tokenized[r["pair_index"]]["prompt_ids"] for r in rows]
    responses = [tokenized[r["pair_index"]][f"{r['side']}_ids"] for r in rows]
    out = []
    with torch.inference_mode():
        for i in range(0, len(rows), batch_size):
            b = pack_batch(prompts[i : i + batch_size], responses[i : i + batch_size], pad_id=0)
            h = reference.backbone(input_ids=b.input_ids, attention_mask=b.attention_mask).last_hidden_state
            out.append(h[b.rows, b.cols].float())
    return torch.cat(out)


def kl_errors(reference, tables: dict[int, object], tokenized, noise: float, seed: int) -> tuple[float, dict]:
    """Mean exact KL of a perturbed IAV base head, and the relative error of the cached estimate per k."""
    from alignheads.models import IAVHead

    head = IAVHead.from_base_model(reference.model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        w = head.base.weight
        w.add_(noise * w.std() * torch.randn(w.shape, generator=gen))
    hidden = response_hidden(reference, next(iter(tables.values())), tokenized)
    with torch.inference_mode():
        ref_logits = reference.output_logits(hidden)
        policy = head.base(hidden)
        exact = exact_kl(ref_logits, policy).mean().item()
        errors = {}
        for k, table in tables.items():
            ids = torch.from_numpy(token_matrix(table.column("topk_ids")))
            lps = torch.from_numpy(token_matrix(table.column("topk_logprobs"))).float()
            est = topk_tail_kl(ids, lps, policy).mean().item()
            errors[k] = abs(est - exact) / exact
    return exact, errors


def throughput(store: Path, plan, reference, repeats: int) -> tuple[float, float]:
    """(refpass compute, refpass compute + write) tokens/s as a fraction of a bare forward's.

    The same shards and the same length-sorted batches for both; best of `repeats` runs each
    (the machine is shared: the minimum is the least disturbed).
    """
    from alignheads.models.reference import length_sorted_batches

    batches = []
    for index in range(plan.n_shards):
        start, stop = plan.shard_rows(index)
        pairs = read_table_rows(Path(plan.tokenize_path), "tokenized", start, stop).to_pylist()
        prompts = [p["prompt_ids"] for p in pairs for _ in range(2)]
        responses = [r for p in pairs for r in (p["chosen_ids"], p["rejected_ids"])]
        lengths = [len(p) + len(r) for p, r in zip(prompts, responses, strict=True)]
        for idx in length_sorted_batches(lengths, plan.batch_size):
            batches.append(pack_batch([prompts[i] for i in idx], [responses[i] for i in idx], 0))

    def bare() -> float:
        t = time.perf_counter()
        with torch.inference_mode():
            for b in batches:
                _ = reference.model(
                    input_ids=b.input_ids, attention_mask=b.attention_mask, use_cache=False
                ).logits
        return time.perf_counter() - t

    def refpass(write: bool) -> float:
        t = time.perf_counter()
        with tempfile.TemporaryDirectory(dir=store) as tmp:
            for index in range(plan.n_shards):
                data = compute_refpass_shard(plan, index, reference)
                if write:
                    write_shard(data.tables[TABLE], Path(tmp), shard_path(TABLE, index))
        return time.perf_counter() - t

    bare_s, compute_s, full_s = [], [], []
    for _ in range(repeats):  # interleaved, so a slow spell of the machine hits all three
        bare_s.append(bare())
        compute_s.append(refpass(write=False))
        full_s.append(refpass(write=True))
    return min(bare_s) / min(compute_s), min(bare_s) / min(full_s)


def llama_scale_check(tokens: int = 256, hidden: int = 4096, vocab: int = LLAMA_VOCAB, k: int = 64):
    """Seconds for (output-layer matmul, log-sum-exp + top-k) on `tokens` synthetic hidden states."""
    from alignheads.models.reference import topk_reference

    gen = torch.Generator().manual_seed(0)
    h = torch.randn(tokens, hidden, generator=gen)
    w = torch.randn(vocab, hidden, generator=gen) * 0.02
    y = torch.randint(0, vocab, (tokens,), generator=gen)
    with torch.inference_mode():
        t = time.perf_counter()
        logits = torch.nn.functional.linear(h, w)
        matmul = time.perf_counter() - t
        t = time.perf_counter()
        topk_reference(logits, y, k)
        extract = time.perf_counter() - t
    return matmul, extract


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--store", type=Path, help="store to build/reuse the world in (default: a temp dir)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (tiny models: 1 is fastest)")
    parser.add_argument("--repeats", type=int, default=5, help="timing repeats (best is kept)")
    parser.add_argument(
        "--noise", type=float, default=0.5, help="head perturbation, in units of the weights' std"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        store = (args.store or Path(tmp) / "store").resolve()
        world = prepare_tiny_world(store)
        model_dir, tok, fp = world.model_dir, world.tokenized, world.fingerprint
        tokenized = read_table(tok.path, "tokenized").to_pylist()
        model_cfg = ModelConfig(name_or_path=model_dir)
        reference = load_reference(model_dir, device="cpu")
        rows, tables = {}, {}
        for k in KS:
            cfg = RefPassConfig(k=k, dtype="float16", batch_size=16, pairs_per_shard=128, device="cpu")
            plan = plan_refpass(cfg, model_cfg, model_dir, tok.path, fp)
            result = run_refpass(store, plan, reference)
            tokens = result.manifest.info["scored_tokens"]
            tables[k] = read_table(result.path, TABLE)
            per_token = cache_bytes(result.path, plan.n_shards) / tokens
            speed = throughput(store, plan, reference, args.repeats)
            rows[k] = {"bytes": per_token, "tokens": tokens, "speed": speed, "vocab": plan.vocab_size}
        exact, errors = kl_errors(reference, tables, tokenized, args.noise, seed=0)
    matmul, extract = llama_scale_check()

    vocab = next(iter(rows.values()))["vocab"]
    print(
        f"refpass benchmark  {dt.date.today()}  {platform.machine()}, {torch.get_num_threads()} torch thread(s)"
    )
    print(
        f"tiny world (test size): V = {vocab}, {rows[KS[0]]['tokens']} scored response tokens; mean exact KL of the head = {exact:.4f} nats"
    )
    header = (
        f"{'k':>4} | {'bytes/token':>11} | {'7k+16':>6} | {'dense fp16 (V)':>14} | {'x smaller':>9} | "
        f"{'raw x smaller @32000':>20} | {'KL rel. error':>13} | {'speed (compute)':>15} | {'speed (+write)':>14}"
    )
    print(header)
    print("-" * len(header))
    for k, r in rows.items():
        raw = 6 * k + 4
        print(
            f"{k:>4} | {r['bytes']:>11.1f} | {7 * k + 16:>6} | {2 * vocab:>14} | {2 * vocab / r['bytes']:>9.2f} | "
            f"{2 * LLAMA_VOCAB / raw:>20.0f} | {errors[k]:>13.2%} | {r['speed'][0]:>14.2f}x | {r['speed'][1]:>13.2f}x"
        )

    print(
        f"Llama size (H = 4096, V = 32000, 256 tokens, same threads): output-layer matmul {matmul * 1e3:.0f} ms, "
        f"log-sum-exp + top-64 {extract * 1e3:.0f} ms ({extract / matmul:.1%} of the matmul alone)"
    )


if __name__ == "__main__":
    main()
