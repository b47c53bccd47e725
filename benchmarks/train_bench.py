"""Head-training step benchmarks: live reference forward vs cached reference vs cached hidden
states; the loss computed in chunks vs at once, at large vocabularies; and what training with
cached hidden states holds in memory.

(A script, not a module of the package: its presets, its measurement and its report stay in one
file so that one command reproduces a BENCHMARKS.md table.)

    .venv/bin/python benchmarks/train_bench.py                       # CPU preset: the tiny world
    .venv/bin/python benchmarks/train_bench.py --preset gpu          # 7B-shaped random Llama, bf16
    .venv/bin/python benchmarks/train_bench.py --preset gpu --dry-run  # its inputs, tiny sizes, any device
    .venv/bin/python benchmarks/train_bench.py --preset vocab        # V = 32k, 64k, 128k: chunked vs not
    .venv/bin/python benchmarks/train_bench.py --preset memory       # features: cached, resident memory

Presets `cpu` and `gpu`: one DPO-style training step of each head (IAV with `kl: topk`, CALM),
three ways, over the same micro-batches, interleaved in one run so that machine noise hits all of
them alike:

- live: what a plain DPO loop does. Every step the reference model (the frozen LM with its own
  lm_head) scores chosen + rejected (`ReferenceModel.score_batch`: backbone, then the output
  layer on the response positions, the target log-probs and the top-k), and the frozen backbone
  runs again for the head's features; then the head step with those reference values.
- cached-ref: `features: backbone` of the training loop. Reference log-probs (and IAV's top-k)
  come from the refcache; only the frozen backbone runs, then the head step.
- cached-hidden: `features: cached`. No backbone at all: the head runs on the refcache's
  hidden states.

The step is the training loop's own (`alignheads.tasks.training.loop`): `collate`, the loop's
`HeadTrainee` (its features, its seeded head, IAV's W_b frozen, its chunked objective through
`HeadStep`), backward, gradient clipping, AdamW, and the per-micro-batch metrics the loop logs
(`head_step_metrics`). The batches are read from the refcache with `PairStream` before timing (the
Parquet reads are not timed; `collate` is). The reference model and the backbone are one module
(the reference is the frozen LM itself), so the live variant holds no second copy of the weights:
it only pays the second forward.

Reported per (head, variant): median time per step over the timed steps, best of the repeats;
the medians of its phases (collate, reference forward, backbone/features, head forward + loss +
backward + optimizer, metrics); and the peak memory one step allocates above what is resident
before it (CPU: torch's allocation events from the profiler; CUDA: torch.cuda.max_memory_allocated
minus memory_allocated before the step).

`cpu` builds the test-size tiny world (data -> tokenize -> reference pass with `store_hidden`)
with the project's stages; `gpu` builds a randomly initialised Llama of 7B shape (hidden 4096, 32
layers, vocabulary 32,000) in bf16, a synthetic `tokenized` table of random token ids, and runs the
real reference pass over it with that model. `--layers N` shrinks the model's depth; `--dry-run`
runs the gpu preset's construction at small batch and lengths with a couple of steps, so it can be
checked on a CPU.

Preset `vocab`: for V = 32,000, 64,000 and 128,000 (`--vocabs`), a random Llama of the test-size
tiny world's shape with that vocabulary, synthetic pairs (16 per step, prompts and responses of
22..30 tokens) and the real reference pass; per head, one training step (`features: backbone`)
with the loss over the head's whole `(2B, R, V)` output at once (`unchunked`, the computation
before chunking) and the loop's chunked objective (`chunked`), both from the same seeded head over
the same batches, interleaved step by step: median s/step and one profiled step's peak of torch's
CPU allocations, and how far the two losses and trained heads differ.

Preset `memory`: a 1-layer random Llama of 7B shape (H = 4096, V = 32,000, float32), a synthetic
cache with its hidden states, then a fresh process per (head, how the LM is in memory) that trains
the head with `features: cached` through the training loop for a few steps and reads its resident
set's high-water mark (VmHWM, reset before the model is built), next to the sizes of the head,
lm_head, AdamW state, gradients and one batch (and what of the head is lm_head's own storage: IAV's
frozen W_b). `whole-lm` loads the whole LM (as the train stage's
loader does today), `output-layer` builds its backbone on the "meta" device and loads only lm_head.
"""

from __future__ import annotations

import argparse
import contextlib
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
import torch
from common import LLAMA_7B, MIB, machine_line, prepare_tiny_world, print_table, random_llama, write_tokenized
from torch import nn

from alignheads.config import CALMTrainConfig, HeadTrainConfig, IAVTrainConfig
from alignheads.models.head_base import lm_output_layer, soft_cap
from alignheads.models.losses import LOGITS_PER_CHUNK, chunk_tokens
from alignheads.models.objectives import (
    BatchNeeds,
    HeadStepLoss,
    PairBatch,
    ScoredTokens,
    calm_reduce,
    calm_token_terms,
    iav_reduce,
    iav_token_terms,
    topk_kl_per_token,
)
from alignheads.models.reference import ReferenceModel, pack_batch
from alignheads.models.registry import new_head
from alignheads.models.trainees import HeadTrainee, KLReference, head_step_metrics, head_weights
from alignheads.tasks.training.batches import PairRecord, PairStream, collate
from alignheads.tasks.training.loop import adamw

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
    refcache: Path, tokenized: Path, pairs_per_batch: int, n_batches: int, hidden: bool = True, tail: bool = False
) -> list[list[PairRecord]]:
    """The first `n_batches` training micro-batches of the cache (seeded order), with top-k (and
    the hidden states, when `hidden`; the tail draws, when `tail`)."""
    stream = PairStream(refcache, tokenized, "train", BatchNeeds(topk=True, hidden=hidden, tail=tail))
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
    (ending in EOS = 2), all split "train"."""
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

    def pairs():
        for _ in range(n_pairs):
            prompt = ids(prompt_len, False)
            chosen = ids(response_len, True)
            yield "train", prompt, chosen, ids(response_len, True)

    return write_tokenized(store, config, inputs, pairs)


def refpass_in_memory(
    store: Path, model: nn.Module, reference: ReferenceModel, tok, identity: dict, *, k: int,
    store_hidden: bool, hidden_dtype: str = "float32", batch_size: int = 16, tail_draws: int = 0,
):  # fmt: skip
    """The real reference-pass stage over the `tokenize` artifact `tok` with an in-memory `model`
    (`identity`: what stands for its weights in the key). Its plan is filled in by hand, as
    plan_refpass would hash the weight files of a model on disk; everything downstream is the
    real stage. Returns the refcache's ArtifactResult."""
    from alignheads.storage.fingerprint import artifact_key
    from alignheads.tasks.refpass import REFPASS_VERSION, RefPassPlan, run_refpass
    from alignheads.tasks.refpass import STAGE as REFPASS

    cfg = model.config
    n_pairs = tok.manifest.info["rows"]
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    config = {
        "model": identity,
        "model_dtype": dtype,
        "k": k,
        "dtype": "float16",
        "store_hidden": store_hidden,
        "hidden_dtype": hidden_dtype if store_hidden else None,
        "pairs_per_shard": n_pairs,
        "max_prompt_length": tok.manifest.config["max_prompt_length"],
        "max_response_length": tok.manifest.config["max_response_length"],
    }
    if tail_draws:  # as plan_refpass: only then in the key
        config["tail_draws"] = tail_draws
    inputs = {"tokenize": tok.key, "data": tok.manifest.inputs["data"], "tokenizer": "synthetic"}
    plan = RefPassPlan(
        key=artifact_key(REFPASS, config, inputs, REFPASS_VERSION),
        tokenize_path=str(tok.path),
        model_path="in-memory",
        model_revision=None,
        model_dtype=dtype,
        trust_remote_code=False,
        device=str(reference.device),
        k=k,
        dtype="float16",
        store_hidden=store_hidden,
        hidden_dtype=hidden_dtype,
        batch_size=batch_size,
        pairs_per_shard=n_pairs,
        n_pairs=n_pairs,
        n_shards=1,
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        config=config,
        inputs=inputs,
        tail_draws=tail_draws,
    )
    return run_refpass(store, plan, reference)


def prepare_gpu(store: Path, args: argparse.Namespace) -> Setup:
    """7B-shaped random Llama in bf16, synthetic tokenized pairs, the real reference pass over them."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype)
    model = random_llama(LLAMA_7B, args.layers, device, dtype, seed=0)
    reference = ReferenceModel(model, device)
    n_pairs = args.batch * args.batches
    vocab, hidden = LLAMA_7B["vocab_size"], LLAMA_7B["hidden_size"]
    tok = synthetic_tokenized(store, n_pairs, args.prompt_len, args.response_len, vocab, seed=0)
    identity = {"kind": "random-llama", "layers": args.layers, "seed": 0, **LLAMA_7B}
    ref = refpass_in_memory(
        store, model, reference, tok, identity, k=args.k, store_hidden=True, hidden_dtype="float16"
    )
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
    """One head trained one way: the training loop's own `HeadTrainee` (a fresh, seeded head, so all
    variants start equal; IAV's W_b frozen as the loop keeps it) and AdamW over what it trains.
    ``kl_reference``: another reference model's output layer (IAV's `kl: exact` to it)."""

    def __init__(
        self,
        name: str,
        kind: str,
        cfg: HeadTrainConfig,
        setup: Setup,
        kl_reference: KLReference | None = None,
    ):
        self.name, self.kind, self.setup = name, kind, setup
        features = "cached" if name == "cached-hidden" else "backbone"
        self.cfg = cfg.model_copy(update={"features": features})
        self.trainee = HeadTrainee(kind, setup.model, self.cfg, setup.device, kl_reference=kl_reference)
        self.head = self.trainee.module
        self.live = name == "live"
        self.live_topk = self.trainee.needs.topk
        # the live variant reads nothing from the cache but the targets
        self.needs = BatchNeeds(topk=False, hidden=False) if self.live else self.trainee.needs
        params = [p for p in self.head.parameters() if p.requires_grad]
        self.optimizer = adamw(params, self.cfg)  # the loop's

    def autocast(self) -> torch.autocast:
        bf16 = self.cfg.mixed_precision == "bf16"
        return torch.autocast(self.setup.device.type, dtype=torch.bfloat16, enabled=bf16)

    def objective(self, tokens: ScoredTokens, batch: PairBatch) -> HeadStepLoss:
        """The loss the loop computes: the head's objective over the batch's scored tokens."""
        return self.trainee.step_module(tokens, batch)

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
            tokens = self.trainee.tokens(batch)  # the backbone forward, or the cached states
            lap("features")
            result = self.objective(tokens, batch)
        if not torch.isfinite(result.loss.loss):
            raise RuntimeError(f"{self.kind}/{self.name}: non-finite loss")
        result.loss.loss.backward()
        torch.nn.utils.clip_grad_norm_(self.head.parameters(), self.cfg.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        lap("head")
        head_step_metrics(result, batch)
        lap("metrics")
        times["total"] = sum(times[p] for p in PHASES)
        return times

    @property
    def with_sequences(self) -> bool:
        return self.trainee.with_sequences

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
        f"frozen LM {model_bytes / MIB:.1f} MiB, loaded once for all variants (the trainee moves only its lm_head "
        "to the device with features: cached: --preset memory); head + AdamW state per head below"
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


# --------------------------------------------------------------------------- large vocabularies

VOCABS = (32_000, 64_000, 128_000)
LOSSES = ("unchunked", "chunked")


def whole_grid_loss(trainee: HeadTrainee, batch: PairBatch) -> HeadStepLoss:
    """The head's loss over its whole ``(2B, R, V)`` output at once (padding columns included), as
    the loop computed it before the chunked objective: the head's forward on the grid, then
    `iav_objective` / `calm_objective`'s per-token terms and reductions."""
    hidden, ctx = trainee.features(batch)
    out = trainee.module(hidden, frozen_head=trainee.frozen, context=ctx)
    cfg, cap, weights = trainee.cfg, trainee.cap, head_weights(trainee.cfg)
    if isinstance(cfg, IAVTrainConfig):
        kl = topk_kl_per_token(soft_cap(out.base_logits, cap), batch)  # kl: topk
        terms = iav_token_terms(out, batch.targets, kl, cap)
        return HeadStepLoss(iav_reduce(terms, batch, weights, cfg.lambda_nll), terms)
    terms = calm_token_terms(out, batch.targets, cap)
    return HeadStepLoss(calm_reduce(terms, batch, weights, cfg.lambda_nll), terms)


class LossVariant(Variant):
    """`features: backbone` training (the default) with the loss computed `chunked` (the loop's
    objective, chunks of `chunk_tokens(V)` tokens) or `unchunked` (:func:`whole_grid_loss`)."""

    def __init__(self, name: str, kind: str, cfg: HeadTrainConfig, setup: Setup):
        super().__init__("cached-ref", kind, cfg, setup)
        self.name = name

    def objective(self, tokens: ScoredTokens, batch: PairBatch) -> HeadStepLoss:
        if self.name == "chunked":
            return super().objective(tokens, batch)
        return whole_grid_loss(self.trainee, batch)


def prepare_vocab(store: Path, vocab: int, args: argparse.Namespace) -> Setup:
    """A random Llama of the test-size tiny world's shape (its layers, width and heads) with a
    vocabulary of `vocab` tokens, synthetic pairs, and the real reference pass over them."""
    from alignheads.world.build import tiny_test_config

    w = tiny_test_config()
    shape = {
        "hidden_size": w.hidden_size,
        "intermediate_size": w.intermediate_size,
        "num_attention_heads": w.num_heads,
        "vocab_size": vocab,
    }
    cpu = torch.device("cpu")
    model = random_llama(shape, w.num_layers, cpu, torch.float32, seed=0)
    reference = ReferenceModel(model, cpu)
    tok = synthetic_tokenized(store, args.batch * args.batches, args.prompt_len, args.response_len, vocab, 0)
    identity = {"kind": "random-llama", "layers": w.num_layers, "seed": 0, **shape}
    ref = refpass_in_memory(store, model, reference, tok, identity, k=args.k, store_hidden=False)
    desc = f"random Llama: {w.num_layers} layers, H = {w.hidden_size}, V = {vocab}, float32"
    batches = read_batches(ref.path, tok.path, args.batch, args.batches, hidden=False)
    return Setup(model, reference, batches, 0, args.k, cpu, desc)


@dataclass
class VocabRow:
    vocab: int
    kind: str
    loss: str
    seconds: float
    peak: float | None
    resident: int
    tokens: float
    chunk: int


def first_step_agreement(variants: dict[str, LossVariant], setup: Setup) -> tuple[float, float]:
    """(|Δ loss|, max |Δ gradient| / max |gradient|) of the two losses of the same fresh head on
    the first batch (the gradients are cleared again)."""
    losses, grads = {}, {}
    for name, v in variants.items():
        batch = collate(setup.batches[0], v.needs, True, setup.pad_id)
        loss = v.objective(v.trainee.tokens(batch), batch).loss.loss
        loss.backward()
        losses[name] = loss.item()
        grads[name] = {k: p.grad.clone() for k, p in v.head.named_parameters() if p.grad is not None}
        v.optimizer.zero_grad(set_to_none=True)
    a, b = grads["chunked"], grads["unchunked"]
    diff = max((a[k] - b[k]).abs().max().item() for k in a)
    scale = max(b[k].abs().max().item() for k in b)
    return abs(losses["chunked"] - losses["unchunked"]), diff / scale


def run_vocab(store: Path, args: argparse.Namespace) -> tuple[list[VocabRow], dict]:
    """Per vocabulary and head: both losses trained from the same seeded head on the same batches,
    interleaved step by step; median s/step of the timed steps, one profiled step's peak; and how
    far the two losses and gradients differ on the first batch."""
    rows, agreement = [], {}
    clock = make_clock(torch.device("cpu"))
    for vocab in args.vocabs:
        setup = prepare_vocab(store, vocab, args)
        common = {"batch_size": args.batch, "lr": 2e-3, "mixed_precision": "no"}
        configs = {"iav": IAVTrainConfig(kl="topk", **common), "calm": CALMTrainConfig(**common)}
        for kind, cfg in configs.items():
            variants = {name: LossVariant(name, kind, cfg, setup) for name in LOSSES}
            n = len(setup.batches)
            agreement[(vocab, kind)] = first_step_agreement(variants, setup)
            times: dict[str, list[float]] = {name: [] for name in LOSSES}
            for i in range(args.warmup + args.steps):  # step by step, so both see the same noise
                for name, v in variants.items():
                    t = v.step(setup.batches[i % n], clock)["total"]
                    if i >= args.warmup:
                        times[name].append(t)
            tokens = statistics.mean(
                int(collate(b, BatchNeeds(False, False), False, 0).mask.sum()) for b in setup.batches
            )
            for name, v in variants.items():
                rows.append(
                    VocabRow(
                        vocab, kind, name, statistics.median(times[name]), step_peak_bytes(v, setup.batches[0]),
                        v.resident_bytes(), tokens, chunk_tokens(vocab),
                    )
                )  # fmt: skip
            del variants
    return rows, agreement


def print_vocab(args: argparse.Namespace, rows: list[VocabRow], agreement: dict) -> None:
    print(machine_line("head-training step benchmark, large vocabularies"))
    print(
        f"random Llama of the test-size tiny world's shape (2 layers, H = 64) with V tokens; synthetic pairs: "
        f"prompts and responses of {args.prompt_len * 3 // 4}..{args.prompt_len} / "
        f"{args.response_len * 3 // 4}..{args.response_len} tokens; batch {args.batch} pairs; top-k k = {args.k}"
    )
    print(
        "one optimizer step as the training loop runs it (features: backbone, IAV kl: topk); unchunked = the loss "
        "over the head's whole (2B, R, V) output (as before), chunked = the loop's objective "
        f"(chunks of {LOGITS_PER_CHUNK:,} / V scored tokens, recomputed in backward)"
    )
    print(
        f"timing: {args.warmup} warm-up + {args.steps} timed steps per variant, the two interleaved step by step; median"
    )
    print(
        "peak memory: torch CPU allocations (profiler allocation events) during one step, peak above the start "
        "(parameters, gradients, AdamW state and the batch already resident are not counted; the gradient is)"
    )
    columns = [
        ("head", 4), ("V", 7), ("loss", 9), ("tokens/step", 11), ("chunk", 5), ("s/step", 7),
        ("step peak MiB", 13), ("head+opt MiB", 12), ("peak / chunked", 14),
    ]  # fmt: skip
    table = []
    for r in rows:
        chunked = next(x for x in rows if (x.vocab, x.kind, x.loss) == (r.vocab, r.kind, "chunked"))
        peak = f"{r.peak / MIB:.1f}" if r.peak is not None else "n/a"
        ratio = f"{r.peak / chunked.peak:.2f}" if r.peak and chunked.peak else "n/a"
        chunk = str(r.chunk) if r.loss == "chunked" else "-"
        table.append(
            [r.kind, f"{r.vocab:,}", r.loss, f"{r.tokens:.0f}", chunk, f"{r.seconds:.2f}", peak,
             f"{r.resident / MIB:.1f}", ratio]
        )  # fmt: skip
    print_table(columns, table)
    for (vocab, kind), (loss_diff, grad_diff) in agreement.items():
        print(
            f"  {kind} V = {vocab:,}, fresh head, first batch: |chunked - unchunked| loss {loss_diff:.2e}, "
            f"gradients max |diff| / max |grad| {grad_diff:.2e}"
        )


# --------------------------------------------------------------------------- cached features' memory


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


class _Measured(Exception):
    """Raised from the metrics sink at the last step: stops the loop before its final checkpoint
    (whose serialisation of the head and AdamW state is not training memory)."""


def memory_child(spec_file: Path) -> None:
    """Train one head with `features: cached` through the training loop; print one JSON line.

    The LM is the 1-layer 7B-shaped random Llama the parent saved, either loaded whole (`whole-lm`:
    `loading.load_causal_lm`) or as the train stage loads it for `features: cached`
    (`output-layer`: `loading.load_output_layer_only`, the backbone on the "meta" device and only
    lm_head read). The resident set is read before the model exists and at the last step (VmHWM,
    after resetting the high-water mark)."""
    import gc
    import json

    from alignheads.loading import load_causal_lm, load_output_layer_only
    from alignheads.models.methods import method
    from alignheads.models.trainees import base_head_frozen, head_shape, share_frozen_base
    from alignheads.tasks.training.loop import TrainJob, train

    spec = json.loads(spec_file.read_text())
    torch.set_num_threads(spec["threads"])
    kind, placement = spec["kind"], spec["placement"]
    common = {"features": "cached", "batch_size": spec["batch"], "max_steps": spec["steps"], "lr": 2e-3}
    common |= {"eval_every": 10**9, "checkpoint_every": 10**9, "resume": False, "warmup_ratio": 0.0}
    cfg = IAVTrainConfig(kl="topk", **common) if kind == "iav" else CALMTrainConfig(**common)
    entry = method(kind)
    needs, _ = entry.batches(cfg)
    stream = PairStream(Path(spec["refcache"]), Path(spec["tokenized"]), "train", needs)
    first = next(stream.micro_batches(spec["batch"], seed=cfg.seed))[1]  # Arrow's pool warmed up
    import transformers.models.llama.modeling_llama  # noqa: F401 - its import is not the model's memory

    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current resident set
    start = _status_kib("VmRSS") * 1024
    load = load_causal_lm if placement == "whole-lm" else load_output_layer_only
    model = load(spec["model"])
    losses: list[float] = []

    def sink(metrics: dict[str, float], step: int) -> None:
        losses.append(metrics["loss"])
        if step == spec["steps"]:
            raise _Measured

    job = TrainJob(
        entry, cfg, model, stream, None, Path(spec["work"]) / f"ckpt-{kind}-{placement}", 0, sink, False
    )
    t = time.perf_counter()
    with contextlib.suppress(_Measured):
        train(job)
    seconds = time.perf_counter() - t
    peak = _status_kib("VmHWM") * 1024
    # the sizes the bound adds up (a fresh head of the same shape: the trained one is the loop's)
    head = new_head(kind, model, dtype=torch.float32, **head_shape(cfg))
    lm_head = lm_output_layer(model).weight
    if base_head_frozen(cfg):
        head.base.requires_grad_(False)
        share_frozen_base(head.base, lm_output_layer(model))  # as the trainee does
    head_bytes = sum(p.numel() * p.element_size() for p in head.parameters())
    # what of the head is the output layer's own storage (a frozen W_b), counted once in memory
    shared = sum(
        p.numel() * p.element_size() for p in head.parameters() if p.data_ptr() == lm_head.data_ptr()
    )
    trainable = sum(p.numel() * p.element_size() for p in head.parameters() if p.requires_grad)
    batch = collate(first, needs, False, 0)
    batch_bytes = sum(
        v.numel() * v.element_size() for v in vars(batch).values() if isinstance(v, torch.Tensor)
    )
    out = {
        "rss_start": start, "rss_peak": peak, "seconds": seconds, "losses": losses,
        "devices": sorted({p.device.type for p in model.model.parameters()}),
        "head": head_bytes, "lm_head": lm_head.numel() * lm_head.element_size(), "optimizer": 2 * trainable,
        "gradients": trainable, "batch": batch_bytes, "shared": shared,
        "model": sum(p.numel() * p.element_size() for p in model.parameters() if p.device.type != "meta"),
    }  # fmt: skip
    print(json.dumps(out))


def run_memory(store: Path, args: argparse.Namespace) -> tuple[dict, dict]:
    """Build the 1-layer 7B-shaped random Llama, a synthetic cache with its hidden states (float32),
    save its lm_head; then one child process per (head, placement)."""
    import json
    import subprocess
    import sys

    cpu = torch.device("cpu")
    model = random_llama(LLAMA_7B, 1, cpu, torch.float32, seed=0)
    reference = ReferenceModel(model, cpu)
    tok = synthetic_tokenized(
        store, args.batch * args.batches, args.prompt_len, args.response_len, LLAMA_7B["vocab_size"], 0
    )
    identity = {"kind": "random-llama", "layers": 1, "seed": 0, **LLAMA_7B}
    ref = refpass_in_memory(store, model, reference, tok, identity, k=args.k, store_hidden=True)
    work = store / "memory"
    work.mkdir(exist_ok=True)
    model_dir = work / "model"
    model.save_pretrained(model_dir)  # safetensors, as a checkpoint the run's loaders read
    sizes = {"model": sum(p.numel() * p.element_size() for p in model.parameters())}
    del model, reference
    results = {}
    for kind in ("iav", "calm"):
        for placement in ("whole-lm", "output-layer"):
            spec = {
                "kind": kind, "placement": placement, "threads": args.threads, "batch": args.batch,
                "steps": args.steps, "refcache": str(ref.path), "tokenized": str(tok.path),
                "model": str(model_dir), "work": str(work),
            }  # fmt: skip
            spec_file = work / f"{kind}-{placement}.json"
            spec_file.write_text(json.dumps(spec))
            cmd = [sys.executable, __file__, "--memory-child", str(spec_file)]
            proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if proc.returncode != 0:
                raise RuntimeError(f"memory child {kind}/{placement} failed:\n{proc.stderr[-3000:]}")
            results[(kind, placement)] = json.loads(proc.stdout.strip().splitlines()[-1])
    return results, sizes


def print_memory(args: argparse.Namespace, results: dict, sizes: dict) -> None:
    print(machine_line("head-training memory benchmark, features: cached"))
    print(
        f"7B-shaped random Llama with 1 layer: H = {LLAMA_7B['hidden_size']}, V = {LLAMA_7B['vocab_size']:,}, "
        f"float32 ({sizes['model'] / MIB:.0f} MiB of weights); synthetic pairs, batch {args.batch} pairs, "
        f"{args.steps} optimizer steps through the training loop (tasks.training.loop.train); a fresh process each"
    )
    print(
        "resident memory: VmHWM of the training process above its VmRSS before the model is built (the high-water "
        "mark reset there): everything the model, the head's training, torch, Python and Arrow touch"
    )
    print(
        "whole-lm: the LM loaded whole (loading.load_causal_lm); output-layer: as the train stage loads it for "
        "features: cached (loading.load_output_layer_only: the backbone on meta, only lm_head read)"
    )
    print(
        "bound = head + lm_head + AdamW state + one batch's tensors; + grads: also the head's gradient; "
        "held = bound + grads, the head's storage shared with lm_head (IAV's frozen W_b) counted once; "
        "rest = resident - held: the step's working memory (chunk logits), Python, torch, allocator and "
        "Arrow pools"
    )
    columns = [
        ("head", 4), ("LM in memory", 12), ("backbone on", 11), ("resident MiB", 12), ("bound MiB", 9),
        ("bound + grads MiB", 17), ("held MiB", 8), ("rest MiB", 8), ("s", 5), ("losses", 13),
    ]  # fmt: skip
    table = []
    for (kind, placement), r in results.items():
        bound = r["head"] + r["lm_head"] + r["optimizer"] + r["batch"]
        grads = bound + r["gradients"]
        held = grads - r["shared"]
        used = r["rss_peak"] - r["rss_start"]
        table.append(
            [kind, placement, ",".join(r["devices"]), f"{used / MIB:.0f}", f"{bound / MIB:.0f}",
             f"{grads / MIB:.0f}", f"{held / MIB:.0f}", f"{(used - held) / MIB:.0f}", f"{r['seconds']:.1f}",
             " ".join(f"{x:.4f}" for x in r["losses"])]
        )  # fmt: skip
    print_table(columns, table)
    for kind in ("iav", "calm"):
        r = results[(kind, "output-layer")]
        whole = results[(kind, "whole-lm")]
        print(
            f"  {kind}: head {r['head'] / MIB:.0f} MiB, lm_head {r['lm_head'] / MIB:.0f}, AdamW state "
            f"{r['optimizer'] / MIB:.0f}, gradients {r['gradients'] / MIB:.0f}, batch {r['batch'] / MIB:.1f}, "
            f"head storage shared with lm_head {r['shared'] / MIB:.0f}; "
            f"same losses with and without the backbone loaded: {'yes' if r['losses'] == whole['losses'] else 'NO'}"
        )


# per preset: (batch, batches, warm-up, steps, repeats, prompt length, response length)
DEFAULTS = {
    "cpu": (16, 8, 3, 20, 3, 128, 128),
    "gpu": (8, 4, 3, 20, 3, 128, 128),
    "vocab": (16, 2, 1, 3, 1, 30, 30),
    "memory": (8, 3, 0, 3, 1, 16, 16),
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", choices=tuple(DEFAULTS), default="cpu")
    parser.add_argument("--store", type=Path, help="store to build/reuse the inputs in (default: a temp dir)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument(
        "--batch",
        type=int,
        help="pairs per step (default: cpu and vocab 16 as configs/tiny.yaml, gpu and memory 8)",
    )
    parser.add_argument(
        "--batches", type=int, help="distinct micro-batches, cycled (default: cpu 8, gpu 4, vocab 2)"
    )
    parser.add_argument("--k", type=int, default=64, help="top-k of the reference cache")
    parser.add_argument("--warmup", type=int)
    parser.add_argument("--steps", type=int)
    parser.add_argument("--repeats", type=int)
    parser.add_argument(
        "--mixed-precision",
        choices=("no", "bf16"),
        help="train.*.mixed_precision: bf16 autocast as the loop's (default: cpu no, gpu bf16)",
    )
    parser.add_argument("--layers", type=int, default=32, help="gpu preset: decoder layers (7B: 32)")
    parser.add_argument("--dtype", default="bfloat16", help="gpu preset: model dtype")
    parser.add_argument("--prompt-len", type=int, help="longest prompt (gpu 128, vocab 30, memory 16)")
    parser.add_argument("--response-len", type=int, help="longest response (gpu 128, vocab 30, memory 16)")
    parser.add_argument("--vocabs", default=",".join(map(str, VOCABS)), help="vocab preset: vocabulary sizes")
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="gpu preset at small sizes (1 layer unless --layers, 2 pairs, 16-token prompts and "
        "responses, 1 warm-up + 2 steps, 1 repeat): checks the inputs without a GPU; vocab preset at "
        "V = 2,000 and 4,000, 4 pairs",
    )
    parser.add_argument("--memory-child", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.memory_child is not None:
        memory_child(args.memory_child)
        return
    batch, batches, warmup, steps, repeats, prompt_len, response_len = DEFAULTS[args.preset]
    if args.dry_run:
        if args.preset not in ("gpu", "vocab"):
            parser.error("--dry-run is for --preset gpu or vocab")
        args.layers = 1 if args.layers == 32 else args.layers
        batch, batches, warmup, steps, repeats, prompt_len, response_len = 2, 2, 1, 2, 1, 16, 16
        if args.preset == "vocab":
            batch, args.vocabs = 4, "2000,4000"
    args.batch, args.batches = args.batch or batch, args.batches or batches
    args.warmup = warmup if args.warmup is None else args.warmup
    args.steps, args.repeats = args.steps or steps, args.repeats or repeats
    args.prompt_len, args.response_len = args.prompt_len or prompt_len, args.response_len or response_len
    args.vocabs = [int(v) for v in str(args.vocabs).split(",")]
    gpu = args.preset == "gpu"
    args.mixed_precision = args.mixed_precision or ("bf16" if gpu else "no")
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        store = (args.store or Path(tmp) / "store").resolve()
        if args.preset == "vocab":
            print_vocab(args, *run_vocab(store, args))
            return
        if args.preset == "memory":
            print_memory(args, *run_memory(store, args))
            return
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
