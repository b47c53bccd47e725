"""Head-training step benchmark: live reference forward vs cached reference vs cached hidden states.

(A script, not a module of the package: its presets, its measurement and its report stay in one
file so that one command reproduces a BENCHMARKS.md table.)

    .venv/bin/python benchmarks/train_bench.py                       # CPU preset: the tiny world
    .venv/bin/python benchmarks/train_bench.py --preset gpu          # 7B-shaped random Llama, bf16
    .venv/bin/python benchmarks/train_bench.py --preset gpu --dry-run  # its inputs, tiny sizes, any device

One DPO-style training step of each head (IAV with `kl: topk`, CALM), three ways, over the same
micro-batches, interleaved in one run so that machine noise hits all of them alike:

- live: what a plain DPO loop does. Every step the reference model (the frozen LM with its own
  lm_head) scores chosen + rejected (`ReferenceModel.score_batch`: backbone, then the output
  layer on the response positions, the target log-probs and the top-k), and the frozen backbone
  runs again for the head's features; then the head step with those reference values.
- cached-ref: `features: backbone` of the training loop. Reference log-probs (and IAV's top-k)
  come from the refcache; only the frozen backbone runs, then the head step.
- cached-hidden: `features: cached`. No backbone at all: the head runs on the refcache's
  float16 hidden states.

The step is the training loop's own (`alignheads.tasks.training.loop`): `collate`, the loop's
`head_features` / `head_objective` / the seeded `new_head` of `models.trainees`, backward, gradient clipping, AdamW, and the
per-micro-batch metrics the loop logs (`head_step_metrics`). The batches are read from the refcache
with `PairStream` before timing (the Parquet reads are not timed; `collate` is). The reference
model and the backbone are one module (the reference is the frozen LM itself), so the live
variant holds no second copy of the weights: it only pays the second forward.

Reported per (head, variant): median time per step over the timed steps, best of the repeats;
the medians of its phases (collate, reference forward, backbone/features, head forward + loss +
backward + optimizer, metrics); and the peak memory one step allocates above what is resident
before it (CPU: torch's allocation events from the profiler; CUDA: torch.cuda.max_memory_allocated
minus memory_allocated before the step).

Presets: `cpu` builds the test-size tiny world (data -> tokenize -> reference pass with
`store_hidden`) with the project's stages; `gpu` builds a randomly initialised Llama of 7B shape
(hidden 4096, 32 layers, vocabulary 32,000) in bf16, a synthetic `tokenized` table of random
token ids, and runs the real reference pass over it with that model. `--layers N` shrinks the
model's depth; `--dry-run` runs the gpu preset's construction at small batch and lengths with a
couple of steps, so it can be checked on a CPU.
"""

from __future__ import annotations

import argparse
import datetime as dt
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from common import LLAMA_7B, MIB, prepare_tiny_world, random_llama
from torch import nn

from alignheads.config import CALMTrainConfig, HeadTrainConfig, IAVTrainConfig
from alignheads.models.head_base import lm_output_layer
from alignheads.models.objectives import BatchNeeds, PairBatch
from alignheads.models.reference import ReferenceModel, pack_batch
from alignheads.models.registry import new_head
from alignheads.models.trainees import (
    head_batches,
    head_features,
    head_objective,
    head_shape,
    head_step_metrics,
)
from alignheads.tasks.training.batches import PairRecord, PairStream, collate

VARIANTS = ("live", "cached-ref", "cached-hidden")
PHASES = ("collate", "reference", "features", "head", "metrics")


# --------------------------------------------------------------------------- inputs


@dataclass
class Setup:
    """What every variant shares: the frozen LM (also the reference), the micro-batches, and labels."""

    model: nn.Module
    reference: ReferenceModel
    batches: list[list[PairRecord]]
    pad_id: int
    k: int
    device: torch.device
    description: str
    configs: dict[str, HeadTrainConfig] = field(default_factory=dict)


def read_batches(
    refcache: Path, tokenized: Path, pairs_per_batch: int, n_batches: int
) -> list[list[PairRecord]]:
    """The first `n_batches` training micro-batches of the cache (seeded order), with top-k and hidden."""
    stream = PairStream(refcache, tokenized, "train", BatchNeeds(topk=True, hidden=True))
    batches = [records for _, records in islice(stream.micro_batches(pairs_per_batch, seed=0), n_batches)]
    if not batches:
        raise ValueError(f"{refcache}: fewer than {pairs_per_batch} training pairs")
    return batches


def prepare_cpu(store: Path, args: argparse.Namespace) -> Setup:
    """The test-size tiny world through the project's stages: world, data, tokenize, reference pass."""
    from alignheads.config import ModelConfig, RefPassConfig
    from alignheads.models.reference import load_reference
    from alignheads.tasks.refpass import plan_refpass, run_refpass

    world = prepare_tiny_world(store)
    model_dir, tok, fp = world.model_dir, world.tokenized, world.fingerprint
    reference = load_reference(model_dir, device="cpu")
    rcfg = RefPassConfig(k=args.k, store_hidden=True, device="cpu")
    ref = run_refpass(store, plan_refpass(rcfg, ModelConfig(), model_dir, tok.path, fp), reference)
    pad_id = world.pad_id
    cfg = reference.model.config
    desc = (
        f"tiny world (test size): Llama, {cfg.num_hidden_layers} layers, H = {cfg.hidden_size}, "
        f"V = {cfg.vocab_size}, {next(reference.model.parameters()).dtype}"
    )
    return Setup(
        reference.model,
        reference,
        read_batches(ref.path, tok.path, args.batch, args.batches),
        pad_id,
        args.k,
        torch.device("cpu"),
        desc,
    )


def synthetic_tokenized(store: Path, n_pairs: int, prompt_len: int, response_len: int, vocab: int, seed: int):
    """A `tokenize` artifact of random token ids: prompts of ¾P..P tokens, responses of ¾L..L
    (ending in EOS = 2), written with the storage layer like the real stage's."""
    from alignheads.storage.artifacts import ArtifactContent, ensure_artifact
    from alignheads.storage.fingerprint import artifact_key
    from alignheads.storage.tables import write_table
    from alignheads.tasks.tokenize import STAGE, TOKENIZE_VERSION, TOKENIZED_SCHEMA

    config = {
        "synthetic": True,
        "n_pairs": n_pairs,
        "max_prompt_length": prompt_len,
        "max_response_length": response_len,
        "vocab": vocab,
        "seed": seed,
    }
    inputs = {"data": f"synthetic-{seed}", "tokenizer": "synthetic"}
    rng = np.random.default_rng(seed)

    def ids(max_len: int, eos: bool) -> list[int]:
        n = int(rng.integers(max(1, (3 * max_len) // 4), max_len + 1))
        out = rng.integers(3, vocab, n).tolist()
        if eos:
            out[-1] = 2
        return out

    def build(staging: Path) -> ArtifactContent:
        cols: dict[str, list] = {name: [] for name in TOKENIZED_SCHEMA.names}
        for i in range(n_pairs):
            cols["id"].append(f"synthetic-{i}")
            cols["split"].append("train")
            for name, max_len, eos in (
                ("prompt", prompt_len, False),
                ("chosen", response_len, True),
                ("rejected", response_len, True),
            ):
                seq = ids(max_len, eos)
                cols[f"{name}_ids"].append(seq)
                cols[f"{name}_len"].append(len(seq))
                cols[f"{name}_truncated"].append(False)
        table = pa.Table.from_pydict(cols, schema=TOKENIZED_SCHEMA)
        return ArtifactContent(
            tables={"tokenized": write_table(table, staging, "tokenized")}, info={"rows": n_pairs}
        )

    key = artifact_key(STAGE, config, inputs, TOKENIZE_VERSION)
    return ensure_artifact(store, STAGE, key, TOKENIZE_VERSION, config, inputs, build)


def prepare_gpu(store: Path, args: argparse.Namespace) -> Setup:
    """7B-shaped random Llama in bf16, synthetic tokenized pairs, the real reference pass over them."""
    from alignheads.storage.fingerprint import artifact_key
    from alignheads.tasks.refpass import REFPASS_VERSION, RefPassPlan, run_refpass
    from alignheads.tasks.refpass import STAGE as REFPASS

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype)
    model = random_llama(LLAMA_7B, args.layers, device, dtype, seed=0)
    reference = ReferenceModel(model, device)
    n_pairs = args.batch * args.batches
    vocab, hidden = LLAMA_7B["vocab_size"], LLAMA_7B["hidden_size"]
    tok = synthetic_tokenized(store, n_pairs, args.prompt_len, args.response_len, vocab, seed=0)
    # the refpass stage's plan, filled in by hand: the model exists only in memory (plan_refpass
    # would hash its weight files); everything downstream is the real stage
    config = {
        "model": {"kind": "random-llama", "layers": args.layers, "seed": 0, **LLAMA_7B},
        "model_dtype": args.dtype,
        "k": args.k,
        "dtype": "float16",
        "store_hidden": True,
        "pairs_per_shard": n_pairs,
        "max_prompt_length": args.prompt_len,
        "max_response_length": args.response_len,
    }
    inputs = {"tokenize": tok.key, "data": f"synthetic-{0}", "tokenizer": "synthetic"}
    plan = RefPassPlan(
        key=artifact_key(REFPASS, config, inputs, REFPASS_VERSION),
        tokenize_path=str(tok.path),
        model_path="random-llama-7b-shaped",
        model_revision=None,
        model_dtype=args.dtype,
        trust_remote_code=False,
        device=str(device),
        k=args.k,
        dtype="float16",
        store_hidden=True,
        batch_size=16,
        pairs_per_shard=n_pairs,
        n_pairs=n_pairs,
        n_shards=1,
        vocab_size=vocab,
        hidden_size=hidden,
        config=config,
        inputs=inputs,
    )
    ref = run_refpass(store, plan, reference)
    desc = (
        f"7B-shaped random Llama: {args.layers} layers, H = {hidden}, V = {vocab}, {args.dtype}; "
        f"synthetic prompts of {args.prompt_len * 3 // 4}..{args.prompt_len} and responses of "
        f"{args.response_len * 3 // 4}..{args.response_len} tokens"
    )
    return Setup(
        model,
        reference,
        read_batches(ref.path, tok.path, args.batch, args.batches),
        pad_id=0,
        k=args.k,
        device=device,
        description=desc,
    )


# --------------------------------------------------------------------------- the step


def _rows(records: list[PairRecord]) -> list[tuple[PairRecord, int]]:
    """collate's row order: all chosen sequences, then all rejected ones."""
    return [(r, side) for side in (0, 1) for r in records]


def live_reference(setup: Setup, batch: PairBatch, records: list[PairRecord], topk: bool) -> None:
    """Score the batch's chosen + rejected sequences with the reference model now, and put its
    summed log-probs (and top-k) into the batch where the cache's would be."""
    rows = _rows(records)
    packed = pack_batch([r.prompt for r, _ in rows], [r.responses[s] for r, s in rows], setup.pad_id)
    scores = setup.reference.score_batch(packed, setup.k)
    batch.ref_logps = torch.from_numpy(scores.seq_logprobs).float()
    if topk:
        n, width = batch.mask.shape
        ids = torch.zeros(n, width, setup.k, dtype=torch.long)
        lps = torch.zeros(n, width, setup.k, dtype=torch.float32)
        # scored tokens are sequence-major in both layouts: row i's first counts[i] columns
        ids[batch.mask] = torch.from_numpy(scores.topk_ids).long()
        lps[batch.mask] = torch.from_numpy(scores.topk_logprobs).float()
        batch.ref_topk_ids, batch.ref_topk_logprobs = ids, lps


class Variant:
    """One head trained one way: its own fresh head (seeded, so all start equal) and AdamW."""

    def __init__(self, name: str, kind: str, cfg: HeadTrainConfig, setup: Setup):
        self.name, self.kind, self.setup = name, kind, setup
        features = "cached" if name == "cached-hidden" else "backbone"
        self.cfg = cfg.model_copy(update={"features": features})
        self.frozen = lm_output_layer(setup.model)
        torch.manual_seed(self.cfg.seed)  # as the training loop builds a head: all variants start equal
        self.head = new_head(kind, setup.model, dtype=torch.float32, **head_shape(self.cfg)).to(setup.device)
        self.live = name == "live"
        needs, self.with_sequences = head_batches(self.cfg)
        self.live_topk = needs.topk
        # the live variant reads nothing from the cache but the targets
        self.needs = BatchNeeds(topk=False, hidden=False) if self.live else needs
        self.features = head_features(
            self.cfg, setup.model.base_model, self.head.needs_token_context, self.frozen
        )
        self.objective = head_objective(self.cfg, self.frozen)
        self.optimizer = torch.optim.AdamW(
            self.head.parameters(), lr=self.cfg.lr, weight_decay=self.cfg.weight_decay
        )

    def autocast(self) -> torch.autocast:
        bf16 = self.cfg.mixed_precision == "bf16"
        return torch.autocast(self.setup.device.type, dtype=torch.bfloat16, enabled=bf16)

    def step(self, records: list[PairRecord], clock: Callable[[], float]) -> dict[str, float]:
        """One optimizer step (grad_accum 1), as the training loop runs it; seconds per phase."""
        times = dict.fromkeys(PHASES, 0.0)
        last = clock()

        def lap(phase: str) -> None:
            nonlocal last
            now = clock()
            times[phase] += now - last
            last = now

        batch = collate(records, self.needs, self.with_sequences, self.setup.pad_id)
        lap("collate")
        if self.live:
            live_reference(self.setup, batch, records, self.live_topk)
            lap("reference")
        batch = batch.to(self.setup.device)
        lap("collate")  # building the batch + copying it to the device
        with self.autocast():  # as the loop's accelerator.autocast(): features, head, objective
            hidden, ctx = self.features(batch)
            lap("features")
            out = self.head(hidden, frozen_head=self.frozen, context=ctx)
            loss_obj = self.objective(out, batch, hidden)
        if not torch.isfinite(loss_obj.loss):
            raise RuntimeError(f"{self.kind}/{self.name}: non-finite loss")
        loss_obj.loss.backward()
        torch.nn.utils.clip_grad_norm_(self.head.parameters(), self.cfg.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        lap("head")
        head_step_metrics(loss_obj, out, batch)
        lap("metrics")
        times["total"] = sum(times[p] for p in PHASES)
        return times

    def resident_bytes(self) -> int:
        """Head parameters + AdamW state (gradients are freed after each step)."""
        params = sum(p.numel() * p.element_size() for p in self.head.parameters())
        state = sum(
            v.numel() * v.element_size()
            for s in self.optimizer.state.values()
            for v in s.values()
            if isinstance(v, torch.Tensor)
        )
        return params + state


def make_clock(device: torch.device) -> Callable[[], float]:
    if device.type == "cuda":

        def clock() -> float:
            torch.cuda.synchronize(device)
            return time.perf_counter()

        return clock
    return time.perf_counter


def step_peak_bytes(variant: Variant, records: list[PairRecord]) -> float | None:
    """Peak bytes one step allocates above what is allocated before it (None: not measurable)."""
    device = variant.setup.device
    clock = make_clock(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        variant.step(records, clock)
        torch.cuda.synchronize(device)
        return float(torch.cuda.max_memory_allocated(device) - before)
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        variant.step(records, clock)
    try:
        events = prof.profiler.kineto_results.events()
    except AttributeError:
        return None
    allocs = sorted((e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]")
    current = peak = 0
    for _, nbytes in allocs:
        current += nbytes
        peak = max(peak, current)
    return float(peak)


# --------------------------------------------------------------------------- the run


@dataclass
class Measured:
    total: float
    phases: dict[str, float]
    peak: float | None
    resident: int


def check_live_matches_cache(setup: Setup) -> tuple[float, float]:
    """(max |live − cached| summed reference log-prob, share of equal top-1 ids) on the first batch:
    the live variant feeds the head the same reference as the cache does."""
    records = setup.batches[0]
    needs = BatchNeeds(topk=True, hidden=False)
    cached = collate(records, needs, False, setup.pad_id)
    live = collate(records, BatchNeeds(topk=False, hidden=False), False, setup.pad_id)
    live_reference(setup, live, records, topk=True)
    diff = (live.ref_logps - cached.ref_logps).abs().max().item()
    m = cached.mask
    top1 = (live.ref_topk_ids[..., 0][m] == cached.ref_topk_ids[..., 0][m]).float().mean().item()
    return diff, top1


def run_head(kind: str, setup: Setup, args: argparse.Namespace) -> dict[str, Measured]:
    """Warm-up, then `repeats` rounds of `steps` timed steps per variant, variants interleaved."""
    cfg = setup.configs[kind]
    variants = {name: Variant(name, kind, cfg, setup) for name in VARIANTS}
    clock = make_clock(setup.device)
    n = len(setup.batches)
    for v in variants.values():
        for i in range(args.warmup):
            v.step(setup.batches[i % n], clock)
    best: dict[str, list[dict[str, float]]] = {}
    for _ in range(args.repeats):
        for name, v in variants.items():
            runs = [v.step(setup.batches[i % n], clock) for i in range(args.steps)]
            median = statistics.median(r["total"] for r in runs)
            if name not in best or median < statistics.median(r["total"] for r in best[name]):
                best[name] = runs
    out = {}
    for name, v in variants.items():
        runs = best[name]
        peak = step_peak_bytes(v, setup.batches[0])
        out[name] = Measured(
            total=statistics.median(r["total"] for r in runs),
            phases={p: statistics.median(r[p] for r in runs) for p in PHASES},
            peak=peak,
            resident=v.resident_bytes(),
        )
    del variants
    if setup.device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def print_report(setup: Setup, args: argparse.Namespace, results: dict[str, dict[str, Measured]], check):
    model_bytes = sum(p.numel() * p.element_size() for p in setup.model.parameters())
    seqs = [(len(r.prompt), len(r.responses[s])) for batch in setup.batches for r, s in _rows(batch)]
    device = setup.device
    gpu = f", {torch.cuda.get_device_name(device)}" if device.type == "cuda" else ""
    print(
        f"head-training step benchmark  {dt.date.today()}  preset {args.preset}{' (dry run)' if args.dry_run else ''}  "
        f"{platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} torch thread(s), "
        f"device {device}{gpu}"
    )
    print(setup.description)
    print(
        f"batch: {args.batch} pairs = {2 * args.batch} sequences; {len(setup.batches)} distinct micro-batches "
        f"(cycled); mean prompt {np.mean([p for p, _ in seqs]):.0f} + response {np.mean([r for _, r in seqs]):.0f} "
        f"tokens per sequence; top-k k = {setup.k}"
    )
    print(
        f"mixed_precision: {args.mixed_precision}; timing: {args.warmup} warm-up + {args.steps} timed steps per variant, median per step, "
        f"best of {args.repeats} interleaved repeats"
    )
    print(
        f"live reference vs the cache on batch 0: max |d seq log-prob| = {check[0]:.2e}, "
        f"top-1 id agreement {check[1]:.1%}"
    )
    mem = (
        "torch.cuda.max_memory_allocated during one step - memory_allocated before it"
        if device.type == "cuda"
        else "torch CPU allocations (profiler allocation events) during one step, peak above the start"
    )
    print(f"peak memory: {mem}")
    print(
        f"resident in every variant: frozen LM {model_bytes / MIB:.1f} MiB (the loop keeps it on the device "
        "even with features: cached); head + AdamW state per head below"
    )
    header = (
        f"{'head':<5} | {'variant':<13} | {'ms/step':>8} | {'ref fwd':>8} | {'backbone':>8} | {'head+opt':>8} | "
        f"{'collate':>7} | {'metrics':>7} | {'step peak MiB':>13} | {'head+opt MiB':>12} | {'live / this':>11}"
    )
    print(header)
    print("-" * len(header))
    for kind, res in results.items():
        live = res["live"].total
        for name, m in res.items():
            ph = {p: m.phases[p] * 1e3 for p in PHASES}
            peak = f"{m.peak / MIB:>13.1f}" if m.peak is not None else f"{'n/a':>13}"
            print(
                f"{kind:<5} | {name:<13} | {m.total * 1e3:>8.2f} | {ph['reference']:>8.2f} | {ph['features']:>8.2f} | "
                f"{ph['head']:>8.2f} | {ph['collate']:>7.2f} | {ph['metrics']:>7.2f} | {peak} | "
                f"{m.resident / MIB:>12.1f} | {live / m.total:>10.2f}x"
            )
    print("ratios (time per step):")
    for kind, res in results.items():
        live, ref, hid = (res[v].total for v in VARIANTS)
        print(
            f"  {kind}: live / cached-ref = {live / ref:.2f}x (target >= 1.5x); live / cached-hidden = "
            f"{live / hid:.2f}x; cached-ref (backbone) / cached-hidden = {ref / hid:.2f}x "
            "(target >= 5x on the GPU preset)"
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", choices=("cpu", "gpu"), default="cpu")
    parser.add_argument("--store", type=Path, help="store to build/reuse the inputs in (default: a temp dir)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument(
        "--batch", type=int, help="pairs per step (default: cpu 16 as configs/tiny.yaml, gpu 8)"
    )
    parser.add_argument("--batches", type=int, help="distinct micro-batches, cycled (default: cpu 8, gpu 4)")
    parser.add_argument("--k", type=int, default=64, help="top-k of the reference cache")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--mixed-precision",
        choices=("no", "bf16"),
        help="train.*.mixed_precision: bf16 autocast as the loop's (default: cpu no, gpu bf16)",
    )
    parser.add_argument("--layers", type=int, default=32, help="gpu preset: decoder layers (7B: 32)")
    parser.add_argument("--dtype", default="bfloat16", help="gpu preset: model dtype")
    parser.add_argument("--prompt-len", type=int, default=128, help="gpu preset: longest prompt")
    parser.add_argument("--response-len", type=int, default=128, help="gpu preset: longest response")
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="gpu preset at small sizes (1 layer unless --layers, 2 pairs, 16-token prompts and "
        "responses, 1 warm-up + 2 steps, 1 repeat): checks the inputs without a GPU",
    )
    args = parser.parse_args(argv)
    if args.dry_run:
        if args.preset != "gpu":
            parser.error("--dry-run is for --preset gpu")
        args.layers = 1 if args.layers == 32 else args.layers
        args.batch = args.batch or 2
        args.batches = args.batches or 2
        args.prompt_len, args.response_len = 16, 16
        args.warmup, args.steps, args.repeats = 1, 2, 1
    gpu = args.preset == "gpu"
    args.batch = args.batch or (8 if gpu else 16)
    args.batches = args.batches or (4 if gpu else 8)
    args.mixed_precision = args.mixed_precision or ("bf16" if gpu else "no")
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        store = (args.store or Path(tmp) / "store").resolve()
        setup = prepare_gpu(store, args) if gpu else prepare_cpu(store, args)
        # the run's training settings: configs/tiny.yaml's learning rate on the tiny world
        common = {"batch_size": args.batch, "mixed_precision": args.mixed_precision}
        if not gpu:
            common["lr"] = 2e-3
        setup.configs = {
            "iav": IAVTrainConfig(kl="topk", **common),
            "calm": CALMTrainConfig(**common),
        }
        check = check_live_matches_cache(setup)
        results = {kind: run_head(kind, setup, args) for kind in setup.configs}
    print_report(setup, args, results, check)


if __name__ == "__main__":
    main()
