"""Reference-pass benchmark on the tiny world: cache size, KL accuracy and throughput per k; and
the top-k KL estimates' fidelity at Llama's vocabulary.

    .venv/bin/python benchmarks/refpass_bench.py                # builds a test-size world in a temp dir
    .venv/bin/python benchmarks/refpass_bench.py --store store  # reuses (or builds) the world in a store

For k in 8, 16, 64, 256 it runs the real reference-pass stage (float16 top-k) and prints one
table with, per k:
- bytes per response token of the refcache on disk (all its Parquet shards over all scored
  tokens), the issue's bound 7k + 16, and dense float16 logits (2V bytes) at the world's
  vocabulary; plus the ratio against dense float16 at Llama's V = 32,000 for the uncompressed
  layout (4-byte id + 2-byte value per entry + 4-byte token log-prob), which does not profit
  from the tiny vocabulary's better compression;
- the signed relative error of the mean KL estimated from the cache against the mean exact KL,
  for a non-trivial head (an IAV base head whose weights are the LM head's plus noise), for the
  top-k + tail KL (`losses.topk_tail_kl`) and the extrapolated one (`losses.topk_extrapolated_kl`,
  what `kl: topk` trains with);
- the reference pass's tokens/s divided by a bare forward pass's (model(...).logits) tokens/s
  over the same length-sorted batches: compute only with the former extraction (`before`:
  `torch.topk` over the (N, V) logits, kept here as `legacy_topk_reference`) and the current one
  (`after`: `reference.sorted_topk`, a partition and a sort of k keys, `torch.topk` only for rows
  with ties), interleaved in one run, and compute + Parquet write; and whether both extractions
  give bit-identical values.

Then, at k = 64, where the reference pass's time goes: seconds per step of one pass over all
shards (each step timed around its function, best of `--repeats`), next to the bare forward's
backbone and output layer.

The tiny world's backbone is so small (2 layers, width 64) that the per-token work the cache
adds (log-sum-exp and top-k over the vocabulary) weighs as much as the model itself; one line
therefore times that work at Llama size (H = 4096, V = 32,000) against the output-layer matmul
alone, which is itself a few percent of a 7B forward pass.

The last table checks both KL estimates at V = 32,000, k = 64, where the tiny world cannot: a
random 2-layer Llama of width 256 whose lm_head is rescaled to reference distributions of
increasing sharpness (the top 64 ids holding ~54 % to ~98 % of the mass), the real reference
pass over synthetic pairs (hidden states stored, so the exact KL can be computed), and three
perturbed heads: the LM head's weights plus noise of 0.1x and 0.5x their std, and the LM's
logits divided by 0.8 (a sharpened policy).
"""

from __future__ import annotations

import argparse
import contextlib
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from common import machine_line, prepare_tiny_world, print_table, random_llama

import alignheads.models.reference as reference_module
from alignheads.config import ModelConfig, RefPassConfig
from alignheads.models.losses import exact_kl, topk_extrapolated_kl, topk_tail_kl
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


ESTIMATORS = {"top-k+tail": topk_tail_kl, "extrapolated": topk_extrapolated_kl}


def relative_errors(ref_logits, policy, ids, lps, rows: int = 512) -> tuple[float, dict[str, float]]:
    """(mean exact KL, {estimator: (mean estimate − mean exact) / mean exact}) over all tokens,
    `rows` tokens at a time (at V = 32,000 a whole (N, V) float32 copy is GBs)."""
    sums = dict.fromkeys(["exact", *ESTIMATORS], 0.0)
    with torch.inference_mode():
        for i in range(0, ref_logits.shape[0], rows):
            ref, pol = ref_logits[i : i + rows], policy[i : i + rows]
            sums["exact"] += exact_kl(ref, pol).double().sum().item()
            for name, estimate in ESTIMATORS.items():
                sums[name] += estimate(ids[i : i + rows], lps[i : i + rows], pol).double().sum().item()
    exact = sums["exact"] / ref_logits.shape[0]
    errors = {name: (sums[name] / ref_logits.shape[0] - exact) / exact for name in ESTIMATORS}
    return exact, errors


def kl_errors(reference, tables: dict[int, object], tokenized, noise: float, seed: int) -> tuple[float, dict]:
    """Mean exact KL of a perturbed IAV base head, and each estimator's relative error per k."""
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
    errors, exact = {}, 0.0
    for k, table in tables.items():
        ids = torch.from_numpy(token_matrix(table.column("topk_ids")))
        lps = torch.from_numpy(token_matrix(table.column("topk_logprobs"))).float()
        exact, errors[k] = relative_errors(ref_logits, policy, ids, lps)
    return exact, errors


def bare_forward_seconds(reference, batches) -> float:
    """Wall seconds of the plain forward pass (``model(...).logits``, all positions) over ``batches``:
    what the reference pass is compared with."""
    t = time.perf_counter()
    with torch.inference_mode():
        for b in batches:
            _ = reference.model(input_ids=b.input_ids, attention_mask=b.attention_mask, use_cache=False).logits
    return time.perf_counter() - t


def legacy_topk_reference(logits, targets, k: int):
    """`models.reference.topk_reference` as it was before `sorted_topk` (`torch.topk` over the
    (N, V) logits, the log-sum-exp reusing its maximum): the "before" of the throughput columns."""
    logits = logits.float()
    values, ids = logits.topk(k, dim=-1, sorted=True)
    top = values[:, :1]
    lse = (logits - top).exp_().sum(-1).log_().add_(top.squeeze(-1))
    target_lp = logits.gather(-1, targets.long().unsqueeze(-1)).squeeze(-1) - lse
    return target_lp, ids.to(torch.int32), values - lse.unsqueeze(-1)


@contextlib.contextmanager
def legacy_extraction():
    """The reference pass with the former extraction (ReferenceModel.extract looks the function up
    in its module at each call)."""
    current = reference_module.topk_reference
    reference_module.topk_reference = legacy_topk_reference
    try:
        yield
    finally:
        reference_module.topk_reference = current


def shard_batches(plan) -> list:
    """The reference pass's own length-sorted packed batches of every shard."""
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
    return batches


def same_scores(reference, batches, k: int) -> bool:
    """Whether the former and the current extraction give bit-identical statistics."""
    for b in batches:
        now = reference.score_batch(b, k)
        with legacy_extraction():
            before = reference.score_batch(b, k)
        for name in ("target_logprobs", "topk_ids", "topk_logprobs", "seq_logprobs"):
            if not np.array_equal(getattr(now, name), getattr(before, name)):
                return False
    return True


def throughput(store: Path, plan, reference, repeats: int) -> dict[str, float]:
    """Refpass tokens/s as a fraction of a bare forward's over the same shards and length-sorted
    batches: compute only with the former extraction (`before`) and the current one (`after`),
    and compute + write (current). Best of `repeats` interleaved runs each (the machine is shared:
    the minimum is the least disturbed)."""
    batches = shard_batches(plan)

    def bare() -> float:
        return bare_forward_seconds(reference, batches)

    def refpass(write: bool) -> float:
        t = time.perf_counter()
        with tempfile.TemporaryDirectory(dir=store) as tmp:
            for index in range(plan.n_shards):
                data = compute_refpass_shard(plan, index, reference, progress=False)
                if write:
                    write_shard(data.tables[TABLE], Path(tmp), shard_path(TABLE, index))
        return time.perf_counter() - t

    def before() -> float:
        with legacy_extraction():
            return refpass(write=False)

    runs = {"bare": bare, "before": before, "after": lambda: refpass(False), "write": lambda: refpass(True)}
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):  # interleaved, so a slow spell of the machine hits all of them
        for name, run in runs.items():
            seconds[name].append(run())
    best = {name: min(v) for name, v in seconds.items()}
    return {name: best["bare"] / best[name] for name in ("before", "after", "write")}


# the steps of the reference pass that `step_profile` times: (label, module, attribute)
PROFILED_STEPS = (
    ("read tokenized rows", "alignheads.tasks.refpass", "read_table_rows"),
    ("pack_batch", "alignheads.models.reference", "pack_batch"),
    ("backbone", None, "backbone"),
    ("output layer (N rows)", "alignheads.models.reference", "ReferenceModel.output_logits"),
    ("sorted_topk", "alignheads.models.reference", "sorted_topk"),
    ("topk_reference (incl. sorted_topk)", "alignheads.models.reference", "topk_reference"),
    ("extract (incl. the two above)", "alignheads.models.reference", "ReferenceModel.extract"),
    ("restore input order", "alignheads.models.reference", "_restore_order"),
    ("build_rows", "alignheads.storage.refcache", "build_rows"),  # imported where a shard is built
)


@contextlib.contextmanager
def timed_steps(reference, seconds: dict[str, float]):
    """Wrap each of PROFILED_STEPS (and the reference's backbone) so that its wall time is added to
    ``seconds[label]`` while the context is open."""
    import importlib

    def timed(label, fn):
        def wrapper(*args, **kwargs):
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                seconds[label] = seconds.get(label, 0.0) + time.perf_counter() - t

        return wrapper

    undo = []
    for label, module, name in PROFILED_STEPS:
        if module is None:  # the backbone module instance: its forward
            owner, attr = reference.backbone, "forward"
        else:
            owner = importlib.import_module(module)
            *path, attr = name.split(".")
            for part in path:
                owner = getattr(owner, part)
        original = owner.__dict__[attr] if attr in owner.__dict__ else getattr(owner, attr)
        undo.append((owner, attr, original, attr in owner.__dict__))
        setattr(owner, attr, timed(label, getattr(owner, attr)))
    try:
        yield seconds
    finally:
        for owner, attr, original, own in reversed(undo):
            if own:
                setattr(owner, attr, original)
            else:
                delattr(owner, attr)


def step_profile(plan, reference, repeats: int) -> dict[str, float]:
    """Seconds per step of one reference pass over all shards (compute only, best of `repeats`),
    with the whole pass, the bare forward over the same batches and its output layer alone."""
    batches = shard_batches(plan)
    best: dict[str, float] = {}

    def keep(name: str, value: float) -> None:
        best[name] = min(best.get(name, float("inf")), value)

    for _ in range(repeats):
        keep("bare forward", bare_forward_seconds(reference, batches))
        with torch.inference_mode():
            hidden = [reference.backbone(input_ids=b.input_ids, attention_mask=b.attention_mask).last_hidden_state
                      for b in batches]  # fmt: skip
            t = time.perf_counter()
            for h in hidden:
                _ = reference.output_logits(h)
        keep("bare: output layer (all B·T rows)", time.perf_counter() - t)
        seconds: dict[str, float] = {}
        with timed_steps(reference, seconds):
            t = time.perf_counter()
            for index in range(plan.n_shards):
                compute_refpass_shard(plan, index, reference, progress=False)
            seconds["reference pass (all)"] = time.perf_counter() - t
        for name, value in seconds.items():
            keep(name, value)
    return best


TAIL_DRAWS = 16  # `refpass.tail_draws` timed at Llama size


def llama_scale_check(tokens: int = 256, hidden: int = 4096, vocab: int = LLAMA_VOCAB, k: int = 64):
    """Seconds for (output-layer matmul, log-sum-exp + top-k, TAIL_DRAWS tail draws per token) on
    `tokens` synthetic hidden states."""
    from alignheads.models.reference import draw_tail, scored_token_keys, token_uniforms, topk_reference

    gen = torch.Generator().manual_seed(0)
    h = torch.randn(tokens, hidden, generator=gen)
    w = torch.randn(vocab, hidden, generator=gen) * 0.02
    y = torch.randint(0, vocab, (tokens,), generator=gen)
    with torch.inference_mode():
        t = time.perf_counter()
        logits = torch.nn.functional.linear(h, w)
        matmul = time.perf_counter() - t
        t = time.perf_counter()
        _, ids, _ = topk_reference(logits, y, k)
        extract = time.perf_counter() - t
        t = time.perf_counter()  # what the pass adds per batch with tail draws: the uniforms and the draws
        keys = scored_token_keys(np.array([0]), np.array([tokens]))
        draw_tail(logits, ids, torch.from_numpy(token_uniforms(keys, TAIL_DRAWS)))
        draws = time.perf_counter() - t
    return matmul, extract, draws


# the KL fidelity check at Llama's vocabulary: a random Llama of this width, its lm_head rescaled
# to reference distributions of different sharpness (the share of the mass its top 64 hold)
FIDELITY_SHAPE = {
    "hidden_size": 256,
    "intermediate_size": 688,
    "num_attention_heads": 4,
    "vocab_size": LLAMA_VOCAB,
}
FIDELITY_SCALES = (3.0, 4.0, 5.0, 6.0)
PERTURBATIONS = ("noise 0.1", "noise 0.5", "temperature 0.8")


def perturbed_logits(reference, hidden, name: str, seed: int = 0):
    """Logits of a perturbed IAV base head on ``hidden (N, H)``: the LM head plus Gaussian noise of
    0.1 or 0.5 times its weights' std, or the LM's logits sharpened (divided by 0.8)."""
    w = reference.output_layer.weight
    with torch.inference_mode():
        if name.startswith("temperature"):
            return reference.output_logits(hidden) / float(name.split()[1])
        gen = torch.Generator().manual_seed(seed)
        noise = float(name.split()[1]) * w.std() * torch.randn(w.shape, generator=gen)
        return torch.nn.functional.linear(hidden, w + noise)


def llama_kl_fidelity(store: Path, args) -> list[dict]:
    """Per sharpness and perturbation: the cache's top-k estimates (k = 64, float16 log-probs, the
    real reference pass) against the exact KL over every scored token, at V = 32,000."""
    from train_bench import refpass_in_memory, synthetic_tokenized

    from alignheads.models.reference import ReferenceModel

    cpu = torch.device("cpu")
    tok = synthetic_tokenized(store, args.fidelity_pairs, 32, 32, LLAMA_VOCAB, seed=0)
    rows = []
    for scale in FIDELITY_SCALES:
        model = random_llama(FIDELITY_SHAPE, 2, cpu, torch.float32, seed=0)
        gen = torch.Generator().manual_seed(1)
        w = model.lm_head.weight
        with torch.no_grad():  # logits of std ~scale: from near-uniform (3) to peaked (6)
            w.copy_(torch.randn(w.shape, generator=gen) * scale / FIDELITY_SHAPE["hidden_size"] ** 0.5)
        reference = ReferenceModel(model, cpu)
        identity = {"kind": "random-llama", "layers": 2, "seed": 0, "scale": scale, **FIDELITY_SHAPE}
        ref = refpass_in_memory(store, model, reference, tok, identity, k=64, store_hidden=True)
        table = read_table(ref.path, TABLE)
        hidden = torch.from_numpy(token_matrix(table.column("hidden"))).float()
        ids = torch.from_numpy(token_matrix(table.column("topk_ids")))
        lps = torch.from_numpy(token_matrix(table.column("topk_logprobs"))).float()
        mass = lps.exp().sum(-1).mean().item()
        with torch.inference_mode():
            ref_logits = reference.output_logits(hidden)
        for name in PERTURBATIONS:
            exact, errors = relative_errors(ref_logits, perturbed_logits(reference, hidden, name), ids, lps)
            rows.append({"scale": scale, "mass": mass, "tokens": hidden.shape[0], "perturbation": name,
                         "exact": exact, **errors})  # fmt: skip
    return rows


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
    parser.add_argument(
        "--fidelity-pairs", type=int, default=64, help="pairs of the V = 32,000 KL check (0: skip it)"
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
        rows, tables, identical = {}, {}, True
        for k in KS:
            cfg = RefPassConfig(k=k, dtype="float16", batch_size=16, pairs_per_shard=128, device="cpu")
            plan = plan_refpass(cfg, model_cfg, model_dir, tok.path, fp)
            result = run_refpass(store, plan, reference)
            tokens = result.manifest.info["scored_tokens"]
            tables[k] = read_table(result.path, TABLE)
            per_token = cache_bytes(result.path, plan.n_shards) / tokens
            identical &= same_scores(reference, shard_batches(plan), k)
            speed = throughput(store, plan, reference, args.repeats)
            rows[k] = {"bytes": per_token, "tokens": tokens, "speed": speed, "vocab": plan.vocab_size}
        cfg = RefPassConfig(k=64, dtype="float16", batch_size=16, pairs_per_shard=128, device="cpu")
        profile = step_profile(plan_refpass(cfg, model_cfg, model_dir, tok.path, fp), reference, args.repeats)
        exact, errors = kl_errors(reference, tables, tokenized, args.noise, seed=0)
        fidelity = llama_kl_fidelity(store, args) if args.fidelity_pairs else []
    matmul, extract, draws = llama_scale_check()

    vocab = next(iter(rows.values()))["vocab"]
    print(machine_line("refpass benchmark"))
    print(
        f"tiny world (test size): V = {vocab}, {rows[KS[0]]['tokens']} scored response tokens; mean exact KL of "
        f"the head = {exact:.4f} nats"
    )
    columns = [
        ("k", 4), ("bytes/token", 11), ("7k+16", 6), ("dense fp16 (V)", 14), ("x smaller", 9),
        ("raw x smaller @32000", 20), ("KL err top-k+tail", 17), ("KL err extrapolated", 19),
        ("speed before", 12), ("speed after", 11), ("after (+write)", 14),
    ]  # fmt: skip
    table = []
    for k, r in rows.items():
        raw = 6 * k + 4
        table.append(
            [str(k), f"{r['bytes']:.1f}", str(7 * k + 16), str(2 * vocab), f"{2 * vocab / r['bytes']:.2f}",
             f"{2 * LLAMA_VOCAB / raw:.0f}", f"{errors[k]['top-k+tail']:+.2%}", f"{errors[k]['extrapolated']:+.2%}",
             f"{r['speed']['before']:.2f}x", f"{r['speed']['after']:.2f}x", f"{r['speed']['write']:.2f}x"]
        )  # fmt: skip
    print_table(columns, table)
    print(
        "speed: refpass compute tokens/s / bare forward tokens/s; before = the former extraction (torch.topk "
        "over the (N, V) logits), after = sorted_topk (partition + sort of k keys, torch.topk for tied rows); "
        f"statistics bit-identical before/after on every batch: {'yes' if identical else 'NO'}"
    )
    whole = profile["reference pass (all)"]
    print(f"where the reference pass's time goes at k = 64 (compute only, best of {args.repeats}; nested steps "
          "include their parts):")  # fmt: skip
    print_table(
        [("step", 36), ("ms", 7), ("of the pass", 11)],
        [[name, f"{value * 1e3:.1f}", f"{value / whole:.1%}"] for name, value in profile.items()],
    )
    print(
        f"Llama size (H = 4096, V = 32000, 256 tokens, same threads): output-layer matmul {matmul * 1e3:.0f} ms, "
        f"log-sum-exp + top-64 {extract * 1e3:.0f} ms ({extract / matmul:.1%} of the matmul alone), "
        f"{TAIL_DRAWS} tail draws per token {draws * 1e3:.0f} ms ({draws / matmul:.1%})"
    )
    if fidelity:
        print(
            f"KL fidelity at V = {LLAMA_VOCAB:,}, k = 64 (float16 cache, the real reference pass): random Llama "
            f"(2 layers, H = {FIDELITY_SHAPE['hidden_size']}), lm_head rescaled to logits of std ~scale; "
            f"{fidelity[0]['tokens']} scored tokens; the head perturbed: its weights + noise x their std, or "
            "the logits / 0.8; signed relative error of the mean estimate"
        )
        columns = [
            ("scale", 5), ("top-64 mass", 11), ("perturbation", 15), ("exact KL", 8),
            ("top-k+tail error", 16), ("extrapolated error", 18),
        ]  # fmt: skip
        print_table(
            columns,
            [[f"{r['scale']:.0f}", f"{r['mass']:.3f}", r["perturbation"], f"{r['exact']:.4f}",
              f"{r['top-k+tail']:+.2%}", f"{r['extrapolated']:+.2%}"] for r in fidelity],
        )  # fmt: skip


if __name__ == "__main__":
    main()
